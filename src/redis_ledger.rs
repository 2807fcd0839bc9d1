//! A slot ledger shared by several lb-agent processes, kept in Redis (issue 12).
//!
//! One lb-agent process holds a pod's `limit` only for the requests it sends itself; with two
//! replicas (high availability, every rolling update) a pod with `limit: 1` gets two requests.
//! This ledger keeps the per-pod counts, the leases and the FIFO queue of every agent in one
//! Redis, so the caps, least-in-flight choice and queue order are global.
//!
//! # How
//!
//! - **One atomic step per decision.** Taking a slot, queueing, releasing and handing a freed
//!   slot to the oldest waiter are Lua scripts (`src/redis_ledger/*.lua`, run with EVALSHA and
//!   loaded again after NOSCRIPT, e.g. after a Redis restart): the agent never reads and then
//!   writes.
//! - **One ledger for all pools.** Every key has the prefix `lb:{ledger}:` (one hash tag), as
//!   the in-process ledger keys its state by pod address for every pool: a pod reached by two
//!   pools (overlapping endpoint lists, two routes, a pool and its replacement after a reload)
//!   has one global count against its one cap, and the queue is one FIFO across pools. Each
//!   waiter records its pool, and an agent tells its pods *per pool* (its view of the pool,
//!   `<agent>|<pool>`): a waiter is only given a pod its own agent has in its own pool, less the
//!   pods it tried. `max_waiting` and the figures ([`RedisLedger::queue_status`]) stay per pool.
//!   The key layout is in `common.lua`.
//! - **Leases** expire on Redis's own clock (`TIME` inside the scripts): each agent renews all its
//!   leases of a pool with one call every `min(lease_ttl / 3, 1 s)`. The slots and waiters of an
//!   agent that stopped renewing are reaped by whichever script runs next after `lease_ttl`, and
//!   the freed slots go to waiters at once: no janitor process. A stall of Redis itself (no
//!   script ran for over half a lease: Redis hung, or no agent could reach it) is
//!   not held against the agents: the gap is added to every expiry, so live agents are not
//!   reaped all at once when it answers again. The price: when every agent was gone for a
//!   while, the dead ones' slots return `lease_ttl` after the next agent's first call.
//! - **FIFO across agents.** A waiter is a ZSET member scored by its arrival stamp (Redis clock,
//!   µs, strictly increasing). A freed slot goes to the oldest waiter that can use it; a waiter
//!   whose pods are all full (or already tried) does not block younger ones that can use the
//!   free pod. The grant is made inside the releasing script and published on the owner's
//!   channel (`lb:grant:<agent>`); the agent wakes the waiting request through a oneshot. Pub/sub
//!   is lossy across disconnections, so every keep-alive also asks which of the agent's waiters
//!   hold a slot by now (one call per pool per agent, not a loop per request).
//! - **Redis restart or failover.** Every call names the epoch of the ledger that the agent
//!   knows (`<server run_id>/<nonce>`). A restarted Redis has no epoch, a promoted replica has one
//!   made on another server: the first agent to notice starts a new epoch, and every agent (told
//!   by its epoch mismatch, its dropped pub/sub connection and its keep-alive) re-asserts its
//!   leases and its waiters with their old arrival stamps. Counts are so rebuilt from what the
//!   agents know, over the caps if need be (those requests *are* running), and queue order is
//!   kept. **No slot is granted until every replica that was alive before has re-asserted**, or
//!   has been silent for its `lease_ttl` (the rule that reaps a vanished agent): each agent keeps
//!   the list of live registrations from its last keep-alive, the agent that starts the epoch
//!   writes it into the new ledger as *pending*, and each re-assertion removes its own entry and
//!   adds any it knew of that are missing. A fixed timer would let a replica that reconnects
//!   late (a failover where agents come back at different moments) find its pod's slot given
//!   away. An agent that knew of nobody (just started, or never reached the old ledger) cannot
//!   tell a fresh Redis from a restarted one: on a Redis up for less than `recovery_hold` it
//!   holds grants for the rest of that time, until an agent that knew the live registrations
//!   re-asserts and names them; on an older Redis grants go on at once.
//! - **Releases racing a re-assertion.** A re-assertion lists the agent's ids as they were when
//!   it was sent; a request that ends meanwhile sends its release, which may reach the new
//!   epoch first (finding nothing in an empty ledger, or the old lease in one that kept its
//!   data). Every released id is remembered as gone (a tombstone, for at least
//!   [`TOMBSTONE_MIN`] or `lease_ttl`), and the re-assertion does not bring it back: no slot is
//!   taken for a request that no longer exists. The price: one small ZSET entry per release
//!   for that long.
//! - **Asynchronous jobs** ([`crate::jobs`]) hold a lease after their request ended: marked as
//!   the job's ([`Lease::hold_job`], with a [`JobRecord`]), it is not freed when its agent is
//!   reaped but set aside (`orphans:<pool>`) until another agent of the pool adopts it
//!   ([`RedisLedger::adopt_jobs`]) and goes on checking the job; the old id is then a tombstone,
//!   so an agent that was only stalled cannot re-assert it. Any agent can end a job's hold by
//!   the job's id ([`RedisLedger::end_job`]).
//! - **Views are versioned.** An agent's pods of a pool ([`AgentView`]) are written by every
//!   call, from concurrent tasks; a view read before a pod change never replaces a newer one,
//!   here or in Redis.
//! - **Redis unreachable.** Requests already holding a lease run on; new ones wait (no fall-back
//!   to local counting, which would break the caps) and time out at their deadline as usual.
//!   Releases that could not be sent are retried, and the agent's re-assertion after an epoch
//!   change is the whole truth about its ids, so nothing leaks. Each episode is logged once when
//!   it starts and once when it ends, and counted.
//!
//! # The client
//!
//! The `redis` crate (redis-rs) 1.8, the current stable line (2.0 is a release candidate): the
//! maintained Rust client, used by most Rust services that speak to Redis, works with Valkey and
//! other Redis-protocol servers, and has what this needs: a tokio [`ConnectionManager`] that
//! multiplexes every request of the process on one connection and reconnects by itself,
//! [`Script`] (EVALSHA with a fallback to loading the script), and a pub/sub connection.
//! Features: `tokio-comp`, `connection-manager`, `script` only.
//!
//! # Not covered here
//!
//! Sharding over a Redis Cluster: the whole ledger is one hash slot, so one Redis node does all
//! of it (one Redis, or Sentinel / a managed Redis with failover, is the intended deployment).
//! The wiring into the balancing door, config, metrics and `/status` (the lead's side). A pool
//! once used is renewed by its agent for the life of the process (one small call per
//! keep-alive), even after a reload removed it. The pump walks the one queue past waiters that
//! cannot use a free pod: with many waiters of a pool whose pods are all full queued ahead of
//! one that can use a pod freed in another pool, a release costs a walk over them (the
//! in-process ledger has the same order rule). Agents of a version that kept one key prefix
//! per pool (`lb:{<pool>}:`) do not see this ledger's counts: do not mix them in one rollout. An agent cut off from Redis (alone) for `lease_ttl` cannot be told from a dead
//! one: its slots are given away, and it re-asserts them (over the caps) when it is back.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

