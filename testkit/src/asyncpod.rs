//! A fake asynchronous compute pod: `POST /submit?ms=N` starts a job of N ms in the background
//! and answers `202 Accepted` with `Location: /jobs/<id>` at once (or after `accept_ms=M`: the
//! job runs from the submission's arrival); the pod counts its own running jobs (the truth the
//! tests read: lb-agent's counters are not evidence).
//!
//! - `POST /submit?sync_bytes=N`: no job, a `200` with N bytes at once;
//! - `GET /jobs/<id>` (or `/tasks/<id>`): the job's status in the pod's [`Convention`]; `404` for a job this pod
//!   never accepted (counted: a poll that reached the wrong pod);
//! - `GET /jobs/<id>/result`: `200` once done;
//! - `DELETE /jobs/<id>`: cancels it (it stops counting as running), `204`;
//! - with `callback: true`, a finished job `POST`s to the URL lb-agent gave in
//!   `lb-agent-job-callback` (unless its submission said `nocallback=1`: a service that has
//!   no callbacks, in the same run);
//! - with `workers: Some(n)`, the pod works on at most n jobs at once and the others wait inside
//!   it, like a compute pod with n GPUs: a pod given more than its share finishes late (what
//!   bench/'s asyncjobs part measures). A waiting job counts as running: it is the pod's;
//! - `GET /_stats` → the counters as JSON, `POST /_stats/reset` → the same, then zeroed
//!   (`max_running` restarts from the current count).
//!
//! As a process: `testkit asyncpods --first 127.0.1.1 --count 4 [--workers 1] [--callback]`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How the pod says a job is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Convention {
    /// `202` running, `303` to the result when done.
    Redirect,
    /// `202` running, `200` when done.
    NotAccepted,
    /// `200 {"state": "running"}`, then `{"state": "succeeded"}`.
    Json,
    /// The job is named in the submission's JSON answer only (`200 {"task_id": "job:7", …}`,
    /// no `Location`, as docling-serve does); its status at `/tasks/job%3A7` is
    /// `200 {"task_id": "job:7", "state": "running"}`, then `"succeeded"`. The `:` is there so
    /// that the id must be percent-encoded in a path.
    JsonId,
}

#[derive(Debug, Default)]
pub struct AsyncStats {
    pub submitted: AtomicUsize,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub finished: AtomicUsize,
    /// Status requests for a job this pod never accepted.
    pub unknown_polls: AtomicUsize,
    /// Status requests for its own jobs (lb-agent's checks and the clients' polls).
    pub polls: AtomicUsize,
    pub callbacks_sent: AtomicUsize,
    /// Sum of the jobs' service times worked through (cancelled ones included), in ms.
    pub work_ms: AtomicU64,
    /// When the last job finished, in ms since the Unix epoch (0: none yet). bench/ runs on one
    /// machine, so this and its own clock agree: it is the pod's end of a makespan.
    pub last_done_unix_ms: AtomicU64,
}

/// What `GET /_stats` serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AsyncSnapshot {
    pub pod: String,
    pub submitted: usize,
    pub running: usize,
    pub max_running: usize,
    pub finished: usize,
    pub unknown_polls: usize,
    pub polls: usize,
    pub callbacks_sent: usize,
    pub work_ms: u64,
    pub last_done_unix_ms: u64,
}

impl AsyncStats {
    fn snapshot(&self, pod: SocketAddr) -> AsyncSnapshot {
        let n = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        AsyncSnapshot {
            pod: pod.ip().to_string(),
            submitted: n(&self.submitted),
            running: n(&self.running),
            max_running: n(&self.max_running),
            finished: n(&self.finished),
            unknown_polls: n(&self.unknown_polls),
            polls: n(&self.polls),
            callbacks_sent: n(&self.callbacks_sent),
            work_ms: self.work_ms.load(Ordering::SeqCst),
            last_done_unix_ms: self.last_done_unix_ms.load(Ordering::SeqCst),
        }
    }

    /// The counters, then zeroed; `max_running` restarts from the jobs running now.
    fn reset(&self, pod: SocketAddr) -> AsyncSnapshot {
        let before = self.snapshot(pod);
        for a in [
            &self.submitted,
            &self.finished,
            &self.unknown_polls,
            &self.polls,
            &self.callbacks_sent,
        ] {
            a.store(0, Ordering::SeqCst);
        }
        self.work_ms.store(0, Ordering::SeqCst);
        self.last_done_unix_ms.store(0, Ordering::SeqCst);
        self.max_running
            .store(self.running.load(Ordering::SeqCst), Ordering::SeqCst);
        before
    }
}

