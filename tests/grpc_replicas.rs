//! gRPC through several lb-agent processes sharing one slot ledger in a real `redis-server` on
//! loopback: tonic pods speaking h2c behind them, tonic and grpcio (gRPC C-core) clients in
//! front. A call's slot and queue place are global like an HTTP/1.1 request's, and a refusal is
//! still a gRPC status. Caps are read from the pods' own in-flight counts.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use common::redis::Redis;
use common::*;
use grpc::*;
use std::time::{Duration, Instant};
use tonic::Code;

const SECS: Duration = Duration::from_secs(15);

/// One gRPC route over `pods`, every agent on the ledger in `redis`. A fresh ledger grants no
/// slot for `recovery_hold` (default 2 s, longer than the 1 s queue timeout below): 300 ms here.
fn config(redis: &Redis, pods: &[GrpcPod], limit: usize, queue: &str) -> String {
    let list: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!(
        "ledger: {{redis: \"{}\", lease_ttl: 2s, recovery_hold: 300ms}}\nshutdown_delay: 0s\nroutes:\n  - {{uri: /lbtest.Work/, match: prefix, limit: {limit}, protocol: h2c, endpoints: [{}], queue: {queue}}}\n",
        redis.url(),
        list.join(", ")
    )
}

/// The queue length across every agent, as the ledger reports it in `/status`.
async fn global_queue(agent: &Agent) -> u64 {
    agent.status().await["ledger"]["queue_depth"]
        .as_u64()
        .unwrap_or(0)
}

/// A fixed pseudo-random sequence of agent indexes below `n` (xorshift), so that a failure can
/// be replayed with the same spread.
fn picks(n: usize, count: usize) -> Vec<usize> {
    let mut x: u32 = 0x9e37_79b9;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize % n
        })
        .collect()
}

/// 3 agents, 2 pods of limit 1, a burst of 24 tonic calls and 6 grpcio calls at once, each to
/// an agent picked pseudo-randomly (as a ClusterIP Service does): every call is served, and
/// neither pod ever runs two calls at once, though no agent alone could know that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_burst_through_three_agents_holds_every_pods_cap() {
    // Make (or find) the virtualenv first, so the grpcio clients start quickly.
    tokio::task::spawn_blocking(grpcio_python).await.unwrap();
    let redis = Redis::start();
    let pods = start_grpc_pods(131, 2).await;
    let body = config(&redis, &pods, 1, "{timeout: 30s}");
    let agents = [
        Agent::start(&body).await,
        Agent::start(&body).await,
        Agent::start(&body).await,
    ];
    // One HTTP/2 connection per agent for tonic; grpcio opens its own per call.
    let mut clients = Vec::new();
    for agent in &agents {
        clients.push(connect(agent.addr).await);
    }

    let started = Instant::now();
    let tonic_calls: Vec<_> = picks(3, 24)
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let ch = clients[a].channel.clone();
            tokio::spawn(async move { unary(ch, RUN, "100", &format!("t{i}-a{a}")).await })
        })
        .collect();
    let grpcio_calls: Vec<_> = picks(3, 30)
        .into_iter()
        .skip(24)
        .enumerate()
        .map(|(i, a)| {
            let addr = agents[a].addr;
            tokio::spawn(
                async move { grpcio_call(addr, RUN, "100", &format!("g{i}-a{a}"), None).await },
            )
        })
        .collect();
    for c in tonic_calls {
        let body = tokio::time::timeout(SECS, c)
            .await
            .expect("tonic call finished")
            .unwrap()
            .expect("tonic call ok");
        assert!(body.starts_with("pod=127.0.1.13"), "{body}");
    }
    for c in grpcio_calls {
        let (code, message) = tokio::time::timeout(SECS, c)
            .await
            .expect("grpcio call finished")
            .unwrap();
        assert_eq!(code, "OK", "{message}");
        assert!(message.starts_with("pod=127.0.1.13"), "{message}");
    }
    let took = started.elapsed();

    let per_pod: Vec<usize> = pods.iter().map(|p| p.stats.started()).collect();
    let max: Vec<usize> = pods.iter().map(|p| p.stats.max_inflight()).collect();
    println!(
        "30 calls over 3 agents in {took:?}: calls per pod {per_pod:?}, max in flight {max:?}"
    );
    assert_eq!(max, vec![1, 1], "each pod's own max in flight");
    assert_eq!(per_pod.iter().sum::<usize>(), 30);
    // Every call arrived exactly once, the grpcio ones included.
    let mut arrived: Vec<String> = pods.iter().flat_map(|p| p.stats.arrivals()).collect();
    arrived.sort();
    arrived.dedup();
    assert_eq!(arrived.len(), 30, "{arrived:?}");
    assert_eq!(arrived.iter().filter(|id| id.starts_with('g')).count(), 6);
    // 30 calls of 100 ms on 2 slots take at least 1.5 s when the cap holds.
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    for agent in &agents {
        assert_eq!(agent.status().await["ledger"]["kind"], "redis");
    }
    assert_eq!(global_queue(&agents[0]).await, 0);
}

