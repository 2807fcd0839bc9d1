//! The `ProxyHttp` implementation: route → wait for a slot → proxy → give the slot back.
//!
//! Try it: `cargo run --release -p testkit -- demo`, or with a config of your own:
//! `cargo run -- -c conf/config.yaml` then `curl -v localhost:8080/VideoCodecService/VideoCodec`.
//!
//! The slot a request holds lives in its CTX as a [`Slot`] guard. Pingora drops the CTX on every
//! path (success, error, client abort, task cancellation), so the slot is given back exactly once
//! whatever happens; a retry drops the old slot before taking the next one.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::abandoned::{self, Abandoned, BodyFraming, ResponseEnd, Seen, UpstreamSocket};
use crate::abandoned_h2::{self, ClientLeft};
use crate::balance::{Arrival, QueueError, Slot};
use crate::config::{ClientAbort, ClientLimits, UpstreamProtocol};
use crate::front;
use crate::jobs;
use crate::live::Live;
use crate::metrics;
use crate::respond::{
    format_grpc_timeout, grpc_status, grpc_timeout, is_grpc, write_grpc_status, write_text,
};
use crate::response_buffer;
use crate::route::RouteEntry;
use crate::stopping::ActiveRequest;

/// Bodies up to this size are read while the request waits in the queue, so that a client that
/// goes away is noticed (and the body is replayed to the pod from Pingora's retry buffer).
/// It is Pingora's retry-buffer size: a larger body could not be replayed.
const QUEUED_BODY_LIMIT: usize = 64 * 1024;

/// HTTP/2 streams per upstream connection for `h2c` routes: one. Pingora's connector reads a
/// new connection's stream limit before the pod's SETTINGS arrive (pingora-core 0.9.1
/// `connectors/http/v2.rs`), so with more, a burst opens more streams on one connection than a
/// pod that allows fewer (`max_concurrent_streams`) accepts, and the pod refuses them. One
/// stream per connection is what every HTTP/2 server accepts; the pod's `limit` (a handful of
/// compute calls) bounds the connections, which are pooled and reused.
const H2_STREAMS_PER_CONNECTION: usize = 1;

/// How many times one request may find its pooled pod connection already closed by the pod
/// and go on to another connection. Not connection attempts (`max_attempts` counts those):
/// nothing was sent, and a pod that closed several idle connections at once (it is shutting
/// down) can leave that many in the pool.
pub const STALE_CONNECTION_RETRIES: usize = 8;

/// How long a pod that made no progress for `upstream_timeout` keeps its slot after its
/// connection was closed (or its stream reset): time for the pod to see the cancellation
/// before the next request reaches it.
const CANCEL_SETTLE: Duration = Duration::from_millis(100);

mod job_requests;
use job_requests::{JobPlace, JOB_ANSWER_LIMIT, JOB_STATUS_BODY_LIMIT};

pub struct LbProxy {
    live: Arc<Live>,
    max_attempts: usize,
    client: ClientLimits,
}

impl LbProxy {
    pub fn new(live: Arc<Live>, max_attempts: usize, client: ClientLimits) -> Self {
        Self {
            live,
            max_attempts,
            client,
        }
    }
}

impl LbProxy {
    fn buffer_bounds(&self) -> response_buffer::Bounds {
        response_buffer::Bounds {
            per_answer: self.client.response_buffer,
            total: self.client.response_buffer_total,
        }
    }
}

/// Whether a final answer with this status, to this request, carries a body (not a `HEAD`,
/// `204` or `304`, and not a `101` switch to another protocol).
fn answer_has_body(session: &Session, status: u16) -> bool {
    status >= 200
        && status != 204
        && status != 304
        && session.req_header().method != http::Method::HEAD
}

/// The answer's `Content-Length`, when it has exactly one that is a number (several, or one
/// that is not a number, and Pingora's reader decides; lb-agent then only streams). A
/// `Transfer-Encoding` overrides any length (RFC 9112 §6.3): none then.
fn content_length(head: &pingora::http::ResponseHeader) -> Option<usize> {
    if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    let mut values = head.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
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
    BadRequest,
    DeadlineExceeded,
    /// The pod made no progress for the route's `upstream_timeout`.
    PodTimeout,
    /// The pod answered, with an error of its own: an HTTP status of 500 or more, or a gRPC
    /// status other than `OK` (in the response head or its trailers). The request was served
    /// as the pod wanted, but a dashboard that counted it `ok` would hide a failing pod.
    PodError,
    /// A job handle (`/_lb/jobs/…`) refused by lb-agent itself: forged or altered, a method
    /// other than GET/HEAD/DELETE, its route no longer asynchronous, or its pod gone.
    JobRefused,
    /// A pod's completion callback for a job (`/_lb/job-done/…`), answered by lb-agent.
    JobCallback,
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
            Outcome::BadRequest => "bad_request",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::PodTimeout => "pod_timeout",
            Outcome::PodError => "pod_error",
            Outcome::JobRefused => "job_refused",
            Outcome::JobCallback => "job_callback",
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
    /// And a retry keeps the place in the queue it had.
    arrival: Arrival,
    refusal: Option<Refusal>,
    /// A gRPC call: refusals are answered with a gRPC status, not an HTTP error.
    grpc: bool,
    /// When the gRPC call's own deadline (`grpc-timeout`, counted from its arrival) passes: a
    /// call is not started on a pod after it, and its queue wait ends there.
    grpc_deadline: Option<tokio::time::Instant>,
    /// The pod connection of this attempt, kept so that a request whose client leaves can be
    /// finished on the pod before its slot is freed (`client_abort: finish`).
    upstream_socket: Option<UpstreamSocket>,
    /// Set on an `h2c` route with `client_abort: finish` once the call reached its pod: tells
    /// whether its HTTP/2 client left while the pod's answer was still being read.
    client_left: Option<ClientLeft>,
    /// `100 Continue` was sent to the client (`Expect: 100-continue`); the pod is then not
    /// asked to send its own.
    continued: bool,
    /// How the body of the pod's final response head is framed, once Pingora has passed the
    /// head on (kept only with `upstream_socket`): where the drain of an abandoned request
    /// resumes.
    response_framing: Option<BodyFraming>,
    /// The pod's answer was an error of its own (see [`Outcome::PodError`]).
    pod_error: bool,
    /// This attempt's pooled connection had been closed by the pod before the request was
    /// written (see [`crate::pooled`]); how many times that happened to this request.
    stale_connection: bool,
    stale_connections: usize,
    /// This attempt's HTTP/1.1 connection was reused: what the pod had acknowledged before the
    /// request was written, until the pod's answer begins (see [`crate::pooled::Reused`]).
    #[cfg(target_os = "linux")]
    reused: Option<crate::pooled::Reused>,
    /// The previous attempt's connection ended with the pod's FIN before any of the request
    /// was acknowledged: the retry waits for the reset that proves the pod never read it.
    #[cfg(target_os = "linux")]
    crossed: Option<crate::pooled::Reused>,
    /// A client's request on a job handle (`/_lb/jobs/…`): it goes to the job's pod and path,
    /// without a slot (see [`crate::jobs`]).
    job_poll: Option<JobPoll>,
    /// On an `async` route: the id the job will have if the pod accepts one (its completion
    /// callback names it).
    job_id: Option<u128>,
    /// A job status answer being read to judge its JSON state.
    job_body: Option<Vec<u8>>,
    /// A submission's answer being read for the job id it names in JSON (`async.job_id`).
    job_answer: Option<Vec<u8>>,
    /// The pod's answer is read whole before it is passed on (see [`crate::response_buffer`]);
    /// its memory is counted until the request ends.
    response_buffer: Option<response_buffer::Reservation>,
    /// Keeps a SIGTERM drain from exiting while this request is being handled.
    _active: ActiveRequest,
}

