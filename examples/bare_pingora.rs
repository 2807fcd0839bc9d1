//! The floor lb-agent stands on: a Pingora proxy with one fixed peer and no logic at all.
//!
//! bench/'s overhead part runs it beside lb-agent ("pingora (bare)") to show what Pingora itself
//! costs per request, so that lb-agent's own cost is the difference. It is built from the
//! workspace (`cargo build --release --example bare_pingora`, with the plain `release` profile,
//! never the tuned `dist` one lb-agent ships with) and is not part of the image.
//!
//! Run it: `cargo run --release --example bare_pingora -- 127.0.0.1:6188 127.0.0.1:8000`
//! then `curl -v 127.0.0.1:6188/`.
//!
//! One worker thread (Pingora's default, as lb-agent's bench config), no per-request logging
//! (no logger is installed), no route, no slot, no header rewriting: `upstream_peer` hands back
//! a clone of the one peer given on the command line.

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
    let [listen, peer] = args.as_slice() else {
        eprintln!(
            "usage: bare_pingora LISTEN_ADDR PEER_ADDR   (e.g. 127.0.0.1:6188 127.0.0.1:8000)"
        );
        std::process::exit(2);
    };
    let peer: SocketAddr = peer.parse().unwrap_or_else(|e| {
        eprintln!("bare_pingora: PEER_ADDR {peer:?}: {e}");
        std::process::exit(2)
    });
    // Pingora's defaults (one thread per service), except that SIGTERM stops it at once: the
    // bench starts and stops it many times and has nothing to drain.
    let conf = ServerConf {
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
