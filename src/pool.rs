//! Per-pod slots and the FIFO wait queue of one pool (one target service + port).
//!
//! A pod's capacity belongs to the pod, so every route that targets the same service shares
//! one `Pool`. The pool has two parts that are kept in step under one lock:
//!
//! * per-pod in-flight counters, each capped at `limit`: taking a slot is a single
//!   check-and-increment under the lock ([`Pool::try_take`]), so no interleaving can push a pod
//!   above its cap;
//! * a fair (FIFO) `tokio::sync::Semaphore` whose permits stand for free slots on active pods.
//!   A request first waits for a permit, in arrival order, then takes a slot on a pod. Waiting is
//!   wake-up driven: a released slot hands its permit to the oldest waiter.
//!
//! The accounting invariant, kept by every method below, is
//! `available permits + permits held but not yet spent = Σ free slots on active pods + debt`.
//! `debt` exists because removing a pod must withdraw its free slots from the semaphore, but some
//! of those permits may already be in the hands of requests that have not picked a pod yet; those
//! requests pay the debt back (forget their permit) and wait again. Releasing a slot on a pod that
//! was removed returns no permit, so the capacity of a departed pod disappears exactly once.
//!
//! Every taken slot is a [`Slot`] guard; dropping it (on success, error, retry, client abort or
//! task cancellation) gives the slot back exactly once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::config::QueuePolicy;

/// How long a pod that refused a connection is placed behind every other pod in the choice.
/// It is not removed (DNS owns the pod list); it only stops attracting first attempts.
pub const CONNECT_FAILURE_PENALTY: Duration = Duration::from_secs(10);

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

#[derive(Debug)]
struct PodState {
    inflight: usize,
    /// In the current pod list. Inactive pods stay in the map only while requests on them
    /// are still in flight, so their slots are counted until the last one finishes.
    active: bool,
    last_connect_failure: Option<Instant>,
    /// Requests sent to this pod since the pool started (for status and metrics).
    requests: u64,
    connect_failures: u64,
}

#[derive(Debug)]
struct State {
    limit: usize,
    pods: HashMap<SocketAddr, PodState>,
    debt: usize,
    /// How long the last [`RECENT_HOLDS`] slots were held, newest last.
    recent_holds: VecDeque<Duration>,
}

/// Slot hold times remembered for [`Pool::longest_recent_hold`].
const RECENT_HOLDS: usize = 16;

/// A pod as the selector and the status page see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub addr: SocketAddr,
    pub inflight: usize,
    pub active: bool,
    pub recently_failed: bool,
    pub requests: u64,
    pub connect_failures: u64,
}

/// What a change of the pod list did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodChange {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

/// What happened to a permit for which no acceptable pod was found.
#[derive(Debug, PartialEq, Eq)]
pub enum NoPod {
    /// The permit covered capacity that had been withdrawn (a removed pod); it is gone now and
    /// the request should wait again.
    PaidDebt,
    /// The free capacity is on pods this request must not use (already tried); the permit went
    /// back to the queue so others can use it.
    Returned,
}

