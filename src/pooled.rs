//! Whether a pooled pod connection is still fit to carry a request, asked of the kernel right
//! before the request is written.
//!
//! Pingora checks a pooled connection when it takes it from the pool, but through tokio's
//! readiness: a FIN that the kernel has received and the reactor has not yet turned into a
//! readiness event looks like a live connection. A pod that closes idle keep-alive connections
//! (a short keep-alive timeout, or a pod shutting down) then gets the request written on a
//! socket it has closed: it never sees it, and the client got a `502`. A non-blocking
//! `MSG_PEEK` asks the kernel itself.

#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, OwnedFd};
#[cfg(unix)]
use std::os::unix::io::RawFd;
#[cfg(target_os = "linux")]
use std::sync::Arc;
#[cfg(target_os = "linux")]
use std::time::Duration;

/// The pod has closed (or reset) this connection, or, on an HTTP/1.1 connection that is idle
/// between requests, sent bytes nobody asked for (a `408` before its close, say: read as the
/// answer to the next request it would be wrong). On an HTTP/2 connection unread bytes are
/// frames for its reader and say nothing.
#[cfg(unix)]
pub fn closed_by_pod(fd: RawFd, http2: bool) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the socket Pingora hands to `connected_to_upstream` and keeps open for
    // the whole call; MSG_PEEK | MSG_DONTWAIT neither consumes data nor blocks.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast::<libc::c_void>(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => !http2,
        _ => !matches!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// A reused HTTP/1.1 pod connection as it stood right before this request was written on it:
/// how many bytes the pod's kernel had acknowledged.
///
/// [`closed_by_pod`] cannot close one race: the pod's FIN can leave after that check and cross
/// the request on the wire (a keep-alive timeout firing just then, a pod shutting down). Pingora
/// then reads the end of the connection before any answer (`ConnectionClosed`), exactly as
/// when a pod read the request and died without answering; resending is safe only in the first
/// case. The kernel tells them apart: every segment a pod sends, its FIN included,
/// acknowledges all it had received. If the FIN acknowledged no byte of this request, the pod
/// had not received the request when it closed. One more proof is asked for, since a pod that
/// only half-closed (`shutdown(SHUT_WR)`) could still read the request: the pod's reset that
/// follows, which a fully closed socket answers the request's bytes with
/// ([`Reused::reset_after_fin`]). (A reset that comes without a FIN first proves nothing: a pod
/// may read a request and then abort the connection. Those are not resent.) Linux only: other
/// kernels' TCP_INFO does not say what was acknowledged.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct Reused {
    /// A duplicate: Pingora drops its connection before the error reaches the proxy, and the
    /// number of a closed descriptor may already belong to another socket. Shared with the
    /// request's other duplicate of the same socket, if it has one (see [`Reused::with`]).
    fd: Arc<OwnedFd>,
    acked_before: u64,
}

#[cfg(target_os = "linux")]
impl Reused {
    /// `None` if the descriptor cannot be duplicated or the kernel would not say (then such a
    /// request is never resent).
    #[cfg(test)]
    pub fn before_write(fd: RawFd) -> Option<Reused> {
        // SAFETY: Pingora hands us the fd of a socket it owns and keeps open for the whole call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .ok()?;
        let fd = Arc::new(fd);
        let info = pingora::protocols::l4::ext::get_tcp_info(fd.as_raw_fd()).ok()?;
        Reused::with(fd, &info)
    }

    /// [`Reused::before_write`] from a duplicate `fd` the request already made and the socket's
    /// `info` read right before the write: one `dup` and one `TCP_INFO` per request, however
    /// many parts of the request need them.
    pub fn with(fd: Arc<OwnedFd>, info: &pingora::protocols::l4::ext::TCP_INFO) -> Option<Reused> {
        let acked_before = info.tcpi_bytes_acked;
        // A connection that carried a request has had bytes acknowledged: zero means the kernel
        // does not count them.
        (acked_before > 0).then_some(Reused { fd, acked_before })
    }

    /// The pod ended the connection without having acknowledged a single byte of this request:
    /// call it only after reading the connection's end (a FIN) before any answer.
    pub fn pod_closed_before_receiving(&self) -> bool {
        acked(self.fd.as_raw_fd()) == Some(self.acked_before)
    }

