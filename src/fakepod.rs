//! A fake compute pod: a small HTTP/1.1 server that takes its time and counts its own load.
//!
//! Used by `lb-agent demo`, the end-to-end tests and `bench/`. Several pods share one port on
//! distinct loopback addresses (127.0.1.1, 127.0.1.2, …), like real pods behind a Service.
//!
//! Each request sleeps for `?ms=N` (or the `x-delay-ms` header, default 0) and answers
//! `200` with the body `pod=<ip> request=<method> <path?query> body_bytes=<n>`, padded with
//! dots to `?bytes=N` bytes if asked (a large result). The pod records
//! its in-flight count, the highest in-flight count it ever saw, how many requests started and
//! finished, its busy time (wall time with at least one request in flight), its work time (the
//! sum of the service times it worked through), and the `x-req-id` of each request in the order
//! they arrived.
//!
//! Each pod also answers, without counting them as requests:
//! `GET /_stats` → `{"pod", "inflight", "max_inflight", "started", "finished", "busy_ms",
//! "work_ms"}` and `POST /_stats/reset` → the same JSON, taken just before the counters are
//! zeroed (`max_inflight` restarts from the current in-flight count).
//!
//! As a process: `lb-agent fakepods --first 127.0.1.1 --count 4 --port 18000 [--workers N]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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
    /// Wall time with at least one request in flight. Its lock also orders the in-flight
    /// transitions, so a busy period starts and ends exactly once.
    busy: Mutex<BusyClock>,
    /// Sum of the service times worked through (time spent holding a worker), in µs.
    work_us: AtomicU64,
}

#[derive(Debug, Default)]
struct BusyClock {
    since: Option<Instant>,
    total: Duration,
}

/// A point-in-time copy of a pod's counters, as `GET /_stats` serves it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub pod: String,
    pub inflight: usize,
    pub max_inflight: usize,
    pub started: usize,
    pub finished: usize,
    pub busy_ms: u64,
    pub work_ms: u64,
}

impl PodStats {
    fn busy_clock(&self) -> std::sync::MutexGuard<'_, BusyClock> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request entered the pod.
    fn begin(&self) {
        let mut busy = self.busy_clock();
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        if now == 1 {
            busy.since = Some(Instant::now());
        }
    }

    /// A request left the pod after `worked` of service.
    fn end(&self, worked: Duration) {
        let mut busy = self.busy_clock();
        self.work_us
            .fetch_add(worked.as_micros() as u64, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(t) = busy.since.take() {
                busy.total += t.elapsed();
            }
        }
    }

    /// Wall time with at least one request in flight, the current busy period included.
    pub fn busy(&self) -> Duration {
        let busy = self.busy_clock();
        busy.total + busy.since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Sum of the service times worked through.
    pub fn work(&self) -> Duration {
        Duration::from_micros(self.work_us.load(Ordering::SeqCst))
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self, pod: SocketAddr) -> StatsSnapshot {
        let busy = self.busy_clock();
        StatsSnapshot {
            pod: pod.to_string(),
            inflight: self.inflight(),
            max_inflight: self.max_inflight(),
            started: self.started(),
            finished: self.finished(),
            busy_ms: (busy.total + busy.since.map_or(Duration::ZERO, |t| t.elapsed())).as_millis()
                as u64,
            work_ms: self.work().as_millis() as u64,
        }
    }

    /// Zeroes the counters and returns what they were. Requests in flight stay counted as in
    /// flight (and start the new `max_inflight` and busy period), but their work time and
    /// completion go to the new period.
    pub fn reset(&self, pod: SocketAddr) -> StatsSnapshot {
        let before = self.snapshot(pod);
        let mut busy = self.busy_clock();
        let inflight = self.inflight();
        self.max_inflight.store(inflight, Ordering::SeqCst);
        self.started.store(0, Ordering::SeqCst);
        self.finished.store(0, Ordering::SeqCst);
        self.work_us.store(0, Ordering::SeqCst);
        busy.total = Duration::ZERO;
        busy.since = (inflight > 0).then(Instant::now);
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        before
    }

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
                    let _ = serve(conn, addr, s, w).await;
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
    method: String,
    path: String,
    target: String,
    delay: Duration,
    req_id: Option<String>,
    close: bool,
    content_length: usize,
    /// `?bytes=N`: pad the response body to at least N bytes.
    pad: usize,
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
    let mut pad = 0;
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
        if let Some(v) = pair.strip_prefix("bytes=") {
            pad = v.parse().unwrap_or(pad);
        }
    }
    Some(Request {
        method: method.clone(),
        path: path.to_string(),
        target: format!(
            "{method} {path}{}{query}",
            if query.is_empty() { "" } else { "?" }
        ),
        delay: Duration::from_millis(delay_ms),
        req_id,
        close,
        content_length,
        pad,
    })
}

