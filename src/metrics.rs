//! Prometheus metrics, in the default `prometheus` registry (the one pingora-prometheus
//! serves), exposed on the admin port at `/metrics`.
//!
//! Two kinds, kept apart on purpose:
//!
//! * **Events** (requests by outcome, request and queue-wait latency, config reloads) are
//!   counted where they happen, in the registered vectors of [`Metrics`].
//! * **State** (queue depth, per-pod in-flight, caps and request counts, discovery outcomes) is
//!   read from the live pools and discovery tasks by [`StateCollector`] each time the registry
//!   is gathered. Nothing of it is stored between scrapes, so two scrapes at once cannot see
//!   each other's half-written values, and a pod or pool that is gone (left the pod list and
//!   holds no request, or retired and released) simply has no series any more. The per-pod
//!   request and connect-failure counters are the pool's own per-pod counts, which the request
//!   path already keeps under the lock it takes anyway: no label lookup per request.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    register_histogram_vec, register_int_counter_vec, Encoder, GaugeVec, Histogram, HistogramVec,
    IntCounter, IntCounterVec, IntGaugeVec, Opts, TextEncoder,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, RwLock, Weak};

use crate::live::Live;

/// The event metrics. State metrics are not here: see [`StateCollector`].
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
    prometheus::register(Box::new(StateCollector::new()?))?;
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

/// What [`StateCollector`] samples. Weak: metrics must not keep a replaced config alive.
static SOURCE: RwLock<Weak<Live>> = RwLock::new(Weak::new());

/// Makes the state metrics sample `live` from now on (and registers the metrics).
pub fn sample_from(live: &Arc<Live>) {
    *SOURCE.write().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(live);
    get();
}

/// Renders the default registry as Prometheus text.
pub fn render() -> Vec<u8> {
    if let (Some(m), Some(live)) = (
        get(),
        SOURCE.read().unwrap_or_else(|e| e.into_inner()).upgrade(),
    ) {
        if let Some(redis) = live.ledger.redis() {
            let h = m.ledger_round_trip.with_label_values(&[] as &[&str]);
            for rtt in redis.take_round_trips() {
                h.observe(rtt.as_secs_f64());
            }
        }
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::gather(), &mut out) {
        log::error!("cannot encode metrics: {e}");
    }
    out
}

/// One scrape's state metrics. A fresh set is made for every scrape and dropped after it, so
/// concurrent scrapes share nothing.
struct Sample {
    queue_depth: IntGaugeVec,
    pod_inflight: IntGaugeVec,
    pod_limit: IntGaugeVec,
    pod_requests: IntCounterVec,
    pod_connect_failures: IntCounterVec,
    discovery_pods: IntGaugeVec,
    discovery_last_success: GaugeVec,
    discovery_errors: IntCounterVec,
    discovery_unstable: IntCounterVec,
    ledger_reachable: IntGaugeVec,
    ledger_errors: IntCounterVec,
    ledger_unreachable: IntCounterVec,
    ledger_epoch_changes: IntCounterVec,
    ledger_reasserted_over_limit: IntCounterVec,
    ledger_queue_depth: IntGaugeVec,
    ledger_pod_inflight: IntGaugeVec,
    ledger_leases_expired: IntCounterVec,
    jobs_held: IntGaugeVec,
    jobs_ended: IntCounterVec,
    response_buffer_bytes: IntGaugeVec,
    response_buffer_full: IntCounterVec,
}

