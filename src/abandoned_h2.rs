//! `client_abort: finish` for HTTP/2 clients of `protocol: h2c` routes: a call whose client
//! leaves (a cancelled gRPC call, a reset stream, a closed connection) after its request was
//! sent is still read to its end from the pod, and its slot is held until then.
//!
//! Why: a compute pod usually goes on working when its client leaves. Pingora's answer to a
//! client reset is to reset the pod's stream too (`RST_STREAM(CANCEL)`, pingora-proxy
//! `proxy_h2.rs`) and to end the request, which frees the slot while the pod may still be
//! working: the next queued call then runs on top of it, above the pod's `limit`. On HTTP/1.1
//! lb-agent keeps a duplicate of the pod's socket instead ([`crate::abandoned`]); an HTTP/2
//! connection carries other calls, so the stream itself has to stay open, and only Pingora
//! holds it.
//!
//! How: once the call has reached its pod, the client's side of the session is wrapped in a
//! [`Stay`]: a Pingora custom server session that passes everything through to the real HTTP/2
//! stream while the client is there. When the client goes away with its request complete, the
//! wrapper stops reporting the client's errors: writes to the client are dropped, and reading
//! from it waits for ever. Pingora then goes on reading the pod's answer (discarding it, as
//! the writes go nowhere) until the pod ends its stream, exactly as if the client were still
//! reading — no reset is sent, nothing is sent to the pod again — and only then ends the
//! request, whose slot is freed with it. A pod that stops making progress is cut by the
//! upstream read timeout, as any other call.
//!
//! A client that leaves *before* its request is complete (a streamed upload cut short) is not
//! covered: completing the request for it would hand the pod a truncated message as whole, so
//! that call is cancelled on the pod as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::custom::server::Session as CustomSession;
use pingora::protocols::http::custom::CustomMessageWrite;
use pingora::protocols::http::v2::server::HttpSession as H2Stream;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::Digest;
use pingora::Result;

/// Whether the client of a [`Stay`] session has gone; shared with the request's context so its
/// log line and metrics say `client_gone`.
#[derive(Clone, Debug, Default)]
pub struct ClientLeft(Arc<AtomicBool>);

impl ClientLeft {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Wraps the HTTP/2 client stream of `session` (if it is one) so that the pod's stream is read
/// to its end when the client leaves. Returns the flag that tells whether it did.
pub fn stay_for_pod(session: &mut ServerSession) -> Option<ClientLeft> {
    if !session.is_http2() {
        return None;
    }
    // Pingora's `()` custom session stands in for the instant the stream is moved out.
    let placeholder = ServerSession::new_custom(Box::new(()));
    let ServerSession::H2(stream) = std::mem::replace(session, placeholder) else {
        unreachable!("checked above: an HTTP/2 session");
    };
    let left = ClientLeft::default();
    *session = ServerSession::new_custom(Box::new(Stay {
        inner: stream,
        left: left.clone(),
        read_timeout: None,
    }));
    Some(left)
}

/// The client's HTTP/2 stream, passed through until the client leaves (see the module doc).
struct Stay {
    inner: H2Stream,
    left: ClientLeft,
    read_timeout: Option<Duration>,
}

impl Stay {
    fn gone(&self) -> bool {
        self.left.get()
    }

    /// A write to the client failed: it has gone; the pod's answer goes on being read.
    fn swallow(&self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            self.left.set();
        }
        Ok(())
    }
}

#[async_trait]
impl CustomSession for Stay {
    fn req_header(&self) -> &RequestHeader {
        self.inner.req_header()
    }

    fn req_header_mut(&mut self) -> &mut RequestHeader {
        self.inner.req_header_mut()
    }

    async fn read_body_bytes(&mut self) -> Result<Option<Bytes>> {
        self.inner.read_body_bytes().await
    }

