//! Requests whose client went away after they were sent to a pod (`client_abort: finish`).
//!
//! A compute pod usually goes on working when its client leaves: closing the connection does
//! not stop a transcode that has started. Freeing the slot at that moment would let the next
//! request onto a pod that is still busy, and the pod would run above its `limit` exactly when
//! clients are timing out. So the slot stays taken until the pod has finished.
//!
//! How: when the request reaches the pod, the proxy keeps a duplicate of the upstream socket's
//! file descriptor (HTTP/1.1 upstreams, where the connection carries this request alone). When
//! the client leaves, Pingora drops its side of that connection, but the duplicate keeps the
//! TCP connection open. [`finish`] then half-closes it (the pod sees the end of the request,
//! even if its body was cut short), reads and discards whatever the pod still sends, and frees
//! the slot as soon as one of these happens:
//!
//! * the pod's response is complete (`Content-Length`, chunked terminator, no body: see
//!   [`framing`]); the connection is then closed, never reused. Servers keep a connection
//!   open after answering, half-close or not, until their own keep-alive timeout (2 s
//!   gunicorn, 5 s uvicorn, never for a Go `http.Server` without `IdleTimeout`), so waiting for
//!   the close would hold the slot that long after the work is done;
//! * the pod closes the connection (an answer that runs to the close, or a pod that stops
//!   working when its client leaves);
//! * the pod makes no progress for the route's `upstream_timeout` (counted from its last
//!   response byte or the last request byte it accepted, before the client left too): a hung
//!   pod must not hold a slot forever. It is then tried last for a while.
//!
//! Nothing is ever sent to the pod again, so no work is duplicated.
//!
//! Where the response stands when the drain takes over: Pingora may have read part of it. The
//! socket's own counters tell how much it read ([`UpstreamSocket::consumed`]: bytes received
//! minus bytes still queued, since the request started); if it read nothing, the drain parses
//! the whole response. If it had passed the head on (the proxy records its framing), a
//! `Content-Length` body is followed to its end from the body bytes Pingora counted. What
//! cannot be resumed exactly — a chunked body part-read, a head part-read — ends at the close
//! or the timeout.
//!
//! The same idea is how Pingora keeps an upstream exchange going after a downstream error while
//! it fills its cache (`proxy_h1.rs`, "Downstream Error ignored during caching"); that path needs
//! a cache storage, and a socket we own needs nothing of Pingora's internals.

pub mod framing;

use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

use crate::balance::Slot;
pub use framing::{BodyFraming, ResponseEnd, Seen};

/// A duplicate of the upstream socket of a request in flight.
#[derive(Debug)]
pub struct UpstreamSocket {
    /// Shared with the request's other duplicate of this socket, if any ([`crate::pooled`]).
    fd: Arc<OwnedFd>,
    /// Bytes taken off the socket before this request (earlier requests on a reused
    /// connection); `None` if the kernel would not say.
    consumed_before: Option<u64>,
}

impl UpstreamSocket {
    /// The pod connection of a request, from a duplicate of its descriptor ([`duplicate`]) and
    /// the socket's `info` read right before the request is written (`None`: the kernel would
    /// not say). A socket that has received nothing yet has nothing queued either, so a new
    /// connection costs no `FIONREAD`.
    pub fn with(
        fd: Arc<OwnedFd>,
        info: Option<&pingora::protocols::l4::ext::TCP_INFO>,
    ) -> UpstreamSocket {
        let consumed_before = info.and_then(|info| match info.tcpi_bytes_received {
            0 => Some(0),
            _ => consumed_since(fd.as_raw_fd(), info),
        });
        UpstreamSocket {
            consumed_before,
            fd,
        }
    }

    /// Bytes of this request's response that have been taken off the socket (by Pingora), or
    /// `None` if the kernel would not say.
    pub fn consumed(&self) -> Option<u64> {
        let now = consumed_total(self.fd.as_raw_fd())?;
        now.checked_sub(self.consumed_before?)
    }
}

/// A duplicate of the pod connection's descriptor (close-on-exec), made before the request is
/// written, that stays valid after Pingora drops the connection. `None` (logged) if the process
/// is out of file descriptors: then the request runs as with `client_abort: cancel`.
pub fn duplicate(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: Pingora hands us the fd of a socket it owns and keeps open for the whole call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    match borrowed.try_clone_to_owned() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("cannot keep the pod connection for client_abort: finish: {e}");
            None
        }
    }
}