struct JobPoll {
    handle: jobs::Handle,
    /// The path and query asked of the pod: the handle's, with what followed the token in the
    /// client's path (`/result`) and the client's query.
    target: String,
    /// The handle's own path, asked with its own query: the answer is the job's status (a
    /// result next to it, or another query, says nothing about the job).
    is_status: bool,
    /// The handle's own path, whatever the query: a `DELETE` there cancels the job (one on a
    /// result next to it does not).
    is_job_path: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoRoute,
    Queue(QueueError),
    ClientGone,
    BadRequest,
    /// The gRPC call's deadline passed before it got a slot.
    Deadline,
    /// See [`Outcome::JobRefused`].
    JobRefused,
    /// See [`Outcome::JobCallback`].
    JobCallback,
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
    let fits = body_fits_retry_buffer(session);
    let socket = session
        .as_downstream()
        .digest()
        .and_then(|d| d.socket_digest.clone());
    if !fits {
        // A large or chunked body cannot be buffered for replay: leave it unread and watch the
        // socket's TCP state instead (the kernel knows about a FIN or RST behind unread data).
        return connection_closed(socket).await;
    }
    let read = read_past_body(session);
    // Reading past the body sees the close, unless the client pipelined its next request:
    // Pingora keeps those bytes for it and stops reading, and the TCP state tells instead.
    tokio::select! {
        _ = read => {}
        _ = connection_closed(socket) => {}
    }
}

/// Whether the request body (none, or a small one) is read into Pingora's retry buffer while
/// the request waits, which is how an HTTP/1.1 client's close is seen (see [`client_gone`]).
fn body_fits_retry_buffer(session: &mut Session) -> bool {
    session.as_mut().is_body_empty()
        || session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|n| n <= QUEUED_BODY_LIMIT)
}

/// [`client_gone`]'s first look, without waiting: what it would find on its first poll (a
/// reset HTTP/2 stream, or an HTTP/1.1 client's close read past its small body), with no
/// timer set. A request that gets a slot at once is checked with this alone: the timer that
/// watches a pipelining or large-body client's TCP state costs every request a timer
/// registration and a wake-up of the runtime's driver, and its first check would come only
/// after [`CLOSE_CHECK_FIRST`] anyway.
fn client_already_gone(session: &mut Session) -> bool {
    use futures::FutureExt;
    if let Some(closed) = session.as_mut().watch_h2_stream_close() {
        return closed.now_or_never().is_some();
    }
    if !body_fits_retry_buffer(session) {
        return false;
    }
    read_past_body(session).now_or_never().is_some()
}

/// Reads a small request body into Pingora's retry buffer (it is replayed to the pod) and then
/// past it: ends when the client's side of the connection ends (see [`client_gone`]).
async fn read_past_body(session: &mut Session) {
    session.as_mut().enable_retry_buffering();
    loop {
        let done = session.as_mut().is_body_done();
        if session.as_mut().read_body_or_idle(done).await.is_err() {
            return;
        }
    }
}

/// How soon a queued request first checks its client's TCP state, and the longest between two
/// checks. The checks back off (doubling) because every queued HTTP/1.1 request runs one: at a
/// fixed 250 ms, 10,000 queued requests cost 16 % of a core doing nothing. A client that closes
/// is seen at once anyway (its FIN wakes the body read); the checks are for the clients whose
/// FIN the read cannot see (a pipelined next request stashed, or an unread large body), and
/// for those the backed-off checks notice within a few seconds.
const CLOSE_CHECK_FIRST: Duration = Duration::from_millis(250);
const CLOSE_CHECK_MAX: Duration = Duration::from_secs(4);

/// Completes once the client's TCP connection is closed or half-closed (it sent FIN or RST);
/// never completes if the state cannot be read.
async fn connection_closed(socket: Option<Arc<pingora::protocols::SocketDigest>>) {
    // Linux TCP states (include/net/tcp_states.h).
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    let mut every = CLOSE_CHECK_FIRST;
    loop {
        tokio::time::sleep(every).await;
        every = (every * 2).min(CLOSE_CHECK_MAX);
        match socket.tcp_info() {
            Some(info) if info.tcpi_state == TCP_CLOSE || info.tcpi_state == TCP_CLOSE_WAIT => {
                return
            }
            Some(_) => {}
            None => return std::future::pending().await,
        }
    }
}

