//! Graceful shutdown on SIGTERM.
//!
//! Pingora, on SIGTERM, stops accepting new connections and then sleeps its grace period
//! unconditionally before stopping its runtimes. We keep that (in-flight requests finish, queued
//! ones keep being served as slots free), and add two things Pingora cannot know about:
//!
//! * shortly before the deadline the pools' queues are closed, so what is still queued gets a
//!   `503` with `Retry-After` instead of a dropped connection;
//! * as soon as nothing is in flight and nothing is queued, the process exits, so an idle agent
//!   rolls in a moment instead of waiting out the whole grace period.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

use crate::selection::Balancer;

/// How long before the end of the grace period the queues are closed.
const QUEUE_CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// How often the drain watcher looks at the pools during shutdown (only then).
const DRAIN_POLL: Duration = Duration::from_millis(20);

pub struct DrainOnTerm {
    pub pools: Vec<Arc<Balancer>>,
    /// Time from SIGTERM until Pingora stops its runtimes.
    pub grace: Duration,
}

fn drained(pools: &[Arc<Balancer>]) -> bool {
    pools
        .iter()
        .all(|b| b.pool().inflight() == 0 && b.pool().waiting() == 0)
}

fn drain(pools: Vec<Arc<Balancer>>, grace: Duration) {
    let start = Instant::now();
    let close_at = grace.saturating_sub(QUEUE_CLOSE_MARGIN);
    let mut closed = false;
    loop {
        if drained(&pools) {
            log::info!("shutdown: drained after {:?}; exiting", start.elapsed());
            std::process::exit(0);
        }
        if !closed && start.elapsed() >= close_at {
            let queued: usize = pools.iter().map(|b| b.pool().waiting()).sum();
            log::warn!(
                "shutdown: grace period ending; answering {queued} queued requests with 503"
            );
            for b in &pools {
                b.pool().close();
            }
            closed = true;
        }
        std::thread::sleep(DRAIN_POLL);
    }
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
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = term.recv() => {
                let in_flight: usize = self.pools.iter().map(|b| b.pool().inflight()).sum();
                let queued: usize = self.pools.iter().map(|b| b.pool().waiting()).sum();
                log::info!(
                    "SIGTERM: no new connections; {in_flight} requests in flight and {queued} queued get up to {:?}",
                    self.grace
                );
                let pools = self.pools.clone();
                let grace = self.grace;
                std::thread::spawn(move || drain(pools, grace));
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}