    /// Waits (a few round trips, at most [`RESET_WAIT_MAX`]) for the pod's reset that proves its
    /// socket was fully closed when the request arrived, with still nothing of the request
    /// acknowledged. Call it after [`Reused::pod_closed_before_receiving`] held.
    pub async fn reset_after_fin(&self) -> bool {
        let fd = self.fd.as_raw_fd();
        let Ok(info) = pingora::protocols::l4::ext::get_tcp_info(fd) else {
            return false;
        };
        let wait = (Duration::from_micros(u64::from(info.tcpi_rtt)) * 4)
            .clamp(RESET_WAIT_MIN, RESET_WAIT_MAX);
        let until = tokio::time::Instant::now() + wait;
        loop {
            match pingora::protocols::l4::ext::get_tcp_info(fd) {
                Ok(i) if i.tcpi_bytes_acked != self.acked_before => return false,
                Ok(i) if i.tcpi_state == TCP_CLOSE => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// How long [`Reused::reset_after_fin`] waits for the reset: four round trips, within these.
#[cfg(target_os = "linux")]
const RESET_WAIT_MIN: Duration = Duration::from_millis(5);
#[cfg(target_os = "linux")]
pub const RESET_WAIT_MAX: Duration = Duration::from_millis(50);
/// `TCP_CLOSE` of Linux's `enum tcp_state` (a reset ends a connection in it).
#[cfg(target_os = "linux")]
const TCP_CLOSE: u8 = 7;

#[cfg(target_os = "linux")]
fn acked(fd: RawFd) -> Option<u64> {
    pingora::protocols::l4::ext::get_tcp_info(fd)
        .ok()
        .map(|info| info.tcpi_bytes_acked)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::{closed_by_pod, Reused};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::io::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (pods, _) = listener.accept().unwrap();
        (ours, pods)
    }

    #[test]
    fn an_open_idle_connection_is_fit() {
        let (ours, _pod) = pair();
        assert!(!closed_by_pod(ours.as_raw_fd(), false));
        assert!(!closed_by_pod(ours.as_raw_fd(), true));
    }

    #[test]
    fn a_closed_connection_is_not() {
        let (ours, pod) = pair();
        drop(pod);
        // The FIN is in the kernel as soon as the close returns (loopback); poll briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !closed_by_pod(ours.as_raw_fd(), false) {
            assert!(std::time::Instant::now() < deadline, "FIN never seen");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(closed_by_pod(ours.as_raw_fd(), true));
    }

    #[test]
    fn unasked_bytes_make_an_http1_connection_unfit_not_an_http2_one() {
        let (ours, mut pod) = pair();
        pod.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !closed_by_pod(ours.as_raw_fd(), false) {
            assert!(std::time::Instant::now() < deadline, "bytes never seen");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!closed_by_pod(ours.as_raw_fd(), true));
        // Peeking consumed nothing: the bytes are still there.
        assert!(closed_by_pod(ours.as_raw_fd(), false));
    }

    /// Waits until the kernel has received the FIN of `pod`'s close on `ours`.
    fn wait_for_fin(ours: &TcpStream) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !closed_by_pod(ours.as_raw_fd(), false) {
            assert!(std::time::Instant::now() < deadline, "FIN never seen");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    const REQUEST: &[u8] = b"GET /work HTTP/1.1\r\nhost: pod\r\n\r\n";

    /// A connection that carried one request and its answer, as a pooled one has.
    fn reused_pair() -> (TcpStream, TcpStream) {
        let (mut ours, mut pod) = pair();
        ours.write_all(REQUEST).unwrap();
        let mut buf = vec![0u8; REQUEST.len()];
        pod.read_exact(&mut buf).unwrap();
        pod.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        let mut answer = [0u8; 38];
        ours.read_exact(&mut answer).unwrap();
        (ours, pod)
    }

    #[tokio::test]
    async fn a_fin_that_acknowledged_nothing_of_the_request_proves_the_pod_never_got_it() {
        let (mut ours, pod) = reused_pair();
        let reused = Reused::before_write(ours.as_raw_fd()).unwrap();
        // The pod closes; the request is written after its FIN left (the crossing, as seen
        // from the pod's side: its socket is gone when the request arrives).
        drop(pod);
        wait_for_fin(&ours);
        ours.write_all(REQUEST).unwrap();
        assert!(reused.pod_closed_before_receiving());
        assert!(reused.reset_after_fin().await);
    }

    #[tokio::test]
    async fn a_pod_that_only_half_closed_may_still_read_the_request() {
        let (mut ours, pod) = reused_pair();
        let reused = Reused::before_write(ours.as_raw_fd()).unwrap();
        pod.shutdown(std::net::Shutdown::Write).unwrap();
        wait_for_fin(&ours);
        ours.write_all(REQUEST).unwrap();
        // No reset comes (the pod's socket is open), whatever its kernel acknowledged yet.
        assert!(!(reused.pod_closed_before_receiving() && reused.reset_after_fin().await));
        drop(pod);
    }

    #[test]
    fn a_pod_that_read_the_request_and_closed_is_not_taken_for_one_that_never_got_it() {
        let (mut ours, mut pod) = pair();
        // An earlier exchange on the connection: its bytes were acknowledged before.
        ours.write_all(REQUEST).unwrap();
        let mut buf = vec![0u8; REQUEST.len()];
        pod.read_exact(&mut buf).unwrap();
        let reused = Reused::before_write(ours.as_raw_fd()).unwrap();
        ours.write_all(REQUEST).unwrap();
        pod.read_exact(&mut buf).unwrap();
        // Read, then gone without an answer (a crash): the FIN acknowledges the request.
        drop(pod);
        wait_for_fin(&ours);
        assert!(!reused.pod_closed_before_receiving());
    }
}
