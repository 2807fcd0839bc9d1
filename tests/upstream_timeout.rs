//! A pod that stops making progress, and the slot of a request whose client left.
//!
//! * `upstream_timeout` (HAProxy's `timeout server`): a pod that makes no progress for that long
//!   gets its connection closed, its slot freed for the next queued request, and is tried last
//!   for a while; the client gets `504` (gRPC: `DEADLINE_EXCEEDED`). Progress is progress: a
//!   slow but steady answer is never cut.
//! * `client_abort: finish`: the slot of a request whose client left comes back when the pod's
//!   answer is complete (`Content-Length`, chunked terminator, close), even if the pod keeps its
//!   connection open, and at the latest after `upstream_timeout` without progress.
//!
//! The pods are [`testkit::scriptpod`]s (raw sockets: they hang, trickle, or answer and keep
//! their connection open, ignoring a half-close) and gRPC pods with a method that never
//! answers. What the pods saw (arrival and answer times, their open connections) is the
//! evidence; lb-agent's own counters are not.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use testkit::scriptpod::{start_script_pods, ScriptPod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: Duration = Duration::from_secs(10);

/// Top-level settings `top`, then one route `/work` with `limit` over `pods` and `extra` route
/// settings.
fn config(top: &str, limit: usize, pods: &[ScriptPod], extra: &str) -> String {
    let list: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!(
        "{top}routes:\n  - {{uri: /work, limit: {limit}, endpoints: [{}]{extra}}}\n",
        list.join(", ")
    )
}

/// `GET path` through `agent`, bounded: the test fails rather than waits forever.
async fn get(agent: &Agent, path: &str) -> loadgen::Response {
    tokio::time::timeout(Duration::from_secs(20), loadgen::get(agent.addr, path, &[]))
        .await
        .unwrap_or_else(|_| panic!("no answer to {path} within 20 s"))
        .expect("request through lb-agent")
}

/// The answer of a spawned request, bounded.
async fn answer(
    r: tokio::task::JoinHandle<std::io::Result<loadgen::Response>>,
) -> loadgen::Response {
    tokio::time::timeout(Duration::from_secs(20), r)
        .await
        .expect("an answer within 20 s")
        .unwrap()
        .expect("request through lb-agent")
}

/// A client on a raw socket that sends `GET path`, reads until it has `read_until` (if any),
/// and leaves `patience` after sending: it closes the connection, or resets it if it read part
/// of the answer. Returns what it read.
async fn leave_after(
    addr: SocketAddr,
    path: String,
    read_until: Option<&'static str>,
    patience: Duration,
) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let sent = Instant::now();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    if let Some(want) = read_until {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = tokio::time::timeout(SECS, s.read(&mut buf))
                .await
                .expect("the head in time")
                .unwrap();
            assert!(n > 0, "closed before {want:?}");
            got.extend_from_slice(&buf[..n]);
        }
    }
    tokio::time::sleep(patience.saturating_sub(sent.elapsed())).await;
    if read_until.is_some() {
        // Gone with part of the answer unread: a reset, as the kernel sends then.
        s.set_zero_linger().unwrap();
    }
    drop(s);
    String::from_utf8_lossy(&got).into_owned()
}

fn between(what: &str, d: Duration, lo: u64, hi: u64) {
    assert!(
        d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi),
        "{what}: {d:?}, expected {lo}..{hi} ms"
    );
}

async fn metrics(agent: &Agent) -> String {
    loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body
}