/// While Redis is unreachable, how often the agent tries it again (and how soon its pub/sub
/// connection is re-made after a drop, which is how a restart is noticed).
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// The longest between two keep-alives, whatever `lease_ttl`: the keep-alive also makes up for
/// a grant whose pub/sub message was lost, so it bounds that rare extra wait.
const MAX_KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Round-trip samples kept between two [`RedisLedger::take_round_trips`] calls; older ones are
/// dropped so an unread buffer cannot grow without bound.
const ROUND_TRIP_SAMPLES: usize = 8192;

/// Default [`LedgerOptions::recovery_hold`]: several times the time an agent needs to notice a
/// restarted Redis (its pub/sub connection is re-made every [`PROBE_EVERY`]) and re-assert.
/// Only an agent that knew of no other replica applies it, and only on a Redis younger than
/// it.
pub const DEFAULT_RECOVERY_HOLD: Duration = Duration::from_secs(2);

/// How long a job reported done before its hold was known is remembered (a `202` slower than
/// the job itself).
const JOB_DONE_MEMORY: Duration = Duration::from_secs(600);

/// Shortest time an id released while absent from the ledger is remembered as gone.
const TOMBSTONE_MIN: Duration = Duration::from_secs(10);

/// Default timeout of one Redis call (connect or reply): a Redis that hangs counts as
/// unreachable, so requests wait for it instead of hanging on one call.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(1);

/// An agent's pods of a pool with their caps, as of `version`, which grows with every change
/// of the agent's pod lists and caps. The view an agent gives Redis is written by every call
/// (acquire, keep-alive, re-assertion), from different tasks: an older view read before a pod
/// left must never replace a newer one, or waiters would be handed the removed pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentView {
    pub pods: Vec<(SocketAddr, u32)>,
    pub version: u64,
}

impl AgentView {
    pub fn new(pods: Vec<(SocketAddr, u32)>, version: u64) -> Self {
        Self { pods, version }
    }
}

/// Settings of a [`RedisLedger`].
#[derive(Clone, Copy, Debug)]
pub struct LedgerOptions {
    /// How long the slots and queued requests of an agent that vanished stay counted.
    pub lease_ttl: Duration,
    /// When the agent that starts a new epoch knew of no replica before it (it has just
    /// started): how long after the Redis server started no slot is granted, so replicas that
    /// nobody knows of can re-assert first. An agent that knew the replicas waits for their
    /// re-assertions instead, however long or short that takes.
    pub recovery_hold: Duration,
    /// Timeout of one Redis call.
    pub io_timeout: Duration,
}

impl LedgerOptions {
    pub fn new(lease_ttl: Duration) -> Self {
        Self {
            lease_ttl,
            recovery_hold: DEFAULT_RECOVERY_HOLD,
            io_timeout: DEFAULT_IO_TIMEOUT,
        }
    }
}

/// Why a ledger could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger.redis: {0}")]
    Url(#[source] RedisError),
    #[error("ledger agent id {0:?}: must be non-empty and without '#', ',', '=', '|' or spaces")]
    Agent(String),
    #[error("ledger.lease_ttl: must be at least 300ms (it is renewed every third of it)")]
    LeaseTtl,
    #[error("ledger.recovery_hold: must be at least {PROBE_EVERY:?}")]
    RecoveryHold,
    #[error("ledger io timeout: must be at least 10ms")]
    IoTimeout,
    #[error("redis ledger: {0}")]
    Redis(#[from] RedisError),
    #[error("redis ledger: unexpected reply {0}")]
    Reply(String),
}

/// Why [`RedisLedger::acquire`] gave no slot. Both mean "refuse the request" (503 + Retry-After,
/// gRPC UNAVAILABLE), as with the in-process queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// `max_waiting` requests (from all agents) already wait in this queue.
    #[error("queue full")]
    Full,
    /// The deadline passed first (every pod full, or the ledger unreachable, all that time).
    #[error("queue timeout")]
    Timeout,
}

/// Global figures of one queue (pool), for metrics and `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStatus {
    /// Slots taken per pod, all agents together (pods with none are absent).
    pub inflight: Vec<(SocketAddr, u32)>,
    /// Requests waiting in the queue, all agents together.
    pub waiting: u64,
    /// Leases returned because their agent stopped renewing them (all agents, since the last
    /// Redis restart).
    pub leases_expired: u64,
    /// How long the pool's oldest waiter has waited, all agents together (Redis's clock).
    pub oldest_wait: Option<Duration>,
}

/// What this agent knows of the ledger, without asking Redis.
#[derive(Clone, Debug)]
pub struct LedgerStatus {
    pub reachable: bool,
    /// Failed Redis calls.
    pub errors: u64,
    /// Times Redis became unreachable.
    pub unreachable_episodes: u64,
    /// Times a queue's epoch changed under this agent (Redis restarted or failed over).
    pub epoch_changes: u64,
    /// Times this agent found itself reaped while alive (no keep-alive got through for
    /// `lease_ttl`).
    pub reaped_while_alive: u64,
    /// Leases this agent re-asserted after an epoch change that put their pod above its limit
    /// (the request was running, so the count must say so). Grants wait for every replica's
    /// re-assertion, so this should stay 0; if it ever is not, a pod did run above its cap.
    pub reasserted_over_limit: u64,
    /// Per queue, as of this agent's last keep-alive.
    pub queues: Vec<(String, QueueStatus)>,
}

/// The scripts, each made of `common.lua` (keys, helpers, reap, pump) and its own part.
struct Scripts {
    ensure: Script,
    acquire: Script,
    leave: Script,
    keepalive: Script,
    reassert: Script,
    peek: Script,
    job_hold: Script,
    job_end: Script,
    job_adopt: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("redis_ledger/common.lua"),
            include_str!(concat!("redis_ledger/", $file))
        ))
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            ensure: script!("ensure.lua"),
            acquire: script!("acquire.lua"),
            leave: script!("leave.lua"),
            keepalive: script!("keepalive.lua"),
            reassert: script!("reassert.lua"),
            peek: script!("peek.lua"),
            job_hold: script!("job_hold.lua"),
            job_end: script!("job_end.lua"),
            job_adopt: script!("job_adopt.lua"),
        }
    }
}

/// The ledger client of one agent process. Create it once with [`RedisLedger::connect`] and
/// share the `Arc`.
pub struct RedisLedger {
    client: redis::Client,
    conn: ConnectionManager,
    agent: String,
    opts: LedgerOptions,
    keepalive_every: Duration,
    scripts: Scripts,
    state: Mutex<State>,
    /// One epoch recovery (ensure + re-assert) at a time.
    recovery: tokio::sync::Mutex<()>,
    reachable: watch::Sender<bool>,
    /// Wakes the keep-alive task early (pub/sub reconnected, a hold ends, an error).
    kick: Arc<Notify>,
    stopped: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    errors: AtomicU64,
    unreachable_episodes: AtomicU64,
    epoch_changes: AtomicU64,
    reaped_while_alive: AtomicU64,
    reasserted_over_limit: AtomicU64,
    /// Releases sent and not yet answered (a deliberate exit waits for them).
    releases_in_flight: Arc<AtomicU64>,
    round_trips: Mutex<Vec<Duration>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    queues: HashMap<String, QueueState>,
    entries: HashMap<u64, Entry>,
    /// Releases that could not be sent; retried by the keep-alive.
    failed_leaves: Vec<(String, u64)>,
    unreachable_since: Option<StdInstant>,
    /// Redis's `run_id` when last checked, to notice a failover.
    server: Option<String>,
    /// Redis's uptime when last checked (`None`: it refuses `INFO`).
    uptime: Option<Duration>,
    /// Every registration (`<agent>|<pool>`, lease_ttl in ms) alive in the ledger at this
    /// agent's last keep-alive or re-assertion: whom a new epoch must wait for.
    peers: Vec<(String, String)>,
    /// When a kick is already due for the end of a recovery hold.
    hold_kick: Option<Instant>,
}

