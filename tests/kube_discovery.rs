//! Kubernetes API discovery end to end: the real binary, pointed through a real kubeconfig file
//! at the fake API server of `testkit::fakeapi` on loopback, so the real kube-rs client and
//! watcher and lb-agent's discovery all run. Fake pods on 127.0.1.x count their own in-flight
//! requests: that is what the caps are judged by.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testkit::fakeapi::{Endpoint, FakeApi, SlicePort};

const SECS: Duration = Duration::from_secs(10);
const NS: &str = "ai-media";
const SVC: &str = "yt-server-video-codec";

fn ip(p: &FakePod) -> IpAddr {
    p.addr.ip()
}

fn ready(pods: &[&FakePod]) -> Vec<Endpoint> {
    pods.iter().map(|p| Endpoint::ready(ip(p))).collect()
}

/// A kubeconfig for `api` in a directory of its own.
fn kubeconfig(api: &FakeApi) -> PathBuf {
    let path = temp_dir("kubeconfig").join("config");
    api.write_kubeconfig(&path, NS).unwrap();
    path
}

/// The Go agent's config, unchanged but for its paths and the pod port: `kube_config_file`
/// and an ordinary Service (no `discovery` key).
fn go_config(kubeconfig: &std::path::Path, port: u16, limit: usize) -> String {
    format!(
        "debug: false\nkube_config_file: {}\nqueue: {{timeout: 30s}}\nroutes:\n  - uri: /work\n    limit: {limit}\n    service_name: {SVC}\n    namespace: {NS}\n    http_port: {port}\n",
        kubeconfig.display()
    )
}

fn addrs(pods: &[&FakePod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.addr.to_string()).collect()
}

/// The Go agent's own setup: its config with `kube_config_file`, an ordinary Service whose
/// endpoints the API spreads over three slices. Requests spread over all six pods at `limit`
/// each; none ever holds more (DNS of such a Service would have given one address: at most two
/// requests in the whole service).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_go_agents_config_spreads_over_the_pods_of_three_slices() {
    let pods = start_pods(1, 6).await.unwrap();
    let api = FakeApi::start().await;
    let port = pods[0].addr.port();
    for (i, pair) in pods.chunks(2).enumerate() {
        let eps = pair.iter().map(|p| Endpoint::ready(ip(p))).collect();
        api.put_slice(NS, &format!("{SVC}-{i}"), SVC, eps, vec![]);
    }
    // Another Service's slice in the same namespace must not be picked up.
    api.put_slice(NS, "other-0", "other", ready(&[&pods[0]]), vec![]);
    let kc = kubeconfig(&api);
    let agent = Agent::start(&go_config(&kc, port, 2)).await;
    assert_eq!(
        agent.active_pods().await,
        addrs(&pods.iter().collect::<Vec<_>>())
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "route /work: Kubernetes API: EndpointSlices of Service {NS}/{SVC}, pod port {port}"
        )),
        "{log}"
    );

    // 12 requests fill every pod to its limit of 2; 4 more wait.
    let calls: Vec<_> = (0..16)
        .map(|_| spawn_get(agent.addr, "/work?ms=600"))
        .collect();
    eventually(SECS, "every pod at its limit", || async {
        pods.iter().all(|p| p.stats.inflight() == 2)
    })
    .await;
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 2, "{} exceeded or missed", p.addr);
    }
    let started: usize = pods.iter().map(|p| p.stats.started()).sum();
    assert_eq!(started, 16, "each request reached exactly one pod once");

    // --check says the same.
    let dir = temp_dir("check");
    std::fs::write(dir.join("config.yaml"), go_config(&kc, port, 2)).unwrap();
    let out = std::process::Command::new(bin())
        .arg("--check")
        .arg("-c")
        .arg(dir.join("config.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Kubernetes API") && text.contains(&kc.display().to_string()),
        "{text}"
    );
}

