//! The YAML config: the file format (compatible with the Go lb-agent) and the validated
//! [`Config`] the rest of the crate uses.
//!
//! The two are kept apart on purpose: the file format has to accept the Go agent's field
//! names (`K8s_port`, `http_port`, …) and leave everything optional, while the rest of the
//! code wants resolved values (durations parsed, defaults applied, a pool per target).
//! Every validation error names the field it is about (`routes[1].limit: must be at least 1`).

use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is looked for when `-c` is not given: the repo-relative path the Go agent
/// used, then the absolute path its container image used.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = [
    "conf/config.yaml",
    "/usr/local/services/ai-media/conf/config.yaml",
];

/// Upper bounds of the shutdown settings: far beyond any sane value, and they keep the
/// deadline arithmetic far from overflowing.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(600);

/// A config problem, always naming the field (or the file) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Go agent: raises the log level to debug.
    #[serde(default)]
    debug: bool,
    port: Option<u16>,
    log_file: Option<String>,
    /// Go agent: path of a kubeconfig. Accepted and ignored: discovery uses DNS.
    #[allow(dead_code)]
    kube_config_file: Option<String>,
    listen: Option<String>,
    threads: Option<usize>,
    admin_listen: Option<String>,
    cluster_domain: Option<String>,
    #[serde(default)]
    dns: FileDns,
    #[serde(default)]
    queue: FileQueue,
    connect_timeout: Option<String>,
    upstream_idle_timeout: Option<String>,
    max_attempts: Option<usize>,
    shutdown_grace: Option<String>,
    shutdown_delay: Option<String>,
    reload_interval: Option<String>,
    #[serde(default)]
    client: FileClient,
    #[serde(default)]
    routes: Vec<FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    header_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    timeout: Option<String>,
    max_header_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDns {
    nameservers: Option<Vec<String>>,
    refresh_interval: Option<String>,
    stability_samples: Option<usize>,
    stability_interval: Option<String>,
    unstable_retry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueue {
    max_waiting: Option<usize>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    uri: Option<String>,
    #[serde(rename = "match")]
    match_kind: Option<String>,
    limit: Option<usize>,
    service_name: Option<String>,
    namespace: Option<String>,
    http_port: Option<u16>,
    /// Older Go route form: a full DNS name …
    k8s_host: Option<String>,
    /// … and its port, spelled with a capital K in those configs.
    #[serde(rename = "K8s_port", alias = "k8s_port")]
    k8s_port: Option<u16>,
    host: Option<String>,
    endpoints: Option<Vec<String>>,
    queue: Option<FileQueue>,
    protocol: Option<String>,
    client_abort: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated config
// ---------------------------------------------------------------------------------------------

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub debug: bool,
    /// Where the proxy listens (`listen`, or `0.0.0.0:<port>`).
    pub listen: String,
    pub admin_listen: Option<String>,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub dns: DnsConfig,
    pub connect_timeout: Duration,
    /// A kept-alive connection to a pod idle longer than this is closed rather than reused
    /// (zero: never reused), so that a request is not sent on a connection the pod is closing.
    pub upstream_idle_timeout: Duration,
    /// Attempts per request on connect failure (each on a different pod).
    pub max_attempts: usize,
    /// After the shutdown delay, the longest the drain waits for requests (see `shutdown`).
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long new connections are still accepted (not ready meanwhile).
    pub shutdown_delay: Duration,
    /// How often the config file is checked for changes (zero: only on SIGHUP).
    pub reload_interval: Duration,
    /// What a client connection may cost before it is closed (slow, idle or oversized).
    pub client: ClientLimits,
    pub routes: Vec<RouteConfig>,
    /// One entry per distinct target; routes refer to it by index.
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Empty: follow /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub refresh_interval: Duration,
    pub stability_samples: usize,
    pub stability_interval: Duration,
    pub unstable_retry: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            refresh_interval: Duration::from_secs(2),
            stability_samples: 5,
            stability_interval: Duration::from_millis(500),
            unstable_retry: Duration::from_secs(10),
        }
    }
}