#[derive(Default)]
struct QueueState {
    /// The epoch this agent's entries are asserted under; `None`: (re-)assert before any call.
    epoch: Option<String>,
    /// The epoch last worked under, to tell a change from the first contact.
    last_epoch: Option<String>,
    /// Registered in the queue's `agents` set under `epoch` (so its absence means reaped).
    known: bool,
    /// This agent's view of the pool in its wire form (see [`encode_view`]), and its version.
    view: String,
    view_version: u64,
    view_sent: Option<String>,
    status: QueueStatus,
}

impl QueueState {
    /// Takes `view` unless the one held is newer (a request's view read before a pod change
    /// is older than the change's own).
    fn offer_view(&mut self, view: &AgentView) {
        if view.version >= self.view_version {
            self.view = encode_view(view);
            self.view_version = view.version;
        }
    }
}

struct Entry {
    queue: String,
    slot: Slot,
    /// The asynchronous job this lease holds (its wire record), once the job began: the
    /// re-assertion after an epoch change brings the record back with the lease.
    job: Option<String>,
}

enum Slot {
    Waiting {
        /// Arrival stamp in the ledger; 0 until the acquire's reply came.
        stamp: u64,
        tried: String,
        wake: Option<oneshot::Sender<SocketAddr>>,
    },
    Leased(SocketAddr),
    /// An id [`RedisLedger::adopt_jobs`] reserved for a job it may have adopted: kept by a
    /// re-assertion if present (never created), asked about again by the next adoption if the
    /// reply did not come.
    Adopting,
}

/// A slot on a pod. Dropping it releases the slot at once (the release is sent by a spawned
/// task, so the drop never blocks); while it lives the agent's keep-alive renews it.
pub struct Lease {
    ledger: Arc<RedisLedger>,
    queue: String,
    n: u64,
    addr: SocketAddr,
    released: bool,
}

impl Lease {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The lease's request started asynchronous job `record`: the lease is the job's from now
    /// on, in Redis too, where it outlives this agent (another agent of the pool adopts it if
    /// this one vanishes). `Done`: the job was reported done before (at another agent); the
    /// caller releases the lease.
    pub fn hold_job(
        &self,
        record: &JobRecord,
    ) -> impl std::future::Future<Output = Result<JobHold, LedgerError>> + Send + 'static {
        let wire = record.encode();
        if let Some(e) = lock(&self.ledger.state).entries.get_mut(&self.n) {
            e.job = Some(wire.clone());
        }
        let (ledger, queue) = (Arc::clone(&self.ledger), self.queue.clone());
        let args = [ledger.wire_id(self.n), wire];
        async move {
            let v = ledger
                .eval(&ledger.scripts.job_hold, &queue, &args)
                .await
                .map_err(LedgerError::Redis)?;
            Ok(match string(&v).as_deref() {
                Some("done") => JobHold::Done,
                Some("held") => JobHold::Held,
                // Not in this ledger now (an epoch change): the re-assertion brings it, record
                // and all.
                _ => JobHold::Later,
            })
        }
    }

    /// Releases the slot and waits until Redis has it back (dropping the lease does the same
    /// without waiting). A release that fails is retried by the keep-alive, as after a drop.
    pub async fn release(mut self) {
        self.released = true;
        if let Some(sent) = self.ledger.forget_and_leave(&self.queue, self.n) {
            // Spawned, so a caller that stops waiting does not stop the release.
            let _ = sent.await;
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("queue", &self.queue)
            .field("id", &self.n)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        drop(self.ledger.forget_and_leave(&self.queue, self.n));
    }
}

/// An asynchronous job, as the shared ledger keeps it with the lease it holds: enough for any
/// agent of the pool to go on asking the pod about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub job: u128,
    /// When `max_duration` ends the hold, in Unix milliseconds.
    pub deadline_unix_ms: u64,
    /// The route (its `uri`) that accepted the job: its `async` settings apply.
    pub route: String,
    /// The job's status path on the pod, if the pod's answer named one.
    pub path: Option<String>,
}

impl JobRecord {
    /// `<job hex, 32 digits> <deadline> <route>\n<path>`: the Lua side reads the first 32
    /// characters only.
    fn encode(&self) -> String {
        format!(
            "{:032x} {} {}\n{}",
            self.job,
            self.deadline_unix_ms,
            self.route,
            self.path.as_deref().unwrap_or("")
        )
    }

    fn decode(s: &str) -> Option<JobRecord> {
        let (head, path) = s.split_once('\n')?;
        let mut parts = head.splitn(3, ' ');
        let job = u128::from_str_radix(parts.next()?, 16).ok()?;
        let deadline_unix_ms = parts.next()?.parse().ok()?;
        let route = parts.next()?.to_string();
        Some(JobRecord {
            job,
            deadline_unix_ms,
            route,
            path: (!path.is_empty()).then(|| path.to_string()),
        })
    }
}

/// What [`Lease::hold_job`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobHold {
    Held,
    /// Reported done before its hold was known: release the lease.
    Done,
    /// The lease is not in the ledger now (it restarted): held once this agent re-asserts.
    Later,
}

/// An acquire in progress: dropped before it became a [`Lease`] (timeout, client gone), it
/// takes the request out of the queue — or gives back the slot it was granted meanwhile.
struct Pending {
    ledger: Arc<RedisLedger>,
    queue: String,
    n: u64,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.ledger.forget_and_leave(&self.queue, self.n);
        }
    }
}

/// A script's reply to an agent's call.
enum Reply {
    Granted(SocketAddr),
    Queued {
        stamp: u64,
        hold_ms: u64,
    },
    Full,
    /// The queue's epoch is not the one the agent named: re-assert first.
    Epoch,
    /// The agent was reaped while alive: re-assert.
    Reaped,
}

impl RedisLedger {
    /// Sets up the ledger client of this agent process. `agent` must be unique per process
    /// (e.g. pod name + pid + a random part). Redis need not be up yet: requests wait for it.
    pub async fn connect(
        url: &str,
        agent: String,
        lease_ttl: Duration,
    ) -> Result<Arc<Self>, LedgerError> {
        Self::connect_with(url, agent, LedgerOptions::new(lease_ttl)).await
    }

