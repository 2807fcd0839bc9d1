//! File format → validated [`Config`]: defaults, parsing of durations and addresses, and a
//! bound on every value, each error naming its field (`routes[1].limit: must be at least 1`).
//!
//! The upper bounds are not taste: each keeps a value away from a panic or an overflow
//! somewhere downstream (`Instant + timeout`, tokio's semaphore maximum, Pingora's thread
//! pools), and each is far beyond what a working deployment needs, so `--check` refuses a
//! config that would otherwise pass and then kill the process (or the reload service) at run
//! time.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{
    FileAsync, FileClient, FileConfig, FileDoneWhen, FileJobId, FileLedger, FilePort, FileQueue,
    FileRoute, Yaml11Bool,
};
use super::{
    AsyncJobs, ClientAbort, ClientLimits, Config, ConfigError, DiscoveryKind, DnsConfig, DoneWhen,
    JobIdInJson, LedgerConfig, MatchKind, PodPort, PoolConfig, QueuePolicy, RouteConfig, Target,
    UpstreamProtocol,
};

/// Largest config file: Kubernetes caps a ConfigMap at 1 MiB, and ours are a few hundred bytes.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// Deepest nesting of YAML collections. Our format nests 4 deep (`routes[0].queue.timeout`);
/// libyaml takes time that grows far faster than the size with depth (a 200 KB file of `[`
/// took 43 s of CPU to reject), so deep nesting is refused before it is parsed.
pub const MAX_CONFIG_DEPTH: usize = 32;

/// Default of `upstream_idle_timeout` (see its validation for the reasoning).
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longer than any server keep-alive we know of: a larger value would only bring the race back.
const MAX_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Default of `upstream_timeout`: how long a pod may make no progress on a request (no response
/// byte, no request byte accepted) before lb-agent gives up on it. Five minutes, as Knative's
/// default revision `timeoutSeconds` (300 s), the nearest thing to our workload: compute requests
/// legitimately run for minutes before their first response byte, so NGINX's 60 s
/// (`proxy_read_timeout`) or Envoy's 15 s would cut healthy work, while a pod silent for five
/// minutes is almost always stuck (a deadlocked worker, a GPU call that never returns), and a
/// stuck pod holds a slot that queued requests wait for. Routes whose requests run longer
/// without answering raise it (per route or globally).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);
/// Shortest `upstream_timeout`: below a second, an ordinary pause of a healthy pod (a GC, a
/// busy node) would cut its request and mark the pod as hung.
const MIN_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(1);

/// Upper bounds of the shutdown settings: far beyond any sane value, and they keep the
/// deadline arithmetic far from overflowing.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(24 * 3600);
const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(600);

/// Longest of the timeouts and intervals that are added to `Instant::now()` (queue and client
/// timeouts, DNS intervals, `reload_interval`): a day is past any sane setting, and
/// `Instant + 24h` cannot overflow, where `queue.timeout: 18446744073709551615s` panicked on
/// every request.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest `connect_timeout`: Linux itself gives up a TCP connect after about 2 minutes of SYN
/// retries, so a longer timeout never waits longer.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Largest per-pod `limit`. 100 000 concurrent requests is already far beyond what one compute
/// pod can take, and with it even the largest pod list a DNS answer can carry (65 535 bytes:
/// ~4 000 A records) or a 1 MiB `endpoints` list keeps every sum of free slots below 10^11,
/// far from any counter's overflow (a shared ledger counts in Redis's 64-bit integers).
pub(super) const MAX_LIMIT: usize = 100_000;
/// Largest `max_waiting`: every queued request holds a client connection (a file descriptor
/// and its buffers), so a million is already more than one process can hold.
pub(super) const MAX_WAITING: usize = 1_000_000;
/// Most proxy threads: Pingora starts each as an OS thread with its own runtime at start-up;
/// `threads: 4294967296` aborted the process. 1024 is far past the useful number (the cores).
pub(super) const MAX_THREADS: usize = 1024;
/// Most connection attempts per request: each is on a different pod, so more only matters
/// with that many pods, and a request should not spend longer than this many connect timeouts.
pub(super) const MAX_ATTEMPTS: usize = 100;
/// Most identical DNS answers required before a changed pod list is trusted: more only delays
/// every scale-up by `samples × stability_interval`.
pub(super) const MAX_STABILITY_SAMPLES: usize = 100;

/// Longest any client timeout may be: a day is already far past any sane setting, and the bound
/// keeps `Instant + timeout` from overflowing.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Largest `client.max_header_size`: Pingora itself refuses headers above 1 MiB.
const MAX_HEADER_SIZE_BOUND: usize = 1024 * 1024;

/// Largest `client.response_buffer`: one answer held in memory; beyond this, stream it.
const MAX_RESPONSE_BUFFER: usize = 1 << 30;

/// Largest `client.response_buffer_total` (u64: it does not fit a 32-bit `usize`).
const MAX_RESPONSE_BUFFER_TOTAL: u64 = 64 << 30;

/// Smallest `client.max_header_size`: a request line and a Host field must fit.
const MIN_HEADER_SIZE_BOUND: usize = 1024;

/// Refuses text larger than [`MAX_CONFIG_BYTES`] or nested deeper than [`MAX_CONFIG_DEPTH`],
/// in one linear pass, before the YAML parser sees it.
pub(super) fn check_shape(text: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::new(
            "",
            format!(
                "config is larger than {MAX_CONFIG_BYTES} bytes (1 MiB); a config is a few KiB"
            ),
        ));
    }
    if let Some(line) = too_deep(text, MAX_CONFIG_DEPTH) {
        return Err(ConfigError::new(
            "",
            format!(
                "config nests deeper than {MAX_CONFIG_DEPTH} levels (at line {line}); a config nests 4"
            ),
        ));
    }
    Ok(())
}

/// The line (1-based) where the nesting of `text` first exceeds `max`, if it does.
///
/// An estimate from above, without parsing: block nesting is the stack of indentation columns
/// (plus one level per `- ` or `? ` that opens a compact collection on the line), flow nesting
/// the count of open `[`/`{`. Quoted scalars and comments are skipped, since they may hold any
/// bracket. A `[` inside a plain scalar (`uri: /a[`) counts too, which over-estimates: it would
/// take 32 of them to refuse a valid file, and a bracket can never hide real nesting.
fn too_deep(text: &str, max: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Where a quoted scalar may begin: after indentation, an indicator, or an anchor/tag.
    let mut value_start = true;
    let mut line = 1;
    let mut i = 0;
    let mut line_start = true;
    while i < b.len() {
        if line_start {
            line_start = false;
            value_start = true;
            if flow == 0 {
                let indent = b[i..].iter().take_while(|&&c| c == b' ').count();
                let rest = &b[i + indent..];
                let blank = rest
                    .first()
                    .is_none_or(|&c| matches!(c, b'\n' | b'\r' | b'#'));
                if !blank {
                    while indents.last().is_some_and(|&top| top > indent) {
                        indents.pop();
                    }
                    if indents.last() != Some(&indent) {
                        indents.push(indent);
                    }
                    i += indent;
                    // `- - x`, `- key: v`, `? key`: each indicator opens a level on this line.
                    while i + 1 < b.len()
                        && matches!(b[i], b'-' | b'?')
                        && matches!(b[i + 1], b' ' | b'\t')
                    {
                        i += 1;
                        while i < b.len() && matches!(b[i], b' ' | b'\t') {
                            i += 1;
                        }
                        indents.push(i);
                    }
                    if indents.len() > max {
                        return Some(line);
                    }
                }
            }
            continue;
        }
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                line_start = true;
            }
            b'#' if i == 0 || matches!(b[i - 1], b' ' | b'\t' | b'\n' | b'\r') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' if value_start => {
                // Skip the quoted scalar, which may span lines: `\"` escapes in double
                // quotes, `''` in single quotes.
                i += 1;
                while i < b.len() {
                    match b[i] {
                        b'\\' if c == b'"' => i += 1,
                        b'\n' => line += 1,
                        q if q == c => {
                            if c == b'\'' && b.get(i + 1) == Some(&b'\'') {
                                i += 1;
                            } else {
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                value_start = false;
            }
            b'[' | b'{' => {
                flow += 1;
                if indents.len() + flow > max {
                    return Some(line);
                }
                value_start = true;
            }
            b']' | b'}' => {
                flow = flow.saturating_sub(1);
                value_start = false;
            }
            b',' | b':' | b'-' | b'?' => value_start = true,
            b' ' | b'\t' | b'\r' => {}
            b'&' | b'!' if value_start => {
                // An anchor or a tag in front of a value: the value may still be quoted.
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\n') {
                    i += 1;
                }
                continue;
            }
            _ => value_start = false,
        }
        i += 1;
    }
    None
}

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

