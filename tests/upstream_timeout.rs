//! A pod that stops making progress: `upstream_timeout` (HAProxy's `timeout server`). A pod
//! that makes no progress for that long gets its connection closed, its slot freed for the
//! next queued request, and is tried last for a while; the client gets `504` (gRPC:
//! `DEADLINE_EXCEEDED`). Progress is progress: a slow but steady answer is never cut.
//!
//! The pods are [`testkit::scriptpod`]s (raw sockets: they hang, trickle, or answer and keep
//! their connection open, ignoring a half-close) and gRPC pods with a method that never
//! answers. What the pods saw (arrival and answer times, their open connections) is the
//! evidence; lb-agent's own counters are not.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use common::*;
use std::time::{Duration, Instant};
use testkit::scriptpod::{start_script_pods, ScriptPod};

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