/// Every pod full (held by calls through agent 0) and a 1 s queue timeout: calls through the
/// other agents, which hold no slot themselves and learn that the pods are full only from the
/// ledger, wait in the shared queue and then get the gRPC status UNAVAILABLE `queue timeout` in
/// a Trailers-Only response (HTTP 200), read the same by tonic and by grpcio; none reaches a
/// pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_timeout_through_another_agent_is_a_grpc_unavailable() {
    tokio::task::spawn_blocking(grpcio_python).await.unwrap();
    let redis = Redis::start();
    let pods = start_grpc_pods(141, 2).await;
    let body = config(&redis, &pods, 1, "{timeout: 1s}");
    let agents = [
        Agent::start(&body).await,
        Agent::start(&body).await,
        Agent::start(&body).await,
    ];
    let holder = connect(agents[0].addr).await;
    // The fresh ledger's recovery hold is over once a call goes through.
    eventually(SECS, "a first call served", || async {
        unary(holder.channel.clone(), RUN, "1", "warm-up")
            .await
            .is_ok()
    })
    .await;
    let long: Vec<_> = (0..2)
        .map(|i| {
            let ch = holder.channel.clone();
            tokio::spawn(async move { unary(ch, RUN, "6000", &format!("long{i}")).await })
        })
        .collect();
    eventually(SECS, "both pods busy", || async {
        pods.iter().all(|p| p.stats.inflight() == 1)
    })
    .await;

    // tonic through agent 1, grpcio through agent 2, a hand-made call through agent 1: all
    // wait in the one queue at once.
    let client = connect(agents[1].addr).await;
    let ch = client.channel.clone();
    let tonic_call = tokio::spawn(async move {
        let sent = Instant::now();
        (unary(ch, RUN, "10", "tonic-late").await, sent.elapsed())
    });
    let addr = agents[2].addr;
    let grpcio = tokio::spawn(async move {
        let sent = Instant::now();
        let reply = grpcio_call(addr, RUN, "10", "grpcio-late", None).await;
        (reply, sent.elapsed())
    });
    let addr = agents[1].addr;
    let raw = tokio::spawn(async move { raw_call(addr, RUN, "10", "raw-late", "20S").await });
    // The queue is the ledger's: agent 0, which holds the slots, sees the other agents' calls.
    eventually(
        SECS,
        "calls of agents 1 and 2 in the shared queue",
        || async { global_queue(&agents[0]).await >= 2 },
    )
    .await;

    let (err, waited) = tonic_call.await.unwrap();
    let err = err.unwrap_err();
    println!("tonic: {err:?} after {waited:?}");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("queue timeout"), "{err:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "tonic call answered after {waited:?}"
    );

    let ((code, message), waited) = grpcio.await.unwrap();
    println!("grpcio: {code} {message} after {waited:?}");
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("queue timeout"), "{message}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "grpcio call answered after {waited:?}"
    );

    // On the wire: HTTP 200 with grpc-status 14 in one HEADERS frame that ends the stream,
    // not an HTTP 503 that a client would have to map to a status itself.
    let reply = raw.await.unwrap();
    println!("raw: {reply:?}");
    assert_eq!(reply.http_status, 200, "{reply:?}");
    assert_eq!(reply.grpc_status.as_deref(), Some("14"), "{reply:?}");
    assert!(
        reply
            .grpc_message
            .as_deref()
            .is_some_and(|m| m.contains("queue timeout")),
        "{reply:?}"
    );
    assert!(reply.trailers_only, "{reply:?}");

    // Nothing reached a pod but the two long calls, which the refusals did not disturb.
    for c in long {
        let body = c.await.unwrap().expect("long call ok");
        assert!(body.starts_with("pod=127.0.1.14"), "{body}");
    }
    let mut arrived: Vec<String> = pods
        .iter()
        .flat_map(|p| p.stats.arrivals())
        .filter(|id| id != "warm-up")
        .collect();
    arrived.sort();
    assert_eq!(arrived, vec!["long0".to_string(), "long1".to_string()]);
    for p in &pods {
        assert_eq!(p.stats.max_inflight(), 1, "pod {} cap", p.addr);
    }
    assert_eq!(global_queue(&agents[0]).await, 0);

    // The slots came back to the ledger: a call through agent 2 now runs at once.
    let (code, message) = grpcio_call(agents[2].addr, RUN, "1", "after", None).await;
    assert_eq!(code, "OK", "{message}");
    assert!(
        pods.iter()
            .any(|p| p.stats.arrivals().last().map(String::as_str) == Some("after")),
        "the call after the refusals ran"
    );
}
