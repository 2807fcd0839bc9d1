//! Headless-Service DNS discovery with the stability check.
//!
//! Only a headless Service's name answers one record per pod: an ordinary Service's answers its
//! one cluster IP, which this module warns about (see
//! [`DnsDiscovery::warn_if_single_address`]); Kubernetes API discovery ([`super::kube`]) works
//! with either.
//!
//! A headless Service (`clusterIP: None`) answers its DNS name with one A/AAAA record per ready
//! pod. While pods restart those answers flicker, so a *changed* answer is trusted only after it
//! came back identical `stability_samples` times, `stability_interval` apart; otherwise the
//! current pod list stays and the name is looked at again after `unstable_retry`. An answer
//! equal to the current list changes nothing.
//!
//! DNS errors (timeout, SERVFAIL, REFUSED, unreachable server) keep the last good pod list; they
//! are logged once per episode. NXDOMAIN or an empty answer is an answer: zero pods, once stable.
//!
//! Names are looked up as absolute names (with the root's trailing dot, see [`lookup_name`]):
//! the search list and `ndots` of `/etc/resolv.conf` never apply. Otherwise an error on the real
//! name makes the resolver go on to the search-list names (`<name>.<ns>.svc.cluster.local`, …),
//! whose NXDOMAIN becomes the final answer: a SERVFAIL would read as "no pods".

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioResolver;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Attached, DiscoveryStats};
use crate::balance::Balancer;
use crate::config::DnsConfig;

/// A DNS answer: the set of pod IPs (empty for NXDOMAIN / no records).
pub type Answer = BTreeSet<IpAddr>;

/// Why a DNS name could not be looked up, or discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path}: {source}")]
    ResolvConf {
        path: String,
        #[source]
        source: hickory_resolver::net::NetError,
    },
    #[error("cannot build DNS resolver: {0}")]
    Build(#[source] hickory_resolver::net::NetError),
    /// A failure that says nothing about the pods (timeout, SERVFAIL, network error).
    #[error("{0}")]
    Lookup(#[source] hickory_resolver::net::NetError),
}

/// Testing only: a resolv.conf to read instead of `/etc/resolv.conf`, so the tests can give the
/// system resolver a search list and `ndots` without touching the machine's own file.
pub const RESOLV_CONF_ENV: &str = "LB_AGENT_RESOLV_CONF";
/// Testing only: the port of the nameservers in that file (resolv.conf cannot say one; the
/// tests' DNS server listens on an unprivileged port).
pub const RESOLV_CONF_PORT_ENV: &str = "LB_AGENT_RESOLV_CONF_PORT";

/// The system resolver's settings: `/etc/resolv.conf` (or the file of [`RESOLV_CONF_ENV`]).
fn system_config() -> Result<(ResolverConfig, ResolverOpts), DiscoveryError> {
    let path = std::env::var_os(RESOLV_CONF_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
    let failed = |source| DiscoveryError::ResolvConf {
        path: path.display().to_string(),
        source,
    };
    let bytes = std::fs::read(&path).map_err(|e| failed(e.into()))?;
    let (config, opts) = hickory_resolver::system_conf::parse_resolv_conf(bytes).map_err(failed)?;
    let Some(port) = std::env::var(RESOLV_CONF_PORT_ENV)
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    else {
        return Ok((config, opts));
    };
    let (domain, search, mut servers) = config.into_parts();
    for conn in servers.iter_mut().flat_map(|s| s.connections.iter_mut()) {
        conn.port = port;
    }
    Ok((ResolverConfig::from_parts(domain, search, servers), opts))
}

/// The name actually looked up for `host`: absolute (trailing dot), so the resolver asks for
/// exactly this name and nothing from the search list. An IP literal stays as it is.
pub fn lookup_name(host: &str) -> String {
    if host.ends_with('.') || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.")
    }
}

/// Builds a resolver that never answers from a cache: the refresh and the stability check need
/// to see every change as soon as the DNS server makes it.
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = if cfg.nameservers.is_empty() {
        // /etc/resolv.conf's nameservers and options, as a pod expects. Its search list stays
        // configured but never applies: every name is looked up absolute (`lookup_name`).
        let (config, opts) = system_config()?;
        let mut b = TokioResolver::builder_with_config(config, Default::default());
        *b.options_mut() = opts;
        b
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            Default::default(),
        )
    };
    let opts = builder.options_mut();
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    builder.build().map_err(DiscoveryError::Build)
}

