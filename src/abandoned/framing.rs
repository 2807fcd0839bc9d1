//! Where an HTTP/1.1 response ends, told from the bytes a pod sends (RFC 9112 §6.3): after a
//! `Content-Length` body, at the last chunk and its trailers, right after the head (`HEAD`,
//! `204`, `304`), or at the close. Interim `1xx` heads are skipped.
//!
//! [`ResponseEnd`] is fed the bytes of a pod connection from where the abandoned-request drain
//! takes over, which may be after Pingora already read part of the response:
//! [`ResponseEnd::resume`] says what is left to read from what was seen before the client left.

use std::fmt;

/// Longest response head (status line and fields) read; a longer one is not parsed, and the
/// response then ends at the close. Pingora's own limit for a response head is larger, but a
/// compute pod's heads are a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields parsed in one head.
const MAX_FIELDS: usize = 128;
/// Most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: usize = 64 * 1024;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: the response ends with its head.
    Empty,
    Length(u64),
    Chunked,
    /// Read until the pod closes the connection.
    UntilClose,
}

impl BodyFraming {
    /// The framing of the body of a final response (status 101 or at least 200) with
    /// `fields`, to a `HEAD` request if `head_request`.
    pub fn of<'a>(
        head_request: bool,
        status: u16,
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> BodyFraming {
        if status == 101 {
            // The connection now speaks another protocol: it ends when it closes.
            return BodyFraming::UntilClose;
        }
        if head_request || status == 204 || status == 304 || status < 200 {
            return BodyFraming::Empty;
        }
        let mut chunked = None;
        let mut length: Option<Option<u64>> = None;
        for (name, value) in fields {
            if name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding decides; a body not chunked last runs to the close.
                let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case("content-length") {
                for v in value.split(|b| *b == b',') {
                    let n = std::str::from_utf8(v.trim_ascii())
                        .ok()
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse::<u64>().ok());
                    // Differing or unreadable lengths: the framing is unknown.
                    length = match length {
                        None => Some(n),
                        Some(prior) if prior == n => Some(n),
                        Some(_) => Some(None),
                    };
                }
            }
        }
        match (chunked, length) {
            (Some(true), _) => BodyFraming::Chunked,
            (Some(false), _) => BodyFraming::UntilClose,
            (None, Some(Some(n))) => BodyFraming::Length(n),
            (None, Some(None)) | (None, None) => BodyFraming::UntilClose,
        }
    }
}

/// What lb-agent knew of a response when the drain took over its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Bytes of the response Pingora had taken off the socket (`None`: not known).
    pub consumed: Option<u64>,
    /// The framing of the final response head, if Pingora had passed the head on.
    pub head: Option<BodyFraming>,
    /// Body bytes Pingora had read (decoded, for a chunked body).
    pub body_read: u64,
    /// The request was a `HEAD`.
    pub head_request: bool,
}

/// Follows a response through its bytes until it is complete.
#[derive(Clone, PartialEq, Eq)]
pub struct ResponseEnd {
    state: State,
    head_request: bool,
    /// The final response head's status and `Location`, once the drain has read it.
    final_head: Option<(u16, Option<String>)>,
}

#[derive(Clone, PartialEq, Eq)]
enum State {
    /// Reading a head: the bytes of it so far.
    Head(Vec<u8>),
    /// Body bytes still to come.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line: the size so far, its hex digits, and whether an extension began.
    Size { size: u64, digits: u8, ext: bool },
    /// Chunk data bytes still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer bytes so far, and the length of the current line.
    Trailers { total: usize, line: usize },
}

impl fmt::Debug for ResponseEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Head(b) => write!(f, "head ({} bytes so far)", b.len()),
            State::Length(n) => write!(f, "{n} body bytes to come"),
            State::Chunked(_) => f.write_str("in a chunked body"),
            State::UntilClose => f.write_str("until the pod closes"),
            State::Done => f.write_str("complete"),
        }
    }
}

impl ResponseEnd {
    /// A response none of which has been read yet.
    pub fn from_start(head_request: bool) -> ResponseEnd {
        ResponseEnd {
            state: State::Head(Vec::new()),
            head_request,
            final_head: None,
        }
    }

    /// A response whose head was read, with `body_read` bytes of its body.
    pub fn in_body(framing: BodyFraming, body_read: u64) -> ResponseEnd {
        let state = match framing {
            BodyFraming::Empty => State::Done,
            BodyFraming::Length(n) if n <= body_read => State::Done,
            BodyFraming::Length(n) => State::Length(n - body_read),
            // Where in the chunk framing the reading stopped is not known: only the close
            // (or the drain's timeout) can end it.
            BodyFraming::Chunked | BodyFraming::UntilClose => State::UntilClose,
        };
        ResponseEnd {
            state,
            head_request: false,
            final_head: None,
        }
    }

