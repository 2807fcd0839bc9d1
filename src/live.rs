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
//!
//! A retired pool's queued requests must still reach a pod. So it keeps following its DNS name
//! (the name's discovery runs on while such a pool lives); and a pool retired with no pod at all
//! (a misspelled name that a reload corrects) follows the pool that now serves its route
//! instead: its pods, port and limit. Pods are counted per address across pools, so caps hold.

use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::balance::{Balancer, Ledger};
use crate::config::{Config, PodPort, Target};
use crate::discovery::{DiscoveryStats, Source, Task};
use crate::route::{RouteEntry, RouteTable};
use crate::stopping::ShutdownState;

/// One config's routes and pools, as requests see them.
pub struct Snapshot {
    pub routes: RouteTable<Arc<RouteEntry>>,
    /// Routes in config order, with the index of their pool in `pools`.
    pub route_list: Vec<(String, usize)>,
    pub pools: Vec<Arc<Balancer>>,
}

struct Discovery {
    task: Task,
    /// `None` until the config background service starts it.
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Discovery {
    /// The task stopped by itself: no pool used its name any more.
    fn finished(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| h.is_finished())
    }
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
    retired: Mutex<Vec<Retired>>,
    discovery: Mutex<BTreeMap<Source, Discovery>>,
    /// The config the process started with: restart-only settings stay as they are here.
    started_with: Config,
    /// The last config applied (for reporting what a reload changed).
    applied: Mutex<Config>,
    /// Whether SIGTERM has come, and the requests a drain waits for.
    pub shutdown: Arc<ShutdownState>,
    /// Asynchronous jobs holding their pods' slots, and the key of their handles.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// The pools readiness waits for (see [`Live::readiness_waits_for`]): those of the config
    /// in force until the agent is first ready, then none, for good.
    awaited: Mutex<Vec<Weak<Balancer>>>,
    /// Which config file content is in force, for `/status` (none when started without a
    /// file, as in tests that build the config in memory).
    config_in_force: Mutex<Option<ConfigInForce>>,
    /// The job adoption task runs (see [`Live::start_job_adoption`]).
    adopting: std::sync::atomic::AtomicBool,
}

/// The config file content in force and when it was loaded: with a `subPath` ConfigMap mount
/// (never updated in place) or replicas that disagree, this is how an operator tells which
/// config each agent runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConfigInForce {
    pub path: String,
    /// FNV-1a 64 of the file's bytes, in hex (compare across replicas; `sha256sum` is not it).
    pub hash: String,
    /// RFC 3339, UTC.
    pub loaded_at: String,
}

