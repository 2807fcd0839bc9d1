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
//! Inside, the **ledger** owns per-pod counts, caps and the wait queue, keyed by pod address
//! and shared by every pool of the agent. There are two, chosen by the config's `ledger`:
//!
//! * in process (ledger.rs, the default): one agent; select.rs is Pingora's
//!   `BackendSelection`, where the pod for a request that does not wait is chosen;
//! * shared by several agent replicas through Redis (shared/): the cap, the least-in-flight
//!   choice and the FIFO queue are global, decided by one atomic script per step. The
//!   in-process ledger then only counts this agent's own slots, for its views and its drain.

mod ledger;
mod queue;
mod select;
pub mod shared;

use pingora::lb::{Backends, LoadBalancer};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use ledger::CONNECT_FAILURE_PENALTY;
use ledger::{Enqueued, LocalLedger, LocalSlot};
use select::{inet, LeastInFlight, PoolHandle, SharedDiscovery, TrustedPods};
use shared::{AcquireError, Lease, RedisLedger};

/// Where a request first joined the queue, kept across its attempts: a retry after a connect
/// failure waits in the place it had, not behind everyone who came after it (its queue timeout
/// runs from its first wait too). One per request; empty until the request first waits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Its number in the in-process queue.
    local: Option<u64>,
    /// Its stamp in the shared ledger's queue.
    shared: Option<u64>,
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
    /// How long the oldest of this agent's waiters in process has waited (`None` with none,
    /// and with the shared ledger, whose queue is in Redis).
    pub oldest_wait: Option<Duration>,
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

/// The agent's ledger, handed to every [`Balancer`]: in process, or shared through Redis.
#[derive(Clone)]
pub struct Ledger {
    local: Arc<LocalLedger>,
    shared: Option<Arc<RedisLedger>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.shared.is_some() {
            "Ledger(redis)"
        } else {
            "Ledger(in process)"
        })
    }
}

impl Ledger {
    /// The in-process ledger: caps hold for the requests of this agent (one replica).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Ledger {
        Ledger {
            local: Arc::new(LocalLedger::default()),
            shared: None,
        }
    }

    /// A ledger shared with every agent connected to the same Redis.
    pub fn shared(redis: Arc<RedisLedger>) -> Ledger {
        Ledger {
            local: Arc::new(LocalLedger::default()),
            shared: Some(redis),
        }
    }

    /// The shared ledger, if this agent uses one (for `/status` and `/metrics`).
    pub fn redis(&self) -> Option<&Arc<RedisLedger>> {
        self.shared.as_ref()
    }
}

/// One taken slot on one pod. Dropping it gives the slot back, exactly once (in the shared
/// ledger too), and hands it to the oldest waiter that may use it.
#[derive(Debug)]
pub struct Slot {
    local: LocalSlot,
    /// The slot in the shared ledger, held for its `Drop` (which releases it there).
    lease: Option<Lease>,
}

impl Slot {
    pub fn addr(&self) -> SocketAddr {
        self.local.addr()
    }

    /// The pod accepted a connection: a refused connection no longer sends it last.
    pub fn connected(&self) {
        self.local.connected();
    }

    /// The pod refused a connection: for a while it goes last in every pool's choice.
    pub fn connect_failed(&self) {
        self.local.connect_failed();
    }

    /// The pod made no progress on this request for `upstream_timeout`: for a while it goes
    /// last in every pool's choice (of this agent: the shared ledger's choice does not know).
    pub fn timed_out(&self) {
        self.local.timed_out();
    }

    /// The slot in the shared ledger, with a shared ledger.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// An asynchronous job holds the slot from now on (see [`crate::jobs`]): the shutdown
    /// drain does not take its hold for a request's duration.
    pub fn held_by_job(&mut self) {
        self.local.held_by_job();
    }
}

impl From<LocalSlot> for Slot {
    fn from(local: LocalSlot) -> Slot {
        Slot { local, lease: None }
    }
}

/// One pool: its pods (as Pingora's `LoadBalancer` knows them) and its entry in the ledger.
pub struct Balancer {
    lb: LoadBalancer<LeastInFlight>,
    pool: Arc<PoolHandle>,
    shared: Option<Arc<RedisLedger>>,
    trusted: Arc<TrustedPods>,
    /// The pod list has been learned at least once (for readiness).
    resolved: AtomicBool,
    /// Unix milliseconds of the last change of the pod list (0: never set).
    changed_unix_ms: AtomicU64,
    /// Requests of this pool waiting in the shared ledger's queue.
    shared_waiting: AtomicUsize,
    /// Wakes requests waiting in the shared ledger when the pool is closed.
    closing: tokio::sync::Notify,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("name", &self.pool.name)
            .finish()
    }
}