    /// What is left of a response after what was `seen` of it. Exact when nothing of it was
    /// read, or when its head was passed on and its body has a length; otherwise it runs to
    /// the close.
    pub fn resume(seen: &Seen) -> ResponseEnd {
        match (seen.consumed, seen.head) {
            (Some(0), _) => ResponseEnd::from_start(seen.head_request),
            (_, Some(framing)) => ResponseEnd::in_body(framing, seen.body_read),
            // Part of a head was read, or a head that was never passed on.
            _ => ResponseEnd::in_body(BodyFraming::UntilClose, 0),
        }
    }

    /// The final response head's status and `Location`, if the drain read that head (not when
    /// Pingora had read part or all of it before the drain took over).
    pub fn final_head(&self) -> Option<(u16, Option<&str>)> {
        self.final_head
            .as_ref()
            .map(|(status, location)| (*status, location.as_deref()))
    }

    /// The response is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Only the close can end the response.
    pub fn until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Takes the next bytes of the response; true once it is complete (bytes past its end are
    /// ignored: nothing else was asked of the pod).
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done | State::UntilClose => break,
                State::Length(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Done;
                    }
                }
                State::Head(buf) => {
                    let before = buf.len();
                    buf.extend_from_slice(&bytes[..bytes.len().min(MAX_HEAD + 4 - before)]);
                    match self.parse_head(before) {
                        Some(used) => bytes = &bytes[used..],
                        None => break,
                    }
                }
                State::Chunked(chunk) => {
                    let used = match step(chunk, bytes) {
                        Ok(Some(used)) => used,
                        Ok(None) => {
                            self.state = State::Done;
                            break;
                        }
                        Err(()) => {
                            log::debug!(
                                "abandoned response: malformed chunked body; reading to the close"
                            );
                            self.state = State::UntilClose;
                            break;
                        }
                    };
                    bytes = &bytes[used..];
                }
            }
        }
        self.is_done()
    }

    /// Parses the head in `State::Head` once it is complete and moves to the body. Returns how
    /// many of the bytes fed last (those after `before` in the buffer) belonged to the head, or
    /// `None` if the head is not complete yet (or cannot be read: then the state is
    /// `UntilClose`).
    fn parse_head(&mut self, before: usize) -> Option<usize> {
        let State::Head(buf) = &self.state else {
            return None;
        };
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut fields);
        let parsed = response.parse(buf);
        let (len, status, framing, location) = match parsed {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                let framing = BodyFraming::of(
                    self.head_request,
                    status,
                    response.headers.iter().map(|h| (h.name, h.value)),
                );
                let location = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("location"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(|v| v.trim().to_string());
                (len, status, framing, location)
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return None,
            _ => {
                log::debug!("abandoned response: unreadable head; reading to the close");
                self.state = State::UntilClose;
                return None;
            }
        };
        self.state = if (100..200).contains(&status) && status != 101 {
            // An interim response: the final one follows.
            State::Head(Vec::new())
        } else {
            self.final_head = Some((status, location));
            match framing {
                BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
                BodyFraming::Length(n) => State::Length(n),
                BodyFraming::Chunked => State::Chunked(Chunk::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                }),
                BodyFraming::UntilClose => State::UntilClose,
            }
        };
        Some(len - before)
    }
}

