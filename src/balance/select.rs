//! Pingora's side of the choice: least in flight under the cap, as a `BackendSelection`.
//!
//! Pingora rebuilds the selector every time the pod list changes, so the selector keeps no
//! state of its own: it reaches the [`Ledger`] through its `BackendSelection::Config` (a
//! [`PoolHandle`]), which survives rebuilds. The rebuild is also where a new pod list reaches
//! the ledger, so the load balancer's membership and the slot accounting never disagree.

use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::selection::{BackendIter, BackendSelection};
use pingora::lb::Backend;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::ledger::{LocalLedger, PoolId};

/// A pool's entry in the ledger; the entry is dropped with the last handle.
#[derive(Debug)]
pub(super) struct PoolHandle {
    pub ledger: Arc<LocalLedger>,
    pub id: PoolId,
    pub name: String,
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.ledger.drop_pool(self.id);
    }
}

pub(super) fn inet(b: &Backend) -> Option<SocketAddr> {
    match b.addr {
        PingoraAddr::Inet(a) => Some(a),
        _ => None,
    }
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: PingoraAddr::Inet(addr),
        weight: 1,
        ext: Default::default(),
    }
}

/// Least in-flight selection. Always built with its pool's handle as config.
pub(super) struct LeastInFlight {
    pool: Option<Arc<PoolHandle>>,
}

impl BackendSelection for LeastInFlight {
    type Iter = Ranked;
    type Config = Arc<PoolHandle>;

    fn build_with_config(backends: &BTreeSet<Backend>, pool: &Arc<PoolHandle>) -> Self {
        let addrs: BTreeSet<SocketAddr> = backends.iter().filter_map(inet).collect();
        let change = pool.ledger.set_members(pool.id, &addrs);
        if !change.added.is_empty() || !change.removed.is_empty() {
            log::info!(
                "pool {}: pods now {:?} (added {:?}, removed {:?})",
                pool.name,
                addrs,
                change.added,
                change.removed
            );
        }
        LeastInFlight {
            pool: Some(Arc::clone(pool)),
        }
    }

    /// Only reachable if someone builds a `LoadBalancer<LeastInFlight>` without a pool: such a
    /// selector never hands out a pod.
    fn build(_backends: &BTreeSet<Backend>) -> Self {
        LeastInFlight { pool: None }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Ranked {
        Ranked {
            pods: self
                .pool
                .as_ref()
                .map(|p| p.ledger.candidates(p.id))
                .unwrap_or_default()
                .into_iter(),
            current: None,
        }
    }
}

/// Pods below their cap, least loaded first, snapshotted when the iterator is made. A
/// `Backend` is built only for the pods actually offered (usually one).
pub(super) struct Ranked {
    pods: std::vec::IntoIter<SocketAddr>,
    current: Option<Backend>,
}

impl BackendIter for Ranked {
    fn next(&mut self) -> Option<&Backend> {
        self.current = self.pods.next().map(backend);
        self.current.as_ref()
    }
}

/// The pod list that discovery currently trusts, served to Pingora's `LoadBalancer`.
#[derive(Default)]
pub(super) struct TrustedPods {
    pods: Mutex<BTreeSet<SocketAddr>>,
}

impl TrustedPods {
    pub fn set(&self, pods: BTreeSet<SocketAddr>) {
        *self.pods.lock().unwrap_or_else(|e| e.into_inner()) = pods;
    }

    pub fn get(&self) -> BTreeSet<SocketAddr> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(super) struct SharedDiscovery(pub Arc<TrustedPods>);

#[async_trait]
impl ServiceDiscovery for SharedDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((
            self.0.get().into_iter().map(backend).collect(),
            HashMap::new(),
        ))
    }
}
