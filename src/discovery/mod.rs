//! Where pools learn their pods: a Service's headless DNS name ([`dns`]), or its EndpointSlices
//! watched through the Kubernetes API ([`kube`]). Which one a route uses is decided by the
//! config (`discovery`, `kube_config_file`; see `config/validate.rs`).
//!
//! One task runs per source (a DNS name, or a namespace/Service), and feeds every pool behind
//! it: one per port. The tasks run inside the config background service ([`crate::reload`]),
//! which starts and stops them as config reloads add and remove sources. Pools a reload retired
//! are fed too, for as long as requests still hold them (see [`crate::live`]): their queued
//! requests must go to the pods the source names now, not to a frozen list. A task whose source
//! no pool uses any more, in force or retired, stops by itself.

mod dns;
pub mod kube;
mod slices;

pub use dns::{
    lookup_name, resolve, resolver, Answer, DiscoveryError, DnsDiscovery, Resolve, RESOLV_CONF_ENV,
    RESOLV_CONF_PORT_ENV,
};
pub use kube::KubeDiscovery;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Weak};

use crate::balance::Balancer;
use crate::config::{Config, PodPort, Target};

/// Outcomes of one source, read by `/metrics` at scrape time (`lb_discovery_*{service}`) and
/// by `/status`: they live with the task, so a source that a reload drops takes its series
/// with it.
#[derive(Default, Debug)]
pub struct DiscoveryStats {
    /// Failed lookups (timeout, SERVFAIL, unreachable server; not NXDOMAIN or an empty answer),
    /// or failed API lists and watches.
    pub errors: AtomicU64,
    pub unstable_ignored: AtomicU64,
    /// Unix seconds of the last successful resolution or API answer (0: never).
    pub last_success_unix: AtomicU64,
    /// A Service's DNS name answered exactly one address: most likely an ordinary Service's
    /// cluster IP, which lb-agent would treat as a single pod (see [`DnsDiscovery`]).
    pub single_address: AtomicBool,
}

/// Where a task reads pods from: the key of one discovery task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Dns(String),
    Kube { namespace: String, service: String },
}

impl Source {
    /// The source of a pool's target, and the port its pods are reached on; `None` for a
    /// static pod list.
    pub fn of(target: &Target) -> Option<(Source, PodPort)> {
        match target {
            Target::Dns { host, port } => Some((Source::Dns(host.clone()), PodPort::Number(*port))),
            Target::Kube {
                namespace,
                service,
                port,
            } => Some((
                Source::Kube {
                    namespace: namespace.clone(),
                    service: service.clone(),
                },
                port.clone(),
            )),
            Target::Static(_) => None,
        }
    }
}

/// The `service` label of `lb_discovery_*` and the name in logs: the DNS name, or
/// `k8s:<namespace>/<service>`.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dns(host) => f.write_str(host),
            Source::Kube { namespace, service } => write!(f, "k8s:{namespace}/{service}"),
        }
    }
}

/// The pools fed from one source, and the answer they were last given. Kept under one lock so
/// a pool attached by a config reload gets exactly the answer its siblings have.
pub(crate) struct Attached<P, A> {
    /// (port, balancer) for every pool of the config in force behind this source.
    pub(crate) pools: Vec<(P, Arc<Balancer>)>,
    /// (port, balancer) for retired pools fed from this source while requests still hold them.
    pub(crate) retired: Vec<(P, Weak<Balancer>)>,
    pub(crate) adopted: Option<A>,
    /// The task stopped because no pool uses the source any more; it feeds nothing from now on.
    pub(crate) stopped: bool,
}

impl<P: Clone, A> Attached<P, A> {
    pub(crate) fn new(pools: Vec<(P, Arc<Balancer>)>) -> Self {
        Self {
            pools,
            retired: Vec::new(),
            adopted: None,
            stopped: false,
        }
    }

    /// Every pool fed from this source, retired ones that nothing holds any more left out.
    pub(crate) fn fed(&mut self) -> Vec<(P, Arc<Balancer>)> {
        self.retired.retain(|(_, w)| w.strong_count() > 0);
        let retired = self
            .retired
            .iter()
            .filter_map(|(port, w)| w.upgrade().map(|b| (port.clone(), b)));
        self.pools.iter().cloned().chain(retired).collect()
    }
}

/// One running discovery source, whichever kind.
#[derive(Clone)]
pub enum Task {
    Dns(Arc<DnsDiscovery>),
    Kube(Arc<KubeDiscovery>),
}

/// A DNS target's port is always a number (validation refuses a port name there).
fn number(port: &PodPort) -> Option<u16> {
    match port {
        PodPort::Number(n) => Some(*n),
        PodPort::Named(_) => None,
    }
}

impl Task {
    /// A task for `source` feeding `pools`, with the settings of `config` (the config the
    /// process started with: DNS settings and the kubeconfig need a restart to change).
    pub fn new(source: &Source, pools: Vec<(PodPort, Arc<Balancer>)>, config: &Config) -> Task {
        match source {
            Source::Dns(host) => Task::Dns(Arc::new(DnsDiscovery::new(
                host.clone(),
                pools
                    .into_iter()
                    .filter_map(|(p, b)| number(&p).map(|n| (n, b)))
                    .collect(),
                config.dns.clone(),
            ))),
            Source::Kube { namespace, service } => Task::Kube(Arc::new(KubeDiscovery::new(
                namespace.clone(),
                service.clone(),
                pools,
                config.kube_config_file.clone(),
            ))),
        }
    }

    /// Replaces the pools fed (see [`DnsDiscovery::set_pools`]); `false` if the task has
    /// stopped and the caller must start a new one.
    pub async fn set_pools(
        &self,
        pools: Vec<(PodPort, Arc<Balancer>)>,
        retired: Vec<(PodPort, Weak<Balancer>)>,
    ) -> bool {
        match self {
            Task::Dns(t) => {
                let pools = pools
                    .into_iter()
                    .filter_map(|(p, b)| number(&p).map(|n| (n, b)))
                    .collect();
                let retired = retired
                    .into_iter()
                    .filter_map(|(p, b)| number(&p).map(|n| (n, b)))
                    .collect();
                t.set_pools(pools, retired).await
            }
            Task::Kube(t) => t.set_pools(pools, retired).await,
        }
    }

    /// Whether some pool still uses this source.
    pub async fn in_use(&self) -> bool {
        match self {
            Task::Dns(t) => t.in_use().await,
            Task::Kube(t) => t.in_use().await,
        }
    }

    pub fn stats(&self) -> &Arc<DiscoveryStats> {
        match self {
            Task::Dns(t) => &t.stats,
            Task::Kube(t) => &t.stats,
        }
    }

    /// Runs until `stop` completes, or until no pool uses the source any more.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        match self {
            Task::Dns(t) => t.run(stop).await,
            Task::Kube(t) => t.run(stop).await,
        }
    }
}