/// Advances the chunk parser over `bytes`: how many it used (`Ok(None)`: the body ended), or
/// `Err` if the body is not valid chunked framing. Line ends may be CRLF or a bare LF.
fn step(chunk: &mut Chunk, bytes: &[u8]) -> Result<Option<usize>, ()> {
    if let Chunk::Data(left) = chunk {
        let n = (*left).min(bytes.len() as u64);
        *left -= n;
        if *left == 0 {
            *chunk = Chunk::DataEnd;
        }
        return Ok(Some(n as usize));
    }
    let b = bytes[0];
    match chunk {
        Chunk::Data(_) => unreachable!("handled above"),
        Chunk::Size { size, digits, ext } => match b {
            b'\n' if *digits == 0 => return Err(()),
            b'\n' if *size == 0 => *chunk = Chunk::Trailers { total: 0, line: 0 },
            b'\n' => *chunk = Chunk::Data(*size),
            b'\r' => {}
            _ if *ext => {}
            b';' | b' ' | b'\t' => *ext = true,
            _ => {
                let digit = (b as char).to_digit(16).ok_or(())?;
                if *digits >= 15 {
                    return Err(());
                }
                *size = *size * 16 + u64::from(digit);
                *digits += 1;
            }
        },
        Chunk::DataEnd => match b {
            b'\r' => {}
            b'\n' => {
                *chunk = Chunk::Size {
                    size: 0,
                    digits: 0,
                    ext: false,
                }
            }
            _ => return Err(()),
        },
        Chunk::Trailers { total, line } => {
            *total += 1;
            if *total > MAX_TRAILERS {
                return Err(());
            }
            match b {
                b'\n' if *line == 0 => return Ok(None),
                b'\n' => *line = 0,
                b'\r' => {}
                _ => *line += 1,
            }
        }
    }
    Ok(Some(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-pod: a\r\n\r\nhello";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
    const INTERIM: &[u8] =
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const BARE_LF: &[u8] = b"HTTP/1.1 200 OK\ntransfer-encoding: chunked\n\n3\nabc\n0\n\n";
    const NO_BODY: &[u8] = b"HTTP/1.1 204 No Content\r\ncontent-length: 99\r\n\r\n";

    /// Feeds `bytes` in pieces cut at `cuts` and returns the index of the byte with which the
    /// response became complete.
    fn done_at(mut end: ResponseEnd, bytes: &[u8], cuts: &[usize]) -> Option<usize> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort();
        let mut from = 0;
        for to in cuts {
            if to <= from {
                continue;
            }
            // Byte by byte inside a piece would hide bugs in how a piece is split; feed the
            // piece whole, and find the end by feeding shorter prefixes when it completes.
            let mut probe = end.clone();
            if probe.feed(&bytes[from..to]) {
                for k in from + 1..=to {
                    let mut p = end.clone();
                    if p.feed(&bytes[from..k]) {
                        return Some(k - 1);
                    }
                }
                unreachable!("the whole piece completed it");
            }
            end = probe;
            from = to;
        }
        None
    }

    #[test]
    fn each_framing_ends_at_its_last_byte() {
        for (bytes, head_request) in [
            (CL, false),
            (CHUNKED, false),
            (INTERIM, false),
            (BARE_LF, false),
            (NO_BODY, false),
        ] {
            let text = String::from_utf8_lossy(bytes);
            assert_eq!(
                done_at(ResponseEnd::from_start(head_request), bytes, &[]),
                Some(bytes.len() - 1),
                "{text}"
            );
        }
        // A HEAD response ends with its head, whatever its Content-Length says.
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(
            done_at(ResponseEnd::from_start(true), head, &[]),
            Some(head.len() - 1)
        );
    }

    #[test]
    fn what_only_the_close_can_end() {
        for bytes in [
            &b"HTTP/1.1 200 OK\r\n\r\nbody until close"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\nxyz",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello!",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nhello",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut end = ResponseEnd::from_start(false);
            assert!(!end.feed(bytes), "{}", String::from_utf8_lossy(bytes));
            assert!(end.until_close(), "{}", String::from_utf8_lossy(bytes));
        }
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        let mut end = ResponseEnd::from_start(false);
        assert!(!end.feed(&huge));
        assert!(end.until_close());
    }

    #[test]
    fn equal_repeated_lengths_are_one_length() {
        let bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\nabc";
        assert_eq!(
            done_at(ResponseEnd::from_start(false), bytes, &[]),
            Some(bytes.len() - 1)
        );
    }

    #[test]
    fn resuming_after_pingora_read_part_of_it() {
        let seen = |consumed, head, body_read| Seen {
            consumed,
            head,
            body_read,
            head_request: false,
        };
        // Nothing read: parse it all.
        let mut end = ResponseEnd::resume(&seen(Some(0), None, 0));
        assert!(end.feed(CL));
        // Head passed on, 2 of 5 body bytes read: 3 to come.
        let mut end = ResponseEnd::resume(&seen(Some(40), Some(BodyFraming::Length(5)), 2));
        assert!(!end.feed(b"ll"));
        assert!(end.feed(b"o"));
        // The whole body read already.
        assert!(ResponseEnd::resume(&seen(Some(44), Some(BodyFraming::Length(5)), 5)).is_done());
        assert!(ResponseEnd::resume(&seen(Some(20), Some(BodyFraming::Empty), 0)).is_done());
        // Chunked mid-body, a head half read, or nothing known: only the close ends it.
        for s in [
            seen(Some(60), Some(BodyFraming::Chunked), 5),
            seen(Some(10), None, 0),
            seen(None, None, 0),
            seen(Some(10), Some(BodyFraming::UntilClose), 3),
        ] {
            assert!(ResponseEnd::resume(&s).until_close(), "{s:?}");
        }
    }

    proptest! {
        /// However the bytes arrive, a response is complete exactly at its last byte.
        #[test]
        fn any_split_ends_at_the_last_byte(
            which in 0usize..4,
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let bytes = [CL, CHUNKED, INTERIM, BARE_LF][which];
            prop_assert_eq!(
                done_at(ResponseEnd::from_start(false), bytes, &cuts),
                Some(bytes.len() - 1)
            );
        }
    }
}