impl ConfigInForce {
    pub fn new(path: &std::path::Path, bytes: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self {
            path: path.display().to_string(),
            hash: format!("{h:016x}"),
            loaded_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

/// A retired pool, and where its pods come from now.
struct Retired {
    pool: Weak<Balancer>,
    /// Its own target, or that of the pool now serving its route (see the module doc).
    follows: Option<Target>,
}

/// A pool knows its pods once it has learned its pod list (even an empty one) or has pods.
pub fn pod_list_known(b: &Balancer) -> bool {
    b.resolved() || b.has_pods()
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
            async_jobs: r.async_jobs.clone(),
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

/// The discovered pools of a config (DNS or API), grouped by source.
fn by_source(
    config: &Config,
    pools: &[Arc<Balancer>],
) -> BTreeMap<Source, Vec<(PodPort, Arc<Balancer>)>> {
    let mut sources: BTreeMap<Source, Vec<(PodPort, Arc<Balancer>)>> = BTreeMap::new();
    for (pc, b) in config.pools.iter().zip(pools) {
        if let Some((source, port)) = Source::of(&pc.target) {
            sources
                .entry(source)
                .or_default()
                .push((port, Arc::clone(b)));
        }
    }
    sources
}

/// Why the first snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Setting a static pod list never waits; if it did, the pool would start without pods.
    #[error("static pod list of {0} did not apply synchronously")]
    StaticPods(String),
    #[error("{0}")]
    JobKey(String),
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
        let discovery = by_source(config, &pools)
            .into_iter()
            .map(|(source, pools)| {
                let task = Task::new(&source, pools, config);
                (source, Discovery { task, handle: None })
            })
            .collect();
        let awaited = pools.iter().map(Arc::downgrade).collect();
        let keys = crate::jobs::Keys::from_env().map_err(LiveError::JobKey)?;
        if config.routes.iter().any(|r| r.async_jobs.is_some()) {
            log::info!(
                "asynchronous jobs hold their pods' slots; without a shared ledger (ledger.redis) they are held in this process only: if it restarts it forgets them, and their slots come free while the pods still work"
            );
            if !keys.shared {
                log::warn!(
                    "LB_AGENT_JOB_KEY is not set: the job handles this agent gives out reach their jobs only through this process (not other replicas, not after a restart)"
                );
            }
        }
        let jobs = crate::jobs::Jobs::new(keys, ledger.redis().cloned());
        Ok(Arc::new(Live {
            ledger,
            jobs,
            awaited: Mutex::new(awaited),
            config_in_force: Mutex::new(None),
            current: RwLock::new(Arc::new(route_table(config, &pools))),
            retired: Mutex::new(Vec::new()),
            discovery: Mutex::new(discovery),
            started_with: config.clone(),
            applied: Mutex::new(config.clone()),
            shutdown: Arc::default(),
            adopting: Default::default(),
        }))
    }

    /// The snapshot requests are routed with right now.
    /// Records the config file content now in force (start-up and each applied reload).
    pub fn set_config_in_force(&self, c: ConfigInForce) {
        *self
            .config_in_force
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    pub fn config_in_force(&self) -> Option<ConfigInForce> {
        self.config_in_force
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The pools in force that have no pod list yet and that readiness waits for.
    ///
    /// Readiness means "this replica can serve the config it runs": at start-up every pool of
    /// the config in force must have learned its pod list once (a reload before that point
    /// counts: its pools are waited for too, a pool it removed no longer is). From the first
    /// moment no pool is waited for, the agent is ready for good (until SIGTERM): a pool that a
    /// later reload adds is not waited for, so one broken route in a ConfigMap shared by every
    /// replica cannot take them all out of the Service. Such a pool shows in `/status`
    /// (`unresolved`) and in the discovery logs and metrics instead.
    pub fn readiness_waits_for(&self) -> Vec<Arc<Balancer>> {
        let awaited = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
        self.snapshot()
            .pools
            .iter()
            .filter(|b| {
                awaited
                    .iter()
                    .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(b)))
            })
            .filter(|b| !pod_list_known(b))
            .cloned()
            .collect()
    }

    /// Pools in force that have no pod list yet, whether readiness waits for them or not.
    pub fn unresolved(&self) -> Vec<Arc<Balancer>> {
        self.snapshot()
            .pools
            .iter()
            .filter(|b| !pod_list_known(b))
            .cloned()
            .collect()
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
        retired.retain(|r| r.pool.strong_count() > 0);
        retired.iter().filter_map(|r| r.pool.upgrade()).collect()
    }

    /// Every source being discovered (a DNS name, or `k8s:<namespace>/<service>`), with its
    /// counters (for `/metrics` and `/status`).
    pub fn discovery_stats(&self) -> Vec<(String, Arc<DiscoveryStats>)> {
        self.discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, d)| !d.finished())
            .map(|(source, d)| (source.to_string(), Arc::clone(d.task.stats())))
            .collect()
    }

