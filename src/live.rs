//! The configuration in force — route table, pools, discovery tasks — and how a new config
//! replaces it without dropping a request.
//!
//! Requests look up their route in the current [`Snapshot`] and keep the `Arc` of what they
//! found for their whole life, so swapping the snapshot never touches a request in flight or in
//! a queue: it finishes under the route, pool and queue policy it started with.
//!
//! Pools are matched across configs by name (the target: `<dns name>:<port>` or
//! `static[…]`). A pool that stays keeps its counters and its queue and only gets the new
//! limit; that is what makes a limit change safe while requests are in flight. A pool that a
//! reload removes is *retired*: it keeps serving whatever still holds it, stays visible to
//! `/status`, `/metrics` and the shutdown drain until nothing does, and comes back with its
//! counters intact if a later reload names it again (so its pods' caps still hold).

use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use crate::balance::{Balancer, Ledger, QueuePolicy};
use crate::config::{ClientAbort, Config, Target, UpstreamProtocol};
use crate::discovery::{DiscoveryStats, DnsDiscovery};
use crate::route::RouteTable;
use crate::shutdown::ShutdownState;

/// What a route resolves to at request time.
pub struct RouteEntry {
    pub uri: String,
    pub balancer: Arc<Balancer>,
    pub queue: QueuePolicy,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    pub client_abort: ClientAbort,
    /// A pooled connection to a pod idle longer than this is closed, not reused.
    pub upstream_idle_timeout: Duration,
    /// The longest a pod may make no progress on a request of this route.
    pub upstream_timeout: Duration,
    /// This route's metric handles, looked up on its first request.
    pub metrics: std::sync::OnceLock<crate::metrics::RouteMetrics>,
}

/// One config's routes and pools, as requests see them.
pub struct Snapshot {
    pub routes: RouteTable<Arc<RouteEntry>>,
    /// Routes in config order, with the index of their pool in `pools`.
    pub route_list: Vec<(String, usize)>,
    pub pools: Vec<Arc<Balancer>>,
}

struct Discovery {
    task: Arc<DnsDiscovery>,
    /// `None` until the config background service starts it.
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

pub struct Live {
    /// Per-pod counts, caps and the wait queue, shared by every pool of every config.
    pub ledger: Ledger,
    current: RwLock<Arc<Snapshot>>,
    /// Pools a reload removed; alive while a request still holds them.
    retired: Mutex<Vec<Weak<Balancer>>>,
    discovery: Mutex<BTreeMap<String, Discovery>>,
    /// The config the process started with: restart-only settings stay as they are here.
    started_with: Config,
    /// The last config applied (for reporting what a reload changed).
    applied: Mutex<Config>,
    /// Whether SIGTERM has come, and the requests a drain waits for.
    pub shutdown: Arc<ShutdownState>,
}

fn route_table(config: &Config, pools: &[Arc<Balancer>]) -> Snapshot {
    let routes = RouteTable::new(&config.routes, |r| {
        Arc::new(RouteEntry {
            uri: r.uri.clone(),
            balancer: Arc::clone(&pools[r.pool]),
            queue: r.queue,
            connect_timeout: config.connect_timeout,
            upstream_idle_timeout: config.upstream_idle_timeout,
            upstream_timeout: r.upstream_timeout,
            protocol: r.protocol,
            client_abort: r.client_abort,
            metrics: Default::default(),
        })
    });
    Snapshot {
        routes,
        route_list: config
            .routes
            .iter()
            .map(|r| (r.uri.clone(), r.pool))
            .collect(),
        pools: pools.to_vec(),
    }
}

/// The DNS pools of a config, grouped by name.
fn by_host(
    config: &Config,
    pools: &[Arc<Balancer>],
) -> BTreeMap<String, Vec<(u16, Arc<Balancer>)>> {
    let mut hosts: BTreeMap<String, Vec<(u16, Arc<Balancer>)>> = BTreeMap::new();
    for (pc, b) in config.pools.iter().zip(pools) {
        if let Target::Dns { host, port } = &pc.target {
            hosts
                .entry(host.clone())
                .or_default()
                .push((*port, Arc::clone(b)));
        }
    }
    hosts
}

/// Why the first snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Setting a static pod list never waits; if it did, the pool would start without pods.
    #[error("static pod list of {0} did not apply synchronously")]
    StaticPods(String),
}

impl Live {
    /// Builds the first snapshot. Static pods are set at once; discovery tasks are created but
    /// start only with [`Live::start_discovery`], inside the server's runtime.
    pub fn new(config: &Config, ledger: Ledger) -> Result<Arc<Live>, LiveError> {
        let pools: Vec<Arc<Balancer>> = config
            .pools
            .iter()
            .map(|p| Arc::new(Balancer::new(&ledger, p.name.clone(), p.limit)))
            .collect();
        for (pc, b) in config.pools.iter().zip(&pools) {
            if let Target::Static(addrs) = &pc.target {
                b.set_pods(addrs.iter().copied().collect())
                    .now_or_never()
                    .ok_or_else(|| LiveError::StaticPods(pc.name.clone()))?;
            }
        }
        let discovery = by_host(config, &pools)
            .into_iter()
            .map(|(host, pools)| {
                let task = Arc::new(DnsDiscovery::new(host.clone(), pools, config.dns.clone()));
                (host, Discovery { task, handle: None })
            })
            .collect();
        Ok(Arc::new(Live {
            ledger,
            current: RwLock::new(Arc::new(route_table(config, &pools))),
            retired: Mutex::new(Vec::new()),
            discovery: Mutex::new(discovery),
            started_with: config.clone(),
            applied: Mutex::new(config.clone()),
            shutdown: Arc::default(),
        }))
    }