/// Refuses `value` above `max`, naming the field and both values.
fn at_most(field: &str, value: Duration, max: Duration) -> Result<Duration, ConfigError> {
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("must be at most {} (got {value:?})", short(max)),
        ));
    }
    Ok(value)
}

/// A bound as the README writes it: `24h`, `10m`, `300s`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Refuses a count outside `min..=max`, naming the field.
fn count_in(field: &str, value: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if value < min {
        return Err(ConfigError::new(field, format!("must be at least {min}")));
    }
    if value > max {
        return Err(ConfigError::new(
            field,
            format!("must be at most {max} (got {value})"),
        ));
    }
    Ok(value)
}

fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("{value:?} is not an IP:PORT address (e.g. 127.0.0.1:8080 or [::1]:8080)"),
        )
    })
}

/// An address lb-agent listens on: port 0 would bind a random port that no Service or probe
/// points at.
fn listen_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let addr = socket_addr(field, value)?;
    if addr.port() == 0 {
        return Err(ConfigError::new(
            field,
            format!("{value:?}: port 0 would listen on a random port; give the port"),
        ));
    }
    Ok(addr)
}

/// An address lb-agent connects to (a pod, a nameserver): port 0 and addresses that name no
/// single host (`0.0.0.0`, `::`, multicast, broadcast) are refused, since a connect to them
/// either fails on every request or reaches something that is not the pod.
fn peer_addr(field: &str, addr: SocketAddr) -> Result<SocketAddr, ConfigError> {
    if addr.port() == 0 {
        return Err(ConfigError::new(
            field,
            format!("{addr}: port must be between 1 and 65535"),
        ));
    }
    let ip = addr.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        return Err(ConfigError::new(
            field,
            format!(
                "{addr}: must be the address of one host (not unspecified, multicast or broadcast)"
            ),
        ));
    }
    Ok(addr)
}

/// RFC 1123 host name: dot-separated labels of 1 to 63 letters, digits and hyphens, not
/// starting or ending with a hyphen, 253 characters at most. Kubernetes names its Services,
/// namespaces and cluster domains this way, so anything else can only fail to resolve.
fn dns_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| ConfigError::new(field, format!("{name:?} is not a DNS name: {why}"));
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in name.split('.') {
        dns_label_shape(label).map_err(|why| bad(&why))?;
    }
    Ok(())
}

/// One RFC 1123 label (`service_name`, `namespace`).
fn dns_label(field: &str, label: &str) -> Result<(), ConfigError> {
    dns_label_shape(label).map_err(|why| {
        ConfigError::new(
            field,
            format!("{label:?} is not a DNS label (RFC 1123): {why}"),
        )
    })
}

fn dns_label_shape(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("empty label".into());
    }
    if label.len() > 63 {
        return Err(format!("label {label:?} is longer than 63 characters"));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits and '-' only)"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

/// `upstream_timeout` (global, or a route's override of `default`): 1s to 24h.
fn upstream_timeout(
    field: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let timeout = duration(field, value, default)?;
    if !(MIN_UPSTREAM_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
        return Err(ConfigError::new(
            field,
            format!("must be between 1s and 24h (got {timeout:?})"),
        ));
    }
    Ok(timeout)
}

fn queue_policy(
    prefix: &str,
    q: &FileQueue,
    base: QueuePolicy,
) -> Result<QueuePolicy, ConfigError> {
    let field = format!("{prefix}.timeout");
    let timeout = at_most(
        &field,
        duration(&field, &q.timeout, base.timeout)?,
        MAX_TIMEOUT,
    )?;
    if timeout.is_zero() {
        return Err(ConfigError::new(
            field,
            "must be greater than 0 (use max_waiting: 0 to refuse instead of queueing)",
        ));
    }
    let max_waiting = count_in(
        &format!("{prefix}.max_waiting"),
        q.max_waiting.unwrap_or(base.max_waiting),
        0,
        MAX_WAITING,
    )?;
    Ok(QueuePolicy {
        max_waiting,
        timeout,
    })
}

/// The Go agent's environment overrides: `PORT` replaces `port` (and the port of `listen`, if
/// the file gives one), `DEBUG` replaces `debug` (Go's `strconv.ParseBool` spellings, and
/// `yes`/`no`/`on`/`off`). An empty variable counts as unset.
pub(super) fn env_overrides(
    f: &mut FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if let Some(v) = var("PORT") {
        let port: u16 = v.trim().parse().map_err(|_| {
            ConfigError::new(
                "PORT (environment)",
                format!("{v:?} is not a port number (1-65535)"),
            )
        })?;
        if port == 0 {
            return Err(ConfigError::new(
                "PORT (environment)",
                "port 0 would listen on a random port; give the port",
            ));
        }
        f.port = Some(port);
        if let Some(listen) = &f.listen {
            if let Ok(mut addr) = listen.parse::<SocketAddr>() {
                addr.set_port(port);
                f.listen = Some(addr.to_string());
            }
        }
    }
    if let Some(v) = var("DEBUG") {
        let debug = match v.trim() {
            "1" | "t" | "T" => Some(true),
            "0" | "f" | "F" => Some(false),
            other => Yaml11Bool::parse(other),
        };
        f.debug = Yaml11Bool(debug.ok_or_else(|| {
            ConfigError::new(
                "DEBUG (environment)",
                format!("{v:?} is not a boolean (true/false, 1/0, yes/no, on/off)"),
            )
        })?);
    }
    Ok(())
}

/// Collects the errors of independent checks, so that one run reports each of them: a setting
/// that fails yields `None` and is left out (or replaced by its default where later checks need
/// a value), and the config is refused at the end.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.0.push(e)).ok()
    }

    /// The errors collected, as one; only called when a check failed.
    fn into_error(self) -> ConfigError {
        ConfigError::all(self.0)
            .err()
            .unwrap_or_else(|| ConfigError::new("", "invalid config"))
    }
}

