//! `/metrics` tells the truth: discovery metrics are set from real lookups, departed pods leave
//! no series behind, and concurrent scrapes never see a gauge half-sampled. The real binary, a
//! real DNS server on loopback, fake pods on 127.0.1.x.

mod common;

use common::dns::{Answer, DnsServer};
use common::*;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECS: Duration = Duration::from_secs(10);
const NAME: &str = "codec.ai-media.svc.cluster.local";

fn ips(pods: &[FakePod]) -> Vec<IpAddr> {
    pods.iter().map(|p| p.addr.ip()).collect()
}

fn addrs(pods: &[FakePod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.addr.to_string()).collect()
}

fn config(dns: &DnsServer, port: u16) -> String {
    format!(
        "dns: {{nameservers: [\"{}\"], refresh_interval: 50ms, stability_samples: 2, stability_interval: 20ms, unstable_retry: 100ms}}\n\
         queue: {{timeout: 30s}}\n\
         routes:\n  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {port}}}\n",
        dns.addr
    )
}

/// The value of one sample line of `/metrics` (`None` when absent).
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics(agent: &Agent) -> String {
    loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body
}

/// The `pod` label of every `lb_pod_*` series.
fn pod_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("lb_pod_"))
        .filter_map(|l| l.split("pod=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_metrics_follow_real_lookups() {
    let pods = start_pods(1, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let agent = Agent::start(&config(&dns, pods[0].addr.port())).await;
    let service = format!("{{service=\"{NAME}\"}}");
    let pool = format!("{{pool=\"{NAME}:{}\"}}", pods[0].addr.port());

    let m = metrics(&agent).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = sample(
        &m,
        &format!("lb_discovery_last_success_timestamp_seconds{service}"),
    )
    .unwrap_or_else(|| panic!("no last-success timestamp:\n{m}"));
    println!("last success {last}, now {now}");
    assert!(
        last > 0.0 && (now - last).abs() < 60.0,
        "last success {last}, now {now}"
    );
    assert_eq!(
        sample(&m, &format!("lb_discovery_pods{pool}")),
        Some(2.0),
        "{m}"
    );
    let errors_before = sample(&m, &format!("lb_discovery_errors_total{service}")).unwrap_or(0.0);
    assert_eq!(errors_before, 0.0, "{m}");

    // The DNS server fails every lookup: the error counter rises, and the timestamp stops.
    dns.set(NAME, Answer::ServFail);
    eventually(SECS, "discovery errors counted", || async {
        let m = metrics(&agent).await;
        sample(&m, &format!("lb_discovery_errors_total{service}")).unwrap_or(0.0) >= 3.0
    })
    .await;
    let m = metrics(&agent).await;
    let seen = sample(&m, &format!("lb_discovery_errors_total{service}")).unwrap();
    println!("errors after SERVFAIL: {seen}");
    let m = metrics(&agent).await;
    let stopped_at = sample(
        &m,
        &format!("lb_discovery_last_success_timestamp_seconds{service}"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            &format!("lb_discovery_last_success_timestamp_seconds{service}")
        ),
        Some(stopped_at),
        "no lookup succeeded meanwhile:\n{m}"
    );
    // The last good pod list stays, and so does its gauge.
    assert_eq!(sample(&m, &format!("lb_discovery_pods{pool}")), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn departed_pods_leave_no_series_behind() {
    const PODS: usize = 20;
    let pods = start_pods(1, PODS).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods[..2]));
    let agent = Agent::start(&config(&dns, pods[0].addr.port())).await;

    // DNS moves through the 20 pods, two at a time; each pair serves some requests.
    let mut held = None;
    for step in 0..PODS / 2 {
        let live = &pods[2 * step..2 * step + 2];
        dns.set_ips(NAME, &ips(live));
        eventually(SECS, "pod list changed", || async {
            agent.active_pods().await == addrs(live)
        })
        .await;
        for _ in 0..4 {
            assert_eq!(agent.get("/work?ms=1").await.status, 200);
        }
        if step == PODS / 2 - 2 {
            // A request that outlives its pod's departure.
            held = Some(spawn_get(agent.addr, "/work?ms=2000"));
            eventually(SECS, "long request started", || async {
                live.iter().any(|p| p.stats.inflight() == 1)
            })
            .await;
        }
    }
    let live = addrs(&pods[PODS - 2..]);
    let holder = pods[PODS - 4..PODS - 2]
        .iter()
        .find(|p| p.stats.inflight() == 1)
        .expect("the long request is still running");
    let m = metrics(&agent).await;
    let mut expected = live.clone();
    expected.insert(holder.addr.to_string());
    assert_eq!(pod_series(&m), expected, "{m}");
    let pool = format!("{NAME}:{}", holder.addr.port());
    assert_eq!(
        sample(
            &m,
            &format!("lb_pod_inflight{{pod=\"{}\",pool=\"{pool}\"}}", holder.addr)
        ),
        Some(1.0),
        "{m}"
    );

    // Its last request ends: its series go too.
    assert_eq!(held.unwrap().await.unwrap().unwrap().status, 200);
    eventually(SECS, "only live pods have series", || async {
        pod_series(&metrics(&agent).await) == live
    })
    .await;
    let m = metrics(&agent).await;
    println!(
        "after {PODS} pods came and went: {} lb_pod_requests_total series",
        m.lines()
            .filter(|l| l.starts_with("lb_pod_requests_total"))
            .count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_scrapes_all_see_the_queue() {
    const QUEUED: usize = 5;
    const SCRAPERS: usize = 8;
    const SCRAPES: usize = 50;
    let pods = start_pods(1, 1).await.unwrap();
    // Several admin threads, so scrapes really run at the same time, and a second service
    // with many pods listed before ours, so sampling a scrape is not over in an instant.
    let others: Vec<String> = (0..300)
        .map(|i| format!("\"127.0.{}.{}:9\"", 2 + i / 200, 1 + i % 200))
        .collect();
    let agent = Agent::start(&format!(
        "threads: 4\nqueue: {{timeout: 30s}}\nroutes:\n  - {{uri: /other, limit: 1, endpoints: [{}]}}\n  - {{uri: /work, limit: 1, endpoints: {}}}\n",
        others.join(", "),
        endpoints(&pods)
    ))
    .await;
    let pool = format!("static[{}]", pods[0].addr);
    let queue_depth = || async {
        let status = agent.status().await;
        status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == pool.as_str())
            .map_or(0, |p| p["queue_depth"].as_u64().unwrap())
    };
    let blocker = spawn_get(agent.addr, "/work?ms=20000");
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;
    let queued: Vec<_> = (0..QUEUED)
        .map(|_| spawn_get(agent.addr, "/work?ms=1"))
        .collect();
    eventually(SECS, "requests queued", || async {
        queue_depth().await == QUEUED as u64
    })
    .await;

    let depth = format!("lb_queue_depth{{pool=\"{pool}\"}}");
    let inflight = format!(
        "lb_pod_inflight{{pod=\"{}\",pool=\"{pool}\"}}",
        pods[0].addr
    );
    let admin = agent.admin;
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (depth, inflight) = (depth.clone(), inflight.clone());
            tokio::spawn(async move {
                let mut wrong = Vec::new();
                for _ in 0..SCRAPES {
                    let m = loadgen::get(admin, "/metrics", &[]).await.unwrap().body;
                    let seen = (sample(&m, &depth), sample(&m, &inflight));
                    if seen != (Some(QUEUED as f64), Some(1.0)) {
                        wrong.push(seen);
                    }
                }
                wrong
            })
        })
        .collect();
    let mut wrong = Vec::new();
    for s in scrapers {
        wrong.extend(s.await.unwrap());
    }
    // The state did not change while we scraped: every scrape had to see it.
    assert_eq!(
        pods[0].stats.inflight(),
        1,
        "blocker ended during the scrapes"
    );
    assert_eq!(queue_depth().await, QUEUED as u64);
    assert!(
        wrong.is_empty(),
        "{} of {} scrapes saw (queue depth, in flight) other than ({QUEUED}, 1): {:?}",
        wrong.len(),
        SCRAPERS * SCRAPES,
        &wrong[..wrong.len().min(10)]
    );
    // Held only to keep the queue still; stopping the agent ends them.
    blocker.abort();
    for q in queued {
        q.abort();
    }
}
