//! HTTP/2 and gRPC through lb-agent: real tonic pods speaking h2c behind it, a real tonic
//! client on one HTTP/2 connection in front (and a plain h2c client for HTTP/1.1 pods). Every
//! call is placed on its own, under the same caps and queue as HTTP/1.1 requests.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use common::*;
use grpc::*;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::Code;

const SECS: Duration = Duration::from_secs(10);

fn grpc_route(pods: &[GrpcPod], limit: usize, queue: &str) -> String {
    let list: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!(
        "routes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: {limit}, protocol: h2c, endpoints: [{}], queue: {queue}}}\n",
        list.join(", ")
    )
}

fn spread(pods: &[GrpcPod]) -> (Vec<usize>, Vec<usize>) {
    (
        pods.iter().map(|p| p.stats.started()).collect(),
        pods.iter().map(|p| p.stats.max_inflight()).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_on_one_connection_are_placed_one_by_one_under_the_cap() {
    let pods = start_grpc_pods(51, 4).await;
    let agent = Agent::start(&grpc_route(&pods, 2, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;

    // 8 concurrent calls, 4 pods, limit 2: 2 calls on each pod.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let ch = client.channel.clone();
            tokio::spawn(async move { unary(ch, RUN, "400", &format!("a{i}")).await })
        })
        .collect();
    for c in calls {
        let body = c.await.unwrap().expect("call ok");
        assert!(body.starts_with("pod=127.0.1.5"), "{body}");
    }
    let (started, max) = spread(&pods);
    println!("8 calls on one connection: calls per pod {started:?}, max in flight {max:?}");
    assert_eq!(started, vec![2, 2, 2, 2]);
    assert_eq!(max, vec![2, 2, 2, 2]);

    // 40 more at once: 8 run, 32 queue; the cap holds throughout and the work spreads evenly.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let ch = client.channel.clone();
            tokio::spawn(async move { unary(ch, RUN, "150", &format!("b{i}")).await })
        })
        .collect();
    eventually(SECS, "calls queued in lb-agent", || async {
        agent.queue_depth().await > 0
    })
    .await;
    for c in calls {
        c.await.unwrap().expect("call ok");
    }
    let (started, max) = spread(&pods);
    println!("48 calls on one connection: calls per pod {started:?}, max in flight {max:?}");
    // Each slot takes the next queued call when it frees, so the split follows the pods' pace:
    // 12 each when all run alike (what this machine shows); timing jitter may move a call.
    assert_eq!(started.iter().sum::<usize>(), 48);
    assert!(
        started.iter().all(|&n| n >= 8),
        "every pod takes its share: {started:?}"
    );
    assert_eq!(max, vec![2, 2, 2, 2]);
    assert_eq!(
        client.connections.load(Ordering::SeqCst),
        1,
        "one client connection"
    );
    assert_eq!(agent.inflight().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_than_a_hundred_calls_on_one_connection_wait_in_our_queue() {
    let pods = start_grpc_pods(55, 2).await;
    let agent = Agent::start(&grpc_route(&pods, 2, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;
    let calls: Vec<_> = (0..160)
        .map(|i| {
            let ch = client.channel.clone();
            tokio::spawn(async move { unary(ch, RUN, "100", &format!("c{i}")).await })
        })
        .collect();
    // 4 run, the rest are open streams waiting in lb-agent's queue (not in the client).
    let mut deepest = 0;
    for _ in 0..300 {
        deepest = deepest.max(agent.queue_depth().await);
        if deepest > 120 || calls.iter().all(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(deepest > 120, "queue depth reached only {deepest}");
    for c in calls {
        c.await.unwrap().expect("call ok");
    }
    assert!(pods.iter().all(|p| p.stats.max_inflight() == 2));
    assert_eq!(client.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_calls_with_large_messages_do_not_block_the_connection() {
    let pods = start_grpc_pods(57, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;
    // 12 calls of 100 KB each: more than a stream's 64 KiB window each, and far more than
    // HTTP/2's default 64 KiB connection window while they wait unread in the queue.
    let padding = "x".repeat(100_000);
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let ch = client.channel.clone();
            let body = format!("50 {padding}");
            tokio::spawn(async move { unary(ch, RUN, &body, &format!("big{i}")).await })
        })
        .collect();
    for c in calls {
        tokio::time::timeout(SECS, c)
            .await
            .expect("call finished")
            .unwrap()
            .expect("call ok");
    }
    assert_eq!(pods[0].stats.started(), 12);
    assert_eq!(pods[0].stats.max_inflight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_are_grpc_statuses() {
    let pods = start_grpc_pods(61, 1).await;
    // A second service whose only pod is not listening.
    let dead = std::net::SocketAddr::from(([127, 0, 1, 69], free_port()));
    let agent = Agent::start(&format!(
        "{}  - {{uri: /lbtest.Down/, match: prefix, limit: 1, protocol: h2c, endpoints: [\"{dead}\"]}}\n",
        grpc_route(&pods, 1, "{max_waiting: 1, timeout: 300ms}")
    ))
    .await;
    let client = connect(agent.addr).await;

    let ch = client.channel.clone();
    let long = tokio::spawn(async move { unary(ch, RUN, "1500", "long").await });
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;

    // Waits 300 ms in the queue, then UNAVAILABLE.
    let ch = client.channel.clone();
    let waiting = tokio::spawn(async move { unary(ch, RUN, "10", "timeout").await });
    eventually(SECS, "one queued", || async {
        agent.queue_depth().await == 1
    })
    .await;
    // The queue holds 1: the next call is refused at once.
    let full = unary(client.channel.clone(), RUN, "10", "full")
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::Unavailable, "{full:?}");
    assert!(full.message().contains("queue full"), "{full:?}");

    let timeout = waiting.await.unwrap().unwrap_err();
    assert_eq!(timeout.code(), Code::Unavailable, "{timeout:?}");
    assert!(timeout.message().contains("queue timeout"), "{timeout:?}");

    // A method no route covers.
    let none = unary(client.channel.clone(), "/other.Service/Run", "1", "none")
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unimplemented, "{none:?}");

    assert_eq!(long.await.unwrap().unwrap(), "pod=127.0.1.61");
    assert_eq!(pods[0].stats.arrivals(), vec!["long".to_string()]);

    // No pod reachable: UNAVAILABLE too.
    let down = unary(client.channel.clone(), "/lbtest.Down/Run", "1", "down")
        .await
        .unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert_eq!(agent.inflight().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_cancelled_while_queued_never_reaches_a_pod() {
    let pods = start_grpc_pods(71, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;

    let ch = client.channel.clone();
    let long = tokio::spawn(async move { unary(ch, RUN, "800", "long").await });
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;
    let ch = client.channel.clone();
    let cancelled = tokio::spawn(async move { unary(ch, RUN, "10", "cancelled").await });
    eventually(SECS, "queued", || async { agent.queue_depth().await == 1 }).await;

    // Dropping the call resets its stream; lb-agent takes it out of the queue.
    cancelled.abort();
    eventually(SECS, "cancelled call left the queue", || async {
        agent.queue_depth().await == 0
    })
    .await;
    assert_eq!(long.await.unwrap().unwrap(), "pod=127.0.1.71");
    // The freed slot went to nobody: the next call runs at once, and the pod never saw the
    // cancelled one.
    unary(client.channel.clone(), RUN, "1", "after")
        .await
        .unwrap();
    assert_eq!(
        pods[0].stats.arrivals(),
        vec!["long".to_string(), "after".to_string()]
    );
    assert_eq!(agent.inflight().await, 0);
    let metrics = loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains("lb_requests_total{outcome=\"client_gone\",route=\"/lbtest.Work/\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_statuses_pass_through_and_a_stream_holds_its_slot() {
    let pods = start_grpc_pods(81, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;

    // The pod's own status (in its trailers) reaches the client unchanged.
    let err = unary(client.channel.clone(), FAIL, "", "fail")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such model");

    // A stream of 5 messages, 150 ms apart, holds the only slot until it ends: a unary call
    // made meanwhile waits in the queue.
    let ch = client.channel.clone();
    let streaming = tokio::spawn(async move { stream(ch, "5x150", "stream").await });
    eventually(SECS, "stream running", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    let ch = client.channel.clone();
    let after = tokio::spawn(async move { unary(ch, RUN, "1", "after-stream").await });
    eventually(SECS, "unary call queued behind the stream", || async {
        agent.queue_depth().await == 1
    })
    .await;
    let messages = streaming.await.unwrap().unwrap();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert_eq!(messages[4], "pod=127.0.1.81 message=4");
    after.await.unwrap().unwrap();
    assert_eq!(pods[0].stats.max_inflight(), 1);
    assert_eq!(
        pods[0].stats.arrivals(),
        vec![
            "fail".to_string(),
            "stream".to_string(),
            "after-stream".to_string()
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_requests_on_one_connection_spread_over_http1_pods() {
    use http_body_util::{BodyExt, Empty};
    let pods = start_pods(91, 4).await.unwrap();
    let agent = start_work_route("", 2, &pods).await;

    // Prior-knowledge HTTP/2 on the proxy port (which also serves HTTP/1.1), one connection.
    let sender = h2c_client(agent.addr).await;
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let mut sender = sender.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://lb-agent/work?ms=300&i={i}"))
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.expect("h2 response");
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            })
        })
        .collect();
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("pod=127.0.1.9"), "{body}");
    }
    let started: Vec<usize> = pods.iter().map(|p| p.stats.started()).collect();
    let max: Vec<usize> = pods.iter().map(|p| p.stats.max_inflight()).collect();
    assert_eq!(started, vec![2, 2, 2, 2]);
    assert_eq!(max, vec![2, 2, 2, 2]);
    // HTTP/1.1 still works on the same port.
    assert_eq!(agent.get("/work").await.status, 200);
}

/// The same refusals, read by a second, strict gRPC implementation: grpcio (gRPC C-core).
/// A Trailers-Only response must be one HEADERS frame with END_STREAM; a header block without
/// it, followed by a reset or an empty DATA frame, reaches C-core as CANCELLED or UNKNOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcio_reads_refusals_as_unavailable_and_unimplemented() {
    // Make (or find) the virtualenv first, so the client's start-up below is quick.
    tokio::task::spawn_blocking(grpcio_python).await.unwrap();
    let pods = start_grpc_pods(101, 1).await;
    let dead = std::net::SocketAddr::from(([127, 0, 1, 109], free_port()));
    let agent = Agent::start(&format!(
        "{}  - {{uri: /lbtest.Down/, match: prefix, limit: 1, protocol: h2c, endpoints: [\"{dead}\"]}}\n",
        grpc_route(&pods, 1, "{max_waiting: 1, timeout: 1s}")
    ))
    .await;
    let client = connect(agent.addr).await;
    let ch = client.channel.clone();
    let long = tokio::spawn(async move { unary(ch, RUN, "3000", "long").await });
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;

    // Waits 1 s in the queue, then UNAVAILABLE.
    let addr = agent.addr;
    let waiting = tokio::spawn(async move { grpcio_call(addr, RUN, "10", "timeout", None).await });
    eventually(SECS, "one queued", || async {
        agent.queue_depth().await == 1
    })
    .await;
    // The queue holds 1: the next call is refused at once.
    let (code, message) = grpcio_call(addr, RUN, "10", "full", None).await;
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("queue full"), "{message}");
    // On the wire: one HEADERS frame with END_STREAM.
    let reply = raw_call(addr, RUN, "10", "full-raw", "10S").await;
    assert_eq!(reply.grpc_status.as_deref(), Some("14"), "{reply:?}");
    assert!(reply.trailers_only, "{reply:?}");
    let (code, message) = waiting.await.unwrap();
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("queue timeout"), "{message}");

    // A method no route covers.
    let (code, message) = grpcio_call(addr, "/other.Service/Run", "1", "none", None).await;
    assert_eq!(code, "UNIMPLEMENTED", "{message}");
    assert!(message.contains("no route"), "{message}");
    let reply = raw_call(addr, "/other.Service/Run", "1", "none-raw", "10S").await;
    assert_eq!(reply.grpc_status.as_deref(), Some("12"), "{reply:?}");
    assert!(reply.trailers_only, "{reply:?}");

    // Refusals are the queue at work, not faults: none is logged at ERROR.
    let log = agent.log();
    assert!(
        log.contains("outcome=queue_full") && log.contains("outcome=queue_timeout"),
        "{log}"
    );
    assert!(
        !log.contains(" ERROR "),
        "refusal logged as an error:\n{log}"
    );

    assert_eq!(long.await.unwrap().unwrap(), "pod=127.0.1.101");
    assert_eq!(pods[0].stats.arrivals(), vec!["long".to_string()]);

    // No pod reachable: UNAVAILABLE too.
    let (code, message) = grpcio_call(addr, "/lbtest.Down/Run", "1", "down", None).await;
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert_eq!(agent.inflight().await, 0);
}

/// A queued call whose `grpc-timeout` passes never starts on a pod, whether or not its client
/// cancels it at the deadline: lb-agent answers DEADLINE_EXCEEDED itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_deadline_passes_while_queued_never_reaches_a_pod() {
    tokio::task::spawn_blocking(grpcio_python).await.unwrap();
    let pods = start_grpc_pods(111, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;
    let ch = client.channel.clone();
    let long = tokio::spawn(async move { unary(ch, RUN, "2500", "long").await });
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;

    // A hand-made client sends `grpc-timeout` and does not cancel when it passes (tonic and
    // grpcio both would): only lb-agent can keep the call from reaching the pod once the slot
    // frees (at 2.5 s).
    let sent = std::time::Instant::now();
    let reply = raw_call(agent.addr, RUN, "10", "deadline-raw", "300m").await;
    let answered = sent.elapsed();
    println!("grpc-timeout 300m, queued: {reply:?} after {answered:?}");
    assert_eq!(reply.grpc_status.as_deref(), Some("4"), "{reply:?}");
    assert!(
        reply
            .grpc_message
            .as_deref()
            .is_some_and(|m| m.contains("deadline exceeded")),
        "{reply:?}"
    );
    assert!(reply.trailers_only, "{reply:?}");
    assert!(
        answered >= Duration::from_millis(290) && answered < Duration::from_millis(1500),
        "answered after {answered:?}"
    );

    // grpcio cancels at its deadline itself; either way the call ends DEADLINE_EXCEEDED.
    let (code, message) = grpcio_call(
        agent.addr,
        RUN,
        "10",
        "deadline-grpcio",
        Some(Duration::from_millis(300)),
    )
    .await;
    assert_eq!(code, "DEADLINE_EXCEEDED", "{message}");

    assert_eq!(long.await.unwrap().unwrap(), "pod=127.0.1.111");
    // The freed slot went to nobody: the next call runs at once, and the pod never saw the
    // calls whose deadline passed.
    let (code, message) = grpcio_call(agent.addr, RUN, "1", "after", None).await;
    assert_eq!((code.as_str(), message.as_str()), ("OK", "pod=127.0.1.111"));
    assert_eq!(
        pods[0].stats.arrivals(),
        vec!["long".to_string(), "after".to_string()]
    );
    assert_eq!(agent.inflight().await, 0);
    let metrics = loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body;
    assert!(
        metrics
            .contains("lb_requests_total{outcome=\"deadline_exceeded\",route=\"/lbtest.Work/\"}"),
        "{metrics}"
    );
}

/// With `client_abort: cancel`, the pod is told the time a call has left after its queue
/// wait, not the `grpc-timeout` it arrived with: otherwise it works on after the client has
/// given up. (With `finish`, the default, the pod is told no deadline at all: its work runs to
/// its end and holds the slot until then; see the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pod_gets_the_time_left_after_the_queue_wait() {
    let pods = start_grpc_pods(121, 1).await;
    let config = grpc_route(&pods, 1, "{timeout: 30s}")
        .replace("protocol: h2c,", "protocol: h2c, client_abort: cancel,");
    let agent = Agent::start(&config).await;
    let client = connect(agent.addr).await;
    let ch = client.channel.clone();
    let long = tokio::spawn(async move { unary(ch, RUN, "1000", "long").await });
    eventually(SECS, "pod busy", || async { pods[0].stats.inflight() == 1 }).await;
    // Queued for about 1 s, with 5 s to live.
    let reply = raw_call(agent.addr, RUN, "1", "queued", "5S").await;
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    long.await.unwrap().unwrap();
    // Not queued.
    let reply = raw_call(agent.addr, RUN, "1", "direct", "5S").await;
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");

    let seen = pods[0].deadlines.lock().unwrap().clone();
    let left = |id: &str| {
        let (_, v) = seen.iter().find(|(i, _)| i == id).expect("call seen");
        lb_agent::respond::parse_grpc_timeout(v).unwrap_or_else(|| panic!("bad grpc-timeout {v:?}"))
    };
    println!("grpc-timeout at the pod: {seen:?}");
    let queued = left("queued");
    assert!(
        queued > Duration::from_millis(3000) && queued <= Duration::from_millis(4200),
        "queued ~1 s of 5 s, the pod was given {queued:?}"
    );
    let direct = left("direct");
    assert!(
        direct > Duration::from_millis(4500) && direct <= Duration::from_secs(5),
        "the pod was given {direct:?}"
    );
}

/// With `client_abort: finish` (the default) on an h2c route, the pod is given no
/// `grpc-timeout`: a gRPC server ends a call's stream when its deadline passes, whatever its
/// handler still does, and the slot would be freed under running work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finish_route_gives_the_pod_no_deadline() {
    let pods = start_grpc_pods(123, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let reply = raw_call(agent.addr, RUN, "1", "f", "5S").await;
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "{reply:?}");
    assert_eq!(pods[0].stats.started(), 1);
    assert_eq!(*pods[0].deadlines.lock().unwrap(), vec![]);
}

/// Issue 24, item 1: `client_abort: finish` (the default) on an h2c route. Call A's work on
/// the pod takes 2 s and cannot be interrupted; its client gives up at 0.5 s (tonic drops the
/// call: RST_STREAM; grpcio's deadline passes: RST_STREAM after sending `grpc-timeout`). Call
/// B waits. The pod must never run both: A's slot is held until the pod has ended A's stream,
/// and only then does B start. The pod's own count of running calls is the judge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_call_holds_its_slot_until_the_pod_has_finished() {
    for client_kind in ["tonic", "grpcio"] {
        let pods = start_grpc_pods(131, 1).await;
        let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
        let client = connect(agent.addr).await;
        let a = {
            let (ch, addr) = (client.channel.clone(), agent.addr);
            tokio::spawn(async move {
                match client_kind {
                    "tonic" => {
                        let call = unary(ch, BUSY, "2000", "a");
                        match tokio::time::timeout(Duration::from_millis(500), call).await {
                            Ok(r) => format!("{r:?}"),
                            Err(_) => "cancelled".to_string(),
                        }
                    }
                    _ => {
                        let t = Some(Duration::from_millis(500));
                        grpcio_call(addr, BUSY, "2000", "a", t).await.0
                    }
                }
            })
        };
        eventually(SECS, "A on the pod", || async {
            pods[0].stats.inflight() == 1
        })
        .await;
        let ch = client.channel.clone();
        let b = tokio::spawn(async move { unary(ch, BUSY, "10", "b").await });
        let a = a.await.unwrap();
        assert!(
            a == "cancelled" || a == "DEADLINE_EXCEEDED",
            "{client_kind}: A must have been given up by its client: {a}"
        );
        // A's client is gone; the pod still works on A.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pods[0].stats.inflight(), 1, "{client_kind}: A runs on");
        assert_eq!(agent.inflight().await, 1, "{client_kind}: A's slot is held");
        assert_eq!(agent.queue_depth().await, 1, "{client_kind}: B waits");
        let b = tokio::time::timeout(SECS, b).await.unwrap().unwrap();
        assert!(b.is_ok(), "{client_kind}: B is served: {b:?}");
        assert_eq!(
            pods[0].stats.max_inflight(),
            1,
            "{client_kind}: the pod ran A and B at once"
        );
        eventually(SECS, "slots back", || async { agent.inflight().await == 0 }).await;
    }
}

/// Issue 24, item 3: a gRPC call from an HTTP/1.1 client to an h2c route. Pingora drops `te`
/// on the way to HTTP/2, but gRPC servers such as grpcio reset calls without `te: trailers`.
/// The pod must receive it, from a raw-socket HTTP/1.1 client and from tonic (HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn te_trailers_reaches_an_h2c_pod() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods = start_grpc_pods(134, 1).await;
    let agent = Agent::start(&grpc_route(&pods, 1, "{timeout: 30s}")).await;
    let mut tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let msg = [0u8, 0, 0, 0, 1, b'1'];
    let head = format!(
        "POST {RUN} HTTP/1.1\r\nHost: lb-agent\r\ncontent-type: application/grpc\r\nte: trailers\r\nx-req-id: h1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        msg.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&msg).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SECS, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let client = connect(agent.addr).await;
    unary(client.channel.clone(), RUN, "1", "h2").await.unwrap();
    let te = pods[0].te.lock().unwrap().clone();
    assert_eq!(
        te,
        vec![
            ("h1".to_string(), "trailers".to_string()),
            ("h2".to_string(), "trailers".to_string())
        ]
    );
}

/// Issue 24, item 2: a pod that allows one stream per connection and refuses any other at
/// once, as gRPC's C-core does (`max_concurrent_streams`), behind `limit: 4`. lb-agent must not
/// open more streams on a connection than the pod accepts (the refused ones failed): every call
/// succeeds, and the pod still runs 4 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_allowing_fewer_streams_than_limit_gets_every_call() {
    let pod = start_strict_pod(136, 1, false, Duration::from_millis(200)).await;
    let config = format!(
        "routes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: 4, protocol: h2c, endpoints: [\"{}\"], queue: {{timeout: 30s}}}}\n",
        pod.addr
    );
    let agent = Agent::start(&config).await;
    let client = connect(agent.addr).await;
    for burst in 0..3 {
        // Apart by more than upstream_idle_timeout (1 s): each burst opens new connections,
        // whose first streams leave before the pod's SETTINGS arrive.
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let calls: Vec<_> = (0..12)
            .map(|i| {
                let ch = client.channel.clone();
                tokio::spawn(async move { unary(ch, RUN, "1", &format!("b{burst}c{i}")).await })
            })
            .collect();
        for c in calls {
            let r = c.await.unwrap();
            assert!(r.is_ok(), "burst {burst}: {r:?}");
        }
    }
    assert_eq!(pod.stats.max_inflight(), 4);
    assert_eq!(pod.stats.started(), 36);
}

/// Issue 24, item 2: a stream the pod refused (`REFUSED_STREAM`: not processed, RFC 9113
/// §8.7) is sent again rather than failed, and the pod processes the call exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_stream_is_sent_again() {
    let pod = start_strict_pod(138, 1, true, Duration::ZERO).await;
    let config = format!(
        "routes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: 1, protocol: h2c, endpoints: [\"{}\"]}}\n",
        pod.addr
    );
    let agent = Agent::start(&config).await;
    let client = connect(agent.addr).await;
    let r = unary(client.channel.clone(), RUN, "1", "r").await;
    assert_eq!(r.as_deref().ok(), Some("pod=strict"), "{r:?}");
    assert_eq!(pod.refused.load(Ordering::SeqCst), 1);
    assert_eq!(pod.stats.started(), 1);
}

/// Issue 24 item 4: `lb_requests_total` must agree with what the clients saw, also while the
/// admin port is being scraped hard: every call counted once, and a pod's own gRPC error
/// (`NOT_FOUND` from `Fail`, an HTTP 200 whose grpc-status is not 0) is not `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_metrics_agree_with_the_clients_under_concurrent_scrapes() {
    const CALLS: usize = 400;
    const SCRAPERS: usize = 200;
    // A second, strict client too: grpcio reads statuses from trailers its own way.
    const GRPCIO_CALLS: usize = 6;
    tokio::task::spawn_blocking(grpcio_python).await.unwrap();
    let pods = start_grpc_pods(71, 2).await;
    let agent = Agent::start(&grpc_route(&pods, 4, "{timeout: 30s}")).await;
    let client = connect(agent.addr).await;
    let addr = agent.addr;
    let grpcio_calls: Vec<_> = (0..GRPCIO_CALLS)
        .map(|i| {
            tokio::spawn(async move {
                let path = if i % 2 == 0 { FAIL } else { RUN };
                grpcio_call(addr, path, "5", &format!("py{i}"), None).await
            })
        })
        .collect();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..SCRAPERS)
        .map(|_| {
            let (admin, done) = (agent.admin, std::sync::Arc::clone(&done));
            tokio::spawn(async move {
                let mut n = 0;
                // Bounded: at most 2,000 scrapes each, and only while the calls run.
                while !done.load(Ordering::SeqCst) && n < 2000 {
                    let _ = loadgen::get(admin, "/metrics", &[]).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let ch = client.channel.clone();
            tokio::spawn(async move {
                let path = if i % 5 == 0 { FAIL } else { RUN };
                unary(ch, path, &format!("{}", i % 7), &format!("c{i}")).await
            })
        })
        .collect();
    let (mut ok, mut not_found, mut other) = (0u64, 0u64, Vec::new());
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::NotFound => not_found += 1,
            Err(s) => other.push(s),
        }
    }
    for c in grpcio_calls {
        match c.await.unwrap() {
            (code, _) if code == "OK" => ok += 1,
            (code, _) if code == "NOT_FOUND" => not_found += 1,
            (code, message) => panic!("grpcio call failed: {code} {message}"),
        }
    }
    done.store(true, Ordering::SeqCst);
    let mut scrapes = 0;
    for s in scrapers {
        scrapes += s.await.unwrap();
    }
    assert!(other.is_empty(), "unexpected call failures: {other:?}");
    assert_eq!((ok, not_found), (323, 83));

    let count = |m: &str, outcome: &str| {
        let key = format!("lb_requests_total{{outcome=\"{outcome}\",route=\"/lbtest.Work/\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + SECS;
    let last = loop {
        let last = loadgen::get(agent.admin, "/metrics", &[])
            .await
            .unwrap()
            .body;
        let total: u64 = last
            .lines()
            .filter(|l| {
                l.starts_with("lb_requests_total{") && l.contains("route=\"/lbtest.Work/\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        let calls = (CALLS + GRPCIO_CALLS) as u64;
        if total >= calls || std::time::Instant::now() > deadline {
            assert_eq!(
                total, calls,
                "every call counted once ({scrapes} scrapes):\n{last}"
            );
            break last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(count(&last, "ok"), ok, "ok as the clients saw it:\n{last}");
    assert_eq!(
        count(&last, "pod_error"),
        not_found,
        "the pod's own gRPC errors:\n{last}"
    );
}
