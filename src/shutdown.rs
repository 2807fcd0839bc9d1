//! Graceful shutdown on SIGTERM, in two phases.
//!
//! 1. **Delay** (`shutdown_delay`). In Kubernetes the pod's removal from the Service's endpoints
//!    reaches kube-proxy on every node some time *after* the kubelet sent SIGTERM; a process that
//!    stops accepting at once makes clients see "connection refused" during every rollout. So
//!    for the delay lb-agent keeps accepting and serving as usual, answers `/readyz` with 503
//!    (for anything that still routes by readiness), and asks HTTP/1.1 clients to close their
//!    kept-alive connections after each response, so their next request opens a new connection
//!    that the updated kube-proxy sends to another replica. This is done in the process, not with
//!    a `preStop` sleep in the manifest: it needs no shell or Kubernetes version, works the same
//!    under `docker stop`, is covered by the test suite, and the agent can tell clients and
//!    probes that it is leaving while it waits.
//! 2. **Drain** (`shutdown_grace`). Only then is Pingora told to terminate: it stops its
//!    listeners and closes idle connections. Requests in flight and queued keep being served;
//!    the process exits as soon as none is left, and at exactly `shutdown_grace` after the drain
//!    began at the latest. Pingora's own grace period is set longer than ours (see
//!    [`pingora_grace_secs`]), so the deadline is this module's, to the millisecond, and not
//!    Pingora's whole seconds.
//!
//! Every request accepted before the drain thus gets the full `shutdown_grace` (a request in
//! flight at SIGTERM gets `shutdown_delay + shutdown_grace`). The pod's
//! `terminationGracePeriodSeconds` must cover `shutdown_delay + shutdown_grace` (plus a second to
//! exit), or the kubelet's SIGKILL comes first.
//!
//! A request is only started on a pod while it can still finish: at the moment it is handed a
//! slot during the drain, the time left must cover what the pool's recent requests took
//! ([`crate::balance::PoolView::longest_recent_hold`]) plus
//! [`crate::stopping::QUEUE_CLOSE_MARGIN`] to write the answer
//! ([`crate::stopping::ShutdownState::may_start`]); otherwise it gets a `503` with
//! `Retry-After` and can be retried on another replica at once, instead of starting work on a
//! pod only to be cut at the deadline without a response. The same rule closes a pool's queue
//! (checked every [`DRAIN_POLL`]), so what still waits is answered promptly. A request that was
//! started keeps its slot and runs until the deadline like any other request in flight.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

use crate::balance::Balancer;
use crate::live::Live;
use crate::stopping::can_finish;

/// How often the drain watcher looks at the pools during shutdown (only then).
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Whole seconds Pingora waits after its grace period for its runtimes to stop. Only a
/// backstop: the drain thread exits the process before Pingora's grace period ends.
pub const PINGORA_RUNTIME_SHUTDOWN_SECS: u64 = 1;

/// Pingora's `grace_period_seconds` for our grace: whole seconds, rounded up, plus one, so that
/// Pingora never stops its runtimes (cutting every request) before our own deadline.
pub fn pingora_grace_secs(grace: Duration) -> u64 {
    grace.as_secs() + u64::from(grace.subsec_nanos() > 0) + 1
}

pub struct DrainOnTerm {
    /// Every pool in force or still held by requests is drained (looked up afresh each time).
    pub live: Arc<Live>,
    /// Time from SIGTERM until the listeners close (`shutdown_delay`).
    pub delay: Duration,
    /// Time from the listeners' close until the process exits at the latest (`shutdown_grace`).
    pub grace: Duration,
}

/// Nothing is waiting and nothing is in flight but asynchronous jobs: those run on their
/// pods, not in this agent, so the drain does not wait for them (with a shared ledger their
/// leases expire after the agent exits; in-process, their holds end with it).
fn drained(live: &Live, pools: &[Arc<Balancer>]) -> bool {
    live.shutdown.active() == 0
        && pools.iter().all(|b| {
            let v = b.view();
            v.waiting == 0 && v.inflight <= live.jobs.held_in(b.name())
        })
}