/// Bounds on what one client connection may hold: the defaults follow NGINX
/// (`client_header_timeout 60s`, `keepalive_timeout 75s`, `send_timeout 60s`,
/// `large_client_header_buffers 4 8k`), so a slow or idle client costs a bounded amount of time
/// and memory and cannot pin a pod's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// From the first byte of a request (or the connection's start) to the end of its header.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may sit idle between requests.
    pub keepalive_timeout: Duration,
    /// How long a write to the client may make no progress (a client that stops reading).
    pub timeout: Duration,
    /// Largest request header (request line and all fields) accepted; larger gets 431.
    pub max_header_size: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            timeout: Duration::from_secs(60),
            max_header_size: 32 * 1024,
        }
    }
}

/// What happens to a request already sent to a pod when its client goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAbort {
    /// The pod's exchange runs to its end (its response is read and dropped) and only then is
    /// the slot freed: a compute pod usually keeps working after its client left.
    #[default]
    Finish,
    /// The connection to the pod is closed and the slot freed at once: for pods that stop
    /// working when their client disconnects.
    Cancel,
}

/// How long and how many requests may wait when every pod of a pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    pub max_waiting: usize,
    pub timeout: Duration,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self {
            max_waiting: 1000,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Prefix,
}

/// What lb-agent speaks to a route's pods. Clients may use HTTP/1.1 or h2c either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// Cleartext HTTP/2 with prior knowledge: gRPC services. Calls to a pod share connections.
    H2c,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub uri: String,
    pub match_kind: MatchKind,
    pub pool: usize,
    pub queue: QueuePolicy,
    pub protocol: UpstreamProtocol,
    pub client_abort: ClientAbort,
}

/// Where a pool's pods come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A DNS name whose A/AAAA records are the pods (a headless Service).
    Dns { host: String, port: u16 },
    /// A fixed list of pods.
    Static(Vec<SocketAddr>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dns { host, port } => write!(f, "{host}:{port}"),
            Target::Static(addrs) => {
                let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                write!(f, "static[{}]", list.join(","))
            }
        }
    }
}

/// The per-pod slots shared by every route that targets the same service and port.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub target: Target,
    pub limit: usize,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Finds the config file: the given path, else the first default path that exists.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        DEFAULT_CONFIG_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                ConfigError::new(
                    "",
                    format!(
                        "no config file given (-c PATH) and none found at {}",
                        DEFAULT_CONFIG_PATHS.join(" or ")
                    ),
                )
            })
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = serde_yaml::from_str(text).map_err(yaml_error)?;
        validate(file)
    }
}

/// serde_yaml reports unknown fields as "routes[0]: unknown field `limt`, expected …"
/// which already carries the path; keep it, and say where in the file it is.
fn yaml_error(e: serde_yaml::Error) -> ConfigError {
    let location = e
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    ConfigError::new("", format!("{e}{location}"))
}

/// Default of `upstream_idle_timeout` (see its validation for the reasoning).
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longer than any server keep-alive we know of: a larger value would only bring the race back.
const MAX_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn duration(
    field: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            ConfigError::new(
                field,
                format!("bad duration {s:?} ({e}); write it like 500ms, 30s or 2m"),
            )
        }),
    }
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("{value:?} is not an IP:PORT address (e.g. 127.0.0.1:8080 or [::1]:8080)"),
        )
    })
}

fn queue_policy(
    prefix: &str,
    q: &FileQueue,
    base: QueuePolicy,
) -> Result<QueuePolicy, ConfigError> {
    let timeout = duration(&format!("{prefix}.timeout"), &q.timeout, base.timeout)?;
    if timeout.is_zero() {
        return Err(ConfigError::new(
            format!("{prefix}.timeout"),
            "must be greater than 0 (use max_waiting: 0 to refuse instead of queueing)",
        ));
    }
    Ok(QueuePolicy {
        max_waiting: q.max_waiting.unwrap_or(base.max_waiting),
        timeout,
    })
}