pub struct Pool {
    name: String,
    sem: Semaphore,
    state: Mutex<State>,
    waiting: AtomicUsize,
    /// Woken on every release and pod-list change, for requests that wait for a pod other than
    /// the ones they already tried.
    changed: Notify,
    /// The pod list has been learned at least once (for readiness).
    resolved: AtomicBool,
    rotation: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Pool {
    pub fn new(name: impl Into<String>, limit: usize) -> Arc<Pool> {
        Arc::new(Pool {
            name: name.into(),
            sem: Semaphore::new(0),
            state: Mutex::new(State {
                limit,
                pods: HashMap::new(),
                debt: 0,
                recent_holds: VecDeque::with_capacity(RECENT_HOLDS),
            }),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
            resolved: AtomicBool::new(false),
            rotation: AtomicUsize::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the counters are still
        // the best information there is, so keep serving with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `n` free slots to the semaphore, paying off debt first.
    fn grant(&self, st: &mut State, n: usize) {
        let paid = n.min(st.debt);
        st.debt -= paid;
        if n > paid {
            self.sem.add_permits(n - paid);
        }
    }

    /// Withdraws `n` free slots; what is not available right now becomes debt.
    fn withdraw(&self, st: &mut State, n: usize) {
        let forgotten = self.sem.forget_permits(n);
        st.debt += n - forgotten;
    }

    /// Replaces the pod list. New pods are usable at once (queued requests start on them);
    /// removed pods get no new requests, and their in-flight requests keep counting against
    /// their cap until they finish, also if the same address comes back meanwhile.
    pub fn set_pods(&self, addrs: impl IntoIterator<Item = SocketAddr>) -> PodChange {
        let new: std::collections::BTreeSet<SocketAddr> = addrs.into_iter().collect();
        let mut change = PodChange::default();
        {
            let mut st = self.lock();
            let limit = st.limit;
            let mut to_withdraw = 0;
            let mut to_grant = 0;
            st.pods.retain(|addr, pod| {
                if pod.active && !new.contains(addr) {
                    pod.active = false;
                    to_withdraw += limit.saturating_sub(pod.inflight);
                    change.removed.push(*addr);
                }
                pod.active || pod.inflight > 0
            });
            for addr in &new {
                let pod = st.pods.entry(*addr).or_insert(PodState {
                    inflight: 0,
                    active: false,
                    last_connect_failure: None,
                    requests: 0,
                    connect_failures: 0,
                });
                if !pod.active {
                    pod.active = true;
                    to_grant += limit.saturating_sub(pod.inflight);
                    change.added.push(*addr);
                }
            }
            self.withdraw(&mut st, to_withdraw);
            self.grant(&mut st, to_grant);
        }
        change.removed.sort();
        self.changed.notify_waiters();
        change
    }

    /// Changes the per-pod cap. Lowering it stops new requests above the new cap while the
    /// requests in flight finish; raising it lets queued requests start at once.
    pub fn set_limit(&self, limit: usize) {
        {
            let mut st = self.lock();
            let old = st.limit;
            let (mut grant, mut withdraw) = (0, 0);
            for pod in st.pods.values().filter(|p| p.active) {
                let before = old.saturating_sub(pod.inflight);
                let after = limit.saturating_sub(pod.inflight);
                if after > before {
                    grant += after - before;
                } else {
                    withdraw += before - after;
                }
            }
            st.limit = limit;
            self.withdraw(&mut st, withdraw);
            self.grant(&mut st, grant);
        }
        self.changed.notify_waiters();
    }

    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Records that discovery has produced a pod list (possibly empty) at least once.
    pub fn mark_resolved(&self) {
        self.resolved.store(true, Ordering::Release);
    }

    /// Whether the pod list has been learned at least once.
    pub fn resolved(&self) -> bool {
        self.resolved.load(Ordering::Acquire)
    }

    /// Requests waiting for a permit right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The pods, sorted by address; removed pods with requests still in flight included.
    pub fn pods(&self) -> Vec<PodView> {
        let st = self.lock();
        let now = Instant::now();
        let mut v: Vec<PodView> = st
            .pods
            .iter()
            .map(|(addr, p)| PodView {
                addr: *addr,
                inflight: p.inflight,
                active: p.active,
                recently_failed: p
                    .last_connect_failure
                    .is_some_and(|t| now.duration_since(t) < CONNECT_FAILURE_PENALTY),
                requests: p.requests,
                connect_failures: p.connect_failures,
            })
            .collect();
        v.sort_by_key(|p| p.addr);
        v
    }

    /// A counter that advances on every call, so the selector can rotate among equally
    /// loaded pods.
    pub fn next_rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes one slot on `addr` if it is an active pod below its cap: the check and the take are
    /// one step under the lock. The caller must hold a permit and spend it
    /// ([`SemaphorePermit::forget`]) when this returns true.
    pub fn try_take(&self, addr: SocketAddr) -> bool {
        let mut st = self.lock();
        let limit = st.limit;
        match st.pods.get_mut(&addr) {
            Some(p) if p.active && p.inflight < limit => {
                p.inflight += 1;
                p.requests += 1;
                true
            }
            _ => false,
        }
    }

    /// Wraps a slot taken with [`Pool::try_take`] into its guard.
    pub fn slot(self: &Arc<Self>, addr: SocketAddr) -> Slot {
        Slot {
            pool: Arc::clone(self),
            addr,
            taken: Instant::now(),
        }
    }

    fn release(&self, addr: SocketAddr, held: Duration) {
        {
            let mut st = self.lock();
            if st.recent_holds.len() == RECENT_HOLDS {
                st.recent_holds.pop_front();
            }
            st.recent_holds.push_back(held);
            let limit = st.limit;
            let Some(pod) = st.pods.get_mut(&addr) else {
                log::error!("pool {}: released a slot on unknown pod {addr}", self.name);
                return;
            };
            debug_assert!(pod.inflight > 0);
            pod.inflight = pod.inflight.saturating_sub(1);
            let (active, inflight) = (pod.active, pod.inflight);
            if active {
                if inflight < limit {
                    self.grant(&mut st, 1);
                }
            } else if inflight == 0 {
                st.pods.remove(&addr);
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits, first come first served, for a permit (a free slot somewhere in the pool).
    /// Refuses at once when `max_waiting` requests already wait; gives up at `deadline`.
    /// Dropping the returned future leaves the queue.
    pub async fn wait_permit(
        &self,
        policy: &QueuePolicy,
        deadline: tokio::time::Instant,
    ) -> Result<SemaphorePermit<'_>, QueueError> {
        // A semaphore with waiters never has permits available, so this cannot jump the queue.
        match self.sem.try_acquire() {
            Ok(p) => return Ok(p),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(QueueError::ShuttingDown),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        let _in_queue = self.enter_queue(policy.max_waiting)?;
        match tokio::time::timeout_at(deadline, self.sem.acquire()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_closed)) => Err(QueueError::ShuttingDown),
            Err(_) => Err(QueueError::Timeout),
        }
    }

    fn enter_queue(&self, max_waiting: usize) -> Result<QueueTicket<'_>, QueueError> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < max_waiting).then_some(w + 1)
            })
            .map_err(|_| QueueError::Full)?;
        Ok(QueueTicket { pool: self })
    }

    /// Stops the queue for good: every waiting and future request gets
    /// [`QueueError::ShuttingDown`]. Requests already holding a slot are not affected.
    pub fn close(&self) {
        self.sem.close();
        self.changed.notify_waiters();
    }

    /// Settles a permit for which the selector found no acceptable pod.
    pub fn no_pod_for(&self, permit: SemaphorePermit<'_>) -> NoPod {
        let mut st = self.lock();
        if st.debt > 0 {
            st.debt -= 1;
            permit.forget();
            NoPod::PaidDebt
        } else {
            drop(permit);
            NoPod::Returned
        }
    }

    /// A future that completes on the next release or pod-list change. Create it (and
    /// `enable` it) before checking, so no change between the check and the wait is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Whether some active pod is not in `tried`.
    pub fn has_untried(&self, tried: &[SocketAddr]) -> bool {
        let st = self.lock();
        st.pods.iter().any(|(a, p)| p.active && !tried.contains(a))
    }

    /// Whether some active pod exists at all.
    pub fn has_pods(&self) -> bool {
        self.lock().pods.values().any(|p| p.active)
    }

    pub fn report_connect_failure(&self, addr: SocketAddr) {
        if let Some(p) = self.lock().pods.get_mut(&addr) {
            p.last_connect_failure = Some(Instant::now());
            p.connect_failures += 1;
        }
    }

    pub fn report_connected(&self, addr: SocketAddr) {
        if let Some(p) = self.lock().pods.get_mut(&addr) {
            p.last_connect_failure = None;
        }
    }

    /// Slots in flight across all pods (removed ones included).
    pub fn inflight(&self) -> usize {
        self.lock().pods.values().map(|p| p.inflight).sum()
    }

    /// The longest of the last few requests' slot hold times (zero before the first): what a
    /// request taken from the queue now can be expected to need. The shutdown drain stops
    /// starting queued requests once less than this is left, so they get a `503` while they can
    /// still go elsewhere, instead of starting on a pod and being cut at the deadline. The
    /// longest rather than a typical one, because a refusal costs a retry, a cut costs the
    /// pod's work and leaves the client without an answer.
    pub fn longest_recent_hold(&self) -> Duration {
        self.lock()
            .recent_holds
            .iter()
            .copied()
            .max()
            .unwrap_or_default()
    }

    /// Permits available right now (free slots nobody is waiting for). For tests and status.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// Counts a request as waiting while it is in the semaphore's queue.
struct QueueTicket<'a> {
    pool: &'a Pool,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One taken slot on one pod. Dropping it gives the slot back, exactly once.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<Pool>,
    addr: SocketAddr,
    taken: Instant,
}

impl Slot {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.release(self.addr, self.taken.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 1, i], 8000))
    }

    fn policy(max_waiting: usize, ms: u64) -> QueuePolicy {
        QueuePolicy {
            max_waiting,
            timeout: Duration::from_millis(ms),
        }
    }

    fn deadline(ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(ms)
    }

    /// Takes a slot on the first pod that accepts, the way the selector does.
    async fn take(pool: &Arc<Pool>, q: &QueuePolicy, ms: u64) -> Result<Slot, QueueError> {
        loop {
            let permit = pool.wait_permit(q, deadline(ms)).await?;
            let pods = pool.pods();
            if let Some(p) = pods.iter().find(|p| pool.try_take(p.addr)) {
                permit.forget();
                return Ok(pool.slot(p.addr));
            }
            assert_eq!(pool.no_pod_for(permit), NoPod::PaidDebt);
        }
    }

    /// A task that waits for a slot and reports the pod it got (or why not).
    fn spawn_waiter(
        pool: &Arc<Pool>,
        q: QueuePolicy,
    ) -> tokio::task::JoinHandle<Result<SocketAddr, QueueError>> {
        let pool = Arc::clone(pool);
        let ms = q.timeout.as_millis() as u64;
        tokio::spawn(async move { take(&pool, &q, ms).await.map(|s| s.addr()) })
    }

    #[tokio::test(start_paused = true)]
    async fn closing_answers_waiters_and_spares_slots_in_flight() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let held = take(&pool, &policy(10, 60_000), 60_000).await.unwrap();
        let waiter = spawn_waiter(&pool, policy(10, 60_000));
        tokio::task::yield_now().await;
        pool.close();
        assert_eq!(waiter.await.unwrap(), Err(QueueError::ShuttingDown));
        assert_eq!(
            take(&pool, &policy(10, 60_000), 60_000).await.unwrap_err(),
            QueueError::ShuttingDown
        );
        assert_eq!(pool.inflight(), 1);
        drop(held);
        assert_eq!(pool.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_track_free_slots() {
        let pool = Pool::new("p", 2);
        pool.set_pods([addr(1), addr(2)]);
        assert_eq!(pool.available(), 4);
        let q = policy(10, 1000);
        let a = take(&pool, &q, 1000).await.unwrap();
        let b = take(&pool, &q, 1000).await.unwrap();
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.inflight(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.available(), 4);
        assert_eq!(pool.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_pool_queues_then_times_out() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(10, 500);
        let _held = take(&pool, &q, 500).await.unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(take(&pool, &q, 500).await.unwrap_err(), QueueError::Timeout);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        assert_eq!(pool.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_refuses_at_once() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(1, 10_000);
        let _held = take(&pool, &q, 10_000).await.unwrap();
        let waiter = spawn_waiter(&pool, policy(1, 10_000));
        tokio::task::yield_now().await;
        assert_eq!(pool.waiting(), 1);
        let start = tokio::time::Instant::now();
        assert_eq!(take(&pool, &q, 10_000).await.unwrap_err(), QueueError::Full);
        assert_eq!(start.elapsed(), Duration::ZERO);
        waiter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(100, 60_000);
        let held = take(&pool, &q, 60_000).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..10 {
            let pool = Arc::clone(&pool);
            let tx = tx.clone();
            tokio::spawn(async move {
                let slot = take(&pool, &policy(100, 60_000), 60_000).await.unwrap();
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(slot);
            });
            // Let waiter i enter the queue before waiter i+1 is spawned.
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.waiting(), 10);
        drop(held);
        let mut order = Vec::new();
        for _ in 0..10 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        // The last waiter gives its slot back after its 10 ms of work.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.available(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiter_leaves_queue_without_leaking() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(10, 60_000);
        let held = take(&pool, &q, 60_000).await.unwrap();
        let waiter = spawn_waiter(&pool, policy(10, 60_000));
        tokio::task::yield_now().await;
        assert_eq!(pool.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(pool.waiting(), 0);
        drop(held);
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn added_pod_wakes_queued_request() {
        let pool = Pool::new("p", 1);
        let q = policy(10, 60_000);
        let waiter = spawn_waiter(&pool, policy(10, 60_000));
        tokio::task::yield_now().await;
        assert_eq!(pool.waiting(), 1);
        pool.set_pods([addr(7)]);
        assert_eq!(waiter.await.unwrap(), Ok(addr(7)));
        let _ = q;
    }

    #[tokio::test(start_paused = true)]
    async fn removed_pod_capacity_disappears_exactly_once() {
        let pool = Pool::new("p", 2);
        pool.set_pods([addr(1), addr(2)]);
        let q = policy(10, 1000);
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(take(&pool, &q, 1000).await.unwrap());
        }
        // Remove pod 1 while both of its slots are in flight.
        pool.set_pods([addr(2)]);
        assert_eq!(pool.inflight(), 4);
        drop(slots);
        assert_eq!(pool.inflight(), 0);
        assert_eq!(pool.available(), 2, "only pod 2's capacity remains");
        assert_eq!(pool.pods().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reappearing_pod_keeps_counting_old_requests() {
        let pool = Pool::new("p", 2);
        pool.set_pods([addr(1)]);
        let q = policy(10, 1000);
        let a = take(&pool, &q, 1000).await.unwrap();
        pool.set_pods([]);
        pool.set_pods([addr(1)]);
        assert_eq!(
            pool.available(),
            1,
            "the old request still holds one of its two slots"
        );
        let b = take(&pool, &q, 1000).await.unwrap();
        assert_eq!(pool.pods()[0].inflight, 2);
        assert_eq!(take(&pool, &q, 100).await.unwrap_err(), QueueError::Timeout);
        drop((a, b));
        assert_eq!(pool.available(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permit_held_while_pod_removed_is_repaid() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(10, 1000);
        let permit = pool.wait_permit(&q, deadline(1000)).await.unwrap();
        // The pod goes away between the permit and the pick.
        pool.set_pods([]);
        assert!(!pool.try_take(addr(1)));
        assert_eq!(pool.no_pod_for(permit), NoPod::PaidDebt);
        pool.set_pods([addr(2)]);
        assert_eq!(pool.available(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_the_limit_holds_new_requests_until_below_it() {
        let pool = Pool::new("p", 3);
        pool.set_pods([addr(1)]);
        let q = policy(10, 1000);
        let a = take(&pool, &q, 1000).await.unwrap();
        let b = take(&pool, &q, 1000).await.unwrap();
        pool.set_limit(1);
        assert_eq!(pool.available(), 0);
        drop(a);
        assert_eq!(pool.available(), 0, "still at the new cap");
        drop(b);
        assert_eq!(pool.available(), 1);
        pool.set_limit(2);
        assert_eq!(pool.available(), 2);
    }

    #[tokio::test]
    async fn longest_recent_hold_forgets_old_requests() {
        let pool = Pool::new("p", 1);
        pool.set_pods([addr(1)]);
        let q = policy(10, 1000);
        assert_eq!(pool.longest_recent_hold(), Duration::ZERO, "no history yet");
        let long = take(&pool, &q, 1000).await.unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(long);
        assert!(pool.longest_recent_hold() >= Duration::from_millis(50));
        for _ in 0..RECENT_HOLDS {
            drop(take(&pool, &q, 1000).await.unwrap());
        }
        assert!(
            pool.longest_recent_hold() < Duration::from_millis(50),
            "{:?}",
            pool.longest_recent_hold()
        );
    }
}
