//! Selection cost: one pick (least in flight under the cap) plus its release, through the
//! public `Balancer` API, with 10, 100 and 1,000 pods.
//!
//! Run alone: `cargo bench --bench selection` (or `bash bench/run selection`).
//!
//! Two pool states per size:
//! * `idle`: every pod free, so every pod is a candidate;
//! * `mixed`: pod i already holds `i % limit` requests, so candidates differ in load and the
//!   ranking has real work to do.
//!
//! A pick never waits here (there is always a free slot), so the future completes on its first
//! poll and the number is the pure CPU cost of choosing and giving back a slot.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use lb_agent::balance::{Arrival, Balancer, Ledger, QueuePolicy, Slot};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

const LIMIT: usize = 4;

fn pod(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i as u32);
    SocketAddr::new(IpAddr::V4(ip), 20109)
}

fn pick(b: &Balancer, q: &QueuePolicy, deadline: tokio::time::Instant) -> Slot {
    b.acquire(q, deadline, &[], &mut Arrival::default())
        .now_or_never()
        .expect("a free slot exists, so the pick must not wait")
        .expect("pick")
}

fn selection(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let q = QueuePolicy {
        max_waiting: 1000,
        timeout: Duration::from_secs(3600),
    };
    let mut group = c.benchmark_group("pick_release");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 100, 1000] {
        for state in ["idle", "mixed"] {
            let b = Balancer::new(&Ledger::new(), "bench", LIMIT);
            rt.block_on(b.set_pods((0..n).map(pod).collect::<BTreeSet<_>>()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
            // Load pod i with i % LIMIT requests: take slots until each pod holds its share,
            // keeping the ones that landed where wanted.
            let mut held = Vec::new();
            if state == "mixed" {
                let want: usize = (0..n).map(|i| i % LIMIT).sum();
                let mut spare = Vec::new();
                while held.len() < want {
                    let s = pick(&b, &q, deadline);
                    let i = u32::from(match s.addr().ip() {
                        IpAddr::V4(v4) => v4,
                        IpAddr::V6(_) => unreachable!("IPv4 pods only"),
                    }) - u32::from(Ipv4Addr::new(10, 0, 0, 1));
                    let have = held.iter().filter(|h: &&Slot| h.addr() == s.addr()).count();
                    if have < i as usize % LIMIT {
                        held.push(s);
                    } else {
                        spare.push(s);
                    }
                }
                drop(spare);
            }
            group.bench_with_input(BenchmarkId::new(state, n), &n, |bench, _| {
                bench.iter(|| drop(pick(&b, &q, deadline)))
            });
            drop(held);
        }
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