/// The case: a pod that accepts and never answers, `limit: 1`, a 3 s queue. With
/// `upstream_timeout: 2s` the first client gets `504` after 2 s, and the queued request gets the
/// slot then, not `503 queue timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_pod_answers_504_after_upstream_timeout_and_the_next_request_is_served() {
    let pods = start_script_pods(161, 1).await.unwrap();
    let pod = &pods[0].stats;
    let agent = Agent::start(&config(
        "queue: {timeout: 3s}\nupstream_timeout: 2s\n",
        1,
        &pods,
        "",
    ))
    .await;
    let hung = spawn_get(agent.addr, "/work?hang");
    eventually(SECS, "the hung request at the pod", || async {
        pod.inflight() == 1
    })
    .await;
    let next = spawn_get(agent.addr, "/work?id=next");

    let hung = answer(hung).await;
    println!(
        "hung: {} after {:?}: {}",
        hung.status, hung.elapsed, hung.body
    );
    assert_eq!(hung.status, 504, "{}", hung.body);
    assert!(hung.body.contains("no progress"), "{}", hung.body);
    between("504 after", hung.elapsed, 1900, 3500);

    let next = answer(next).await;
    assert_eq!(next.status, 200, "{}", next.body);
    assert!(
        next.body.contains("request=GET /work?id=next"),
        "{}",
        next.body
    );
    // The pod's own clock: the next request came when the hung one was given up.
    let gap = pod.arrived("id=next").unwrap() - pod.arrived("hang").unwrap();
    println!("next request reached the pod {gap:?} after the hung one");
    between("next request after the hung one", gap, 1900, 3000);

    // lb-agent closed the hung connection (and, a second later, the idle kept-alive one).
    eventually(
        SECS,
        "no connection from lb-agent left at the pod",
        || async { pod.connections() == 0 },
    )
    .await;
    assert_eq!(
        pod.requests().len(),
        2,
        "nothing sent twice: {:?}",
        pod.requests()
    );
    let m = metrics(&agent).await;
    assert!(
        m.contains("lb_requests_total{outcome=\"pod_timeout\",route=\"/work\"} 1"),
        "{m}"
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/work?hang") && l.contains("status=504 outcome=pod_timeout")),
        "{log}"
    );
}

/// A client that gives up on a hung pod at 1 s, with `client_abort: finish`: the slot is kept
/// while the pod might still work, and freed when the pod has made no progress for
/// `upstream_timeout` (2 s after the request was sent), not at some later point and not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_left_a_hung_pod_frees_its_slot_at_upstream_timeout() {
    let pods = start_script_pods(171, 1).await.unwrap();
    let pod = &pods[0].stats;
    let agent = Agent::start(&config(
        "queue: {timeout: 3s}\nupstream_timeout: 2s\n",
        1,
        &pods,
        "",
    ))
    .await;
    let left = tokio::spawn(leave_after(
        agent.addr,
        "/work?hang".to_string(),
        None,
        Duration::from_secs(1),
    ));
    eventually(SECS, "the hung request at the pod", || async {
        pod.inflight() == 1
    })
    .await;
    left.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = get(&agent, "/work?id=next").await;
    assert_eq!(next.status, 200, "{}", next.body);
    let gap = pod.arrived("id=next").unwrap() - pod.arrived("hang").unwrap();
    println!("slot of the abandoned hung request came back {gap:?} after it was sent");
    between("slot back after", gap, 1900, 2700);
    assert_eq!(agent.inflight().await, 0);
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/work?hang") && l.contains("outcome=client_gone")),
        "{log}"
    );
}

/// Progress is progress: a pod streaming a byte a second for 6 s is not cut by a 2 s
/// `upstream_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_but_steady_answer_is_not_cut_by_upstream_timeout() {
    let pods = start_script_pods(181, 1).await.unwrap();
    let agent = Agent::start(&config("upstream_timeout: 2s\n", 1, &pods, "")).await;
    let r = get(&agent, "/work?trickle=6&every_ms=1000").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxxxxx"));
    assert!(r.elapsed >= Duration::from_millis(5900), "{:?}", r.elapsed);
    let r = get(&agent, "/work?drip=4&every_ms=1000").await;
    assert_eq!((r.status, r.body.as_str()), (200, "xxxx"));
    assert!(!agent.log().contains("pod_timeout"), "{}", agent.log());
}