fn validate(f: FileConfig) -> Result<Config, ConfigError> {
    let listen = match (&f.listen, f.port) {
        (Some(l), _) => {
            socket_addr("listen", l)?;
            l.trim().to_string()
        }
        (None, Some(0)) | (None, None) => "0.0.0.0:8080".to_string(),
        (None, Some(p)) => format!("0.0.0.0:{p}"),
    };
    let admin_listen = match &f.admin_listen {
        Some(a) => {
            let addr = socket_addr("admin_listen", a)?;
            if addr.to_string() == listen || a.trim() == listen {
                return Err(ConfigError::new(
                    "admin_listen",
                    "must differ from the proxy's listen address",
                ));
            }
            Some(a.trim().to_string())
        }
        None => None,
    };
    let threads = f.threads.unwrap_or(1);
    if threads == 0 {
        return Err(ConfigError::new("threads", "must be at least 1"));
    }
    let cluster_domain = f
        .cluster_domain
        .clone()
        .unwrap_or_else(|| "cluster.local".to_string());
    if cluster_domain.trim().is_empty() {
        return Err(ConfigError::new("cluster_domain", "must not be empty"));
    }

    let d = DnsConfig::default();
    let mut nameservers = Vec::new();
    for (i, ns) in f.dns.nameservers.iter().flatten().enumerate() {
        let field = format!("dns.nameservers[{i}]");
        // A bare IP means port 53, as in resolv.conf.
        let addr = match ns.trim().parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => socket_addr(&field, ns)?,
        };
        nameservers.push(addr);
    }
    let dns = DnsConfig {
        nameservers,
        refresh_interval: duration(
            "dns.refresh_interval",
            &f.dns.refresh_interval,
            d.refresh_interval,
        )?,
        stability_samples: f.dns.stability_samples.unwrap_or(d.stability_samples),
        stability_interval: duration(
            "dns.stability_interval",
            &f.dns.stability_interval,
            d.stability_interval,
        )?,
        unstable_retry: duration(
            "dns.unstable_retry",
            &f.dns.unstable_retry,
            d.unstable_retry,
        )?,
    };
    if dns.stability_samples == 0 {
        return Err(ConfigError::new(
            "dns.stability_samples",
            "must be at least 1",
        ));
    }
    if dns.refresh_interval.is_zero() {
        return Err(ConfigError::new(
            "dns.refresh_interval",
            "must be greater than 0",
        ));
    }

    let queue = queue_policy("queue", &f.queue, QueuePolicy::default())?;
    let connect_timeout = duration(
        "connect_timeout",
        &f.connect_timeout,
        Duration::from_secs(2),
    )?;
    if connect_timeout.is_zero() {
        return Err(ConfigError::new(
            "connect_timeout",
            "must be greater than 0",
        ));
    }
    // Below the shortest common server keep-alive timeouts (gunicorn 2s; Node.js and uvicorn
    // 5s), so lb-agent drops an idle connection before the pod does: a request written on a
    // connection the pod is closing at that moment fails, and is never re-sent (it may have
    // started). A new connection costs one round trip, nothing beside a compute request.
    let upstream_idle_timeout = duration(
        "upstream_idle_timeout",
        &f.upstream_idle_timeout,
        DEFAULT_UPSTREAM_IDLE_TIMEOUT,
    )?;
    if upstream_idle_timeout > MAX_UPSTREAM_IDLE_TIMEOUT {
        return Err(ConfigError::new(
            "upstream_idle_timeout",
            format!(
                "must be at most {}s, and below the pods' own keep-alive timeout",
                MAX_UPSTREAM_IDLE_TIMEOUT.as_secs()
            ),
        ));
    }
    let max_attempts = f.max_attempts.unwrap_or(3);
    if max_attempts == 0 {
        return Err(ConfigError::new("max_attempts", "must be at least 1"));
    }
    let shutdown_grace = duration("shutdown_grace", &f.shutdown_grace, Duration::from_secs(30))?;
    if shutdown_grace > MAX_SHUTDOWN_GRACE {
        return Err(ConfigError::new("shutdown_grace", "must be at most 24h"));
    }
    // Kubernetes takes a few seconds to stop sending new connections to a terminating pod.
    let shutdown_delay = duration("shutdown_delay", &f.shutdown_delay, Duration::from_secs(5))?;
    if shutdown_delay > MAX_SHUTDOWN_DELAY {
        return Err(ConfigError::new("shutdown_delay", "must be at most 10m"));
    }
    let reload_interval = duration(
        "reload_interval",
        &f.reload_interval,
        Duration::from_secs(2),
    )?;

    let client = client_limits(&f.client)?;

    if f.routes.is_empty() {
        return Err(ConfigError::new("routes", "at least one route is required"));
    }

    let mut routes = Vec::new();
    let mut pools: Vec<PoolConfig> = Vec::new();
    // Which route first set each pool's limit, to name both in a conflict.
    let mut pool_owner: BTreeMap<usize, usize> = BTreeMap::new();
    let mut seen_uris: HashSet<(String, bool)> = HashSet::new();

    for (i, r) in f.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        let uri = r
            .uri
            .clone()
            .ok_or_else(|| ConfigError::new(format!("{p}.uri"), "missing"))?;
        if !uri.starts_with('/') {
            return Err(ConfigError::new(
                format!("{p}.uri"),
                format!("{uri:?} must start with /"),
            ));
        }
        // Requests are routed by their normalised path, which such a uri can never equal.
        match crate::route::normalize_path(&uri) {
            Ok(n) if n == uri => {}
            Ok(n) => {
                return Err(ConfigError::new(
                    format!("{p}.uri"),
                    format!("{uri:?} is not a normalised path; write {n:?}"),
                ))
            }
            Err(e) => return Err(ConfigError::new(format!("{p}.uri"), e.reason())),
        }
        let match_kind = match r.match_kind.as_deref() {
            None | Some("exact") => MatchKind::Exact,
            Some("prefix") => MatchKind::Prefix,
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{p}.match"),
                    format!("{other:?} is not one of: exact, prefix"),
                ))
            }
        };
        if !seen_uris.insert((uri.clone(), match_kind == MatchKind::Prefix)) {
            return Err(ConfigError::new(
                format!("{p}.uri"),
                format!("duplicate uri {uri:?} (already used by an earlier route)"),
            ));
        }
        let limit = r
            .limit
            .ok_or_else(|| ConfigError::new(format!("{p}.limit"), "missing"))?;
        if limit == 0 {
            return Err(ConfigError::new(format!("{p}.limit"), "must be at least 1"));
        }
        let protocol = match r.protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("h2c") => UpstreamProtocol::H2c,
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{p}.protocol"),
                    format!("{other:?} is not one of: http1, h2c"),
                ))
            }
        };
        let client_abort = match r.client_abort.as_deref() {
            None | Some("finish") => ClientAbort::Finish,
            Some("cancel") => ClientAbort::Cancel,
            Some(other) => {
                return Err(ConfigError::new(
                    format!("{p}.client_abort"),
                    format!("{other:?} is not one of: finish, cancel"),
                ))
            }
        };
        let target = route_target(&p, r, &cluster_domain)?;
        let queue = match &r.queue {
            Some(q) => queue_policy(&format!("{p}.queue"), q, queue)?,
            None => queue,
        };

        let pool = match pools.iter().position(|pc| pc.target == target) {
            Some(idx) => {
                if pools[idx].limit != limit {
                    let owner = pool_owner[&idx];
                    return Err(ConfigError::new(
                        format!("{p}.limit"),
                        format!(
                            "{limit} conflicts with routes[{owner}].limit = {}: both routes target {} and share its per-pod slots, so they must agree",
                            pools[idx].limit, pools[idx].name
                        ),
                    ));
                }
                idx
            }
            None => {
                pools.push(PoolConfig {
                    name: target.to_string(),
                    target,
                    limit,
                });
                pool_owner.insert(pools.len() - 1, i);
                pools.len() - 1
            }
        };
        routes.push(RouteConfig {
            uri,
            match_kind,
            pool,
            queue,
            protocol,
            client_abort,
        });
    }

    Ok(Config {
        debug: f.debug,
        listen,
        admin_listen,
        threads,
        log_file: f
            .log_file
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from),
        dns,
        connect_timeout,
        upstream_idle_timeout,
        max_attempts,
        shutdown_grace,
        shutdown_delay,
        reload_interval,
        client,
        routes,
        pools,
    })
}

