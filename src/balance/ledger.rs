//! The ledger: how many requests each pod has in flight, each pod's cap, and the one queue of
//! requests waiting for a slot. Everything that counts slots is here, under one lock.
//!
//! **Per-pod state is keyed by the pod's address.** Every pool (one per target of the config in
//! force, plus retired pools that requests still hold) that lists an `IP:port` counts against
//! the same counter and the same cap, so overlapping `endpoints` lists, two DNS names that
//! resolve to one pod, or a reload that replaces a pool all see one truth per pod. A pod's cap
//! is the lowest `limit` of the pools that list it (the config refuses two limits for one
//! static address; for DNS and across reload generations the stricter one holds).
//!
//! **One FIFO queue.** Each pool keeps its waiters in arrival order (a sequence number shared by
//! all pools); when a slot frees, it goes to the oldest waiter, across all pools, that may use
//! that pod. The invariant kept by every method, at every moment the lock is released: *no
//! waiter waits while a pod it may use has a free slot.* Capacity appears only under the lock
//! (a release, a new pod, a raised limit), and every such change hands it out before unlocking
//! ([`LocalLedger::dispatch`]). That is what lets a newcomer take any free slot it sees without a
//! queue check: no earlier request wants it.
//!
//! A waiter is answered through a oneshot channel carrying its [`LocalSlot`]. If the waiter is gone
//! by then (queue timeout, client gone), the slot comes back: either the send fails and the
//! take is undone under the lock, or the receiver is dropped with the slot inside and the slot's
//! own drop releases it.

use std::collections::{BTreeSet, VecDeque};

/// The ledger's maps: looked up several times per request under the ledger's lock, with keys
/// (pod addresses, pool ids) that come from the config and discovery, never from a client, so
/// a fast hasher in place of SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::queue::Queue;
use super::{PodChange, PodView, PoolView, QueueError};
use crate::balance::shared::AgentView;

/// How long a pod that refused a connection, or made no progress on a request for
/// `upstream_timeout`, is placed behind every other pod in the choice. It is not removed (DNS
/// owns the pod list); it only stops attracting first attempts.
pub const CONNECT_FAILURE_PENALTY: Duration = Duration::from_secs(10);

/// LocalSlot hold times remembered per pool for [`PoolView::longest_recent_hold`].
const RECENT_HOLDS: usize = 16;

pub(super) type PoolId = u64;

/// The in-process ledger: one per agent, shared by every pool.
#[derive(Default)]
pub(super) struct LocalLedger {
    state: Mutex<State>,
}

impl std::fmt::Debug for LocalLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalLedger")
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<SocketAddr, Pod>,
    pools: HashMap<PoolId, PoolState>,
    next_pool: PoolId,
    /// Arrival order, shared by all pools so that their queues can be merged.
    next_seq: u64,
    /// Waiters across all pools; lets a release skip the queue walk when nobody waits.
    waiting: usize,
    /// Grows with every change of a pool's pods or of a pod's cap: the version of the views
    /// given to a shared ledger (see [`AgentView`]).
    views_version: u64,
}

#[derive(Debug)]
struct Pod {
    inflight: usize,
    /// The lowest limit among `listed_by`; 0 when no pool lists the pod (it takes no request).
    limit: usize,
    listed_by: Vec<PoolId>,
    last_connect_failure: Option<Instant>,
    /// The last request the pod made no progress on for `upstream_timeout`. Unlike a refused
    /// connection, an accepted one does not clear it: a hung pod accepts connections.
    last_timeout: Option<Instant>,
    requests: u64,
    connect_failures: u64,
}

impl Pod {
    fn new() -> Pod {
        Pod {
            inflight: 0,
            limit: 0,
            listed_by: Vec::new(),
            last_connect_failure: None,
            last_timeout: None,
            requests: 0,
            connect_failures: 0,
        }
    }

    fn recently_failed(&self, now: Instant) -> bool {
        [self.last_connect_failure, self.last_timeout]
            .into_iter()
            .flatten()
            .any(|t| now.duration_since(t) < CONNECT_FAILURE_PENALTY)
    }
}

