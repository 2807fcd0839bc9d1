//! Several lb-agent processes sharing one slot ledger in a real `redis-server` on loopback:
//! every cap is global, read from the fake pods' own in-flight counts.

mod common;

use common::redis::Redis;
use common::*;
use std::time::{Duration, Instant};

const SECS: Duration = Duration::from_secs(15);

fn config(redis: &Redis, extra: &str, limit: usize, pods: &[FakePod]) -> String {
    format!(
        "ledger: {{redis: \"{}\", lease_ttl: 2s}}\nshutdown_delay: 0s\n{extra}routes:\n  - {{uri: /work, limit: {limit}, endpoints: {}}}\n",
        redis.url(),
        endpoints(pods)
    )
}

/// The queue length across every agent, as the ledger reports it in `/status`.
async fn global_queue(agent: &Agent) -> u64 {
    agent.status().await["ledger"]["queue_depth"]
        .as_u64()
        .unwrap_or(0)
}

/// 3 agents, 3 pods of limit 2, 36 requests sent at once, each to an agent chosen at random
/// (as a ClusterIP Service does): every pod stays at or below 2, and every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_through_three_agents_holds_every_cap() {
    let redis = Redis::start();
    let pods = start_pods(1, 3).await.unwrap();
    let body = config(&redis, "", 2, &pods);
    let agents = [
        Agent::start(&body).await,
        Agent::start(&body).await,
        Agent::start(&body).await,
    ];
    // A fixed pseudo-random spread, so a failure can be replayed.
    let mut x: u32 = 0x9e37_79b9;
    let burst: Vec<_> = (0..36)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            spawn_get(agents[(x % 3) as usize].addr, "/work?ms=300")
        })
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 2, "pod {} cap", p.addr);
    }
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 36);
    // Every agent reports the ledger it uses and its round trips to it.
    for agent in &agents {
        let status = agent.status().await;
        assert_eq!(status["ledger"]["kind"], "redis");
        assert_eq!(status["ledger"]["reachable"], true);
        let metrics = loadgen::get(agent.admin, "/metrics", &[])
            .await
            .unwrap()
            .body;
        assert!(metrics.contains("lb_ledger_reachable 1"), "{metrics}");
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix("lb_ledger_round_trip_seconds_count "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(count > 0, "no ledger round trips in /metrics:\n{metrics}");
    }
}

/// Requests queued through different agents are served in the order they reached the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_is_one_fifo_across_agents() {
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(&redis, "", 1, &pods);
    let agents = [
        Agent::start(&body).await,
        Agent::start(&body).await,
        Agent::start(&body).await,
    ];
    let first = get_tagged(&agents[0], "/work?ms=800", "r0");
    eventually(SECS, "r0 on the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let mut waiting = Vec::new();
    for i in 1..=6u64 {
        waiting.push(get_tagged(
            &agents[i as usize % 3],
            "/work?ms=20",
            &format!("r{i}"),
        ));
        eventually(SECS, "queued in the ledger", || async {
            global_queue(&agents[0]).await == i
        })
        .await;
    }
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    for t in waiting {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    let want: Vec<String> = (0..=6).map(|i| format!("r{i}")).collect();
    assert_eq!(pods[0].stats.arrivals(), want);
    assert_eq!(pods[0].stats.max_inflight(), 1);
}

/// An agent killed with requests in flight: its slots stay counted (its requests may still run
/// on the pod) until `lease_ttl`, then return; the other agents never exceed a cap meanwhile
/// and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agents_slots_return_after_the_lease_ttl() {
    let redis = Redis::start();
    let pods = start_pods(1, 2).await.unwrap();
    let body = config(&redis, "queue: {timeout: 20s}\n", 1, &pods);
    let mut doomed = Agent::start(&body).await;
    let other = Agent::start(&body).await;
    let lost: Vec<_> = (0..2)
        .map(|i| get_tagged(&doomed, "/work?ms=500", &format!("lost{i}")))
        .collect();
    eventually(SECS, "both pods busy", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;
    let queued: Vec<_> = (0..2)
        .map(|i| get_tagged(&other, "/work?ms=200", &format!("next{i}")))
        .collect();
    eventually(SECS, "queued behind the doomed agent", || async {
        global_queue(&other).await == 2
    })
    .await;
    doomed.kill9();
    let killed = Instant::now();
    for t in lost {
        assert!(
            t.await.unwrap().is_err(),
            "the client of a killed agent gets no answer"
        );
    }
    for t in queued {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    let returned = killed.elapsed();
    // A lease is renewed every third of its ttl, so it expires 2/3 ttl to 1 ttl after the kill.
    assert!(
        returned >= Duration::from_millis(1300),
        "slots came back after {returned:?}, before the 2 s lease could expire"
    );
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 1, "pod {} cap", p.addr);
    }
    let started: usize = pods.iter().map(|p| p.stats.started()).sum();
    assert_eq!(started, 4, "each request reached a pod exactly once");
    eprintln!("a killed agent's slots returned {returned:?} after kill -9 (lease_ttl 2s)");
}