/// Refuses what RFC 9112 requires a server to refuse, and normalises the path before routing
/// (see [`crate::path::normalize_path`]). The normalised path is also what the pod receives, so
/// the pod serves the path that was routed, whatever its own normalisation does.
fn check_and_normalize(session: &mut Session) -> Result<(), String> {
    let req = session.req_header();
    // RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without exactly one Host.
    // (HTTP/1.0 may omit it; HTTP/2 carries `:authority` instead.)
    if req.version == http::Version::HTTP_11
        && req.headers.get_all(http::header::HOST).iter().count() != 1
    {
        return Err("an HTTP/1.1 request needs exactly one Host header".into());
    }
    crate::request_rules::check(session.req_header_mut())?;
    let req = session.req_header();
    let path = req.uri.path();
    let normalized = match crate::path::normalize_path(path) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(e) => return Err(e.reason().into()),
    };
    let target = match req.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    // Scheme and authority stay (an HTTP/2 request carries them in its URI).
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|e| format!("invalid path: {e}"))?);
    let uri = http::Uri::from_parts(parts).map_err(|e| format!("invalid path: {e}"))?;
    session.req_header_mut().set_uri(uri);
    Ok(())
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
            arrival: Arrival::default(),
            refusal: None,
            grpc: false,
            grpc_deadline: None,
            upstream_socket: None,
            client_left: None,
            continued: false,
            response_framing: None,
            pod_error: false,
            stale_connection: false,
            stale_connections: 0,
            #[cfg(target_os = "linux")]
            reused: None,
            #[cfg(target_os = "linux")]
            crossed: None,
            job_poll: None,
            job_id: None,
            job_body: None,
            job_answer: None,
            response_buffer: None,
            _active: self.live.shutdown.request(),
        }
    }

    /// The request head is in: from here the `client` limits that apply are the read and write
    /// timeouts (a client that stops reading its response must not hold a slot forever).
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        front::request_started(session);
        session.set_read_timeout(Some(self.client.timeout));
        session.set_write_timeout(Some(self.client.timeout));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        if let Err(reason) = check_and_normalize(session) {
            ctx.refusal = Some(Refusal::BadRequest);
            session.set_keepalive(None);
            write_text(
                session,
                400,
                format!("lb-agent: bad request: {reason}\n"),
                false,
            )
            .await?;
            return Ok(true);
        }
        ctx.grpc = is_grpc(session);
        if ctx.grpc {
            ctx.grpc_deadline = grpc_timeout(session).map(|t| tokio::time::Instant::now() + t);
        }
        if self.live.shutdown.stopping() {
            // Shutdown delay: serve this request, then close the connection, so the client's
            // next request opens a new one, which the updated Service sends to another replica.
            session.set_keepalive(None);
        }
        let path = session.req_header().uri.path();
        if let Some(token) = path.strip_prefix(jobs::CALLBACK_PREFIX) {
            let token = token.to_string();
            return self.job_callback(session, ctx, &token).await;
        }
        if let Some(rest) = path.strip_prefix(jobs::PREFIX) {
            let (token, suffix) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let (token, place) = (token.to_string(), JobPlace::Suffix(suffix.to_string()));
            return self.job_request(session, ctx, &token, place).await;
        }
        if let Some((before, token, after)) = jobs::handle_in_path(path) {
            let place = JobPlace::InPlaceOfId {
                before: before.to_string(),
                after: after.to_string(),
            };
            let token = token.to_string();
            return self.job_request(session, ctx, &token, place).await;
        }
        // The route found here stays with the request, whatever a config reload does meanwhile.
        let route = self
            .live
            .snapshot()
            .routes
            .lookup(session.req_header().uri.path())
            .map(Arc::clone);
        match route {
            Some(route) => {
                ctx.route = Some(route);
                Ok(false)
            }
            None => {
                ctx.refusal = Some(Refusal::NoRoute);
                let message = format!(
                    "lb-agent: no route for path {}\n",
                    session.req_header().uri.path()
                );
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
        #[cfg(target_os = "linux")]
        if let Some(crossed) = ctx.crossed.take() {
            if !crossed.reset_after_fin().await {
                log::warn!(
                    "pod {} closed its connection as the request was written, but no reset confirmed that it never read it: not sent again",
                    PodName(ctx.pod)
                );
                let mut e = Error::explain(
                    ErrorType::ConnectionClosed,
                    "the pod closed the connection before answering",
                );
                e.set_retry(false);
                return Err(e);
            }
        }
        if let Some(poll) = &ctx.job_poll {
            // The job holds the pod's slot; asking about it takes none and never waits.
            ctx.pod = Some(poll.handle.pod);
            ctx.attempts += 1;
            return Ok(Box::new(pod_peer(poll.handle.pod, &route)));
        }
        if ctx.slot.is_none() {
            let queue_deadline = *ctx
                .deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + route.queue.timeout);
            // A gRPC call's deadline bounds its wait too: past it, the client has given up
            // (or is about to), so the pod's work would be thrown away.
            let deadline = ctx
                .grpc_deadline
                .map_or(queue_deadline, |d| d.min(queue_deadline));
            let waited_from = Instant::now();
            let result = {
                let acquire =
                    route
                        .balancer
                        .acquire(&route.queue, deadline, &ctx.tried, &mut ctx.arrival);
                tokio::pin!(acquire);
                // A client that is already gone must not be sent to a pod, even if a slot is
                // free at the same moment: it is looked at first, and again while it waits.
                if client_already_gone(session) {
                    Err(Refusal::ClientGone)
                } else if let Poll::Ready(r) = futures::poll!(&mut acquire) {
                    r.map_err(Refusal::Queue)
                } else {
                    tokio::select! {
                        biased;
                        _ = client_gone(session) => Err(Refusal::ClientGone),
                        r = &mut acquire => r.map_err(Refusal::Queue),
                    }
                }
            };
            ctx.queue_wait += waited_from.elapsed();
            let result = match result {
                Err(Refusal::Queue(QueueError::Timeout)) if deadline < queue_deadline => {
                    Err(Refusal::Deadline)
                }
                // A slot that came free at the deadline itself (or a retry after it) must not
                // start the call: the deadline is checked once more with the slot in hand.
                Ok(_)
                    if ctx
                        .grpc_deadline
                        .is_some_and(|d| d <= tokio::time::Instant::now()) =>
                {
                    Err(Refusal::Deadline)
                }
                other => other,
            };
            match result {
                // During the drain, a request that could not finish before the deadline is
                // not started (its work would be cut, its client left without an answer).
                Ok(slot)
                    if !self
                        .live
                        .shutdown
                        .may_start(|| route.balancer.view().longest_recent_hold) =>
                {
                    drop(slot);
                    ctx.refusal = Some(Refusal::Queue(QueueError::ShuttingDown));
                    let mut e = Error::explain(
                        ErrorType::HTTPStatus(503),
                        "shutting down: too little time left to finish",
                    );
                    e.set_retry(false);
                    return Err(e);
                }
                Ok(slot) => {
                    ctx.slot = Some(slot);
                    // The client waits for this before it sends its body: sent when the
                    // request has its slot, so a queued upload neither stalls until the
                    // client's own fallback timer nor is buffered while it waits.
                    if !ctx.continued && expects_continue(session.req_header()) {
                        ctx.continued = true;
                        if let Err(e) = session.downstream_session.write_continue_response().await {
                            log::debug!("could not send 100 Continue: {e}");
                        }
                    }
                }
                Err(refusal) => {
                    ctx.refusal = Some(refusal);
                    let reason = match refusal {
                        Refusal::Queue(q) => q.reason(),
                        Refusal::ClientGone => "client went away while queued",
                        Refusal::Deadline => "grpc-timeout passed while queued",
                        Refusal::NoRoute => "no route",
                        Refusal::BadRequest => "bad request",
                        Refusal::JobRefused => "job handle refused",
                        Refusal::JobCallback => "job callback",
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
        Ok(Box::new(pod_peer(slot.addr(), &route)))
    }

    /// Adds the client's address to `X-Forwarded-For`, as the Go agent's reverse proxy did: the
    /// pods see lb-agent's address as the peer, and their logs want the real client. Lowers a
    /// gRPC call's `grpc-timeout` by the time it spent here.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if ctx.continued {
            upstream_request.remove_header(&http::header::EXPECT);
        }
        // Only lb-agent names a job's callback: a client's own would be a forgery.
        upstream_request.remove_header(&CALLBACK_HEADER);
        if let Some(poll) = &ctx.job_poll {
            upstream_request.set_uri(
                poll.target
                    .parse()
                    .map_err(|_| Error::explain(ErrorType::InternalError, "bad job path"))?,
            );
        } else if ctx.route.as_ref().is_some_and(|r| r.async_jobs.is_some()) {
            let job = *ctx
                .job_id
                .get_or_insert_with(|| self.live.jobs.keys.new_job());
            let base = ctx
                .route
                .as_ref()
                .and_then(|r| r.async_jobs.as_ref())
                .and_then(|a| a.callback_base.clone())
                .or_else(|| {
                    session
                        .server_addr()
                        .and_then(|a| a.as_inet())
                        .map(|here| format!("http://{here}"))
                });
            if let Some(base) = base {
                let url = format!(
                    "{base}{}{}",
                    jobs::CALLBACK_PREFIX,
                    self.live.jobs.keys.mint_callback(job)
                );
                upstream_request.insert_header(jobs::CALLBACK_HEADER, url)?;
            }
        }
        let finish = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.client_abort == ClientAbort::Finish);
        if finish {
            // The pod's work is not cut short when its client leaves, and its slot is held
            // until the pod ends the call's stream: a deadline would make the pod's gRPC server
            // end the stream at that moment while its handler works on, and the slot would go
            // to the next call on top of it.
            upstream_request.remove_header(&GRPC_TIMEOUT);
        } else if let Some(deadline) = ctx.grpc_deadline {
            // The pod is told the time the call has left, not the time it had when it reached
            // lb-agent: after a queue wait, the unchanged grpc-timeout would let the pod work
            // on past the moment the client gave up.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            upstream_request.insert_header("grpc-timeout", format_grpc_timeout(left))?;
        }
        // Pingora drops `te` (hop-by-hop) when it turns a request into HTTP/2 for the pod, but
        // `te: trailers` is the one value HTTP/2 allows, and gRPC servers refuse calls without
        // it. Its presence is what matters, so the constant is sent, never the client's value.
        if ctx
            .route
            .as_ref()
            .is_some_and(|r| r.protocol == UpstreamProtocol::H2c)
            && (ctx.grpc || client_accepts_trailers(session.req_header()))
        {
            upstream_request.insert_header(http::header::TE, "trailers")?;
        }
        let Some(client) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let mut text = [0u8; 39];
        let client = ip_text(client, &mut text);
        let value = match upstream_request
            .headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => http::HeaderValue::from_str(&format!("{prior}, {client}")),
            None => http::HeaderValue::from_str(client),
        }
        .map_err(|_| Error::explain(ErrorType::InternalError, "bad X-Forwarded-For"))?;
        upstream_request.insert_header(X_FORWARDED_FOR.clone(), value)
    }

    /// An HTTP/2 client often ends its request body with an empty DATA frame carrying
    /// END_STREAM. Pingora writes that empty piece to an HTTP/1.1 pod as a chunk of size 0 —
    /// which *is* the chunked terminator — and then the terminator again: the second one stays
    /// on the kept-alive pod connection and reads as a request line `0` (a response desync for
    /// the next request on it). An empty last piece is no piece: the end is written once.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        _ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if end_of_stream && body.as_ref().is_some_and(bytes::Bytes::is_empty) {
            *body = None;
        }
        Ok(())
    }

    /// The pod has delivered its whole answer: its slot is given back now, whatever the
    /// client's pace. A client that reads slowly (or an HTTP/2 client that grants no window)
    /// must not keep a pod that has finished "busy" and the queue waiting. Pingora runs this
    /// filter on what it has read from the pod before it writes to the client, so an answer
    /// that arrives whole frees the slot at once. A longer answer would pace the pod's reads at
    /// the client's speed: one that fits `client.response_buffer` is held here until its last
    /// piece (see [`crate::response_buffer`]), so that the pod is read at its own speed.
    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<Option<Duration>> {
        if let Some(read) = ctx.job_answer.as_mut() {
            if let Some(b) = body.take() {
                read.extend_from_slice(&b);
            }
            if read.len() > JOB_ANSWER_LIMIT {
                // Too long to name a job: passed on as it is, the rest streams.
                log::warn!(
                    "a submission's answer is longer than {JOB_ANSWER_LIMIT} bytes: not read for a job id"
                );
                *body = ctx.job_answer.take().map(bytes::Bytes::from);
            } else if end_of_stream {
                let answer = ctx.job_answer.take().unwrap_or_default();
                *body = Some(self.take_json_job(ctx, answer));
            }
        }
        if let Some(read) = ctx.job_body.as_mut() {
            if let Some(b) = body {
                if read.len() + b.len() <= JOB_STATUS_BODY_LIMIT {
                    read.extend_from_slice(b);
                }
            }
            if end_of_stream {
                let read = ctx.job_body.take().unwrap_or_default();
                self.judge_job_answer(
                    ctx,
                    session.response_written().map_or(0, |r| r.status.as_u16()),
                    Some(&read),
                );
            }
        }
        if let Some(buffer) = ctx.response_buffer.as_mut() {
            buffer.hold(body, end_of_stream);
            if let Some(whole) = body.as_ref().filter(|_| end_of_stream) {
                // Pingora's write timeout covers one write call: the held answer goes out in
                // one, and a slow client must get the time it had for it in pieces.
                session.set_write_timeout(Some(response_buffer::write_timeout(
                    self.client.timeout,
                    whole.len(),
                )));
            }
        }
        if end_of_stream {
            drop(ctx.slot.take());
        }
        Ok(None)
    }

    /// A gRPC pod's status arrives in its trailers (or, for an error without a message body,
    /// in the response head: "trailers-only").
    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        upstream_trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        ctx.pod_error |= grpc_status_is_error(upstream_trailers);
        Ok(())
    }

    /// Pingora's HTTP/1.1 client does not read a pod's trailers (pingora-core 0.9.1), so the
    /// `Trailer:` header that announces them is not passed on: the client would wait for (or
    /// fail on) trailers that never come. Trailers pass on `h2c` routes only.
    ///
    /// Also notes how the final response's body is framed, for the drain that takes over if
    /// the client leaves before the body is read (`client_abort: finish`), and whether the
    /// pod answered with an error of its own.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // The pod answered: whatever fails from here on, it had the request.
        #[cfg(target_os = "linux")]
        {
            ctx.reused = None;
        }
        self.follow_job(session, upstream_response, ctx).await;
        let status = upstream_response.status.as_u16();
        if status >= 200 {
            ctx.pod_error = status >= 500 || grpc_status_is_error(&upstream_response.headers);
        }
        if ctx.upstream_socket.is_some() && (status >= 200 || status == 101) {
            ctx.response_framing = Some(BodyFraming::of(
                session.req_header().method == http::Method::HEAD,
                status,
                upstream_response
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes())),
            ));
        }
        if ctx
            .route
            .as_ref()
            .is_some_and(|r| r.protocol == UpstreamProtocol::Http1)
        {
            upstream_response.remove_header(&http::header::TRAILER);
        }
        // Held answers: HTTP/1.1 pods only. An h2c pod's answer can end with trailers, and then
        // its last body piece is not marked as the last, so a held answer would never be
        // passed on.
        if ctx.job_answer.is_some() {
            // Read whole here (the job id in it becomes the job's handle, of another length):
            // passed on without a length, so chunked to an HTTP/1.1 client. The framing noted
            // above is still the pod's.
            upstream_response.remove_header(&http::header::CONTENT_LENGTH);
        } else if ctx.slot.is_some()
            && answer_has_body(session, status)
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| r.protocol == UpstreamProtocol::Http1)
        {
            ctx.response_buffer =
                content_length(upstream_response).and_then(|len| self.buffer_bounds().reserve(len));
        }
        Ok(())
    }

    /// A pooled connection the pod has already closed is not used: nothing has been written
    /// yet, so the request fails here and [`Self::error_while_proxy`] sends it on another
    /// connection (see [`crate::pooled`]).
    async fn connected_to_upstream(
        &self,
        session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        ctx.stale_connection = false;
        #[cfg(target_os = "linux")]
        {
            ctx.reused = None;
        }
        let http2 = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.protocol == UpstreamProtocol::H2c);
        #[cfg(unix)]
        if reused && crate::pooled::closed_by_pod(_fd, http2) {
            ctx.stale_connection = true;
            if http2 {
                // Pingora puts an HTTP/2 connection back in its pool after this error and
                // sees it closed only once its driver task has read the end: shut it now,
                // and let the driver run, or the retry takes the same connection again.
                // SAFETY: `_fd` is the connection's open socket; shutting it down is what
                // the pod already did.
                unsafe { libc::shutdown(_fd, libc::SHUT_RDWR) };
                tokio::task::yield_now().await;
            }
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "the pod had closed this pooled connection before the request was written",
            );
        }
        if let Some(slot) = &ctx.slot {
            slot.connected();
        }
        // An HTTP/2 connection to a pod carries other calls too; only an HTTP/1.1 connection
        // belongs to this request alone and can be finished on its own.
        ctx.response_framing = None;
        ctx.upstream_socket = None;
        let finish = !http2
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| r.client_abort == ClientAbort::Finish);
        // What needs the socket after Pingora may have dropped it (the reuse proof of a reused
        // HTTP/1.1 connection, the finish of an abandoned request) shares one duplicate and one
        // TCP_INFO read: every syscall here is paid by every request.
        #[cfg(unix)]
        if finish || (reused && !http2 && cfg!(target_os = "linux")) {
            if let Some(fd) = abandoned::duplicate(_fd).map(Arc::new) {
                let raw = std::os::fd::AsRawFd::as_raw_fd(&*fd);
                let info = pingora::protocols::l4::ext::get_tcp_info(raw).ok();
                #[cfg(target_os = "linux")]
                if reused {
                    ctx.reused = info
                        .as_ref()
                        .and_then(|i| crate::pooled::Reused::with(Arc::clone(&fd), i));
                }
                if finish {
                    ctx.upstream_socket = Some(UpstreamSocket::with(fd, info.as_ref()));
                }
            }
        }
        // On HTTP/2 the pod's stream itself is kept: see `abandoned_h2`.
        if ctx.client_left.is_none()
            && ctx.route.as_ref().is_some_and(|r| {
                r.client_abort == ClientAbort::Finish && r.protocol == UpstreamProtocol::H2c
            })
        {
            ctx.client_left = abandoned_h2::stay_for_pod(&mut session.downstream_session);
        }
        Ok(())
    }

    /// Never re-sends a request that reached a pod. Pingora's default retries an idempotent
    /// request when a *reused* connection fails (the pod may have closed it as the request left),
    /// but the pod may also have read it and started the work: for compute pods a duplicate
    /// doubles the cost, and the retry would land on the same pod anyway (the slot is kept).
    /// Connect failures, where nothing was sent, are retried by [`Self::fail_to_connect`]; the
    /// reuse race itself is avoided by `upstream_idle_timeout`, by asking the kernel before
    /// writing ([`crate::pooled::closed_by_pod`]), and, when the pod's FIN still crossed the
    /// request, by the proof that the pod never received it ([`crate::pooled::Reused`]): only
    /// then is an HTTP/1.1 request sent again.
    ///
    /// The one exception is an HTTP/2 stream the pod never processed (RFC 9113 §8.7): refused
    /// with `REFUSED_STREAM`, or above the last stream id of the pod's `GOAWAY`. The pod did
    /// not start it, so it is sent again, on the same pod and slot (a new stream or connection),
    /// as long as nothing of the answer reached the client and the request body can be replayed.
    ///
    /// A pod that made no progress for `upstream_timeout` goes last in the choice for a while,
    /// and its connection is closed at once (Pingora does not reuse it; the duplicate kept for
    /// `client_abort: finish` is dropped here). Its slot is freed with the request.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        if is_pod_timeout(&e) {
            ctx.upstream_socket = None;
            if let Some(slot) = &ctx.slot {
                slot.timed_out();
            }
            log::warn!(
                "pod {} made no progress for {:?} (upstream_timeout): {}; connection closed, slot freed, pod tried last for a while",
                PodName(ctx.pod),
                ctx.route
                    .as_ref()
                    .map_or(Duration::ZERO, |r| r.upstream_timeout),
                e.etype().as_str(),
            );
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        // The pod's end of the connection read as the answer's first bytes (not the client's:
        // a client that leaves must never make a request go out again).
        #[cfg(target_os = "linux")]
        let crossed = match ctx.reused.take() {
            Some(reused)
                if e.etype() == &ErrorType::ConnectionClosed
                    && e.esource() == &ErrorSource::Upstream
                    && session.response_written().is_none()
                    && !session.as_ref().retry_buffer_truncated()
                    && reused.pod_closed_before_receiving() =>
            {
                ctx.crossed = Some(reused);
                log::info!(
                    "pod {} closed its pooled connection as the request was written, before acknowledging any of it; sending it on another connection once its reset confirms the close",
                    PodName(ctx.pod)
                );
                true
            }
            _ => false,
        };
        #[cfg(not(target_os = "linux"))]
        let crossed = false;
        if std::mem::take(&mut ctx.stale_connection) || crossed {
            // The pod never had the request (nothing was written, or its FIN acknowledged none
            // of it): the same pod and slot, on another connection (a new one is refused if the
            // pod stopped listening, and then the next pod is tried). Not a connection attempt
            // of `max_attempts`.
            ctx.attempts -= 1;
            ctx.stale_connections += 1;
            let again = (ctx.slot.is_some() || ctx.job_poll.is_some())
                && ctx.stale_connections <= STALE_CONNECTION_RETRIES;
            log::debug!(
                "pod {} had closed its pooled connection; {}",
                PodName(ctx.pod),
                if again {
                    "trying another connection"
                } else {
                    "giving up"
                }
            );
            e.set_retry(again);
            return e;
        }
        // Only while the slot is still held: once the pod's end of stream freed it, a reset
        // that follows (a pod breaking RFC 9113) must not send the request again.
        let again = ctx.slot.is_some()
            && not_processed_by_pod(&e)
            && session.response_written().is_none()
            && !session.as_ref().retry_buffer_truncated()
            && ctx.attempts < self.max_attempts;
        if again {
            log::info!(
                "pod {} did not process the call's HTTP/2 stream ({}); sending it again",
                PodName(ctx.pod),
                e.etype().as_str()
            );
        }
        e.set_retry(again);
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.job_poll.is_some() {
            // A job lives on its pod alone.
            e.set_retry(false);
            return e;
        }
        // Nothing was sent: give the slot back now and let the retry pick another pod.
        if let Some(slot) = ctx.slot.take() {
            let addr = slot.addr();
            slot.connect_failed();
            ctx.tried.push(addr);
            log::warn!("connect to pod {addr} failed: {e}");
        }
        let can_retry = ctx.tried.len() < self.max_attempts
            && ctx
                .route
                .as_ref()
                .is_some_and(|r| r.balancer.has_untried(&ctx.tried));
        e.set_retry(can_retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, body, retry_after) = match ctx.refusal {
            Some(Refusal::ClientGone) => (0, String::new(), false),
            None if is_pod_timeout(e) => (
                504,
                format!(
                    "lb-agent: pod {} made no progress for {:?} (upstream_timeout)\n",
                    PodName(ctx.pod),
                    ctx.route
                        .as_ref()
                        .map_or(Duration::ZERO, |r| r.upstream_timeout)
                ),
                false,
            ),
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
            Some(Refusal::Deadline) => (
                504,
                format!(
                    "lb-agent: deadline exceeded: the call's grpc-timeout passed after {} ms in the queue\n",
                    ctx.queue_wait.as_millis()
                ),
                false,
            ),
            Some(Refusal::Queue(QueueError::NoUntriedPod))
            | None
            | Some(Refusal::NoRoute)
            | Some(Refusal::BadRequest)
            | Some(Refusal::JobRefused)
            | Some(Refusal::JobCallback) => {
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
            // retry; the HTTP status must be 200 for them to read it. A call whose own deadline
            // passed is DEADLINE_EXCEEDED: a retry could not finish in time, and it is what the
            // client reports itself when its timer fires first. So is a pod that made no
            // progress: the call was sent and is never retried elsewhere.
            let status = if ctx.refusal == Some(Refusal::Deadline) || code == 504 {
                grpc_status::DEADLINE_EXCEEDED
            } else {
                grpc_status::UNAVAILABLE
            };
            if let Err(err) = write_grpc_status(session, status, &body).await {
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

    /// Pingora logs every request that ends in `fail_to_proxy` at ERROR ("Fail to proxy").
    /// lb-agent's own refusals are the queue doing its job, not faults: they are logged by
    /// [`Self::logging`]'s request line at INFO, with their outcome. So is a client that left
    /// (outcome `client_gone`: a closed connection, a cancelled call): that is the client's
    /// choice, not an agent fault. A pod that made no progress for `upstream_timeout` has its
    /// own WARN line (see [`Self::error_while_proxy`]). Failures to reach any pod
    /// (`NoUntriedPod`, connect errors) and other pod-side errors during proxying keep
    /// pingora's ERROR line.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        ctx.refusal
            .is_some_and(|r| r != Refusal::Queue(QueueError::NoUntriedPod))
            || *e.esource() == ErrorSource::Downstream
            || is_pod_timeout(e)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let outcome = outcome(ctx, e, status);
        if e.is_some_and(is_pod_timeout) {
            // The pod's connection was just closed (or its stream reset). The next request may
            // reach the pod on another connection before the pod has read that cancellation, and
            // for that moment the pod would count both: the slot is kept a little longer so the
            // cancellation arrives first. (A pod that never reads it is hung anyway.)
            if let Some(slot) = ctx.slot.take() {
                tokio::spawn(async move {
                    tokio::time::sleep(CANCEL_SETTLE).await;
                    drop(slot);
                });
            }
        }
        if outcome == Outcome::ClientGone {
            // The client left a request the pod was working on: the pod's exchange runs to
            // its end and only then is the slot freed (`client_abort: finish`).
            if let (Some(socket), Some(slot), Some(route)) =
                (ctx.upstream_socket.take(), ctx.slot.take(), &ctx.route)
            {
                let seen = Seen {
                    consumed: socket.consumed(),
                    head: ctx.response_framing,
                    body_read: session.upstream_body_bytes_received() as u64,
                    head_request: session.req_header().method == http::Method::HEAD,
                };
                // The pod's job outlives its client: an async route's answer may start one. Not
                // once its final head was read here: that answer was judged then (a 202 took
                // the slot away from the request), and any other does not start a job.
                let then = route
                    .async_jobs
                    .as_ref()
                    // A JSON job's answer is judged at its end, which was not reached.
                    .filter(|a| {
                        if a.job_id.is_some() {
                            job_requests::submits(&session.req_header().method)
                                && (ctx.response_framing.is_none() || ctx.job_answer.is_some())
                        } else {
                            ctx.response_framing.is_none()
                        }
                    })
                    .map(|_| {
                        let job = ctx
                            .job_id
                            .take()
                            .unwrap_or_else(|| self.live.jobs.keys.new_job());
                        Box::new(jobs::after_client_left(
                            Arc::clone(&self.live.jobs),
                            Arc::clone(route),
                            job,
                            session.req_header().uri.path().to_string(),
                        )) as abandoned::AfterDrain
                    });
                abandoned::finish(Abandoned {
                    socket,
                    slot,
                    response: ResponseEnd::resume(&seen),
                    timeout: route.upstream_timeout,
                    then,
                });
            }
        }
        let route = ctx.route.as_ref().map_or("-", |r| r.uri.as_str());
        if let Some(m) = metrics::get() {
            match &ctx.route {
                Some(r) => {
                    let rm = r.metrics.get_or_init(|| m.route(&r.uri));
                    if outcome == Outcome::Ok {
                        rm.ok.inc();
                    } else {
                        m.requests
                            .with_label_values(&[route, outcome.as_str()])
                            .inc();
                    }
                    rm.request_duration
                        .observe(ctx.start.elapsed().as_secs_f64());
                    rm.queue_wait.observe(ctx.queue_wait.as_secs_f64());
                }
                // Unrouted requests share the label "-": request paths must not become labels.
                None => m
                    .requests
                    .with_label_values(&[route, outcome.as_str()])
                    .inc(),
            }
        }
        // The request line is off unless RUST_LOG asks for INFO: then nothing of it may cost
        // anything per request (formatting the pod's address allocated a String every time).
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        log::info!(
            "{} {} route={} pod={} status={} outcome={} queue_wait_ms={} duration_ms={} attempts={}",
            session.req_header().method,
            session.req_header().uri,
            route,
            PodName(ctx.pod),
            status,
            outcome.as_str(),
            ctx.queue_wait.as_millis(),
            ctx.start.elapsed().as_millis(),
            ctx.attempts,
        );
    }
}

/// Header names the request path uses on every request, made once: a name given as text is
/// parsed and validated each time it is used.
static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static CALLBACK_HEADER: http::HeaderName = http::HeaderName::from_static(jobs::CALLBACK_HEADER);
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// `ip` as text, written into `buf`: an IPv4 address digit by digit (what nearly every client
/// in a cluster has; `Display` costs several times more), IPv6 through `Display`.
fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 39]) -> &str {
    use std::io::Write;
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        std::net::IpAddr::V6(v6) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // 39 bytes hold the longest IPv6 text (eight groups of four hex digits).
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    };
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// A pod's address for a log line, `-` when the request reached none; formatted only when the
/// line is written.
struct PodName(Option<SocketAddr>);

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The peer for `pod` on `route`: its timeouts, and HTTP/2 for an `h2c` route.
fn pod_peer(pod: SocketAddr, route: &RouteEntry) -> HttpPeer {
    let mut peer = HttpPeer::new(pod, false, String::new());
    peer.options.connection_timeout = Some(route.connect_timeout);
    peer.options.idle_timeout = Some(route.upstream_idle_timeout);
    // Each read of the response and each write of the request waits at most this long
    // (both HTTP/1.1 and HTTP/2 clients apply them per operation): no progress for
    // `upstream_timeout` fails the request with ReadTimedout/WriteTimedout.
    peer.options.read_timeout = Some(route.upstream_timeout);
    peer.options.write_timeout = Some(route.upstream_timeout);
    if route.protocol == UpstreamProtocol::H2c {
        peer.options.set_http_version(2, 2);
        peer.options.max_h2_streams = H2_STREAMS_PER_CONNECTION;
    }
    peer
}

