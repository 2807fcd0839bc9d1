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
//!   slot to the oldest waiter are Lua scripts (`scripts/*.lua`, run with EVALSHA and
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
//!   [`recovery::TOMBSTONE_MIN`] or `lease_ttl`), and the re-assertion does not bring it back: no slot is
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
//! # Where
//!
//! This file is the door (the client, acquiring, leases, status, leaving); [`wire`] the wire
//! format and scripts, [`recovery`] epochs and re-assertion, [`tasks`] the keep-alive and the
//! grant listener, [`jobs`] asynchronous jobs' holds.
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
//! per pool (`lb:{<pool>}:`) do not see this ledger's counts: do not mix them in one rollout.
//! An agent cut off from Redis (alone) for `lease_ttl` cannot be told from a dead one: its
//! slots are given away, and it re-asserts them (over the caps) when it is back.

mod jobs;
mod recovery;
mod tasks;
mod wire;

pub use jobs::{JobHold, JobRecord};
pub use recovery::DEFAULT_RECOVERY_HOLD;
use tasks::*;
use wire::*;

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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
