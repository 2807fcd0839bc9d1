//! A fake compute pod: an HTTP/1.1 server (hyper) that takes its time and counts its own load.
//!
//! Used by the demo, lb-agent's end-to-end tests and `bench/`. Several pods share one port on
//! distinct loopback addresses (127.0.1.1, 127.0.1.2, …), like real pods behind a Service.
//!
//! Each request sleeps for `?ms=N` (or the `x-delay-ms` header, default 0) and answers
//! `200` with the body `pod=<ip> request=<method> <path?query> body_bytes=<n>`, padded with
//! dots to `?bytes=N` bytes if asked (a large result), and an `x-pod: <ip>` header. The pod
//! records its in-flight count, the highest in-flight count it ever saw, how many requests
//! started and finished, its busy time (wall time with at least one request in flight), its
//! work time (the sum of the service times it worked through), and the `x-req-id` of each
//! request in the order they arrived.
//!
//! Like a compute pod, it does not notice that a client left while it works: the request keeps
//! its place in the counts until its sleep is over. The tests read the pod's own counts as the
//! truth about how many requests a pod held, so this matters (see [`serve_request`]).
//!
//! Each pod also answers, without counting them as requests:
//! `GET /_stats` → `{"pod", "inflight", "max_inflight", "started", "finished", "busy_ms",
//! "work_ms"}` and `POST /_stats/reset` → the same JSON, taken just before the counters are
//! zeroed (`max_inflight` restarts from the current in-flight count).
//!
//! As a process: `testkit fakepods --first 127.0.1.1 --count 4 --port 18000 [--workers N]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
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

/// What every request of one pod shares.
struct Pod {
    addr: SocketAddr,
    stats: Arc<PodStats>,
    workers: Option<Arc<tokio::sync::Semaphore>>,
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
        let listener = TcpListener::bind(SocketAddr::new(ip, port)).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(PodStats::default());
        let pod = Arc::new(Pod {
            addr,
            stats: Arc::clone(&stats),
            workers: workers.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(conn, Arc::clone(&pod)));
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

/// One client connection: HTTP/1.1 keep-alive (and pipelining), HTTP/1.0, `connection: close`.
///
/// `half_close(true)`: hyper does not read the socket while a request is being worked on, so a
/// client's FIN does not end the exchange — the pod answers into the void, as the hand-written
/// pod before it did. No header read timeout: a kept-alive connection from a balancer may stay
/// idle for as long as the balancer likes.
async fn serve_connection(conn: TcpStream, pod: Arc<Pod>) {
    let service = service_fn(move |req| serve_request(req, Arc::clone(&pod)));
    let _ = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(conn), service)
        .await;
}

/// What a request asks of the pod, read from its head.
struct Ask {
    /// `<method> <path?query>` as the response body repeats it.
    target: String,
    delay: Duration,
    req_id: Option<String>,
    /// The client wants the connection closed after this response.
    close: bool,
    /// `?bytes=N`: pad the response body to at least N bytes.
    pad: usize,
}

impl Ask {
    fn read(method: &Method, uri: &Uri, version: Version, headers: &HeaderMap) -> Ask {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let mut delay_ms: u64 = text("x-delay-ms")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let close = match text("connection") {
            Some(v) => v.trim().eq_ignore_ascii_case("close"),
            None => version == Version::HTTP_10,
        };
        let query = uri.query().unwrap_or("");
        let mut pad = 0;
        for pair in query.split('&') {
            if let Some(v) = pair.strip_prefix("ms=") {
                delay_ms = v.parse().unwrap_or(delay_ms);
            }
            if let Some(v) = pair.strip_prefix("bytes=") {
                pad = v.parse().unwrap_or(pad);
            }
        }
        // An absolute-form target is repeated whole, as it came.
        let origin = match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
            _ => String::new(),
        };
        Ask {
            target: format!(
                "{method} {origin}{}{}{query}",
                uri.path(),
                if query.is_empty() { "" } else { "?" }
            ),
            delay: Duration::from_millis(delay_ms),
            req_id: text("x-req-id").map(|v| v.trim().to_string()),
            close,
            pad,
        }
    }
}