impl Balancer {
    pub fn new(ledger: &Ledger, name: impl Into<String>, limit: usize) -> Balancer {
        let name = name.into();
        let pool = Arc::new(PoolHandle {
            ledger: Arc::clone(&ledger.local),
            id: ledger.local.add_pool(name.clone(), limit),
            name,
        });
        let trusted = Arc::new(TrustedPods::default());
        let backends = Backends::new(Box::new(SharedDiscovery(Arc::clone(&trusted))));
        let lb = LoadBalancer::from_backends_with_config(backends, Some(Arc::clone(&pool)));
        Balancer {
            lb,
            pool,
            shared: ledger.shared.clone(),
            trusted,
            resolved: AtomicBool::new(false),
            changed_unix_ms: AtomicU64::new(0),
            shared_waiting: AtomicUsize::new(0),
            closing: tokio::sync::Notify::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.pool.name
    }

    /// Makes `pods` the pool's pod list (Pingora rebuilds its selector, which hands the list to
    /// the ledger) and marks the pool as resolved.
    pub async fn set_pods(&self, pods: BTreeSet<SocketAddr>) {
        if self.trusted.get() != pods || !self.resolved() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            self.changed_unix_ms.store(now, Ordering::Relaxed);
        }
        self.trusted.set(pods);
        // Our discovery cannot fail.
        let _ = self.lb.update().await;
        self.share_pods();
        self.resolved.store(true, Ordering::Release);
    }

    /// A slot of the shared ledger that this agent took over (an asynchronous job's hold,
    /// adopted from an agent that vanished): counted here from now on, as if granted here.
    pub fn adopt(&self, lease: Lease) -> Slot {
        Slot {
            local: self.pool.ledger.record(self.pool.id, lease.addr()),
            lease: Some(lease),
        }
    }

    /// Tells the shared ledger this agent's pods and caps of the pool, so its waiting requests
    /// can be given a new pod (and not a removed one).
    fn share_pods(&self) {
        if let Some(redis) = &self.shared {
            if let Ok(offer) = self.pool.ledger.offer(self.pool.id, &[]) {
                redis.set_pods(&self.pool.name, &offer);
            }
        }
    }

    /// The pod list last given to [`Balancer::set_pods`].
    pub fn trusted_pods(&self) -> BTreeSet<SocketAddr> {
        self.trusted.get()
    }

    /// When the pod list last changed (its first setting included), in Unix milliseconds; 0
    /// before that.
    pub fn pods_changed_unix_ms(&self) -> u64 {
        self.changed_unix_ms.load(Ordering::Relaxed)
    }

    /// Whether the pod list has been learned at least once.
    pub fn resolved(&self) -> bool {
        self.resolved.load(Ordering::Acquire)
    }

    /// Changes the per-pod cap. Lowering it stops new requests above the new cap while the
    /// requests in flight finish; raising it lets queued requests start at once.
    pub fn set_limit(&self, limit: usize) {
        self.pool.ledger.set_limit(self.pool.id, limit);
        self.share_pods();
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
        self.closing.notify_waiters();
    }

    pub fn view(&self) -> PoolView {
        let mut v = self.pool.ledger.view(self.pool.id);
        v.waiting += self.shared_waiting.load(Ordering::Relaxed);
        v
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
        arrival: &mut Arrival,
    ) -> Result<Slot, QueueError> {
        if let Some(redis) = &self.shared {
            return self
                .acquire_shared(redis, policy, deadline, tried, &mut arrival.shared)
                .await;
        }
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
            return Ok(slot.into());
        }
        match ledger.enqueue(id, tried, policy.max_waiting, &mut arrival.local)? {
            Enqueued::Now(slot) => Ok(slot.into()),
            Enqueued::Wait(granted, _place) => {
                match tokio::time::timeout_at(deadline, granted).await {
                    Ok(Ok(result)) => result.map(Slot::from),
                    // The ledger dropped the pool (it cannot while we hold the balancer).
                    Ok(Err(_)) => Err(QueueError::ShuttingDown),
                    Err(_) => Err(QueueError::Timeout),
                }
            }
        }
    }

    /// [`Balancer::acquire`] through the shared ledger: the pod is chosen among this agent's
    /// pods of the pool by the global counts, and the request waits in the one queue of all
    /// agents. While Redis is unreachable the request waits and times out as usual.
    async fn acquire_shared(
        &self,
        redis: &Arc<RedisLedger>,
        policy: &QueuePolicy,
        deadline: tokio::time::Instant,
        tried: &[SocketAddr],
        arrival: &mut Option<u64>,
    ) -> Result<Slot, QueueError> {
        let closing = self.closing.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        let offer = self.pool.ledger.offer(self.pool.id, tried)?;
        // Counted until this future ends or is dropped (client gone, task cancelled).
        let _waiting = Counted::new(&self.shared_waiting);
        let result = tokio::select! {
            r = redis.acquire(&self.pool.name, &offer, tried, policy.max_waiting, deadline, arrival) => {
                r.map_err(|e| match e {
                    AcquireError::Full => QueueError::Full,
                    AcquireError::Timeout => QueueError::Timeout,
                })
            }
            _ = closing => Err(QueueError::ShuttingDown),
        };
        drop(_waiting);
        let lease = result?;
        Ok(Slot {
            local: self.pool.ledger.record(self.pool.id, lease.addr()),
            lease: Some(lease),
        })
    }
}

/// Counts one while it lives: a count that a dropped future gives back too.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
