//! The `ProxyHttp` implementation: route → wait for a slot → proxy → give the slot back.
//!
//! Try it: `cargo run -- demo`, or with a config of your own:
//! `cargo run -- -c conf/config.yaml` then `curl -v localhost:8080/VideoCodecService/VideoCodec`.
//!
//! The slot a request holds lives in its CTX as a [`Slot`] guard. Pingora drops the CTX on every
//! path (success, error, client abort, task cancellation), so the slot is given back exactly once
//! whatever happens; a retry drops the old slot before taking the next one.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{QueuePolicy, UpstreamProtocol};
use crate::live::Live;
use crate::metrics;
use crate::pool::{QueueError, Slot};
use crate::selection::Balancer;
use crate::shutdown::ActiveRequest;

/// What a route resolves to at request time.
pub struct RouteEntry {
    pub uri: String,
    pub balancer: Arc<Balancer>,
    pub queue: QueuePolicy,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
}

/// Seconds a refused client is told to wait before trying again.
const RETRY_AFTER_SECS: u64 = 1;

/// Bodies up to this size are read while the request waits in the queue, so that a client that
/// goes away is noticed (and the body is replayed to the pod from Pingora's retry buffer).
/// It is Pingora's retry-buffer size: a larger body could not be replayed.
const QUEUED_BODY_LIMIT: usize = 64 * 1024;

/// HTTP/2 streams per upstream connection for `h2c` routes. Each call still takes its own slot,
/// so the pod's `limit` bounds the streams in use; this only decides when a second connection
/// to the same pod is opened.
const H2_STREAMS_PER_CONNECTION: usize = 100;

/// gRPC status codes lb-agent answers with itself.
mod grpc_status {
    /// The call can be retried (queue full or timed out, no pod reachable, shutting down).
    pub const UNAVAILABLE: u32 = 14;
    /// No route for the method.
    pub const UNIMPLEMENTED: u32 = 12;
}

pub struct LbProxy {
    live: Arc<Live>,
    max_attempts: usize,
}

impl LbProxy {
    pub fn new(live: Arc<Live>, max_attempts: usize) -> Self {
        Self { live, max_attempts }
    }
}

/// How a request ended, for the log line (and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NoRoute,
    QueueFull,
    QueueTimeout,
    ClientGone,
    UpstreamError,
    ShuttingDown,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoRoute => "no_route",
            Outcome::QueueFull => "queue_full",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ShuttingDown => "shutting_down",
        }
    }
}

pub struct Ctx {
    route: Option<Arc<RouteEntry>>,
    slot: Option<Slot>,
    /// Pods this request failed to connect to; never tried again by this request.
    tried: Vec<SocketAddr>,
    /// The pod of the last attempt, for the log line.
    pod: Option<SocketAddr>,
    /// Connection attempts made (each on its own pod).
    attempts: usize,
    start: Instant,
    queue_wait: Duration,
    /// The queue timeout runs from the first wait; retries do not extend it.
    deadline: Option<tokio::time::Instant>,
    refusal: Option<Refusal>,
    /// A gRPC call: refusals are answered with a gRPC status, not an HTTP error.
    grpc: bool,
    /// Keeps a SIGTERM drain from exiting while this request is being handled.
    _active: ActiveRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoRoute,
    Queue(QueueError),
    ClientGone,
}

/// Completes when the client goes away; never completes otherwise.
///
/// * HTTP/2: the stream's reset (or the connection's end) is signalled directly.
/// * HTTP/1.1 with no body or a small one: the body is read into Pingora's retry buffer (it is
///   replayed to the pod), and reading past it sees the close.
/// * HTTP/1.1 with a large or chunked body: the body stays unread and the TCP state is polled.
async fn client_gone(session: &mut Session) {
    // HTTP/2 tells us directly (RST_STREAM, e.g. a cancelled gRPC call, or the connection
    // closing), without touching the request body, which then streams to the pod as usual.
    if let Some(closed) = session.as_mut().watch_h2_stream_close() {
        let _ = closed.await;
        return;
    }
    let fits = session.as_mut().is_body_empty()
        || session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|n| n <= QUEUED_BODY_LIMIT);
    if !fits {
        // A large or chunked body cannot be buffered for replay: leave it unread and watch the
        // socket's TCP state instead (the kernel knows about a FIN or RST behind unread data).
        return connection_closed(session).await;
    }
    session.as_mut().enable_retry_buffering();
    loop {
        let done = session.as_mut().is_body_done();
        if session.as_mut().read_body_or_idle(done).await.is_err() {
            return;
        }
    }
}