/// What a request learned about its pod, for the choice of later requests.
#[derive(Debug, Clone, Copy)]
enum PodEvent {
    Connected,
    ConnectFailed,
    TimedOut,
}

struct PoolState {
    name: String,
    limit: usize,
    /// The pool's pod list, sorted.
    members: Vec<SocketAddr>,
    /// Slots taken through this pool and not yet given back, per pod.
    held: HashMap<SocketAddr, usize>,
    waiters: Queue<Waiter>,
    closed: bool,
    /// Its `Balancer` is gone; the entry stays until its last slot comes back.
    dropped: bool,
    recent_holds: VecDeque<Duration>,
    /// Advances on every take, so equally loaded pods take turns.
    rotation: usize,
}

impl PoolState {
    /// Whether a request of this pool may take or wait for a slot: not once the pool is closed
    /// or gone, and not a retry that has already tried every pod of the pool.
    fn may_wait(&self, tried: &[SocketAddr]) -> Result<(), QueueError> {
        if self.closed || self.dropped {
            return Err(QueueError::ShuttingDown);
        }
        if tried_every_pod(&self.members, tried) {
            return Err(QueueError::NoUntriedPod);
        }
        Ok(())
    }
}

/// A retry that has tried every pod of a pool (that has any) can use none of them.
fn tried_every_pod(members: &[SocketAddr], tried: &[SocketAddr]) -> bool {
    !tried.is_empty() && !members.is_empty() && members.iter().all(|a| tried.contains(a))
}

struct Waiter {
    tx: oneshot::Sender<Result<LocalSlot, QueueError>>,
    /// When it joined the queue (for the oldest waiter's age in the views). Tokio's clock, as
    /// the queue deadlines use.
    since: tokio::time::Instant,
}

/// What [`LocalLedger::enqueue`] gave.
pub(super) enum Enqueued {
    /// A slot was free after all.
    Now(LocalSlot),
    /// Queued: the slot (or the reason there is none) arrives on the channel. Dropping the
    /// ticket leaves the queue.
    Wait(oneshot::Receiver<Result<LocalSlot, QueueError>>, WaitTicket),
}

/// A place in the queue; dropping it gives the place up.
pub(super) struct WaitTicket {
    ledger: Arc<LocalLedger>,
    pool: PoolId,
    seq: u64,
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        let mut st = self.ledger.lock();
        if let Some(pool) = st.pools.get_mut(&self.pool) {
            if pool.waiters.remove(self.seq).is_some() {
                st.waiting -= 1;
            }
        }
    }
}

/// Ranks the pods of `pool` a request may use: below their cap, not in `tried`. Least loaded
/// first; a pod that just refused a connection goes last, so a dead pod does not attract every
/// first attempt; ties take turns through the pool's rotation.
fn ranked<'a>(
    pods: &'a HashMap<SocketAddr, Pod>,
    pool: &'a PoolState,
    tried: &'a [SocketAddr],
    now: Instant,
) -> impl Iterator<Item = ((bool, usize), SocketAddr)> + 'a {
    let n = pool.members.len();
    let start = if n == 0 { 0 } else { pool.rotation % n };
    (0..n).filter_map(move |i| {
        let addr = pool.members[(start + i) % n];
        let pod = pods.get(&addr)?;
        (pod.inflight < pod.limit && !tried.contains(&addr))
            .then(|| ((pod.recently_failed(now), pod.inflight), addr))
    })
}

/// The best pod for a request of `pool`, as [`ranked`] orders them.
fn pick(
    pods: &HashMap<SocketAddr, Pod>,
    pool: &PoolState,
    tried: &[SocketAddr],
    now: Instant,
) -> Option<SocketAddr> {
    let mut best: Option<((bool, usize), SocketAddr)> = None;
    for (key, addr) in ranked(pods, pool, tried, now) {
        if best.is_none_or(|(k, _)| key < k) {
            best = Some((key, addr));
        }
    }
    best.map(|(_, a)| a)
}

fn lowest_limit(pools: &HashMap<PoolId, PoolState>, pod: &mut Pod) {
    pod.limit = pod
        .listed_by
        .iter()
        .filter_map(|id| pools.get(id).map(|p| p.limit))
        .min()
        .unwrap_or(0);
}