/// Where answers come from: the real resolver, or a scripted one in the unit tests, so the
/// stability check can be tested on paused time.
pub trait Resolve: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> impl std::future::Future<Output = Result<Answer, DiscoveryError>> + Send + 'a;
}

impl Resolve for TokioResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> impl std::future::Future<Output = Result<Answer, DiscoveryError>> + Send + 'a {
        resolve(self, host)
    }
}

/// Resolves `host` once, as an absolute name. `Ok(empty)` for NXDOMAIN / no records; `Err` for
/// failures that say nothing about the pods (timeouts, SERVFAIL, REFUSED, network errors).
pub async fn resolve(resolver: &TokioResolver, host: &str) -> Result<Answer, DiscoveryError> {
    match resolver.lookup_ip(lookup_name(host)).await {
        Ok(lookup) => Ok(lookup.iter().collect()),
        Err(e) if e.is_no_records_found() => Ok(Answer::new()),
        Err(e) => Err(DiscoveryError::Lookup(e)),
    }
}

/// Discovery for one DNS name.
pub struct DnsDiscovery {
    host: String,
    attached: tokio::sync::Mutex<Attached<u16, Answer>>,
    cfg: DnsConfig,
    pub stats: Arc<DiscoveryStats>,
}

async fn feed(port: u16, balancer: &Balancer, answer: &Answer) {
    let pods = answer.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    balancer.set_pods(pods).await;
}

/// What one refresh round concluded.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// The current pod list is confirmed or a new one was adopted.
    Settled,
    /// A changed answer did not repeat identically; the current list stays.
    Unstable,
    /// DNS failed; the current list stays.
    Failed,
}

impl DnsDiscovery {
    pub fn new(host: String, pools: Vec<(u16, Arc<Balancer>)>, cfg: DnsConfig) -> Self {
        Self {
            host,
            attached: tokio::sync::Mutex::new(Attached::new(pools)),
            cfg,
            stats: Arc::default(),
        }
    }

    /// Replaces the pools fed from this name (a config reload): those in force, and retired
    /// ones still held by requests. A newly attached pool gets the adopted answer at once,
    /// without a new stability check: the answer is already trusted. Returns `false` if the
    /// task has stopped (no pool used the name for a while): the caller starts a new one.
    pub async fn set_pools(
        &self,
        pools: Vec<(u16, Arc<Balancer>)>,
        retired: Vec<(u16, Weak<Balancer>)>,
    ) -> bool {
        let mut att = self.attached.lock().await;
        if att.stopped {
            return false;
        }
        let before = att.fed();
        att.pools = pools;
        att.retired = retired;
        if let Some(answer) = att.adopted.clone() {
            for (port, b) in att.fed() {
                let known = before
                    .iter()
                    .any(|(p, old)| *p == port && Arc::ptr_eq(old, &b));
                if !known {
                    feed(port, &b, &answer).await;
                }
            }
        }
        true
    }

    /// Whether some pool still uses this name: one in force, or a retired one held by a request.
    pub async fn in_use(&self) -> bool {
        !self.attached.lock().await.fed().is_empty()
    }

