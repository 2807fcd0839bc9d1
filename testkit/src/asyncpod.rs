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
//!   `lb-agent-job-callback`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// How the pod says a job is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Cancelled,
}

struct Pod {
    convention: Convention,
    callback: bool,
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
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(AsyncStats::default());
        let pod = Arc::new(Pod {
            convention,
            callback,
            jobs: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(1),
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
            .map(str::to_string);
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
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let was = worker
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, State::Done);
            if was == Some(State::Running) {
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
