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
//! the slot when the pod closes the connection — which every HTTP server does once it has
//! answered and reads the end of stream, or at once if it stops working when its client leaves.
//! Nothing is ever sent to the pod again, so no work is duplicated.
//!
//! The same idea is how Pingora keeps an upstream exchange going after a downstream error while
//! it fills its cache (`proxy_h1.rs`, "Downstream Error ignored during caching"); that path needs
//! a cache storage, and a socket we own needs nothing of Pingora's internals.

use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use tokio::io::AsyncReadExt;

use crate::balance::Slot;

/// A duplicate of the upstream socket of a request in flight.
#[derive(Debug)]
pub struct UpstreamSocket(OwnedFd);

impl UpstreamSocket {
    /// Duplicates `fd` (close-on-exec). `None` if the process is out of file descriptors: then
    /// the request runs as with `client_abort: cancel`.
    pub fn dup(fd: RawFd) -> Option<UpstreamSocket> {
        // SAFETY: Pingora hands us the fd of a socket it owns and keeps open for the whole call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match borrowed.try_clone_to_owned() {
            Ok(owned) => Some(UpstreamSocket(owned)),
            Err(e) => {
                log::warn!("cannot keep the pod connection for client_abort: finish: {e}");
                None
            }
        }
    }
}

/// Keeps `slot` until the pod behind `socket` has finished the abandoned request.
pub fn finish(socket: UpstreamSocket, slot: Slot) {
    let pod = slot.addr();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        match drain(socket).await {
            Ok(bytes) => log::debug!(
                "pod {pod} finished an abandoned request after {:?} ({bytes} response bytes dropped); slot freed",
                started.elapsed()
            ),
            Err(e) => log::debug!("pod {pod}: abandoned request ended with {e}; slot freed"),
        }
        drop(slot);
    });
}

async fn drain(socket: UpstreamSocket) -> std::io::Result<u64> {
    let std_stream = std::net::TcpStream::from(socket.0);
    std_stream.set_nonblocking(true)?;
    // End of request for the pod. It still gets to answer; we read until it closes.
    std_stream.shutdown(Shutdown::Write)?;
    let mut stream = tokio::net::TcpStream::from_std(std_stream)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}
