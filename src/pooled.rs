//! Whether a pooled pod connection is still fit to carry a request, asked of the kernel right
//! before the request is written.
//!
//! Pingora checks a pooled connection when it takes it from the pool, but through tokio's
//! readiness: a FIN that the kernel has received and the reactor has not yet turned into a
//! readiness event looks like a live connection. A pod that closes idle keep-alive connections
//! (a short keep-alive timeout, or a pod shutting down) then gets the request written on a
//! socket it has closed: it never sees it, and the client got a `502`. A non-blocking
//! `MSG_PEEK` asks the kernel itself.

#[cfg(unix)]
use std::os::unix::io::RawFd;

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

#[cfg(all(test, unix))]
mod tests {
    use super::closed_by_pod;
    use std::io::Write;
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
}
