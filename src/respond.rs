//! Refusals in HTTP and gRPC form: the answers lb-agent writes itself when it does not send a
//! request to a pod (no route, queue full or timed out, no pod reachable, shutting down).
//!
//! An HTTP client gets a short `text/plain` body with a status code (and `Retry-After` when
//! trying again later can help); a gRPC client gets a gRPC status it can act on.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::HttpTask;
use pingora::proxy::Session;
use std::time::Duration;

/// Seconds a refused client is told to wait before trying again.
const RETRY_AFTER_SECS: u64 = 1;

/// gRPC status codes lb-agent answers with itself.
pub mod grpc_status {
    /// The call can be retried (queue full or timed out, no pod reachable, shutting down).
    pub const UNAVAILABLE: u32 = 14;
    /// No route for the method.
    pub const UNIMPLEMENTED: u32 = 12;
    /// The call's own deadline (`grpc-timeout`) passed while it waited for a slot.
    pub const DEADLINE_EXCEEDED: u32 = 4;
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

/// Refuses a gRPC call the way every gRPC client understands: a Trailers-Only response, HTTP
/// 200 with `grpc-status` and `grpc-message` in one HEADERS frame that also ends the stream.
///
/// It has to be written as a response task: pingora's `Session::write_response_header` drops
/// its `end` flag on HTTP/2 (the HEADERS frame goes out without END_STREAM), and the stream is
/// then ended either by an empty DATA frame or, after `fail_to_proxy`, by a RST_STREAM
/// (CANCEL). tonic reads the status from such a header block anyway; gRPC C-core (grpcio)
/// follows the spec and reports UNKNOWN or CANCELLED instead.
pub async fn write_grpc_status(
    session: &mut Session,
    code: u32,
    message: &str,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(200, Some(4))?;
    resp.insert_header("content-type", "application/grpc")?;
    resp.insert_header("grpc-status", code.to_string())?;
    resp.insert_header("grpc-message", grpc_message(message))?;
    if session.req_header().version < http::Version::HTTP_2 {
        resp.insert_header("content-length", "0")?;
    }
    resp.insert_header("server", "lb-agent")?;
    session
        .write_response_tasks(vec![HttpTask::Header(Box::new(resp), true)])
        .await
        .map(|_| ())
}

/// The call's deadline from its `grpc-timeout` header: 1 to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`). `None` when absent or malformed (the call then has no deadline here,
/// as a gRPC server would treat it).
pub fn grpc_timeout(session: &Session) -> Option<Duration> {
    let v = session.req_header().headers.get("grpc-timeout")?;
    parse_grpc_timeout(v.to_str().ok()?)
}

/// A `grpc-timeout` value for `d`: the most precise unit whose count fits the spec's 8 digits,
/// rounded down (a pod told slightly less time than is left stops no later than the client).
pub fn format_grpc_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let units = [
        (d.as_nanos(), "n"),
        (d.as_micros(), "u"),
        (d.as_millis(), "m"),
        (d.as_secs() as u128, "S"),
        (d.as_secs() as u128 / 60, "M"),
        (d.as_secs() as u128 / 3600, "H"),
    ];
    let (n, unit) = units
        .into_iter()
        .find(|(n, _)| *n <= MAX)
        .unwrap_or((MAX, "H"));
    format!("{n}{unit}")
}

pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub fn is_grpc(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

pub async fn write_text(
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

#[cfg(test)]
mod tests {
    use super::{format_grpc_timeout, grpc_message, parse_grpc_timeout};
    use std::time::Duration;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message("queue full: 100% busy, ünïcode\n"),
            "queue full: 100%25 busy, %C3%BCn%C3%AFcode"
        );
    }

    #[test]
    fn grpc_timeout_follows_the_spec() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_grpc_timeout("499953u"),
            Some(Duration::from_micros(499_953))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "5x", "-5m", "5 m", "5ms"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeout_is_written_in_at_most_eight_digits() {
        assert_eq!(format_grpc_timeout(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(format_grpc_timeout(Duration::from_millis(499)), "499000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(5)), "5000000u");
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(30 * 60)),
            "1800000m"
        );
        assert_eq!(
            format_grpc_timeout(Duration::from_secs(400 * 3600)),
            "1440000S"
        );
        assert_eq!(format_grpc_timeout(Duration::ZERO), "0n");
        for d in [
            Duration::from_micros(123_456_789),
            Duration::from_secs(7 * 86_400),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(back <= d && d - back < d / 1000, "{d:?} -> {back:?}");
        }
    }
}
