//! lb-agent: a strict least-in-flight load balancer for compute services on Kubernetes.
//!
//! Every request goes to the pod with the fewest requests in flight, no pod ever holds more
//! than its `limit`, and when every pod is full requests wait in a FIFO queue. Pods are learned
//! from the target's headless Service DNS name. Built on Pingora.
//!
//! [`build_server`] turns a validated [`config::Config`] into a Pingora server; `main.rs` only
//! parses arguments and calls it.

pub mod admin;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod fakepod;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod selection;
pub mod shutdown;

use futures::FutureExt;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use config::{Config, Target};
use discovery::DnsDiscovery;
use pool::Pool;
use proxy::{LbProxy, RouteEntry};
use route::RouteTable;
use selection::Balancer;

/// Seconds Pingora's runtimes get to finish after the grace period.
const FINAL_SHUTDOWN_SECS: u64 = 1;

/// A built server, ready to run.
pub struct Agent {
    server: Server,
    pools: Vec<Arc<Balancer>>,
    grace: Duration,
}

impl Agent {
    /// Runs until SIGTERM (graceful, see [`shutdown`]), SIGINT (fast) or SIGQUIT, then exits.
    pub fn run(self) -> ! {
        let drain = shutdown::DrainOnTerm {
            pools: self.pools,
            grace: self.grace,
        };
        self.server.run(RunArgs {
            shutdown_signal: Box::new(drain),
        });
        std::process::exit(0)
    }
}

/// Builds the Pingora server: the proxy on `listen`, the admin endpoints on `admin_listen`,
/// and one DNS discovery background service per distinct DNS name.
pub fn build_server(config: &Config) -> Result<Agent, String> {
    // Pingora sleeps `grace_period_seconds` after SIGTERM, then gives its runtimes
    // FINAL_SHUTDOWN_SECS: together they make up `shutdown_grace` (never Pingora's 300 s default).
    let grace_secs = config
        .shutdown_grace
        .as_secs()
        .saturating_sub(FINAL_SHUTDOWN_SECS);
    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(grace_secs),
        graceful_shutdown_timeout_seconds: Some(FINAL_SHUTDOWN_SECS),
        // Total attempts per request; our fail_to_connect decides which are retried.
        max_retries: config.max_attempts,
        ..ServerConf::default()
    }
    .validate()
    .map_err(|e| format!("invalid server settings: {e}"))?;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let balancers: Vec<Arc<Balancer>> = config
        .pools
        .iter()
        .map(|p| Arc::new(Balancer::new(Pool::new(p.name.clone(), p.limit))))
        .collect();

    // Static pods are known now; DNS names get a discovery service each, shared by every pool
    // (port) behind the name.
    let mut by_host: BTreeMap<String, Vec<(u16, Arc<Balancer>)>> = BTreeMap::new();
    for (pc, b) in config.pools.iter().zip(&balancers) {
        match &pc.target {
            Target::Static(addrs) => {
                b.set_pods(addrs.iter().copied().collect())
                    .now_or_never()
                    .ok_or("static pod list did not apply synchronously")?;
            }
            Target::Dns { host, port } => by_host
                .entry(host.clone())
                .or_default()
                .push((*port, Arc::clone(b))),
        }
    }
    for (host, pools) in by_host {
        let d = DnsDiscovery::new(host.clone(), pools, config.dns.clone());
        server.add_service(background_service(&format!("dns {host}"), d));
    }

    let table = RouteTable::new(&config.routes, |r| {
        Arc::new(RouteEntry {
            uri: r.uri.clone(),
            balancer: Arc::clone(&balancers[r.pool]),
            queue: r.queue,
        })
    });
    let mut proxy = http_proxy_service(
        &server.configuration,
        LbProxy::new(table, config.connect_timeout, config.max_attempts),
    );
    proxy.add_tcp(&config.listen);
    server.add_service(proxy);

    if let Some(admin_listen) = &config.admin_listen {
        let app = admin::AdminApp {
            routes: config
                .routes
                .iter()
                .map(|r| admin::RouteInfo {
                    uri: r.uri.clone(),
                    pool: r.pool,
                })
                .collect(),
            pools: balancers.clone(),
        };
        let mut admin = Service::new("admin".to_string(), app);
        admin.add_tcp(admin_listen);
        server.add_service(admin);
    }
    Ok(Agent {
        server,
        pools: balancers,
        grace: Duration::from_secs(grace_secs),
    })
}