/// A pod added to a slice takes requests as soon as the event arrives (no stability window);
/// a pod marked terminating finishes its request and gets no new one after the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_pod_serves_at_once_and_a_terminating_pod_gets_nothing_new() {
    let pods = start_pods(11, 3).await.unwrap();
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let api = FakeApi::start().await;
    api.put_slice(NS, "s-0", SVC, ready(&[a, b]), vec![]);
    let agent = Agent::start(&go_config(&kubeconfig(&api), a.addr.port(), 1)).await;

    // Both pods busy, three requests wait.
    let busy: Vec<_> = (0..2)
        .map(|_| spawn_get(agent.addr, "/work?ms=1500"))
        .collect();
    eventually(SECS, "both pods busy", || async {
        a.stats.inflight() == 1 && b.stats.inflight() == 1
    })
    .await;
    let queued: Vec<_> = (0..3)
        .map(|_| spawn_get(agent.addr, "/work?ms=300"))
        .collect();
    eventually(SECS, "3 queued", || async {
        agent.queue_depth().await == 3
    })
    .await;

    // Pod c appears and pod a starts terminating, in one event each.
    let event = Instant::now();
    api.put_slice(NS, "s-0", SVC, ready(&[a, b, c]), vec![]);
    eventually(SECS, "the new pod got a request", || async {
        c.stats.started() > 0
    })
    .await;
    println!(
        "watch event to first request on the new pod: {} ms",
        event.elapsed().as_millis()
    );
    let a_started = a.stats.started();
    api.put_slice(
        NS,
        "s-0",
        SVC,
        vec![
            Endpoint::terminating(ip(a)),
            Endpoint::ready(ip(b)),
            Endpoint::ready(ip(c)),
        ],
        vec![],
    );
    eventually(SECS, "pod a no longer active", || async {
        !agent.active_pods().await.contains(&a.addr.to_string())
    })
    .await;
    for r in busy.into_iter().chain(queued) {
        assert_eq!(
            r.await.unwrap().unwrap().status,
            200,
            "in-flight request on the terminating pod completes"
        );
    }
    // More requests after the event: none reaches the terminating pod.
    let more: Vec<_> = (0..6)
        .map(|_| spawn_get(agent.addr, "/work?ms=50"))
        .collect();
    for r in more {
        assert_eq!(r.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(
        a.stats.started(),
        a_started,
        "the terminating pod got a request after its event"
    );
    for p in &pods {
        assert!(p.stats.max_inflight() <= 1, "{} over its limit", p.addr);
    }
}

/// Slices split and merge (the controller moves endpoints between objects): an address listed
/// in two slices at once is one pod with one cap, and a pod moving between slices never leaves
/// the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slices_split_and_merge_without_losing_or_doubling_a_pod() {
    let pods = start_pods(21, 2).await.unwrap();
    let (a, b) = (&pods[0], &pods[1]);
    let api = FakeApi::start().await;
    api.put_slice(NS, "s-0", SVC, ready(&[a, b]), vec![]);
    let agent = Agent::start(&go_config(&kubeconfig(&api), a.addr.port(), 1)).await;

    // Split: b is listed in a second slice too, then leaves the first.
    api.put_slice(NS, "s-1", SVC, ready(&[b]), vec![]);
    let calls: Vec<_> = (0..6)
        .map(|_| spawn_get(agent.addr, "/work?ms=200"))
        .collect();
    api.put_slice(NS, "s-0", SVC, ready(&[a]), vec![]);
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(agent.active_pods().await, addrs(&[a, b]));
    // Merge: back into one slice, the other deleted.
    api.put_slice(NS, "s-0", SVC, ready(&[a, b]), vec![]);
    api.delete_slice(NS, "s-1");
    let calls: Vec<_> = (0..6)
        .map(|_| spawn_get(agent.addr, "/work?ms=200"))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(agent.active_pods().await, addrs(&[a, b]));
    for p in &pods {
        assert_eq!(
            p.stats.max_inflight(),
            1,
            "{} held more than its one slot",
            p.addr
        );
    }
    // Deleting the last slice is a real answer: no pods.
    api.delete_slice(NS, "s-0");
    eventually(SECS, "no pods once every slice is gone", || async {
        agent.active_pods().await.is_empty()
    })
    .await;
}

