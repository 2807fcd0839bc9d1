//! The floor lb-agent stands on: a Pingora proxy with one fixed peer and no logic at all.
//!
//! bench/'s overhead part runs it beside lb-agent ("pingora (bare)") to show what Pingora itself
//! costs per request, so that lb-agent's own cost is the difference. A floor only counts if it
//! is built and run like lb-agent: bench/ builds it with the same `dist` profile
//! (`cargo build --profile dist --example bare_pingora`), and it runs the same runtime as
//! lb-agent (one single-threaded tokio runtime per worker thread, `work_stealing: false`) with
//! the same number of worker threads. It is not part of the image.
//!
//! Run it: `cargo run --profile dist --example bare_pingora -- 127.0.0.1:6188 127.0.0.1:8000 1`
//! then `curl -v 127.0.0.1:6188/`.
//!
//! THREADS (default 1, as lb-agent's `threads`) worker threads, no per-request logging (no
//! logger is installed), no route, no slot, no header rewriting: `upstream_peer` hands back a
//! clone of the one peer given on the command line.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

struct Bare {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, peer, threads) = match args.as_slice() {
        [listen, peer] => (listen, peer, "1"),
        [listen, peer, threads] => (listen, peer, threads.as_str()),
        _ => {
            eprintln!(
                "usage: bare_pingora LISTEN_ADDR PEER_ADDR [THREADS]   (e.g. 127.0.0.1:6188 127.0.0.1:8000 1)"
            );
            std::process::exit(2);
        }
    };
    let threads: usize = match threads.parse() {
        Ok(n) if n >= 1 => n,
        _ => {
            eprintln!("bare_pingora: THREADS {threads:?}: a whole number of at least 1");
            std::process::exit(2)
        }
    };
    let peer: SocketAddr = peer.parse().unwrap_or_else(|e| {
        eprintln!("bare_pingora: PEER_ADDR {peer:?}: {e}");
        std::process::exit(2)
    });
    // lb-agent's runtime (see its src/lib.rs): `threads` single-threaded runtimes. SIGTERM stops
    // it at once: the bench starts and stops it many times and has nothing to drain.
    let conf = ServerConf {
        threads,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            peer: HttpPeer::new(peer, false, String::new()),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
