//! lb-agent: a strict least-in-flight load balancer for compute services on Kubernetes.
//!
//! Every request goes to the pod with the fewest requests in flight, no pod ever holds more
//! than its `limit`, and when every pod is full requests wait in a FIFO queue. Pods are learned
//! from the target's headless Service DNS name. Built on Pingora.
//!
//! [`build_server`] turns a validated [`config::Config`] into a Pingora server; `main.rs` only
//! parses arguments and calls it. The routes and pools in force live in [`live::Live`], which
//! [`reload`] swaps when the config file changes.

pub mod admin;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod fakepod;
pub mod live;
pub mod loadgen;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod selection;
pub mod shutdown;

use pingora::apps::HttpServerOptions;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use live::Live;
use proxy::LbProxy;

/// Seconds Pingora's runtimes get to finish after the grace period.
const FINAL_SHUTDOWN_SECS: u64 = 1;

/// A built server, ready to run.
pub struct Agent {
    server: Server,
    live: Arc<Live>,
    grace: Duration,
}

impl Agent {
    /// Runs until SIGTERM (graceful, see [`shutdown`]), SIGINT (fast) or SIGQUIT, then exits.
    pub fn run(self) -> ! {
        let drain = shutdown::DrainOnTerm {
            live: self.live,
            grace: self.grace,
        };
        self.server.run(RunArgs {
            shutdown_signal: Box::new(drain),
        });
        std::process::exit(0)
    }
}

/// Builds the Pingora server: the proxy on `listen`, the admin endpoints on `admin_listen`, and
/// the config background service (DNS discovery, and reloads of `config_path` if given).
pub fn build_server(config: &Config, config_path: Option<&Path>) -> Result<Agent, String> {
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

    let live = Live::new(config)?;
    server.add_service(background_service(
        "config and discovery",
        reload::ConfigService::new(
            Arc::clone(&live),
            config_path.map(Path::to_path_buf),
            config.reload_interval,
        ),
    ));

    let mut proxy = http_proxy_service(
        &server.configuration,
        LbProxy::new(Arc::clone(&live), config.max_attempts),
    );
    // HTTP/1.1 and cleartext HTTP/2 (prior knowledge, what gRPC clients use in a cluster) on
    // the same port: Pingora looks for the HTTP/2 preface on each new connection.
    if let Some(app) = proxy.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    proxy.add_tcp(&config.listen);
    server.add_service(proxy);

    if let Some(admin_listen) = &config.admin_listen {
        let app = admin::AdminApp {
            live: Arc::clone(&live),
        };
        let mut admin = Service::new("admin".to_string(), app);
        admin.add_tcp(admin_listen);
        server.add_service(admin);
    }
    Ok(Agent {
        server,
        live,
        grace: Duration::from_secs(grace_secs),
    })
}
