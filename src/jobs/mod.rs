//! Asynchronous jobs (a route's `async:`): a pod that answers a request with `202 Accepted` and
//! a `Location` has taken on a job that goes on after the answer. The job keeps the pod's slot,
//! so the cap, the queue and the balancing go on meaning what they say, until the job is done.
//!
//! * **The hold.** The request's [`Slot`] moves from the request into a [`Held`] job here when
//!   the `202` passes; dropping the `Held` gives the slot back (once, as for a request).
//! * **The handle.** The `Location` the client gets points at lb-agent (`/_lb/jobs/<token>`,
//!   see [`token`]): signed, it says which pod and path it stands for, so polls reach the job's
//!   pod from any replica sharing `LB_AGENT_JOB_KEY` and after a restart. Polls take no slot
//!   and never queue: the pod's work is the job, not the poll.
//! * **The end**, the first of: an answer about the job that the route's `done_when` calls
//!   final (lb-agent's own check every `check_interval`, a pod's `Retry-After` winning, or a
//!   client's poll passing through); `404`/`410` from the pod; a `DELETE` the pod accepted;
//!   the pod's completion callback (a `POST` to the URL lb-agent gave it in
//!   `lb-agent-job-callback` on the submission); the pod leaving discovery; `max_duration`.
//!
//! * **Across replicas** (`ledger.redis`): the hold is a lease in the shared ledger marked as
//!   the job's, with what is needed to go on asking about it ([`JobRecord`]). Reaping a
//!   vanished agent (killed, or restarted and so forgetful) does not free it: another agent
//!   of the pool adopts it within [`ADOPT_EVERY`] and goes on checking it. The end of a job
//!   seen at any agent (callback, cancel, final status) ends its hold wherever it is held.

pub mod token;
pub mod verdict;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::balance::shared::{JobHold, JobRecord, Lease, RedisLedger};
use crate::balance::Slot;
use crate::config::{AsyncJobs, JobIdInJson};
use crate::route::RouteEntry;
pub use token::{BadHandle, Handle, Keys, V2_START};
pub use verdict::{needs_body, verdict, Verdict};

/// Where the client's job handles live on lb-agent's port.
pub const PREFIX: &str = "/_lb/jobs/";
/// Where a pod reports a job done (`POST`).
pub const CALLBACK_PREFIX: &str = "/_lb/job-done/";
/// The request header that tells the pod where to report its job done.
pub const CALLBACK_HEADER: &str = "lb-agent-job-callback";
/// The largest status answer read to judge a JSON state.
const MAX_STATUS_BODY: usize = 1024 * 1024;
/// A callback that arrives before its `202` was passed on (a job shorter than the way back) is
/// remembered this long.
const EARLY_CALLBACK_MEMORY: Duration = Duration::from_secs(600);
/// At most this many such callbacks are remembered.
const MAX_EARLY_CALLBACKS: usize = 10_000;
/// How often an agent with a shared ledger looks for job holds whose agent vanished.
pub const ADOPT_EVERY: Duration = Duration::from_secs(1);
/// Job holds adopted per pool and round.
const ADOPT_AT_ONCE: usize = 32;

/// How a job's hold ended (the `how` label of `lb_agent_jobs_ended_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ended {
    /// An answer about the job that `done_when` calls final.
    Done,
    /// The pod's completion callback.
    Callback,
    /// A `DELETE` the pod accepted.
    Cancelled,
    /// The pod answered `404`/`410`: it does not know the job (any more).
    Unknown,
    /// The pod left discovery.
    PodGone,
    /// `max_duration` passed.
    Timeout,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Callback => "callback",
            Ended::Cancelled => "cancelled",
            Ended::Unknown => "unknown_to_pod",
            Ended::PodGone => "pod_gone",
            Ended::Timeout => "timeout",
        }
    }
}

