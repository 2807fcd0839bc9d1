//! The choice of pod: least in-flight requests under the cap, as a Pingora `BackendSelection`.
//!
//! Pingora rebuilds the selector every time the pod list changes, so the selector keeps no
//! state of its own: the per-pod counters live in the [`Pool`] it reaches through
//! `BackendSelection::Config`, which survives rebuilds. The rebuild itself is where a new pod
//! list reaches the pool ([`Pool::set_pods`]), so the load balancer's membership and the slot
//! accounting can never disagree for long.
//!
//! [`Balancer::acquire`] puts it together: wait for a permit in the pool's FIFO queue, then
//! walk the pods least-loaded first and take the first one whose check-and-take succeeds.

use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::selection::{BackendIter, BackendSelection};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::config::QueuePolicy;
use crate::pool::{NoPod, Pool, QueueError, Slot};

/// Least in-flight selection. Always built with its pool as config.
pub struct LeastInFlight {
    pool: Arc<Pool>,
}

fn inet(b: &Backend) -> Option<SocketAddr> {
    match b.addr {
        PingoraAddr::Inet(a) => Some(a),
        _ => None,
    }
}

pub fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: PingoraAddr::Inet(addr),
        weight: 1,
        ext: Default::default(),
    }
}

impl BackendSelection for LeastInFlight {
    type Iter = Ranked;
    type Config = Arc<Pool>;

    fn build_with_config(backends: &BTreeSet<Backend>, pool: &Arc<Pool>) -> Self {
        let change = pool.set_pods(backends.iter().filter_map(inet));
        if !change.added.is_empty() || !change.removed.is_empty() {
            log::info!(
                "pool {}: pods now {:?} (added {:?}, removed {:?})",
                pool.name(),
                backends.iter().filter_map(inet).collect::<Vec<_>>(),
                change.added,
                change.removed
            );
        }
        LeastInFlight {
            pool: Arc::clone(pool),
        }
    }