impl LocalLedger {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the counters are still
        // the best information there is, so keep serving with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn add_pool(&self, name: String, limit: usize) -> PoolId {
        let mut st = self.lock();
        let id = st.next_pool;
        st.next_pool += 1;
        st.pools.insert(
            id,
            PoolState {
                name,
                limit,
                members: Vec::new(),
                held: HashMap::default(),
                waiters: Queue::default(),
                closed: false,
                dropped: false,
                recent_holds: VecDeque::with_capacity(RECENT_HOLDS),
                rotation: 0,
            },
        );
        id
    }

    /// The pool's `Balancer` is gone. Its pods stay listed by it (and capped by its limit)
    /// until the last slot taken through it comes back.
    pub(super) fn drop_pool(self: &Arc<Self>, id: PoolId) {
        let mut st = self.lock();
        let Some(pool) = st.pools.get_mut(&id) else {
            return;
        };
        pool.dropped = true;
        Self::refuse_waiters(&mut st, id);
        if st.pools[&id].held.is_empty() {
            self.forget_pool(&mut st, id);
        }
    }

    /// Removes a pool entry: its pods are no longer listed by it.
    fn forget_pool(self: &Arc<Self>, st: &mut State, id: PoolId) {
        let Some(pool) = st.pools.remove(&id) else {
            return;
        };
        st.views_version += 1;
        for addr in pool.members {
            self.unlist(st, id, addr);
        }
        self.dispatch(st);
    }

    fn unlist(&self, st: &mut State, id: PoolId, addr: SocketAddr) {
        let State { pods, pools, .. } = st;
        if let Some(pod) = pods.get_mut(&addr) {
            pod.listed_by.retain(|p| *p != id);
            lowest_limit(pools, pod);
            if pod.listed_by.is_empty() && pod.inflight == 0 {
                pods.remove(&addr);
            }
        }
    }

    /// Replaces a pool's pod list. New pods are usable at once (queued requests start on
    /// them); removed pods get no new request from this pool, and their requests in flight keep
    /// counting against the pod's cap until they finish, also if the address comes back.
    pub(super) fn set_members(
        self: &Arc<Self>,
        id: PoolId,
        addrs: &BTreeSet<SocketAddr>,
    ) -> PodChange {
        let mut change = PodChange::default();
        let mut st = self.lock();
        st.views_version += 1;
        let Some(pool) = st.pools.get_mut(&id) else {
            return change;
        };
        let old = std::mem::replace(&mut pool.members, addrs.iter().copied().collect());
        for addr in &old {
            if !addrs.contains(addr) {
                self.unlist(&mut st, id, *addr);
                change.removed.push(*addr);
            }
        }
        let State { pods, pools, .. } = &mut *st;
        for addr in addrs {
            if old.binary_search(addr).is_err() {
                let pod = pods.entry(*addr).or_insert_with(Pod::new);
                pod.listed_by.push(id);
                lowest_limit(pools, pod);
                change.added.push(*addr);
            }
        }
        Self::refuse_tried_out(&mut st, id);
        self.dispatch(&mut st);
        change
    }

    /// Answers [`QueueError::NoUntriedPod`] to the pool's waiters (retries after a failed
    /// connect) that have now tried every pod the pool has: their untried pods left, and none
    /// of the pods left may be tried again, so waiting could only end in a timeout.
    fn refuse_tried_out(st: &mut State, id: PoolId) {
        let Some(pool) = st.pools.get_mut(&id) else {
            return;
        };
        let PoolState {
            waiters,
            members,
            closed,
            dropped,
            ..
        } = pool;
        let tried_out =
            waiters.take_groups(|tried| !*closed && !*dropped && tried_every_pod(members, tried));
        st.waiting -= tried_out.len();
        for w in tried_out {
            let _ = w.tx.send(Err(QueueError::NoUntriedPod));
        }
    }

    /// Changes a pool's limit. Lowering it stops new requests above the new cap while those in
    /// flight finish; raising it starts queued requests at once.
    pub(super) fn set_limit(self: &Arc<Self>, id: PoolId, limit: usize) {
        let mut st = self.lock();
        st.views_version += 1;
        let State { pods, pools, .. } = &mut *st;
        let Some(pool) = pools.get_mut(&id) else {
            return;
        };
        pool.limit = limit;
        let members = pool.members.clone();
        for addr in &members {
            if let Some(pod) = pods.get_mut(addr) {
                lowest_limit(pools, pod);
            }
        }
        self.dispatch(&mut st);
    }

    pub(super) fn limit(&self, id: PoolId) -> usize {
        self.lock().pools.get(&id).map_or(0, |p| p.limit)
    }

    /// Stops the pool's queue for good: every waiting and future request of this pool gets
    /// [`QueueError::ShuttingDown`]. Requests holding a slot are not affected.
    pub(super) fn close(&self, id: PoolId) {
        let mut st = self.lock();
        let Some(pool) = st.pools.get_mut(&id) else {
            return;
        };
        pool.closed = true;
        Self::refuse_waiters(&mut st, id);
    }

    /// Answers every waiter of the pool with [`QueueError::ShuttingDown`] (the pool is closed or
    /// gone). Sending an error under the lock is safe: it carries no slot to drop.
    fn refuse_waiters(st: &mut State, id: PoolId) {
        let Some(pool) = st.pools.get_mut(&id) else {
            return;
        };
        let waiters = pool.waiters.take_all();
        st.waiting -= waiters.len();
        for w in waiters {
            let _ = w.tx.send(Err(QueueError::ShuttingDown));
        }
    }

    /// The pods a request of this pool may be sent to right now, best first (for Pingora's
    /// `BackendSelection`).
    pub(super) fn candidates(&self, id: PoolId) -> Vec<SocketAddr> {
        let st = self.lock();
        let Some(pool) = st.pools.get(&id) else {
            return Vec::new();
        };
        if pool.closed {
            return Vec::new();
        }
        let mut v: Vec<_> = ranked(&st.pods, pool, &[], Instant::now()).collect();
        // Stable: the rotation decides among ties.
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, a)| a).collect()
    }

    /// Takes one slot on `addr` for a request of pool `id` if the pod is in the pool's list and
    /// below its cap: the check and the take are one step under the lock. A newcomer may take
    /// any free slot: no waiter wants it (see the module doc).
    pub(super) fn try_take(self: &Arc<Self>, id: PoolId, addr: SocketAddr) -> Option<LocalSlot> {
        let mut st = self.lock();
        let pool = st.pools.get(&id)?;
        if pool.closed || pool.members.binary_search(&addr).is_err() {
            return None;
        }
        let pod = st.pods.get(&addr)?;
        if pod.inflight >= pod.limit {
            return None;
        }
        Some(self.take(&mut st, id, addr))
    }

    fn take(self: &Arc<Self>, st: &mut State, id: PoolId, addr: SocketAddr) -> LocalSlot {
        if let Some(pod) = st.pods.get_mut(&addr) {
            pod.inflight += 1;
            pod.requests += 1;
        }
        if let Some(pool) = st.pools.get_mut(&id) {
            *pool.held.entry(addr).or_default() += 1;
            pool.rotation = pool.rotation.wrapping_add(1);
        }
        LocalSlot {
            ledger: Arc::clone(self),
            pool: id,
            addr,
            taken: Some(Instant::now()),
            armed: true,
        }
    }

    /// Gives a slot back (also the undo of a take whose waiter was gone).
    fn untake(self: &Arc<Self>, st: &mut State, id: PoolId, addr: SocketAddr) {
        if let Some(pod) = st.pods.get_mut(&addr) {
            debug_assert!(pod.inflight > 0);
            pod.inflight = pod.inflight.saturating_sub(1);
            if pod.listed_by.is_empty() && pod.inflight == 0 {
                st.pods.remove(&addr);
            }
        } else {
            log::error!("ledger: released a slot on unknown pod {addr}");
        }
        let Some(pool) = st.pools.get_mut(&id) else {
            return;
        };
        if let Some(n) = pool.held.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                pool.held.remove(&addr);
            }
        }
        if pool.dropped && pool.held.is_empty() {
            self.forget_pool(st, id);
        }
    }

    fn release(self: &Arc<Self>, id: PoolId, addr: SocketAddr, held: Option<Duration>) {
        let mut st = self.lock();
        if let (Some(pool), Some(held)) = (st.pools.get_mut(&id), held) {
            if pool.recent_holds.len() == RECENT_HOLDS {
                pool.recent_holds.pop_front();
            }
            pool.recent_holds.push_back(held);
        }
        self.untake(&mut st, id, addr);
        self.dispatch(&mut st);
    }

    /// Hands free slots to the oldest waiters that may use them, until no waiter can be
    /// served. Called under the lock after every change that can free capacity.
    fn dispatch(self: &Arc<Self>, st: &mut State) {
        while st.waiting > 0 {
            let now = Instant::now();
            let mut best: Option<(u64, PoolId, SocketAddr)> = None;
            // The oldest waiter of each group of waiters that tried the same pods answers for
            // its group: if no pod is free for it, none is for the younger ones.
            for (id, pool) in &st.pools {
                for (tried, seq) in pool.waiters.groups() {
                    if best.is_some_and(|(s, _, _)| s < seq) {
                        continue;
                    }
                    if let Some(addr) = pick(&st.pods, pool, tried, now) {
                        best = Some((seq, *id, addr));
                    }
                }
            }
            let Some((seq, id, addr)) = best else {
                return;
            };
            let Some(w) = st.pools.get_mut(&id).and_then(|p| p.waiters.remove(seq)) else {
                return;
            };
            st.waiting -= 1;
            let slot = self.take(st, id, addr);
            if let Err(Ok(mut slot)) = w.tx.send(Ok(slot)) {
                // The waiter left a moment ago: undo here, the lock is held.
                slot.armed = false;
                self.untake(st, id, addr);
            }
        }
    }

    /// Takes a slot if one is free for this request, or queues it in arrival order: by
    /// `arrival`, the number it was given when it first waited (set here if it has none).
    pub(super) fn enqueue(
        self: &Arc<Self>,
        id: PoolId,
        tried: &[SocketAddr],
        max_waiting: usize,
        arrival: &mut Option<u64>,
    ) -> Result<Enqueued, QueueError> {
        let mut st = self.lock();
        let Some(pool) = st.pools.get(&id) else {
            return Err(QueueError::ShuttingDown);
        };
        pool.may_wait(tried)?;
        let full = pool.waiters.len() >= max_waiting;
        if let Some(addr) = pick(&st.pods, pool, tried, Instant::now()) {
            return Ok(Enqueued::Now(self.take(&mut st, id, addr)));
        }
        if full {
            return Err(QueueError::Full);
        }
        // A retry keeps the number it had; its first ticket left the queue when it was given
        // its slot, so the number is free (a new one if it is not, which cannot happen).
        let seq = match *arrival {
            Some(seq) if !st.pools.get(&id).is_some_and(|p| p.waiters.contains(seq)) => seq,
            _ => {
                let seq = st.next_seq;
                st.next_seq += 1;
                *arrival = Some(seq);
                seq
            }
        };
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            tx,
            since: tokio::time::Instant::now(),
        };
        if let Some(pool) = st.pools.get_mut(&id) {
            pool.waiters.insert(seq, tried, waiter);
        }
        st.waiting += 1;
        Ok(Enqueued::Wait(
            rx,
            WaitTicket {
                ledger: Arc::clone(self),
                pool: id,
                seq,
            },
        ))
    }

    /// Counts a slot that a shared ledger granted: the cap was checked there, across agents.
    /// This agent keeps its own count for its views, its metrics and the shutdown drain.
    pub(super) fn record(self: &Arc<Self>, id: PoolId, addr: SocketAddr) -> LocalSlot {
        let mut st = self.lock();
        st.pods.entry(addr).or_insert_with(Pod::new);
        self.take(&mut st, id, addr)
    }

    /// The pool's pods with their caps, for a shared ledger (which leaves out `tried` itself),
    /// read under the same lock as their version;
    /// `Err` when the request may not wait (closed, or every pod tried).
    pub(super) fn offer(&self, id: PoolId, tried: &[SocketAddr]) -> Result<AgentView, QueueError> {
        let st = self.lock();
        let pool = st.pools.get(&id).ok_or(QueueError::ShuttingDown)?;
        pool.may_wait(tried)?;
        let pods = pool
            .members
            .iter()
            .filter_map(|a| {
                let limit = st.pods.get(a)?.limit;
                Some((*a, u32::try_from(limit).unwrap_or(u32::MAX)))
            })
            .collect();
        Ok(AgentView::new(pods, st.views_version))
    }

    pub(super) fn has_untried(&self, id: PoolId, tried: &[SocketAddr]) -> bool {
        let st = self.lock();
        st.pools
            .get(&id)
            .is_some_and(|p| p.members.iter().any(|a| !tried.contains(a)))
    }

    pub(super) fn has_pods(&self, id: PoolId) -> bool {
        let st = self.lock();
        st.pools.get(&id).is_some_and(|p| !p.members.is_empty())
    }

    fn report(&self, addr: SocketAddr, event: PodEvent) {
        if let Some(p) = self.lock().pods.get_mut(&addr) {
            match event {
                PodEvent::Connected => p.last_connect_failure = None,
                PodEvent::ConnectFailed => {
                    p.last_connect_failure = Some(Instant::now());
                    p.connect_failures += 1;
                }
                PodEvent::TimedOut => p.last_timeout = Some(Instant::now()),
            }
        }
    }

    pub(super) fn view(&self, id: PoolId) -> PoolView {
        let st = self.lock();
        let Some(pool) = st.pools.get(&id) else {
            return PoolView::default();
        };
        let now = Instant::now();
        let mut addrs: Vec<SocketAddr> = pool.members.clone();
        addrs.extend(pool.held.keys().filter(|a| !pool.members.contains(a)));
        addrs.sort();
        let pods = addrs
            .into_iter()
            .filter_map(|addr| {
                let p = st.pods.get(&addr)?;
                Some(PodView {
                    addr,
                    inflight: p.inflight,
                    limit: p.limit,
                    active: pool.members.binary_search(&addr).is_ok(),
                    recently_failed: p.recently_failed(now),
                    requests: p.requests,
                    connect_failures: p.connect_failures,
                })
            })
            .collect();
        PoolView {
            name: pool.name.clone(),
            limit: pool.limit,
            waiting: pool.waiters.len(),
            // Arrival order is key order: the first waiter is the oldest.
            oldest_wait: pool.waiters.oldest().map(|w| w.since.elapsed()),
            inflight: pool.held.values().sum(),
            longest_recent_hold: pool.recent_holds.iter().copied().max().unwrap_or_default(),
            pods,
        }
    }
}

