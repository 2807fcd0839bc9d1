//! The validated configuration the rest of the crate uses, and how it is read.
//!
//! Four parts, kept apart on purpose:
//! - `file.rs`: the file format. It has to accept the Go agent's field names (`K8s_port`,
//!   `http_port`, …) and leaves everything optional;
//! - `keys.rs`: every unknown key of a file at once (serde stops at the first), each with its
//!   path and the key probably meant;
//! - `validate.rs`: file → [`Config`]: defaults applied, durations parsed, every number bounded
//!   so that nothing in a config can make the process panic or overflow, a pool per target.
//!   Every error names the field it is about (`routes[1].limit: must be at least 1`);
//! - this file: the validated model, which holds only values that were checked, and
//!   [`Config::load`]/[`Config::parse`], which bound the text before any YAML parser sees it.

mod file;
mod keys;
mod validate;

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

pub use validate::{
    DEFAULT_UPSTREAM_IDLE_TIMEOUT, DEFAULT_UPSTREAM_TIMEOUT, MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH,
};

/// What is wrong with a config: every unknown key, and the invalid values found, each naming
/// its field (or the file). `--check` and start-up print one line per [`Problem`]; a reload
/// logs them on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Never empty, in file order as far as the checks allow.
    problems: Vec<Problem>,
}

/// One thing wrong with a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Its path (`routes[1].limit`), or empty for the file as a whole.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                field: field.into(),
                message: message.into(),
            }],
        }
    }

    /// Every problem, at least one.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `errors` as one error, if there are any.
    fn all(errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        let problems: Vec<Problem> = errors.into_iter().flat_map(|e| e.problems).collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Validated config
// ---------------------------------------------------------------------------------------------

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub debug: bool,
    /// Where the proxy listens (`listen`, or `0.0.0.0:<port>`).
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub dns: DnsConfig,
    /// `kube_config_file` as given. Kubernetes API discovery reads it when its task starts
    /// (validation made sure it exists if any route uses the API); `None`: the in-cluster
    /// service account.
    pub kube_config_file: Option<PathBuf>,
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
    /// Where per-pod slot counts live: in this process, or in a Redis shared by replicas.
    pub ledger: LedgerConfig,
    pub routes: Vec<RouteConfig>,
    /// One entry per distinct target; routes refer to it by index.
    pub pools: Vec<PoolConfig>,
}

/// Where per-pod slot counts and the wait queue live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// `None`: in this process (one replica, the default). `Some(url)`: a Redis shared by every
    /// replica, so that a pod's cap holds across all of them.
    pub redis: Option<String>,
    /// How long the slots and queue places of an agent that vanished stay counted.
    pub lease_ttl: Duration,
    /// After Redis restarted (or is new), how long no slot is granted while every agent
    /// re-asserts what it holds.
    pub recovery_hold: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            redis: None,
            lease_ttl: Duration::from_secs(30),
            recovery_hold: crate::balance::shared::DEFAULT_RECOVERY_HOLD,
        }
    }
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
    /// Longest answer (by its `Content-Length`) read whole from the pod before it is passed
    /// on, so that a slow client does not keep a finished pod's slot; 0: none is (see
    /// [`crate::response_buffer`]).
    pub response_buffer: usize,
    /// All answers being buffered together, in bytes: the memory slow clients may cost.
    pub response_buffer_total: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            timeout: Duration::from_secs(60),
            max_header_size: 32 * 1024,
            response_buffer: 4 * 1024 * 1024,
            response_buffer_total: 64 * 1024 * 1024,
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

/// The queue's policy belongs to the queue; the config only fills it in.
pub use crate::balance::QueuePolicy;

/// How a route's `uri` is compared with a request's path.
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
    /// The longest a pod may make no progress on a request (no response byte read, no request
    /// byte accepted) before lb-agent gives up on it: HAProxy's `timeout server`. Also bounds
    /// the wait for a pod whose client left (`client_abort: finish`).
    pub upstream_timeout: Duration,
    /// Asynchronous jobs (`async:`): see [`crate::jobs`].
    pub async_jobs: Option<AsyncJobs>,
}

/// A route's asynchronous jobs: a `202 Accepted` with a `Location` is a job, and it keeps its
/// pod's slot until it is done.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncJobs {
    /// How often lb-agent asks the pod about a job it holds (a pod's `Retry-After` wins).
    pub check_interval: Duration,
    /// The longest a job holds its slot.
    pub max_duration: Duration,
    pub done_when: DoneWhen,
    /// Where pods send their completion callbacks (`http://host[:port]`), e.g. lb-agent's
    /// Service; `None`: the address the submission reached lb-agent on.
    pub callback_base: Option<String>,
    /// A pod that names its job in its JSON answer, not in a `Location`; `None`: a `202` with a
    /// `Location` is a job.
    pub job_id: Option<JobIdInJson>,
}

