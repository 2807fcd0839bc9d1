//! Prometheus metrics, in the default `prometheus` registry (the one pingora-prometheus
//! serves), exposed on the admin port at `/metrics`.
//!
//! Event metrics (requests, waits, failures, DNS outcomes) are recorded where they happen.
//! State metrics (queue depth, in-flight, limits, pod counts) are sampled from the pools at
//! scrape time, so they can never drift from the truth.

use prometheus::{
    register_gauge_vec, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
    Encoder, GaugeVec, HistogramVec, IntCounterVec, IntGaugeVec, TextEncoder,
};
use std::sync::{Arc, LazyLock};

use crate::selection::Balancer;

pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_wait: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub pod_inflight: IntGaugeVec,
    pub pod_limit: IntGaugeVec,
    pub pod_requests: IntCounterVec,
    pub pod_connect_failures: IntCounterVec,
    pub discovery_pods: IntGaugeVec,
    pub discovery_last_success: GaugeVec,
    pub discovery_errors: IntCounterVec,
    pub discovery_unstable: IntCounterVec,
    pub config_reloads: IntCounterVec,
}

/// Buckets for requests that take from milliseconds to many minutes.
const SLOW_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
];

fn build() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        requests: register_int_counter_vec!(
            "lb_requests_total",
            "Requests by route and outcome (ok, upstream_error, queue_timeout, queue_full, client_gone, no_route, shutting_down)",
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
        queue_depth: register_int_gauge_vec!(
            "lb_queue_depth",
            "Requests waiting for a free slot, per pool (scale the compute service on this)",
            &["pool"]
        )?,
        pod_inflight: register_int_gauge_vec!("lb_pod_inflight", "Requests in flight per pod", &["pool", "pod"])?,
        pod_limit: register_int_gauge_vec!("lb_pod_limit", "Per-pod cap", &["pool", "pod"])?,
        pod_requests: register_int_counter_vec!("lb_pod_requests_total", "Requests sent to each pod", &["pool", "pod"])?,
        pod_connect_failures: register_int_counter_vec!(
            "lb_pod_connect_failures_total",
            "Failed connection attempts per pod",
            &["pool", "pod"]
        )?,
        discovery_pods: register_int_gauge_vec!("lb_discovery_pods", "Pods in the trusted pod list per pool", &["pool"])?,
        discovery_last_success: register_gauge_vec!(
            "lb_discovery_last_success_timestamp_seconds",
            "Unix time of the last successful DNS resolution",
            &["service"]
        )?,
        discovery_errors: register_int_counter_vec!(
            "lb_discovery_errors_total",
            "Failed DNS resolutions (timeouts, SERVFAIL, unreachable server)",
            &["service"]
        )?,
        discovery_unstable: register_int_counter_vec!(
            "lb_discovery_unstable_answers_total",
            "Changed DNS answers ignored because they did not repeat identically",
            &["service"]
        )?,
        config_reloads: register_int_counter_vec!(
            "lb_config_reloads_total",
            "Config reloads by result (applied, rejected: the running config stayed in force)",
            &["result"]
        )?,
    })
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

/// Samples pool state into the gauges and renders the default registry as Prometheus text.
pub fn render(pools: &[Arc<Balancer>]) -> Vec<u8> {
    if let Some(m) = get() {
        // Reset first: a pool or pod that is gone must not leave its last value behind.
        m.pod_inflight.reset();
        m.pod_limit.reset();
        m.queue_depth.reset();
        m.discovery_pods.reset();
        for b in pools {
            let p = b.pool();
            let limit = p.limit() as i64;
            m.queue_depth
                .with_label_values(&[p.name()])
                .set(p.waiting() as i64);
            m.discovery_pods
                .with_label_values(&[p.name()])
                .set(b.trusted_pods().len() as i64);
            for pod in p.pods() {
                let pod_label = pod.addr.to_string();
                m.pod_inflight
                    .with_label_values(&[p.name(), &pod_label])
                    .set(pod.inflight as i64);
                if pod.active {
                    m.pod_limit
                        .with_label_values(&[p.name(), &pod_label])
                        .set(limit);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::gather(), &mut out) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}