/// How a fake asynchronous pod behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncOptions {
    pub convention: Convention,
    /// A finished job calls lb-agent back.
    pub callback: bool,
    /// Jobs worked on at once; the others wait inside the pod (`None`: no limit).
    pub workers: Option<usize>,
    /// The pod's first job id. Pods given distinct ranges never share an id, so a poll that
    /// reaches the wrong pod is always a `404`, never another job's status.
    pub first_id: u64,
}

impl AsyncOptions {
    pub fn new(convention: Convention, callback: bool) -> AsyncOptions {
        AsyncOptions {
            convention,
            callback,
            workers: None,
            first_id: 1,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Cancelled,
}

struct Pod {
    addr: SocketAddr,
    convention: Convention,
    callback: bool,
    workers: Option<Arc<Semaphore>>,
    jobs: Mutex<HashMap<u64, State>>,
    next: AtomicUsize,
    stats: Arc<AsyncStats>,
}

pub struct AsyncPod {
    pub addr: SocketAddr,
    pub stats: Arc<AsyncStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AsyncPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AsyncPod {
    pub async fn start(
        addr: SocketAddr,
        convention: Convention,
        callback: bool,
    ) -> std::io::Result<AsyncPod> {
        AsyncPod::start_with(addr, AsyncOptions::new(convention, callback)).await
    }

    pub async fn start_with(addr: SocketAddr, opts: AsyncOptions) -> std::io::Result<AsyncPod> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(AsyncStats::default());
        let pod = Arc::new(Pod {
            addr,
            convention: opts.convention,
            callback: opts.callback,
            workers: opts
                .workers
                .filter(|&n| n > 0)
                .map(|n| Arc::new(Semaphore::new(n))),
            jobs: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(opts.first_id as usize),
            stats: Arc::clone(&stats),
        });
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let pod = Arc::clone(&pod);
                tokio::spawn(async move {
                    let service = service_fn(move |req| serve(req, Arc::clone(&pod)));
                    // A client's half-close (lb-agent's, for a request whose client left) does
                    // not end the exchange: the pod still answers, as most servers do.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .half_close(true)
                        .serve_connection(TokioIo::new(conn), service)
                        .await;
                });
            }
        });
        Ok(AsyncPod { addr, stats, task })
    }
}

