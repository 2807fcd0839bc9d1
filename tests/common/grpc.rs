//! Real gRPC on both sides of lb-agent: tonic servers as compute pods speaking h2c on
//! 127.0.1.x, and a tonic client on one HTTP/2 connection.
//!
//! Messages are raw bytes ([`RawCodec`]), so no protobuf code generation is needed; the gRPC
//! framing, HTTP/2 streams, trailers and status codes are tonic's own.
//!
//! Methods of `lbtest.Work`:
//! * `Run` (unary): the request is a delay in ms as ASCII; the pod sleeps, then answers
//!   `pod=<ip>`.
//! * `Fail` (unary): answers `NOT_FOUND` with the message `no such model`.
//! * `Busy` (unary): like `Run`, but the work cannot be interrupted (a GPU job, a handler
//!   thread of a synchronous server): it runs to its end and counts as in flight although the
//!   client cancels or the call's deadline ends the stream first.
//! * `Stream` (server streaming): the request is `<count>x<ms>`; sends `count` messages, one
//!   every `ms`.
//! * `Hang` (unary): never answers (a stuck worker); the call ends only when it is cancelled.
//!
//! Each pod records in-flight calls (a stream counts until it ends), their maximum, and the
//! `x-req-id` metadata of every call in arrival order (reusing the HTTP fake pod's stats).
#![allow(dead_code)]

use bytes::{Buf, BufMut, Bytes};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use testkit::fakepod::PodStats;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub const RUN: &str = "/lbtest.Work/Run";
pub const FAIL: &str = "/lbtest.Work/Fail";
pub const BUSY: &str = "/lbtest.Work/Busy";
pub const STREAM: &str = "/lbtest.Work/Stream";
pub const HANG: &str = "/lbtest.Work/Hang";

/// Passes message bytes through unchanged.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// Counts a call as in flight until dropped.
struct InFlight(Arc<PodStats>);

impl InFlight {
    fn enter(stats: &Arc<PodStats>, id: Option<String>) -> InFlight {
        let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_inflight.fetch_max(now, Ordering::SeqCst);
        stats.started.fetch_add(1, Ordering::SeqCst);
        if let Some(id) = id {
            stats.arrivals.lock().unwrap().push(id);
        }
        InFlight(Arc::clone(stats))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// `(x-req-id, grpc-timeout)` of each call that carried a `grpc-timeout`, in arrival order.
pub type Deadlines = Arc<Mutex<Vec<(String, String)>>>;

/// `(x-req-id, te)` of every call, in arrival order (`te` empty when absent).
pub type TeSeen = Arc<Mutex<Vec<(String, String)>>>;

#[derive(Clone)]
struct WorkService {
    ip: IpAddr,
    stats: Arc<PodStats>,
    deadlines: Deadlines,
    te: TeSeen,
}

impl NamedService for WorkService {
    const NAME: &'static str = "lbtest.Work";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MessageStream = Pin<Box<dyn futures::Stream<Item = Result<Bytes, Status>> + Send>>;

fn req_id<T>(req: &tonic::Request<T>) -> Option<String> {
    req.metadata()
        .get("x-req-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Run(WorkService);

impl UnaryService<Bytes> for Run {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let _busy = InFlight::enter(&svc.stats, req_id(&req));
            if let Some(t) = req.metadata().get("grpc-timeout") {
                let id = req_id(&req).unwrap_or_default();
                let t = t.to_str().unwrap_or_default().to_string();
                svc.deadlines.lock().unwrap().push((id, t));
            }
            // The delay is the first word; the rest is padding (a large request message).
            let ms: u64 = text(req.get_ref())
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(tonic::Response::new(Bytes::from(format!("pod={}", svc.ip))))
        })
    }
}

struct Busy(WorkService);

impl UnaryService<Bytes> for Busy {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let svc = self.0.clone();
        let busy = InFlight::enter(&svc.stats, req_id(&req));
        let ms: u64 = text(req.get_ref()).trim().parse().unwrap_or(0);
        // Detached: dropping the handler (cancel, deadline) does not stop the work.
        let work = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            drop(busy);
        });
        Box::pin(async move {
            let _ = work.await;
            Ok(tonic::Response::new(Bytes::from(format!("pod={}", svc.ip))))
        })
    }
}

struct Fail(WorkService);

impl UnaryService<Bytes> for Fail {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let _busy = InFlight::enter(&svc.stats, req_id(&req));
            Err(Status::not_found("no such model"))
        })
    }
}

struct Hang(WorkService);

impl UnaryService<Bytes> for Hang {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            // Counted until the call is cancelled (tonic drops this future on RST_STREAM).
            let _busy = InFlight::enter(&svc.stats, req_id(&req));
            std::future::pending().await
        })
    }
}

struct Streamer(WorkService);