/// Longest any client timeout may be: a day is already far past any sane setting, and the bound
/// keeps `Instant + timeout` from overflowing.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Largest `client.max_header_size`: Pingora itself refuses headers above 1 MiB.
const MAX_HEADER_SIZE_BOUND: usize = 1024 * 1024;

/// Smallest `client.max_header_size`: a request line and a Host field must fit.
const MIN_HEADER_SIZE_BOUND: usize = 1024;

fn client_limits(f: &FileClient) -> Result<ClientLimits, ConfigError> {
    let d = ClientLimits::default();
    let limits = ClientLimits {
        header_timeout: duration("client.header_timeout", &f.header_timeout, d.header_timeout)?,
        keepalive_timeout: duration(
            "client.keepalive_timeout",
            &f.keepalive_timeout,
            d.keepalive_timeout,
        )?,
        timeout: duration("client.timeout", &f.timeout, d.timeout)?,
        max_header_size: f.max_header_size.unwrap_or(d.max_header_size),
    };
    for (field, value) in [
        ("client.header_timeout", limits.header_timeout),
        ("client.keepalive_timeout", limits.keepalive_timeout),
        ("client.timeout", limits.timeout),
    ] {
        if value.is_zero() || value > MAX_CLIENT_TIMEOUT {
            return Err(ConfigError::new(
                field,
                format!("must be greater than 0 and at most 24h (got {value:?})"),
            ));
        }
    }
    if !(MIN_HEADER_SIZE_BOUND..=MAX_HEADER_SIZE_BOUND).contains(&limits.max_header_size) {
        return Err(ConfigError::new(
            "client.max_header_size",
            format!(
                "must be between {MIN_HEADER_SIZE_BOUND} and {MAX_HEADER_SIZE_BOUND} bytes (got {})",
                limits.max_header_size
            ),
        ));
    }
    Ok(limits)
}