fn reply(status: StatusCode, headers: &[(&str, String)], body: String) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, v);
    }
    r.body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn serve(
    req: Request<Incoming>,
    pod: Arc<Pod>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let stats_reply = match (req.method(), path.as_str()) {
        (&Method::GET, "/_stats") => Some(pod.stats.snapshot(pod.addr)),
        (&Method::POST, "/_stats/reset") => Some(pod.stats.reset(pod.addr)),
        _ => None,
    };
    if let Some(snapshot) = stats_reply {
        let body = serde_json::to_string(&snapshot).unwrap_or_default() + "\n";
        return Ok(reply(
            StatusCode::OK,
            &[("content-type", "application/json".into())],
            body,
        ));
    }
    if req.method() == Method::POST && path == "/submit" {
        let param = |name: &str| -> Option<u64> {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        if let Some(n) = param("sync_bytes") {
            // A synchronous answer on the submission path: no job, `n` bytes of body.
            let _ = req.into_body().collect().await;
            return Ok(reply(StatusCode::OK, &[], "x".repeat(n as usize)));
        }
        let ms = param("ms").unwrap_or(1000);
        let accept_ms = param("accept_ms").unwrap_or(0);
        let callback = req
            .headers()
            .get("lb-agent-job-callback")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .filter(|_| param("nocallback") != Some(1));
        let _ = req.into_body().collect().await;
        let id = pod.next.fetch_add(1, Ordering::SeqCst) as u64;
        pod.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, State::Running);
        pod.stats.submitted.fetch_add(1, Ordering::SeqCst);
        let now = pod.stats.running.fetch_add(1, Ordering::SeqCst) + 1;
        pod.stats.max_running.fetch_max(now, Ordering::SeqCst);
        let worker = Arc::clone(&pod);
        tokio::spawn(async move {
            let permit = match &worker.workers {
                Some(w) => Arc::clone(w).acquire_owned().await.ok(),
                None => None,
            };
            let cancelled = |w: &Pod| {
                w.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) != Some(&State::Running)
            };
            if worker.workers.is_some() && cancelled(&worker) {
                // Cancelled while it waited for a worker: it never runs.
                return;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(permit);
            worker.stats.work_ms.fetch_add(ms, Ordering::SeqCst);
            let was = worker
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, State::Done);
            if was == Some(State::Running) {
                worker
                    .stats
                    .last_done_unix_ms
                    .fetch_max(unix_ms(), Ordering::SeqCst);
                worker.stats.running.fetch_sub(1, Ordering::SeqCst);
                worker.stats.finished.fetch_add(1, Ordering::SeqCst);
                if worker.callback {
                    if let Some(url) = callback {
                        if post(&url).await.is_ok() {
                            worker.stats.callbacks_sent.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            } else if let Some(w) = was {
                // Cancelled meanwhile: stays cancelled.
                worker
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, w);
            }
        });
        tokio::time::sleep(Duration::from_millis(accept_ms)).await;
        if pod.convention == Convention::JsonId {
            return Ok(reply(
                StatusCode::OK,
                &[("content-type", "application/json".into())],
                format!(
                    "{{\"task_id\": \"job:{id}\", \"status\": \"pending\", \"queue\": [1, 2]}}"
                ),
            ));
        }
        return Ok(reply(
            StatusCode::ACCEPTED,
            &[("location", format!("/jobs/{id}"))],
            format!("{{\"id\": {id}}}"),
        ));
    }
    let Some(rest) = path
        .strip_prefix("/jobs/")
        .or_else(|| path.strip_prefix("/tasks/"))
    else {
        return Ok(reply(StatusCode::NOT_FOUND, &[], "no such path\n".into()));
    };
    let (id, result) = match rest.strip_suffix("/result") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    // A JSON-id pod names its jobs `job:<n>`, which a path carries as `job%3A<n>`.
    let id = id.strip_prefix("job%3A").unwrap_or(id);
    let state = id.parse::<u64>().ok().and_then(|id| {
        pod.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
            .map(|s| (id, s))
    });
    let Some((id, state)) = state else {
        pod.stats.unknown_polls.fetch_add(1, Ordering::SeqCst);
        return Ok(reply(
            StatusCode::NOT_FOUND,
            &[],
            "no such job here\n".into(),
        ));
    };
    pod.stats.polls.fetch_add(1, Ordering::SeqCst);
    if req.method() == Method::DELETE {
        let mut jobs = pod.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.insert(id, State::Cancelled) == Some(State::Running) {
            pod.stats.running.fetch_sub(1, Ordering::SeqCst);
        }
        return Ok(reply(StatusCode::NO_CONTENT, &[], String::new()));
    }
    if result {
        return Ok(match state {
            State::Done => reply(StatusCode::OK, &[], format!("result of job {id}\n")),
            _ => reply(StatusCode::CONFLICT, &[], "not done\n".into()),
        });
    }
    let running = state == State::Running;
    let word = match state {
        State::Running => "running",
        State::Done => "succeeded",
        State::Cancelled => "canceled",
    };
    Ok(match (pod.convention, running) {
        (Convention::Redirect | Convention::NotAccepted, true) => reply(
            StatusCode::ACCEPTED,
            &[],
            format!("{{\"state\": \"{word}\"}}"),
        ),
        (Convention::Redirect, false) => reply(
            StatusCode::SEE_OTHER,
            &[("location", format!("/jobs/{id}/result"))],
            String::new(),
        ),
        (Convention::NotAccepted, false) => {
            reply(StatusCode::OK, &[], format!("{{\"state\": \"{word}\"}}"))
        }
        (Convention::Json, _) => reply(StatusCode::OK, &[], format!("{{\"state\": \"{word}\"}}")),
        (Convention::JsonId, _) => reply(
            StatusCode::OK,
            &[],
            format!("{{\"task_id\": \"job:{id}\", \"state\": \"{word}\"}}"),
        ),
    })
}

/// `testkit asyncpods`: asynchronous pods for bench/, on IP, IP+1, … sharing one port.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AsyncServeOptions {
    /// Address of the first pod; pod i is IP + i.
    #[arg(long, value_name = "IP", default_value = "127.0.1.1")]
    pub first: std::net::Ipv4Addr,
    /// Number of pods.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..999))]
    pub count: u32,
    /// Port shared by every pod; 0 picks a free one (printed on start).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub port: u16,
    /// Jobs each pod works on at once; the others wait inside the pod (absent: no limit).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// How a pod reports a job's status.
    #[arg(long, value_enum, default_value = "redirect")]
    pub convention: Convention,
    /// A finished job calls back the URL lb-agent gave (unless its submission says
    /// `nocallback=1`).
    #[arg(long)]
    pub callback: bool,
}

