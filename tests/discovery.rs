//! End-to-end discovery: the real binary, a real DNS server on loopback whose zone the test
//! changes, and fake pods on 127.0.1.x. Intervals are short so the tests run in seconds.

mod common;

use common::dns::{Answer, DnsServer};
use common::*;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(10);
const NAME: &str = "codec.ai-media.svc.cluster.local";

fn ips(pods: &[FakePod]) -> Vec<IpAddr> {
    pods.iter().map(|p| p.addr.ip()).collect()
}

fn config(dns: &DnsServer, port: u16, limit: usize, queue: &str) -> String {
    format!(
        "dns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n\
         queue: {queue}\n\
         routes:\n  - {{uri: /work, limit: {limit}, service_name: codec, namespace: ai-media, http_port: {port}}}\n",
        dns.addr
    )
}

fn addrs(pods: &[FakePod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.addr.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn added_pods_take_traffic_and_drain_the_queue() {
    let pods = start_pods(1, 3).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods[..1]));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    let addr = agent.addr;

    // Pod 1 is busy and three requests wait.
    let blocker = spawn_get(addr, "/work?ms=3000");
    eventually(SECS, "blocker on pod 1", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued: Vec<_> = (0..3).map(|_| spawn_get(addr, "/work?ms=200")).collect();
    eventually(SECS, "3 queued", || async {
        agent.queue_depth().await == 3
    })
    .await;

    // Two pods appear: the queued requests start on them without waiting for pod 1.
    let changed = Instant::now();
    dns.set_ips(NAME, &ips(&pods));
    eventually(SECS, "a new pod got a request", || async {
        pods[1].stats.started() + pods[2].stats.started() > 0
    })
    .await;
    println!(
        "DNS change to first request on a new pod: {:?}",
        changed.elapsed()
    );
    for q in queued {
        assert_eq!(q.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(
        pods[0].stats.inflight(),
        1,
        "pod 1 is still busy: the queue drained onto the new pods"
    );
    assert_eq!(pods[1].stats.started() + pods[2].stats.started(), 3);
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    assert!(
        agent.log().contains("added"),
        "pod-list change logged:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_pod_finishes_its_request_and_gets_no_new_ones() {
    let pods = start_pods(1, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    let addr = agent.addr;

    let long = spawn_get(addr, "/work?ms=1500");
    eventually(SECS, "long request on a pod", || async {
        pods.iter().map(|p| p.stats.inflight()).sum::<usize>() == 1
    })
    .await;
    let (busy, other) = if pods[0].stats.inflight() == 1 {
        (0, 1)
    } else {
        (1, 0)
    };

    // The busy pod leaves the DNS answer.
    dns.set_ips(NAME, &[pods[other].addr.ip()]);
    eventually(SECS, "pod removed from the pool", || async {
        agent.active_pods().await == BTreeSet::from([pods[other].addr.to_string()])
    })
    .await;
    for _ in 0..5 {
        assert_eq!(agent.get("/work?ms=10").await.status, 200);
    }
    assert_eq!(
        pods[busy].stats.started(),
        1,
        "no new request went to the removed pod"
    );
    assert_eq!(pods[other].stats.started(), 5);
    let r = long.await.unwrap().unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request on the removed pod completed"
    );
    eventually(SECS, "removed pod forgotten, no slot leaked", || async {
        let s = agent.status().await;
        s["pools"][0]["inflight"] == 0 && s["pools"][0]["pods"].as_array().unwrap().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_flapping_faster_than_the_stability_window_do_not_churn() {
    let pods = start_pods(1, 3).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods[..2]));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    let stable = addrs(&pods[..2]);
    assert_eq!(agent.active_pods().await, stable);

    // The server alternates {1,2,3} and {1,2} on every lookup for 1.5 s: the changed answer
    // never comes back identically, however the lookups are timed, so it is never adopted.
    dns.set(NAME, Answer::Alternating(vec![ips(&pods), ips(&pods[..2])]));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            agent.active_pods().await,
            stable,
            "pod list changed during flapping"
        );
    }
    assert!(
        dns.queries_for(NAME) > 10,
        "the name was looked up while flapping"
    );
    assert_eq!(pods[2].stats.started(), 0);

    // Once the answer settles, the change is taken.
    dns.set_ips(NAME, &ips(&pods));
    eventually(SECS, "settled answer adopted", || async {
        agent.active_pods().await == addrs(&pods)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_server_stopping_mid_traffic_fails_no_request() {
    let pods = start_pods(1, 2).await.unwrap();
    let mut dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    let addr = agent.addr;

    let traffic = || async move {
        let mut statuses = Vec::new();
        for _ in 0..15 {
            let batch: Vec<_> = (0..2).map(|_| spawn_get(addr, "/work?ms=50")).collect();
            for b in batch {
                statuses.push(b.await.unwrap().map(|r| r.status).unwrap_or(0));
            }
        }
        statuses
    };
    let during = tokio::spawn(traffic());
    tokio::time::sleep(Duration::from_millis(300)).await;
    dns.stop();
    let warning = format!("DNS lookup of {NAME} failed");
    eventually(SECS, "DNS failure noticed", || async {
        agent.log().contains(&warning)
    })
    .await;
    let mut statuses = during.await.unwrap();
    // Keep going while lookups keep failing.
    statuses.extend(traffic().await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    statuses.extend(traffic().await);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        agent.active_pods().await,
        addrs(&pods),
        "pods kept while DNS is down"
    );
    let log = agent.log();
    assert_eq!(
        log.matches(&warning).count(),
        1,
        "warned once per episode:\n{log}"
    );

    dns.restart().await;
    eventually(SECS, "recovery logged", || async {
        agent.log().contains("works again")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nxdomain_means_zero_pods_requests_wait_then_proceed() {
    let pods = start_pods(1, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::NxDomain);
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    assert!(agent.active_pods().await.is_empty());
    let addr = agent.addr;
    let waiting = spawn_get(addr, "/work?ms=10");
    eventually(SECS, "request queued", || async {
        agent.queue_depth().await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "with zero pods the request waits instead of failing"
    );

    // An empty NOERROR answer is zero pods too.
    dns.set(NAME, Answer::Records(vec![]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());

    dns.set_ips(NAME, &ips(&pods));
    let r = waiting.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(pods[0].stats.started(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_pods_times_out_with_503() {
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::NxDomain);
    let agent = Agent::start(&config(&dns, 8080, 1, "{timeout: 300ms}")).await;
    let r = agent.get("/work").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("queue timeout"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servfail_keeps_the_last_good_pods() {
    let pods = start_pods(1, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}")).await;
    dns.set(NAME, Answer::ServFail);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(agent.active_pods().await, addrs(&pods));
    assert_eq!(agent.get("/work").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_waits_for_the_first_resolution() {
    let pods = start_pods(1, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set(NAME, Answer::ServFail);
    let agent = Agent::spawn(&config(&dns, pods[0].addr.port(), 1, "{timeout: 30s}"));
    // Up, but not ready: the name has not resolved yet.
    eventually(SECS, "healthz up", || async {
        loadgen::get(agent.admin, "/healthz", &[])
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let r = loadgen::get(agent.admin, "/readyz", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    // The proxy already accepts requests; they wait.
    let addr = agent.addr;
    let early = spawn_get(addr, "/work");
    dns.set_ips(NAME, &ips(&pods));
    agent.wait_ready(SECS).await;
    assert_eq!(early.await.unwrap().unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routes_on_one_service_share_one_resolver_and_one_pool() {
    let pods = start_pods(1, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let port = pods[0].addr.port();
    let agent = Agent::start(&format!(
        "dns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms}}\n\
         routes:\n  - {{uri: /a, limit: 1, service_name: codec, namespace: ai-media, http_port: {port}}}\n  - {{uri: /b, limit: 1, service_name: codec, namespace: ai-media, http_port: {port}}}\n",
        dns.addr
    ))
    .await;
    let status = agent.status().await;
    assert_eq!(status["pools"].as_array().unwrap().len(), 1, "{status}");

    // One resolver: over 1 s with a 100 ms refresh, about 10 rounds of A + AAAA, not 20.
    let before = dns.queries.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rounds = (dns.queries.load(std::sync::atomic::Ordering::SeqCst) - before) / 2;
    assert!((5..=14).contains(&rounds), "{rounds} lookups in 1 s");

    // One pool: the pod's single slot is shared by both routes.
    let addr = agent.addr;
    let a = spawn_get(addr, "/a?ms=300");
    let b = spawn_get(addr, "/b?ms=300");
    assert_eq!(a.await.unwrap().unwrap().status, 200);
    assert_eq!(b.await.unwrap().unwrap().status, 200);
    assert_eq!(pods[0].stats.max_inflight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_settings_adopt_a_new_pod_after_the_stability_window() {
    let pods = start_pods(1, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods[..1]));
    // Only the nameserver is set: refresh 2s, 5 samples 500ms apart, unstable retry 10s.
    let agent = Agent::start(&format!(
        "dns: {{nameservers: [\"{}\"]}}\nroutes:\n  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {}}}\n",
        dns.addr,
        pods[0].addr.port()
    ))
    .await;
    let addr = agent.addr;
    let blocker = spawn_get(addr, "/work?ms=8000");
    eventually(SECS, "blocker on pod 1", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued = spawn_get(addr, "/work?ms=10");
    eventually(SECS, "queued", || async { agent.queue_depth().await == 1 }).await;
    let changed = Instant::now();
    dns.set_ips(NAME, &ips(&pods));
    assert_eq!(queued.await.unwrap().unwrap().status, 200);
    let took = changed.elapsed();
    println!("default settings: DNS change to first request on the new pod took {took:?}");
    assert_eq!(pods[1].stats.started(), 1);
    // Never before the 5 samples 500 ms apart have been seen.
    assert!(
        took >= Duration::from_secs(2),
        "adopted after {took:?}, before the stability window"
    );
    blocker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_starts_discovery_for_a_new_name_and_stops_it_for_a_removed_one() {
    const OTHER: &str = "render.ai-media.svc.cluster.local";
    let codec = start_pods(41, 1).await.unwrap();
    let render = start_pods(45, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&codec));
    dns.set_ips(OTHER, &ips(&render));
    let dns_line = format!(
        "reload_interval: 50ms\ndns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n",
        dns.addr
    );
    let codec_route = format!(
        "  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {}}}\n",
        codec[0].addr.port()
    );
    let render_route = format!(
        "  - {{uri: /render, limit: 1, service_name: render, namespace: ai-media, http_port: {}}}\n",
        render[0].addr.port()
    );
    let agent = Agent::start(&format!("{dns_line}routes:\n{codec_route}")).await;
    assert_eq!(agent.get("/render").await.status, 404);

    agent.update_config(&format!("{dns_line}routes:\n{codec_route}{render_route}"));
    eventually(
        SECS,
        "render route served by its discovered pods",
        || async { agent.get("/render").await.status == 200 },
    )
    .await;
    let r1 = spawn_get(agent.addr, "/render?ms=300");
    let r2 = spawn_get(agent.addr, "/render?ms=300");
    assert_eq!(r1.await.unwrap().unwrap().status, 200);
    assert_eq!(r2.await.unwrap().unwrap().status, 200);
    assert!(render.iter().all(|p| p.stats.max_inflight() == 1));
    assert!(
        render.iter().all(|p| p.stats.started() >= 1),
        "both render pods used"
    );

    // Drop the codec route: its name is no longer looked up.
    agent.update_config(&format!("{dns_line}routes:\n{render_route}"));
    eventually(SECS, "codec discovery stopped", || async {
        agent
            .log()
            .contains(&format!("stopped discovery of {NAME}"))
    })
    .await;
    let before = dns.queries_for(NAME);
    assert!(before > 0, "the codec name was looked up while in use");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        dns.queries_for(NAME),
        before,
        "no more lookups of a removed name"
    );
    assert_eq!(agent.get("/render").await.status, 200);
}

/// The system resolver (no `dns.nameservers`) with a pod's resolv.conf: a search list and
/// `ndots:2`. SERVFAIL, REFUSED and no answer at all for the real name keep the pods (an error
/// stays an error, never "no records"), and only the real name is ever asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn system_resolver_with_a_search_list_keeps_the_pods_through_dns_errors() {
    let pods = start_pods(51, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let dir = temp_dir("resolv");
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "search ai-media.svc.cluster.local svc.cluster.local cluster.local\n\
         nameserver 127.0.0.1\n\
         options ndots:2\n",
    )
    .unwrap();
    let port = dns.addr.port().to_string();
    let agent = Agent::spawn_with_env(
        &format!(
            "dns: {{refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n\
             routes:\n  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {}}}\n",
            pods[0].addr.port()
        ),
        &[
            ("LB_AGENT_RESOLV_CONF", resolv.to_str().unwrap()),
            ("LB_AGENT_RESOLV_CONF_PORT", &port),
        ],
    );
    agent.wait_ready(SECS).await;
    assert_eq!(agent.active_pods().await, addrs(&pods));

    for (n, failure) in [Answer::ServFail, Answer::Refused, Answer::Silent]
        .into_iter()
        .enumerate()
    {
        let before = dns.queries_for(NAME);
        dns.set(NAME, failure.clone());
        // Many rounds with SERVFAIL/REFUSED (100 ms apart); a silent server costs the 2 s
        // timeout per round, so give it a few.
        let hold = match failure {
            Answer::Silent => Duration::from_millis(5000),
            _ => Duration::from_millis(1000),
        };
        let started = Instant::now();
        while started.elapsed() < hold {
            assert_eq!(
                agent.active_pods().await,
                addrs(&pods),
                "pods lost on {failure:?} after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(agent.get("/work").await.status, 200);
        println!(
            "{failure:?}: {} queries for the name in {hold:?}",
            dns.queries_for(NAME) - before
        );
        dns.set_ips(NAME, &ips(&pods));
        eventually(SECS, "lookups work again", || async {
            agent.log().matches("works again").count() == n + 1
        })
        .await;
    }
    let total = dns.queries.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        total,
        dns.queries_for(NAME),
        "only the absolute name is asked for, never a search-list name"
    );
    assert_eq!(
        agent
            .log()
            .matches(&format!("DNS lookup of {NAME} failed"))
            .count(),
        3,
        "each failure episode warned once:\n{}",
        agent.log()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Replicas share one ConfigMap: a reload that adds a route whose name does not resolve must not
/// take them all out of the Service. The agent stays ready, the new pool shows as unresolved in
/// /status, the existing route keeps serving, and the failure is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_adding_a_route_that_does_not_resolve_keeps_the_agent_ready() {
    const BAD: &str = "bad.test.local";
    let pods = start_pods(55, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    dns.set(BAD, Answer::ServFail);
    let port = pods[0].addr.port();
    let dns_line = format!(
        "reload_interval: 50ms\ndns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n",
        dns.addr
    );
    let work = format!(
        "  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {port}}}\n"
    );
    let bad = format!("  - {{uri: /bad, limit: 1, host: {BAD}, http_port: {port}}}\n");
    let agent = Agent::start(&format!("{dns_line}routes:\n{work}")).await;

    agent.update_config(&format!("{dns_line}routes:\n{work}{bad}"));
    eventually(SECS, "the new name looked up and failing", || async {
        agent.log().contains(&format!("DNS lookup of {BAD} failed"))
    })
    .await;
    for _ in 0..20 {
        let r = loadgen::get(agent.admin, "/readyz", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = agent.status().await;
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(
        status["unresolved"],
        serde_json::json!([format!("{BAD}:{port}")]),
        "{status}"
    );
    assert_eq!(agent.get("/work").await.status, 200);

    // Once the name resolves, the new route serves and nothing is unresolved.
    dns.set_ips(BAD, &ips(&pods));
    eventually(SECS, "the new route served", || async {
        agent.get("/bad").await.status == 200
    })
    .await;
    assert_eq!(agent.status().await["unresolved"], serde_json::json!([]));
}

/// At start-up readiness waits for every pool of the config in force: one that does not resolve
/// keeps the agent unready (a rolling update stops at it), and a reload that removes it, before
/// the agent was ever ready, lets it become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_start_up_readiness_waits_for_every_pool_of_the_config_in_force() {
    const BAD: &str = "bad.test.local";
    let pods = start_pods(57, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    dns.set(BAD, Answer::ServFail);
    let port = pods[0].addr.port();
    let dns_line = format!(
        "reload_interval: 50ms\ndns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n",
        dns.addr
    );
    let work = format!(
        "  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {port}}}\n"
    );
    let bad = format!("  - {{uri: /bad, limit: 1, host: {BAD}, http_port: {port}}}\n");
    let agent = Agent::spawn(&format!("{dns_line}routes:\n{work}{bad}"));
    eventually(SECS, "the bad name failing", || async {
        agent.log().contains(&format!("DNS lookup of {BAD} failed"))
    })
    .await;
    let r = loadgen::get(agent.admin, "/readyz", &[]).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.body.contains(&format!("{BAD}:{port}")), "{}", r.body);

    agent.update_config(&format!("{dns_line}routes:\n{work}"));
    agent.wait_ready(SECS).await;
    assert_eq!(agent.get("/work").await.status, 200);
}

/// Five requests wait on a route whose host is misspelled (NXDOMAIN: zero pods) when a reload
/// corrects the host. The retired pool has no pod, so it follows the pool that now serves the
/// route: the five are served (200), not left to their queue timeout, and each pod's cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_queued_on_a_misspelled_host_are_served_once_a_reload_fixes_it() {
    const TYPO: &str = "codex.ai-media.svc.cluster.local";
    let pods = start_pods(71, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods));
    let port = pods[0].addr.port();
    let body = |host: &str| {
        format!(
            "reload_interval: 50ms\n\
             dns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n\
             queue: {{timeout: 8s}}\n\
             routes:\n  - {{uri: /work, limit: 1, host: {host}, http_port: {port}}}\n",
            dns.addr
        )
    };
    let agent = Agent::start(&body(TYPO)).await;
    let queued: Vec<_> = (0..5)
        .map(|_| spawn_get(agent.addr, "/work?ms=100"))
        .collect();
    eventually(SECS, "5 queued", || async {
        agent.queue_depth().await == 5
    })
    .await;

    let fixed = Instant::now();
    agent.update_config(&body(NAME));
    let mut statuses = Vec::new();
    for q in queued {
        statuses.push(q.await.unwrap().map(|r| r.status).unwrap_or(0));
    }
    let took = fixed.elapsed();
    println!("host fixed -> the 5 queued requests served: {took:?} ({statuses:?})");
    assert_eq!(statuses, vec![200; 5]);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(pods.iter().all(|p| p.stats.max_inflight() == 1));
    assert_eq!(agent.get("/work").await.status, 200);

    // Once its last request is done the retired pool is gone, and so is the typo's discovery.
    eventually(SECS, "the typo's discovery stopped", || async {
        agent
            .log()
            .contains(&format!("stopped discovery of {TYPO}"))
    })
    .await;
    let status = agent.status().await;
    let pools = status["pools"].as_array().unwrap();
    assert!(pools.iter().all(|p| p["retired"] == false), "{status}");
    let before = dns.queries_for(TYPO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(dns.queries_for(TYPO), before, "no more lookups of the typo");
}

/// A route moves to another Service while a request waits for the old Service's only pod; then
/// that pod is replaced in DNS. The retired pool still follows DNS: the waiting request goes to
/// the new pod at once, not to the removed one once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retired_pool_keeps_following_dns_while_requests_wait_on_it() {
    const OTHER: &str = "render.ai-media.svc.cluster.local";
    let codec = start_pods(75, 2).await.unwrap();
    let render = start_pods(78, 1).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&codec[..1]));
    dns.set_ips(OTHER, &ips(&render));
    let dns_line = format!(
        "reload_interval: 50ms\ndns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 3, stability_interval: 50ms, unstable_retry: 300ms}}\n",
        dns.addr
    );
    let agent = Agent::start(&format!(
        "{dns_line}routes:\n  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {}}}\n",
        codec[0].addr.port()
    ))
    .await;
    let blocker = spawn_get(agent.addr, "/work?ms=4000");
    eventually(SECS, "blocker on the codec pod", || async {
        codec[0].stats.inflight() == 1
    })
    .await;
    let waiting = spawn_get(agent.addr, "/work?ms=10");
    eventually(SECS, "one request queued", || async {
        agent.queue_depth().await == 1
    })
    .await;

    agent.update_config(&format!(
        "{dns_line}routes:\n  - {{uri: /work, limit: 1, service_name: render, namespace: ai-media, http_port: {}}}\n",
        render[0].addr.port()
    ));
    eventually(SECS, "the codec pool retired", || async {
        agent
            .log()
            .contains(&format!("{NAME}:{}: retired", codec[0].addr.port()))
    })
    .await;
    let replaced = Instant::now();
    dns.set_ips(NAME, &ips(&codec[1..]));
    assert_eq!(waiting.await.unwrap().unwrap().status, 200);
    println!(
        "pod replaced -> queued request served: {:?}",
        replaced.elapsed()
    );
    assert_eq!(
        codec[1].stats.started(),
        1,
        "served by the pod DNS names now"
    );
    assert_eq!(
        codec[0].stats.started(),
        1,
        "nothing more for the removed pod"
    );
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    assert_eq!(agent.get("/work").await.status, 200);
    assert_eq!(render[0].stats.started(), 1);
}

/// The silent trap (issue 16): an ordinary ClusterIP Service's DNS name answers its one cluster
/// IP, which lb-agent would take for a single pod. A Service name answering one address is
/// warned about in the log and flagged in `/status`; the flag clears when the name lists pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_name_answering_one_address_is_warned_about() {
    let pods = start_pods(1, 2).await.unwrap();
    let dns = DnsServer::start().await;
    dns.set_ips(NAME, &ips(&pods[..1]));
    let agent = Agent::start(&config(&dns, pods[0].addr.port(), 2, "{timeout: 5s}")).await;
    let flagged = |s: &serde_json::Value| {
        s["discovery"]
            .as_array()
            .and_then(|d| d.iter().find(|x| x["source"] == NAME))
            .map(|x| x["single_address"].as_bool().unwrap_or(false))
    };
    assert_eq!(flagged(&agent.status().await), Some(true));
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "DNS {NAME} answers one address ({})",
            pods[0].addr.ip()
        )) && log.contains("discovery: kubernetes"),
        "{log}"
    );
    dns.set_ips(NAME, &ips(&pods));
    eventually(
        SECS,
        "the flag clears once the name lists two pods",
        || async { flagged(&agent.status().await) == Some(false) },
    )
    .await;
    // The route and --check say how the route finds its pods.
    assert!(
        log.contains("route /work: DNS codec.ai-media.svc.cluster.local, pod port")
            && log.contains("the Service must be headless"),
        "{log}"
    );
}
