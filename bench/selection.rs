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
//!
//! `release_with_queued_retries`: 4 pods of limit 1, all busy, and N ∈ {0, 1,000, 10,000}
//! queued retries that have tried pod 0 (so may not use it). One iteration gives pod 0's slot
//! back (the ledger looks for a waiter that may use it, under its lock, and finds none) and
//! takes it again. Its cost should not grow with N: the queue asks one waiter per group of
//! waiters that tried the same pods (issue 18: 137 µs at 1,000 and 1.45 ms at 10,000 before).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use lb_agent::balance::{Arrival, Balancer, Ledger, QueuePolicy, Slot};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::task::{Context, Poll};
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

/// A current-thread runtime (entered by the caller, for the queue's timers) and a queue
/// policy that never times out within a bench.
fn setup(max_waiting: usize) -> (tokio::runtime::Runtime, QueuePolicy) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let q = QueuePolicy {
        max_waiting,
        timeout: Duration::from_secs(3600),
    };
    (rt, q)
}

fn selection(c: &mut Criterion) {
    let (rt, q) = setup(1000);
    let _guard = rt.enter();
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

fn release_with_queued_retries(c: &mut Criterion) {
    let (rt, q) = setup(20_000);
    let _guard = rt.enter();
    let mut group = c.benchmark_group("release_with_queued_retries");
    group.throughput(Throughput::Elements(1));
    for n in [0usize, 1000, 10_000] {
        let b = Balancer::new(&Ledger::new(), "bench", 1);
        rt.block_on(b.set_pods((0..4).map(pod).collect::<BTreeSet<_>>()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        let mut held: Vec<Slot> = (0..4).map(|_| pick(&b, &q, deadline)).collect();
        let at = held
            .iter()
            .position(|s| s.addr() == pod(0))
            .expect("one of the 4 slots is pod 0's");
        let mut pod0 = Some(held.swap_remove(at));
        let tried = [pod(0)];
        let mut arrivals: Vec<Arrival> = (0..n).map(|_| Arrival::default()).collect();
        let mut waiting: Vec<_> = arrivals
            .iter_mut()
            .map(|a| Box::pin(b.acquire(&q, deadline, &tried, a)))
            .collect();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        for w in &mut waiting {
            assert!(
                matches!(w.as_mut().poll(&mut cx), Poll::Pending),
                "every pod is busy: a retry must queue"
            );
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| {
                drop(pod0.take());
                pod0 = Some(pick(&b, &q, deadline));
                assert_eq!(pod0.as_ref().map(Slot::addr), Some(pod(0)));
            })
        });
        drop(waiting);
        drop(held);
    }
    group.finish();
}

criterion_group!(benches, selection, release_with_queued_retries);
criterion_main!(benches);
