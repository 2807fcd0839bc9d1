//! End-to-end: the real lb-agent binary in front of fake pods on 127.0.1.x (one shared port).

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_120_never_exceeds_the_cap_and_uses_every_slot() {
    let pods = start_pods(1, 4).await.unwrap();
    let agent = start_work_route("queue: {max_waiting: 1000, timeout: 60s}\n", 2, &pods).await;
    let mut tasks = Vec::new();
    for i in 0..120 {
        let addr = agent.addr;
        tasks.push(tokio::spawn(async move {
            loadgen::get(addr, &format!("/work?ms=100&i={i}"), &[]).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let maxes: Vec<usize> = pods.iter().map(|p| p.stats.max_inflight()).collect();
    let counts: Vec<usize> = pods.iter().map(|p| p.stats.started()).collect();
    println!("max in flight per pod: {maxes:?}; requests per pod: {counts:?}");
    assert!(
        maxes.iter().all(|m| *m == 2),
        "every pod used to its cap and never above: {maxes:?}"
    );
    assert_eq!(counts.iter().sum::<usize>(), 120);
    assert!(counts.iter().all(|c| *c >= 25), "spread evenly: {counts:?}");
    eventually(SECS, "slots returned", || async {
        agent.inflight().await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_request_goes_to_the_least_loaded_pod() {
    let pods = start_pods(1, 3).await.unwrap();
    let agent = start_work_route("", 4, &pods).await;
    let mut held = Vec::new();
    // Six long requests, one at a time: each must land on a pod with the fewest in flight,
    // so after 3 every pod has 1, after 6 every pod has 2.
    for n in 1..=6 {
        let addr = agent.addr;
        held.push(tokio::spawn(async move {
            loadgen::get(addr, "/work?ms=1500", &[]).await
        }));
        eventually(SECS, "request reached a pod", || async {
            pods.iter().map(|p| p.stats.inflight()).sum::<usize>() == n
        })
        .await;
        let loads: Vec<usize> = pods.iter().map(|p| p.stats.inflight()).collect();
        let (lo, hi) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        assert!(hi - lo <= 1, "after {n} requests the loads are {loads:?}");
    }
    let loads: Vec<usize> = pods.iter().map(|p| p.stats.inflight()).collect();
    assert_eq!(loads, vec![2, 2, 2]);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_requests_are_served_in_arrival_order() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("", 1, &pods).await;
    let addr = agent.addr;
    let blocker = tokio::spawn(async move {
        loadgen::get(addr, "/work?ms=300", &[("x-req-id", "blocker")]).await
    });
    eventually(SECS, "blocker at the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let mut waiters = Vec::new();
    for i in 0..10 {
        let id = i.to_string();
        waiters.push(tokio::spawn(async move {
            loadgen::get(addr, "/work?ms=20", &[("x-req-id", id.as_str())]).await
        }));
        eventually(SECS, "request queued", || async {
            agent.queue_depth().await == i + 1
        })
        .await;
    }
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap().status, 200);
    }
    let mut want = vec!["blocker".to_string()];
    want.extend((0..10).map(|i| i.to_string()));
    assert_eq!(pods[0].stats.arrivals(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_timeout_is_a_503_with_retry_after() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("queue: {timeout: 300ms}\n", 1, &pods).await;
    let addr = agent.addr;
    let blocker = spawn_get(addr, "/work?ms=2000");
    eventually(SECS, "blocker at the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let start = Instant::now();
    let r = agent.get("/work?ms=10").await;
    assert_eq!(r.status, 503);
    assert!(
        r.header("retry-after").is_some(),
        "headers: {:?}",
        r.headers
    );
    assert!(r.body.contains("queue timeout"), "{}", r.body);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        pods[0].stats.started(),
        1,
        "the timed-out request never reached the pod"
    );
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_refuses_at_once() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("queue: {max_waiting: 1, timeout: 30s}\n", 1, &pods).await;
    let addr = agent.addr;
    let blocker = spawn_get(addr, "/work?ms=1500");
    eventually(SECS, "blocker at the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let queued = spawn_get(addr, "/work?ms=10");
    eventually(SECS, "one queued", || async {
        agent.queue_depth().await == 1
    })
    .await;
    let start = Instant::now();
    let r = agent.get("/work?ms=10").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("queue full"), "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused without waiting"
    );
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    assert_eq!(queued.await.unwrap().unwrap().status, 200);
}

/// Opens a connection and sends a request, then keeps the socket until dropped.
async fn open_request(addr: std::net::SocketAddr, req: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abandoned_queued_clients_leak_nothing_and_never_reach_a_pod() {
    let pods = start_pods(1, 2).await.unwrap();
    let agent = start_work_route("queue: {max_waiting: 100, timeout: 60s}\n", 1, &pods).await;
    let addr = agent.addr;
    let blockers: Vec<_> = (0..2).map(|_| spawn_get(addr, "/work?ms=800")).collect();
    eventually(SECS, "both pods busy", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;

    // 10 GETs and 10 POSTs with small bodies wait in the queue, then their clients go away.
    let mut clients = Vec::new();
    for i in 0..20 {
        let req = if i % 2 == 0 {
            "GET /work?ms=10 HTTP/1.1\r\nhost: x\r\n\r\n".to_string()
        } else {
            "POST /work?ms=10 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello".to_string()
        };
        clients.push(open_request(addr, &req).await);
    }
    eventually(SECS, "20 queued", || async {
        agent.queue_depth().await == 20
    })
    .await;
    drop(clients);
    eventually(SECS, "queue emptied by the departures", || async {
        agent.queue_depth().await == 0
    })
    .await;

    for b in blockers {
        assert_eq!(b.await.unwrap().unwrap().status, 200);
    }
    // Give any ghost request time to show up at a pod.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started: Vec<usize> = pods.iter().map(|p| p.stats.started()).collect();
    assert_eq!(started, vec![1, 1], "no abandoned request reached a pod");

    // Every slot is usable at once: two concurrent requests run side by side on both pods.
    let both: Vec<_> = (0..2).map(|_| spawn_get(addr, "/work?ms=500")).collect();
    eventually(
        Duration::from_millis(400),
        "both slots taken at once",
        || async { pods.iter().all(|p| p.stats.inflight() == 1) },
    )
    .await;
    for b in both {
        assert_eq!(b.await.unwrap().unwrap().status, 200);
    }
    eventually(SECS, "all slots free", || async {
        agent.inflight().await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_with_a_large_body_that_leaves_the_queue_never_reaches_a_pod() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("queue: {timeout: 60s}\n", 1, &pods).await;
    let blocker = spawn_get(agent.addr, "/work?ms=1500");
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;

    // A 10 MB upload (only its start sent) and a chunked one wait, then their clients leave.
    let big = open_request(
        agent.addr,
        &format!(
            "POST /work HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n{}",
            "v".repeat(100_000)
        ),
    )
    .await;
    let chunked = open_request(
        agent.addr,
        "POST /work HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    eventually(SECS, "2 queued", || async {
        agent.queue_depth().await == 2
    })
    .await;
    drop(big);
    drop(chunked);
    eventually(SECS, "both left the queue", || async {
        agent.queue_depth().await == 0
    })
    .await;
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pods[0].stats.started(),
        1,
        "no truncated upload reached the pod"
    );
    assert_eq!(agent.get("/work").await.status, 200);
    assert!(
        agent.log().contains("outcome=client_gone"),
        "{}",
        agent.log()
    );
}

/// A pod that answers one request with 200 and hands over the request head it received.
async fn capturing_pod(ip: [u8; 4]) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind(std::net::SocketAddr::from((ip, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the request head ended");
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_see_the_client_in_x_forwarded_for() {
    let (pod, head) = capturing_pod([127, 0, 1, 40]).await;
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /work, limit: 1, endpoints: [\"{pod}\"]}}\n"
    ))
    .await;
    let r = loadgen::get(agent.addr, "/work", &[("x-forwarded-for", "10.1.2.3")])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let head = head.await.unwrap();
    assert!(
        head.contains("x-forwarded-for: 10.1.2.3, 127.0.0.1\r\n"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_connection_is_retried_on_another_pod() {
    let pods = start_pods(1, 1).await.unwrap();
    // 127.0.1.9 on the same port has nothing listening: connections are refused.
    let dead = format!("127.0.1.9:{}", pods[0].addr.port());
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /work, limit: 2, endpoints: [\"{}\", \"{dead}\"]}}\n",
        pods[0].addr
    ))
    .await;
    for _ in 0..10 {
        let r = agent.get("/work?ms=5").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(pods[0].stats.started(), 10);
    let status = agent.status().await;
    let dead_pod = status["pools"][0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == dead.as_str())
        .cloned()
        .unwrap();
    assert!(dead_pod["connect_failures"].as_u64().unwrap() >= 1);
    assert_eq!(dead_pod["inflight"], 0);
    eventually(SECS, "all slots free", || async {
        agent.inflight().await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_pods_refusing_gives_502_and_leaks_nothing() {
    let port = free_port();
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /work, limit: 1, endpoints: [\"127.0.1.7:{port}\", \"127.0.1.8:{port}\"]}}\n"
    ))
    .await;
    let r = agent.get("/work").await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(agent.inflight().await, 0);
    let status = agent.status().await;
    let failures: u64 = status["pools"][0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["connect_failures"].as_u64().unwrap())
        .sum();
    assert_eq!(failures, 2, "each pod tried once, none twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_route_is_404_and_the_proxy_keeps_serving() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /work, limit: 1, endpoints: {}}}\n  - {{uri: /api/, match: prefix, limit: 1, endpoints: {}}}\n",
        endpoints(&pods),
        endpoints(&pods)
    ))
    .await;
    let r = agent.get("/nope?x=1").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/nope"), "{}", r.body);
    let r = agent.get("/work/extra").await;
    assert_eq!(r.status, 404, "exact routes do not match longer paths");
    assert_eq!(agent.get("/work").await.status, 200);
    assert_eq!(agent.get("/api/v1/thing").await.status, 200);
    assert_eq!(pods[0].stats.started(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn method_path_query_headers_and_body_reach_the_pod() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /VideoCodecService/VideoCodec, limit: 1, endpoints: {}}}\n",
        endpoints(&pods)
    ))
    .await;
    let body = vec![b'x'; 100_000];
    let r = loadgen::request(
        agent.addr,
        "POST",
        "/VideoCodecService/VideoCodec?task=42&ms=1",
        &[("x-req-id", "abc")],
        &body,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .contains("request=POST /VideoCodecService/VideoCodec?task=42&ms=1 body_bytes=100000"),
        "{}",
        r.body
    );
    assert_eq!(pods[0].stats.arrivals(), vec!["abc".to_string()]);
    // A small body goes through the queue-time buffering path.
    let r = loadgen::request(
        agent.addr,
        "PUT",
        "/VideoCodecService/VideoCodec",
        &[],
        b"small body",
    )
    .await
    .unwrap();
    assert!(
        r.body
            .contains("request=PUT /VideoCodecService/VideoCodec body_bytes=10"),
        "{}",
        r.body
    );
    let log = agent.log();
    assert!(
        log.contains("route=/VideoCodecService/VideoCodec")
            && log.contains("queue_wait_ms=")
            && log.contains("status=200"),
        "one info line per request:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_small_post_body_is_delivered_whole() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("", 1, &pods).await;
    let addr = agent.addr;
    let blocker = spawn_get(addr, "/work?ms=400");
    eventually(SECS, "blocker at the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let body = vec![b'y'; 60_000];
    let r = loadgen::request(addr, "POST", "/work?ms=1", &[], &body)
        .await
        .unwrap();
    assert!(r.body.contains("body_bytes=60000"), "{}", r.body);
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
}
