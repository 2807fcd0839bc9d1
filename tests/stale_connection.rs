//! A pooled pod connection that the pod has already closed is never written to: the request
//! goes to a fresh connection (or another pod) instead of failing with a `502`, and the pod
//! still never sees a request twice.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A keep-alive HTTP/1.1 pod that can stop as a pod being shut down does: it stops listening
/// (new connections are refused), closes its idle keep-alive connections at once, and closes
/// the busy ones after their answer. Counts the requests it read, and its own concurrency.
struct StoppingPod {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    stats: Arc<PodStats>,
}

#[derive(Default)]
struct PodStats {
    requests: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
}

impl StoppingPod {
    async fn start(addr: SocketAddr, work: Duration) -> StoppingPod {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(PodStats::default());
        let counted = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut on_stop = stopped.clone();
            loop {
                tokio::select! {
                    _ = on_stop.wait_for(|s| *s) => return, // the listener is closed here
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { return };
                        tokio::spawn(serve(conn, Arc::clone(&counted), stopped.clone(), work));
                    }
                }
            }
        });
        StoppingPod { addr, stop, stats }
    }
}

/// Serves GETs (no bodies), `work` each, until stopped: an idle connection closes the moment
/// the pod stops, a busy one after its answer.
async fn serve(
    mut conn: TcpStream,
    stats: Arc<PodStats>,
    mut stopped: watch::Receiver<bool>,
    work: Duration,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.is_empty() && *stopped.borrow() {
                return;
            }
            tokio::select! {
                _ = stopped.wait_for(|s| *s), if buf.is_empty() => return,
                read = conn.read(&mut chunk) => match read {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                },
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_inflight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(work).await;
        stats.inflight.fetch_sub(1, Ordering::SeqCst);
        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if conn.write_all(reply).await.is_err() || *stopped.borrow() {
            return;
        }
    }
}

/// The refusing-pod scenario, 30 times: 60 requests at concurrency 6 over two pods (`limit:
/// 3`); a few answers in, one pod stops (refuses connections, closes its idle keep-alive
/// connections). Pingora checks a pooled connection through tokio's readiness, which a busy
/// worker has not updated yet when the FIN has just arrived: before lb-agent asked the kernel
/// itself, some runs had a request written on a connection the pod had closed, answered
/// `502` though the pod never saw it (here: 2 of 20 runs in one of three executions of a
/// 20-run version, 2 to 4 of 40 in three of four executions of a 40-run version with shorter
/// work; so this test catches the old behaviour in about half its executions, and
/// `src/pooled.rs` tests the check itself on real sockets). Now every request
/// is answered by a pod, once. Answers come in rounds (all six start together), and the stop
/// falls halfway between two rounds, which keeps out most requests racing the close itself;
/// when scheduling still makes one happen, a FIN that crossed the request is resent (the pod's
/// FIN acknowledged none of it), and a reset is told apart and not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_is_never_written_on_a_connection_the_pod_closed() {
    const RUNS: usize = 30;
    const CLIENTS: usize = 6;
    const EACH: usize = 10;
    let mut failed_runs = Vec::new();
    let mut crossed_total = 0;
    for run in 0..RUNS {
        let port = free_port();
        let work = Duration::from_millis(10 + (run as u64 % 3) * 10);
        let pods = [
            StoppingPod::start(SocketAddr::from(([127, 0, 1, 91], port)), work).await,
            StoppingPod::start(SocketAddr::from(([127, 0, 1, 92], port)), work).await,
        ];
        let agent = Agent::start(&format!(
            "routes:\n  - {{uri: /work, limit: 3, endpoints: [\"{}\", \"{}\"]}}\n",
            pods[0].addr, pods[1].addr
        ))
        .await;
        // The stop comes at a moment of its own, not at an answer: at an answer lb-agent is
        // writing the next queued request to that very pod, and a FIN that crosses a request
        // on the wire is a race no proxy can see coming (the pod never read it either).
        let stop = pods[0].stop.clone();
        tokio::spawn(async move {
            // Halfway between two rounds of answers (all six start together).
            tokio::time::sleep(work * 3 + work / 2).await;
            stop.send_replace(true);
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let addr = agent.addr;
                tokio::spawn(async move {
                    let mut failed = Vec::new();
                    for i in 0..EACH {
                        match loadgen::get(addr, "/work", &[]).await {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => {
                                failed.push(format!("client {c} #{i}: {} {}", r.status, r.body))
                            }
                            Err(e) => failed.push(format!("client {c} #{i}: {e}")),
                        }
                    }
                    failed
                })
            })
            .collect();
        let mut failed = Vec::new();
        for c in clients {
            failed.extend(c.await.unwrap());
        }
        let seen: Vec<usize> = pods
            .iter()
            .map(|p| p.stats.requests.load(Ordering::SeqCst))
            .collect();
        let max: Vec<usize> = pods
            .iter()
            .map(|p| p.stats.max_inflight.load(Ordering::SeqCst))
            .collect();
        assert!(
            max.iter().all(|m| *m <= 3),
            "run {run}: the cap held: {max:?}"
        );
        // A request written on a connection whose FIN lb-agent already had, or whose FIN
        // crossed it on the wire, reads that FIN first: `ConnectionClosed`, the failure this
        // test is about (the pod's FIN acknowledged none of the request: it is sent again, see
        // `pooled::Reused`; this run failed 1 of 30 in a fresh-clone CI run before that). A
        // request that reached the pod's kernel after the pod decided to close but before its
        // close is answered with a reset (`ReadError`): a pod may also reset after reading a
        // request, so it is not resent; counted and shown but not failed (at most the stopping
        // pod's 3 per run).
        let (crossed, stale): (Vec<String>, Vec<String>) =
            failed.into_iter().partition(|f| f.contains("ReadError"));
        assert!(crossed.len() <= 3, "run {run}: {crossed:?}");
        crossed_total += crossed.len();
        if !stale.is_empty() {
            failed_runs.push(format!(
                "run {run} (pods saw {seen:?}): {}",
                stale.join("; ")
            ));
        }
        assert_eq!(
            seen.iter().sum::<usize>() + crossed.len() + stale.len(),
            CLIENTS * EACH,
            "run {run}: every answered request reached a pod exactly once: {seen:?}"
        );
        eventually(Duration::from_secs(10), "slots returned", || async {
            agent.inflight().await == 0
        })
        .await;
    }
    println!("requests reset by a pod closing with them unread: {crossed_total}");
    assert!(
        failed_runs.is_empty(),
        "{} of {RUNS} runs had a failed request:\n{}",
        failed_runs.len(),
        failed_runs.join("\n")
    );
}
