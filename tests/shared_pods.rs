//! A pod has one cap, whichever route, pool or config generation reaches it: read from the
//! pods' own in-flight counts.

mod common;

use common::*;
use std::time::Duration;

const SECS: Duration = Duration::from_secs(10);

fn list(pods: &[&FakePod]) -> String {
    let v: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!("[{}]", v.join(", "))
}

async fn queued(agent: &Agent) -> u64 {
    let status = agent.status().await;
    status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["queue_depth"].as_u64().unwrap())
        .sum()
}

/// Two routes whose `endpoints` lists share pod 2, both with limit 1: a burst on both routes
/// never puts two requests on pod 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_endpoint_lists_share_the_pods_cap() {
    let pods = start_pods(1, 3).await.unwrap();
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /a, limit: 1, endpoints: {}}}\n  - {{uri: /b, limit: 1, endpoints: {}}}\n",
        list(&[&pods[0], &pods[1]]),
        list(&[&pods[1], &pods[2]])
    ))
    .await;
    let burst: Vec<_> = (0..12)
        .map(|i| {
            let path = if i % 2 == 0 { "/a?ms=300" } else { "/b?ms=300" };
            spawn_get(agent.addr, path)
        })
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 1, "pod {} over its cap", p.addr);
    }
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 12);
}

/// A reload that adds a pod to a static list makes a new pool. It must see the request the old
/// pool has running on pod 1, and the request queued in the old pool must get pod 1 before a
/// newcomer that arrived after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grown_static_list_keeps_the_cap_and_the_queue_order() {
    let pods = start_pods(1, 2).await.unwrap();
    let route = |p: &[&FakePod]| {
        format!(
            "reload_interval: 50ms\nroutes:\n  - {{uri: /work, limit: 1, endpoints: {}}}\n",
            list(p)
        )
    };
    let agent = Agent::start(&route(&[&pods[0]])).await;
    let r1 = get_tagged(&agent, "/work?ms=1500", "r1");
    eventually(SECS, "r1 runs on pod 1", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let r2 = get_tagged(&agent, "/work?ms=200", "r2");
    eventually(SECS, "r2 queued", || async { queued(&agent).await == 1 }).await;

    agent.update_config(&route(&[&pods[0], &pods[1]]));
    eventually(SECS, "the grown list is in force", || async {
        agent.status().await["pools"][0]["pods"]
            .as_array()
            .is_some_and(|v| v.len() == 2)
    })
    .await;
    let r3 = get_tagged(&agent, "/work?ms=3000", "r3");
    eventually(SECS, "r3 runs on the new pod 2", || async {
        pods[1].stats.inflight() == 1
    })
    .await;
    let r4 = get_tagged(&agent, "/work?ms=200", "r4");
    eventually(SECS, "r4 queued behind r2", || async {
        queued(&agent).await == 2
    })
    .await;

    for t in [r1, r2, r3, r4] {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(pods[0].stats.max_inflight(), 1, "pod 1 over its cap");
    assert_eq!(pods[1].stats.max_inflight(), 1, "pod 2 over its cap");
    assert_eq!(pods[0].stats.arrivals(), vec!["r1", "r2", "r4"]);
    assert_eq!(pods[1].stats.arrivals(), vec!["r3"]);
}