/// Where a submission's answer (`200`/`201`/`202`, JSON) names its job, as Celery-style APIs
/// and docling-serve do (`{"task_id": "…"}`), and where the job's status is asked.
#[derive(Debug, Clone, PartialEq)]
pub struct JobIdInJson {
    /// A JSON pointer (RFC 6901) to the id: a string or a whole number.
    pub pointer: String,
    /// The job's status path on its pod, `{id}` standing for the id (`/tasks/{id}`).
    pub status: String,
}

impl JobIdInJson {
    /// What stands for the job's id in [`JobIdInJson::status`].
    pub const PLACEHOLDER: &'static str = "{id}";
}

/// How a pod's status answer says that its job is over.
#[derive(Debug, Clone, PartialEq)]
pub enum DoneWhen {
    /// `200`/`202`: running; `303`/`302`/`301`/`307`/`308` (to the result): done (Azure's
    /// async request-reply pattern, Two Sigma's Waiter).
    Redirect,
    /// `202`: running; any other answer: done (OData and others).
    NotAccepted,
    /// A JSON body whose value at `pointer` (RFC 6901) is one of `done` (BentoML, Cog).
    Json { pointer: String, done: Vec<String> },
}

/// How a `service_name` route finds its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryKind {
    /// The Service's DNS name: one record per pod only if the Service is headless.
    Dns,
    /// The Service's EndpointSlices, watched through the Kubernetes API: any Service.
    Kubernetes,
}

/// The port lb-agent connects to on each pod of a Kubernetes-discovered Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodPort {
    /// This port on every pod, whatever the Service's ports say (the Go agent's `http_port`).
    Number(u16),
    /// The port the EndpointSlices give under this name (`ports[].name`).
    Named(String),
}

impl fmt::Display for PodPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodPort::Number(p) => write!(f, "{p}"),
            PodPort::Named(n) => f.write_str(n),
        }
    }
}

/// Where a pool's pods come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A DNS name whose A/AAAA records are the pods (a headless Service).
    Dns { host: String, port: u16 },
    /// A Service's ready endpoints, as the Kubernetes API's EndpointSlices list them.
    Kube {
        namespace: String,
        service: String,
        port: PodPort,
    },
    /// A fixed list of pods.
    Static(Vec<SocketAddr>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dns { host, port } => write!(f, "{host}:{port}"),
            Target::Kube {
                namespace,
                service,
                port,
            } => write!(f, "k8s:{namespace}/{service}:{port}"),
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
    /// One line per route saying where its pods come from, for `--check` and the start-up log:
    /// the choice between DNS and the Kubernetes API is made by rules (see `discovery`), and a
    /// user swapping in lb-agent for the Go agent must be able to see which one applied.
    pub fn discovery_summary(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|r| {
                let how = match &self.pools[r.pool].target {
                    Target::Kube {
                        namespace,
                        service,
                        port,
                    } => format!(
                        "Kubernetes API: EndpointSlices of Service {namespace}/{service}, pod port {port}, credentials {}",
                        match &self.kube_config_file {
                            Some(p) => format!("from kube_config_file {}", p.display()),
                            None => "of the in-cluster service account".to_string(),
                        }
                    ),
                    Target::Dns { host, port } if host.contains(".svc.") => format!(
                        "DNS {host}, pod port {port}: the Service must be headless (an ordinary one answers its one cluster IP){}",
                        match &self.kube_config_file {
                            Some(p) if !p.is_file() => format!(
                                "; kube_config_file {} was not found, so the API is not used",
                                p.display()
                            ),
                            _ => String::new(),
                        }
                    ),
                    Target::Dns { host, port } => format!("DNS {host}, port {port}"),
                    Target::Static(addrs) => format!(
                        "static pods {}",
                        addrs
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                format!("route {}: {how}", r.uri)
            })
            .collect()
    }
}

/// Reads a config file's bytes, at most one more than [`MAX_CONFIG_BYTES`]: enough for
/// [`Config::parse`] to refuse a file that is too large, without reading all of it (a huge file
/// or `/dev/zero` must not block start-up or the reload service).
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl Config {
    /// Reads and validates a config file. Reads at most one byte more than
    /// [`MAX_CONFIG_BYTES`], so a huge file (or `/dev/zero`) is refused without being read.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_bytes(path).map(|(config, _)| config)
    }

    /// [`Config::load`], also giving the bytes that were parsed: the reload service compares
    /// later reads with exactly these (reading the file a second time could see a newer edit).
    pub fn load_with_bytes(path: &Path) -> Result<(Config, Vec<u8>), ConfigError> {
        let bytes = read_bounded(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            ConfigError::new(
                "",
                format!("cannot read {}: not UTF-8 text", path.display()),
            )
        })?;
        let config = Self::parse(text)?;
        Ok((config, bytes))
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

    /// Parses and validates YAML text. Its size and nesting depth are checked first, by a
    /// linear scan: the YAML parser takes seconds to minutes of CPU on a deeply nested file
    /// before it finds anything wrong, and a reload runs on the same thread as everything else
    /// the reload service does.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// [`Config::parse`] with the environment read through `env`. As in the Go agent's loader
    /// (configor `env:` tags on its config struct), `PORT` and `DEBUG` in the environment win
    /// over the file: a Deployment that sets `PORT` moves the port.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        validate::check_shape(text)?;
        let (file, mut errors) = read_file(text);
        let config = file.and_then(|mut file| {
            if let Err(e) = validate::env_overrides(&mut file, env) {
                errors.push(e);
            }
            validate::validate(file)
        });
        match (config, ConfigError::all(errors)) {
            (Ok(config), Ok(())) => Ok(config),
            (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
            (Err(last), Err(mut first)) => {
                first.problems.extend(last.problems);
                Err(first)
            }
        }
    }

    /// The settings that take effect only at start-up; a reload leaves them as they are.
    /// Everything else (routes, pools, limits, queues, `connect_timeout`,
    /// `upstream_idle_timeout`, `upstream_timeout`) applies live. "Does this reload need a restart" is
    /// `a.restart_only() != b.restart_only()`.
    pub fn restart_only(&self) -> RestartOnly {
        // Destructured without `..`: a new field of `Config` does not compile until it is
        // sorted here into restart-only or live.
        let Config {
            debug,
            listen,
            admin_listen,
            threads,
            log_file,
            dns,
            kube_config_file,
            connect_timeout: _,
            upstream_idle_timeout: _,
            max_attempts,
            shutdown_grace,
            shutdown_delay,
            reload_interval,
            client,
            ledger,
            routes: _,
            pools: _,
        } = self.clone();
        RestartOnly {
            debug,
            listen,
            admin_listen,
            threads,
            log_file,
            dns,
            kube_config_file,
            max_attempts,
            shutdown_grace,
            shutdown_delay,
            reload_interval,
            client,
            ledger,
        }
    }
}