impl ServerStreamingService<Bytes> for Streamer {
    type Response = Bytes;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<Result<tonic::Response<MessageStream>, Status>>;
    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let busy = InFlight::enter(&svc.stats, req_id(&req));
            let spec = text(req.get_ref());
            let (count, ms) = spec
                .split_once('x')
                .and_then(|(c, m)| Some((c.parse::<usize>().ok()?, m.parse::<u64>().ok()?)))
                .ok_or_else(|| Status::invalid_argument("want <count>x<ms>"))?;
            let ip = svc.ip;
            // The in-flight guard lives in the stream's state: it ends with the stream.
            let stream = futures::stream::unfold((0, busy), move |(i, busy)| async move {
                if i == count {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Some((
                    Ok(Bytes::from(format!("pod={ip} message={i}"))),
                    (i + 1, busy),
                ))
            });
            Ok(tonic::Response::new(Box::pin(stream) as MessageStream))
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for WorkService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let svc = self.clone();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let seen = (header("x-req-id"), header("te"));
        svc.te.lock().unwrap().push(seen);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            let resp = match req.uri().path() {
                RUN => grpc.unary(Run(svc), req).await,
                BUSY => grpc.unary(Busy(svc), req).await,
                FAIL => grpc.unary(Fail(svc), req).await,
                HANG => grpc.unary(Hang(svc), req).await,
                STREAM => grpc.server_streaming(Streamer(svc), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

/// A gRPC pod on `ip:port`; stops when dropped.
pub struct GrpcPod {
    pub addr: SocketAddr,
    pub stats: Arc<PodStats>,
    /// The `grpc-timeout` each `Run` call arrived with.
    pub deadlines: Deadlines,
    /// The `te` header each call arrived with.
    pub te: TeSeen,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts `n` gRPC pods on 127.0.1.`first`, … sharing one port.
pub async fn start_grpc_pods(first: u8, n: usize) -> Vec<GrpcPod> {
    start_grpc_pods_with(first, n, None).await
}

/// [`start_grpc_pods`] whose pods each allow at most `max_streams` concurrent streams per
/// connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), refusing any above it.
pub async fn start_grpc_pods_with(first: u8, n: usize, max_streams: Option<u32>) -> Vec<GrpcPod> {
    let mut pods = Vec::new();
    let mut port = 0;
    for i in 0..n {
        let ip = IpAddr::from([127, 0, 1, first + i as u8]);
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .expect("bind gRPC pod");
        let addr = listener.local_addr().unwrap();
        port = addr.port();
        let stats = Arc::new(PodStats::default());
        let deadlines = Deadlines::default();
        let te = TeSeen::default();
        let svc = WorkService {
            ip,
            stats: Arc::clone(&stats),
            deadlines: Arc::clone(&deadlines),
            te: Arc::clone(&te),
        };
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .max_concurrent_streams(max_streams)
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        pods.push(GrpcPod {
            addr,
            stats,
            deadlines,
            te,
            task,
        });
    }
    pods
}

/// A client channel to lb-agent on exactly one HTTP/2 connection; `connections` counts the
/// connections it opened.
pub struct Client {
    pub channel: Channel,
    pub connections: Arc<AtomicUsize>,
}

pub async fn connect(addr: SocketAddr) -> Client {
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connect gRPC client");
    Client {
        channel,
        connections,
    }
}

/// One unary call; `Ok(body)` or the gRPC status.
pub async fn unary(
    channel: Channel,
    path: &'static str,
    body: &str,
    id: &str,
) -> Result<String, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::new(Code::Unknown, format!("channel not ready: {e}")))?;
    let mut req = tonic::Request::new(Bytes::from(body.to_string()));
    req.metadata_mut()
        .insert("x-req-id", id.parse().expect("ascii id"));
    let resp = client
        .unary(req, http::uri::PathAndQuery::from_static(path), RawCodec)
        .await?;
    Ok(text(resp.get_ref()))
}

/// A server-streaming call; all messages, or the gRPC status.
pub async fn stream(channel: Channel, body: &str, id: &str) -> Result<Vec<String>, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client
        .ready()
        .await
        .map_err(|e| Status::new(Code::Unknown, format!("channel not ready: {e}")))?;
    let mut req = tonic::Request::new(Bytes::from(body.to_string()));
    req.metadata_mut()
        .insert("x-req-id", id.parse().expect("ascii id"));
    let mut messages = client
        .server_streaming(req, http::uri::PathAndQuery::from_static(STREAM), RawCodec)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = messages.message().await? {
        out.push(text(&m));
    }
    Ok(out)
}

/// The grpcio release the second-implementation tests run against.
const GRPCIO: &str = "grpcio==1.85.1";

/// Python with grpcio (the gRPC C-core, via PyPI), in a virtualenv made once under the test
/// target dir (see [`super::venv_python`]).
pub fn grpcio_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| super::venv_python("grpcio-venv", GRPCIO, "grpc"))
        .clone()
}

