//! lb-agent: a strict least-in-flight load balancer for compute services on Kubernetes.
//!
//! Every request goes to the pod with the fewest requests in flight, no pod ever holds more
//! than its `limit`, and when every pod is full requests wait in a FIFO queue. Pods are learned
//! from the target's headless Service DNS name. Built on Pingora.
//!
//! [`build_server`] turns a validated [`config::Config`] into a Pingora server; `main.rs` only
//! parses arguments and calls it. The routes and pools in force live in [`live::Live`], which
//! [`reload`] swaps when the config file changes.

pub mod abandoned;
mod abandoned_h2;
pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod front;
pub mod jobs;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod plan;
mod pooled;
pub mod proxy;
pub mod reload;
mod request_rules;
pub mod respond;
pub mod response_buffer;
pub mod route;
pub mod shutdown;
pub mod state_metrics;
pub mod stopping;

use pingora::apps::HttpServerOptions;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::proxy::http_proxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use live::Live;
use proxy::LbProxy;

/// Concurrent HTTP/2 streams a client connection may open (calls running plus queued);
/// further calls wait in the client until one ends.
const H2_STREAMS_PER_CLIENT_CONNECTION: u32 = 256;

/// HTTP/2 flow-control window per stream (the protocol's default, 64 KiB − 1).
const H2_STREAM_WINDOW: u32 = 65_535;