/// A rolling update: a second agent starts while the first has long requests in flight, then
/// the first gets SIGTERM. The new agent sees the old one's slots throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_keeps_the_cap() {
    let redis = Redis::start();
    let pods = start_pods(1, 2).await.unwrap();
    let body = config(&redis, "", 1, &pods);
    let old = Agent::start(&body).await;
    let long: Vec<_> = (0..2)
        .map(|i| get_tagged(&old, "/work?ms=1500", &format!("old{i}")))
        .collect();
    eventually(SECS, "both pods busy", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;
    let new = Agent::start(&body).await;
    let fresh: Vec<_> = (0..4)
        .map(|i| get_tagged(&new, "/work?ms=100", &format!("new{i}")))
        .collect();
    eventually(
        SECS,
        "the new agent waits for the old one's slots",
        || async { global_queue(&new).await == 4 },
    )
    .await;
    old.terminate();
    for t in long.into_iter().chain(fresh) {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 1, "pod {} cap", p.addr);
    }
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 6);
}

/// Redis restarted empty mid-run: the agents re-assert their slots and their queued requests,
/// so no cap is exceeded, nothing is lost and the queue order stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_nothing() {
    let mut redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(&redis, "queue: {timeout: 20s}\n", 1, &pods);
    let a = Agent::start(&body).await;
    let b = Agent::start(&body).await;
    let first = get_tagged(&a, "/work?ms=1500", "r0");
    eventually(SECS, "r0 on the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let r1 = get_tagged(&b, "/work?ms=50", "r1");
    eventually(SECS, "r1 queued", || async { global_queue(&a).await == 1 }).await;
    let r2 = get_tagged(&a, "/work?ms=50", "r2");
    eventually(SECS, "r2 queued", || async { global_queue(&a).await == 2 }).await;
    redis.restart();
    eventually(SECS, "both waiters known again", || async {
        global_queue(&a).await == 2
    })
    .await;
    // A newcomer after the restart must not jump the re-asserted queue or the running r0.
    let r3 = get_tagged(&b, "/work?ms=50", "r3");
    for t in [first, r1, r2, r3] {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(pods[0].stats.max_inflight(), 1);
    assert_eq!(pods[0].stats.arrivals(), vec!["r0", "r1", "r2", "r3"]);
    for agent in [&a, &b] {
        let log = agent.log();
        assert!(log.contains("has a new epoch"), "{log}");
    }
}

/// Redis unreachable: a new request waits and gets the usual 503 at its queue timeout (never
/// a silent fall-back to local counting); when Redis is back, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_gives_a_clear_503_and_recovers() {
    let mut redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    // The queue timeout outlasts the ledger's recovery hold (2 s without grants after a new
    // epoch, while every agent re-asserts its slots), which also follows the first contact.
    let agent = Agent::start(&config(&redis, "queue: {timeout: 3s}\n", 1, &pods)).await;
    assert_eq!(agent.get("/work?ms=10").await.status, 200);
    redis.stop();
    let r = agent.get("/work?ms=10").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("queue timeout"), "{}", r.body);
    assert!(r.elapsed >= Duration::from_millis(2900), "{:?}", r.elapsed);
    assert!(r
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("retry-after")));
    assert_eq!(pods[0].stats.started(), 1, "nothing reached the pod");
    assert_eq!(agent.status().await["ledger"]["reachable"], false);
    redis.restart();
    eventually(SECS, "served again", || async {
        agent.get("/work?ms=10").await.status == 200
    })
    .await;
    assert_eq!(agent.status().await["ledger"]["reachable"], true);
}

/// A request that runs longer than `lease_ttl` keeps its slot: its agent renews the lease, so
/// another agent's request waits for the pod instead of joining it when the lease would have
/// expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_request_keeps_its_lease_past_the_ttl() {
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(&redis, "queue: {timeout: 20s}\n", 1, &pods);
    let a = Agent::start(&body).await;
    let b = Agent::start(&body).await;
    let long = get_tagged(&a, "/work?ms=5000", "long");
    eventually(SECS, "long on the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let next = get_tagged(&b, "/work?ms=10", "next");
    assert_eq!(long.await.unwrap().unwrap().status, 200);
    assert_eq!(next.await.unwrap().unwrap().status, 200);
    assert_eq!(
        pods[0].stats.max_inflight(),
        1,
        "the lease expired under a live request"
    );
    assert_eq!(pods[0].stats.arrivals(), vec!["long", "next"]);
}

