//! The balancing core, behind one door: how a request gets a slot on a pod.
//!
//! Everything outside this module sees a [`Balancer`] per pool (the pods of one target, with
//! one `limit`) and the [`Slot`] a request holds:
//!
//! * [`Balancer::acquire`] takes a slot for a request: on the least-loaded pod below its cap,
//!   or — when every pod is full — after waiting in the FIFO queue, honouring the pods the
//!   request already tried, its deadline and the route's [`QueuePolicy`]. Dropping the returned
//!   [`Slot`] (on success, error, retry, client abort or task cancellation) gives it back exactly
//!   once.
//! * [`Balancer::set_pods`] and [`Balancer::set_limit`] change the pod list and the cap.
//! * [`Balancer::view`] is the read-only picture for `/status`, `/metrics` and the shutdown
//!   drain.
//!
//! Inside, the [`Ledger`] (ledger.rs) owns per-pod counts, caps and the wait queue, keyed by pod
//! address and shared by every pool of the agent; select.rs is Pingora's `BackendSelection`,
//! where the pod for a request that does not wait is chosen. A ledger shared by several agent
//! replicas plugs in here, behind the same door.

mod ledger;
mod select;

use pingora::lb::{Backends, LoadBalancer};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger::Enqueued;
pub use ledger::{Ledger, Slot, CONNECT_FAILURE_PENALTY};
use select::{inet, LeastInFlight, PoolHandle, SharedDiscovery, TrustedPods};

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

/// Why a request could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// `max_waiting` requests were already waiting.
    Full,
    /// No slot freed up before the queue timeout.
    Timeout,
    /// Every pod of the pool was already tried by this request (retries only).
    NoUntriedPod,
    /// The agent is shutting down and stopped serving its queue.
    ShuttingDown,
}

impl QueueError {
    /// Short reason, used in response bodies, logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            QueueError::Full => "queue_full",
            QueueError::Timeout => "queue_timeout",
            QueueError::NoUntriedPod => "no_untried_pod",
            QueueError::ShuttingDown => "shutting_down",
        }
    }
}

/// A pod as `/status` and `/metrics` see it, from one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub addr: SocketAddr,
    /// Requests in flight on the pod, through any pool.
    pub inflight: usize,
    /// The pod's cap (the lowest limit among the pools that list it).
    pub limit: usize,
    /// In this pool's pod list (otherwise it only still has requests from this pool in flight).
    pub active: bool,
    pub recently_failed: bool,
    /// Requests sent to the pod, and connections it refused, since it appeared.
    pub requests: u64,
    pub connect_failures: u64,
}

/// A pool as `/status`, `/metrics` and the shutdown drain see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub limit: usize,
    /// Requests of this pool waiting for a slot.
    pub waiting: usize,
    /// Slots taken through this pool and not yet given back.
    pub inflight: usize,
    /// The longest of the last few slot hold times of this pool (zero before the first): what a
    /// request taken from the queue now can be expected to need. The shutdown drain stops
    /// starting queued requests once less than this is left, so they get a `503` while they can
    /// still go elsewhere, instead of being cut at the deadline.
    pub longest_recent_hold: Duration,
    /// The pods of the pool's list, and pods that left it with requests still in flight.
    pub pods: Vec<PodView>,
}

/// What a change of the pod list did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodChange {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

/// One pool: its pods (as Pingora's `LoadBalancer` knows them) and its entry in the ledger.
pub struct Balancer {
    lb: LoadBalancer<LeastInFlight>,
    pool: Arc<PoolHandle>,
    trusted: Arc<TrustedPods>,
    /// The pod list has been learned at least once (for readiness).
    resolved: AtomicBool,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.pool.name)
            .finish()
    }
}