pub(super) fn validate(f: FileConfig) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let listen = problems.check(listen(&f));
    let admin_listen = problems.check(admin_listen(&f, listen));
    let threads = problems.check(count_in("threads", f.threads.unwrap_or(1), 1, MAX_THREADS));
    let cluster_domain = problems.check(cluster_domain(&f));
    let dns = problems.check(dns(&f));
    let queue = problems.check(queue_policy("queue", &f.queue, QueuePolicy::default()));
    let connect_timeout = problems.check(connect_timeout(&f));
    let upstream_idle_timeout = problems.check(upstream_idle_timeout(&f));
    let upstream_timeout_default = problems.check(upstream_timeout(
        "upstream_timeout",
        &f.upstream_timeout,
        DEFAULT_UPSTREAM_TIMEOUT,
    ));
    let max_attempts = problems.check(count_in(
        "max_attempts",
        f.max_attempts.unwrap_or(3),
        1,
        MAX_ATTEMPTS,
    ));
    let shutdown_grace = problems.check(
        duration("shutdown_grace", &f.shutdown_grace, Duration::from_secs(30)).and_then(|d| {
            if d > MAX_SHUTDOWN_GRACE {
                return Err(ConfigError::new("shutdown_grace", "must be at most 24h"));
            }
            Ok(d)
        }),
    );
    // Kubernetes takes a few seconds to stop sending new connections to a terminating pod.
    let shutdown_delay = problems.check(
        duration("shutdown_delay", &f.shutdown_delay, Duration::from_secs(5)).and_then(|d| {
            if d > MAX_SHUTDOWN_DELAY {
                return Err(ConfigError::new("shutdown_delay", "must be at most 10m"));
            }
            Ok(d)
        }),
    );
    let reload_interval = problems.check(
        duration(
            "reload_interval",
            &f.reload_interval,
            Duration::from_secs(2),
        )
        .and_then(|d| at_most("reload_interval", d, MAX_TIMEOUT)),
    );
    let client = problems.check(client_limits(&f.client));
    let ledger = problems.check(ledger(&f.ledger));
    let kube_config_file = f
        .kube_config_file
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let discovery = DiscoveryRule {
        cluster_domain: cluster_domain.unwrap_or_else(|| "cluster.local".to_string()),
        default: f.discovery,
        kubeconfig_found: kube_config_file.as_deref().is_some_and(Path::is_file),
    };

    // The routes are checked even when a global setting they inherit is wrong (with its
    // default in its place), so that their own errors are reported in the same run.
    let (routes, pools) = routes(
        &f.routes,
        &discovery,
        queue.unwrap_or_default(),
        upstream_timeout_default.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT),
        &mut problems,
    );

    match (
        listen,
        admin_listen,
        threads,
        dns,
        connect_timeout,
        upstream_idle_timeout,
        max_attempts,
        shutdown_grace,
        shutdown_delay,
        reload_interval,
        client,
        ledger,
    ) {
        _ if kube_config_missing(&kube_config_file, &pools, &mut problems) => {
            Err(problems.into_error())
        }
        (
            Some(listen),
            Some(admin_listen),
            Some(threads),
            Some(dns),
            Some(connect_timeout),
            Some(upstream_idle_timeout),
            Some(max_attempts),
            Some(shutdown_grace),
            Some(shutdown_delay),
            Some(reload_interval),
            Some(client),
            Some(ledger),
        ) if problems.0.is_empty() => Ok(Config {
            debug: f.debug.0,
            listen,
            admin_listen,
            threads,
            log_file: f
                .log_file
                .filter(|s| !s.trim().is_empty())
                .map(PathBuf::from),
            dns,
            kube_config_file,
            connect_timeout,
            upstream_idle_timeout,
            max_attempts,
            shutdown_grace,
            shutdown_delay,
            reload_interval,
            client,
            ledger,
            routes,
            pools,
        }),
        _ => Err(problems.into_error()),
    }
}

fn listen(f: &FileConfig) -> Result<SocketAddr, ConfigError> {
    Ok(match (&f.listen, f.port) {
        (Some(l), _) => listen_addr("listen", l)?,
        (None, Some(0)) | (None, None) => SocketAddr::from(([0, 0, 0, 0], 8080)),
        (None, Some(p)) => SocketAddr::from(([0, 0, 0, 0], p)),
    })
}

/// `listen`: the proxy's address if it is valid, to compare with.
fn admin_listen(
    f: &FileConfig,
    listen: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(a) = &f.admin_listen else {
        return Ok(None);
    };
    let addr = listen_addr("admin_listen", a)?;
    if Some(addr) == listen {
        return Err(ConfigError::new(
            "admin_listen",
            "must differ from the proxy's listen address",
        ));
    }
    Ok(Some(addr))
}

fn cluster_domain(f: &FileConfig) -> Result<String, ConfigError> {
    let cluster_domain = f.cluster_domain.as_deref().unwrap_or("cluster.local");
    if cluster_domain.trim().is_empty() {
        return Err(ConfigError::new("cluster_domain", "must not be empty"));
    }
    let cluster_domain = cluster_domain
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    dns_name("cluster_domain", &cluster_domain)?;
    Ok(cluster_domain)
}

fn dns(f: &FileConfig) -> Result<DnsConfig, ConfigError> {
    let d = DnsConfig::default();
    let mut nameservers = Vec::new();
    for (i, ns) in f.dns.nameservers.iter().flatten().enumerate() {
        let field = format!("dns.nameservers[{i}]");
        // A bare IP means port 53, as in resolv.conf.
        let addr = match ns.trim().parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => socket_addr(&field, ns)?,
        };
        nameservers.push(peer_addr(&field, addr)?);
    }
    let dns_duration = |field: &str, value: &Option<String>, default: Duration| {
        at_most(field, duration(field, value, default)?, MAX_TIMEOUT)
    };
    let dns = DnsConfig {
        nameservers,
        refresh_interval: dns_duration(
            "dns.refresh_interval",
            &f.dns.refresh_interval,
            d.refresh_interval,
        )?,
        stability_samples: f.dns.stability_samples.unwrap_or(d.stability_samples),
        stability_interval: dns_duration(
            "dns.stability_interval",
            &f.dns.stability_interval,
            d.stability_interval,
        )?,
        unstable_retry: dns_duration(
            "dns.unstable_retry",
            &f.dns.unstable_retry,
            d.unstable_retry,
        )?,
    };
    count_in(
        "dns.stability_samples",
        dns.stability_samples,
        1,
        MAX_STABILITY_SAMPLES,
    )?;
    if dns.refresh_interval.is_zero() {
        return Err(ConfigError::new(
            "dns.refresh_interval",
            "must be greater than 0",
        ));
    }
    Ok(dns)
}

fn connect_timeout(f: &FileConfig) -> Result<Duration, ConfigError> {
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
    at_most("connect_timeout", connect_timeout, MAX_CONNECT_TIMEOUT)
}

/// Below the shortest common server keep-alive timeouts (gunicorn 2s; Node.js and uvicorn 5s),
/// so lb-agent drops an idle connection before the pod does: a request written on a connection
/// the pod is closing at that moment fails, and is never re-sent (it may have started). A new
/// connection costs one round trip, nothing beside a compute request.
fn upstream_idle_timeout(f: &FileConfig) -> Result<Duration, ConfigError> {
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
    Ok(upstream_idle_timeout)
}

/// The routes and their pools; each route's first error is collected and the next route is
/// checked all the same.
fn routes(
    file_routes: &[FileRoute],
    discovery: &DiscoveryRule,
    queue: QueuePolicy,
    upstream_timeout_default: Duration,
    problems: &mut Problems,
) -> (Vec<RouteConfig>, Vec<PoolConfig>) {
    let mut routes = Routes {
        routes: Vec::new(),
        pools: Vec::new(),
        pool_owner: BTreeMap::new(),
        seen_uris: HashSet::new(),
    };
    if file_routes.is_empty() {
        problems.check::<()>(Err(ConfigError::new(
            "routes",
            "at least one route is required",
        )));
    }
    for (i, r) in file_routes.iter().enumerate() {
        problems.check(routes.add(i, r, discovery, queue, upstream_timeout_default));
    }
    (routes.routes, routes.pools)
}