/// The settings of a [`Config`] that need a restart to change (see [`Config::restart_only`]).
/// The fields carry the names they have in the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartOnly {
    pub debug: bool,
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub threads: usize,
    pub log_file: Option<PathBuf>,
    pub dns: DnsConfig,
    pub kube_config_file: Option<PathBuf>,
    pub max_attempts: usize,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub reload_interval: Duration,
    pub client: ClientLimits,
    pub ledger: LedgerConfig,
}

impl RestartOnly {
    /// The config-file names of the settings that differ between `self` and `other`, for the
    /// reload warning; empty exactly when the two are equal.
    pub fn changed(&self, other: &RestartOnly) -> Vec<&'static str> {
        // Destructured without `..`, so a new field cannot be left out of the report.
        let RestartOnly {
            debug,
            listen,
            admin_listen,
            threads,
            log_file,
            dns,
            kube_config_file,
            max_attempts,
            shutdown_grace,
            shutdown_delay,
            reload_interval,
            client,
            ledger,
        } = self;
        let mut changed = Vec::new();
        let mut note = |differs: bool, name: &'static str| {
            if differs {
                changed.push(name);
            }
        };
        note(*listen != other.listen, "listen/port");
        note(*admin_listen != other.admin_listen, "admin_listen");
        note(*threads != other.threads, "threads");
        note(*log_file != other.log_file, "log_file");
        note(*debug != other.debug, "debug");
        note(*dns != other.dns, "dns");
        note(
            *kube_config_file != other.kube_config_file,
            "kube_config_file",
        );
        note(*max_attempts != other.max_attempts, "max_attempts");
        note(*client != other.client, "client");
        note(*shutdown_grace != other.shutdown_grace, "shutdown_grace");
        note(*shutdown_delay != other.shutdown_delay, "shutdown_delay");
        note(*reload_interval != other.reload_interval, "reload_interval");
        note(*ledger != other.ledger, "ledger");
        changed
    }
}

/// The text as the file format, and every unknown key in it. Unknown keys are found (all of
/// them, see `keys.rs`) and left out before the typed parse, which then reports the first value
/// of the wrong type as well.
fn read_file(text: &str) -> (Result<file::FileConfig, ConfigError>, Vec<ConfigError>) {
    // Text that is not YAML at all gets the parser's own message, with its line.
    let Ok(mut doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return (serde_yaml::from_str(text).map_err(yaml_error), Vec::new());
    };
    let unknown = keys::remove_unknown(&mut doc);
    if unknown.is_empty() {
        return (serde_yaml::from_str(text).map_err(yaml_error), unknown);
    }
    // Parsed as text again (not from the tree), so that an error keeps its path
    // (`routes[1].limit: invalid type`); its line would be one of the rewritten text, so none
    // is given.
    let file = serde_yaml::to_string(&doc)
        .and_then(|text| serde_yaml::from_str(&text))
        .map_err(|e| {
            let mut message = e.to_string();
            if let Some(at) = message.rfind(" at line ") {
                message.truncate(at);
            }
            ConfigError::new("", message)
        });
    (file, unknown)
}

/// serde_yaml reports a value's error with its path (`routes[0].limit: invalid type: …`) and
/// where in the file it is; keep both.
fn yaml_error(e: serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    if let (Some(l), false) = (e.location(), message.contains(" at line ")) {
        message.push_str(&format!(" (line {}, column {})", l.line(), l.column()));
    }
    ConfigError::new("", message)
}