impl Balancer {
    pub fn new(ledger: &Arc<Ledger>, name: impl Into<String>, limit: usize) -> Balancer {
        let name = name.into();
        let pool = Arc::new(PoolHandle {
            ledger: Arc::clone(ledger),
            id: ledger.add_pool(name.clone(), limit),
            name,
        });
        let trusted = Arc::new(TrustedPods::default());
        let backends = Backends::new(Box::new(SharedDiscovery(Arc::clone(&trusted))));
        let lb = LoadBalancer::from_backends_with_config(backends, Some(Arc::clone(&pool)));
        Balancer {
            lb,
            pool,
            trusted,
            resolved: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.pool.name
    }

    /// Makes `pods` the pool's pod list (Pingora rebuilds its selector, which hands the list to
    /// the ledger) and marks the pool as resolved.
    pub async fn set_pods(&self, pods: BTreeSet<SocketAddr>) {
        self.trusted.set(pods);
        // Our discovery cannot fail.
        let _ = self.lb.update().await;
        self.resolved.store(true, Ordering::Release);
    }

    /// The pod list last given to [`Balancer::set_pods`].
    pub fn trusted_pods(&self) -> BTreeSet<SocketAddr> {
        self.trusted.get()
    }

    /// Whether the pod list has been learned at least once.
    pub fn resolved(&self) -> bool {
        self.resolved.load(Ordering::Acquire)
    }

    /// Changes the per-pod cap. Lowering it stops new requests above the new cap while the
    /// requests in flight finish; raising it lets queued requests start at once.
    pub fn set_limit(&self, limit: usize) {
        self.pool.ledger.set_limit(self.pool.id, limit);
    }

    pub fn limit(&self) -> usize {
        self.pool.ledger.limit(self.pool.id)
    }

    /// Whether the pool has any pod at all.
    pub fn has_pods(&self) -> bool {
        self.pool.ledger.has_pods(self.pool.id)
    }

    /// Whether some pod of the pool is not in `tried` (a retry has somewhere to go).
    pub fn has_untried(&self, tried: &[SocketAddr]) -> bool {
        self.pool.ledger.has_untried(self.pool.id, tried)
    }

    /// Stops the queue for good: every waiting and future request gets
    /// [`QueueError::ShuttingDown`]. Requests already holding a slot are not affected.
    pub fn close(&self) {
        self.pool.ledger.close(self.pool.id);
    }

    pub fn view(&self) -> PoolView {
        self.pool.ledger.view(self.pool.id)
    }

    /// Takes a slot on the least-loaded pod below its cap, waiting in the FIFO queue when all
    /// are full. Pods in `tried` are skipped (retries never go back to a pod that failed).
    /// Refuses at once when `max_waiting` requests already wait; gives up at `deadline`.
    /// Dropping the future leaves the queue and takes nothing.
    pub async fn acquire(
        &self,
        policy: &QueuePolicy,
        deadline: tokio::time::Instant,
        tried: &[SocketAddr],
    ) -> Result<Slot, QueueError> {
        let (ledger, id) = (&self.pool.ledger, self.pool.id);
        // Pingora's selection chooses the pod; the ledger's check-and-take accepts it. Pingora's
        // health flag is not used: pods come and go through DNS, and connect failures are
        // handled per request.
        let taken = std::cell::Cell::new(None);
        self.lb.select_with(b"", usize::MAX, |b, _healthy| {
            let slot = inet(b)
                .filter(|a| !tried.contains(a))
                .and_then(|a| ledger.try_take(id, a));
            let ok = slot.is_some();
            taken.set(slot);
            ok
        });
        if let Some(slot) = taken.into_inner() {
            return Ok(slot);
        }
        match ledger.enqueue(id, tried, policy.max_waiting)? {
            Enqueued::Now(slot) => Ok(slot),
            Enqueued::Wait(granted, _place) => {
                match tokio::time::timeout_at(deadline, granted).await {
                    Ok(Ok(result)) => result,
                    // The ledger dropped the pool (it cannot while we hold the balancer).
                    Ok(Err(_)) => Err(QueueError::ShuttingDown),
                    Err(_) => Err(QueueError::Timeout),
                }
            }
        }
    }
}
#[cfg(test)]
mod tests;