/// Works out where a route's pods come from. Exactly one of: `endpoints`, `host`,
/// `service_name` + `namespace`, or the older `k8s_host`.
fn route_target(p: &str, r: &FileRoute, cluster_domain: &str) -> Result<Target, ConfigError> {
    let forms = [
        r.endpoints.is_some(),
        r.host.is_some(),
        r.service_name.is_some() || r.namespace.is_some(),
        r.k8s_host.is_some(),
    ];
    let count = forms.iter().filter(|x| **x).count();
    if count == 0 {
        return Err(ConfigError::new(
            p,
            "no target: give service_name + namespace + http_port, host + http_port, k8s_host + K8s_port, or endpoints",
        ));
    }
    if count > 1 {
        return Err(ConfigError::new(
            p,
            "give only one target: service_name/namespace, host, k8s_host or endpoints",
        ));
    }
    if let Some(eps) = &r.endpoints {
        if eps.is_empty() {
            return Err(ConfigError::new(
                format!("{p}.endpoints"),
                "must list at least one IP:PORT",
            ));
        }
        let mut addrs = Vec::new();
        for (j, e) in eps.iter().enumerate() {
            let a = socket_addr(&format!("{p}.endpoints[{j}]"), e)?;
            if addrs.contains(&a) {
                return Err(ConfigError::new(
                    format!("{p}.endpoints[{j}]"),
                    format!("{a} listed twice"),
                ));
            }
            addrs.push(a);
        }
        addrs.sort();
        return Ok(Target::Static(addrs));
    }
    let (host, port) = if let Some(h) = &r.k8s_host {
        let port = r.k8s_port.or(r.http_port).ok_or_else(|| {
            ConfigError::new(
                format!("{p}.K8s_port"),
                "missing (the port that goes with k8s_host)",
            )
        })?;
        (h.clone(), port)
    } else if let Some(h) = &r.host {
        let port = r
            .http_port
            .ok_or_else(|| ConfigError::new(format!("{p}.http_port"), "missing"))?;
        (h.clone(), port)
    } else {
        let svc = r
            .service_name
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("{p}.service_name"), "missing"))?;
        let ns = r
            .namespace
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("{p}.namespace"), "missing"))?;
        let port = r
            .http_port
            .ok_or_else(|| ConfigError::new(format!("{p}.http_port"), "missing"))?;
        (format!("{svc}.{ns}.svc.{cluster_domain}"), port)
    };
    if port == 0 {
        return Err(ConfigError::new(
            format!("{p}.http_port"),
            "must be between 1 and 65535",
        ));
    }
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty()
        || host.contains(char::is_whitespace)
        || host.contains('/')
        || host.contains(':')
    {
        return Err(ConfigError::new(p, format!("{host:?} is not a DNS name")));
    }
    Ok(Target::Dns { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_CONFIG: &str = r#"
debug: false
port: 8080
log_file: ./logs/agent.log
kube_config_file: /root/kube/config
routes:
  - uri: /VideoCodecService/VideoCodec
    limit: 2
    service_name: yt-server-video-codec
    namespace: ai-media
    http_port: 20109
"#;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn go_agent_config_loads_unchanged() {
        let c = Config::parse(GO_CONFIG).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.routes.len(), 1);
        assert_eq!(
            c.pools[0].target,
            Target::Dns {
                host: "yt-server-video-codec.ai-media.svc.cluster.local".into(),
                port: 20109
            }
        );
        assert_eq!(c.pools[0].limit, 2);
        assert_eq!(c.log_file, Some(PathBuf::from("./logs/agent.log")));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.shutdown_delay, Duration::from_secs(5));
    }

    #[test]
    fn shutdown_settings_are_bounded() {
        let route = "routes: [{uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}]\n";
        let c = Config::parse(&format!(
            "shutdown_grace: 1500ms\nshutdown_delay: 0s\n{route}"
        ))
        .unwrap();
        assert_eq!(c.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert!(err(&format!("shutdown_delay: 11m\n{route}")).contains("shutdown_delay"));
        assert!(err(&format!("shutdown_grace: 25h\n{route}")).contains("shutdown_grace"));
    }

    #[test]
    fn old_k8s_host_form_loads() {
        let c = Config::parse(
            "routes:\n  - uri: /a\n    limit: 1\n    k8s_host: codec.ai-media.svc.cluster.local\n    K8s_port: 9000\n",
        )
        .unwrap();
        assert_eq!(
            c.pools[0].target,
            Target::Dns {
                host: "codec.ai-media.svc.cluster.local".into(),
                port: 9000
            }
        );
    }

    #[test]
    fn routes_to_one_service_share_a_pool() {
        let c = Config::parse(
            "routes:\n  - {uri: /a, limit: 2, service_name: s, namespace: n, http_port: 1}\n  - {uri: /b, limit: 2, service_name: s, namespace: n, http_port: 1}\n  - {uri: /c, limit: 2, service_name: s, namespace: n, http_port: 2}\n",
        )
        .unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.routes[0].pool, c.routes[1].pool);
        assert_ne!(c.routes[0].pool, c.routes[2].pool);
    }

    #[test]
    fn bad_configs_name_their_field() {
        let cases: &[(&str, &str)] = &[
            ("routes:\n  - {uri: /a, limit: 0, endpoints: [\"127.0.0.1:1\"]}\n", "routes[0].limit: must be at least 1"),
            ("routes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /b, endpoints: [\"127.0.0.1:1\"]}\n", "routes[1].limit: missing"),
            ("routes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:2\"]}\n", "routes[1].uri: duplicate"),
            ("queue: {timeout: 5 parsecs}\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "queue.timeout: bad duration"),
            ("routes:\n  - {uri: /a, limt: 1, endpoints: [\"127.0.0.1:1\"]}\n", "unknown field `limt`"),
            ("bogus: 1\nroutes: []\n", "unknown field `bogus`"),
            ("routes: []\n", "routes: at least one route"),
            ("routes:\n  - {uri: /a, limit: 1, service_name: s, http_port: 1}\n", "routes[0].namespace: missing"),
            ("routes:\n  - {uri: /a, limit: 1, endpoints: [\"nope\"]}\n", "routes[0].endpoints[0]"),
            ("routes:\n  - {uri: a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "routes[0].uri"),
            ("routes:\n  - {uri: /a, limit: 1, match: fuzzy, endpoints: [\"127.0.0.1:1\"]}\n", "routes[0].match"),
            ("dns: {stability_interval: fast}\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "dns.stability_interval"),
            ("dns: {nameservers: [\"x:y\"]}\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "dns.nameservers[0]"),
            ("routes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 1}\n  - {uri: /b, limit: 3, service_name: s, namespace: n, http_port: 1}\n", "routes[1].limit: 3 conflicts with routes[0].limit"),
            ("routes:\n  - {uri: /a, limit: 1, queue: {timeout: 0s}, endpoints: [\"127.0.0.1:1\"]}\n", "routes[0].queue.timeout"),
            ("listen: \"localhost\"\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "listen:"),
            ("routes:\n  - {uri: /a, limit: 1}\n", "routes[0]: no target"),
            ("upstream_idle_timeout: 10m\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "upstream_idle_timeout: must be at most 300s"),
            ("routes:\n  - {uri: /a//b, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n", "routes[0].uri: \"/a//b\" is not a normalised path; write \"/a/b\""),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(
                got.contains(want),
                "config {text:?}\n gave {got:?}\n want it to contain {want:?}"
            );
        }
    }

    #[test]
    fn additions_parse() {
        let c = Config::parse(
            "listen: 127.0.0.1:9000\nadmin_listen: 127.0.0.1:9001\nthreads: 2\ncluster_domain: corp.local\nqueue: {max_waiting: 5, timeout: 1500ms}\ndns: {nameservers: [\"127.0.0.1:5353\", \"10.0.0.10\"], refresh_interval: 1s, stability_samples: 3, stability_interval: 100ms, unstable_retry: 2s}\nroutes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 1}\n  - {uri: /b/, match: prefix, limit: 4, host: x.example, http_port: 2, queue: {max_waiting: 1}}\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.threads, 2);
        assert_eq!(c.dns.nameservers[1], "10.0.0.10:53".parse().unwrap());
        assert_eq!(c.dns.stability_interval, Duration::from_millis(100));
        assert_eq!(
            c.routes[0].queue,
            QueuePolicy {
                max_waiting: 5,
                timeout: Duration::from_millis(1500)
            }
        );
        assert_eq!(
            c.routes[1].queue,
            QueuePolicy {
                max_waiting: 1,
                timeout: Duration::from_millis(1500)
            }
        );
        assert_eq!(c.routes[1].match_kind, MatchKind::Prefix);
        assert_eq!(c.upstream_idle_timeout, DEFAULT_UPSTREAM_IDLE_TIMEOUT);
        let never_reuse = Config::parse(
            "upstream_idle_timeout: 0s\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n",
        )
        .unwrap();
        assert_eq!(never_reuse.upstream_idle_timeout, Duration::ZERO);
        assert_eq!(
            c.pools[0].target,
            Target::Dns {
                host: "s.n.svc.corp.local".into(),
                port: 1
            }
        );
    }
}
