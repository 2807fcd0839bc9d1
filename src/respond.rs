//! Refusals in HTTP and gRPC form: the answers lb-agent writes itself when it does not send a
//! request to a pod (no route, queue full or timed out, no pod reachable, shutting down).
//!
//! An HTTP client gets a short `text/plain` body with a status code (and `Retry-After` when
//! trying again later can help); a gRPC client gets a gRPC status it can act on.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Seconds a refused client is told to wait before trying again.
const RETRY_AFTER_SECS: u64 = 1;

/// gRPC status codes lb-agent answers with itself.
pub mod grpc_status {
    /// The call can be retried (queue full or timed out, no pod reachable, shutting down).
    pub const UNAVAILABLE: u32 = 14;
    /// No route for the method.
    pub const UNIMPLEMENTED: u32 = 12;
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

/// Refuses a gRPC call the way gRPC clients understand: a "trailers-only" response, HTTP 200
/// with `grpc-status` and `grpc-message` in the one and only header block.
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
    session.write_response_header(Box::new(resp), true).await
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
    use super::grpc_message;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message("queue full: 100% busy, ünïcode\n"),
            "queue full: 100%25 busy, %C3%BCn%C3%AFcode"
        );
    }
}
