//! A fake pod on a raw socket, for what the hyper pod ([`crate::fakepod`]) will not do: hang
//! without ever answering, trickle an answer, and keep a connection open after answering
//! whatever its client does — ignoring a half-close, as servers do until their own keep-alive
//! timeout (2 s gunicorn, 5 s uvicorn and Node.js, never for a Go `http.Server` without
//! `IdleTimeout`). This pod never closes a connection unless a request says
//! `connection: close`, or the pod is dropped.
//!
//! What a request gets is read from its query string:
//! - `ms=N`: a complete `200` after N ms (default 0), framed by `Content-Length`;
//! - `chunked`: the same answer in three chunks and the last-chunk terminator;
//! - `hang`: no answer, ever (a deadlocked worker); the connection stays open;
//! - `trickle=N` (`every_ms=M`, default 1000): the head at once, then N one-byte chunks, one
//!   every M ms, then the terminator (a slow but steady stream);
//! - `drip=N` (`every_ms=M`): the same with a `Content-Length: N` body instead of chunks.
//!
//! The body is `pod=<ip> request=<method> <target>\n` (or the trickled `x`s). The pod keeps
//! reading while it works, so it sees the end of stream lb-agent sends, and counts, from its own
//! side: connections open (accepted, no end of stream read yet), requests in flight (head read,
//! answer not fully written), each request's target and arrival time, and when the last byte of
//! each complete answer was written.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Largest request head the pod reads; a larger one ends the connection.
const MAX_HEAD: usize = 64 * 1024;

/// What a [`ScriptPod`] has seen, from its own side of each connection.
#[derive(Debug, Default)]
pub struct ScriptStats {
    accepted: AtomicUsize,
    connections: AtomicUsize,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    /// `<method> <target>` of every request and when its head arrived, in arrival order.
    requests: Mutex<Vec<(String, Instant)>>,
    /// `<method> <target>` of every complete answer and when its last byte was written.
    answers: Mutex<Vec<(String, Instant)>>,
}

impl ScriptStats {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    /// Connections whose end of stream the pod has not read yet.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Requests read and not yet fully answered (a hung one stays counted).
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }
    /// `<method> <target>` of every request, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.requests)
            .iter()
            .map(|(r, _)| r.clone())
            .collect()
    }
    /// When the first request whose `<method> <target>` contains `needle` arrived.
    pub fn arrived(&self, needle: &str) -> Option<Instant> {
        lock(&self.requests)
            .iter()
            .find(|(r, _)| r.contains(needle))
            .map(|(_, t)| *t)
    }
    /// When the last byte of the latest complete answer was written.
    pub fn last_answer(&self) -> Option<Instant> {
        lock(&self.answers).last().map(|(_, t)| *t)
    }
    /// When the last byte of the answer to the first request whose `<method> <target>`
    /// contains `needle` was written.
    pub fn answered(&self, needle: &str) -> Option<Instant> {
        lock(&self.answers)
            .iter()
            .find(|(r, _)| r.contains(needle))
            .map(|(_, t)| *t)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running scripted pod. Dropping it closes every connection it holds.
pub struct ScriptPod {
    pub addr: SocketAddr,
    pub stats: Arc<ScriptStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptPod {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl ScriptPod {
    /// Starts a pod on `ip:port` (port 0 picks one). Must run inside a tokio runtime.
    pub async fn start(ip: IpAddr, port: u16) -> std::io::Result<ScriptPod> {
        let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ScriptStats::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn({
            let stats = Arc::clone(&stats);
            async move {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        continue;
                    };
                    stats.accepted.fetch_add(1, Ordering::SeqCst);
                    stats.connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(conn, ip, Arc::clone(&stats), stopped.clone()));
                }
            }
        });
        Ok(ScriptPod {
            addr,
            stats,
            stop,
            task,
        })
    }
}

