//! A minimal HTTP/1.1 client (hyper) for the demo, the tests and `bench/`: one request per
//! connection (`connection: close`), so that every request is a separate client that can also
//! be abandoned on its own, and the balancer sees a new connection each time, as it would from
//! many independent callers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// From sending the request to reading the whole response.
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn invalid(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
}

/// hyper's errors as `io::Error`s, the error type the tests and the demo already handle; an
/// I/O error inside keeps its kind (a refused connection stays `ConnectionRefused`).
fn io_error(e: hyper::Error) -> std::io::Error {
    use std::error::Error as _;
    let kind = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map_or(std::io::ErrorKind::Other, |io| io.kind());
    std::io::Error::new(kind, e)
}

/// Sends one request (`connection: close`) and reads the whole response.
///
/// `headers` are added after `host` and `connection` (a name given twice is sent twice);
/// `content-length` is sent when there is a body, and for POST and PUT even without one.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let method = Method::from_bytes(method.as_bytes()).map_err(invalid)?;
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(invalid)?;
    let h = req.headers_mut();
    h.append(
        http::header::HOST,
        HeaderValue::from_str(&addr.to_string()).map_err(invalid)?,
    );
    h.append(http::header::CONNECTION, HeaderValue::from_static("close"));
    for (n, v) in headers {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).map_err(invalid)?,
            HeaderValue::from_str(v).map_err(invalid)?,
        );
    }
    if !body.is_empty() || method == Method::POST || method == Method::PUT {
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }

    let start = Instant::now();
    let conn = TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(io_error)?;
    // Drives the connection; it ends after the response, since the request asked to close.
    let driver = tokio::spawn(connection);
    let resp = sender.send_request(req).await.map_err(io_error)?;
    let (head, body) = resp.into_parts();
    let body = body.collect().await.map_err(io_error)?.to_bytes();
    let elapsed = start.elapsed();
    driver.abort();
    Ok(Response {
        status: head.status.as_u16(),
        headers: head
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        elapsed,
    })
}

/// `GET path` with extra headers.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    request(addr, "GET", path, headers, b"").await
}