    /// Only reachable if someone builds a `LoadBalancer<LeastInFlight>` without a pool: such a
    /// selector has a cap of 0 and never hands out a pod.
    fn build(_backends: &BTreeSet<Backend>) -> Self {
        LeastInFlight {
            pool: Pool::new("unconfigured", 0),
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ranked {
        let limit = self.pool.limit();
        let mut pods: Vec<_> = self
            .pool
            .pods()
            .into_iter()
            .filter(|p| p.active && p.inflight < limit)
            .collect();
        // Rotate the starting point so equally loaded pods take turns.
        if !pods.is_empty() {
            let start = self.pool.next_rotation() % pods.len();
            pods.rotate_left(start);
        }
        // Stable sort keeps the rotation among ties. A pod that just refused a connection
        // goes last, so a dead pod does not attract every first attempt.
        pods.sort_by_key(|p| (p.recently_failed, p.inflight));
        Ranked {
            backends: pods.into_iter().map(|p| backend(p.addr)).collect(),
            next: 0,
        }
    }
}

/// Pods below their cap, least loaded first, snapshotted when the iterator is made.
pub struct Ranked {
    backends: Vec<Backend>,
    next: usize,
}

impl BackendIter for Ranked {
    fn next(&mut self) -> Option<&Backend> {
        let b = self.backends.get(self.next);
        self.next += 1;
        b
    }
}

/// The pod list that discovery currently trusts, served to Pingora's `LoadBalancer`.
#[derive(Default)]
pub struct TrustedPods {
    pods: Mutex<BTreeSet<SocketAddr>>,
}

impl TrustedPods {
    pub fn new(pods: impl IntoIterator<Item = SocketAddr>) -> Arc<Self> {
        Arc::new(TrustedPods {
            pods: Mutex::new(pods.into_iter().collect()),
        })
    }

    pub fn set(&self, pods: BTreeSet<SocketAddr>) {
        *self.pods.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    pub fn get(&self) -> BTreeSet<SocketAddr> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct SharedDiscovery(Arc<TrustedPods>);

#[async_trait]
impl ServiceDiscovery for SharedDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((
            self.0.get().into_iter().map(backend).collect(),
            HashMap::new(),
        ))
    }
}

/// One pool behind Pingora's `LoadBalancer`.
pub struct Balancer {
    lb: LoadBalancer<LeastInFlight>,
    pool: Arc<Pool>,
    trusted: Arc<TrustedPods>,
}

impl Balancer {
    pub fn new(pool: Arc<Pool>) -> Balancer {
        let trusted = TrustedPods::new([]);
        let backends = Backends::new(Box::new(SharedDiscovery(Arc::clone(&trusted))));
        let lb = LoadBalancer::from_backends_with_config(backends, Some(Arc::clone(&pool)));
        Balancer { lb, pool, trusted }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Makes `pods` the pool's pod list (rebuilding the selector if it changed) and marks the
    /// pool as resolved.
    pub async fn set_pods(&self, pods: BTreeSet<SocketAddr>) {
        self.trusted.set(pods);
        // Our discovery cannot fail.
        let _ = self.lb.update().await;
        self.pool.mark_resolved();
    }

    pub fn trusted_pods(&self) -> BTreeSet<SocketAddr> {
        self.trusted.get()
    }

    /// Takes a slot on the least-loaded pod below its cap, waiting in the pool's FIFO queue
    /// when all are full. Pods in `tried` are skipped (retries never go back to a pod that
    /// failed). Dropping the future leaves the queue and takes nothing.
    pub async fn acquire(
        &self,
        policy: &QueuePolicy,
        deadline: tokio::time::Instant,
        tried: &[SocketAddr],
    ) -> Result<Slot, QueueError> {
        loop {
            let changed = self.pool.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !tried.is_empty() && self.pool.has_pods() && !self.pool.has_untried(tried) {
                return Err(QueueError::NoUntriedPod);
            }
            let permit = self.pool.wait_permit(policy, deadline).await?;
            let chosen = self.lb.select_with(b"", usize::MAX, |b, _healthy| {
                // Pingora's health flag is not used: pods come and go through DNS, and
                // connect failures are handled per request.
                inet(b).is_some_and(|a| !tried.contains(&a) && self.pool.try_take(a))
            });
            if let Some(a) = chosen.as_ref().and_then(inet) {
                permit.forget();
                return Ok(self.pool.slot(a));
            }
            match self.pool.no_pod_for(permit) {
                NoPod::PaidDebt => continue,
                NoPod::Returned => {
                    // Free capacity exists only on pods this request already tried: wait for a
                    // release or a pod-list change, then look again.
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Err(QueueError::Timeout);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 1, i], 8000))
    }

    fn q() -> QueuePolicy {
        QueuePolicy {
            max_waiting: 1000,
            timeout: Duration::from_secs(60),
        }
    }

    fn later() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(60)
    }

    async fn balancer(limit: usize, pods: &[u8]) -> Balancer {
        let b = Balancer::new(Pool::new("t", limit));
        b.set_pods(pods.iter().map(|i| addr(*i)).collect()).await;
        b
    }

    #[tokio::test(start_paused = true)]
    async fn picks_least_loaded_and_rotates_ties() {
        let b = balancer(3, &[1, 2, 3]).await;
        let mut slots = Vec::new();
        for _ in 0..3 {
            slots.push(b.acquire(&q(), later(), &[]).await.unwrap());
        }
        let mut first: Vec<_> = slots.iter().map(|s| s.addr()).collect();
        first.sort();
        assert_eq!(
            first,
            vec![addr(1), addr(2), addr(3)],
            "one per pod before any pod gets two"
        );
        // Free pod 2: it is now the only least-loaded pod.
        slots.retain(|s| s.addr() != addr(2));
        let s = b.acquire(&q(), later(), &[]).await.unwrap();
        assert_eq!(s.addr(), addr(2));
    }

    #[tokio::test(start_paused = true)]
    async fn tried_pods_are_skipped() {
        let b = balancer(1, &[1, 2]).await;
        let s = b.acquire(&q(), later(), &[addr(1)]).await.unwrap();
        assert_eq!(s.addr(), addr(2));
        drop(s);
        assert_eq!(
            b.acquire(&q(), later(), &[addr(1), addr(2)])
                .await
                .unwrap_err(),
            QueueError::NoUntriedPod
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_waits_for_an_untried_pod() {
        let b = Arc::new(balancer(1, &[1, 2]).await);
        let held = b.acquire(&q(), later(), &[addr(1)]).await.unwrap();
        assert_eq!(held.addr(), addr(2));
        // Only pod 1 is free, and it was tried: the request waits for pod 2.
        let b2 = Arc::clone(&b);
        let waiter = tokio::spawn(async move {
            b2.acquire(&q(), later(), &[addr(1)])
                .await
                .map(|s| s.addr())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        // Someone else can still use pod 1 meanwhile.
        let other = b.acquire(&q(), later(), &[]).await.unwrap();
        assert_eq!(other.addr(), addr(1));
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(addr(2)));
    }

    #[tokio::test(start_paused = true)]
    async fn pod_list_change_reaches_the_pool() {
        let b = balancer(2, &[1, 2]).await;
        assert_eq!(b.pool().available(), 4);
        b.set_pods([addr(2), addr(3), addr(4)].into_iter().collect())
            .await;
        assert_eq!(b.pool().available(), 6);
        let active: Vec<_> = b.pool().pods().iter().map(|p| p.addr).collect();
        assert_eq!(active, vec![addr(2), addr(3), addr(4)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Release(usize),
        SetPods(Vec<u8>),
        SetLimit(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            3 => (0usize..64).prop_map(Op::Release),
            1 => proptest::collection::vec(1u8..6, 0..5).prop_map(Op::SetPods),
            1 => (1usize..4).prop_map(Op::SetLimit),
        ]
    }

    proptest! {
        /// Whatever the interleaving of takes, releases, pod-list and limit changes: no active
        /// pod is ever taken above its cap, and once everything is released every free slot is
        /// usable again (nothing leaked, nothing double-counted).
        #[test]
        fn no_interleaving_exceeds_a_cap(ops in proptest::collection::vec(op(), 1..80)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
            rt.block_on(async {
                let b = balancer(2, &[1, 2, 3]).await;
                let mut limit = 2;
                let mut held: Vec<Slot> = Vec::new();
                for op in ops {
                    match op {
                        Op::Acquire => {
                            let soon = tokio::time::Instant::now() + Duration::from_millis(1);
                            if let Ok(s) = b.acquire(&q(), soon, &[]).await {
                                let pod = b.pool().pods().into_iter().find(|p| p.addr == s.addr()).unwrap();
                                prop_assert!(pod.active, "slot taken on a removed pod {}", pod.addr);
                                prop_assert!(pod.inflight <= limit, "pod {} at {} above cap {}", pod.addr, pod.inflight, limit);
                                held.push(s);
                            }
                        }
                        Op::Release(i) => {
                            if !held.is_empty() {
                                let i = i % held.len();
                                held.swap_remove(i);
                            }
                        }
                        Op::SetPods(p) => b.set_pods(p.iter().map(|i| addr(*i)).collect()).await,
                        Op::SetLimit(l) => {
                            limit = l;
                            b.pool().set_limit(l);
                        }
                    }
                    // A pod may sit above a lowered cap only with requests taken before the
                    // change; the take-time check above makes sure none was added there.
                    for p in b.pool().pods() {
                        let mine = held.iter().filter(|s| s.addr() == p.addr).count();
                        prop_assert_eq!(p.inflight, mine, "pod {} count matches held slots", p.addr);
                    }
                    let free: usize = b.pool().pods().iter().filter(|p| p.active).map(|p| limit.saturating_sub(p.inflight)).sum();
                    prop_assert!(b.pool().available() <= free, "permits never exceed free slots");
                }
                drop(held);
                let active = b.pool().pods().iter().filter(|p| p.active).count();
                prop_assert_eq!(b.pool().inflight(), 0);
                prop_assert_eq!(b.pool().available(), active * limit);
                Ok(())
            })?;
        }
    }
}