impl AsyncServeOptions {
    /// The address of pod `i` (0-based).
    pub fn ip(&self, i: u32) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.first) + i)
    }

    /// Checks what clap cannot: the pods' addresses stay within IPv4.
    pub fn check(&self) -> Result<(), String> {
        match u32::from(self.first).checked_add(self.count - 1) {
            Some(_) => Ok(()),
            None => Err("--first + --count runs past 255.255.255.255".into()),
        }
    }

    /// Pod `i`'s options: its job ids start at (i + 1) × 1,000,000, so no two pods share one.
    fn pod(&self, i: u32) -> AsyncOptions {
        AsyncOptions {
            convention: self.convention,
            callback: self.callback,
            workers: self.workers,
            first_id: (u64::from(i) + 1) * 1_000_000,
        }
    }
}

/// Starts the pods of `opts`, all on one port. Must run inside a tokio runtime.
pub async fn start_serving(opts: &AsyncServeOptions) -> std::io::Result<Vec<AsyncPod>> {
    let first = AsyncPod::start_with((opts.ip(0), opts.port).into(), opts.pod(0)).await?;
    let port = first.addr.port();
    let mut pods = vec![first];
    for i in 1..opts.count {
        let ip = opts.ip(i);
        let pod = AsyncPod::start_with((ip, port).into(), opts.pod(i))
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{ip}:{port}: {e}")))?;
        pods.push(pod);
    }
    Ok(pods)
}

/// One `POST` to `url` (`http://host:port/path`, loopback in the tests).
async fn post(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("no authority")?.to_string();
    let stream = TcpStream::connect(&authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{}", resp.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen;

    async fn submit(pod: SocketAddr, ms: u64) -> String {
        let r = loadgen::request(pod, "POST", &format!("/submit?ms={ms}"), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.body);
        r.header("location").unwrap().to_string()
    }

    async fn stats(pod: SocketAddr) -> serde_json::Value {
        let r = loadgen::get(pod, "/_stats", &[]).await.unwrap();
        assert_eq!(r.status, 200);
        serde_json::from_str(&r.body).unwrap()
    }

    #[tokio::test]
    async fn one_worker_runs_jobs_one_after_another_and_counts_the_waiting_one_as_running() {
        let opts = AsyncOptions {
            workers: Some(1),
            first_id: 2_000_000,
            ..AsyncOptions::new(Convention::Redirect, false)
        };
        let pod = AsyncPod::start_with(([127, 0, 0, 1], 0).into(), opts)
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let a = submit(pod.addr, 150).await;
        let b = submit(pod.addr, 150).await;
        assert_eq!((a.as_str(), b.as_str()), ("/jobs/2000000", "/jobs/2000001"));
        let s = stats(pod.addr).await;
        assert_eq!(
            (s["running"].as_u64(), s["max_running"].as_u64()),
            (Some(2), Some(2))
        );
        // The second job waited for the one worker: both are done only after 2 × 150 ms.
        while stats(pod.addr).await["finished"] != 2 {
            assert!(t0.elapsed() < Duration::from_secs(5), "jobs never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let s = stats(pod.addr).await;
        assert_eq!(
            (s["running"].as_u64(), s["work_ms"].as_u64()),
            (Some(0), Some(300))
        );
        assert!(s["last_done_unix_ms"].as_u64().unwrap() >= unix_ms() - 5_000);
        // A poll for an id this pod never gave is a 404, counted.
        let r = loadgen::get(pod.addr, "/jobs/1000000", &[]).await.unwrap();
        assert_eq!(r.status, 404);
        let r = loadgen::request(pod.addr, "POST", "/_stats/reset", &[], b"")
            .await
            .unwrap();
        let before: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(before["unknown_polls"], 1);
        let s = stats(pod.addr).await;
        assert_eq!(
            (s["finished"].as_u64(), s["max_running"].as_u64()),
            (Some(0), Some(0))
        );
    }

    #[tokio::test]
    async fn a_job_cancelled_while_it_waits_for_a_worker_never_runs() {
        let opts = AsyncOptions {
            workers: Some(1),
            ..AsyncOptions::new(Convention::Redirect, false)
        };
        let pod = AsyncPod::start_with(([127, 0, 0, 1], 0).into(), opts)
            .await
            .unwrap();
        let _first = submit(pod.addr, 300).await;
        let second = submit(pod.addr, 300).await;
        let r = loadgen::request(pod.addr, "DELETE", &second, &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 204);
        let t0 = std::time::Instant::now();
        while stats(pod.addr).await["finished"] != 1 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "first job never finished"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let s = stats(pod.addr).await;
        assert_eq!(
            (
                s["running"].as_u64(),
                s["finished"].as_u64(),
                s["work_ms"].as_u64()
            ),
            (Some(0), Some(1), Some(300))
        );
    }
}