/// What becomes of the slot of an `async` route's request whose client left while the pod
/// worked on it, once the pod's answer (`head`: its status and `Location`, if read) is
/// complete: a `202` is a job like any other, held until it is done; an answer that could not
/// be read may have been one, and is held until the callback, the pod's leaving or
/// `max_duration`; any other answer frees the slot.
pub fn after_client_left(
    jobs: Arc<Jobs>,
    route: Arc<RouteEntry>,
    job: u128,
    request_path: String,
) -> impl FnOnce(Slot, Option<(u16, Option<&str>)>) + Send {
    move |slot, head| {
        let Some(cfg) = route.async_jobs.clone() else {
            return;
        };
        let pod = slot.addr();
        match head {
            // A JSON job's id was in the body, which nobody read: its job may be running.
            Some((200..=202, _)) if cfg.job_id.is_some() => {
                log::warn!(
                    "pod {pod} accepted a request whose client left; its answer may name a job, so its slot is held until the job's callback or max_duration"
                );
                drop(jobs.hold(&route, &cfg, slot, job, None));
            }
            Some((202, Some(location))) if cfg.job_id.is_none() => {
                // A Location lb-agent cannot follow: the slot is given back (dropped here).
                let _ = jobs.accept(&route, &cfg, &mut Some(slot), job, location, &request_path);
            }
            Some(_) => drop(slot),
            None => {
                log::warn!(
                    "pod {pod}: the answer to a request whose client left could not be read; it may have accepted a job, so its slot is held until the job's callback or max_duration"
                );
                // Nobody waits for the marking: the client is gone.
                drop(jobs.hold(&route, &cfg, slot, job, None));
            }
        }
    }
}

/// A job holding its pod's slot.
struct Held {
    pod: SocketAddr,
    pool: String,
    route: String,
    since: Instant,
    /// Held for its `Drop`, which gives the slot back: the slot of the request that started
    /// the job, or one taken over from an agent that vanished (counted here from then on).
    _slot: Slot,
    checker: Option<tokio::task::AbortHandle>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = &self.checker {
            c.abort();
        }
    }
}

/// A held job, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldView {
    pub pool: String,
    pub route: String,
    pub pod: String,
    pub age_ms: u64,
}

pub struct Jobs {
    pub keys: Keys,
    /// The shared ledger, where holds outlive their agent.
    shared: Option<Arc<RedisLedger>>,
    held: Mutex<HashMap<u128, Held>>,
    early_callbacks: Mutex<HashMap<u128, Instant>>,
    ended: Mutex<HashMap<(String, Ended), u64>>,
}

impl Jobs {
    pub fn new(keys: Keys, shared: Option<Arc<RedisLedger>>) -> Arc<Jobs> {
        Arc::new(Jobs {
            keys,
            shared,
            held: Mutex::new(HashMap::new()),
            early_callbacks: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
        })
    }

    /// The `202` of job `job` on `route` is passing to its client: `slot` now belongs to the
    /// job, and lb-agent starts asking the pod about it at `path`. With no `path` (the pod may
    /// have accepted a job, but its answer could not be read), only the callback, the pod's
    /// leaving and `max_duration` end the hold. With a shared ledger, the returned task marks
    /// the hold there (where it outlives this agent): the `202` is passed on once it is done,
    /// so that an agent that dies right after cannot take the hold with it.
    pub fn hold(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        jobs: &AsyncJobs,
        mut slot: Slot,
        job: u128,
        path: Option<String>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        slot.held_by_job();
        let pod = slot.addr();
        let since = Instant::now();
        let record = slot.lease().map(|lease| {
            let record = JobRecord {
                job,
                deadline_unix_ms: unix_ms().saturating_add(
                    u64::try_from(jobs.max_duration.as_millis()).unwrap_or(u64::MAX),
                ),
                route: route.uri.clone(),
                path: path.clone(),
            };
            lease.hold_job(&record)
        });
        if !self.start(
            route,
            jobs,
            slot,
            job,
            path,
            since,
            since + jobs.max_duration,
        ) {
            return None;
        }
        record.map(|marking| {
            // Until it is written the lease is an ordinary one of this agent, which holds it
            // anyway.
            let registry = Arc::downgrade(self);
            tokio::spawn(async move {
                match marking.await {
                    Ok(JobHold::Held | JobHold::Later) => {}
                    Ok(JobHold::Done) => {
                        if let Some(jobs) = registry.upgrade() {
                            jobs.release(job, Ended::Callback);
                        }
                    }
                    Err(e) => log::warn!(
                        "job on pod {pod}: could not mark its hold in the shared ledger ({e}); if this agent vanishes, its slot comes free after lease_ttl"
                    ),
                }
            })
        })
    }

