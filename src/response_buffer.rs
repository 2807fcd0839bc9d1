//! Store-and-forward for answers that fit: a pod that has finished is not paced by its client.
//!
//! Pingora passes a pod's answer to the client as it reads it, four pieces ahead at most: a
//! client that reads 10 KB/s keeps a 1 MB answer's pod connection open, and its slot taken, for
//! 100 s after the pod's work ended — a GPU pod idle and "busy" while the queue waits. NGINX
//! exists with `proxy_buffering` for this reason.
//!
//! lb-agent reads an answer whole before passing it on when its `Content-Length` is at most
//! `client.response_buffer` and the bytes fit in what is left of `client.response_buffer_total`
//! (all answers together): the slot comes back with the pod's last byte (see
//! `upstream_response_body_filter`), and the client then reads at its own pace from lb-agent's
//! memory. Everything else streams as before: an answer without a length (chunked, gRPC,
//! server-sent events — streaming must stay streaming), a longer one, or one that finds the
//! total taken. The cost: such an answer's first body byte reaches the client when its last one
//! left the pod; for a compute service, whose answer comes after the work in one go, that is
//! the time to read it over the cluster network.
//!
//! Only for HTTP/1.1 pods: an h2c pod's answer may end with trailers, and its last body piece
//! is then not marked as the last one; the held bytes would never be passed on.
//!
//! The memory is counted from the moment the answer's head is read to the end of the request
//! (the [`Reservation`] lives in the request's context), so the bound holds while the bytes sit
//! in lb-agent waiting for the client, not only while they are read.

use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Bytes reserved by the answers being buffered, in this process (the bound is on this
/// process's memory, whatever the config's routes).
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Answers that fitted `client.response_buffer` but streamed because the total was taken: an
/// operator who sees this grow raises `client.response_buffer_total` (or memory).
static TOTAL_FULL: AtomicU64 = AtomicU64::new(0);

/// Bytes the buffered answers hold right now.
pub fn in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Answers streamed because `client.response_buffer_total` was taken.
pub fn total_full() -> u64 {
    TOTAL_FULL.load(Ordering::Relaxed)
}

/// The size of the pieces Pingora writes a streamed answer in (its body buffer), each of
/// which a client has `client.timeout` to take.
const PIECE: usize = 64 * 1024;

/// The write timeout for a held answer of `len` bytes sent in one write: `client.timeout` per
/// 64 KiB piece, the time the client would have had had the answer streamed. (Pingora's write
/// timeout bounds a whole write call, not its progress.)
pub fn write_timeout(client_timeout: Duration, len: usize) -> Duration {
    let pieces = u32::try_from(len.div_ceil(PIECE).max(1)).unwrap_or(u32::MAX);
    client_timeout.saturating_mul(pieces)
}

/// The bounds, from the config's `client` section.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Longest answer read whole (its `Content-Length`); 0 turns buffering off.
    pub per_answer: usize,
    /// All buffered answers together.
    pub total: usize,
}

impl Bounds {
    /// Room for an answer of `len` bytes, or `None`: it streams. `len` 0 needs no buffer.
    pub fn reserve(&self, len: usize) -> Option<Reservation> {
        if len == 0 || len > self.per_answer {
            return None;
        }
        let mut used = IN_USE.load(Ordering::Relaxed);
        loop {
            if used + len > self.total {
                TOTAL_FULL.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match IN_USE.compare_exchange_weak(
                used,
                used + len,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Reservation {
                        bytes: len,
                        held: BytesMut::new(),
                        streaming: false,
                    })
                }
                Err(now) => used = now,
            }
        }
    }
}

/// One answer's share of the total, and the pieces read so far. Dropping it gives the share
/// back.
#[derive(Debug)]
pub struct Reservation {
    bytes: usize,
    held: BytesMut,
    /// The pod sent more than its `Content-Length` announced (Pingora's HTTP/1.1 reader stops
    /// at the length, so this is a guard, not a path): what was held went on, the rest streams.
    streaming: bool,
}

impl Reservation {
    /// Takes the piece `body` of the answer read from the pod: nothing is passed on
    /// (`*body` becomes `None`) until the last piece, which passes on the whole answer.
    pub fn hold(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if self.streaming {
            return;
        }
        let piece = body.take();
        if self.held.is_empty() && end_of_stream {
            // The whole answer in one piece (the usual case for small answers): no copy.
            *body = piece;
            return;
        }
        if let Some(piece) = piece {
            if self.held.len() + piece.len() > self.bytes {
                self.streaming = true;
                self.held.extend_from_slice(&piece);
                *body = Some(std::mem::take(&mut self.held).freeze());
                return;
            }
            if self.held.capacity() == 0 {
                self.held.reserve(self.bytes);
            }
            self.held.extend_from_slice(&piece);
        }
        if end_of_stream {
            *body = Some(std::mem::take(&mut self.held).freeze());
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        IN_USE.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the counters are process-wide, and tests run in parallel.
    #[test]
    fn an_answer_is_held_whole_within_its_bounds_and_its_share_returned() {
        let bounds = Bounds {
            per_answer: 10,
            total: 15,
        };
        assert!(bounds.reserve(11).is_none(), "longer than per_answer");
        assert!(bounds.reserve(0).is_none(), "nothing to hold");
        let before = in_use();
        let mut a = bounds.reserve(10).unwrap();
        assert_eq!(in_use(), before + 10);
        let full = total_full();
        assert!(bounds.reserve(6).is_none(), "the total is taken");
        assert_eq!(total_full(), full + 1);
        let b = bounds.reserve(5).unwrap();

        let mut body = Some(Bytes::from_static(b"hello"));
        a.hold(&mut body, false);
        assert_eq!(body, None, "nothing passes on before the last piece");
        let mut body = None;
        a.hold(&mut body, false);
        assert_eq!(body, None);
        let mut body = Some(Bytes::from_static(b"world"));
        a.hold(&mut body, true);
        assert_eq!(body.as_deref(), Some(&b"helloworld"[..]));

        // An answer in one piece passes as it is.
        let mut c = b;
        let mut body = Some(Bytes::from_static(b"12345"));
        c.hold(&mut body, true);
        assert_eq!(body.as_deref(), Some(&b"12345"[..]));

        // More than announced: what was held goes on, the rest streams.
        drop(a);
        let mut d = bounds.reserve(4).unwrap();
        let mut body = Some(Bytes::from_static(b"abc"));
        d.hold(&mut body, false);
        assert_eq!(body, None);
        let mut body = Some(Bytes::from_static(b"def"));
        d.hold(&mut body, false);
        assert_eq!(body.as_deref(), Some(&b"abcdef"[..]));
        let mut body = Some(Bytes::from_static(b"g"));
        d.hold(&mut body, true);
        assert_eq!(body.as_deref(), Some(&b"g"[..]));

        drop((c, d));
        assert_eq!(in_use(), before, "every share given back");
    }

    #[test]
    fn a_held_answer_gets_the_write_time_of_its_pieces() {
        let t = Duration::from_secs(60);
        assert_eq!(write_timeout(t, 1), t);
        assert_eq!(write_timeout(t, PIECE), t);
        assert_eq!(write_timeout(t, PIECE + 1), 2 * t);
        assert_eq!(write_timeout(t, 4 << 20), 64 * t);
    }
}