/// Two agents, two routes whose `endpoints` share pod 2 (limit 1), a burst on both routes
/// through both agents: every pod, the shared one included, has one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_routes_through_two_agents_share_the_pods_cap() {
    let redis = Redis::start();
    let pods = start_pods(1, 3).await.unwrap();
    let body = format!(
        "ledger: {{redis: \"{}\", lease_ttl: 2s}}\nshutdown_delay: 0s\nqueue: {{timeout: 20s}}\nroutes:\n  - {{uri: /a, limit: 1, endpoints: {}}}\n  - {{uri: /b, limit: 1, endpoints: {}}}\n",
        redis.url(),
        endpoints(&pods[..2]),
        endpoints(&pods[1..])
    );
    let agents = [Agent::start(&body).await, Agent::start(&body).await];
    let burst: Vec<_> = (0..16)
        .map(|i| {
            let path = if i % 2 == 0 { "/a?ms=200" } else { "/b?ms=200" };
            spawn_get(agents[(i / 2) % 2].addr, path)
        })
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 1, "pod {} cap", p.addr);
    }
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 16);
}

/// A reload that grows a static list makes a new pool; with the shared ledger too, it sees the
/// request the old pool runs on pod 1, and the request queued in the old pool gets pod 1 before
/// a newcomer of the new pool that arrived after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grown_static_list_keeps_the_cap_and_the_queue_order_in_redis() {
    let redis = Redis::start();
    let pods = start_pods(1, 2).await.unwrap();
    let route = |p: &[FakePod]| {
        format!(
            "ledger: {{redis: \"{}\", lease_ttl: 2s}}\nreload_interval: 50ms\nqueue: {{timeout: 20s}}\nroutes:\n  - {{uri: /work, limit: 1, endpoints: {}}}\n",
            redis.url(),
            endpoints(p)
        )
    };
    let agent = Agent::start(&route(&pods[..1])).await;
    let r1 = get_tagged(&agent, "/work?ms=1500", "r1");
    eventually(SECS, "r1 runs on pod 1", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let r2 = get_tagged(&agent, "/work?ms=200", "r2");
    eventually(SECS, "r2 queued", || async {
        global_queue(&agent).await == 1
    })
    .await;

    agent.update_config(&route(&pods));
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
    // `/status` lists the pools in force only: r4 waits in the new pool, r2 in the old one.
    eventually(SECS, "r4 queued behind r2", || async {
        agent.status().await["ledger"]["pools"][0]["queue_depth"] == 1
    })
    .await;
    assert!(!r2.is_finished(), "r2 waits for pod 1");

    for t in [r1, r2, r3, r4] {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(pods[0].stats.max_inflight(), 1, "pod 1 over its cap");
    assert_eq!(pods[1].stats.max_inflight(), 1, "pod 2 over its cap");
    assert_eq!(pods[0].stats.arrivals(), vec!["r1", "r2", "r4"]);
    assert_eq!(pods[1].stats.arrivals(), vec!["r3"]);
}

/// A client that gives up while queued in the shared ledger leaves the queue at once: the
/// ledger's queue empties, and its request never reaches a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_gone_while_queued_leaves_the_shared_queue() {
    use tokio::io::AsyncWriteExt;
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(&redis, "queue: {timeout: 20s}\n", 1, &pods);
    let a = Agent::start(&body).await;
    let b = Agent::start(&body).await;
    let running = get_tagged(&a, "/work?ms=1500", "running");
    eventually(SECS, "the pod is busy", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let mut gone = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    gone.write_all(b"GET /work?ms=10 HTTP/1.1\r\nhost: x\r\nx-req-id: gone\r\n\r\n")
        .await
        .unwrap();
    eventually(SECS, "queued in the ledger", || async {
        global_queue(&a).await == 1
    })
    .await;
    drop(gone);
    eventually(SECS, "the ledger's queue is empty again", || async {
        global_queue(&a).await == 0
    })
    .await;
    // The agent that held it counts it as waiting no more (its /status, metrics and drain).
    eventually(SECS, "agent b's own queue count is back to 0", || async {
        b.queue_depth().await == 0
    })
    .await;
    assert_eq!(running.await.unwrap().unwrap().status, 200);
    let after = get_tagged(&a, "/work?ms=10", "after");
    assert_eq!(after.await.unwrap().unwrap().status, 200);
    assert_eq!(pods[0].stats.arrivals(), vec!["running", "after"]);
    assert_eq!(pods[0].stats.max_inflight(), 1);
}

/// SIGTERM with a request queued in the shared ledger and no slot coming before the grace ends:
/// the queued request gets the usual "shutting down" 503 with Retry-After, in time to retry on
/// another replica, and never reaches a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_requests_queued_in_the_shared_ledger() {
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(
        &redis,
        "queue: {timeout: 20s}\nshutdown_grace: 2s\n",
        1,
        &pods,
    );
    let other = Agent::start(&body).await;
    let mut stopping = Agent::start(&body).await;
    let long = get_tagged(&other, "/work?ms=4000", "long");
    eventually(SECS, "the pod is busy", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued = get_tagged(&stopping, "/work?ms=10", "queued");
    eventually(SECS, "queued in the ledger", || async {
        global_queue(&other).await == 1
    })
    .await;
    stopping.terminate();
    let r = queued.await.unwrap().unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("shutting down"), "{}", r.body);
    assert!(r
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("retry-after")));
    assert!(stopping.wait_exit(SECS).await.is_some(), "the agent exits");
    assert_eq!(long.await.unwrap().unwrap().status, 200);
    assert_eq!(pods[0].stats.arrivals(), vec!["long"]);
}

