//! Event metrics, in the default `prometheus` registry (the one pingora-prometheus serves),
//! exposed on the admin port at `/metrics` by [`crate::state_metrics::render`].
//!
//! Two kinds of metrics, kept apart on purpose:
//!
//! * **Events** (requests by outcome, request and queue-wait latency, config reloads) are
//!   counted where they happen, in the registered vectors of [`Metrics`] (this module).
//! * **State** (queue depth, per-pod in-flight, caps, discovery outcomes) is read from the
//!   configuration in force each time the registry is gathered ([`crate::state_metrics`]).
//!
//! Events are counted by modules the configuration in force is made of (routes, jobs,
//! reloads), while the state is read from it, so the two live on either side of
//! [`crate::live`].

use prometheus::{
    register_histogram_vec, register_int_counter_vec, Histogram, HistogramVec, IntCounter,
    IntCounterVec,
};
use std::sync::LazyLock;

/// The event metrics. State metrics are not here: see [`crate::state_metrics`].
pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_wait: HistogramVec,
    pub config_reloads: IntCounterVec,
    /// Round trips to the shared ledger, fed from the ledger's samples at each scrape.
    pub ledger_round_trip: HistogramVec,
    /// How long asynchronous jobs held their slot, from the `202` to the end of the hold.
    pub job_duration: HistogramVec,
}

/// Buckets for ledger round trips: a loopback or in-cluster Redis answers in well under 1 ms.
const LEDGER_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// One route's event metrics for the usual outcome, looked up once (on the route's first
/// request) rather than on every request: a label lookup hashes the labels and takes the
/// vector's lock, which on a one-thread agent costs more than the counting itself. The handles
/// share their series with the vectors, so nothing changes in what `/metrics` shows.
pub struct RouteMetrics {
    pub ok: IntCounter,
    pub request_duration: Histogram,
    pub queue_wait: Histogram,
}

impl Metrics {
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            ok: self.requests.with_label_values(&[route, "ok"]),
            request_duration: self.request_duration.with_label_values(&[route]),
            queue_wait: self.queue_wait.with_label_values(&[route]),
        }
    }
}

/// Buckets for requests that take from milliseconds to many minutes.
const SLOW_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

fn build() -> Result<Metrics, prometheus::Error> {
    let m = Metrics {
        requests: register_int_counter_vec!(
            "lb_requests_total",
            "Requests by route and outcome (ok, pod_error, upstream_error, pod_timeout, queue_timeout, queue_full, client_gone, no_route, shutting_down, bad_request, deadline_exceeded)",
            &["route", "outcome"]
        )?,
        request_duration: register_histogram_vec!(
            "lb_request_duration_seconds",
            "Time from request start to the end of the response, queue wait included",
            &["route"],
            SLOW_BUCKETS.to_vec()
        )?,
        queue_wait: register_histogram_vec!(
            "lb_queue_wait_seconds",
            "Time requests spent waiting for a free slot",
            &["route"],
            SLOW_BUCKETS.to_vec()
        )?,
        config_reloads: register_int_counter_vec!(
            "lb_config_reloads_total",
            "Config reloads by result (applied, rejected: the running config stayed in force)",
            &["result"]
        )?,
        ledger_round_trip: register_histogram_vec!(
            "lb_ledger_round_trip_seconds",
            "Round trips of calls to the shared ledger (Redis), as the agent measured them",
            &[],
            LEDGER_BUCKETS.to_vec()
        )?,
        job_duration: register_histogram_vec!(
            "lb_job_duration_seconds",
            "How long asynchronous jobs held their pod's slot, from the 202 to the end of the hold (ended at this agent)",
            &["pool"],
            SLOW_BUCKETS.to_vec()
        )?,
    };
    Ok(m)
}

static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match build() {
    Ok(m) => Some(m),
    Err(e) => {
        log::error!("metrics disabled: {e}");
        None
    }
});

/// The metrics, or `None` if registration failed (logged once; the proxy works without them).
pub fn get() -> Option<&'static Metrics> {
    METRICS.as_ref()
}
