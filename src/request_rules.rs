//! What Pingora's upstream side would refuse or pass on garbled, refused at the front door.
//!
//! A request takes a slot (and maybe waits for it in the queue) before Pingora builds the
//! request it sends to the pod. Pingora 0.9.1 checks a few headers only then
//! (`pingora-proxy` `proxy_common.rs`, `ConnectionNominations::parse`): a request it refuses
//! there had taken a slot and a pooled pod connection for nothing, and the refusal surfaced as
//! a downstream error, which read as "client gone". A hostile client could pin slots that way.
//! The same rules are applied here, before any slot is taken, and such requests get `400`.
//!
//! Also here: a `Content-Length` sent as several equal values (`5, 5`, or two headers) is
//! collapsed to one (RFC 9110 §8.6 lets a recipient do so); differing values are refused.
//! Pingora would otherwise pass the list on, and the pod's own `400` came back as a `502`
//! counted against the pod.

use http::header::{CONNECTION, CONTENT_LENGTH};
use pingora::http::RequestHeader;

/// Pingora's own bound on `Connection` nominations (`MAX_CONNECTION_NOMINATIONS`).
const MAX_CONNECTION_NOMINATIONS: usize = 10;

/// Headers a `Connection` header may not nominate for removal (Pingora refuses them).
const PROTECTED: [&str; 4] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Checks `req` against the rules above, normalising what may be normalised. `Err` says why
/// the request is refused.
pub fn check(req: &mut RequestHeader) -> Result<(), String> {
    check_connection(req)?;
    collapse_content_length(req)
}

/// `Connection` nominates hop-by-hop headers by name: each must be an HTTP token (RFC 9110
/// §5.6.2), not a pseudo-header, not a protected header, and there may not be too many.
fn check_connection(req: &RequestHeader) -> Result<(), String> {
    let tokens = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    for (i, token) in tokens.enumerate() {
        if i + 1 >= MAX_CONNECTION_NOMINATIONS {
            return Err("too many Connection header options".into());
        }
        if !token.iter().all(|b| is_tchar(*b)) {
            return Err(format!(
                "Connection header option {:?} is not a token",
                String::from_utf8_lossy(token)
            ));
        }
        let name = token.to_ascii_lowercase();
        if PROTECTED.iter().any(|p| p.as_bytes() == name.as_slice()) {
            return Err(format!(
                "Connection header may not name {}",
                String::from_utf8_lossy(&name)
            ));
        }
    }
    Ok(())
}

fn collapse_content_length(req: &mut RequestHeader) -> Result<(), String> {
    let values: Vec<&[u8]> = req
        .headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    let Some(first) = values.first().copied() else {
        return Ok(());
    };
    if values.len() == 1 && req.headers.get_all(CONTENT_LENGTH).iter().count() == 1 {
        return Ok(());
    }
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Err("invalid Content-Length".into());
    }
    if values.iter().any(|v| *v != first) {
        return Err("conflicting Content-Length values".into());
    }
    let one = String::from_utf8_lossy(first).into_owned();
    req.insert_header(CONTENT_LENGTH, one)
        .map_err(|e| format!("invalid Content-Length: {e}"))
}

/// An HTTP `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/a", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn connection_options_pingora_would_refuse_are_refused() {
        for bad in ["\"x\"", "x-forwarded-for", "Host", "a b", ":authority"] {
            assert!(check(&mut req(&[("connection", bad)])).is_err(), "{bad}");
        }
        let many = (0..10)
            .map(|i| format!("x{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(check(&mut req(&[("connection", &many)])).is_err());
        assert!(check(&mut req(&[("connection", "keep-alive, x-trace")])).is_ok());
    }

    #[test]
    fn equal_content_lengths_collapse_and_differing_ones_are_refused() {
        let mut r = req(&[("content-length", "5, 5")]);
        check(&mut r).unwrap();
        let all: Vec<_> = r.headers.get_all(CONTENT_LENGTH).iter().collect();
        assert_eq!(all, vec!["5"]);
        let mut r = req(&[("content-length", "5"), ("content-length", "5")]);
        check(&mut r).unwrap();
        assert_eq!(r.headers.get_all(CONTENT_LENGTH).iter().count(), 1);
        assert!(check(&mut req(&[("content-length", "5, 6")])).is_err());
        assert!(check(&mut req(&[("content-length", "5")])).is_ok());
    }
}