    /// [`RedisLedger::connect`] with every setting.
    pub async fn connect_with(
        url: &str,
        agent: String,
        opts: LedgerOptions,
    ) -> Result<Arc<Self>, LedgerError> {
        if agent.is_empty() || agent.contains(['#', ' ', ',', '=', '|']) {
            return Err(LedgerError::Agent(agent));
        }
        if opts.lease_ttl < Duration::from_millis(300) {
            return Err(LedgerError::LeaseTtl);
        }
        if opts.recovery_hold < PROBE_EVERY {
            return Err(LedgerError::RecoveryHold);
        }
        if opts.io_timeout < Duration::from_millis(10) {
            return Err(LedgerError::IoTimeout);
        }
        let client = redis::Client::open(url).map_err(LedgerError::Url)?;
        // One attempt per reconnection: the keep-alive task does the retrying (every
        // PROBE_EVERY) and tells waiting requests when Redis is back.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(opts.io_timeout))
            .set_response_timeout(Some(opts.io_timeout));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(LedgerError::Url)?;
        let keepalive_every = (opts.lease_ttl / 3).min(MAX_KEEPALIVE_EVERY);
        let (reachable, _) = watch::channel(true);
        let ledger = Arc::new(Self {
            client,
            conn,
            agent,
            opts,
            keepalive_every,
            scripts: Scripts::new(),
            state: Mutex::new(State::default()),
            recovery: tokio::sync::Mutex::new(()),
            reachable,
            kick: Arc::new(Notify::new()),
            stopped: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Handle::current(),
            errors: AtomicU64::new(0),
            unreachable_episodes: AtomicU64::new(0),
            epoch_changes: AtomicU64::new(0),
            reaped_while_alive: AtomicU64::new(0),
            reasserted_over_limit: AtomicU64::new(0),
            releases_in_flight: Arc::new(AtomicU64::new(0)),
            round_trips: Mutex::new(Vec::new()),
        });
        // Learn at once whether Redis is there, so the first requests wait for it if not.
        if let Err(e) = ledger.server_id().await {
            ledger.lost(&e);
        }
        let weak = Arc::downgrade(&ledger);
        let tasks = vec![
            tokio::spawn(keepalive_task(weak.clone(), Arc::clone(&ledger.kick))),
            tokio::spawn(grants_task(weak)),
        ];
        *lock(&ledger.tasks) = tasks;
        Ok(ledger)
    }

    /// This agent's id in the ledger.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Takes a slot on the pod with the fewest in-flight requests of all agents among
    /// `candidates` (this agent's pods of the pool and its limit for each) less `tried`, below
    /// its limit; or waits in the pool's queue (`queue`: the pool's name, the same on every
    /// agent) until a slot is handed to it, oldest first across agents. Dropping the future
    /// leaves the queue. While Redis is unreachable the request waits, and times out at
    /// `deadline` like any other.
    pub async fn acquire(
        self: &Arc<Self>,
        queue: &str,
        candidates: &AgentView,
        tried: &[SocketAddr],
        max_waiting: usize,
        deadline: Instant,
        arrival: &mut Option<u64>,
    ) -> Result<Lease, AcquireError> {
        let tried = join_addrs(tried);
        let (wake, mut woken) = oneshot::channel();
        let n = {
            let mut st = lock(&self.state);
            st.queues
                .entry(queue.to_string())
                .or_default()
                .offer_view(candidates);
            let n = st.next_id;
            st.next_id += 1;
            st.entries.insert(
                n,
                Entry {
                    queue: queue.to_string(),
                    slot: Slot::Waiting {
                        stamp: 0,
                        tried: tried.clone(),
                        wake: Some(wake),
                    },
                    job: None,
                },
            );
            n
        };
        let mut pending = Pending {
            ledger: Arc::clone(self),
            queue: queue.to_string(),
            n,
            armed: true,
        };
        loop {
            if self.stopped.load(Ordering::Relaxed) || !self.wait_reachable(deadline).await {
                sleep_until(deadline).await;
                return Err(AcquireError::Timeout);
            }
            let reply = timeout_at(
                deadline,
                self.try_acquire(queue, n, &tried, max_waiting, *arrival),
            )
            .await;
            match reply {
                Err(_) => return Err(AcquireError::Timeout),
                Ok(Err(e)) => self.lost(&e),
                Ok(Ok(Reply::Granted(addr))) => {
                    self.deliver(n, addr);
                    pending.armed = false;
                    return Ok(self.lease(queue, n, addr));
                }
                Ok(Ok(Reply::Queued { stamp, hold_ms })) => {
                    *arrival = Some(stamp);
                    if let Some(Entry {
                        slot: Slot::Waiting { stamp: s, .. },
                        ..
                    }) = lock(&self.state).entries.get_mut(&n)
                    {
                        *s = stamp;
                    }
                    if hold_ms > 0 {
                        self.kick_after(Duration::from_millis(hold_ms));
                    }
                    break;
                }
                Ok(Ok(Reply::Full)) => {
                    // Nothing was written: no leave to send.
                    pending.armed = false;
                    lock(&self.state).entries.remove(&n);
                    return Err(AcquireError::Full);
                }
                Ok(Ok(Reply::Epoch)) => self.invalidate(queue),
                Ok(Ok(Reply::Reaped)) => self.reaped(queue),
            }
        }
        tokio::select! {
            woke = &mut woken => match woke {
                Ok(addr) => {
                    pending.armed = false;
                    Ok(self.lease(queue, n, addr))
                }
                // The agent stopped (abandon): nobody will hand this request a slot.
                Err(_) => {
                    sleep_until(deadline).await;
                    Err(AcquireError::Timeout)
                }
            },
            _ = sleep_until(deadline) => Err(AcquireError::Timeout),
        }
    }

    /// Replaces this agent's pods of `queue` (and their limits) for its waiting requests too:
    /// call it when discovery or a reload changes them, so waiters can be given a new pod. Sent
    /// with the next call for the queue (at the latest the next keep-alive, which is kicked).
    pub fn set_pods(&self, queue: &str, candidates: &AgentView) {
        lock(&self.state)
            .queues
            .entry(queue.to_string())
            .or_default()
            .offer_view(candidates);
        self.kick.notify_one();
    }

    /// Reads a queue's global figures from Redis now.
    pub async fn queue_status(&self, queue: &str) -> Result<QueueStatus, LedgerError> {
        let v = self.eval(&self.scripts.peek, queue, &[]).await?;
        let items = array(v).ok_or_else(|| LedgerError::Reply("peek".into()))?;
        let [_epoch, waiting, expired, inflight, oldest] = &items[..] else {
            return Err(LedgerError::Reply("peek".into()));
        };
        Ok(QueueStatus {
            inflight: parse_counts(inflight),
            waiting: int(waiting).unwrap_or(0),
            leases_expired: int(expired).unwrap_or(0),
            oldest_wait: match oldest {
                Value::Int(us) if *us >= 0 => Some(Duration::from_micros(*us as u64)),
                _ => None,
            },
        })
    }

    /// What this agent knows without asking Redis.
    pub fn status(&self) -> LedgerStatus {
        let st = lock(&self.state);
        let mut queues: Vec<_> = st
            .queues
            .iter()
            .map(|(name, q)| (name.clone(), q.status.clone()))
            .collect();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        LedgerStatus {
            reachable: *self.reachable.borrow(),
            errors: self.errors.load(Ordering::Relaxed),
            unreachable_episodes: self.unreachable_episodes.load(Ordering::Relaxed),
            epoch_changes: self.epoch_changes.load(Ordering::Relaxed),
            reaped_while_alive: self.reaped_while_alive.load(Ordering::Relaxed),
            reasserted_over_limit: self.reasserted_over_limit.load(Ordering::Relaxed),
            queues,
        }
    }

    /// Round trips of the Redis calls since the last call of this (for a histogram).
    pub fn take_round_trips(&self) -> Vec<Duration> {
        std::mem::take(&mut *lock(&self.round_trips))
    }