/// Issue #22 (1): the client leaves at 0.3 s, the pod answers completely at 1 s and keeps its
/// connection open (ignoring the half-close). The slot comes back with the pod's last answer
/// byte, so the next request is served, not refused with `503 queue timeout`. The default
/// `upstream_timeout` (5 min) plays no part here.
async fn an_abandoned_request_frees_its_slot_when_the_answer_is_complete(framing: &str) {
    let pods = start_script_pods(if framing.is_empty() { 191 } else { 195 }, 1)
        .await
        .unwrap();
    let pod = &pods[0].stats;
    let agent = Agent::start(&config("queue: {timeout: 3s}\n", 1, &pods, "")).await;
    let abandoned = format!("/work?ms=1000{framing}");
    let left = tokio::spawn(leave_after(
        agent.addr,
        abandoned.clone(),
        None,
        Duration::from_millis(300),
    ));
    eventually(SECS, "the request at the pod", || async {
        pod.inflight() == 1
    })
    .await;
    left.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = get(&agent, "/work?id=next").await;
    assert_eq!(next.status, 200, "{}", next.body);
    let answered = pod.answered(&abandoned).expect("the pod answered");
    let freed = pod.arrived("id=next").unwrap() - answered;
    println!("{abandoned}: the next request reached the pod {freed:?} after the abandoned answer's last byte");
    assert!(freed < Duration::from_millis(500), "{freed:?}");
    assert_eq!(pod.max_inflight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_request_frees_its_slot_when_its_content_length_is_read() {
    an_abandoned_request_frees_its_slot_when_the_answer_is_complete("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_request_frees_its_slot_at_the_chunked_terminator() {
    an_abandoned_request_frees_its_slot_when_the_answer_is_complete("&chunked").await;
}

/// The client leaves after lb-agent already passed it the head of a `Content-Length` answer
/// the pod is still sending: the slot comes back when the rest of the body has arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_left_mid_body_frees_the_slot_at_the_end_of_the_body() {
    let pods = start_script_pods(201, 1).await.unwrap();
    let pod = &pods[0].stats;
    let agent = Agent::start(&config("queue: {timeout: 5s}\n", 1, &pods, "")).await;
    let path = "/work?drip=4&every_ms=300";
    let head = leave_after(
        agent.addr,
        path.to_string(),
        Some("\r\n\r\n"),
        Duration::from_millis(450),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let next = get(&agent, "/work?id=next").await;
    assert_eq!(next.status, 200, "{}", next.body);
    let freed = pod.arrived("id=next").unwrap() - pod.answered(path).expect("answered");
    println!("mid-body: the next request reached the pod {freed:?} after the last body byte");
    assert!(freed < Duration::from_millis(500), "{freed:?}");
}

/// The client leaves in the middle of a chunked answer whose framing state lb-agent cannot
/// recover (Pingora has consumed an unknown part of it): the slot still comes back, at the
/// latest `upstream_timeout` after the pod's last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_left_mid_chunked_body_frees_the_slot_within_upstream_timeout() {
    let pods = start_script_pods(205, 1).await.unwrap();
    let pod = &pods[0].stats;
    let agent = Agent::start(&config(
        "queue: {timeout: 8s}\nupstream_timeout: 2s\n",
        1,
        &pods,
        "",
    ))
    .await;
    let path = "/work?trickle=3&every_ms=300";
    let head = leave_after(
        agent.addr,
        path.to_string(),
        Some("\r\n\r\n"),
        Duration::from_millis(450),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let next = get(&agent, "/work?id=next").await;
    assert_eq!(next.status, 200, "{}", next.body);
    let freed = pod.arrived("id=next").unwrap() - pod.answered(path).expect("answered");
    println!("mid-chunked-body: the next request reached the pod {freed:?} after the last byte");
    assert!(freed < Duration::from_millis(2600), "{freed:?}");
}

/// After a timeout the pod goes last in the choice for a while, as after a refused connection:
/// the next requests go to the other pod, where they would otherwise alternate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_that_timed_out_is_tried_last() {
    let pods = start_script_pods(211, 2).await.unwrap();
    let agent = Agent::start(&config("upstream_timeout: 1s\n", 1, &pods, "")).await;
    let hung = get(&agent, "/work?hang").await;
    assert_eq!(hung.status, 504, "{}", hung.body);
    let (stuck, other) = if pods[0].stats.inflight() == 1 {
        (&pods[0], &pods[1])
    } else {
        (&pods[1], &pods[0])
    };
    for i in 0..4 {
        let r = get(&agent, &format!("/work?i={i}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("x-pod"),
            Some(other.addr.ip().to_string().as_str())
        );
    }
    assert_eq!(
        stuck.stats.requests().len(),
        1,
        "{:?}",
        stuck.stats.requests()
    );
}

/// `upstream_timeout` applies live: a reload that lowers it bounds the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_timeout_is_applied_by_a_reload() {
    let pods = start_script_pods(221, 1).await.unwrap();
    let body = |t: &str| {
        config(
            "reload_interval: 0s\n",
            1,
            &pods,
            &format!(", upstream_timeout: {t}"),
        )
    };
    let agent = Agent::start(&body("1h")).await;
    agent.update_config(&body("1s"));
    agent.hangup();
    eventually(SECS, "the reload", || async {
        agent.log().contains("config reloaded from")
    })
    .await;
    let hung = get(&agent, "/work?hang").await;
    assert_eq!(hung.status, 504, "{}", hung.body);
    between("504 after", hung.elapsed, 900, 2500);
}

/// gRPC over h2c: a call to a pod that never answers ends with `DEADLINE_EXCEEDED` after
/// `upstream_timeout`, as tonic, grpcio and a hand-made client read it (a well-formed
/// Trailers-Only answer), and the pod sees the call cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_call_to_a_hung_pod_ends_deadline_exceeded() {
    tokio::task::spawn_blocking(grpc::grpcio_python)
        .await
        .unwrap();
    let pods = grpc::start_grpc_pods(231, 1).await;
    let list: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    let agent = Agent::start(&format!(
        "upstream_timeout: 2s\nroutes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: 1, protocol: h2c, endpoints: [{}]}}\n",
        list.join(", ")
    ))
    .await;

    let client = grpc::connect(agent.addr).await;
    let sent = Instant::now();
    let status = tokio::time::timeout(
        SECS,
        grpc::unary(client.channel.clone(), grpc::HANG, "", "tonic"),
    )
    .await
    .expect("tonic call ended")
    .expect_err("a hung call cannot succeed");
    println!("tonic: {status:?} after {:?}", sent.elapsed());
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("lb-agent"), "{status:?}");
    between("tonic call ended after", sent.elapsed(), 1900, 3500);
    eventually(SECS, "the pod saw the call cancelled", || async {
        pods[0].stats.inflight() == 0
    })
    .await;

    let sent = Instant::now();
    let (code, details) = grpc::grpcio_call(agent.addr, grpc::HANG, "", "grpcio", None).await;
    println!("grpcio: {code} {details} after {:?}", sent.elapsed());
    assert_eq!(code, "DEADLINE_EXCEEDED", "{details}");
    assert!(details.contains("lb-agent"), "{details}");

    let reply = grpc::raw_call(agent.addr, grpc::HANG, "", "raw", "20S").await;
    assert_eq!(reply.http_status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status.as_deref(), Some("4"), "{reply:?}");
    assert!(reply.trailers_only, "{reply:?}");

    // The slot came back each time: an ordinary call runs at once.
    let ok = grpc::unary(client.channel.clone(), grpc::RUN, "1", "after").await;
    assert_eq!(ok.unwrap(), "pod=127.0.1.231");
    eventually(SECS, "no call left in flight at the pod", || async {
        pods[0].stats.inflight() == 0
    })
    .await;
    let m = metrics(&agent).await;
    assert!(
        m.contains("lb_requests_total{outcome=\"pod_timeout\",route=\"/lbtest.Work/\"} 3"),
        "{m}"
    );
}