impl Sample {
    fn new() -> Result<Sample, prometheus::Error> {
        Ok(Sample {
            queue_depth: IntGaugeVec::new(
                Opts::new(
                    "lb_queue_depth",
                    "Requests waiting for a free slot, per pool (scale the compute service on this)",
                ),
                &["pool"],
            )?,
            pod_inflight: IntGaugeVec::new(
                Opts::new("lb_pod_inflight", "Requests in flight per pod"),
                &["pool", "pod"],
            )?,
            pod_limit: IntGaugeVec::new(
                Opts::new("lb_pod_limit", "Per-pod cap"),
                &["pool", "pod"],
            )?,
            pod_requests: IntCounterVec::new(
                Opts::new("lb_pod_requests_total", "Requests sent to each pod"),
                &["pool", "pod"],
            )?,
            pod_connect_failures: IntCounterVec::new(
                Opts::new(
                    "lb_pod_connect_failures_total",
                    "Failed connection attempts per pod",
                ),
                &["pool", "pod"],
            )?,
            discovery_pods: IntGaugeVec::new(
                Opts::new(
                    "lb_discovery_pods",
                    "Pods in the trusted pod list per pool",
                ),
                &["pool"],
            )?,
            discovery_last_success: GaugeVec::new(
                Opts::new(
                    "lb_discovery_last_success_timestamp_seconds",
                    "Unix time of the last successful DNS resolution (0: none yet)",
                ),
                &["service"],
            )?,
            discovery_errors: IntCounterVec::new(
                Opts::new(
                    "lb_discovery_errors_total",
                    "Failed DNS resolutions (timeouts, SERVFAIL, unreachable server)",
                ),
                &["service"],
            )?,
            discovery_unstable: IntCounterVec::new(
                Opts::new(
                    "lb_discovery_unstable_answers_total",
                    "Changed DNS answers ignored because they did not repeat identically",
                ),
                &["service"],
            )?,
            ledger_reachable: IntGaugeVec::new(
                Opts::new(
                    "lb_ledger_reachable",
                    "1 while the shared ledger (Redis) answers, 0 while it does not",
                ),
                &[],
            )?,
            ledger_errors: IntCounterVec::new(
                Opts::new("lb_ledger_errors_total", "Failed calls to the shared ledger"),
                &[],
            )?,
            ledger_unreachable: IntCounterVec::new(
                Opts::new(
                    "lb_ledger_unreachable_episodes_total",
                    "Times the shared ledger became unreachable",
                ),
                &[],
            )?,
            ledger_epoch_changes: IntCounterVec::new(
                Opts::new(
                    "lb_ledger_epoch_changes_total",
                    "Times Redis restarted or failed over and this agent re-asserted its slots",
                ),
                &[],
            )?,
            ledger_reasserted_over_limit: IntCounterVec::new(
                Opts::new(
                    "lb_ledger_reasserted_over_limit_total",
                    "Leases this agent re-asserted after a Redis restart that put their pod \
                     above its limit (a slot was granted before the re-assertion; should stay 0)",
                ),
                &[],
            )?,
            ledger_queue_depth: IntGaugeVec::new(
                Opts::new(
                    "lb_ledger_queue_depth",
                    "Requests waiting per pool, all agents together (scale the compute service on this with several replicas)",
                ),
                &["pool"],
            )?,
            ledger_pod_inflight: IntGaugeVec::new(
                Opts::new(
                    "lb_ledger_pod_inflight",
                    "Requests in flight per pod, all agents together",
                ),
                &["pool", "pod"],
            )?,
            ledger_leases_expired: IntCounterVec::new(
                Opts::new(
                    "lb_ledger_leases_expired_total",
                    "Slots returned because their agent stopped renewing them (vanished agent)",
                ),
                &["pool"],
            )?,
            jobs_held: IntGaugeVec::new(
                Opts::new(
                    "lb_jobs_held",
                    "Asynchronous jobs holding their pod's slot (this agent's), per pod",
                ),
                &["pool", "pod"],
            )?,
            jobs_ended: IntCounterVec::new(
                Opts::new(
                    "lb_jobs_ended_total",
                    "Asynchronous jobs whose hold ended, by how (done, callback, cancelled, unknown_to_pod, pod_gone, timeout)",
                ),
                &["pool", "how"],
            )?,
            response_buffer_bytes: IntGaugeVec::new(
                Opts::new(
                    "lb_response_buffer_bytes",
                    "Bytes of pods' answers held for slow clients (bounded by client.response_buffer_total)",
                ),
                &[],
            )?,
            response_buffer_full: IntCounterVec::new(
                Opts::new(
                    "lb_response_buffer_full_total",
                    "Answers that fitted client.response_buffer but streamed because client.response_buffer_total was taken",
                ),
                &[],
            )?,
        })
    }

    fn parts(&self) -> [&dyn Collector; 21] {
        [
            &self.queue_depth,
            &self.pod_inflight,
            &self.pod_limit,
            &self.pod_requests,
            &self.pod_connect_failures,
            &self.discovery_pods,
            &self.discovery_last_success,
            &self.discovery_errors,
            &self.discovery_unstable,
            &self.ledger_reachable,
            &self.ledger_errors,
            &self.ledger_unreachable,
            &self.ledger_epoch_changes,
            &self.ledger_reasserted_over_limit,
            &self.ledger_queue_depth,
            &self.ledger_pod_inflight,
            &self.ledger_leases_expired,
            &self.jobs_held,
            &self.jobs_ended,
            &self.response_buffer_bytes,
            &self.response_buffer_full,
        ]
    }