/// The routes checked so far, and the pools they made.
struct Routes {
    routes: Vec<RouteConfig>,
    pools: Vec<PoolConfig>,
    /// Which route first set each pool's limit, to name both in a conflict.
    pool_owner: BTreeMap<usize, usize>,
    seen_uris: HashSet<(String, bool)>,
}

impl Routes {
    fn add(
        &mut self,
        i: usize,
        r: &FileRoute,
        discovery: &DiscoveryRule,
        queue: QueuePolicy,
        upstream_timeout_default: Duration,
    ) -> Result<(), ConfigError> {
        let Routes {
            routes,
            pools,
            pool_owner,
            seen_uris,
        } = self;
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
        match crate::path::normalize_path(&uri) {
            Ok(n) if n == uri => {}
            Ok(n) => {
                return Err(ConfigError::new(
                    format!("{p}.uri"),
                    format!("{uri:?} is not a normalised path; write {n:?}"),
                ))
            }
            Err(e) => return Err(ConfigError::new(format!("{p}.uri"), e.reason())),
        }
        let match_kind = r.match_kind.unwrap_or(MatchKind::Exact);
        if !seen_uris.insert((uri.clone(), match_kind == MatchKind::Prefix)) {
            return Err(ConfigError::new(
                format!("{p}.uri"),
                format!("duplicate uri {uri:?} (already used by an earlier route)"),
            ));
        }
        let limit = r
            .limit
            .ok_or_else(|| ConfigError::new(format!("{p}.limit"), "missing"))?;
        let limit = count_in(&format!("{p}.limit"), limit, 1, MAX_LIMIT)?;
        let protocol = r.protocol.unwrap_or_default();
        let client_abort = r.client_abort.unwrap_or_default();
        let upstream_timeout = upstream_timeout(
            &format!("{p}.upstream_timeout"),
            &r.upstream_timeout,
            upstream_timeout_default,
        )?;
        let async_jobs = match &r.async_jobs {
            Some(a) => Some(async_jobs(&format!("{p}.async"), a, protocol)?),
            None => None,
        };
        if async_jobs.is_some() && client_abort == ClientAbort::Cancel {
            return Err(ConfigError::new(
                format!("{p}.client_abort"),
                "cancel cannot apply to an async route: a job goes on when its client leaves, so its slot is kept until the pod's answer says whether it started one (use finish, the default)",
            ));
        }
        let target = route_target(&p, r, discovery)?;
        let queue = match &r.queue {
            Some(q) => queue_policy(&format!("{p}.queue"), q, queue)?,
            None => queue,
        };

        // A pod address has one cap, whichever route reaches it.
        if let Target::Static(addrs) = &target {
            for (idx, pc) in pools.iter().enumerate() {
                let Target::Static(other) = &pc.target else {
                    continue;
                };
                if pc.limit == limit {
                    continue;
                }
                if let Some(shared) = addrs.iter().find(|a| other.contains(a)) {
                    let owner = pool_owner[&idx];
                    return Err(ConfigError::new(
                        format!("{p}.limit"),
                        format!(
                            "{limit} conflicts with routes[{owner}].limit = {}: both routes reach pod {shared}, which has one per-pod cap, so they must agree",
                            pc.limit
                        ),
                    ));
                }
            }
        }
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
            upstream_timeout,
            async_jobs,
        });
        Ok(())
    }
}

/// Bounds of `async.check_interval` (a pod asked more often than every 10 ms is loaded by the
/// asking) and `async.max_duration` (a week: longer is a lost job, not a long one).
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_JOB_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn async_jobs(
    p: &str,
    a: &FileAsync,
    protocol: UpstreamProtocol,
) -> Result<AsyncJobs, ConfigError> {
    if protocol != UpstreamProtocol::Http1 {
        return Err(ConfigError::new(
            p,
            "asynchronous jobs need protocol: http1 (a job is a 202 with a Location, not a gRPC call)",
        ));
    }
    let field = format!("{p}.check_interval");
    let check_interval = duration(&field, &a.check_interval, Duration::from_secs(2))?;
    if !(MIN_CHECK_INTERVAL..=MAX_CHECK_INTERVAL).contains(&check_interval) {
        return Err(ConfigError::new(
            field,
            format!("must be between 10ms and 1h (got {check_interval:?})"),
        ));
    }
    let field = format!("{p}.max_duration");
    let max_duration = at_most(
        &field,
        duration(&field, &a.max_duration, Duration::from_secs(2 * 3600))?,
        MAX_JOB_DURATION,
    )?;
    if max_duration < check_interval {
        return Err(ConfigError::new(
            field,
            format!("{max_duration:?} is shorter than check_interval ({check_interval:?})"),
        ));
    }
    let field = format!("{p}.done_when");
    let done_when = match &a.done_when {
        None => DoneWhen::Redirect,
        Some(FileDoneWhen::Convention(c)) => match c.as_str() {
            "redirect" => DoneWhen::Redirect,
            "not_accepted" => DoneWhen::NotAccepted,
            other => {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "unknown convention {other:?}: write redirect, not_accepted or {{json: /status, done: [succeeded, failed]}}"
                    ),
                ))
            }
        },
        Some(FileDoneWhen::Json(j)) => {
            if !(j.json.is_empty() || j.json.starts_with('/')) {
                return Err(ConfigError::new(
                    format!("{field}.json"),
                    format!("{:?} is not a JSON pointer: write it like /status", j.json),
                ));
            }
            if j.done.is_empty() {
                return Err(ConfigError::new(
                    format!("{field}.done"),
                    "empty: name the states that end a job (e.g. [succeeded, failed])",
                ));
            }
            DoneWhen::Json {
                pointer: j.json.clone(),
                done: j.done.clone(),
            }
        }
    };
    let callback_base = match &a.callback_base {
        None => None,
        Some(base) => Some(callback_base(&format!("{p}.callback_base"), base)?),
    };
    let job_id = match &a.job_id {
        None => None,
        Some(j) => Some(job_id(&format!("{p}.job_id"), j)?),
    };
    Ok(AsyncJobs {
        check_interval,
        max_duration,
        done_when,
        callback_base,
        job_id,
    })
}

/// `async.job_id`: a JSON pointer and a status path with `{id}` once.
fn job_id(field: &str, j: &FileJobId) -> Result<JobIdInJson, ConfigError> {
    if !j.json.starts_with('/') {
        return Err(ConfigError::new(
            format!("{field}.json"),
            format!("{:?} is not a JSON pointer: write it like /task_id", j.json),
        ));
    }
    let placeholder = JobIdInJson::PLACEHOLDER;
    // The client's requests carry the id (lb-agent's handle for it) as a whole path segment,
    // which is where lb-agent looks for it.
    let path = j.status.split('?').next().unwrap_or_default();
    if !j.status.starts_with('/')
        || j.status.matches(placeholder).count() != 1
        || !path.split('/').any(|segment| segment == placeholder)
    {
        return Err(ConfigError::new(
            format!("{field}.status"),
            format!(
                "{:?}: write the job's status path with {placeholder} once, as a whole path segment, like /tasks/{placeholder}",
                j.status
            ),
        ));
    }
    if j.status.parse::<http::uri::PathAndQuery>().is_err() || j.status.contains(['#', ' ']) {
        return Err(ConfigError::new(
            format!("{field}.status"),
            format!("{:?} is not a path", j.status),
        ));
    }
    Ok(JobIdInJson {
        pointer: j.json.clone(),
        status: j.status.clone(),
    })
}

