//! State metrics, sampled from the configuration in force at each scrape, and the `/metrics`
//! text (events and state together).
//!
//! **State** (queue depth, per-pod in-flight, caps and request counts, discovery outcomes,
//! the shared ledger's view, jobs held) is read from the live pools and discovery tasks by
//! [`StateCollector`] each time the registry is gathered. Nothing of it is stored between
//! scrapes, so two scrapes at once cannot see each other's half-written values, and a pod or
//! pool that is gone (left the pod list and holds no request, or retired and released) simply
//! has no series any more. The per-pod request and connect-failure counters are the pool's own
//! per-pod counts, which the request path already keeps under the lock it takes anyway: no
//! label lookup per request. The event metrics are in [`crate::metrics`].

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, RwLock, Weak};

use crate::live::Live;
use crate::metrics::get;

/// What [`StateCollector`] samples. Weak: metrics must not keep a replaced config alive.
static SOURCE: RwLock<Weak<Live>> = RwLock::new(Weak::new());

/// Whether the state collector is registered (once per process; logged if it cannot be).
static REGISTERED: LazyLock<bool> =
    LazyLock::new(
        || match StateCollector::new().and_then(|c| prometheus::register(Box::new(c))) {
            Ok(()) => true,
            Err(e) => {
                log::error!("state metrics disabled: {e}");
                false
            }
        },
    );

/// Makes the state metrics sample `live` from now on (and registers the metrics).
pub fn sample_from(live: &Arc<Live>) {
    *SOURCE.write().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(live);
    get();
    LazyLock::force(&REGISTERED);
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