    /// Starts the discovery tasks that are not running. Must run inside a tokio runtime.
    /// With a shared ledger and asynchronous routes: adopts job holds whose agent vanished
    /// (see [`crate::jobs`]). Once.
    pub fn start_job_adoption(self: &Arc<Self>) {
        if self.ledger.redis().is_some()
            && !self
                .adopting
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let live = Arc::downgrade(self);
            tokio::spawn(Arc::clone(&self.jobs).adopt_orphans(move || {
                let live = live.upgrade().filter(|l| !l.shutdown.stopping())?;
                let snapshot = live.snapshot();
                let routes = snapshot.routes.iter();
                Some(routes.filter(|r| r.async_jobs.is_some()).cloned().collect())
            }));
        }
    }

    pub fn start_discovery(&self) {
        let mut discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
        for d in discovery.values_mut() {
            if d.handle.is_none() {
                let task = d.task.clone();
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
        let (plan, old_targets) = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            let targets: Vec<Target> = applied.pools.iter().map(|p| p.target.clone()).collect();
            (
                crate::plan::plan(&self.started_with, &applied, config),
                targets,
            )
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

        // What the old config had and the new one dropped is retired now, and what was retired
        // before stays so: `candidates` holds exactly those.
        let previous: Vec<(Weak<Balancer>, Option<Target>)> = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| (r.pool.clone(), r.follows.clone()))
            .collect();
        let mut retired: Vec<(Arc<Balancer>, Option<Target>)> = Vec::new();
        for b in candidates {
            let follows = match old.pools.iter().position(|o| Arc::ptr_eq(o, &b)) {
                Some(i) => Some(retire(&b, &old, i, &old_targets[i], config, &mut notes).await),
                None => previous
                    .iter()
                    .find(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&b)))
                    .and_then(|(_, follows)| follows.clone()),
            };
            retired.push((b, follows));
        }

        // Discovery: one task per source that a pool in force uses or a retired pool follows.
        let mut in_force = by_source(config, &pools);
        let in_force_names: BTreeSet<Source> = in_force.keys().cloned().collect();
        let mut followers: BTreeMap<Source, Vec<(PodPort, Weak<Balancer>)>> = BTreeMap::new();
        for (b, follows) in &retired {
            if let Some((source, port)) = follows.as_ref().and_then(Source::of) {
                followers
                    .entry(source)
                    .or_default()
                    .push((port, Arc::downgrade(b)));
            }
        }
        let names: BTreeSet<Source> = in_force.keys().chain(followers.keys()).cloned().collect();
        let running: Vec<(Source, Task)> = {
            let mut discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
            // A task that stopped by itself has said so in the log.
            discovery.retain(|_, d| !d.finished());
            let unused: Vec<Source> = discovery
                .keys()
                .filter(|h| !names.contains(*h))
                .cloned()
                .collect();
            for host in unused {
                discovery.remove(&host);
                notes.push(format!("stopped discovery of {host}"));
            }
            discovery
                .iter()
                .map(|(h, d)| (h.clone(), d.task.clone()))
                .collect()
        };
        for host in names {
            let here = in_force.remove(&host).unwrap_or_default();
            let retired_here = followers.remove(&host).unwrap_or_default();
            let task = running
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, t)| t.clone());
            let attached = match task {
                Some(t) => t.set_pools(here.clone(), retired_here.clone()).await,
                None => false,
            };
            if !attached {
                notes.push(format!("started discovery of {host}"));
                let task = Task::new(&host, Vec::new(), &self.started_with);
                task.set_pools(here, retired_here).await;
                self.discovery
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(host, Discovery { task, handle: None });
            }
        }
        self.start_discovery();

        {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if plan.routes_changed {
                notes.push(format!("routes updated ({} routes)", config.routes.len()));
            }
            *applied = config.clone();
        }
        // Listed before the swap, so the shutdown drain and /status never miss one.
        *self.retired.lock().unwrap_or_else(|e| e.into_inner()) = retired
            .iter()
            .map(|(b, follows)| Retired {
                pool: Arc::downgrade(b),
                follows: follows.clone(),
            })
            .collect();
        {
            // Decided before the swap, while the pools in force are the ones waited for: if the
            // agent is ready now, it stays ready whatever this config adds.
            let ready = self.readiness_waits_for().is_empty();
            let mut awaited = self.awaited.lock().unwrap_or_else(|e| e.into_inner());
            *awaited = if ready {
                Vec::new()
            } else {
                pools.iter().map(Arc::downgrade).collect()
            };
            *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(route_table(config, &pools));
        }

        // A name kept only for retired pools that nothing holds stops being looked up now
        // (otherwise its task stops by itself once their last request is done).
        drop(retired);
        drop(old);
        let kept_for_retired: Vec<(Source, Task)> = self
            .discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(h, _)| !in_force_names.contains(*h))
            .map(|(h, d)| (h.clone(), d.task.clone()))
            .collect();
        for (host, task) in kept_for_retired {
            if !task.in_use().await {
                self.discovery
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&host);
                notes.push(format!("stopped discovery of {host}"));
            }
        }
        if notes.is_empty() {
            "no changes".to_string()
        } else {
            notes.join("; ")
        }
    }
}

/// What a pool this config drops (`b`, at index `i` of the `old` snapshot, with target `own`)
/// follows from now on: its own target; or, if it has no pod at all and its route is now served
/// by another pool, that pool's target and limit, so its queued requests are served by the pods
/// that serve their route now.
async fn retire(
    b: &Balancer,
    old: &Snapshot,
    i: usize,
    own: &Target,
    config: &Config,
    notes: &mut Vec<String>,
) -> Target {
    let successor = old
        .route_list
        .iter()
        .filter(|(_, pool)| *pool == i)
        .find_map(|(uri, _)| config.routes.iter().find(|r| r.uri == *uri))
        .map(|r| &config.pools[r.pool]);
    match successor {
        Some(pc) if !b.has_pods() => {
            b.set_limit(pc.limit);
            if let Target::Static(addrs) = &pc.target {
                b.set_pods(addrs.iter().copied().collect()).await;
            }
            notes.push(format!(
                "{}: retired; its queued requests go to the pods of {}",
                b.name(),
                pc.name
            ));
            pc.target.clone()
        }
        _ => {
            notes.push(format!("{}: retired", b.name()));
            own.clone()
        }
    }
}