/// Starts `n` scripted pods on 127.0.1.`first`, … sharing one port (retrying with another port
/// if one address has it taken).
pub async fn start_script_pods(first: u8, n: usize) -> std::io::Result<Vec<ScriptPod>> {
    let mut last_err = None;
    for _ in 0..20 {
        let p0 = ScriptPod::start(IpAddr::from([127, 0, 1, first]), 0).await?;
        let port = p0.addr.port();
        let mut pods = vec![p0];
        for i in 1..n {
            match ScriptPod::start(IpAddr::from([127, 0, 1, first + i as u8]), port).await {
                Ok(p) => pods.push(p),
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        if pods.len() == n {
            return Ok(pods);
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("could not bind pods")))
}

/// One request as the pod understood it.
struct Ask {
    target: String,
    close: bool,
    hang: bool,
    delay: Duration,
    chunked: bool,
    trickle: Option<usize>,
    drip: Option<usize>,
    every: Duration,
}

impl Ask {
    fn parse(method: &str, target: &str, close: bool) -> Ask {
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let mut ask = Ask {
            target: format!("{method} {target}"),
            close,
            hang: false,
            delay: Duration::ZERO,
            chunked: false,
            trickle: None,
            drip: None,
            every: Duration::from_secs(1),
        };
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let n = v.parse::<u64>().ok();
            match k {
                "hang" => ask.hang = true,
                "chunked" => ask.chunked = true,
                "ms" => ask.delay = Duration::from_millis(n.unwrap_or(0)),
                "every_ms" => ask.every = Duration::from_millis(n.unwrap_or(1000)),
                "trickle" => ask.trickle = n.map(|n| n as usize),
                "drip" => ask.drip = n.map(|n| n as usize),
                _ => {}
            }
        }
        ask
    }
}

/// One connection: a reader that parses requests (and notices the end of stream) and a worker
/// that answers them in order. The write half is held until the pod is dropped, so the pod
/// never closes a connection on its own (except after `connection: close`).
async fn serve(
    conn: TcpStream,
    ip: IpAddr,
    stats: Arc<ScriptStats>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = conn.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Ask>();
    let reader = {
        let stats = Arc::clone(&stats);
        async move {
            let mut buf = Vec::new();
            while let Some((method, target, close)) = read_request(&mut rd, &mut buf).await {
                let arrived = (format!("{method} {target}"), Instant::now());
                lock(&stats.requests).push(arrived);
                let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                stats.max_inflight.fetch_max(now, Ordering::SeqCst);
                if tx.send(Ask::parse(&method, &target, close)).is_err() {
                    break;
                }
            }
            // End of stream (or an unreadable request): the client is done sending. The
            // connection stays open; the worker still answers what it was asked.
            stats.connections.fetch_sub(1, Ordering::SeqCst);
        }
    };
    let worker = async {
        while let Some(ask) = rx.recv().await {
            if ask.hang {
                return std::future::pending::<()>().await;
            }
            if answer(&mut wr, ip, &ask).await.is_ok() {
                lock(&stats.answers).push((ask.target.clone(), Instant::now()));
            }
            stats.inflight.fetch_sub(1, Ordering::SeqCst);
            if ask.close {
                let _ = wr.shutdown().await;
                return;
            }
        }
        // Asked everything the client will ask: keep the connection open anyway.
        std::future::pending::<()>().await
    };
    let stopped = async {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(reader, worker) } => {}
        _ = stopped => {}
    }
}

/// Reads one request head (and its `Content-Length` body) from `rd`, keeping extra bytes in
/// `buf`. `None` at the end of stream or on a request it cannot read.
async fn read_request(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> Option<(String, String, bool)> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD || !fill(rd, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_string(), first.next()?.to_string());
    let mut length = 0usize;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Not needed by the tests that use this pod.
            return None;
        }
    }
    while buf.len() < length {
        if !fill(rd, buf).await {
            return None;
        }
    }
    buf.drain(..length);
    Some((method, target, close))
}