    /// Stops everything this agent does in Redis, as if the process had died: no keep-alive,
    /// no release. Its slots and waiters come back only through `lease_ttl` expiry. For a fast
    /// exit, and for tests of a vanished agent.
    pub fn abandon(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        // Waiting requests wake to time out.
        for entry in lock(&self.state).entries.values_mut() {
            if let Slot::Waiting { wake, .. } = &mut entry.slot {
                wake.take();
            }
        }
    }

    /// Before a deliberate exit: tells Redis that this agent's queue places are gone, and its
    /// leases in the queues `release` names, and waits until Redis has heard every release
    /// (also those already on their way), for `within` at most. Leases of other queues are left
    /// to expire after `lease_ttl`: their requests were cut by the exit, but their pods may
    /// still be working on them (`client_abort: finish`). Afterwards the agent does nothing
    /// more in Redis. Returns how many entries it released.
    pub async fn leave_before_exit(
        &self,
        release: impl Fn(&str) -> bool,
        within: Duration,
    ) -> usize {
        let deadline = Instant::now() + within;
        let mut leaves = std::mem::take(&mut lock(&self.state).failed_leaves);
        {
            let mut st = lock(&self.state);
            st.entries.retain(|n, e| {
                let go = match e.slot {
                    Slot::Waiting { .. } => true,
                    // A job's hold outlives this agent: another agent adopts it.
                    Slot::Leased(_) => e.job.is_none() && release(&e.queue),
                    Slot::Adopting => false,
                };
                if go {
                    leaves.push((e.queue.clone(), *n));
                }
                !go
            });
        }
        let released = leaves.len();
        let sends = futures::future::join_all(leaves.iter().map(|(q, n)| self.leave(q, *n)));
        let failed = timeout_at(deadline, sends)
            .await
            .map_or(released, |r| r.iter().filter(|r| r.is_err()).count());
        while self.releases_in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        if failed > 0 {
            log::warn!(
                "redis ledger: {failed} of {released} releases before exit not confirmed; they \
                 return after lease_ttl ({:?})",
                self.opts.lease_ttl
            );
        }
        self.abandon();
        released
    }

    /// [`Self::leave_before_exit`] from a thread outside the runtime (the drain thread).
    pub fn leave_before_exit_blocking(
        &self,
        release: impl Fn(&str) -> bool,
        within: Duration,
    ) -> usize {
        self.runtime
            .block_on(self.leave_before_exit(release, within))
    }

    /// Ends the hold of asynchronous job `job` of `queue`, whichever agent holds it (a
    /// callback, a cancel or a final status answer can reach any agent): the pool it was held
    /// in. `None`: no lease holds it; it is then remembered as done for a while, so that a
    /// hold still on its way (the `202` not yet passed on) does not start.
    pub async fn end_job(&self, queue: &str, job: u128) -> Result<Option<String>, LedgerError> {
        let args = [
            format!("{job:032x}"),
            self.tombstone_ms(),
            JOB_DONE_MEMORY.as_millis().to_string(),
        ];
        let v = self
            .eval(&self.scripts.job_end, queue, &args)
            .await
            .map_err(LedgerError::Redis)?;
        let items = array(v).ok_or_else(|| LedgerError::Reply("job_end".into()))?;
        Ok(match items.first().and_then(string).as_deref() {
            Some("ended") => items.get(1).and_then(string),
            _ => None,
        })
    }

    /// Takes over up to `max` job holds of `queue` whose agent vanished: each becomes a lease
    /// of this agent (the pod's count never changed), to be checked and ended here.
    pub async fn adopt_jobs(
        self: &Arc<Self>,
        queue: &str,
        max: usize,
    ) -> Result<Vec<(Lease, JobRecord)>, LedgerError> {
        let epoch = self.ready(queue).await.map_err(LedgerError::Redis)?;
        let (known, _) = self.call_view(queue);
        // The ids are reserved, as placeholders, before the call: a re-assertion meanwhile
        // keeps what the call adopts, and if the reply is lost the next call asks about them.
        let (first, earlier) = {
            let mut st = lock(&self.state);
            let first = st.next_id;
            st.next_id += max as u64;
            let earlier: Vec<u64> = st
                .entries
                .iter()
                .filter(|(_, e)| e.queue == queue && matches!(e.slot, Slot::Adopting))
                .map(|(n, _)| *n)
                .collect();
            for n in first..first + max as u64 {
                st.entries.insert(
                    n,
                    Entry {
                        queue: queue.to_string(),
                        slot: Slot::Adopting,
                        job: None,
                    },
                );
            }
            (first, earlier)
        };
        let mut args = vec![
            epoch,
            self.agent.clone(),
            self.opts.lease_ttl.as_millis().to_string(),
            flag(known),
            first.to_string(),
            max.to_string(),
            self.tombstone_ms(),
        ];
        args.extend(earlier.iter().map(u64::to_string));
        let this_round = first..first + max as u64;
        let v = match self.eval(&self.scripts.job_adopt, queue, &args).await {
            Ok(v) => v,
            Err(e) => {
                // The placeholders stay: the next call asks about them.
                self.lost(&e);
                return Err(LedgerError::Redis(e));
            }
        };
        let items = array(v).ok_or_else(|| LedgerError::Reply("job_adopt".into()))?;
        let outcome = items.first().and_then(string);
        if outcome.as_deref() != Some("ok") {
            // Nothing was written by this call.
            lock(&self.state)
                .entries
                .retain(|n, _| !this_round.contains(n));
            match outcome.as_deref() {
                Some("epoch") => self.invalidate(queue),
                Some("reaped") => self.reaped(queue),
                _ => return Err(LedgerError::Reply("job_adopt".into())),
            }
            return Ok(Vec::new());
        }
        let flat = items.get(1).cloned().and_then(array).unwrap_or_default();
        let (mut adopted, mut unreadable) = (Vec::new(), Vec::new());
        let mut st = lock(&self.state);
        for c in flat.chunks(3) {
            let [n, addr, rec] = c else { continue };
            let (Some(n), Some(addr), Some(rec)) = (
                int(n),
                string(addr).and_then(|a| a.parse::<SocketAddr>().ok()),
                string(rec),
            ) else {
                continue;
            };
            let Some(entry) = st.entries.get_mut(&n) else {
                continue;
            };
            entry.slot = Slot::Leased(addr);
            entry.job = Some(rec.clone());
            match JobRecord::decode(&rec) {
                Some(record) => adopted.push((n, addr, record)),
                None => {
                    // Our own format: only a corrupted ledger gets here. Without a record
                    // nobody could end the hold; it is given back instead.
                    log::error!(
                        "redis ledger: an orphaned job's record does not read ({rec:?}); its slot on {addr} is given back"
                    );
                    unreadable.push((n, addr));
                }
            }
        }
        // The call answered for every placeholder: those it did not name hold nothing.
        st.entries
            .retain(|_, e| !(e.queue == queue && matches!(e.slot, Slot::Adopting)));
        drop(st);
        for (n, addr) in unreadable {
            drop(self.lease(queue, n, addr));
        }
        Ok(adopted
            .into_iter()
            .map(|(n, addr, record)| (self.lease(queue, n, addr), record))
            .collect())
    }