/// Bytes taken off a TCP socket since it opened: received (`tcpi_bytes_received`) minus still
/// queued (`FIONREAD`).
fn consumed_total(fd: RawFd) -> Option<u64> {
    let info = pingora::protocols::l4::ext::get_tcp_info(fd).ok()?;
    consumed_since(fd, &info)
}

/// [`consumed_total`] with the socket's `info` already read.
fn consumed_since(fd: RawFd, info: &pingora::protocols::l4::ext::TCP_INFO) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer given; `fd` is an open socket.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } != 0 {
        return None;
    }
    info.tcpi_bytes_received
        .checked_sub(u64::try_from(queued).ok()?)
}

/// How long the pod behind `fd` has made no progress: since the last byte received from it or
/// sent to it, whichever is later (zero if the kernel would not say).
fn idle_for(fd: RawFd) -> Duration {
    pingora::protocols::l4::ext::get_tcp_info(fd).map_or(Duration::ZERO, |info| {
        Duration::from_millis(u64::from(
            info.tcpi_last_data_recv.min(info.tcpi_last_data_sent),
        ))
    })
}

/// A request whose client left while its pod was working on it.
pub struct Abandoned {
    pub socket: UpstreamSocket,
    pub slot: Slot,
    /// What is left of the pod's response.
    pub response: ResponseEnd,
    /// The route's `upstream_timeout`.
    pub timeout: Duration,
    /// Who takes the slot once the pod's answer is complete, instead of its being freed: an
    /// asynchronous route's job, if the answer was a `202` (see [`crate::jobs`]). Given the
    /// final head's status and `Location`, or `None` if the drain could not read that head.
    pub then: Option<AfterDrain>,
}

/// See [`Abandoned::then`].
pub type AfterDrain = Box<dyn FnOnce(Slot, Option<(u16, Option<&str>)>) + Send>;

/// How the drain of an abandoned request ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The response was complete (bytes dropped).
    Complete(u64),
    /// The pod closed the connection (bytes dropped).
    Closed(u64),
    /// No progress for `upstream_timeout`.
    TimedOut,
}

/// Keeps the slot until the pod behind the socket has finished the abandoned request (see the
/// module's doc), in a task of its own.
pub fn finish(abandoned: Abandoned) {
    let Abandoned {
        socket,
        slot,
        mut response,
        timeout,
        then,
    } = abandoned;
    let pod = slot.addr();
    tokio::spawn(async move {
        let started = Instant::now();
        let drained = drain(socket, &mut response, timeout).await;
        let answered = matches!(drained, Ok(Ended::Complete(_) | Ended::Closed(_)));
        match drained {
            Ok(Ended::Complete(bytes)) => log::debug!(
                "pod {pod} completed the answer to an abandoned request after {:?} ({bytes} bytes dropped); slot freed",
                started.elapsed()
            ),
            Ok(Ended::Closed(bytes)) => log::debug!(
                "pod {pod} closed the connection of an abandoned request after {:?} ({bytes} bytes dropped); slot freed",
                started.elapsed()
            ),
            Ok(Ended::TimedOut) => {
                slot.timed_out();
                log::warn!(
                    "pod {pod} made no progress for {timeout:?} (upstream_timeout) on a request whose client left; connection closed, slot freed, pod tried last for a while"
                );
            }
            Err(e) => log::debug!("pod {pod}: abandoned request ended with {e}; slot freed"),
        }
        match then {
            Some(then) if answered => then(slot, response.final_head()),
            _ => drop(slot),
        }
    });
}

async fn drain(
    socket: UpstreamSocket,
    response: &mut ResponseEnd,
    timeout: Duration,
) -> std::io::Result<Ended> {
    // The time without progress before the client left counts too.
    let mut deadline =
        tokio::time::Instant::now() + timeout.saturating_sub(idle_for(socket.fd.as_raw_fd()));
    // The request's other duplicate (the reuse proof) is normally gone by now; if not, this
    // drain takes a descriptor of its own.
    let fd = Arc::try_unwrap(socket.fd).or_else(|shared| shared.try_clone())?;
    let std_stream = std::net::TcpStream::from(fd);
    std_stream.set_nonblocking(true)?;
    // End of request for the pod. It still gets to answer.
    std_stream.shutdown(Shutdown::Write)?;
    if response.is_done() {
        return Ok(Ended::Complete(0));
    }
    let mut stream = tokio::net::TcpStream::from_std(std_stream)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Ok(Ended::TimedOut),
            Ok(read) => read?,
        };
        if n == 0 {
            return Ok(Ended::Closed(total));
        }
        total += n as u64;
        if response.feed(&buf[..n]) {
            return Ok(Ended::Complete(total));
        }
        deadline = tokio::time::Instant::now() + timeout;
    }
}
