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

use crate::live::Live;
use crate::selection::Balancer;

/// How long before the end of the grace period the queues are closed.
const QUEUE_CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// How often the drain watcher looks at the pools during shutdown (only then).
const DRAIN_POLL: Duration = Duration::from_millis(20);

pub struct DrainOnTerm {
    /// Every pool in force or still held by requests is drained (looked up afresh each time).
    pub live: Arc<Live>,
    /// Time from SIGTERM until Pingora stops its runtimes.
    pub grace: Duration,
}

fn drained(pools: &[Arc<Balancer>]) -> bool {
    pools
        .iter()
        .all(|b| b.pool().inflight() == 0 && b.pool().waiting() == 0)
}

fn drain(live: Arc<Live>, grace: Duration) {
    let start = Instant::now();
    let close_at = grace.saturating_sub(QUEUE_CLOSE_MARGIN);
    let mut closed = false;
    loop {
        let pools = live.all_pools();
        if drained(&pools) {
            log::info!("shutdown: drained after {:?}; exiting", start.elapsed());
            std::process::exit(0);
        }
        if start.elapsed() >= close_at {
            if !closed {
                let queued: usize = pools.iter().map(|b| b.pool().waiting()).sum();
                log::warn!(
                    "shutdown: grace period ending; answering {queued} queued requests with 503"
                );
                closed = true;
            }
            // Every round, not once: closing is idempotent and covers any pool seen late.
            for b in &pools {
                b.pool().close();
            }
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
                let pools = self.live.all_pools();
                let in_flight: usize = pools.iter().map(|b| b.pool().inflight()).sum();
                let queued: usize = pools.iter().map(|b| b.pool().waiting()).sum();
                log::info!(
                    "SIGTERM: no new connections; {in_flight} requests in flight and {queued} queued get up to {:?}",
                    self.grace
                );
                let live = Arc::clone(&self.live);
                let grace = self.grace;
                std::thread::spawn(move || drain(live, grace));
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}