    fn lease(self: &Arc<Self>, queue: &str, n: u64, addr: SocketAddr) -> Lease {
        Lease {
            ledger: Arc::clone(self),
            queue: queue.to_string(),
            n,
            addr,
            released: false,
        }
    }

    /// One try of the acquire script, asserting the queue first if needed.
    async fn try_acquire(
        &self,
        queue: &str,
        n: u64,
        tried: &str,
        max_waiting: usize,
        arrival: Option<u64>,
    ) -> Result<Reply, RedisError> {
        let epoch = self.ready(queue).await?;
        let (known, view) = self.call_view(queue);
        let args = [
            epoch,
            self.agent.clone(),
            self.opts.lease_ttl.as_millis().to_string(),
            flag(known),
            self.wire_id(n),
            view.clone(),
            tried.to_string(),
            max_waiting.to_string(),
            arrival.unwrap_or(0).to_string(),
        ];
        let v = self.eval(&self.scripts.acquire, queue, &args).await?;
        let reply = parse_reply(v)?;
        if matches!(
            reply,
            Reply::Granted(_) | Reply::Queued { .. } | Reply::Full
        ) {
            self.sent(queue, view);
        }
        Ok(reply)
    }

    /// The queue's epoch, after (re-)asserting this agent's entries if it changed.
    async fn ready(&self, queue: &str) -> Result<String, RedisError> {
        if let Some(e) = self.epoch(queue) {
            return Ok(e);
        }
        let _one = self.recovery.lock().await;
        for _ in 0..3 {
            if let Some(e) = self.epoch(queue) {
                return Ok(e);
            }
            let sid = self.server_id().await?;
            let nonce = format!(
                "{}.{}",
                self.agent,
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let (young, peers) = {
                let st = lock(&self.state);
                // Unknown uptime (INFO refused): as if Redis had just started.
                let up = st.uptime.unwrap_or_default();
                (self.opts.recovery_hold.saturating_sub(up), st.peers.clone())
            };
            let mut args = vec![
                sid,
                nonce,
                young.as_millis().to_string(),
                peers.len().to_string(),
            ];
            for (reg, ttl) in peers {
                args.extend([reg, ttl]);
            }
            let v = self.eval(&self.scripts.ensure, queue, &args).await?;
            let items = array(v).unwrap_or_default();
            let Some(epoch) = items.first().and_then(string) else {
                return Err(reply_error("ensure"));
            };
            if self.reassert(queue, &epoch).await? {
                return Ok(epoch);
            }
        }
        Err(reply_error("the queue's epoch keeps changing"))
    }

    /// Asserts everything this agent holds or waits for in `queue` under `epoch`. False: the
    /// epoch changed meanwhile.
    async fn reassert(&self, queue: &str, epoch: &str) -> Result<bool, RedisError> {
        let (args, leases, waiters, view) = {
            let st = lock(&self.state);
            let view = st
                .queues
                .get(queue)
                .map(|q| q.view.clone())
                .unwrap_or_default();
            let mut args = vec![
                epoch.to_string(),
                self.agent.clone(),
                self.opts.lease_ttl.as_millis().to_string(),
                view.clone(),
                // Every id below next_id that is not listed is over (ids are taken under this
                // same lock before their acquire is sent).
                st.next_id.saturating_sub(1).to_string(),
                st.peers.len().to_string(),
            ];
            for (reg, ttl) in &st.peers {
                args.extend([reg.clone(), ttl.clone()]);
            }
            let (mut leases, mut waiters) = (0, 0);
            for (n, entry) in st.entries.iter().filter(|(_, e)| e.queue == queue) {
                match &entry.slot {
                    Slot::Leased(addr) => {
                        leases += 1;
                        args.extend([
                            "L".into(),
                            self.wire_id(*n),
                            addr.to_string(),
                            entry.job.clone().unwrap_or_default(),
                        ]);
                    }
                    Slot::Waiting { stamp: 0, .. } | Slot::Adopting => {
                        args.extend(["K".into(), self.wire_id(*n), "".into(), "".into()]);
                    }
                    Slot::Waiting { stamp, tried, .. } => {
                        waiters += 1;
                        args.extend([
                            "W".into(),
                            self.wire_id(*n),
                            stamp.to_string(),
                            tried.clone(),
                        ]);
                    }
                }
            }
            (args, leases, waiters, view)
        };
        if self.stopped.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let v = self.eval(&self.scripts.reassert, queue, &args).await?;
        let items = array(v).ok_or_else(|| reply_error("reassert"))?;
        match items.first().and_then(string).as_deref() {
            Some("ok") => {}
            Some("epoch") => return Ok(false),
            _ => return Err(reply_error("reassert")),
        }
        let hold_ms = items.get(1).and_then(int).unwrap_or(0);
        let over = items.get(3).and_then(int).unwrap_or(0);
        if over > 0 {
            self.reasserted_over_limit
                .fetch_add(over, Ordering::Relaxed);
            log::error!(
                "redis ledger: queue {queue}: {over} re-asserted leases put their pod above its \
                 limit (a slot was granted before this agent re-asserted)"
            );
        }
        {
            let mut st = lock(&self.state);
            if let Some(peers) = items.get(4).and_then(parse_peers) {
                st.peers = peers;
            }
            let q = st.queues.entry(queue.to_string()).or_default();
            let changed = q.last_epoch.as_deref().is_some_and(|last| last != epoch);
            q.epoch = Some(epoch.to_string());
            q.last_epoch = Some(epoch.to_string());
            q.known = true;
            q.view_sent = Some(view);
            if changed {
                self.epoch_changes.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "redis ledger: queue {queue} has a new epoch (Redis restarted or failed \
                     over); re-asserted {leases} leases and {waiters} waiting requests"
                );
            }
        }
        if let Some(granted) = items.get(2) {
            self.deliver_pairs(granted);
        }
        if hold_ms > 0 {
            self.kick_after(Duration::from_millis(hold_ms));
        }
        Ok(true)
    }

    /// Renews this agent in every queue it knows, and picks up grants whose message was lost.
    async fn keepalive_round(&self) -> Result<(), RedisError> {
        let failed = std::mem::take(&mut lock(&self.state).failed_leaves);
        for (i, (queue, n)) in failed.iter().enumerate() {
            if let Err(e) = self.leave(queue, *n).await {
                lock(&self.state)
                    .failed_leaves
                    .extend(failed[i..].iter().cloned());
                return Err(e);
            }
        }
        let queues: Vec<String> = lock(&self.state).queues.keys().cloned().collect();
        for queue in queues {
            self.keepalive_queue(&queue).await?;
        }
        Ok(())
    }