async fn serve(
    mut conn: TcpStream,
    addr: SocketAddr,
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

        let stats_reply = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/_stats") => Some(stats.snapshot(addr)),
            ("POST", "/_stats/reset") => Some(stats.reset(addr)),
            _ => None,
        };
        if let Some(snapshot) = stats_reply {
            let body = serde_json::to_string(&snapshot).unwrap_or_default() + "\n";
            write_response(&mut conn, addr.ip(), "application/json", &body, req.close).await?;
            if req.close {
                return Ok(());
            }
            continue;
        }

        if let Some(id) = &req.req_id {
            stats
                .arrivals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id.clone());
        }
        stats.begin();
        let worked = {
            let _worker = match &workers {
                Some(w) => w.acquire().await.ok(),
                None => None,
            };
            let t = Instant::now();
            tokio::time::sleep(req.delay).await;
            t.elapsed()
        };
        stats.end(worked);

        let mut body = format!(
            "pod={} request={} body_bytes={body_len}\n",
            addr.ip(),
            req.target
        );
        // `?bytes=N`: a response at least N bytes long (a large result).
        if body.len() < req.pad {
            body.push_str(&".".repeat(req.pad - body.len()));
        }
        write_response(&mut conn, addr.ip(), "text/plain", &body, req.close).await?;
        if req.close {
            return Ok(());
        }
    }
}

async fn write_response(
    conn: &mut TcpStream,
    ip: IpAddr,
    content_type: &str,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-pod: {ip}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    conn.write_all(resp.as_bytes()).await
}

/// `lb-agent fakepods`: how many pods to serve, where, and how busy each may get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Address of the first pod; the others follow (127.0.1.1, 127.0.1.2, …).
    pub first: Ipv4Addr,
    pub count: usize,
    /// One port for every pod; 0 picks a free one (printed on start).
    pub port: u16,
    /// Requests each pod works on at once (the rest wait inside the pod); none: no limit.
    pub workers: Option<usize>,
}

pub const CLI_USAGE: &str = "lb-agent fakepods [--first IP] [--count N] [--port PORT] [--workers N]

  --first IP     address of the first pod (default 127.0.1.1); pod i is IP + i
  --count N      number of pods (default 4)
  --port PORT    port shared by every pod (default 0: a free one, printed on start)
  --workers N    requests each pod works on at once; extra ones wait inside the pod
                 (default: no limit)

Each request sleeps ?ms=N (or header x-delay-ms: N). Each pod serves GET /_stats and
POST /_stats/reset (JSON: inflight, max_inflight, started, finished, busy_ms, work_ms).
Prints one line `fakepods ready <first>..<last> port <port>` once every pod listens; runs
until SIGTERM or SIGINT.";