fn drain(live: Arc<Live>, grace: Duration, start: Instant) {
    let deadline = start + grace;
    let mut closed: HashSet<String> = HashSet::new();
    loop {
        let pools = live.all_pools();
        if drained(&live, &pools) {
            log::info!("shutdown: drained after {:?}; exiting", start.elapsed());
            leave_shared_ledger(&live);
            std::process::exit(0);
        }
        let now = Instant::now();
        if now >= deadline {
            let in_flight: usize = pools.iter().map(|b| b.view().inflight).sum();
            log::warn!(
                "shutdown: grace period of {grace:?} over; exiting with {in_flight} requests still in flight"
            );
            leave_shared_ledger(&live);
            std::process::exit(0);
        }
        let left = deadline - now;
        for b in &pools {
            let v = b.view();
            if can_finish(left, v.longest_recent_hold) {
                continue;
            }
            if closed.insert(v.name.clone()) {
                log::warn!(
                    "shutdown: {left:?} left, recent requests on {} took up to {:?}; answering its {} queued requests with 503",
                    v.name,
                    v.longest_recent_hold,
                    v.waiting
                );
            }
            // Every round, not once: closing is idempotent and covers any pool seen late.
            b.close();
        }
        // Never sleep past the deadline: the grace ends when configured, not a poll later.
        std::thread::sleep(DRAIN_POLL.min(left));
    }
}

/// The longest an exiting agent waits for the shared ledger to hear its last releases.
const LEDGER_EXIT_WAIT: Duration = Duration::from_secs(1);

/// Before exiting on purpose, gives the shared ledger back what this agent holds, so the other
/// replicas' waiters get the pods at once rather than after `lease_ttl`: its queue places, the
/// releases still on their way, and the slots of requests the deadline cuts on pools whose
/// routes all say `client_abort: cancel` (those pods stop when their client leaves). A request
/// cut on a `finish` pool keeps its slot until `lease_ttl`: its pod may still be working on it.
fn leave_shared_ledger(live: &Live) {
    let Some(redis) = live.ledger.redis() else {
        return;
    };
    let snapshot = live.snapshot();
    let mut cancel: HashSet<String> = HashSet::new();
    let mut finish: HashSet<String> = HashSet::new();
    for r in snapshot.routes.iter() {
        let set = match r.client_abort {
            crate::config::ClientAbort::Cancel => &mut cancel,
            crate::config::ClientAbort::Finish => &mut finish,
        };
        set.insert(r.balancer.name().to_string());
    }
    let started = Instant::now();
    let released = redis.leave_before_exit_blocking(
        |q| cancel.contains(q) && !finish.contains(q),
        LEDGER_EXIT_WAIT,
    );
    log::info!(
        "shutdown: released {released} entries in the shared ledger in {:?}",
        started.elapsed()
    );
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
            _ = int.recv() => return ShutdownSignal::FastShutdown,
            _ = term.recv() => {}
        }
        self.live.shutdown.begin();
        log::info!(
            "SIGTERM: not ready; still accepting for {:?}, then draining for up to {:?}",
            self.delay,
            self.grace
        );
        // A second SIGTERM changes nothing; SIGINT still means "now".
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = int.recv() => return ShutdownSignal::FastShutdown,
        }
        let pools = self.live.all_pools();
        let views: Vec<_> = pools.iter().map(|b| b.view()).collect();
        let in_flight: usize = views.iter().map(|v| v.inflight).sum();
        let queued: usize = views.iter().map(|v| v.waiting).sum();
        log::info!(
            "shutdown: no new connections; {in_flight} requests in flight and {queued} queued get up to {:?}",
            self.grace
        );
        let live = Arc::clone(&self.live);
        let grace = self.grace;
        let start = Instant::now();
        live.shutdown.drain_until(start + grace);
        std::thread::spawn(move || drain(live, grace, start));
        ShutdownSignal::GracefulTerminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingora_grace_is_never_shorter_than_ours() {
        assert_eq!(pingora_grace_secs(Duration::ZERO), 1);
        assert_eq!(pingora_grace_secs(Duration::from_millis(1500)), 3);
        assert_eq!(pingora_grace_secs(Duration::from_secs(4)), 5);
        for ms in [1, 999, 1000, 1001, 29_999, 30_000] {
            let g = Duration::from_millis(ms);
            assert!(Duration::from_secs(pingora_grace_secs(g)) > g, "{g:?}");
        }
    }
}
