//! A fake compute pod: a small HTTP/1.1 server that takes its time and counts its own load.
//!
//! Used by `lb-agent demo`, the end-to-end tests and `bench/`. Several pods share one port on
//! distinct loopback addresses (127.0.1.1, 127.0.1.2, …), like real pods behind a Service.
//!
//! Each request sleeps for `?ms=N` (or the `x-delay-ms` header, default 0) and answers
//! `200` with the body `pod=<ip> request=<method> <path?query> body_bytes=<n>`. The pod records its in-flight count, the highest in-flight
//! count it ever saw, how many requests started, and the `x-req-id` of each request in the
//! order they arrived.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What one pod has seen.
#[derive(Debug, Default)]
pub struct PodStats {
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    /// `x-req-id` header of every request, in arrival order.
    pub arrivals: Mutex<Vec<String>>,
}

impl PodStats {
    pub fn max_inflight(&self) -> usize {
        self.max_inflight.load(Ordering::SeqCst)
    }
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
    pub fn arrivals(&self) -> Vec<String> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A running fake pod. Dropping it stops accepting; connections in progress finish.
///
/// With `workers: Some(n)`, the pod works on at most `n` requests at a time and the rest wait
/// inside the pod, the way an overloaded compute pod slows everyone down; the in-flight count
/// still counts every request the pod has accepted.
pub struct FakePod {
    pub addr: SocketAddr,
    pub stats: Arc<PodStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakePod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePod {
    /// Starts a pod on `ip:port` (port 0 picks one). Must run inside a tokio runtime.
    pub async fn start(ip: IpAddr, port: u16) -> std::io::Result<FakePod> {
        Self::start_with_workers(ip, port, None).await
    }

    /// Like [`FakePod::start`], with at most `workers` requests worked on at once.
    pub async fn start_with_workers(
        ip: IpAddr,
        port: u16,
        workers: Option<usize>,
    ) -> std::io::Result<FakePod> {
        let workers = workers.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(PodStats::default());
        let s = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let s = Arc::clone(&s);
                let w = workers.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, addr.ip(), s, w).await;
                });
            }
        });
        Ok(FakePod { addr, stats, task })
    }
}

/// Starts `n` pods on 127.0.1.1 … 127.0.1.n (offset by `first`), all on one port.
/// Retries with a new port if another process holds the chosen one on some address.
pub async fn start_pods(first: u8, n: usize) -> std::io::Result<Vec<FakePod>> {
    start_pods_with_workers(first, n, None).await
}

/// Like [`start_pods`], each pod working on at most `workers` requests at once.
pub async fn start_pods_with_workers(
    first: u8,
    n: usize,
    workers: Option<usize>,
) -> std::io::Result<Vec<FakePod>> {
    let mut last_err = None;
    for _ in 0..20 {
        let ip0 = IpAddr::from([127, 0, 1, first]);
        let p0 = FakePod::start_with_workers(ip0, 0, workers).await?;
        let port = p0.addr.port();
        let mut pods = vec![p0];
        let mut ok = true;
        for i in 1..n {
            let ip = IpAddr::from([127, 0, 1, first + i as u8]);
            match FakePod::start_with_workers(ip, port, workers).await {
                Ok(p) => pods.push(p),
                Err(e) => {
                    last_err = Some(e);
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok(pods);
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("could not bind pods")))
}

struct Request {
    target: String,
    delay: Duration,
    req_id: Option<String>,
    close: bool,
    content_length: usize,
}

fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let version = first.next().unwrap_or("HTTP/1.1");
    let mut delay_ms: u64 = 0;
    let mut req_id = None;
    let mut close = version == "HTTP/1.0";
    let mut content_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "x-delay-ms" => delay_ms = value.parse().unwrap_or(0),
            "x-req-id" => req_id = Some(value.to_string()),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "content-length" => content_length = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("ms=") {
            delay_ms = v.parse().unwrap_or(delay_ms);
        }
    }
    Some(Request {
        target: format!(
            "{method} {path}{}{query}",
            if query.is_empty() { "" } else { "?" }
        ),
        delay: Duration::from_millis(delay_ms),
        req_id,
        close,
        content_length,
    })
}

async fn serve(
    mut conn: TcpStream,
    ip: IpAddr,
    stats: Arc<PodStats>,
    workers: Option<Arc<tokio::sync::Semaphore>>,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 64 * 1024 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end + 4);
        let Some(req) = parse_head(&head) else {
            return Ok(());
        };
        while buf.len() < req.content_length {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body_len = req.content_length;
        buf.drain(..body_len);

        stats.started.fetch_add(1, Ordering::SeqCst);
        if let Some(id) = &req.req_id {
            stats
                .arrivals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.clone());
        }
        let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_inflight.fetch_max(now, Ordering::SeqCst);
        {
            let _worker = match &workers {
                Some(w) => w.acquire().await.ok(),
                None => None,
            };
            tokio::time::sleep(req.delay).await;
        }
        stats.inflight.fetch_sub(1, Ordering::SeqCst);
        stats.finished.fetch_add(1, Ordering::SeqCst);

        let body = format!("pod={ip} request={} body_bytes={body_len}\n", req.target);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-pod: {ip}\r\n{}\r\n{body}",
            body.len(),
            if req.close { "connection: close\r\n" } else { "" }
        );
        conn.write_all(resp.as_bytes()).await?;
        if req.close {
            return Ok(());
        }
    }
}