    async fn drain_request_body(&mut self) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        self.inner.drain_request_body().await
    }

    async fn write_response_header(&mut self, resp: Box<ResponseHeader>, end: bool) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        let r = self.inner.write_response_header(resp, end);
        self.swallow(r)
    }

    async fn write_response_header_ref(&mut self, resp: &ResponseHeader, end: bool) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        let r = self.inner.write_response_header_ref(resp, end);
        self.swallow(r)
    }

    async fn write_body(&mut self, data: Bytes, end: bool) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        let r = self.inner.write_body(data, end).await;
        self.swallow(r)
    }

    async fn write_trailers(&mut self, trailers: HeaderMap) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        let r = self.inner.write_trailers(trailers);
        self.swallow(r)
    }

    async fn response_duplex_vec(&mut self, tasks: Vec<HttpTask>) -> Result<bool> {
        let ends = tasks.iter().any(HttpTask::is_end);
        if self.gone() {
            return Ok(ends);
        }
        match self.inner.response_duplex_vec(tasks).await {
            Ok(end) => Ok(end),
            Err(_) => {
                self.left.set();
                Ok(ends)
            }
        }
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        // The HTTP/2 stream has no read timeout of its own (as in Pingora's own H2 session).
        self.read_timeout = timeout;
    }

    fn get_read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_write_timeout(timeout);
    }

    fn get_write_timeout(&self) -> Option<Duration> {
        self.inner.get_write_timeout()
    }

    fn set_total_drain_timeout(&mut self, timeout: Option<Duration>) {
        self.inner.set_total_drain_timeout(timeout);
    }

    fn get_total_drain_timeout(&self) -> Option<Duration> {
        self.inner.get_total_drain_timeout()
    }

    fn request_summary(&self) -> String {
        self.inner.request_summary()
    }

    fn response_written(&self) -> Option<&ResponseHeader> {
        self.inner.response_written()
    }

    async fn shutdown(&mut self, _code: u32, _ctx: &str) {
        self.inner.shutdown();
    }

    fn is_body_done(&mut self) -> bool {
        self.inner.is_body_done()
    }

    async fn finish(&mut self) -> Result<()> {
        if self.gone() {
            return Ok(());
        }
        let r = self.inner.finish();
        self.swallow(r)
    }

    fn is_body_empty(&mut self) -> bool {
        self.inner.is_body_empty()
    }

    /// While the request body is still coming, a client that leaves cancels the call (its
    /// error goes to Pingora, which resets the pod's stream). Once the request is complete,
    /// the client leaving is noted and reading waits for ever: Pingora goes on with the pod's
    /// answer until the pod ends its stream.
    async fn read_body_or_idle(&mut self, no_body_expected: bool) -> Result<Option<Bytes>> {
        if !self.gone() {
            let complete = no_body_expected || self.inner.is_body_done();
            match self.inner.read_body_or_idle(no_body_expected).await {
                Err(e) if !complete => return Err(e),
                Err(_) => self.left.set(),
                ok => return ok,
            }
        }
        std::future::pending().await
    }

    fn body_bytes_sent(&self) -> usize {
        self.inner.body_bytes_sent()
    }

    fn body_bytes_read(&self) -> usize {
        self.inner.body_bytes_read()
    }

    fn digest(&self) -> Option<&Digest> {
        self.inner.digest()
    }

    fn digest_mut(&mut self) -> Option<&mut Digest> {
        self.inner.digest_mut()
    }

    fn client_addr(&self) -> Option<&SocketAddr> {
        self.inner.client_addr()
    }

    fn server_addr(&self) -> Option<&SocketAddr> {
        self.inner.server_addr()
    }

    fn pseudo_raw_h1_request_header(&self) -> Bytes {
        self.inner.pseudo_raw_h1_request_header()
    }

    fn enable_retry_buffering(&mut self) {
        self.inner.enable_retry_buffering();
    }

    fn retry_buffer_truncated(&self) -> bool {
        self.inner.retry_buffer_truncated()
    }

    fn get_retry_buffer(&self) -> Option<Bytes> {
        self.inner.get_retry_buffer()
    }

    async fn finish_custom(&mut self) -> Result<()> {
        Ok(())
    }

    fn take_custom_message_reader(
        &mut self,
    ) -> Option<Box<dyn Stream<Item = Result<Bytes>> + Unpin + Send + Sync + 'static>> {
        None
    }

    fn restore_custom_message_reader(
        &mut self,
        _reader: Box<dyn Stream<Item = Result<Bytes>> + Unpin + Send + Sync + 'static>,
    ) -> Result<()> {
        Ok(())
    }

    fn take_custom_message_writer(&mut self) -> Option<Box<dyn CustomMessageWrite>> {
        None
    }

    fn restore_custom_message_writer(
        &mut self,
        _writer: Box<dyn CustomMessageWrite>,
    ) -> Result<()> {
        Ok(())
    }
}