/// One unary call with grpcio through `tests/grpc_client.py`: the status code name (`OK`,
/// `UNAVAILABLE`, ...) and the details (the reply body when `OK`). The call's deadline is
/// `timeout`, or 20 s, which also bounds how long the client process can run.
pub async fn grpcio_call(
    addr: SocketAddr,
    method: &str,
    body: &str,
    id: &str,
    timeout: Option<Duration>,
) -> (String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_client.py");
    let timeout = timeout.unwrap_or(Duration::from_secs(20)).as_secs_f64();
    let args = [
        script.display().to_string(),
        addr.to_string(),
        method.to_string(),
        body.to_string(),
        "--id".to_string(),
        id.to_string(),
        "--timeout".to_string(),
        timeout.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(grpcio_python())
            .args(args)
            .output()
            .expect("run grpcio client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.trim();
    let (code, details) = line.split_once(' ').unwrap_or((line, ""));
    (code.to_string(), details.to_string())
}

/// What [`raw_call`] saw of a response.
#[derive(Debug)]
pub struct RawReply {
    /// The HTTP status: 200 for any gRPC status, refusals included.
    pub http_status: u16,
    /// `grpc-status`, from the header block or the trailers.
    pub grpc_status: Option<String>,
    pub grpc_message: Option<String>,
    /// The HEADERS frame ended the stream (END_STREAM): a proper Trailers-Only response.
    pub trailers_only: bool,
}

/// One unary gRPC call made by hand over a fresh h2c connection with hyper, with
/// `grpc-timeout: <grpc_timeout>`. Unlike tonic and grpcio, nothing here cancels the call when
/// that deadline passes, so only the server side can honour it; and it reports whether the
/// response's HEADERS frame carried END_STREAM.
pub async fn raw_call(
    addr: SocketAddr,
    path: &str,
    body: &str,
    id: &str,
    grpc_timeout: &str,
) -> RawReply {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Body as _;
    let mut sender = super::h2c_client(addr).await;
    // A gRPC message: uncompressed flag, 4-byte big-endian length, the bytes.
    let mut msg = vec![0u8];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes());
    msg.extend_from_slice(body.as_bytes());
    let req = http::Request::post(format!("http://lb-agent{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .header("x-req-id", id)
        .body(Full::new(Bytes::from(msg)))
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 response");
    let http_status = resp.status().as_u16();
    let trailers_only = resp.body().is_end_stream();
    let header = |h: &http::HeaderMap, name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut grpc_status = header(resp.headers(), "grpc-status");
    let mut grpc_message = header(resp.headers(), "grpc-message");
    let collected = resp.into_body().collect().await.expect("response body");
    if let Some(trailers) = collected.trailers() {
        grpc_status = grpc_status.or_else(|| header(trailers, "grpc-status"));
        grpc_message = grpc_message.or_else(|| header(trailers, "grpc-message"));
    }
    RawReply {
        http_status,
        grpc_status,
        grpc_message,
        trailers_only,
    }
}

/// A gRPC pod made with the h2 crate that is strict about streams, as gRPC's C-core
/// (grpcio) is: it advertises `max_streams` concurrent streams per connection and refuses any
/// stream above that at once (`RST_STREAM(REFUSED_STREAM)`: not processed, RFC 9113 §8.7),
/// even before the client has seen its SETTINGS. With `refuse_first`, it also refuses the very
/// first stream it is sent. Every call it takes is answered `OK pod=strict` after `work`.
/// Counts what it refused, what it served, and the most calls it ran at once.
pub struct StrictPod {
    pub addr: SocketAddr,
    pub refused: Arc<AtomicUsize>,
    pub stats: Arc<PodStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StrictPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_strict_pod(
    last: u8,
    max_streams: usize,
    refuse_first: bool,
    work: Duration,
) -> StrictPod {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 1, last], 0)))
        .await
        .expect("bind strict pod");
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(PodStats::default());
    let first = Arc::new(std::sync::atomic::AtomicBool::new(refuse_first));
    let (r, st) = (Arc::clone(&refused), Arc::clone(&stats));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (r, st, first) = (Arc::clone(&r), Arc::clone(&st), Arc::clone(&first));
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(max_streams as u32)
                    .handshake::<_, Bytes>(tcp)
                    .await
                else {
                    return;
                };
                let open = Arc::new(AtomicUsize::new(0));
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if first.swap(false, Ordering::SeqCst)
                        || open.load(Ordering::SeqCst) >= max_streams
                    {
                        r.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    open.fetch_add(1, Ordering::SeqCst);
                    let busy = InFlight::enter(&st, None);
                    let open = Arc::clone(&open);
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        tokio::time::sleep(work).await;
                        drop(busy);
                        let head = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        if let Ok(mut send) = respond.send_response(head, false) {
                            let msg = b"pod=strict";
                            let mut frame = vec![0u8];
                            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                            frame.extend_from_slice(msg);
                            let _ = send.send_data(Bytes::from(frame), false);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let _ = send.send_trailers(trailers);
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
    });
    StrictPod {
        addr,
        refused,
        stats,
        task,
    }
}
