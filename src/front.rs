//! The front door: every client connection passes through here before Pingora reads from it.
//!
//! Pingora 0.9 bounds each *read* of a request header, not the header as a whole, and lets a
//! header grow to 1 MiB: a client sending one byte a second keeps its connection (and a file
//! descriptor) forever, and unfinished large headers hold memory. [`Front`] therefore wraps each
//! HTTP/1.1 connection in a [`Guarded`] stream that knows whether the connection is reading a
//! request head, inside a request, or idle between requests, and enforces the `client` limits:
//!
//! * `header_timeout`: from the connection's start (or a kept-alive request's first byte) to the
//!   end of the request head; past it the connection is closed;
//! * `keepalive_timeout`: how long a connection may sit idle between requests;
//! * `max_header_size`: no more than this many bytes are ever read while a head is incomplete,
//!   so memory per connection stays bounded; a longer head gets `431` and the connection closes.
//!
//! The proxy tells the stream when a head has been parsed ([`request_started`]); the session
//! loop tells it when the next request on the connection begins ([`Sessions`]). Cleartext
//! HTTP/2 connections are not wrapped: their streams are bounded by the HTTP/2 settings
//! (`max_header_list_size`, the connection idle timeout) instead.
//!
//! It also turns on HTTP/1.1 pipelining in Pingora, so a second request sent before the first
//! was answered is served after it, in order, instead of breaking the first.

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::ClientLimits;

/// The connection preface every HTTP/2 prior-knowledge client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sent, best effort, to a client whose request head is longer than `max_header_size`.
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nserver: lb-agent\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 44\r\nconnection: close\r\n\r\n\
lb-agent: request header fields too large.\r\n";

/// Where a connection is between its requests.
const HEAD: u8 = 0;
const BODY: u8 = 1;
const IDLE: u8 = 2;

/// A client connection with the `client` limits applied to its reads.
pub struct Guarded {
    inner: Stream,
    limits: ClientLimits,
    /// Set by the proxy and the session loop (through a shared reference, hence atomic).
    phase: AtomicU8,
    /// The phase `poll_read` last acted on, to notice a change and start that phase's clock.
    seen: u8,
    /// Bytes read since the current request head began.
    head_bytes: usize,
    /// When the current head (or idle period) runs out.
    timer: Pin<Box<Sleep>>,
    rejected: bool,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("head_bytes", &self.head_bytes)
            .finish()
    }
}

impl Guarded {
    /// A connection accepted at `since`, about to send its first request head.
    fn new(inner: Stream, limits: ClientLimits, since: Instant) -> Self {
        Self {
            inner,
            limits,
            phase: AtomicU8::new(HEAD),
            seen: HEAD,
            head_bytes: 0,
            timer: Box::pin(tokio::time::sleep_until(since + limits.header_timeout)),
            rejected: false,
        }
    }

    fn start_head(&mut self) {
        self.phase.store(HEAD, Ordering::Relaxed);
        self.seen = HEAD;
        self.head_bytes = 0;
        let deadline = Instant::now() + self.limits.header_timeout;
        self.timer.as_mut().reset(deadline);
    }

    /// Best effort: the socket's send buffer is empty while a head is being read, so the
    /// 431 goes out in one write; if it does not, the client just sees the close.
    fn reject_too_large(&mut self, cx: &mut Context<'_>) {
        if !self.rejected {
            self.rejected = true;
            let _ = Pin::new(&mut self.inner).poll_write(cx, TOO_LARGE);
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
    }
}

fn header_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "client.header_timeout: request head not complete in time",
    )
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.phase.load(Ordering::Relaxed);
        if phase != this.seen {
            this.seen = phase;
            if phase == IDLE {
                let deadline = Instant::now() + this.limits.keepalive_timeout;
                this.timer.as_mut().reset(deadline);
            }
        }
        match this.seen {
            BODY => Pin::new(&mut this.inner).poll_read(cx, buf),
            IDLE => {
                let before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len() - before;
                        if n > 0 {
                            // The next request began: its head gets the header clock.
                            this.start_head();
                            this.head_bytes = n;
                        }
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => match this.timer.as_mut().poll(cx) {
                        // Idle too long: an end of stream, which Pingora treats as the
                        // client leaving a kept-alive connection and closes quietly.
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    },
                }
            }
            _ => {
                if this.timer.is_elapsed() {
                    return Poll::Ready(Err(header_timed_out()));
                }
                let budget = this.limits.max_header_size.saturating_sub(this.head_bytes);
                if budget == 0 {
                    this.reject_too_large(cx);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "client.max_header_size: request head too large",
                    )));
                }
                // Never read past the budget: what a client can make us hold is bounded.
                let take = budget.min(buf.remaining());
                let mut limited = buf.take(take);
                match Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
                    Poll::Ready(Ok(())) => {
                        let n = limited.filled().len();
                        // SAFETY: `limited` wrote `n` initialised bytes into `buf`'s unfilled
                        // part, which is what `take` hands out.
                        unsafe { buf.assume_init(n) };
                        buf.advance(n);
                        this.head_bytes += n;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(header_timed_out())),
                        Poll::Pending => Poll::Pending,
                    },
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

