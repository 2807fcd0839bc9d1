//! Operating lb-agent: metrics under real traffic, graceful shutdown on SIGTERM.

mod common;

use common::*;
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(10);

/// The value of one sample line of `/metrics` (0 when absent).
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(agent: &Agent) -> String {
    loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_a_burst() {
    let pods = start_pods(1, 2).await.unwrap();
    let agent = start_work_route("queue: {max_waiting: 6, timeout: 400ms}\n", 1, &pods).await;
    let pool = format!("static[{},{}]", pods[0].addr, pods[1].addr);
    let addr = agent.addr;
    // 2 run at once, 6 wait, 4 are refused at once (queue full). Of the 6 waiting, the 2 that
    // get the slots after 300 ms succeed, the other 4 time out at 400 ms.
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(tokio::spawn(async move {
            loadgen::get(addr, "/work?ms=300", &[]).await
        }));
    }
    eventually(SECS, "pods busy", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;
    for _ in 0..6 {
        tasks.push(tokio::spawn(async move {
            loadgen::get(addr, "/work?ms=300", &[]).await
        }));
    }
    eventually(SECS, "6 queued", || async {
        agent.queue_depth().await == 6
    })
    .await;
    let during = metrics(&agent).await;
    for line in during
        .lines()
        .filter(|l| l.starts_with("lb_queue_depth") || l.starts_with("lb_pod_"))
    {
        println!("during the burst: {line}");
    }
    assert_eq!(
        sample(&during, &format!("lb_queue_depth{{pool=\"{pool}\"}}")),
        6.0,
        "{during}"
    );
    assert_eq!(
        sample(
            &during,
            &format!(
                "lb_pod_inflight{{pod=\"{}\",pool=\"{pool}\"}}",
                pods[0].addr
            )
        ),
        1.0
    );
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            loadgen::get(addr, "/work?ms=300", &[]).await
        }));
    }
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        let kind = match (r.status, r.body.as_str()) {
            (200, _) => "ok",
            (503, b) if b.contains("queue full") => "queue_full",
            (503, b) if b.contains("queue timeout") => "queue_timeout",
            _ => "other",
        };
        *seen.entry(kind.to_string()).or_default() += 1;
    }
    let after = metrics(&agent).await;
    println!("clients saw {seen:?}");
    for (outcome, n) in &seen {
        let m = sample(
            &after,
            &format!("lb_requests_total{{outcome=\"{outcome}\",route=\"/work\"}}"),
        );
        assert_eq!(
            m,
            f64::from(*n),
            "outcome {outcome}: metrics {m}, clients {n}\n{after}"
        );
    }
    assert_eq!(seen.values().sum::<u32>(), 12);
    assert!(
        seen.get("queue_full").copied().unwrap_or(0) >= 1,
        "{seen:?}"
    );
    assert_eq!(
        sample(&after, &format!("lb_queue_depth{{pool=\"{pool}\"}}")),
        0.0
    );
    assert_eq!(
        sample(&after, "lb_queue_wait_seconds_count{route=\"/work\"}"),
        12.0
    );
    assert_eq!(
        sample(
            &after,
            &format!("lb_pod_limit{{pod=\"{}\",pool=\"{pool}\"}}", pods[1].addr)
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_in_flight_and_queued_requests_finish_then_exits() {
    let pods = start_pods(1, 1).await.unwrap();
    let mut agent = start_work_route("shutdown_grace: 10s\n", 1, &pods).await;
    let addr = agent.addr;
    let in_flight = spawn_get(addr, "/work?ms=800");
    eventually(SECS, "in flight", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued = spawn_get(addr, "/work?ms=300");
    eventually(SECS, "queued", || async { agent.queue_depth().await == 1 }).await;
    let t0 = Instant::now();
    agent.terminate();
    assert_eq!(in_flight.await.unwrap().unwrap().status, 200);
    assert_eq!(
        queued.await.unwrap().unwrap().status,
        200,
        "queued request served during the drain"
    );
    let status = agent.wait_exit(SECS).await.expect("exited");
    assert!(status.success(), "{status:?}");
    let took = t0.elapsed();
    println!("SIGTERM to exit: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "exited once drained, not after the full 10 s grace: {took:?}"
    );
    assert!(agent.log().contains("drained"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_still_queued_at_the_deadline_get_503() {
    let pods = start_pods(1, 1).await.unwrap();
    let mut agent = start_work_route("shutdown_grace: 3s\nqueue: {timeout: 60s}\n", 1, &pods).await;
    let addr = agent.addr;
    let _long = spawn_get(addr, "/work?ms=20000");
    eventually(SECS, "in flight", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued = spawn_get(addr, "/work?ms=10");
    eventually(SECS, "queued", || async { agent.queue_depth().await == 1 }).await;
    let t0 = Instant::now();
    agent.terminate();
    let r = queued.await.unwrap().unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("shutting down"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    let status = agent
        .wait_exit(SECS)
        .await
        .expect("exited within the grace period");
    let took = t0.elapsed();
    println!("SIGTERM to exit with a request stuck in flight: {took:?} (grace 3 s)");
    assert!(took <= Duration::from_millis(3500), "{took:?}");
    let _ = status;
    assert_eq!(
        pods[0].stats.started(),
        1,
        "the queued request never reached the pod"
    );
}