    /// Marks the task stopped if no pool uses the name any more; `true` if so.
    async fn stop_if_unused(&self) -> bool {
        let mut att = self.attached.lock().await;
        att.stopped = att.stopped || att.fed().is_empty();
        att.stopped
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    async fn apply(&self, answer: &Answer) {
        let mut att = self.attached.lock().await;
        for (port, balancer) in att.fed() {
            feed(port, &balancer, answer).await;
        }
        att.adopted = Some(answer.clone());
    }

    fn record(&self, r: &Result<Answer, DiscoveryError>) {
        match r {
            Ok(_) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.stats.last_success_unix.store(now, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One refresh: look up the name, and if the answer differs from `current`, adopt it only
    /// after it repeats identically.
    async fn round(
        &self,
        resolver: &impl Resolve,
        current: &mut Option<Answer>,
        failing: &mut bool,
    ) -> Round {
        let first = resolver.resolve(&self.host).await;
        self.record(&first);
        let answer = match first {
            Ok(a) => a,
            Err(e) => {
                if !*failing {
                    match current {
                        Some(c) => log::warn!(
                            "DNS lookup of {} failed: {e}; keeping the last known pods {:?} until it recovers",
                            self.host,
                            c.iter().collect::<Vec<_>>()
                        ),
                        None => log::warn!(
                            "DNS lookup of {} failed: {e}; no pod list yet: requests to its routes wait until it resolves",
                            self.host
                        ),
                    }
                    *failing = true;
                }
                return Round::Failed;
            }
        };
        if *failing {
            log::info!("DNS lookup of {} works again", self.host);
            *failing = false;
        }
        if current.as_ref() == Some(&answer) {
            return Round::Settled;
        }
        // The first answer is taken at once: there is no pod list yet to protect, and requests
        // are waiting for one.
        if current.is_some() {
            for _ in 1..self.cfg.stability_samples {
                tokio::time::sleep(self.cfg.stability_interval).await;
                let again = resolver.resolve(&self.host).await;
                self.record(&again);
                if again.as_ref().ok() != Some(&answer) {
                    self.stats.unstable_ignored.fetch_add(1, Ordering::Relaxed);
                    log::debug!(
                        "DNS answer for {} is unstable ({:?} then {:?}); keeping the current pods",
                        self.host,
                        answer,
                        again
                    );
                    return Round::Unstable;
                }
            }
        }
        log::info!(
            "DNS {}: pods {:?} -> {:?}",
            self.host,
            current.as_ref().map(|c| c.iter().collect::<Vec<_>>()),
            answer.iter().collect::<Vec<_>>()
        );
        self.warn_if_single_address(&answer);
        self.apply(&answer).await;
        *current = Some(answer);
        Round::Settled
    }

    /// The silent trap of a Service that is not headless: its name answers one address, the
    /// cluster IP, and lb-agent would see the whole service as one pod (at most `limit` requests
    /// in all, spread at random by kube-proxy). One address can also be a service that has one
    /// pod, so this warns (at start and on each change to one address) and shows in `/status`
    /// rather than refusing. Only names of the Service form (`<svc>.<ns>.svc.<domain>`).
    fn warn_if_single_address(&self, answer: &Answer) {
        let single = answer.len() == 1 && self.host.contains(".svc.");
        let was = self.stats.single_address.swap(single, Ordering::Relaxed);
        if single && !was {
            let ip = answer.iter().next().copied();
            log::warn!(
                "DNS {} answers one address ({}): if that is an ordinary ClusterIP Service's virtual IP, lb-agent sees the whole service as ONE pod and lets at most its limit of requests run in all; use `discovery: kubernetes` (pods from the Kubernetes API, any Service) or make the Service headless (clusterIP: None)",
                self.host,
                ip.map_or_else(String::new, |ip| ip.to_string())
            );
        }
    }

    /// Runs rounds until `stop` completes.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        match resolver(&self.cfg) {
            Ok(r) => self.run_with(&r, stop).await,
            Err(e) => log::error!("discovery for {} cannot start: {e}", self.host),
        }
    }

    async fn run_with(&self, resolver: &impl Resolve, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut current = None;
        let mut failing = false;
        loop {
            if self.stop_if_unused().await {
                log::info!(
                    "stopped discovery of {}: no pool uses it any more",
                    self.host
                );
                return;
            }
            let round = tokio::select! {
                r = self.round(resolver, &mut current, &mut failing) => r,
                _ = &mut stop => return,
            };
            let wait = match round {
                Round::Unstable => self.cfg.unstable_retry,
                Round::Settled | Round::Failed => self.cfg.refresh_interval,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut stop => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The stability check against a scripted resolver, on paused time: deterministic and
    //! instant, whatever the machine is doing.
    use super::*;
    use crate::balance::Ledger;
    use tokio::time::Instant;

    /// Answers by the (paused) clock: `script[i] = (from, answer)`, the last entry whose `from`
    /// has passed wins. `None` is a failed lookup.
    struct Scripted {
        start: Instant,
        script: Vec<(Duration, Option<Vec<u8>>)>,
    }

    impl Resolve for Scripted {
        async fn resolve(&self, _host: &str) -> Result<Answer, DiscoveryError> {
            let now = self.start.elapsed();
            let answer = self
                .script
                .iter()
                .rev()
                .find(|(from, _)| *from <= now)
                .and_then(|(_, a)| a.clone());
            match answer {
                Some(last) => Ok(last.iter().map(|b| IpAddr::from([127, 0, 1, *b])).collect()),
                None => Err(DiscoveryError::Lookup(
                    "scripted failure".to_string().into(),
                )),
            }
        }
    }

    fn cfg() -> DnsConfig {
        DnsConfig {
            nameservers: Vec::new(),
            refresh_interval: Duration::from_secs(2),
            stability_samples: 5,
            stability_interval: Duration::from_millis(500),
            unstable_retry: Duration::from_secs(10),
        }
    }

    fn pods(b: &Balancer) -> Vec<u8> {
        let mut v: Vec<u8> = b
            .view()
            .pods
            .iter()
            .filter(|p| p.active)
            .map(|p| match p.addr.ip() {
                IpAddr::V4(ip) => ip.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        v.sort();
        v
    }

    /// Runs discovery against `script` and returns the pods it had fed at each checkpoint
    /// (milliseconds from the start).
    async fn run(script: Vec<(Duration, Option<Vec<u8>>)>, checkpoints: &[u64]) -> Vec<Vec<u8>> {
        let balancer = Arc::new(Balancer::new(&Ledger::new(), "t", 1));
        let d = DnsDiscovery::new("svc".into(), vec![(80, Arc::clone(&balancer))], cfg());
        let resolver = Scripted {
            start: Instant::now(),
            script,
        };
        let mut seen = Vec::new();
        let run = d.run_with(&resolver, std::future::pending());
        tokio::pin!(run);
        let start = Instant::now();
        for ms in checkpoints {
            let at = start + Duration::from_millis(*ms);
            tokio::select! {
                _ = &mut run => unreachable!("discovery never stops by itself"),
                _ = tokio::time::sleep_until(at) => {}
            }
            seen.push(pods(&balancer));
        }
        seen
    }

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn names_are_looked_up_absolute_so_no_search_list_applies() {
        let name = "codec.ai-media.svc.cluster.local";
        assert_eq!(lookup_name(name), "codec.ai-media.svc.cluster.local.");
        assert_eq!(
            lookup_name("codec.ai-media.svc.cluster.local."),
            lookup_name(name)
        );
        assert_eq!(lookup_name("10.1.2.3"), "10.1.2.3");
        assert_eq!(lookup_name("fd00::1"), "fd00::1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_is_taken_at_once() {
        let seen = run(vec![(s(0), Some(vec![1, 2]))], &[1]).await;
        assert_eq!(seen, vec![vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_adopted_only_after_it_repeats_five_times() {
        // From 3 s on the answer is {1, 2, 3}. The round at 4 s sees it first and looks again
        // at 4.5, 5, 5.5 and 6 s: adopted at 6 s, not before.
        let seen = run(
            vec![(s(0), Some(vec![1, 2])), (s(3000), Some(vec![1, 2, 3]))],
            &[3500, 5900, 6100],
        )
        .await;
        assert_eq!(seen, vec![vec![1, 2], vec![1, 2], vec![1, 2, 3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_answer_never_replaces_the_pods() {
        // Pod 2 disappears for 700 ms around each refresh: never five identical answers in a
        // row, so the list stays.
        let mut script = vec![(s(0), Some(vec![1, 2]))];
        for k in 1..20u64 {
            script.push((s(k * 2000 - 100), Some(vec![1])));
            script.push((s(k * 2000 + 600), Some(vec![1, 2])));
        }
        let seen = run(script, &[5000, 15000, 30000]).await;
        assert!(seen.iter().all(|p| *p == vec![1, 2]), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dns_failures_keep_the_last_good_pods() {
        let seen = run(
            vec![
                (s(0), Some(vec![1, 2])),
                (s(1000), None),
                (s(9000), Some(vec![1, 2])),
            ],
            &[3000, 8000, 10000],
        )
        .await;
        assert_eq!(seen, vec![vec![1, 2], vec![1, 2], vec![1, 2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_pool_is_fed_until_nothing_holds_it_then_the_task_stops() {
        let retired = Arc::new(Balancer::new(&Ledger::new(), "t", 1));
        let d = DnsDiscovery::new("svc".into(), Vec::new(), cfg());
        assert!(
            d.set_pools(Vec::new(), vec![(80, Arc::downgrade(&retired))])
                .await
        );
        let resolver = Scripted {
            start: Instant::now(),
            script: vec![(s(0), Some(vec![1])), (s(3000), Some(vec![2]))],
        };
        let run = d.run_with(&resolver, std::future::pending());
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => panic!("stopped while a retired pool still uses the name"),
            _ = tokio::time::sleep(s(7000)) => {}
        }
        assert_eq!(pods(&retired), vec![2], "the retired pool follows DNS");
        drop(retired);
        tokio::time::timeout(s(2100), run)
            .await
            .expect("stops at its next round");
        assert!(
            !d.set_pools(Vec::new(), Vec::new()).await,
            "a stopped task takes no pools: the caller starts a new one"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_answer_is_an_answer_once_stable() {
        let seen = run(
            vec![(s(0), Some(vec![1])), (s(1000), Some(vec![]))],
            &[2100, 4100],
        )
        .await;
        assert_eq!(seen, vec![vec![1], Vec::<u8>::new()]);
    }
}
