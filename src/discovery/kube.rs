//! Kubernetes API discovery: a Service's EndpointSlices, watched.
//!
//! The Go agent watched the Endpoints of `service_name` through client-go, which works with the
//! ordinary ClusterIP Service every compute service already has; a DNS name only lists the pods
//! of a headless one. This is that, through kube-rs: a list and then a watch of the
//! `discovery.k8s.io/v1` EndpointSlices labelled `kubernetes.io/service-name=<service>` in the
//! route's namespace (Endpoints is deprecated), with the API's own readiness rules
//! ([`super::slices`]).
//!
//! - **No stability window.** The API is the source of truth; every event is applied as it
//!   arrives, so a new ready pod takes requests, and a pod marked terminating takes no new one,
//!   at once.
//! - **A list is whole.** After each (re)list (`Init` … `InitDone`), the listed slices replace
//!   the known ones at `InitDone`, not before: a relist half done never empties a pool.
//! - **Faults keep the last good pods.** An unreachable API, a broken watch or a `403` leaves
//!   the pod list as it is; the watcher retries with a backoff (250 ms doubling to 5 s) and
//!   relists. Each outage is logged once when it starts (a `403` with the permission that is
//!   missing) and once when it ends, and counted in `lb_discovery_errors_total`. A `410 Gone`
//!   (the watch fell too far behind) is ordinary: the watcher relists, logged at debug.
//! - **Credentials**: `kube_config_file` if given (the Go agent's), else the in-cluster service
//!   account, as client-go's `BuildConfigFromFlags("", path)` does.

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::slices::{self, SliceView, Slices};
use super::{Attached, DiscoveryStats};
use crate::balance::Balancer;
use crate::config::PodPort;

/// The label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// First wait after a failure, doubled up to [`MAX_RETRY`]. The API server is the control
/// plane's: a few agents retrying every 5 s is nothing to it, and a pod list older than 5 s
/// after an outage is what we want to avoid.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How often a task checks whether any pool still uses its Service (between events).
const IN_USE_CHECK: Duration = Duration::from_secs(2);

/// Discovery of one Service's pods through the Kubernetes API.
pub struct KubeDiscovery {
    namespace: String,
    service: String,
    /// `None`: the in-cluster service account.
    kubeconfig: Option<PathBuf>,
    attached: tokio::sync::Mutex<Attached<PodPort, Slices>>,
    pub stats: Arc<DiscoveryStats>,
}

/// Why the API client could not be made.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("cannot read kubeconfig {0}: {1}")]
    Kubeconfig(String, String),
    #[error("not running in a pod with a service account ({0}); give kube_config_file")]
    InCluster(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Build(String),
}

/// 250 ms doubling to 5 s; reset by the watcher after each success.
struct RetryBackoff {
    next: Duration,
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        Some(d)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

/// What an API failure means for an operator: a `403` names the permission to grant.
fn explain(e: &watcher::Error, namespace: &str) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    match status {
        Some(s) if s.code == 403 => format!(
            "forbidden: the agent's service account needs get, list and watch on endpointslices (API group discovery.k8s.io) in namespace {namespace} (a Role and RoleBinding there; see k8s/rbac). The API said: {}",
            s.message
        ),
        Some(s) if s.code == 401 => format!(
            "unauthorized: the API refused the agent's credentials (kube_config_file or service account token): {}",
            s.message
        ),
        _ => e.to_string(),
    }
}

fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl KubeDiscovery {
    pub fn new(
        namespace: String,
        service: String,
        pools: Vec<(PodPort, Arc<Balancer>)>,
        kubeconfig: Option<PathBuf>,
    ) -> Self {
        Self {
            namespace,
            service,
            kubeconfig,
            attached: tokio::sync::Mutex::new(Attached::new(pools)),
            stats: Arc::default(),
        }
    }

    fn name(&self) -> String {
        format!("k8s:{}/{}", self.namespace, self.service)
    }

    /// Replaces the pools fed from this Service (a config reload). A newly attached pool gets
    /// the slices already known at once. `false` if the task has stopped.
    pub async fn set_pools(
        &self,
        pools: Vec<(PodPort, Arc<Balancer>)>,
        retired: Vec<(PodPort, Weak<Balancer>)>,
    ) -> bool {
        let mut att = self.attached.lock().await;
        if att.stopped {
            return false;
        }
        let before = att.fed();
        att.pools = pools;
        att.retired = retired;
        if let Some(slices) = att.adopted.clone() {
            for (port, b) in att.fed() {
                let known = before
                    .iter()
                    .any(|(p, old)| *p == port && Arc::ptr_eq(old, &b));
                if !known {
                    b.set_pods(slices::pods(&slices, &port)).await;
                }
            }
        }
        true
    }

    pub async fn in_use(&self) -> bool {
        !self.attached.lock().await.fed().is_empty()
    }

    async fn stop_if_unused(&self) -> bool {
        let mut att = self.attached.lock().await;
        att.stopped = att.stopped || att.fed().is_empty();
        att.stopped
    }

    /// Feeds every pool the pods `slices` give it, and keeps them for pools attached later.
    async fn apply(&self, slices: &Slices) {
        let mut att = self.attached.lock().await;
        for (port, b) in att.fed() {
            b.set_pods(slices::pods(slices, &port)).await;
        }
        att.adopted = Some(slices.clone());
    }

    async fn client(&self) -> Result<Client, ClientError> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let shown = path.display().to_string();
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| ClientError::Kubeconfig(shown.clone(), e.to_string()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| ClientError::Kubeconfig(shown, e.to_string()))?
            }
            None => kube::Config::incluster().map_err(|e| ClientError::InCluster(e.to_string()))?,
        };
        Client::try_from(config).map_err(|e| ClientError::Build(e.to_string()))
    }

    /// Watches the Service's slices until `stop` completes or no pool uses it any more.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let name = self.name();
        let mut backoff = RetryBackoff { next: FIRST_RETRY };
        let client = loop {
            match self.client().await {
                Ok(c) => break c,
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if backoff.next == FIRST_RETRY {
                        log::error!("Kubernetes discovery of {name} cannot start: {e}; retrying");
                    }
                    let wait = backoff.next().unwrap_or(MAX_RETRY);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut stop => return,
                    }
                }
            }
        };
        let api: Api<EndpointSlice> = Api::namespaced(client, &self.namespace);
        let config =
            watcher::Config::default().labels(&format!("{SERVICE_LABEL}={}", self.service));
        let mut events = watcher::watcher(api, config)
            .backoff(RetryBackoff { next: FIRST_RETRY })
            .boxed();
        let mut known = Slices::new();
        let mut listing: Option<Slices> = None;
        let mut listed = false;
        let mut failing: Option<std::time::Instant> = None;
        let mut last_summary = String::new();
        let mut in_use = tokio::time::interval(IN_USE_CHECK);
        loop {
            let event = tokio::select! {
                _ = &mut stop => return,
                _ = in_use.tick() => {
                    if self.stop_if_unused().await {
                        log::info!("stopped discovery of {name}: no pool uses it any more");
                        return;
                    }
                    // A quiet watch is a healthy one: "last success" must not age while the
                    // Service simply does not change (alerts use `time() - last success`).
                    if listed && failing.is_none() {
                        self.stats
                            .last_success_unix
                            .store(now_unix(), Ordering::Relaxed);
                    }
                    continue;
                }
                e = events.next() => e,
            };
            let event = match event {
                Some(Ok(e)) => e,
                Some(Err(e)) if is_gone(&e) => {
                    log::debug!("{name}: watch expired (410 Gone); relisting");
                    continue;
                }
                Some(Err(e)) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if failing.is_none() {
                        failing = Some(std::time::Instant::now());
                        let pods = if listed {
                            format!("keeping the last known pods ({})", slices::summary(&known))
                        } else {
                            "no pod list yet: requests to its routes wait until the API answers"
                                .to_string()
                        };
                        log::warn!(
                            "Kubernetes discovery of {name} failed: {}; {pods}; retrying",
                            explain(&e, &self.namespace)
                        );
                    }
                    continue;
                }
                // The watcher never ends by itself.
                None => return,
            };
            self.stats
                .last_success_unix
                .store(now_unix(), Ordering::Relaxed);
            if let Some(since) = failing.take() {
                log::info!(
                    "Kubernetes discovery of {name} works again after {:.1}s",
                    since.elapsed().as_secs_f64()
                );
            }
            let changed = match event {
                Event::Init => {
                    listing = Some(Slices::new());
                    false
                }
                Event::InitApply(s) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(s.name_any(), SliceView::of(&s));
                    }
                    false
                }
                Event::InitDone => {
                    known = listing.take().unwrap_or_default();
                    listed = true;
                    true
                }
                Event::Apply(s) => {
                    let view = SliceView::of(&s);
                    known.insert(s.name_any(), view.clone()) != Some(view)
                }
                Event::Delete(s) => known.remove(&s.name_any()).is_some(),
            };
            if changed && listed {
                let summary = slices::summary(&known);
                if summary != last_summary {
                    log::info!("{name}: {summary}");
                    last_summary = summary;
                }
                self.apply(&known).await;
            }
        }
    }
}