/// `ledger.recovery_hold` is the wait after a new ledger epoch (here: a fresh Redis): with
/// 300 ms, the first request fits in a 1 s queue timeout; with the default 2 s it does not
/// (`redis_down_gives_a_clear_503_and_recovers` needs a 3 s queue timeout for that reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_recovery_hold_is_configurable() {
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let short = format!(
        "ledger: {{redis: \"{}\", recovery_hold: 300ms}}\nqueue: {{timeout: 1s}}\nroutes:\n  - {{uri: /work, limit: 1, endpoints: {}}}\n",
        redis.url(),
        endpoints(&pods)
    );
    let agent = Agent::start(&short).await;
    let r = agent.get("/work?ms=10").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Issue 28, item 2: an agent that exits at the end of its grace gives its slots back in the
/// shared ledger first. Agent A holds both pods with 9 s requests on a `client_abort: cancel`
/// route (pods that stop when their client leaves); agent B has two requests queued; A gets
/// SIGTERM and exits at its 2 s deadline, cutting its requests. B's queued requests must reach
/// the pods right away, not when A's leases expire (`lease_ttl: 5s`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_exiting_at_its_deadline_gives_its_slots_back_at_once() {
    let redis = Redis::start();
    let pods = start_pods(151, 2).await.unwrap();
    let body = format!(
        "ledger: {{redis: \"{}\", lease_ttl: 5s}}\nshutdown_delay: 0s\nshutdown_grace: 2s\nqueue: {{timeout: 30s}}\nroutes:\n  - {{uri: /work, limit: 1, client_abort: cancel, endpoints: {}}}\n",
        redis.url(),
        endpoints(&pods)
    );
    let mut a = Agent::start(&body).await;
    let b = Agent::start(&body).await;
    let held: Vec<_> = (0..2).map(|_| spawn_get(a.addr, "/work?ms=9000")).collect();
    eventually(SECS, "A holds both pods", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;
    let queued: Vec<_> = (0..2).map(|_| spawn_get(b.addr, "/work?ms=10")).collect();
    eventually(SECS, "B's requests queued", || async {
        global_queue(&b).await == 2
    })
    .await;
    a.terminate();
    a.wait_exit(SECS).await.expect("A exits");
    let exited = Instant::now();
    for q in queued {
        let r = tokio::time::timeout(SECS, q)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let waited = exited.elapsed();
    println!("B's queued requests served {waited:?} after A exited");
    assert!(
        waited < Duration::from_millis(1_500),
        "B's requests waited {waited:?} after A's exit (A's leases were left to expire)"
    );
    for h in held {
        let _ = h.await;
    }
    assert!(
        a.log().contains("released 2 entries in the shared ledger"),
        "{}",
        a.log()
    );
}

/// The oldest waiter's age is a figure of the whole queue: an agent with no waiter of its own
/// shows how long the one queued through another agent has waited (and its own in-process
/// figure stays empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_oldest_wait_is_seen_from_every_agent() {
    let redis = Redis::start();
    let pods = start_pods(1, 1).await.unwrap();
    let body = config(&redis, "", 1, &pods);
    let agents = [Agent::start(&body).await, Agent::start(&body).await];
    let busy = get_tagged(&agents[0], "/work?ms=1500", "busy");
    eventually(SECS, "the pod busy", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let waiting = get_tagged(&agents[0], "/work?ms=10", "waiting");
    eventually(SECS, "queued in the ledger", || async {
        global_queue(&agents[1]).await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = agents[1].status().await;
    let oldest = status["ledger"]["pools"][0]["oldest_wait_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no oldest wait in {status}"));
    assert!((350..1500).contains(&oldest), "{oldest} ms: {status}");
    assert!(status["pools"][0]["oldest_wait_ms"].is_null(), "{status}");
    assert_eq!(busy.await.unwrap().unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().unwrap().status, 200);
    let status = agents[1].status().await;
    assert!(
        status["ledger"]["pools"][0]["oldest_wait_ms"].is_null(),
        "{status}"
    );
}