/// Why the server could not be built (the process exits with this one line).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Pingora refused the server settings derived from the config.
    #[error("invalid server settings: {0}")]
    Server(#[source] Box<pingora::Error>),
    #[error(transparent)]
    Live(#[from] live::LiveError),
    #[error(transparent)]
    Ledger(#[from] balance::shared::LedgerError),
    #[error("cannot start the ledger's runtime: {0}")]
    LedgerRuntime(#[source] std::io::Error),
    /// `listen` or `admin_listen` cannot be bound (in use, or not an address of this host).
    #[error("{field}: cannot listen on {addr}: {source}")]
    Listen {
        field: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` and lets it go at once, so that a port another process holds is a start-up
/// error naming the field. Pingora binds its services' ports later, each on its own thread,
/// and a failed bind there ends only that thread: the process would run on without its proxy.
fn check_can_listen(field: &'static str, addr: std::net::SocketAddr) -> Result<(), StartError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartError::Listen {
            field,
            addr,
            source,
        })
}

/// The in-process ledger, or the Redis one of `ledger.redis`. The Redis client's own tasks
/// (keep-alive, grants) run on a small runtime of their own that lives as long as the
/// process: Pingora's runtimes belong to its services and start later.
fn open_ledger(config: &Config) -> Result<balance::Ledger, StartError> {
    let Some(url) = &config.ledger.redis else {
        return Ok(balance::Ledger::new());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ledger")
        .enable_all()
        .build()
        .map_err(StartError::LedgerRuntime)?;
    let options = balance::shared::LedgerOptions {
        lease_ttl: config.ledger.lease_ttl,
        recovery_hold: config.ledger.recovery_hold,
        io_timeout: balance::shared::DEFAULT_IO_TIMEOUT,
    };
    let redis = runtime.block_on(balance::shared::RedisLedger::connect_with(
        url,
        agent_id(),
        options,
    ))?;
    log::info!(
        "ledger: shared through {} as agent {} (lease_ttl {:?})",
        url.rsplit('@').next().unwrap_or(url),
        redis.agent(),
        config.ledger.lease_ttl
    );
    // Lives as long as the process, like the leases its tasks keep alive.
    std::mem::forget(runtime);
    Ok(balance::Ledger::shared(redis))
}

/// This process's name in the shared ledger: the pod name (HOSTNAME in Kubernetes), the pid
/// and the start time, so a restarted agent is a new agent and never renews a dead one's leases.
fn agent_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "lb-agent".to_string());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(63)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{}-{:x}", host, std::process::id(), nanos)
}

/// A built server, ready to run.
pub struct Agent {
    server: Server,
    live: Arc<Live>,
    grace: Duration,
    delay: Duration,
}

impl Agent {
    /// Runs until SIGTERM (graceful, see [`shutdown`]), SIGINT (fast) or SIGQUIT, then exits.
    pub fn run(self) -> ! {
        let drain = shutdown::DrainOnTerm {
            live: self.live,
            delay: self.delay,
            grace: self.grace,
        };
        self.server.run(RunArgs {
            shutdown_signal: Box::new(drain),
        });
        std::process::exit(0)
    }
}

/// A config that sets neither `shutdown_delay` nor `shutdown_grace` (the Go agent's) gets the
/// defaults, which need a `terminationGracePeriodSeconds` of 36 while the Go agent's Deployment
/// keeps 30; the process cannot read the pod's grace period, so it says so once.
fn warn_if_grace_unset(config: &Config, bytes: &[u8]) {
    let keys = serde_yaml::from_slice::<serde_yaml::Mapping>(bytes).unwrap_or_default();
    if keys.contains_key("shutdown_delay") || keys.contains_key("shutdown_grace") {
        return;
    }
    let need = config.shutdown_delay + config.shutdown_grace + std::time::Duration::from_secs(1);
    log::warn!(
        "shutdown: the config sets neither shutdown_delay nor shutdown_grace; the defaults \
         ({:?} + {:?}) need terminationGracePeriodSeconds >= {} (the Go agent's Deployment has \
         30; `docker stop` waits 10 s unless given -t). Set it, or set shutdown_grace in the config",
        config.shutdown_delay,
        config.shutdown_grace,
        need.as_secs()
    );
}

/// Builds the Pingora server: the proxy on `listen`, the admin endpoints on `admin_listen`, and
/// the config background service (DNS discovery, and reloads of the `source` file if given, on
/// SIGHUP too if `hangup` is given).
pub fn build_server(
    config: &Config,
    source: Option<reload::Source>,
    hangup: Option<reload::Hangup>,
) -> Result<Agent, StartError> {
    if let Some(source) = &source {
        warn_if_grace_unset(config, &source.bytes);
    }
    // Pingora sleeps `grace_period_seconds` (whole seconds) after the shutdown delay, then stops
    // its runtimes: give it more than our grace, so the drain thread's exact deadline (or an
    // earlier exit once drained) is what ends the process, never Pingora's rounding.
    let conf = ServerConf {
        threads: config.threads,
        // Each proxy thread runs its own single-threaded runtime. Tokio's work-stealing
        // scheduler runs the most recently spawned task first (its "LIFO slot"), so in a burst
        // the connection accepted last reached the queue first and jumped ahead of everyone:
        // FIFO must mean arrival order. A single-threaded runtime runs new tasks in the order
        // they were spawned.
        work_stealing: false,
        grace_period_seconds: Some(shutdown::pingora_grace_secs(config.shutdown_grace)),
        graceful_shutdown_timeout_seconds: Some(shutdown::PINGORA_RUNTIME_SHUTDOWN_SECS),
        // Total attempts per request (our fail_to_connect and error_while_proxy decide which
        // are retried): connection attempts, plus pooled connections found closed by their
        // pod, which are not connection attempts (nothing was sent).
        max_retries: config.max_attempts + proxy::STALE_CONNECTION_RETRIES,
        ..ServerConf::default()
    }
    .validate()
    .map_err(StartError::Server)?;
    check_can_listen("listen", config.listen)?;
    if let Some(admin_listen) = config.admin_listen {
        check_can_listen("admin_listen", admin_listen)?;
    }
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let live = Live::new(config, open_ledger(config)?)?;
    state_metrics::sample_from(&live);
    server.add_service(background_service(
        "config and discovery",
        reload::ConfigService::new(Arc::clone(&live), source, config.reload_interval, hangup),
    ));

    let mut app = http_proxy(
        &server.configuration,
        LbProxy::new(Arc::clone(&live), config.max_attempts, config.client),
    );
    // HTTP/1.1 and cleartext HTTP/2 (prior knowledge, what gRPC clients use in a cluster) on
    // the same port: Pingora looks for the HTTP/2 preface on each new connection.
    {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        // An HTTP/2 connection with no stream open is closed like an idle kept-alive one.
        options.h2_idle_timeout = Some(config.client.keepalive_timeout);
        app.server_options = Some(options);
        // A queued call is an open stream whose request body waits unread (so a reset can still
        // take it out of the queue). Unread bodies hold HTTP/2 flow-control window; with the
        // default 64 KiB connection window, a few queued calls with large messages would
        // starve the call at the head of the queue of its own body: a deadlock. A connection
        // window of streams × stream window means each stream only ever blocks on its own
        // window. Worst-case memory: 16 MiB of buffered request data per client connection.
        let mut h2 = default_h2_options();
        h2.max_concurrent_streams(H2_STREAMS_PER_CLIENT_CONNECTION);
        h2.initial_window_size(H2_STREAM_WINDOW);
        h2.initial_connection_window_size(H2_STREAMS_PER_CLIENT_CONNECTION * H2_STREAM_WINDOW);
        // The same bound on a request's header fields as HTTP/1.1 gets.
        h2.max_header_list_size(config.client.max_header_size as u32);
        app.h2_options = Some(h2);
    }
    let mut proxy = Service::new(
        "lb-agent proxy".to_string(),
        front::Front::new(app, config.client),
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);

    if let Some(admin_listen) = &config.admin_listen {
        let app = admin::AdminApp {
            live: Arc::clone(&live),
            proxy: admin::ProxyListening::new(config.listen),
        };
        let mut admin = Service::new("admin".to_string(), app);
        admin.add_tcp(&admin_listen.to_string());
        server.add_service(admin);
    }
    Ok(Agent {
        server,
        live,
        grace: config.shutdown_grace,
        delay: config.shutdown_delay,
    })
}