/// `async.callback_base`: an `http` URL with a host (and port), nothing after it; returned
/// without a trailing `/`.
fn callback_base(field: &str, base: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        ConfigError::new(
            field,
            format!(
                "{base:?} {why}: write it like http://lb-agent.ai-media.svc.cluster.local:8080"
            ),
        )
    };
    let uri: http::Uri = base.parse().map_err(|_| bad("is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("is not an http:// URL"));
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(bad("names no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("has a path: lb-agent adds its own"));
    }
    Ok(base.trim_end_matches('/').to_string())
}

/// Shortest and longest `ledger.lease_ttl`: below a second a busy Redis or a GC pause would
/// expire live leases; above an hour a dead agent's slots would stay lost for too long.
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// `ledger.recovery_hold` must outlast the time an agent needs to notice a restarted Redis
/// (it re-makes its pub/sub connection every 100 ms) and re-assert; a minute is past any need.
const MIN_RECOVERY_HOLD: Duration = Duration::from_millis(200);
const MAX_RECOVERY_HOLD: Duration = Duration::from_secs(60);

fn ledger(f: &FileLedger) -> Result<LedgerConfig, ConfigError> {
    let d = LedgerConfig::default();
    let lease_ttl = duration("ledger.lease_ttl", &f.lease_ttl, d.lease_ttl)?;
    if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&lease_ttl) {
        return Err(ConfigError::new(
            "ledger.lease_ttl",
            format!("must be between 1s and 1h (got {lease_ttl:?})"),
        ));
    }
    let recovery_hold = duration("ledger.recovery_hold", &f.recovery_hold, d.recovery_hold)?;
    if !(MIN_RECOVERY_HOLD..=MAX_RECOVERY_HOLD).contains(&recovery_hold) {
        return Err(ConfigError::new(
            "ledger.recovery_hold",
            format!("must be between 200ms and 1m (got {recovery_hold:?})"),
        ));
    }
    let redis = match f.redis.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => {
            let rest = url.strip_prefix("redis://").ok_or_else(|| {
                ConfigError::new(
                    "ledger.redis",
                    format!("{url:?} must be a redis://host:port/db URL (TLS is not built in)"),
                )
            })?;
            let host = rest.rsplit('@').next().unwrap_or_default();
            if host.is_empty() || host.starts_with('/') || host.starts_with(':') {
                return Err(ConfigError::new(
                    "ledger.redis",
                    format!("{url:?} names no host"),
                ));
            }
            Some(url.to_string())
        }
    };
    Ok(LedgerConfig {
        redis,
        lease_ttl,
        recovery_hold,
    })
}

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
        response_buffer: f.response_buffer.unwrap_or(d.response_buffer),
        // A larger per-answer bound with no total of its own raises the default total to it.
        response_buffer_total: f.response_buffer_total.unwrap_or(
            d.response_buffer_total
                .max(f.response_buffer.unwrap_or(d.response_buffer)),
        ),
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
    if limits.response_buffer > MAX_RESPONSE_BUFFER {
        return Err(ConfigError::new(
            "client.response_buffer",
            format!(
                "must be at most {MAX_RESPONSE_BUFFER} bytes (1 GiB; 0 turns buffering off), got {}",
                limits.response_buffer
            ),
        ));
    }
    if limits.response_buffer_total < limits.response_buffer
        || limits.response_buffer_total as u64 > MAX_RESPONSE_BUFFER_TOTAL
    {
        return Err(ConfigError::new(
            "client.response_buffer_total",
            format!(
                "must be at least client.response_buffer ({}) and at most {MAX_RESPONSE_BUFFER_TOTAL} bytes (64 GiB), got {}",
                limits.response_buffer, limits.response_buffer_total
            ),
        ));
    }
    Ok(limits)
}

/// How a `service_name` route's discovery is chosen: its own `discovery`, else the top-level
/// one, else the Kubernetes API when `kube_config_file` names a file that exists (the Go agent's
/// setup, whose configs then work unchanged with their ordinary Services), else DNS.
struct DiscoveryRule {
    cluster_domain: String,
    default: Option<DiscoveryKind>,
    kubeconfig_found: bool,
}

impl DiscoveryRule {
    fn kind(&self, route: Option<DiscoveryKind>) -> DiscoveryKind {
        route.or(self.default).unwrap_or(if self.kubeconfig_found {
            DiscoveryKind::Kubernetes
        } else {
            DiscoveryKind::Dns
        })
    }
}

/// A route asked for the API (`discovery: kubernetes`) with a `kube_config_file` that is not
/// there: an error at `kube_config_file` (pushed to `problems`) rather than a silent fall back
/// to the in-cluster account or to DNS. `true` if so.
fn kube_config_missing(
    file: &Option<PathBuf>,
    pools: &[PoolConfig],
    problems: &mut Problems,
) -> bool {
    let uses_api = pools
        .iter()
        .any(|p| matches!(p.target, Target::Kube { .. }));
    match file {
        Some(path) if uses_api && !path.is_file() => {
            problems.0.push(ConfigError::new(
                "kube_config_file",
                format!(
                    "{}: no such file (discovery: kubernetes reads it; leave kube_config_file out to use the in-cluster service account)",
                    path.display()
                ),
            ));
            true
        }
        _ => false,
    }
}

/// `http_port` of a DNS or static-style target: a number, not a port name.
fn port_number(p: &str, port: &FilePort) -> Result<u16, ConfigError> {
    match port {
        FilePort::Number(n) => Ok(*n),
        FilePort::Name(name) => Err(ConfigError::new(
            format!("{p}.http_port"),
            format!(
                "{name:?} is a port name, which only Kubernetes API discovery can resolve (service_name + namespace with discovery: kubernetes); give the number"
            ),
        )),
    }
}

/// Works out where a route's pods come from. Exactly one of: `endpoints`, `host`,
/// `service_name` + `namespace`, or the older `k8s_host`.
fn route_target(p: &str, r: &FileRoute, discovery: &DiscoveryRule) -> Result<Target, ConfigError> {
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
    if r.discovery == Some(DiscoveryKind::Kubernetes) && !forms[2] {
        return Err(ConfigError::new(
            format!("{p}.discovery"),
            "kubernetes needs the route's service_name + namespace (host, k8s_host and endpoints are not Services)",
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
            let field = format!("{p}.endpoints[{j}]");
            let a = peer_addr(&field, socket_addr(&field, e)?)?;
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
        let port = match (r.k8s_port, &r.http_port) {
            (Some(n), _) => n,
            (None, Some(port)) => port_number(p, port)?,
            (None, None) => {
                return Err(ConfigError::new(
                    format!("{p}.K8s_port"),
                    "missing (the port that goes with k8s_host)",
                ))
            }
        };
        (dns_host(&format!("{p}.k8s_host"), h)?, port)
    } else if let Some(h) = &r.host {
        let port = r
            .http_port
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("{p}.http_port"), "missing"))?;
        (dns_host(&format!("{p}.host"), h)?, port_number(p, port)?)
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
            .as_ref()
            .ok_or_else(|| ConfigError::new(format!("{p}.http_port"), "missing"))?;
        let svc = svc.trim().to_ascii_lowercase();
        let ns = ns.trim().to_ascii_lowercase();
        if ns.is_empty() {
            return Err(ConfigError::new(
                format!("{p}.namespace"),
                "must not be empty",
            ));
        }
        dns_label(&format!("{p}.service_name"), &svc)?;
        dns_label(&format!("{p}.namespace"), &ns)?;
        if discovery.kind(r.discovery) == DiscoveryKind::Kubernetes {
            let port = match port {
                FilePort::Number(0) => {
                    return Err(ConfigError::new(
                        format!("{p}.http_port"),
                        "must be between 1 and 65535",
                    ))
                }
                FilePort::Number(n) => PodPort::Number(*n),
                FilePort::Name(name) => {
                    dns_label(&format!("{p}.http_port"), name)?;
                    PodPort::Named(name.clone())
                }
            };
            return Ok(Target::Kube {
                namespace: ns,
                service: svc,
                port,
            });
        }
        let host = format!("{svc}.{ns}.svc.{}", discovery.cluster_domain);
        dns_name(&format!("{p}.service_name"), &host)?;
        (host, port_number(p, port)?)
    };
    if port == 0 {
        return Err(ConfigError::new(
            format!("{p}.http_port"),
            "must be between 1 and 65535",
        ));
    }
    Ok(Target::Dns { host, port })
}