/// gRPC over h2c with `client_abort: finish`: a call cancelled by its client while its pod is
/// hung keeps its slot (the pod's stream is read on), but only until the pod has made no
/// progress for `upstream_timeout`; then the next call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_grpc_call_on_a_hung_pod_frees_its_slot_at_upstream_timeout() {
    let pods = grpc::start_grpc_pods(241, 1).await;
    let agent = Agent::start(&format!(
        "upstream_timeout: 2s\nqueue: {{timeout: 5s}}\nroutes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: 1, protocol: h2c, endpoints: [\"{}\"]}}\n",
        pods[0].addr
    ))
    .await;
    let client = grpc::connect(agent.addr).await;
    let sent = Instant::now();
    // Dropping the call at 0.5 s cancels it (RST_STREAM), as a client deadline does.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(500),
        grpc::unary(client.channel.clone(), grpc::HANG, "", "hung"),
    )
    .await;
    assert!(cancelled.is_err(), "a hung call cannot end: {cancelled:?}");
    let ok = grpc::unary(client.channel.clone(), grpc::RUN, "1", "next").await;
    let served = sent.elapsed();
    println!("next call served {served:?} after the hung one was sent");
    assert_eq!(ok.unwrap(), "pod=127.0.1.241");
    between("next call served after", served, 1900, 3000);
    eventually(SECS, "the hung call cancelled at the pod", || async {
        pods[0].stats.inflight() == 0
    })
    .await;
    assert_eq!(pods[0].stats.max_inflight(), 1, "the cap held at the pod");
}