/// One request: read its body whole, then work (sleep) and answer.
///
/// hyper drops this future when it gives up on the connection, which must not end the work: a
/// compute pod whose client left goes on computing and holds its place in the counts until
/// it is done (tests/edge.rs counts on it). So the work — waiting for a worker, the sleep and
/// [`PodStats::end`] — runs in a task of its own that this future only awaits; dropping the
/// future detaches the task, it is not cancelled. `begin` runs here, with no await between it
/// and the spawn, so every begun request is ended.
async fn serve_request(
    req: Request<Incoming>,
    pod: Arc<Pod>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (head, body) = req.into_parts();
    let ask = Ask::read(&head.method, &head.uri, head.version, &head.headers);
    let body_len = body.collect().await?.to_bytes().len();
    let stats = &pod.stats;

    let stats_reply = match (&head.method, head.uri.path()) {
        (&Method::GET, "/_stats") => Some(stats.snapshot(pod.addr)),
        (&Method::POST, "/_stats/reset") => Some(stats.reset(pod.addr)),
        _ => None,
    };
    if let Some(snapshot) = stats_reply {
        let body = serde_json::to_string(&snapshot).unwrap_or_default() + "\n";
        return Ok(respond(pod.addr.ip(), "application/json", body, ask.close));
    }

    if let Some(id) = &ask.req_id {
        stats
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
    }
    stats.begin();
    let work = tokio::spawn({
        let pod = Arc::clone(&pod);
        let delay = ask.delay;
        async move {
            let worked = {
                let _worker = match &pod.workers {
                    Some(w) => w.acquire().await.ok(),
                    None => None,
                };
                let t = Instant::now();
                // No timer for `ms=0`: tokio's timer fires on its next 1 ms tick, so a zero
                // sleep would add up to a millisecond and hide the latency a balancer adds
                // (bench/benchkit/replicas.py measures exactly that with `?ms=0`).
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                t.elapsed()
            };
            pod.stats.end(worked);
        }
    });
    // The task never panics; if the runtime is shutting down, there is no one to answer.
    let _ = work.await;

    let mut body = format!(
        "pod={} request={} body_bytes={body_len}\n",
        pod.addr.ip(),
        ask.target
    );
    // `?bytes=N`: a response at least N bytes long (a large result).
    if body.len() < ask.pad {
        body.push_str(&".".repeat(ask.pad - body.len()));
    }
    Ok(respond(pod.addr.ip(), "text/plain", body, ask.close))
}

/// A `200` with `body`; `connection: close` makes hyper close the connection after it.
fn respond(
    ip: IpAddr,
    content_type: &'static str,
    body: String,
    close: bool,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
        headers.insert("x-pod", v);
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// `testkit fakepods`: how many pods to serve, where, and how busy each may get.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ServeOptions {
    /// Address of the first pod; pod i is IP + i (127.0.1.1, 127.0.1.2, …).
    #[arg(long, value_name = "IP", default_value = "127.0.1.1")]
    pub first: Ipv4Addr,
    /// Number of pods.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Port shared by every pod; 0 picks a free one (printed on start).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub port: u16,
    /// Requests each pod works on at once; extra ones wait inside the pod (0 or absent: no
    /// limit).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

impl ServeOptions {
    /// The address of pod `i` (0-based).
    pub fn ip(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first) + i)
    }

    /// Checks what clap cannot: the pods' addresses stay within IPv4.
    pub fn check(&self) -> Result<(), String> {
        match u32::from(self.first).checked_add(self.count - 1) {
            Some(_) => Ok(()),
            None => Err("--first + --count runs past 255.255.255.255".into()),
        }
    }
}