/// How often a queued request with an unread body checks whether its client is still there.
const CLOSE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Completes once the client's TCP connection is closed or half-closed (it sent FIN or RST);
/// never completes if the state cannot be read.
async fn connection_closed(session: &Session) {
    // Linux TCP states (include/net/tcp_states.h).
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    let Some(socket) = session
        .as_downstream()
        .digest()
        .and_then(|d| d.socket_digest.clone())
    else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(CLOSE_CHECK_INTERVAL).await;
        match socket.tcp_info() {
            Some(info) if info.tcpi_state == TCP_CLOSE || info.tcpi_state == TCP_CLOSE_WAIT => {
                return
            }
            Some(_) => {}
            None => return std::future::pending().await,
        }
    }
}

fn text_response(code: u16, body: &str, retry_after: bool) -> pingora::Result<Box<ResponseHeader>> {
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    if retry_after {
        resp.insert_header("retry-after", RETRY_AFTER_SECS.to_string())?;
    }
    resp.insert_header("server", "lb-agent")?;
    Ok(Box::new(resp))
}

/// `grpc-message` is percent-encoded: printable ASCII except `%` goes as it is.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Refuses a gRPC call the way gRPC clients understand: a "trailers-only" response, HTTP 200
/// with `grpc-status` and `grpc-message` in the one and only header block.
async fn write_grpc_status(session: &mut Session, code: u32, message: &str) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(200, Some(4))?;
    resp.insert_header("content-type", "application/grpc")?;
    resp.insert_header("grpc-status", code.to_string())?;
    resp.insert_header("grpc-message", grpc_message(message))?;
    if session.req_header().version < http::Version::HTTP_2 {
        resp.insert_header("content-length", "0")?;
    }
    resp.insert_header("server", "lb-agent")?;
    session.write_response_header(Box::new(resp), true).await
}

fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn write_text(
    session: &mut Session,
    code: u16,
    body: String,
    retry_after: bool,
) -> pingora::Result<()> {
    session
        .write_response_header(text_response(code, &body, retry_after)?, false)
        .await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

#[async_trait]
impl ProxyHttp for LbProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: None,
            slot: None,
            tried: Vec::new(),
            pod: None,
            attempts: 0,
            start: Instant::now(),
            queue_wait: Duration::ZERO,
            deadline: None,
            refusal: None,
            grpc: false,
            _active: self.live.shutdown.request(),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let path = session.req_header().uri.path().to_string();
        ctx.grpc = is_grpc(session);
        if self.live.shutdown.stopping() {
            // Shutdown delay: serve this request, then close the connection, so the client's
            // next request opens a new one, which the updated Service sends to another replica.
            session.set_keepalive(None);
        }
        // The route found here stays with the request, whatever a config reload does meanwhile.
        match self.live.snapshot().routes.lookup(&path) {
            Some(route) => {
                ctx.route = Some(Arc::clone(route));
                Ok(false)
            }
            None => {
                ctx.refusal = Some(Refusal::NoRoute);
                let message = format!("lb-agent: no route for path {path}\n");
                if ctx.grpc {
                    write_grpc_status(session, grpc_status::UNIMPLEMENTED, &message).await?;
                } else {
                    write_text(session, 404, message, false).await?;
                }
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no route in context");
        };
        if ctx.slot.is_none() {
            let deadline = *ctx
                .deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + route.queue.timeout);
            let waited_from = Instant::now();
            let result = {
                let acquire = route.balancer.acquire(&route.queue, deadline, &ctx.tried);
                tokio::pin!(acquire);
                tokio::select! {
                    // A client that is already gone must not be sent to a pod, even if a slot
                    // is free at the same moment.
                    biased;
                    _ = client_gone(session) => Err(Refusal::ClientGone),
                    r = &mut acquire => r.map_err(Refusal::Queue),
                }
            };
            ctx.queue_wait += waited_from.elapsed();
            match result {
                Ok(slot) => ctx.slot = Some(slot),
                Err(refusal) => {
                    ctx.refusal = Some(refusal);
                    let reason = match refusal {
                        Refusal::Queue(q) => q.reason(),
                        Refusal::ClientGone => "client went away while queued",
                        Refusal::NoRoute => "no route",
                    };
                    let mut e = Error::explain(ErrorType::HTTPStatus(503), reason);
                    e.set_retry(false);
                    return Err(e);
                }
            }
        }
        let Some(slot) = ctx.slot.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "slot missing after acquire");
        };
        ctx.pod = Some(slot.addr());
        ctx.attempts += 1;
        if let Some(m) = metrics::get() {
            m.pod_requests
                .with_label_values(&[slot.pool().name(), &slot.addr().to_string()])
                .inc();
        }
        let mut peer = HttpPeer::new(slot.addr(), false, String::new());
        peer.options.connection_timeout = Some(route.connect_timeout);
        if route.protocol == UpstreamProtocol::H2c {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = H2_STREAMS_PER_CONNECTION;
        }
        Ok(Box::new(peer))
    }

    /// Adds the client's address to `X-Forwarded-For`, as the Go agent's reverse proxy did: the
    /// pods see lb-agent's address as the peer, and their logs want the real client.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some(client) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let value = match upstream_request
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => format!("{prior}, {client}"),
            None => client.to_string(),
        };
        upstream_request.insert_header("x-forwarded-for", value)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if let Some(slot) = &ctx.slot {
            slot.pool().report_connected(slot.addr());
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: give the slot back now and let the retry pick another pod.
        if let Some(slot) = ctx.slot.take() {
            let addr = slot.addr();
            slot.pool().report_connect_failure(addr);
            if let Some(m) = metrics::get() {
                m.pod_connect_failures
                    .with_label_values(&[slot.pool().name(), &addr.to_string()])
                    .inc();
            }
            ctx.tried.push(addr);
            log::warn!("connect to pod {addr} failed: {e}");
        }
        let can_retry = ctx.tried.len() < self.max_attempts
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| r.balancer.pool().has_untried(&ctx.tried));
        e.set_retry(can_retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, body, retry_after) = match ctx.refusal {
            Some(Refusal::ClientGone) => (0, String::new(), false),
            Some(Refusal::Queue(QueueError::Full)) => (
                503,
                format!(
                    "lb-agent: queue full: every pod is at its limit and {} requests are already waiting\n",
                    ctx.route.as_ref().map_or(0, |r| r.queue.max_waiting)
                ),
                true,
            ),
            Some(Refusal::Queue(QueueError::Timeout)) => (
                503,
                format!(
                    "lb-agent: queue timeout: no pod had a free slot within {:?}\n",
                    ctx.route.as_ref().map_or(Duration::ZERO, |r| r.queue.timeout)
                ),
                true,
            ),
            Some(Refusal::Queue(QueueError::ShuttingDown)) => (
                503,
                "lb-agent: shutting down; retry on another instance\n".to_string(),
                true,
            ),
            Some(Refusal::Queue(QueueError::NoUntriedPod)) | None | Some(Refusal::NoRoute) => {
                let code = match e.etype() {
                    ErrorType::HTTPStatus(c) => *c,
                    _ => match e.esource() {
                        ErrorSource::Upstream => 502,
                        ErrorSource::Downstream => match e.etype() {
                            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                            _ => 400,
                        },
                        _ => 502,
                    },
                };
                let pod = ctx.pod.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                (code, format!("lb-agent: upstream error (pod {pod}): {}\n", e.etype().as_str()), false)
            }
        };
        // Only while nothing of the response has been sent yet.
        let code = if session.response_written().is_some() {
            0
        } else {
            code
        };
        if code > 0 && ctx.grpc {
            // Every refusal of a call that can go elsewhere is UNAVAILABLE, which gRPC clients
            // retry; the HTTP status must be 200 for them to read it.
            if let Err(err) = write_grpc_status(session, grpc_status::UNAVAILABLE, &body).await {
                log::debug!("could not send the gRPC status: {err}");
            }
        } else if code > 0 {
            if let Err(err) = write_text(session, code, body, retry_after).await {
                log::debug!("could not send the {code} response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let outcome = outcome(ctx, e, status);
        let route = ctx.route.as_ref().map_or("-", |r| r.uri.as_str());
        if let Some(m) = metrics::get() {
            // Unrouted requests share the label "-": request paths must not become labels.
            m.requests
                .with_label_values(&[route, outcome.as_str()])
                .inc();
            if ctx.route.is_some() {
                m.request_duration
                    .with_label_values(&[route])
                    .observe(ctx.start.elapsed().as_secs_f64());
                m.queue_wait
                    .with_label_values(&[route])
                    .observe(ctx.queue_wait.as_secs_f64());
            }
        }
        let pod = ctx.pod.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        log::info!(
            "{} {} route={} pod={} status={} outcome={} queue_wait_ms={} duration_ms={} attempts={}",
            session.req_header().method,
            session.req_header().uri,
            route,
            pod,
            status,
            outcome.as_str(),
            ctx.queue_wait.as_millis(),
            ctx.start.elapsed().as_millis(),
            ctx.attempts,
        );
    }
}

fn outcome(ctx: &Ctx, e: Option<&Error>, status: u16) -> Outcome {
    match ctx.refusal {
        Some(Refusal::NoRoute) => Outcome::NoRoute,
        Some(Refusal::Queue(QueueError::Full)) => Outcome::QueueFull,
        Some(Refusal::Queue(QueueError::Timeout)) => Outcome::QueueTimeout,
        Some(Refusal::ClientGone) => Outcome::ClientGone,
        Some(Refusal::Queue(QueueError::NoUntriedPod)) => Outcome::UpstreamError,
        Some(Refusal::Queue(QueueError::ShuttingDown)) => Outcome::ShuttingDown,
        None if e.is_some() || status >= 500 && ctx.pod.is_none() => Outcome::UpstreamError,
        None => Outcome::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::grpc_message;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message("queue full: 100% busy, ünïcode\n"),
            "queue full: 100%25 busy, %C3%BCn%C3%AFcode"
        );
    }
}