/// One taken slot on one pod. Dropping it gives the slot back, exactly once, and hands it to
/// the oldest waiter that may use it.
#[derive(Debug)]
pub(super) struct LocalSlot {
    ledger: Arc<LocalLedger>,
    pool: PoolId,
    addr: SocketAddr,
    /// When the request took it; `None` once an asynchronous job holds it (a job's hold is
    /// not a request's duration, which the shutdown drain estimates from these).
    taken: Option<Instant>,
    /// False only for a take undone under the lock (its waiter was gone).
    armed: bool,
}

impl LocalSlot {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The pod accepted a connection: a refused connection no longer sends it last.
    pub fn connected(&self) {
        self.ledger.report(self.addr, PodEvent::Connected);
    }

    /// The pod refused a connection: for a while it goes last in every pool's choice.
    pub fn connect_failed(&self) {
        self.ledger.report(self.addr, PodEvent::ConnectFailed);
    }

    /// The pod made no progress on this request for `upstream_timeout`: for a while it goes
    /// last in every pool's choice, whether or not it accepts connections.
    pub fn timed_out(&self) {
        self.ledger.report(self.addr, PodEvent::TimedOut);
    }

    /// An asynchronous job holds the slot from now on: its hold is not counted as a request's.
    pub fn held_by_job(&mut self) {
        self.taken = None;
    }
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        if self.armed {
            self.ledger
                .release(self.pool, self.addr, self.taken.map(|t| t.elapsed()));
        }
    }
}