/// Reads more bytes into `buf`; false at the end of stream or on an error.
async fn fill(rd: &mut tokio::net::tcp::OwnedReadHalf, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match rd.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

async fn answer(wr: &mut OwnedWriteHalf, ip: IpAddr, ask: &Ask) -> std::io::Result<()> {
    let head = |framing: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-pod: {ip}\r\n{framing}{}\r\n",
            if ask.close {
                "connection: close\r\n"
            } else {
                ""
            }
        )
    };
    if let Some(n) = ask.trickle {
        wr.write_all(head("transfer-encoding: chunked\r\n").as_bytes())
            .await?;
        for _ in 0..n {
            tokio::time::sleep(ask.every).await;
            wr.write_all(b"1\r\nx\r\n").await?;
        }
        return wr.write_all(b"0\r\n\r\n").await;
    }
    if let Some(n) = ask.drip {
        wr.write_all(head(&format!("content-length: {n}\r\n")).as_bytes())
            .await?;
        for _ in 0..n {
            tokio::time::sleep(ask.every).await;
            wr.write_all(b"x").await?;
        }
        return Ok(());
    }
    tokio::time::sleep(ask.delay).await;
    let body = format!("pod={ip} request={}\n", ask.target);
    if ask.chunked {
        let mut out = head("transfer-encoding: chunked\r\n");
        let (a, rest) = body.split_at(body.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        for part in [a, b, c] {
            out.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
        }
        out.push_str("0\r\n\r\n");
        wr.write_all(out.as_bytes()).await
    } else {
        let out = head(&format!("content-length: {}\r\n", body.len())) + &body;
        wr.write_all(out.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Reads from `s` until `want` has arrived (bounded).
    async fn read_until(s: &mut TcpStream, want: &str) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..100 {
            if String::from_utf8_lossy(&out).contains(want) {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_then_keeps_the_connection_open_after_a_half_close() {
        let pod = ScriptPod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        let mut s = TcpStream::connect(pod.addr).await.unwrap();
        s.write_all(
            b"GET /a?ms=50 HTTP/1.1\r\nhost: x\r\n\r\nGET /b?chunked HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        s.shutdown().await.unwrap();
        let out = read_until(&mut s, "0\r\n\r\n").await;
        assert!(
            out.contains("content-length: 35\r\n\r\npod=127.0.0.1 request=GET /a?ms=50\n"),
            "{out}"
        );
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(out.ends_with("0\r\n\r\n"), "{out}");
        until("end of stream seen", || pod.stats.connections() == 0).await;
        assert_eq!(pod.stats.inflight(), 0);
        assert!(pod.stats.answered("/a?ms=50").unwrap() <= pod.stats.last_answer().unwrap());
        // Still open from the pod's side: nothing more arrives, no end of stream.
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(r.is_err(), "the pod closed the connection: {r:?}");
        assert_eq!(
            pod.stats.requests(),
            vec!["GET /a?ms=50".to_string(), "GET /b?chunked".to_string()]
        );
    }

    #[tokio::test]
    async fn hangs_trickles_and_drips() {
        let pod = ScriptPod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        let mut hung = TcpStream::connect(pod.addr).await.unwrap();
        hung.write_all(b"GET /h?hang HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        until("hung request in", || pod.stats.inflight() == 1).await;
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_millis(300), hung.read(&mut buf)).await;
        assert!(r.is_err(), "a hung request got {r:?}");
        drop(hung);
        until("hung connection closed", || pod.stats.connections() == 0).await;
        assert_eq!(pod.stats.inflight(), 1, "a hung worker stays stuck");

        let mut s = TcpStream::connect(pod.addr).await.unwrap();
        let t = Instant::now();
        s.write_all(
            b"GET /t?trickle=3&every_ms=100 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let out = read_until(&mut s, "0\r\n\r\n").await;
        assert!(
            out.ends_with("1\r\nx\r\n1\r\nx\r\n1\r\nx\r\n0\r\n\r\n"),
            "{out}"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));

        let mut s = TcpStream::connect(pod.addr).await.unwrap();
        s.write_all(b"GET /d?drip=2&every_ms=50 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = read_until(&mut s, "\r\n\r\nxx").await;
        assert!(out.contains("content-length: 2\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nxx"), "{out}");
    }
}