    fn fill(&self, live: &Live) {
        self.response_buffer_bytes
            .with_label_values(&[] as &[&str])
            .set(crate::response_buffer::in_use() as i64);
        self.response_buffer_full
            .with_label_values(&[] as &[&str])
            .inc_by(crate::response_buffer::total_full());
        for job in live.jobs.view() {
            self.jobs_held
                .with_label_values(&[job.pool.as_str(), job.pod.as_str()])
                .inc();
        }
        for (pool, how, n) in live.jobs.ended() {
            self.jobs_ended
                .with_label_values(&[pool.as_str(), how.as_str()])
                .inc_by(n);
        }
        // Pools of the config in force and retired pools still in use; names are unique among
        // them (a reload that names a retired pool again revives that same pool).
        for b in live.all_pools() {
            let v = b.view();
            let name = v.name.as_str();
            self.queue_depth
                .with_label_values(&[name])
                .set(v.waiting as i64);
            self.discovery_pods
                .with_label_values(&[name])
                .set(b.trusted_pods().len() as i64);
            for pod in v.pods {
                let labels = [name, &pod.addr.to_string()];
                self.pod_inflight
                    .with_label_values(&labels)
                    .set(pod.inflight as i64);
                if pod.active {
                    self.pod_limit
                        .with_label_values(&labels)
                        .set(pod.limit as i64);
                }
                self.pod_requests
                    .with_label_values(&labels)
                    .inc_by(pod.requests);
                self.pod_connect_failures
                    .with_label_values(&labels)
                    .inc_by(pod.connect_failures);
            }
        }
        if let Some(redis) = live.ledger.redis() {
            // As of this agent's last keep-alive (at most a second old): a scrape never waits
            // for Redis.
            let s = redis.status();
            let none: &[&str] = &[];
            self.ledger_reachable
                .with_label_values(none)
                .set(i64::from(s.reachable));
            self.ledger_errors.with_label_values(none).inc_by(s.errors);
            self.ledger_unreachable
                .with_label_values(none)
                .inc_by(s.unreachable_episodes);
            self.ledger_epoch_changes
                .with_label_values(none)
                .inc_by(s.epoch_changes);
            self.ledger_reasserted_over_limit
                .with_label_values(none)
                .inc_by(s.reasserted_over_limit);
            for (pool, q) in &s.queues {
                self.ledger_queue_depth
                    .with_label_values(&[pool])
                    .set(q.waiting as i64);
                self.ledger_leases_expired
                    .with_label_values(&[pool])
                    .inc_by(q.leases_expired);
                for (pod, n) in &q.inflight {
                    self.ledger_pod_inflight
                        .with_label_values(&[pool.as_str(), &pod.to_string()])
                        .set(i64::from(*n));
                }
            }
        }
        for (host, stats) in live.discovery_stats() {
            let labels = [host.as_str()];
            self.discovery_last_success
                .with_label_values(&labels)
                .set(stats.last_success_unix.load(Ordering::Relaxed) as f64);
            self.discovery_errors
                .with_label_values(&labels)
                .inc_by(stats.errors.load(Ordering::Relaxed));
            self.discovery_unstable
                .with_label_values(&labels)
                .inc_by(stats.unstable_ignored.load(Ordering::Relaxed));
        }
    }
}

/// Samples pool and discovery state when the registry is gathered (see the module doc).
struct StateCollector {
    descs: Vec<Desc>,
}

impl StateCollector {
    fn new() -> Result<StateCollector, prometheus::Error> {
        let template = Sample::new()?;
        let descs = template
            .parts()
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        Ok(StateCollector { descs })
    }
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(live) = SOURCE.read().unwrap_or_else(|e| e.into_inner()).upgrade() else {
            return Vec::new();
        };
        let sample = match Sample::new() {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot sample state metrics: {e}");
                return Vec::new();
            }
        };
        sample.fill(&live);
        sample.parts().iter().flat_map(|c| c.collect()).collect()
    }
}