/// A `host`/`k8s_host` as looked up: trimmed, without the root's trailing dot, lower case.
fn dns_host(field: &str, name: &str) -> Result<String, ConfigError> {
    let host = name.trim().trim_end_matches('.').to_ascii_lowercase();
    dns_name(field, &host)?;
    Ok(host)
}

#[cfg(test)]
mod env_tests {
    use super::super::Config;

    const GO_SAMPLE: &str = "port: 8080\ndebug: false\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n";

    fn with(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn port_and_debug_from_the_environment_win_over_the_file() {
        let c = Config::parse_with_env(GO_SAMPLE, &with(&[("PORT", "9000"), ("DEBUG", "true")]))
            .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(c.debug);
        let c = Config::parse_with_env(GO_SAMPLE, &with(&[])).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert!(!c.debug);
        let listen = "listen: 127.0.0.1:7000\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n";
        let c = Config::parse_with_env(listen, &with(&[("PORT", "7100")])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7100");
        let c = Config::parse_with_env(GO_SAMPLE, &with(&[("PORT", ""), ("DEBUG", " ")])).unwrap();
        assert_eq!(c.listen.port(), 8080);
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let e = Config::parse_with_env(GO_SAMPLE, &with(&[("PORT", "http")])).unwrap_err();
        assert!(e.to_string().contains("PORT (environment)"), "{e}");
        let e = Config::parse_with_env(GO_SAMPLE, &with(&[("DEBUG", "maybe")])).unwrap_err();
        assert!(e.to_string().contains("DEBUG (environment)"), "{e}");
    }
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
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
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

    fn kube(ns: &str, svc: &str, port: PodPort) -> Target {
        Target::Kube {
            namespace: ns.into(),
            service: svc.into(),
            port,
        }
    }

    /// The Go agent's own setup: its kubeconfig is there, so its ordinary Service is found
    /// through the API, unchanged. Without the file (the test above) it is DNS, as before.
    #[test]
    fn go_agent_config_with_its_kubeconfig_present_uses_the_api() {
        let dir = std::env::temp_dir().join(format!("lb-agent-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("config");
        std::fs::write(&kc, "apiVersion: v1\nkind: Config\n").unwrap();
        let text = GO_CONFIG.replace("/root/kube/config", kc.to_str().unwrap());
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.pools[0].target,
            kube("ai-media", "yt-server-video-codec", PodPort::Number(20109))
        );
        assert_eq!(c.kube_config_file.as_deref(), Some(kc.as_path()));
        assert!(
            c.discovery_summary()[0].contains("Kubernetes API"),
            "{:?}",
            c.discovery_summary()
        );
        // A route may still ask for DNS.
        let c = Config::parse(
            &text.replace("http_port: 20109", "http_port: 20109\n    discovery: dns"),
        )
        .unwrap();
        assert!(matches!(c.pools[0].target, Target::Dns { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn discovery_kubernetes_uses_the_in_cluster_account_and_a_route_may_say_dns() {
        let c = Config::parse(
            "discovery: kubernetes\nroutes:\n  - {uri: /a, limit: 2, service_name: s, namespace: n, http_port: http}\n  - {uri: /b, limit: 1, service_name: t, namespace: n, http_port: \"81\", discovery: dns}\n  - {uri: /c, limit: 1, host: x.example, http_port: 82}\n",
        )
        .unwrap();
        assert_eq!(
            c.pools[0].target,
            kube("n", "s", PodPort::Named("http".into()))
        );
        assert_eq!(
            c.pools[1].target,
            Target::Dns {
                host: "t.n.svc.cluster.local".into(),
                port: 81
            }
        );
        assert!(
            matches!(c.pools[2].target, Target::Dns { .. }),
            "host routes stay DNS"
        );
        assert_eq!(c.kube_config_file, None);
        assert!(c.discovery_summary()[0].contains("in-cluster service account"));
        assert!(c.discovery_summary()[1].contains("must be headless"));
    }

    #[test]
    fn discovery_mistakes_name_their_field() {
        for (text, want) in [
            (
                "discovery: kubernetes\nkube_config_file: /nonexistent/kubeconfig\nroutes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 1}\n",
                "kube_config_file: /nonexistent/kubeconfig: no such file",
            ),
            (
                "routes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 1, discovery: kubernetes}\nkube_config_file: /nonexistent/kubeconfig\n",
                "kube_config_file: /nonexistent/kubeconfig: no such file",
            ),
            (
                "routes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: http}\n",
                "routes[0].http_port: \"http\" is a port name, which only Kubernetes API discovery can resolve",
            ),
            (
                "routes:\n  - {uri: /a, limit: 1, host: x.example, http_port: 1, discovery: kubernetes}\n",
                "routes[0].discovery: kubernetes needs the route's service_name + namespace",
            ),
            (
                "discovery: k8s\nroutes:\n  - {uri: /a, limit: 1, host: x.example, http_port: 1}\n",
                "discovery: \"k8s\" is not one of: dns, kubernetes",
            ),
            (
                "discovery: kubernetes\nroutes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 0}\n",
                "routes[0].http_port: must be between 1 and 65535",
            ),
            (
                "discovery: kubernetes\nroutes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: \"Web_Port\"}\n",
                "routes[0].http_port:",
            ),
            (
                "routes:\n  - {uri: /a, limit: 1, service_name: s, namespace: n, http_port: 70000}\n",
                "70000 is not a port number",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}\n  got: {e}\n  want: {want}");
        }
    }

    /// The Go agent read YAML 1.1, where `yes`, `on`, `y` (any case) are booleans too.
    #[test]
    fn go_config_takes_yaml_1_1_booleans() {
        for (form, want) in [
            ("yes", true),
            ("On", true),
            ("Y", true),
            ("TRUE", true),
            ("no", false),
            ("OFF", false),
            ("n", false),
            ("False", false),
        ] {
            let text = GO_CONFIG.replace("debug: false", &format!("debug: {form}"));
            assert_eq!(Config::parse(&text).unwrap().debug, want, "debug: {form}");
        }
        assert!(err(&GO_CONFIG.replace("debug: false", "debug: maybe")).starts_with("debug: "));
    }

    /// Every unknown key, then the first value of the wrong type, still at its path (the text
    /// is parsed again without the unknown keys).
    #[test]
    fn every_unknown_key_then_the_first_bad_value() {
        let e = Config::parse(
            "bogus: 1\nroutes:\n  - {uri: /a, limt: 1, limit: two, endpoints: [\"127.0.0.1:1\"]}\n",
        )
        .unwrap_err();
        let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("bogus: unknown field `bogus`"),
            "{problems:?}"
        );
        assert_eq!(
            problems[1],
            "routes[0].limt: unknown field `limt`; did you mean `limit`?"
        );
        assert_eq!(
            problems[2],
            "routes[0].limit: invalid type: string \"two\", expected usize"
        );
        // On one line for a reload's log.
        assert_eq!(e.to_string(), problems.join("; "));
        // Without unknown keys, the error says where it is.
        assert!(
            err("routes:\n  - {uri: /a, limit: two, endpoints: [\"127.0.0.1:1\"]}\n")
                .ends_with("expected usize at line 2 column 22"),
        );
    }

    /// Independent settings and routes are each checked, so one run names every bad value
    /// (a route's first one); a route is checked even when a global it inherits is wrong.
    #[test]
    fn every_bad_setting_and_route_is_reported_in_one_run() {
        let e = Config::parse(
            "threads: 0\nqueue: {timeout: 0s}\ncluster_domain: a_b\nledger: {lease_ttl: 1ms}\nroutes:\n  - {uri: /a, limit: 0, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: b, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /c, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /d, limit: 1, service_name: s, namespace: n, http_port: 1, queue: {max_waiting: 2000000}}\n",
        )
        .unwrap_err();
        let fields: Vec<&str> = e.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "threads",
                "cluster_domain",
                "queue.timeout",
                "ledger.lease_ttl",
                "routes[0].limit",
                "routes[1].uri",
                "routes[3].queue.max_waiting",
            ],
            "{e}"
        );
        // A route is checked against the routes before it: their uris, and the pools of the
        // valid ones.
        let e = Config::parse(
            "routes:\n  - {uri: /a, limit: 0, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.2:1\"]}\n  - {uri: /b, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /c, limit: 2, endpoints: [\"127.0.0.1:1\"]}\n",
        )
        .unwrap_err();
        let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[1].starts_with("routes[1].uri: duplicate uri \"/a\""),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with("routes[3].limit: 2 conflicts with routes[2].limit = 1"),
            "{problems:?}"
        );
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
    fn overlapping_endpoint_lists_with_one_limit_are_accepted() {
        let c = Config::parse(
            "routes:\n  - {uri: /a, limit: 2, endpoints: ['127.0.1.1:80', '127.0.1.2:80']}\n  - {uri: /b, limit: 2, endpoints: ['127.0.1.2:80', '127.0.1.3:80']}\n",
        )
        .unwrap();
        assert_eq!(c.pools.len(), 2, "two pools, one cap per pod address");
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
            ("ledger: {redis: 'http://r:6379'}\nroutes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80']}\n", "ledger.redis: \"http://r:6379\" must be a redis://"),
            ("ledger: {redis: 'redis://'}\nroutes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80']}\n", "ledger.redis: \"redis://\" names no host"),
            ("ledger: {recovery_hold: 50ms}\nroutes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80']}\n", "ledger.recovery_hold: must be between 200ms and 1m"),
            ("ledger: {lease_ttl: 500ms}\nroutes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80']}\n", "ledger.lease_ttl: must be between 1s and 1h"),
            ("ledger: {lease_ttl: 1000000000000s}\nroutes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80']}\n", "ledger.lease_ttl: must be between 1s and 1h"),
            ("routes:\n  - {uri: /a, limit: 1, endpoints: ['127.0.1.1:80', '127.0.1.2:80']}\n  - {uri: /b, limit: 2, endpoints: ['127.0.1.3:80', '127.0.1.2:80']}\n", "routes[1].limit: 2 conflicts with routes[0].limit = 1: both routes reach pod 127.0.1.2:80"),
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
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
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
        assert_eq!(c.routes[0].upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT);
        // The global value is every route's default; a route may override it.
        let timeouts = Config::parse(
            "upstream_timeout: 10m\nroutes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /b, limit: 1, endpoints: [\"127.0.0.1:1\"], upstream_timeout: 2s}\n",
        )
        .unwrap();
        assert_eq!(
            timeouts.routes[0].upstream_timeout,
            Duration::from_secs(600)
        );
        assert_eq!(timeouts.routes[1].upstream_timeout, Duration::from_secs(2));
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

    #[test]
    fn every_bound_names_its_field() {
        let r = "routes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n";
        let cases: &[(&str, &str)] = &[
            (
                "queue: {timeout: 18446744073709551615s}\n",
                "queue.timeout: must be at most 24h (got 18446744073709551615s)",
            ),
            (
                "queue: {max_waiting: 1000001}\n",
                "queue.max_waiting: must be at most 1000000",
            ),
            (
                "threads: 4294967296\n",
                "threads: must be at most 1024 (got 4294967296)",
            ),
            ("max_attempts: 101\n", "max_attempts: must be at most 100"),
            (
                "listen: 127.0.0.1:0\n",
                "listen: \"127.0.0.1:0\": port 0 would listen on a random port",
            ),
            (
                "admin_listen: 127.0.0.1:0\n",
                "admin_listen: \"127.0.0.1:0\": port 0 would listen on a random port",
            ),
            ("max_attempts: 0\n", "max_attempts: must be at least 1"),
            (
                "dns: {stability_samples: 101}\n",
                "dns.stability_samples: must be at most 100",
            ),
            (
                "dns: {refresh_interval: 25h}\n",
                "dns.refresh_interval: must be at most 24h",
            ),
            (
                "dns: {stability_interval: 25h}\n",
                "dns.stability_interval: must be at most 24h",
            ),
            (
                "dns: {unstable_retry: 25h}\n",
                "dns.unstable_retry: must be at most 24h",
            ),
            (
                "dns: {nameservers: [\"10.0.0.1:0\"]}\n",
                "dns.nameservers[0]: 10.0.0.1:0: port must be",
            ),
            (
                "reload_interval: 1000000000000s\n",
                "reload_interval: must be at most 24h",
            ),
            (
                "connect_timeout: 601s\n",
                "connect_timeout: must be at most 10m",
            ),
            (
                "upstream_timeout: 25h\n",
                "upstream_timeout: must be between 1s and 24h (got 90000s)",
            ),
            (
                "upstream_timeout: 999ms\n",
                "upstream_timeout: must be between 1s and 24h (got 999ms)",
            ),
            (
                "upstream_timeout: 5 minutes please\n",
                "upstream_timeout: bad duration",
            ),
            (
                "cluster_domain: \"a..b\"\n",
                "cluster_domain: \"a..b\" is not a DNS name: empty label",
            ),
        ];
        for (settings, want) in cases {
            let got = err(&format!("{settings}{r}"));
            assert!(
                got.contains(want),
                "{settings:?} gave {got:?}, want {want:?}"
            );
        }
        let route_cases: &[(&str, &str)] = &[
            (
                "limit: 100001, endpoints: [\"127.0.0.1:1\"]",
                "routes[0].limit: must be at most 100000",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:0\"]",
                "routes[0].endpoints[0]: 127.0.0.1:0: port must be between 1 and 65535",
            ),
            (
                "limit: 1, endpoints: [\"239.1.1.1:80\"]",
                "routes[0].endpoints[0]: 239.1.1.1:80: must be the address of one host",
            ),
            (
                "limit: 1, endpoints: [\"[::]:80\"]",
                "routes[0].endpoints[0]: [::]:80: must be the address",
            ),
            (
                "limit: 1, service_name: s, namespace: \"\", http_port: 1",
                "routes[0].namespace: must not be empty",
            ),
            (
                "limit: 1, service_name: s, namespace: \" \", http_port: 1",
                "routes[0].namespace: must not be empty",
            ),
            (
                "limit: 1, service_name: \"s_1\", namespace: n, http_port: 1",
                "routes[0].service_name: \"s_1\" is not a DNS label (RFC 1123): '_' is not allowed",
            ),
            (
                "limit: 1, service_name: s, namespace: \"n-\", http_port: 1",
                "routes[0].namespace: \"n-\" is not a DNS label",
            ),
            (
                "limit: 1, host: \"x/y\", http_port: 1",
                "routes[0].host: \"x/y\" is not a DNS name",
            ),
            (
                "limit: 1, k8s_host: \"\", K8s_port: 1",
                "routes[0].k8s_host: \"\" is not a DNS name: empty",
            ),
            (
                "limit: 1, match: Prefix, endpoints: [\"127.0.0.1:1\"]",
                "routes[0].match: \"Prefix\" is not one of: exact, prefix",
            ),
            (
                "limit: 1, client_abort: 1, endpoints: [\"127.0.0.1:1\"]",
                "routes[0].client_abort",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {done_when: redirected}",
                "routes[0].async.done_when: unknown convention \"redirected\"",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {check_interval: 1ms}",
                "routes[0].async.check_interval: must be between 10ms and 1h",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: task_id, status: \"/t/{id}\"}}",
                "routes[0].async.job_id.json: \"task_id\" is not a JSON pointer",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /id, status: /tasks}}",
                "routes[0].async.job_id.status: \"/tasks\": write the job's status path with {id} once",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /id, status: \"/t/{id}/{id}\"}}",
                "routes[0].async.job_id.status",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /id}}",
                "routes[0].async.job_id",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /id, status: \"/t/job-{id}\"}}",
                "routes[0].async.job_id.status: \"/t/job-{id}\": write the job's status path with {id} once, as a whole path segment",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /id, status: \"/status?task_id={id}\"}}",
                "routes[0].async.job_id.status",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {callback_base: \"https://lb:8080\"}",
                "routes[0].async.callback_base: \"https://lb:8080\" is not an http:// URL",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {callback_base: \"http://lb:8080/x\"}",
                "routes[0].async.callback_base: \"http://lb:8080/x\" has a path",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {check_interval: 10s, max_duration: 1s}",
                "routes[0].async.max_duration: 1s is shorter than check_interval",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {done_when: {json: status, done: [ok]}}",
                "routes[0].async.done_when.json: \"status\" is not a JSON pointer",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], client_abort: cancel, async: {}",
                "routes[0].client_abort: cancel cannot apply to an async route",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], protocol: h2c, async: {}",
                "routes[0].async: asynchronous jobs need protocol: http1",
            ),
            (
                "limit: 1, endpoints: [\"127.0.0.1:1\"], async: {check_intervall: 1s}",
                "routes[0].async.check_intervall: unknown field",
            ),
            (
                "limit: 1, upstream_timeout: 0s, endpoints: [\"127.0.0.1:1\"]",
                "routes[0].upstream_timeout: must be between 1s and 24h (got 0ns)",
            ),
        ];
        for (route, want) in route_cases {
            let got = err(&format!("routes:\n  - {{uri: /a, {route}}}\n"));
            assert!(got.contains(want), "{route:?} gave {got:?}, want {want:?}");
        }
        let long = format!("{}.example", "a".repeat(64));
        assert!(err(&format!(
            "routes:\n  - {{uri: /a, limit: 1, host: {long}, http_port: 1}}\n"
        ))
        .contains("longer than 63 characters"));
        let huge = format!("{}.example", "a.".repeat(130));
        assert!(err(&format!(
            "routes:\n  - {{uri: /a, limit: 1, host: {huge}, http_port: 1}}\n"
        ))
        .contains("longer than 253 characters"));
    }

    #[test]
    fn a_json_job_id_reads_as_a_pointer_and_a_status_path() {
        let c = Config::parse(
            "routes:\n  - {uri: /submit, limit: 1, endpoints: [\"127.0.0.1:1\"], async: {job_id: {json: /task_id, status: \"/v1/status/poll/{id}?wait=0\"}}}\n",
        )
        .unwrap();
        let a = c.routes[0].async_jobs.as_ref().unwrap();
        assert_eq!(
            a.job_id,
            Some(JobIdInJson {
                pointer: "/task_id".into(),
                status: "/v1/status/poll/{id}?wait=0".into(),
            })
        );
    }

    #[test]
    fn values_at_their_bounds_are_accepted() {
        let c = Config::parse(
            "threads: 1024\nmax_attempts: 100\nqueue: {max_waiting: 1000000, timeout: 24h}\nreload_interval: 24h\nconnect_timeout: 10m\nupstream_timeout: 24h\ndns: {stability_samples: 100, refresh_interval: 24h}\nroutes:\n  - {uri: /a, limit: 100000, match: prefix, protocol: h2c, client_abort: cancel, host: Codec.Example., http_port: 65535}\n  - {uri: /b, limit: 1, endpoints: [\"127.0.0.1:1\"], upstream_timeout: 1s}\n",
        )
        .unwrap();
        assert_eq!(c.threads, 1024);
        assert_eq!(c.pools[0].limit, MAX_LIMIT);
        assert_eq!(c.routes[0].queue.timeout, MAX_TIMEOUT);
        assert_eq!(c.routes[0].protocol, super::super::UpstreamProtocol::H2c);
        assert_eq!(c.routes[0].client_abort, super::super::ClientAbort::Cancel);
        assert_eq!(c.routes[0].upstream_timeout, MAX_TIMEOUT);
        assert_eq!(c.routes[1].upstream_timeout, MIN_UPSTREAM_TIMEOUT);
        assert_eq!(
            c.pools[0].target,
            Target::Dns {
                host: "codec.example".into(),
                port: 65535
            }
        );
    }

    #[test]
    fn nesting_depth_is_estimated_from_above_without_parsing() {
        // Our own format: 4 levels.
        assert_eq!(too_deep(GO_CONFIG, 4), None);
        assert_eq!(too_deep("a:\n  b:\n    c:\n      - {d: [1]}\n", 5), Some(4));
        // (6 collections; the `- ` item and its flow map count twice.)
        assert_eq!(too_deep("a:\n  b:\n    c:\n      - {d: [1]}\n", 6), Some(4));
        assert_eq!(too_deep("a:\n  b:\n    c:\n      - {d: [1]}\n", 7), None);
        // Compact sequences nest on one line.
        assert_eq!(too_deep("- - - - x\n", 3), Some(1));
        // Flow collections spanning lines.
        assert_eq!(too_deep("a: [\n [\n  [\n   1]]]\n", 3), Some(3));
        // Dedent pops levels.
        assert_eq!(too_deep("a:\n  b: 1\nc:\n  d: 1\n", 2), None);
        // Brackets in quotes (also multi-line, with escapes) and in comments are not nesting …
        assert_eq!(
            too_deep("a: \"[[[\\\"[[\"\nb: '[[''[['\n# [[[[\nc: \"[[\n[[\"\n", 1),
            None
        );
        // … but a quote inside a plain scalar does not hide the brackets that follow.
        assert_eq!(too_deep("a: [x'y, [[[1]]]]\n", 3), Some(1));
        // An anchor or tag before a flow collection does not hide it.
        assert_eq!(too_deep("a: &x [[[1]]]\nb: !!seq [[[1]]]\n", 3), Some(1));
        // Linear: a megabyte of brackets is measured at once.
        let text = "[".repeat(MAX_CONFIG_BYTES);
        let started = std::time::Instant::now();
        assert_eq!(too_deep(&text, MAX_CONFIG_DEPTH), Some(1));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn restart_only_settings_are_one_comparison_and_name_what_changed() {
        let a = Config::parse(GO_CONFIG).unwrap();
        let mut b = a.clone();
        // Live settings do not count.
        b.connect_timeout = Duration::from_secs(9);
        b.routes[0].queue.max_waiting = 1;
        b.pools[0].limit = 7;
        assert_eq!(a.restart_only(), b.restart_only());
        assert!(a.restart_only().changed(&b.restart_only()).is_empty());
        b.threads = 2;
        b.dns.stability_samples = 9;
        b.listen = "127.0.0.1:1".parse().unwrap();
        assert_ne!(a.restart_only(), b.restart_only());
        assert_eq!(
            a.restart_only().changed(&b.restart_only()),
            vec!["listen/port", "threads", "dns"]
        );
    }
}