    /// A job hold whose agent vanished, adopted from the shared ledger.
    fn hold_adopted(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        jobs: &AsyncJobs,
        lease: Lease,
        record: JobRecord,
    ) {
        let pod = lease.addr();
        let mut slot = route.balancer.adopt(lease);
        slot.held_by_job();
        if let Some(h) = self.lock_held().get_mut(&record.job) {
            // This agent's own hold, orphaned while it was cut off from the ledger and adopted
            // back: the adopted lease is the job's now (the old one is gone from the ledger).
            h._slot = slot;
            return;
        }
        let left = Duration::from_millis(record.deadline_unix_ms.saturating_sub(unix_ms()));
        let now = Instant::now();
        let since = now
            .checked_sub(jobs.max_duration.saturating_sub(left))
            .unwrap_or(now);
        log::info!(
            "adopted a job on pod {pod} ({}) whose agent vanished; {left:?} left of its max_duration",
            route.balancer.name()
        );
        self.start(
            route,
            jobs,
            slot,
            record.job,
            record.path,
            since,
            now + left,
        );
    }

    /// Records the hold and starts its check; `false` when it cannot be held (reported done
    /// already, or its id taken).
    #[allow(clippy::too_many_arguments)]
    fn start(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        jobs: &AsyncJobs,
        hold: Slot,
        job: u128,
        path: Option<String>,
        since: Instant,
        deadline: Instant,
    ) -> bool {
        let pod = hold.addr();
        let pool = route.balancer.name().to_string();
        {
            // Under the lock a callback also takes: one that came first is seen here, one that
            // comes later finds the hold.
            let mut held = self.lock_held();
            if self.lock_early().remove(&job).is_some() {
                drop(held);
                self.count(&pool, Ended::Callback);
                log::info!("job on pod {pod} reported done before its 202 passed; slot freed");
                return false;
            }
            if held.contains_key(&job) {
                // Ids are 128 random bits: never happens, and if it did, the older job keeps
                // its slot and this one holds none.
                log::error!("job id drawn twice; the job on pod {pod} does not hold its slot");
                return false;
            }
            held.insert(
                job,
                Held {
                    pod,
                    pool: pool.clone(),
                    route: route.uri.clone(),
                    since,
                    _slot: hold,
                    checker: None,
                },
            );
        }
        let checker = tokio::spawn(check(
            Arc::downgrade(self),
            Arc::clone(route),
            jobs.clone(),
            job,
            pod,
            path,
            deadline,
        ));
        // The check is the one that ends a hold at `max_duration`: should it ever panic, the
        // hold ends then and there rather than never.
        let watch = checker.abort_handle();
        let registry = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Err(e) = checker.await {
                if e.is_panic() {
                    if let Some(jobs) = registry.upgrade() {
                        log::error!("the check of a job on pod {pod} panicked; its hold ends");
                        jobs.release(job, Ended::Timeout);
                    }
                }
            }
        });
        match self.lock_held().get_mut(&job) {
            Some(h) => h.checker = Some(watch),
            None => watch.abort(),
        }
        log::debug!("job accepted by pod {pod} ({pool}) holds its slot");
        true
    }

    /// With a shared ledger, every [`ADOPT_EVERY`]: adopts the job holds of the asynchronous
    /// routes' pools whose agent vanished, and checks them here from then on. `async_routes`
    /// gives the asynchronous routes in force (exact routes first, as the route table lists
    /// them), or `None` once the agent shuts down, which ends the task (its own holds are then
    /// left for another agent to adopt).
    pub async fn adopt_orphans(
        self: Arc<Self>,
        async_routes: impl Fn() -> Option<Vec<Arc<RouteEntry>>>,
    ) {
        let Some(redis) = self.shared.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(ADOPT_EVERY).await;
            let Some(routes) = async_routes() else { return };
            let mut pools = Vec::new();
            for route in &routes {
                let pool = route.balancer.name().to_string();
                if !pools.iter().any(|(p, _)| *p == pool) {
                    pools.push((pool, Arc::clone(route)));
                }
            }
            for (pool, route) in pools {
                let adopted = match redis.adopt_jobs(&pool, ADOPT_AT_ONCE).await {
                    Ok(a) => a,
                    Err(e) => {
                        log::debug!("adopting jobs of {pool}: {e}");
                        continue;
                    }
                };
                for (lease, record) in adopted {
                    // The route that accepted the job, if this agent has it; else the one
                    // that found it (same pool).
                    let own = routes
                        .iter()
                        .find(|r| r.uri == record.route)
                        .map_or_else(|| Arc::clone(&route), Arc::clone);
                    let Some(cfg) = own.async_jobs.clone() else {
                        continue;
                    };
                    self.hold_adopted(&own, &cfg, lease, record);
                }
            }
        }
    }

    /// A `202` from the pod of `slot` on `route`, naming its job at `location` (relative to
    /// `request_path`): job `job` takes the slot out of `slot`, and the client's handle is
    /// returned, with the task marking the hold in a shared ledger (see [`Jobs::hold`]).
    /// `None` (and `slot` left as it was) when lb-agent cannot reach that `Location`.
    pub fn accept(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        cfg: &AsyncJobs,
        slot: &mut Option<Slot>,
        job: u128,
        location: &str,
        request_path: &str,
    ) -> Option<(Handle, Option<tokio::task::JoinHandle<()>>)> {
        let pod = slot.as_ref()?.addr();
        let Some(path) = pod_path(location, pod, request_path) else {
            log::warn!(
                "pod {pod} accepted a job with a Location lb-agent cannot reach ({location}); its slot is not held"
            );
            return None;
        };
        Some(self.hold_for(route, cfg, slot.take()?, job, path, None))
    }

    /// A submission's JSON answer from the pod of `slot` names job `job` as `id` (see
    /// [`json_job_id`]): as [`Jobs::accept`], the status path being `spec`'s with the id in it
    /// (percent-encoded where it must be, see [`id_in_path`]). `None` for an id that names
    /// nothing lb-agent can ask about (empty, or absurdly long): the pod took a job all the
    /// same, so it holds the slot with no status path, until its callback, the pod's leaving
    /// or `max_duration`.
    pub fn accept_json(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        cfg: &AsyncJobs,
        spec: &JobIdInJson,
        slot: &mut Option<Slot>,
        job: u128,
        id: &str,
    ) -> Option<(Handle, Option<tokio::task::JoinHandle<()>>)> {
        let slot = slot.take()?;
        let Some(id) = id_in_path(id) else {
            log::warn!(
                "pod {} named a job with an empty id or one longer than {MAX_JSON_ID} bytes; its slot is held until the job's callback or max_duration",
                slot.addr()
            );
            drop(self.hold(route, cfg, slot, job, None));
            return None;
        };
        let path = spec.status.replacen(JobIdInJson::PLACEHOLDER, &id, 1);
        Some(self.hold_for(route, cfg, slot, job, path, Some(id)))
    }

    /// Job `job` on `route` takes `slot` and is asked about at `path` (see [`Jobs::hold`]):
    /// the client's handle for it, and the task marking the hold in a shared ledger.
    fn hold_for(
        self: &Arc<Self>,
        route: &Arc<RouteEntry>,
        cfg: &AsyncJobs,
        slot: Slot,
        job: u128,
        path: String,
        id: Option<String>,
    ) -> (Handle, Option<tokio::task::JoinHandle<()>>) {
        let handle = Handle {
            job,
            pod: slot.addr(),
            route: route.uri.clone(),
            path: path.clone(),
            id,
        };
        let marking = self.hold(route, cfg, slot, job, Some(path));
        (handle, marking)
    }

    /// The token a client uses for `handle`: in `/_lb/jobs/<token>`, or (a JSON job's) in
    /// place of the pod's id.
    pub fn token(&self, handle: &Handle) -> String {
        self.keys.mint(handle)
    }

    /// Where a client asks about `handle`: lb-agent's own path for it.
    pub fn location(&self, handle: &Handle) -> String {
        format!("{PREFIX}{}", self.token(handle))
    }

    /// Ends job `job`'s hold (its slot goes to the next waiter). `false` if it held nothing
    /// here (already ended, or held by another agent).
    pub fn release(self: &Arc<Self>, job: u128, how: Ended) -> bool {
        let held = self.lock_held().remove(&job);
        match held {
            Some(h) => {
                log::info!(
                    "job on pod {} ({}) ended after {:?}: {}; slot freed",
                    h.pod,
                    h.pool,
                    h.since.elapsed(),
                    how.as_str()
                );
                self.count(&h.pool, how);
                if let Some(m) = crate::metrics::get() {
                    m.job_duration
                        .with_label_values(&[h.pool.as_str()])
                        .observe(h.since.elapsed().as_secs_f64());
                }
                drop(h);
                // Its lease may have been adopted by another agent meanwhile (this one was cut
                // off from the ledger for a while): the job's end reaches it there too.
                self.end_elsewhere(job, how, false);
                true
            }
            None => {
                self.end_elsewhere(job, how, true);
                false
            }
        }
    }

    /// The job's end was seen here, but its hold is another agent's (or an adopted one's):
    /// it ends in the shared ledger, where the other agent's check will find it gone.
    fn end_elsewhere(self: &Arc<Self>, job: u128, how: Ended, count: bool) {
        let Some(redis) = self.shared.clone() else {
            return;
        };
        let jobs = Arc::downgrade(self);
        tokio::spawn(async move {
            match redis.end_job("-", job).await {
                Ok(Some(pool)) if count => {
                    log::info!(
                        "job held by another agent ({pool}) ended through this one: {}",
                        how.as_str()
                    );
                    if let Some(jobs) = jobs.upgrade() {
                        jobs.count(&pool, how);
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("could not end a job in the shared ledger: {e}"),
            }
        });
    }

    /// The pod's completion callback for `job`. One that comes before the `202` was passed on
    /// is kept for the hold that follows.
    pub fn callback(self: &Arc<Self>, job: u128) {
        let held = self.lock_held();
        if held.contains_key(&job) {
            drop(held);
            self.release(job, Ended::Callback);
            return;
        }
        drop(held);
        self.end_elsewhere(job, Ended::Callback, true);
        let mut early = self.lock_early();
        early.retain(|_, at| at.elapsed() < EARLY_CALLBACK_MEMORY);
        // A late callback (the hold had already ended) is remembered too, so the memory is
        // bounded: the oldest is forgotten first.
        if early.len() >= MAX_EARLY_CALLBACKS {
            if let Some(oldest) = early.iter().min_by_key(|(_, at)| **at).map(|(j, _)| *j) {
                early.remove(&oldest);
            }
        }
        early.insert(job, Instant::now());
    }

    /// Jobs held on `pool`'s pods (in its in-flight count, but run by the pods, not by this
    /// agent: the shutdown drain does not wait for them).
    pub fn held_in(&self, pool: &str) -> usize {
        self.lock_held().values().filter(|h| h.pool == pool).count()
    }

    pub fn view(&self) -> Vec<HeldView> {
        let mut v: Vec<HeldView> = self
            .lock_held()
            .values()
            .map(|h| HeldView {
                pool: h.pool.clone(),
                route: h.route.clone(),
                pod: h.pod.to_string(),
                age_ms: u64::try_from(h.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        v.sort_by(|a, b| (&a.pool, &a.pod, b.age_ms).cmp(&(&b.pool, &b.pod, a.age_ms)));
        v
    }

    /// Jobs ended, by pool and how.
    pub fn ended(&self) -> Vec<(String, Ended, u64)> {
        let mut v: Vec<_> = self
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((p, h), n)| (p.clone(), *h, *n))
            .collect();
        v.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        v
    }

    fn count(&self, pool: &str, how: Ended) {
        *self
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((pool.to_string(), how))
            .or_default() += 1;
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_early(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Instant>> {
        self.early_callbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Asks the pod about the job every `check_interval` (or its `Retry-After`) until the job
/// ends, the pod leaves discovery, or `max_duration` passes.
async fn check(
    jobs: Weak<Jobs>,
    route: Arc<RouteEntry>,
    cfg: AsyncJobs,
    job: u128,
    pod: SocketAddr,
    path: Option<String>,
    deadline: Instant,
) {
    let mut wait = cfg.check_interval;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait.min(left)).await;
        let Some(jobs) = jobs.upgrade() else { return };
        if Instant::now() >= deadline {
            jobs.release(job, Ended::Timeout);
            return;
        }
        if route.balancer.resolved() && !route.balancer.trusted_pods().contains(&pod) {
            jobs.release(job, Ended::PodGone);
            return;
        }
        wait = cfg.check_interval;
        let Some(path) = path.as_deref() else {
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match ask(pod, path, &cfg, route.upstream_timeout.min(left)).await {
            Ok(Verdict::Done) => {
                jobs.release(job, Ended::Done);
                return;
            }
            Ok(Verdict::Unknown) => {
                jobs.release(job, Ended::Unknown);
                return;
            }
            Ok(Verdict::Running { retry_after }) => {
                if let Some(r) = retry_after {
                    wait = r.clamp(Duration::from_millis(10), Duration::from_secs(3600));
                }
            }
            Err(e) => log::debug!("asking pod {pod} about a job at {path}: {e}"),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One status request to the pod, on a connection of its own (a check every few seconds does
/// not need the pool, and must not take a pooled connection from the requests).
async fn ask(
    pod: SocketAddr,
    path: &str,
    cfg: &AsyncJobs,
    timeout: Duration,
) -> Result<Verdict, String> {
    let asked = async {
        let stream = tokio::net::TcpStream::connect(pod)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, pod.to_string())
            .header(http::header::USER_AGENT, "lb-agent job check")
            .header(http::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = if needs_body(&cfg.done_when) {
            let collected = Limited::new(resp.into_body(), MAX_STATUS_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Some(collected.to_bytes())
        } else {
            None
        };
        Ok(verdict(
            &cfg.done_when,
            status,
            retry_after.as_deref(),
            body.as_deref(),
        ))
    };
    tokio::time::timeout(timeout, asked)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The path (and query) on `pod` that a pod's `Location` names: an absolute path, a path
/// relative to the request's (`request_path`), or an `http` URL whose authority is the pod's
/// address. `None` for anything else: lb-agent cannot reach it for the client.
pub fn pod_path(location: &str, pod: SocketAddr, request_path: &str) -> Option<String> {
    let path = resolve(location, pod, request_path)?;
    // What cannot be written as a request target cannot be asked about.
    path.parse::<http::uri::PathAndQuery>().ok()?;
    Some(path)
}

fn resolve(location: &str, pod: SocketAddr, request_path: &str) -> Option<String> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(location.to_string());
    }
    if let Ok(uri) = location.parse::<http::Uri>() {
        if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
            let port = authority.port_u16().unwrap_or(80);
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let same = scheme.eq_ignore_ascii_case("http")
                && port == pod.port()
                && host.parse::<std::net::IpAddr>().ok() == Some(pod.ip());
            return same.then(|| {
                uri.path_and_query()
                    .map_or("/".to_string(), |p| p.as_str().to_string())
            });
        }
    }
    if location.is_empty() || location.contains("://") || location.starts_with("//") {
        return None;
    }
    let dir = &request_path[..request_path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!(
        "{}{location}",
        if dir.is_empty() { "/" } else { dir }
    ))
}

/// The longest job id taken from a JSON answer.
const MAX_JSON_ID: usize = 256;

/// A job id as it stands in a path segment: RFC 3986 unreserved characters as they are, every
/// other byte percent-encoded (`a:b/c` → `a%3Ab%2Fc`), so any id the pod names can be asked
/// about. `None` for an empty id, one longer than [`MAX_JSON_ID`], or `.`/`..`.
pub fn id_in_path(id: &str) -> Option<String> {
    if id.is_empty() || id.len() > MAX_JSON_ID || id == "." || id == ".." {
        return None;
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// The id a submission's JSON answer names at `pointer`: a string, or a whole number (then in
/// decimal). `None`: no job is named there.
pub fn json_job_id(answer: &serde_json::Value, pointer: &str) -> Option<String> {
    match answer.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// A `v2` handle standing in a client's `path` for its job's id: the path before it, the
/// handle, the path after it. Only a segment that begins like a `v2` handle
/// ([`V2_START`]) and holds its `.` is taken for one.
pub fn handle_in_path(path: &str) -> Option<(&str, &str, &str)> {
    let mut from = 0;
    while let Some(i) = path[from..].find(V2_START) {
        let at = from + i;
        from = at + V2_START.len();
        if at == 0 || path.as_bytes()[at - 1] != b'/' {
            continue;
        }
        let end = path[at..].find('/').map_or(path.len(), |j| at + j);
        let token = &path[at..end];
        if token.contains('.') {
            return Some((&path[..at], token, &path[end..]));
        }
    }
    None
}

/// What a client's `/_lb/jobs/<token><suffix>?<query>` asks of the pod: the handle's path with
/// `suffix` appended (`/result` next to a job's status), and the client's query if it gave one.
pub fn pod_uri(handle: &Handle, suffix: &str, query: Option<&str>) -> String {
    let (path, own_query) = match handle.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (handle.path.as_str(), None),
    };
    let mut uri = if suffix.is_empty() {
        path.to_string()
    } else {
        format!("{}{suffix}", path.trim_end_matches('/'))
    };
    match query.or(if suffix.is_empty() { own_query } else { None }) {
        Some(q) if !q.is_empty() => {
            uri.push('?');
            uri.push_str(q);
        }
        _ => {}
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_is_followed_only_to_the_pod() {
        let pod: SocketAddr = "10.0.0.7:20109".parse().unwrap();
        assert_eq!(
            pod_path("/tasks/1", pod, "/submit").as_deref(),
            Some("/tasks/1")
        );
        assert_eq!(
            pod_path("http://10.0.0.7:20109/tasks/1?x=1", pod, "/submit").as_deref(),
            Some("/tasks/1?x=1")
        );
        assert_eq!(pod_path("http://10.0.0.8:20109/tasks/1", pod, "/s"), None);
        assert_eq!(pod_path("https://10.0.0.7:20109/tasks/1", pod, "/s"), None);
        assert_eq!(pod_path("//evil.example/x", pod, "/s"), None);
        assert_eq!(pod_path("/tasks/my job", pod, "/s"), None);
        assert_eq!(
            pod_path("tasks/1", pod, "/api/submit").as_deref(),
            Some("/api/tasks/1")
        );
    }

    #[test]
    fn a_poll_asks_the_pod_for_the_handles_path() {
        let h = Handle {
            job: 1,
            pod: "10.0.0.7:1".parse().unwrap(),
            route: "/submit".into(),
            path: "/tasks/1?v=2".into(),
            id: None,
        };
        assert_eq!(pod_uri(&h, "", None), "/tasks/1?v=2");
        assert_eq!(pod_uri(&h, "", Some("a=b")), "/tasks/1?a=b");
        assert_eq!(pod_uri(&h, "/result", None), "/tasks/1/result");
        assert_eq!(
            pod_uri(&h, "/result", Some("f=mp4")),
            "/tasks/1/result?f=mp4"
        );
    }

    #[test]
    fn a_json_answer_names_its_job_by_a_string_or_a_whole_number() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"task_id": "a-1", "n": 42, "f": 1.5, "o": {"id": "x"}}"#)
                .unwrap();
        assert_eq!(json_job_id(&v, "/task_id").as_deref(), Some("a-1"));
        assert_eq!(json_job_id(&v, "/n").as_deref(), Some("42"));
        assert_eq!(json_job_id(&v, "/o/id").as_deref(), Some("x"));
        assert_eq!(json_job_id(&v, "/f"), None);
        assert_eq!(json_job_id(&v, "/o"), None);
        assert_eq!(json_job_id(&v, "/missing"), None);
        for ok in ["a-1", "42", "3f2a_b.c~d"] {
            assert_eq!(id_in_path(ok).as_deref(), Some(ok));
        }
        assert_eq!(id_in_path("a:b/c d").as_deref(), Some("a%3Ab%2Fc%20d"));
        assert_eq!(id_in_path("x+y=").as_deref(), Some("x%2By%3D"));
        assert_eq!(id_in_path("a\nb%").as_deref(), Some("a%0Ab%25"));
        assert_eq!(id_in_path("é").as_deref(), Some("%C3%A9"));
        for bad in ["", ".", "..", &"x".repeat(257)] {
            assert_eq!(id_in_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_v2_handle_is_found_where_it_stands_in_a_path() {
        let t = format!("{V2_START}abc.def");
        let p = format!("/tasks/{t}/result");
        assert_eq!(handle_in_path(&p), Some(("/tasks/", t.as_str(), "/result")));
        let p = format!("/v1/status/poll/{t}");
        assert_eq!(
            handle_in_path(&p),
            Some(("/v1/status/poll/", t.as_str(), ""))
        );
        // Not a whole segment's start, or no tag: not a handle.
        assert_eq!(handle_in_path(&format!("/tasks/x{t}")), None);
        assert_eq!(handle_in_path(&format!("/tasks/{V2_START}abc")), None);
        assert_eq!(handle_in_path("/tasks/42"), None);
    }
}