fn guarded(session: &ServerSession) -> Option<&Guarded> {
    session.stream()?.as_any().downcast_ref::<Guarded>()
}

/// The proxy has parsed a request head: the header clock and size budget stop applying until
/// the next request on this connection.
pub fn request_started(session: &Session) {
    if let Some(g) = guarded(&session.downstream_session) {
        g.phase.store(BODY, Ordering::Relaxed);
    }
}

/// The Pingora application the listener runs: guards each connection, then hands it to
/// [`Sessions`] and through it to the proxy `P` (Pingora's `HttpProxy` of lb-agent's proxy;
/// generic so that the front door, which the proxy calls into, does not depend on it).
pub struct Front<P> {
    sessions: Arc<Sessions<P>>,
    limits: ClientLimits,
}

impl<P> Front<P> {
    pub fn new(proxy: P, limits: ClientLimits) -> Self {
        Self {
            sessions: Arc::new(Sessions {
                proxy: Arc::new(proxy),
            }),
            limits,
        }
    }
}

#[async_trait]
impl<P: HttpServerApp + Send + Sync + 'static> ServerApp for Front<P> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let since = Instant::now();
        // Pingora peeks for the HTTP/2 preface without a time limit; a client that sends a few
        // bytes and stops would hold the connection forever, so the peek runs on the header
        // clock. The peeked bytes are put back and read again through the guard.
        let mut preface = [0u8; H2_PREFACE.len()];
        let peeked = tokio::time::timeout_at(
            since + self.limits.header_timeout,
            stream.try_peek(&mut preface),
        )
        .await;
        let h2 = match peeked {
            Ok(Ok(true)) => preface == H2_PREFACE,
            Ok(Ok(false)) => false,
            // Timed out or closed before sending a request: nothing to answer.
            Ok(Err(_)) | Err(_) => return None,
        };
        let stream: Stream = if h2 {
            stream
        } else {
            Box::new(Guarded::new(stream, self.limits, since))
        };
        ServerApp::process_new(&self.sessions, stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.sessions.proxy.http_cleanup().await
    }
}

/// Each request's session on its way to the proxy.
pub struct Sessions<P> {
    proxy: Arc<P>,
}

#[async_trait]
impl<P: HttpServerApp + Send + Sync + 'static> HttpServerApp for Sessions<P> {
    /// Written out as `#[async_trait]` would expand it, but returning the proxy's own future
    /// instead of an `async` block around it: nothing here waits, and a second boxed future
    /// per request, with the whole session moved into it once more, cost more than the rest
    /// of the front door.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        mut session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        if let Some(g) = guarded(&session) {
            // A request on this connection has ended: it is idle until the next one begins.
            // (On a new connection the phase is still HEAD, with the clock started at accept.)
            if g.phase.load(Ordering::Relaxed) == BODY {
                g.phase.store(IDLE, Ordering::Relaxed);
            }
        }
        // The guard keeps the idle and header clocks; Pingora's own per-read keep-alive
        // timeout (60 s from the first request on) would cut them short.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(0));
        }
        session.set_pipelining_enabled(true);
        self.proxy.process_new_http(session, shutdown)
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await
    }
}