    /// The snapshot requests are routed with right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Pools of the current config, then retired pools that requests still hold.
    pub fn all_pools(&self) -> Vec<Arc<Balancer>> {
        let mut pools = self.snapshot().pools.clone();
        pools.extend(self.retired_pools());
        pools
    }

    /// Retired pools still held by requests.
    pub fn retired_pools(&self) -> Vec<Arc<Balancer>> {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|w| w.strong_count() > 0);
        retired.iter().filter_map(Weak::upgrade).collect()
    }

    /// Every DNS name being discovered, with its lookup counters (for `/metrics`).
    pub fn discovery_stats(&self) -> Vec<(String, Arc<DiscoveryStats>)> {
        self.discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(host, d)| (host.clone(), Arc::clone(&d.task.stats)))
            .collect()
    }

    /// Starts the discovery tasks that are not running. Must run inside a tokio runtime.
    pub fn start_discovery(&self) {
        let mut discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
        for d in discovery.values_mut() {
            if d.handle.is_none() {
                let task = Arc::clone(&d.task);
                d.handle = Some(tokio::spawn(async move {
                    task.run(std::future::pending()).await
                }));
            }
        }
    }

    /// Stops every discovery task (server shutdown).
    pub fn stop_discovery(&self) {
        self.discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Makes `config` the config in force, except for the restart-only settings, which are
    /// reported and left as they are. Returns a one-line summary of what changed.
    pub async fn apply(&self, config: &Config) -> String {
        let mut notes = Vec::new();
        let plan = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            crate::plan::plan(&self.started_with, &applied, config)
        };
        let restart = &plan.restart_only;
        if !restart.is_empty() {
            log::warn!(
                "config reload: {} changed and only take effect after a restart; the running values stay",
                restart.join(", ")
            );
            notes.push(format!("needs restart: {}", restart.join(", ")));
        }

        let old = self.snapshot();
        let mut candidates = self.all_pools();
        let mut pools = Vec::with_capacity(config.pools.len());
        for pc in &config.pools {
            let found = candidates
                .iter()
                .position(|b| b.name() == pc.name)
                .map(|i| candidates.swap_remove(i));
            let b = match found {
                Some(b) => {
                    let before = b.limit();
                    if before != pc.limit {
                        b.set_limit(pc.limit);
                        notes.push(format!("{}: limit {before} -> {}", pc.name, pc.limit));
                    }
                    b
                }
                None => {
                    let b = Arc::new(Balancer::new(&self.ledger, pc.name.clone(), pc.limit));
                    if let Target::Static(addrs) = &pc.target {
                        b.set_pods(addrs.iter().copied().collect()).await;
                    }
                    notes.push(format!("{}: new pool, limit {}", pc.name, pc.limit));
                    b
                }
            };
            pools.push(b);
        }

        // Discovery: keep tasks whose name stays (with the new set of pools), start new names,
        // stop names no longer used.
        let wanted = by_host(config, &pools);
        let (keep, start): (Vec<_>, Vec<_>) = {
            let mut discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
            for host in &plan.stop_discovery {
                if discovery.remove(host).is_some() {
                    notes.push(format!("stopped discovery of {host}"));
                }
            }
            wanted
                .into_iter()
                .partition(|(host, _)| discovery.contains_key(host))
        };
        for (host, host_pools) in keep {
            let task = self
                .discovery
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&host)
                .map(|d| Arc::clone(&d.task));
            if let Some(task) = task {
                task.set_pools(host_pools).await;
            }
        }
        for (host, host_pools) in start {
            notes.push(format!("started discovery of {host}"));
            let task = Arc::new(DnsDiscovery::new(
                host.clone(),
                host_pools,
                self.started_with.dns.clone(),
            ));
            self.discovery
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(host, Discovery { task, handle: None });
        }
        self.start_discovery();

        {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if plan.routes_changed {
                notes.push(format!("routes updated ({} routes)", config.routes.len()));
            }
            *applied = config.clone();
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(route_table(config, &pools));

        // What the old config had and the new one dropped is retired (and `candidates` holds
        // exactly those now).
        {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.clear();
            for b in candidates {
                if old.pools.iter().any(|o| Arc::ptr_eq(o, &b)) {
                    notes.push(format!("{}: retired", b.name()));
                }
                retired.push(Arc::downgrade(&b));
            }
        }
        if notes.is_empty() {
            "no changes".to_string()
        } else {
            notes.join("; ")
        }
    }
}