    async fn keepalive_queue(&self, queue: &str) -> Result<(), RedisError> {
        let epoch = self.ready(queue).await?;
        let (known, view) = self.call_view(queue);
        let mut args = vec![
            epoch,
            self.agent.clone(),
            self.opts.lease_ttl.as_millis().to_string(),
            flag(known),
            view.clone(),
        ];
        {
            let st = lock(&self.state);
            for (n, entry) in &st.entries {
                if entry.queue == queue && matches!(entry.slot, Slot::Waiting { .. }) {
                    args.push(self.wire_id(*n));
                }
            }
        }
        let v = self.eval(&self.scripts.keepalive, queue, &args).await?;
        let items = array(v).ok_or_else(|| reply_error("keepalive"))?;
        match items.first().and_then(string).as_deref() {
            Some("ok") => {}
            Some("epoch") => {
                self.invalidate(queue);
                self.kick.notify_one();
                return Ok(());
            }
            Some("reaped") => {
                self.reaped(queue);
                self.kick.notify_one();
                return Ok(());
            }
            _ => return Err(reply_error("keepalive")),
        }
        self.sent(queue, view);
        let hold_ms = items.get(1).and_then(int).unwrap_or(0);
        let status = QueueStatus {
            waiting: items.get(2).and_then(int).unwrap_or(0),
            leases_expired: items.get(3).and_then(int).unwrap_or(0),
            inflight: items.get(4).map(parse_counts).unwrap_or_default(),
            // Asked for by `/status` only (peek), not at every keep-alive.
            oldest_wait: None,
        };
        {
            let mut st = lock(&self.state);
            if let Some(peers) = items.get(6).and_then(parse_peers) {
                st.peers = peers;
            }
            if let Some(q) = st.queues.get_mut(queue) {
                q.status = status;
            }
        }
        if let Some(granted) = items.get(5) {
            self.deliver_pairs(granted);
        }
        if hold_ms > 0 {
            self.kick_after(Duration::from_millis(hold_ms));
        }
        Ok(())
    }

    /// How long a released id is remembered as gone, in ms (the scripts' `tombstone_ms`): long
    /// enough to outlast any re-assertion in flight that still lists the id (a few round
    /// trips, each bounded by the io timeout).
    fn tombstone_ms(&self) -> String {
        self.opts
            .lease_ttl
            .max(TOMBSTONE_MIN)
            .as_millis()
            .to_string()
    }

    async fn leave(&self, queue: &str, n: u64) -> Result<(), RedisError> {
        let args = [self.wire_id(n), self.tombstone_ms()];
        self.eval(&self.scripts.leave, queue, &args).await.map(drop)
    }

    /// Forgets a lease or waiter locally and tells Redis (spawned: called from `Drop`).
    fn forget_and_leave(
        self: &Arc<Self>,
        queue: &str,
        n: u64,
    ) -> Option<tokio::task::JoinHandle<()>> {
        lock(&self.state).entries.remove(&n);
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let queue = queue.to_string();
        if !*self.reachable.borrow() {
            lock(&self.state).failed_leaves.push((queue, n));
            return None;
        }
        let me = Arc::clone(self);
        let in_flight = Arc::clone(&self.releases_in_flight);
        in_flight.fetch_add(1, Ordering::AcqRel);
        let release = async move {
            if let Err(e) = me.leave(&queue, n).await {
                me.lost(&e);
                lock(&me.state).failed_leaves.push((queue, n));
            }
            in_flight.fetch_sub(1, Ordering::AcqRel);
        };
        Some(match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.spawn(release),
            Err(_) => self.runtime.spawn(release),
        })
    }

    /// A grant for waiter `n` (from the acquire reply, pub/sub or a keep-alive).
    fn deliver(&self, n: u64, addr: SocketAddr) {
        let mut st = lock(&self.state);
        if let Some(entry) = st.entries.get_mut(&n) {
            if let Slot::Waiting { wake, .. } = &mut entry.slot {
                let wake = wake.take();
                entry.slot = Slot::Leased(addr);
                if let Some(wake) = wake {
                    let _ = wake.send(addr);
                }
            }
        }
        // Unknown: the request left meanwhile; its leave (sent after) gives the slot back.
    }

    fn deliver_pairs(&self, pairs: &Value) {
        let Value::Array(items) = pairs else { return };
        for pair in items.chunks(2) {
            if let [id, addr] = pair {
                if let (Some(n), Some(addr)) = (
                    string(id).and_then(|id| self.parse_id(&id)),
                    string(addr).and_then(|a| a.parse().ok()),
                ) {
                    self.deliver(n, addr);
                }
            }
        }
    }

    fn on_grant(&self, payload: &str) {
        let mut words = payload.split(' ');
        if let (Some(Some(n)), Some(Ok(addr))) = (
            words.next().map(|id| self.parse_id(id)),
            words.next().map(str::parse::<SocketAddr>),
        ) {
            self.deliver(n, addr);
        }
    }

    fn epoch(&self, queue: &str) -> Option<String> {
        lock(&self.state)
            .queues
            .get(queue)
            .and_then(|q| q.epoch.clone())
    }

    fn invalidate(&self, queue: &str) {
        if let Some(q) = lock(&self.state).queues.get_mut(queue) {
            q.epoch = None;
            q.known = false;
        }
    }

    fn reaped(&self, queue: &str) {
        self.reaped_while_alive.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "redis ledger: this agent's entries in queue {queue} expired while it was alive \
             (no keep-alive got through for {:?}); re-asserting them",
            self.opts.lease_ttl
        );
        self.invalidate(queue);
    }

    /// (registered?, view argument: "-" when Redis has it already).
    fn call_view(&self, queue: &str) -> (bool, String) {
        let st = lock(&self.state);
        match st.queues.get(queue) {
            Some(q) if q.view_sent.as_ref() == Some(&q.view) => (q.known, "-".into()),
            Some(q) => (q.known, q.view.clone()),
            None => (false, String::new()),
        }
    }

    /// A call naming `view` succeeded: Redis has that view and knows the agent.
    fn sent(&self, queue: &str, view: String) {
        if let Some(q) = lock(&self.state).queues.get_mut(queue) {
            q.known = true;
            if view != "-" {
                q.view_sent = Some(view);
            }
        }
    }

    async fn wait_reachable(&self, deadline: Instant) -> bool {
        let mut rx = self.reachable.subscribe();
        tokio::select! {
            r = rx.wait_for(|up| *up) => r.is_ok(),
            _ = sleep_until(deadline) => false,
        }
    }

    /// A Redis call failed: count it; the first failure of an episode logs and marks Redis
    /// unreachable, which holds new calls until the keep-alive task gets through again.
    fn lost(&self, e: &RedisError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self
            .reachable
            .send_if_modified(|up| std::mem::replace(up, false))
        {
            self.unreachable_episodes.fetch_add(1, Ordering::Relaxed);
            lock(&self.state).unreachable_since = Some(StdInstant::now());
            log::warn!(
                "redis ledger unreachable ({e}): requests wait in their queue until it is back \
                 or they time out; requests on pods run on"
            );
            self.kick.notify_one();
        }
    }

    /// Redis answers again: look for a server change, then let requests through.
    async fn back(&self) -> Result<(), RedisError> {
        let sid = self.server_id().await?;
        let since = {
            let mut st = lock(&self.state);
            if st.server.as_ref().is_some_and(|old| *old != sid) {
                for q in st.queues.values_mut() {
                    q.epoch = None;
                    q.known = false;
                }
            }
            st.server = Some(sid);
            st.unreachable_since.take()
        };
        self.reachable.send_replace(true);
        log::info!(
            "redis ledger reachable again{}",
            since
                .map(|s| format!(" after {:?}", s.elapsed()))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Redis's `run_id`: changes with a restart or a failover. A server that refuses `INFO`
    /// (some managed offerings restrict it) gets "-": a restart is still seen by its missing
    /// epoch, a failover to a replica then only by the dropped connections.
    async fn server_id(&self) -> Result<String, RedisError> {
        let mut conn = self.conn.clone();
        let info = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut conn)
            .await;
        let (sid, uptime) = match info {
            Ok(info) => (
                info_field(&info, "run_id")
                    .filter(|s| !s.is_empty() && !s.contains('/'))
                    .unwrap_or_else(|| "-".into()),
                info_field(&info, "uptime_in_seconds")
                    .and_then(|s| s.parse().ok())
                    .map(Duration::from_secs),
            ),
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(e)
            }
            Err(_) => ("-".into(), None),
        };
        let mut st = lock(&self.state);
        st.uptime = uptime;
        if st.server.is_none() {
            st.server = Some(sid.clone());
        }
        Ok(sid)
    }

    async fn eval(
        &self,
        script: &Script,
        queue: &str,
        args: &[String],
    ) -> Result<Value, RedisError> {
        let mut call = script.prepare_invoke();
        call.key(LEDGER_PREFIX);
        call.arg(queue);
        for a in args {
            call.arg(a);
        }
        let mut conn = self.conn.clone();
        let start = StdInstant::now();
        let v = call.invoke_async(&mut conn).await?;
        let mut samples = lock(&self.round_trips);
        if samples.len() >= ROUND_TRIP_SAMPLES {
            samples.clear();
        }
        samples.push(start.elapsed());
        Ok(v)
    }

    /// Kicks the keep-alive after `d` (the end of a recovery hold: somebody must pump then).
    fn kick_after(&self, d: Duration) {
        let at = Instant::now() + d + Duration::from_millis(5);
        {
            let mut st = lock(&self.state);
            if st.hold_kick.is_some_and(|k| k > Instant::now() && k <= at) {
                return;
            }
            st.hold_kick = Some(at);
        }
        let kick = Arc::clone(&self.kick);
        self.runtime.spawn(async move {
            sleep_until(at).await;
            kick.notify_one();
        });
    }

    fn wire_id(&self, n: u64) -> String {
        format!("{}#{n}", self.agent)
    }

    fn parse_id(&self, id: &str) -> Option<u64> {
        let (agent, n) = id.rsplit_once('#')?;
        if agent != self.agent {
            return None;
        }
        n.parse().ok()
    }
}