/// The API down for 10 s in the middle of a burst: every request succeeds on the pods known
/// before, the outage is logged once at its start and once at its end, and a pod added while
/// the API was down is picked up once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_outage_during_a_burst_fails_nothing_and_keeps_the_pods() {
    let pods = start_pods(31, 3).await.unwrap();
    let api = FakeApi::start().await;
    api.put_slice(NS, "s-0", SVC, ready(&[&pods[0], &pods[1]]), vec![]);
    let agent = Agent::start(&go_config(&kubeconfig(&api), pods[0].addr.port(), 2)).await;

    let burst: Vec<_> = (0..40)
        .map(|i| spawn_get(agent.addr, &format!("/work?ms={}", 200 + (i % 5) * 100)))
        .collect();
    api.set_down(true);
    let outage = Instant::now();
    // Requests keep coming during the outage.
    let mut during = Vec::new();
    while outage.elapsed() < Duration::from_secs(10) {
        during.push(spawn_get(agent.addr, "/work?ms=100"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        agent.active_pods().await,
        addrs(&[&pods[0], &pods[1]]),
        "the pod list is kept while the API is down"
    );
    api.put_slice(
        NS,
        "s-0",
        SVC,
        ready(&[&pods[0], &pods[1], &pods[2]]),
        vec![],
    );
    api.set_down(false);
    let mut failed = 0;
    for r in burst.into_iter().chain(during) {
        if r.await.unwrap().map(|r| r.status).ok() != Some(200) {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "requests failed during the API outage");
    eventually(SECS, "the pod added during the outage serves", || async {
        agent
            .active_pods()
            .await
            .contains(&pods[2].addr.to_string())
    })
    .await;
    for p in &pods {
        assert!(p.stats.max_inflight() <= 2, "{} over its limit", p.addr);
    }
    let log = agent.log();
    let failures = log
        .matches(&format!("Kubernetes discovery of k8s:{NS}/{SVC} failed"))
        .count();
    assert_eq!(
        failures, 1,
        "one log line at the start of the outage:\n{log}"
    );
    assert!(log.contains("keeping the last known pods"), "{log}");
    assert!(
        log.contains(&format!(
            "Kubernetes discovery of k8s:{NS}/{SVC} works again"
        )),
        "{log}"
    );
    let status = agent.status().await;
    let errors = status["discovery"][0]["errors"].as_u64().unwrap_or(0);
    assert!(errors >= 1, "the outage is counted: {status}");
}

/// A watch that falls behind (`410 Gone`) relists and goes on; a `403` names the permission
/// that is missing and the route keeps its last pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gone_relists_and_forbidden_names_the_permission_and_keeps_the_pods() {
    let pods = start_pods(41, 3).await.unwrap();
    let api = FakeApi::start().await;
    api.put_slice(NS, "s-0", SVC, ready(&[&pods[0], &pods[1]]), vec![]);
    let agent = Agent::start(&go_config(&kubeconfig(&api), pods[0].addr.port(), 1)).await;
    eventually(SECS, "the watch is open", || async {
        api.open_watches() == 1
    })
    .await;
    let lists = api.stats().lists;

    api.expire_watches();
    eventually(SECS, "a relist after 410", || async {
        api.stats().lists > lists
    })
    .await;
    api.put_slice(
        NS,
        "s-0",
        SVC,
        ready(&[&pods[0], &pods[1], &pods[2]]),
        vec![],
    );
    eventually(SECS, "a change after the relist applies", || async {
        agent.active_pods().await.len() == 3
    })
    .await;

    api.set_forbidden(true);
    eventually(SECS, "the 403 is logged", || async {
        agent.log().contains(
            "forbidden: the agent's service account needs get, list and watch on endpointslices",
        )
    })
    .await;
    let log = agent.log();
    assert!(log.contains(&format!("in namespace {NS}")), "{log}");
    assert_eq!(
        agent.active_pods().await.len(),
        3,
        "pods kept while forbidden"
    );
    let calls: Vec<_> = (0..6)
        .map(|_| spawn_get(agent.addr, "/work?ms=100"))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert!(p.stats.max_inflight() <= 1, "{} over its limit", p.addr);
    }
}

/// A named port is looked up in the slices, and a Service's not-ready pods get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_port_and_not_ready_pods() {
    let pods = start_pods(51, 2).await.unwrap();
    let port = pods[0].addr.port();
    let api = FakeApi::start().await;
    api.put_slice(
        NS,
        "s-0",
        SVC,
        vec![
            Endpoint::unknown(ip(&pods[0])),
            Endpoint::not_ready(ip(&pods[1])),
        ],
        vec![SlicePort::new("http", port), SlicePort::new("metrics", 9)],
    );
    let agent = Agent::start(&format!(
        "discovery: kubernetes\nkube_config_file: {}\nroutes:\n  - {{uri: /work, limit: 1, service_name: {SVC}, namespace: {NS}, http_port: http}}\n",
        kubeconfig(&api).display()
    ))
    .await;
    assert_eq!(agent.active_pods().await, addrs(&[&pods[0]]));
    assert_eq!(agent.get("/work?ms=1").await.status, 200);
    assert_eq!(pods[0].stats.started(), 1);
}