/// Starts the pods of `opts`, all on one port. Must run inside a tokio runtime.
pub async fn start_serving(opts: &ServeOptions) -> std::io::Result<Vec<FakePod>> {
    let workers = opts.workers.filter(|&n| n > 0);
    let first = FakePod::start_with_workers(opts.ip(0).into(), opts.port, workers).await?;
    let port = first.addr.port();
    let mut pods = vec![first];
    for i in 1..opts.count {
        let ip = opts.ip(i);
        let pod = FakePod::start_with_workers(ip.into(), port, workers)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{ip}:{port}: {e}")))?;
        pods.push(pod);
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn stats_count_busy_and_work_time_and_reset() {
        let pod = FakePod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        let slow = |ms: u64| {
            let a = pod.addr;
            tokio::spawn(async move { loadgen::get(a, &format!("/w?ms={ms}"), &[]).await })
        };
        let (a, b) = (slow(200), slow(200));
        assert_eq!(a.await.unwrap().unwrap().status, 200);
        assert_eq!(b.await.unwrap().unwrap().status, 200);

        let r = loadgen::get(pod.addr, "/_stats", &[]).await.unwrap();
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

        let r = loadgen::request(pod.addr, "POST", "/_stats/reset", &[], b"")
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

    /// Sends `raw` on a fresh connection and reads until the pod closes it (bounded).
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the pod closes the connection")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn answers_what_the_tests_and_bench_read() {
        let pod = FakePod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        // Body size, query kept in the echo, x-pod, x-req-id in the arrival log.
        let r = loadgen::request(
            pod.addr,
            "POST",
            "/a/b?task=1&ms=5",
            &[("x-req-id", "r1")],
            &[b'x'; 1000],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            "pod=127.0.0.1 request=POST /a/b?task=1&ms=5 body_bytes=1000\n"
        );
        assert_eq!(r.header("x-pod"), Some("127.0.0.1"));
        assert_eq!(pod.stats.arrivals(), vec!["r1".to_string()]);
        // `x-delay-ms`, and `?bytes=N` padding.
        let r = loadgen::get(pod.addr, "/p?bytes=5000", &[("x-delay-ms", "100")])
            .await
            .unwrap();
        assert_eq!(r.body.len(), 5000);
        assert!(r
            .body
            .starts_with("pod=127.0.0.1 request=GET /p?bytes=5000 body_bytes=0\n"));
        assert!(r.elapsed >= Duration::from_millis(100), "{:?}", r.elapsed);
        // HTTP/1.0 without keep-alive: answered, then closed by the pod.
        let out = exchange(pod.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
        assert!(out.contains(" 200 OK\r\n"), "{out}");
        assert!(out.ends_with("request=GET /old body_bytes=0\n"), "{out}");
        // Keep-alive: two requests on one connection, the second with `connection: close`,
        // after which the pod closes (exchange would time out otherwise).
        let out = exchange(
            pod.addr,
            b"GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(out.matches(" 200 OK\r\n").count(), 2, "{out}");
        assert!(
            out.contains("request=GET /1 ") && out.contains("request=GET /2 "),
            "{out}"
        );
        assert_eq!(pod.stats.started(), 5);
    }

    /// A compute pod does not notice that its client left: the request stays in flight until
    /// its work is done, then counts as finished.
    #[tokio::test]
    async fn a_request_whose_client_left_is_worked_to_the_end() {
        let pod = FakePod::start(IpAddr::from([127, 0, 0, 1]), 0)
            .await
            .unwrap();
        let mut s = TcpStream::connect(pod.addr).await.unwrap();
        s.write_all(b"GET /w?ms=400 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while pod.stats.inflight() == 0 {
            assert!(Instant::now() < deadline, "the request never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Gone abruptly (RST), not just half-closed.
        s.set_zero_linger().unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            pod.stats.inflight(),
            1,
            "still working after the client left"
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!((pod.stats.inflight(), pod.stats.finished()), (0, 1));
        assert!(pod.stats.work() >= Duration::from_millis(400));
    }
}
