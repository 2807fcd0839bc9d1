//! What the rest of the agent needs to know about a shutdown, apart from how it is run
//! ([`crate::shutdown`]): whether SIGTERM has come, when the drain ends, which requests may
//! still be started on a pod, and how many are being handled. The configuration in force
//! ([`crate::live`]) holds it and the drain reads it; it depends on neither.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long before the end of the grace period the queues are closed: time enough to write the
/// `503`s before the process exits.
pub const QUEUE_CLOSE_MARGIN: Duration = Duration::from_millis(500);

/// What the rest of the agent needs to know about a shutdown: whether it has begun (readiness,
/// keep-alive), and how many requests are being handled (the drain waits for them).
#[derive(Default)]
pub struct ShutdownState {
    stopping: AtomicBool,
    active: AtomicUsize,
    /// When the drain ends (the process exits at the latest), once it has begun.
    deadline: std::sync::Mutex<Option<Instant>>,
}

impl ShutdownState {
    /// True from SIGTERM on.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// SIGTERM has come (see [`crate::shutdown`]).
    pub fn begin(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The drain has begun and ends at `deadline`.
    pub fn drain_until(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    }

    /// Whether a request whose pool's recent requests took up to `hold()` may still be started
    /// on a pod: always, unless the drain has begun and the time left would not cover that
    /// plus the margin to answer. Decided when the request is handed its slot, not by a poll.
    /// `hold` is only asked during the drain: the pool's view costs more than the check.
    pub fn may_start(&self, hold: impl FnOnce() -> Duration) -> bool {
        if !self.stopping() {
            return true;
        }
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        deadline.is_none_or(|d| can_finish(d.saturating_duration_since(Instant::now()), hold()))
    }

    /// Counts a request as being handled until the guard is dropped. Slots and queue places
    /// alone miss the moments before a request reaches the queue and after it left it (writing
    /// a refusal), and exiting then would cut a request that was already accepted.
    pub fn request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(Arc::clone(self))
    }

    /// Requests being handled right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// A request being handled; see [`ShutdownState::request`].
pub struct ActiveRequest(Arc<ShutdownState>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The drain's one rule: a request that takes `hold` can be started with `left` to go, and
/// still be answered, when `left` covers `hold` plus [`QUEUE_CLOSE_MARGIN`].
pub fn can_finish(left: Duration, hold: Duration) -> bool {
    left >= hold + QUEUE_CLOSE_MARGIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_starts_during_the_drain_only_if_it_can_finish_with_a_margin() {
        let state = ShutdownState::default();
        let hold = Duration::from_millis(800);
        assert!(state.may_start(|| hold), "no shutdown");
        state.begin();
        assert!(state.may_start(|| hold), "the delay: no deadline yet");
        state.drain_until(Instant::now() + Duration::from_millis(1_250));
        assert!(
            !state.may_start(|| hold),
            "1.25 s left < 0.8 s + 0.5 s margin"
        );
        assert!(
            state.may_start(|| Duration::from_millis(500)),
            "1.25 s left >= 0.5 s + 0.5 s"
        );
        state.drain_until(Instant::now() - Duration::from_millis(1));
        assert!(!state.may_start(|| Duration::ZERO), "past the deadline");
    }
}