impl Drop for RedisLedger {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// Renews leases every `keepalive_every`, or probes Redis every [`PROBE_EVERY`] while it is
/// unreachable. Holds the ledger only while working, so dropping the last `Arc` ends it.
async fn keepalive_task(weak: Weak<RedisLedger>, kick: Arc<Notify>) {
    loop {
        let wait = match weak.upgrade() {
            Some(me) if *me.reachable.borrow() => me.keepalive_every,
            Some(_) => PROBE_EVERY,
            None => return,
        };
        tokio::select! {
            _ = sleep(wait) => {}
            _ = kick.notified() => {}
        }
        let Some(me) = weak.upgrade() else { return };
        if me.stopped.load(Ordering::Relaxed) {
            return;
        }
        if !*me.reachable.borrow() {
            let mut conn = me.conn.clone();
            let ping = redis::cmd("PING");
            match timeout(me.opts.io_timeout, ping.query_async::<String>(&mut conn)).await {
                Ok(Ok(_)) => {
                    if let Err(e) = me.back().await {
                        me.errors.fetch_add(1, Ordering::Relaxed);
                        log::debug!("redis ledger: still unreachable: {e}");
                        continue;
                    }
                }
                _ => continue,
            }
        }
        if let Err(e) = me.keepalive_round().await {
            me.lost(&e);
        }
    }
}

/// Listens on this agent's grant channel; re-subscribes after a drop and then kicks a
/// keep-alive, which finds the grants published while nobody listened.
async fn grants_task(weak: Weak<RedisLedger>) {
    loop {
        let Some(me) = weak.upgrade() else { return };
        let client = me.client.clone();
        let channel = format!("lb:grant:{}", me.agent);
        let io_timeout = me.opts.io_timeout;
        let kick = Arc::clone(&me.kick);
        drop(me);
        let subscribed = timeout(io_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let Ok(Ok(pubsub)) = subscribed else {
            sleep(PROBE_EVERY).await;
            continue;
        };
        kick.notify_one();
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Some(me) = weak.upgrade() else { return };
            if let Ok(payload) = msg.get_payload::<String>() {
                me.on_grant(&payload);
            }
        }
        // The connection dropped (Redis restarted?): let the keep-alive find out now.
        kick.notify_one();
        sleep(PROBE_EVERY).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every key of the ledger, whatever the pool, has this prefix: a pod reached by several pools
/// has one count, and the queue is one across pools. The braces make it one Redis Cluster hash
/// slot (a script may only touch keys of one slot).
const LEDGER_PREFIX: &str = "lb:{ledger}:";

/// `<version>;<addr>=<limit>,…`: the Lua side keeps the version apart and writes a view only
/// if it is not older than the one it has (`set_view` in common.lua).
fn encode_view(view: &AgentView) -> String {
    let mut s = format!("{};", view.version);
    for (i, (addr, limit)) in view.pods.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{addr}={limit}");
    }
    s
}

fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

fn reply_error(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "unexpected ledger script reply",
        what.to_string(),
    ))
}

fn parse_reply(v: Value) -> Result<Reply, RedisError> {
    let items = array(v).ok_or_else(|| reply_error("acquire"))?;
    let kind = items.first().and_then(string);
    Ok(match kind.as_deref() {
        Some("granted") => Reply::Granted(
            items
                .get(1)
                .and_then(string)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| reply_error("acquire: address"))?,
        ),
        Some("queued") => Reply::Queued {
            stamp: items.get(1).and_then(int).unwrap_or(0),
            hold_ms: items.get(2).and_then(int).unwrap_or(0),
        },
        Some("full") => Reply::Full,
        Some("epoch") => Reply::Epoch,
        Some("reaped") => Reply::Reaped,
        _ => return Err(reply_error("acquire")),
    })
}

/// A field of an `INFO` answer (`name:value` lines).
fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// `{reg, ttl_ms, ...}` from a script into pairs.
fn parse_peers(v: &Value) -> Option<Vec<(String, String)>> {
    let Value::Array(items) = v else { return None };
    Some(
        items
            .chunks(2)
            .filter_map(|pair| match pair {
                [reg, ttl] => Some((string(reg)?, int(ttl)?.to_string())),
                _ => None,
            })
            .collect(),
    )
}

fn parse_counts(v: &Value) -> Vec<(SocketAddr, u32)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut counts: Vec<(SocketAddr, u32)> = items
        .chunks(2)
        .filter_map(|pair| match pair {
            [addr, n] => Some((string(addr)?.parse().ok()?, u32::try_from(int(n)?).ok()?)),
            _ => None,
        })
        .collect();
    counts.sort();
    counts
}

fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => string(v)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_and_ids_round_trip() {
        let a: SocketAddr = "127.0.1.1:80".parse().unwrap();
        let b: SocketAddr = "127.0.1.2:80".parse().unwrap();
        assert_eq!(
            encode_view(&AgentView::new(vec![(a, 2), (b, 3)], 7)),
            "7;127.0.1.1:80=2,127.0.1.2:80=3"
        );
        assert_eq!(encode_view(&AgentView::default()), "0;");
        assert_eq!(join_addrs(&[a, b]), "127.0.1.1:80,127.0.1.2:80");
    }
}