/// An HTTP/2 stream the pod refused before processing it (RFC 9113 §8.7): `REFUSED_STREAM`,
/// or a `GOAWAY` whose last stream id is below it (the h2 crate reports only those streams as
/// ended by the remote `GOAWAY`; streams the pod did take end with a broken pipe instead).
/// Only the pod's side counts: a client's own `REFUSED_STREAM` (or `GOAWAY`) on its side of
/// lb-agent says nothing about the pod, and must never make a request go out again.
fn not_processed_by_pod(e: &Error) -> bool {
    e.esource() == &ErrorSource::Upstream
        && e.root_cause().downcast_ref::<h2::Error>().is_some_and(|h| {
            h.is_remote() && (h.is_go_away() || h.reason() == Some(h2::Reason::REFUSED_STREAM))
        })
}

/// A `grpc-status` other than `0` (OK) in these headers or trailers.
fn grpc_status_is_error(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes().trim_ascii() != b"0")
}

/// An HTTP/1.1 request with `Expect: 100-continue` (RFC 9110 §10.1.1).
fn expects_continue(req: &pingora::http::RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether a request's `te` header lists `trailers`.
fn client_accepts_trailers(req: &pingora::http::RequestHeader) -> bool {
    req.headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// The pod made no progress for `upstream_timeout`: a read of its response or a write of the
/// request to it timed out (a connect timeout is not one: nothing was sent).
fn is_pod_timeout(e: &Error) -> bool {
    *e.esource() == ErrorSource::Upstream
        && matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        )
}

fn outcome(ctx: &Ctx, e: Option<&Error>, status: u16) -> Outcome {
    if ctx.client_left.as_ref().is_some_and(ClientLeft::get) {
        // The pod's answer was read to its end after the client had left.
        return Outcome::ClientGone;
    }
    match ctx.refusal {
        Some(Refusal::NoRoute) => Outcome::NoRoute,
        Some(Refusal::Queue(QueueError::Full)) => Outcome::QueueFull,
        Some(Refusal::Queue(QueueError::Timeout)) => Outcome::QueueTimeout,
        Some(Refusal::ClientGone) => Outcome::ClientGone,
        Some(Refusal::Queue(QueueError::NoUntriedPod)) => Outcome::UpstreamError,
        Some(Refusal::Queue(QueueError::ShuttingDown)) => Outcome::ShuttingDown,
        Some(Refusal::BadRequest) => Outcome::BadRequest,
        Some(Refusal::Deadline) => Outcome::DeadlineExceeded,
        Some(Refusal::JobRefused) => Outcome::JobRefused,
        Some(Refusal::JobCallback) => Outcome::JobCallback,
        // A request Pingora refused to build for the pod (nothing was sent): the client's
        // fault, not the client leaving.
        None if e.is_some_and(|e| *e.etype() == ErrorType::InvalidHTTPHeader) => {
            Outcome::BadRequest
        }
        None if e.is_some_and(is_pod_timeout) => Outcome::PodTimeout,
        // The client closed, reset its stream, or stopped reading past `client.timeout`.
        None if e.is_some_and(|e| *e.esource() == ErrorSource::Downstream) => Outcome::ClientGone,
        None if e.is_some() || status >= 500 && ctx.pod.is_none() => Outcome::UpstreamError,
        None if ctx.pod_error => Outcome::PodError,
        None => Outcome::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::ip_text;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn ip_text_is_what_display_writes() {
        let mut addrs: Vec<IpAddr> = vec![
            Ipv4Addr::new(0, 0, 0, 0).into(),
            Ipv4Addr::new(255, 255, 255, 255).into(),
            Ipv4Addr::new(10, 0, 100, 9).into(),
            Ipv6Addr::LOCALHOST.into(),
            Ipv6Addr::new(
                0xfd00, 0xabcd, 0x1234, 0x5678, 0x9abc, 0xdef0, 0x1357, 0x2468,
            )
            .into(),
            Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().into(),
        ];
        // Every octet value in every position.
        for o in 0..=255u8 {
            addrs.push(Ipv4Addr::new(o, 255 - o, o / 3, o.wrapping_mul(7)).into());
        }
        for ip in addrs {
            let mut buf = [0u8; 39];
            assert_eq!(ip_text(ip, &mut buf), ip.to_string());
        }
    }
}