impl ServeOptions {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<ServeOptions, String> {
        let mut o = ServeOptions {
            first: Ipv4Addr::new(127, 0, 1, 1),
            count: 4,
            port: 0,
            workers: None,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match a.as_str() {
                "--first" => {
                    o.first = value("--first")?
                        .parse()
                        .map_err(|e| format!("--first: {e}"))?
                }
                "--count" => {
                    o.count = value("--count")?
                        .parse()
                        .map_err(|e| format!("--count: {e}"))?
                }
                "--port" => {
                    o.port = value("--port")?
                        .parse()
                        .map_err(|e| format!("--port: {e}"))?
                }
                "--workers" => {
                    let n: usize = value("--workers")?
                        .parse()
                        .map_err(|e| format!("--workers: {e}"))?;
                    o.workers = (n > 0).then_some(n);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if o.count == 0 {
            return Err("--count must be at least 1".into());
        }
        if u32::from(o.first).checked_add(o.count as u32 - 1).is_none() {
            return Err("--first + --count runs past 255.255.255.255".into());
        }
        Ok(o)
    }

    /// The address of pod `i` (0-based).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first) + i as u32)
    }
}

/// Starts the pods of `opts`, all on one port. Must run inside a tokio runtime.
pub async fn start_serving(opts: &ServeOptions) -> std::io::Result<Vec<FakePod>> {
    let first = FakePod::start_with_workers(opts.ip(0).into(), opts.port, opts.workers).await?;
    let port = first.addr.port();
    let mut pods = vec![first];
    for i in 1..opts.count {
        let ip = opts.ip(i);
        let pod = FakePod::start_with_workers(ip.into(), port, opts.workers)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{ip}:{port}: {e}")))?;
        pods.push(pod);
    }
    Ok(pods)
}

/// `lb-agent fakepods …`: serves the pods until SIGTERM or SIGINT.
pub fn cli(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args: Vec<String> = args.into_iter().collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: {CLI_USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match ServeOptions::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lb-agent fakepods: {e}\nusage: {CLI_USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb-agent fakepods: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let pods = match start_serving(&opts).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("lb-agent fakepods: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "fakepods ready {}..{} port {}",
            opts.ip(0),
            opts.ip(opts.count - 1),
            pods[0].addr.port()
        );
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("lb-agent fakepods: cannot watch SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drop(pods);
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let args = [
            "--first",
            "127.0.2.9",
            "--count",
            "3",
            "--port",
            "18000",
            "--workers",
            "2",
        ];
        let o = ServeOptions::parse(args.iter().map(|s| s.to_string())).unwrap();
        assert_eq!(o.ip(0), Ipv4Addr::new(127, 0, 2, 9));
        assert_eq!(o.ip(2), Ipv4Addr::new(127, 0, 2, 11));
        assert_eq!((o.count, o.port, o.workers), (3, 18000, Some(2)));
        assert!(ServeOptions::parse(["--count".to_string(), "0".to_string()]).is_err());
        assert!(ServeOptions::parse(["--bogus".to_string()]).is_err());
    }

    #[tokio::test]
    async fn stats_count_busy_and_work_time_and_reset() {
        let pod = FakePod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        let slow = |ms: u64| {
            let a = pod.addr;
            tokio::spawn(async move { crate::loadgen::get(a, &format!("/w?ms={ms}"), &[]).await })
        };
        let (a, b) = (slow(200), slow(200));
        assert_eq!(a.await.unwrap().unwrap().status, 200);
        assert_eq!(b.await.unwrap().unwrap().status, 200);

        let r = crate::loadgen::get(pod.addr, "/_stats", &[]).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["started"], 2, "{v}");
        assert_eq!(v["finished"], 2);
        assert_eq!(v["max_inflight"], 2);
        let busy = v["busy_ms"].as_u64().unwrap();
        let work = v["work_ms"].as_u64().unwrap();
        assert!(
            (195..400).contains(&busy),
            "two overlapping requests: busy {busy} ms"
        );
        assert!(
            (395..600).contains(&work),
            "two requests of 200 ms: work {work} ms"
        );

        let r = crate::loadgen::request(pod.addr, "POST", "/_stats/reset", &[], b"")
            .await
            .unwrap();
        let before: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(before["started"], 2);
        let after = pod.stats.snapshot(pod.addr);
        assert_eq!(
            (
                after.started,
                after.max_inflight,
                after.busy_ms,
                after.work_ms
            ),
            (0, 0, 0, 0)
        );
    }
}
