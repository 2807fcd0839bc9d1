//! The shared slot ledger (src/balance/shared/) against a real `redis-server` on loopback.
//!
//! Several `RedisLedger` instances in one process stand for several agents; the pods are fake
//! addresses 127.0.1.x:80 (the ledger never connects to them). Caps are checked twice: with a
//! counter of the live leases the test itself holds per pod, and with the global counts read
//! from Redis while the test runs.
//!
//! Needs `redis-server` on the PATH (Debian package `redis-server`; `.ci/run` installs it).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_agent::balance::shared::{
    AcquireError, AgentView, JobHold, JobRecord, LedgerOptions, RedisLedger,
};
use tokio::time::{sleep, Instant};

/// A `redis-server` on 127.0.0.1, without persistence: a restart loses everything, the worst
/// case the ledger must survive.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis { port, child: None };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on the same port; returns when it accepts connections.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// SIGSTOP / SIGCONT: a Redis that hangs without closing its connections.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// kill -9: nothing is saved.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pod(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, i], 80))
}

fn opts(lease_ttl_ms: u64, hold_ms: u64) -> LedgerOptions {
    let mut o = LedgerOptions::new(Duration::from_millis(lease_ttl_ms));
    o.recovery_hold = Duration::from_millis(hold_ms);
    o.io_timeout = Duration::from_millis(500);
    o
}

async fn agents(redis: &Redis, n: usize, o: LedgerOptions) -> Vec<Arc<RedisLedger>> {
    // RUST_LOG=warn shows the ledger's episode lines.
    let _ = env_logger::builder().is_test(true).try_init();
    let mut v = Vec::new();
    for i in 0..n {
        v.push(
            RedisLedger::connect_with(&redis.url(), format!("agent{i}-{}", std::process::id()), o)
                .await
                .unwrap(),
        );
    }
    v
}

/// Waits (bounded) until `cond` holds.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return;
        }
        sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Live leases per pod as the test sees them (from the leases it holds), and the highest
/// count seen per pod.
#[derive(Default)]
struct Held(Mutex<HashMap<SocketAddr, (u32, u32)>>);

impl Held {
    fn take(&self, addr: SocketAddr) {
        let mut m = self.0.lock().unwrap();
        let e = m.entry(addr).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }
    /// Call before dropping the lease, so the count never lags behind the ledger's.
    fn give(&self, addr: SocketAddr) {
        self.0.lock().unwrap().get_mut(&addr).unwrap().0 -= 1;
    }
    fn max(&self, addr: SocketAddr) -> u32 {
        self.0.lock().unwrap().get(&addr).map_or(0, |e| e.1)
    }
}

/// Samples the global in-flight counts in Redis until stopped; returns the max per pod.
fn watch_global(
    ledger: Arc<RedisLedger>,
    queue: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<SocketAddr, u32>> {
    tokio::spawn(async move {
        let mut max: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..20_000 {
            // Bounded in count and in time (each read times out after the io timeout).
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(status) = ledger.queue_status(queue).await {
                for (addr, n) in status.inflight {
                    let m = max.entry(addr).or_default();
                    *m = (*m).max(n);
                }
            }
            sleep(Duration::from_millis(2)).await;
        }
        max
    })
}

const Q: &str = "svc.ns.svc.cluster.local:80";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_through_three_agents_holds_every_cap_and_serves_all() {
    let redis = Redis::start();
    let agents = agents(&redis, 3, opts(5_000, 300)).await;
    let limit = 2;
    let pods = AgentView::new((1..=4).map(|i| (pod(i), limit)).collect(), 1);
    let held = Arc::new(Held::default());
    let stop = Arc::new(AtomicBool::new(false));
    let global = watch_global(Arc::clone(&agents[0]), Q, Arc::clone(&stop));

    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let agent = Arc::clone(&agents[i as usize % 3]);
        let pods = pods.clone();
        let held = Arc::clone(&held);
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let lease = agent
                .acquire(Q, &pods, &[], 1000, deadline, &mut None)
                .await?;
            held.take(lease.addr());
            sleep(Duration::from_millis(5 + (i * 7) % 30)).await;
            held.give(lease.addr());
            drop(lease);
            Ok::<_, AcquireError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every request is served");
    }
    stop.store(true, Ordering::Relaxed);
    let global = global.await.unwrap();
    for (addr, _) in &pods.pods {
        assert!(
            held.max(*addr) <= limit,
            "{addr}: {} leases held at once",
            held.max(*addr)
        );
        let g = global.get(addr).copied().unwrap_or(0);
        assert!(g <= limit, "{addr}: global count {g} in Redis");
    }
    assert!(
        pods.pods.iter().any(|(a, _)| held.max(*a) == limit),
        "the burst must fill pods to their limit for the check to mean anything"
    );
    eventually("all slots back", Duration::from_secs(5), || async {
        let s = agents[1].queue_status(Q).await.unwrap();
        s.inflight.is_empty() && s.waiting == 0
    })
    .await;
}

/// Waiters queued on three agents in a known order get the slot in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_across_agents() {
    let redis = Redis::start();
    let agents = agents(&redis, 3, opts(5_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let first = agents[0]
        .acquire(Q, &pods, &[], 100, far(), &mut None)
        .await
        .unwrap();

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..9usize {
        let agent = Arc::clone(&agents[[1, 2, 0][i % 3]]);
        let (pods, order) = (pods.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let lease = agent
                .acquire(Q, &pods, &[], 100, far(), &mut None)
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            sleep(Duration::from_millis(10)).await;
            lease.release().await;
        }));
        eventually("the waiter is queued", Duration::from_secs(5), || async {
            agents[0].queue_status(Q).await.unwrap().waiting == i as u64 + 1
        })
        .await;
    }
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..9).collect::<Vec<_>>());
}

/// Issue 18, item 3: a request reads its agent's pods of the pool, then discovery replaces
/// pod 1 by pod 2, then the request asks the ledger for a slot. Its older view must not be
/// written back over the newer one: before, it was, and the request (and every waiter after
/// it) was given pod 1, which the agent had removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_pod_list_never_replaces_a_newer_one() {
    let redis = Redis::start();
    let agents = agents(&redis, 1, opts(5_000, 200)).await;
    let a = &agents[0];
    let far = || Instant::now() + Duration::from_secs(10);
    let read_before = AgentView::new(vec![(pod(1), 1)], 1);
    let warm = a
        .acquire(Q, &read_before, &[], 10, far(), &mut None)
        .await
        .unwrap();
    assert_eq!(warm.addr(), pod(1));
    warm.release().await;
    a.set_pods(Q, &AgentView::new(vec![(pod(2), 1)], 2));
    for _ in 0..3 {
        let lease = a
            .acquire(Q, &read_before, &[], 10, far(), &mut None)
            .await
            .unwrap();
        assert_eq!(lease.addr(), pod(2), "pod 1 left the agent's pod list");
        lease.release().await;
    }
}

/// Issue 18, item 3: a request retried after a connect failure keeps its place in the shared
/// queue. R waits first, then T, then U (on two agents); R is given the first pod that frees,
/// fails to connect to it and asks again excluding it (the freed pod goes to T). When the other
/// pod frees, it is R's: R arrived before U. Before, the retry had a new stamp and U was
/// served first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_keeps_its_place_in_the_shared_queue() {
    let redis = Redis::start();
    let agents = agents(&redis, 2, opts(5_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1), (pod(2), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let x = agents[0]
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    let y = agents[0]
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    let waiting = |n: u64| {
        let a = Arc::clone(&agents[0]);
        async move { a.queue_status(Q).await.unwrap().waiting == n }
    };

    let (r_tx, mut r_rx) = tokio::sync::mpsc::unbounded_channel();
    let first_try = {
        let (a, pods, r_tx) = (Arc::clone(&agents[0]), pods.clone(), r_tx.clone());
        tokio::spawn(async move {
            let mut arrival = None;
            let lease = a.acquire(Q, &pods, &[], 10, far(), &mut arrival).await;
            let _ = r_tx.send((lease.unwrap(), arrival));
        })
    };
    eventually("R waits", Duration::from_secs(5), || waiting(1)).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut others = Vec::new();
    for tag in [1, 2] {
        let (a, pods, tx) = (Arc::clone(&agents[1]), pods.clone(), tx.clone());
        others.push(tokio::spawn(async move {
            let lease = a
                .acquire(Q, &pods, &[], 10, far(), &mut None)
                .await
                .unwrap();
            let _ = tx.send((tag, lease.addr()));
            sleep(Duration::from_secs(30)).await;
            drop(lease);
        }));
        eventually("T and U wait", Duration::from_secs(5), || waiting(tag + 1)).await;
    }

    let x_addr = x.addr();
    x.release().await;
    first_try.await.unwrap();
    let (lease, arrival) = r_rx.recv().await.unwrap();
    assert_eq!(lease.addr(), x_addr, "R, the oldest, has the freed pod");
    assert!(arrival.is_some());
    // R could not connect: its slot goes back (to T) and it asks again without that pod.
    lease.release().await;
    assert_eq!(rx.recv().await, Some((1, x_addr)), "T has R's pod");
    let retry = {
        let (a, pods) = (Arc::clone(&agents[0]), pods.clone());
        tokio::spawn(async move {
            let mut arrival = arrival;
            let lease = a
                .acquire(Q, &pods, &[x_addr], 10, far(), &mut arrival)
                .await;
            let _ = r_tx.send((lease.unwrap(), arrival));
        })
    };
    eventually("R and U wait", Duration::from_secs(5), || waiting(2)).await;

    let y_addr = y.addr();
    y.release().await;
    let (lease, _) = r_rx.recv().await.unwrap();
    assert_eq!(lease.addr(), y_addr, "R arrived before U: the pod is R's");
    retry.await.unwrap();
    assert!(rx.try_recv().is_err(), "U still waits");
    for t in others {
        t.abort();
    }
}

/// An asynchronous job's hold outlives its agent: A's lease, marked as a job's, is not freed
/// when A stops renewing (B's request waits on), but when nobody adopts it (B has no such
/// route), it is freed at the job's deadline (its `max_duration`). Before, an orphan nobody
/// adopted held its pod's slot for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_hold_outlives_its_agent_until_its_deadline() {
    let redis = Redis::start();
    let agents = agents(&redis, 2, opts(500, 200)).await;
    let (a, b) = (&agents[0], &agents[1]);
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let lease = a
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let record = JobRecord {
        job: 7,
        deadline_unix_ms: now_ms + 2_500,
        route: "/submit".into(),
        path: Some("/tasks/7".into()),
    };
    assert_eq!(lease.hold_job(&record).await.unwrap(), JobHold::Held);
    // A vanishes (renews nothing any more).
    a.abandon();
    let started = Instant::now();
    let waiter = {
        let (b, pods) = (Arc::clone(b), pods.clone());
        tokio::spawn(async move { b.acquire(Q, &pods, &[], 10, far(), &mut None).await })
    };
    sleep(Duration::from_millis(1_500)).await;
    assert!(
        !waiter.is_finished(),
        "the job's slot was freed with its agent"
    );
    let granted = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("freed at the job's deadline")
        .unwrap()
        .unwrap();
    assert_eq!(granted.addr(), pod(1));
    assert!(
        started.elapsed() >= Duration::from_millis(2_000),
        "{:?}",
        started.elapsed()
    );
    drop(lease);
}

/// A full queue refuses at once; a request whose future is dropped leaves the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_dropped_waiter() {
    let redis = Redis::start();
    let agents = agents(&redis, 2, opts(5_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let lease = agents[0]
        .acquire(Q, &pods, &[], 2, far(), &mut None)
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for i in 0..2u64 {
        let (agent, pods) = (Arc::clone(&agents[i as usize % 2]), pods.clone());
        waiters.push(tokio::spawn(async move {
            agent
                .acquire(Q, &pods, &[], 2, far(), &mut None)
                .await
                .map(|l| l.addr())
        }));
        eventually("queued", Duration::from_secs(5), || async {
            agents[0].queue_status(Q).await.unwrap().waiting == i + 1
        })
        .await;
    }
    let start = Instant::now();
    let refused = agents[1].acquire(Q, &pods, &[], 2, far(), &mut None).await;
    assert_eq!(refused.unwrap_err(), AcquireError::Full);
    assert!(start.elapsed() < Duration::from_secs(1));

    // The first waiter's client goes away: it leaves, and the slot goes to the second.
    waiters.remove(0).abort();
    eventually(
        "the dropped waiter left",
        Duration::from_secs(5),
        || async { agents[0].queue_status(Q).await.unwrap().waiting == 1 },
    )
    .await;
    drop(lease);
    let got = tokio::time::timeout(Duration::from_secs(5), waiters.remove(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Ok(pod(1)));
}

/// An agent that stops renewing (its process died): its slots return after lease_ttl, its
/// waiters leave the queue, and a waiter of another agent gets the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_agent_slots_return_after_lease_ttl() {
    let redis = Redis::start();
    let ttl = Duration::from_millis(1_000);
    let agents = agents(&redis, 2, opts(1_000, 200)).await;
    let (alive, dying) = (&agents[0], &agents[1]);
    let pods = AgentView::new(vec![(pod(1), 2)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let held = vec![
        dying
            .acquire(Q, &pods, &[], 10, far(), &mut None)
            .await
            .unwrap(),
        dying
            .acquire(Q, &pods, &[], 10, far(), &mut None)
            .await
            .unwrap(),
    ];
    let dying_waiter = {
        let (d, pods) = (Arc::clone(dying), pods.clone());
        tokio::spawn(async move {
            d.acquire(Q, &pods, &[], 10, far(), &mut None)
                .await
                .map(|l| l.addr())
        })
    };
    eventually(
        "dying agent's waiter queued",
        Duration::from_secs(5),
        || async { alive.queue_status(Q).await.unwrap().waiting == 1 },
    )
    .await;
    let alive_waiter = {
        let (a, pods) = (Arc::clone(alive), pods.clone());
        tokio::spawn(async move { a.acquire(Q, &pods, &[], 10, far(), &mut None).await })
    };
    eventually(
        "alive agent's waiter queued",
        Duration::from_secs(5),
        || async { alive.queue_status(Q).await.unwrap().waiting == 2 },
    )
    .await;

    // kill -9: no release, no keep-alive.
    dying.abandon();
    let died = Instant::now();
    drop(held);
    dying_waiter.abort();

    let lease = tokio::time::timeout(Duration::from_secs(5), alive_waiter)
        .await
        .expect("the slot came back")
        .unwrap()
        .unwrap();
    let took = died.elapsed();
    println!("dead agent's slots returned after {took:?} (lease_ttl {ttl:?})");
    assert!(
        took >= ttl - Duration::from_millis(400),
        "returned too early: {took:?}"
    );
    assert!(
        took <= ttl + Duration::from_millis(1_500),
        "returned too late: {took:?}"
    );
    let s = alive.queue_status(Q).await.unwrap();
    assert_eq!(s.waiting, 0, "the dead agent's waiter left the queue");
    assert_eq!(
        s.inflight,
        vec![(pod(1), 1)],
        "only the live agent's lease is counted"
    );
    assert_eq!(s.leases_expired, 2);

    // The live agent's keep-alive renews its lease however long its request runs.
    sleep(ttl * 2).await;
    let s = alive.queue_status(Q).await.unwrap();
    assert_eq!(
        s.inflight,
        vec![(pod(1), 1)],
        "a live lease outlasts lease_ttl"
    );
    assert_eq!(s.leases_expired, 2);
    drop(lease);
}

/// Redis restarted (kill -9, nothing saved) with a lease held and waiters queued on three
/// agents: the lease is re-asserted (the cap still holds: nobody else gets the pod), the
/// waiters are re-queued in their old order and served in it, before a request that arrived
/// after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_keeps_caps_and_queue_order() {
    let mut redis = Redis::start();
    let agents = agents(&redis, 3, opts(5_000, 1_000)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(30);
    let held = Arc::new(Held::default());

    let first = agents[0]
        .acquire(Q, &pods, &[], 100, far(), &mut None)
        .await
        .unwrap();
    held.take(first.addr());
    let order = Arc::new(Mutex::new(Vec::new()));
    let spawn_waiter = |i: usize, agent: &Arc<RedisLedger>| {
        let (agent, pods) = (Arc::clone(agent), pods.clone());
        let (order, held) = (Arc::clone(&order), Arc::clone(&held));
        tokio::spawn(async move {
            let lease = agent
                .acquire(Q, &pods, &[], 100, far(), &mut None)
                .await
                .unwrap();
            held.take(lease.addr());
            order.lock().unwrap().push(i);
            sleep(Duration::from_millis(20)).await;
            held.give(lease.addr());
            lease.release().await;
        })
    };
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(spawn_waiter(i, &agents[[1, 2, 0][i]]));
        eventually("queued", Duration::from_secs(5), || async {
            agents[0].queue_status(Q).await.unwrap().waiting == i as u64 + 1
        })
        .await;
    }

    redis.kill();
    sleep(Duration::from_millis(300)).await;
    redis.restart();
    // A new agent starts right after the restart and asks at once, before the others have
    // noticed: it must not be given the pod the old lease holds, and must queue behind the
    // old waiters once they are re-asserted.
    let late = RedisLedger::connect_with(&redis.url(), "late".into(), opts(5_000, 1_000))
        .await
        .unwrap();
    tasks.push(spawn_waiter(3, &late));

    // Everything is back in Redis, from what the agents knew.
    eventually(
        "lease and waiters re-asserted",
        Duration::from_secs(10),
        || async {
            agents[1]
                .queue_status(Q)
                .await
                .is_ok_and(|s| s.inflight == vec![(pod(1), 1)] && s.waiting == 4)
        },
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let global = watch_global(Arc::clone(&agents[2]), Q, Arc::clone(&stop));
    // The re-asserted lease still holds the pod: nobody got it meanwhile.
    sleep(Duration::from_millis(200)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "a waiter got a slot the old lease holds"
    );

    held.give(first.addr());
    drop(first);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("every waiter served")
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    assert!(held.max(pod(1)) <= 1);
    assert!(global.await.unwrap().get(&pod(1)).copied().unwrap_or(0) <= 1);
    let changes: u64 = agents.iter().map(|a| a.status().epoch_changes).sum();
    assert!(changes >= 1, "the restart was noticed");
}

/// Redis down: a new request waits and times out at its deadline (no fall-back that would
/// break the caps); once Redis is back, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_times_out_then_recovers() {
    let mut redis = Redis::start();
    let agents = agents(&redis, 1, opts(5_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let lease = agents[0]
        .acquire(
            Q,
            &pods,
            &[],
            10,
            Instant::now() + Duration::from_secs(5),
            &mut None,
        )
        .await
        .unwrap();
    lease.release().await;

    redis.kill();
    let start = Instant::now();
    let wait = Duration::from_millis(600);
    let r = agents[0]
        .acquire(Q, &pods, &[], 10, start + wait, &mut None)
        .await;
    let took = start.elapsed();
    assert_eq!(r.unwrap_err(), AcquireError::Timeout);
    assert!(
        took >= wait - Duration::from_millis(20),
        "gave up early: {took:?}"
    );
    assert!(
        took < wait + Duration::from_millis(500),
        "gave up late: {took:?}"
    );
    let status = agents[0].status();
    assert!(!status.reachable);
    assert_eq!(status.unreachable_episodes, 1);

    redis.restart();
    let lease = agents[0]
        .acquire(
            Q,
            &pods,
            &[],
            10,
            Instant::now() + Duration::from_secs(10),
            &mut None,
        )
        .await
        .expect("served once Redis is back");
    assert_eq!(lease.addr(), pod(1));
    assert!(agents[0].status().reachable);
    assert_eq!(
        agents[0].status().unreachable_episodes,
        1,
        "one episode, counted once"
    );
}

/// Not a timed assertion: prints the ledger's cost per request on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_per_acquire_and_release() {
    let redis = Redis::start();
    let agents = agents(&redis, 1, opts(5_000, 100)).await;
    let pods = AgentView::new((1..=4).map(|i| (pod(i), 2)).collect(), 1);
    let deadline = || Instant::now() + Duration::from_secs(5);
    // Warm up: the first call waits out the fresh ledger's recovery hold and loads the scripts.
    agents[0]
        .acquire(Q, &pods, &[], 10, deadline(), &mut None)
        .await
        .unwrap()
        .release()
        .await;

    let mut pairs = Vec::new();
    for _ in 0..2000 {
        let start = std::time::Instant::now();
        let lease = agents[0]
            .acquire(Q, &pods, &[], 10, deadline(), &mut None)
            .await
            .unwrap();
        lease.release().await;
        pairs.push(start.elapsed());
    }
    pairs.sort();
    let p = |q: f64| pairs[((pairs.len() as f64 * q) as usize).min(pairs.len() - 1)];
    println!(
        "ledger acquire+release on loopback, 2000 uncontended pairs: p50 {:?}, p99 {:?}, max {:?}",
        p(0.50),
        p(0.99),
        pairs[pairs.len() - 1]
    );
    let s = agents[0].queue_status(Q).await.unwrap();
    assert!(
        s.inflight.is_empty() && s.waiting == 0,
        "every slot released"
    );
}

/// Redis hangs (SIGSTOP) while a lease is held: a new request times out at its deadline; the
/// lease dropped meanwhile is released once Redis answers again, so no slot leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_release_is_retried_when_back() {
    let redis = Redis::start();
    let agents = agents(&redis, 2, opts(30_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(10);
    let lease = agents[0]
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();

    redis.signal("-STOP");
    let start = Instant::now();
    let wait = Duration::from_millis(800);
    let r = agents[1]
        .acquire(Q, &pods, &[], 10, start + wait, &mut None)
        .await;
    assert_eq!(r.unwrap_err(), AcquireError::Timeout);
    assert!(start.elapsed() >= wait - Duration::from_millis(20));
    // The request on the pod ends while Redis hangs.
    drop(lease);
    sleep(Duration::from_millis(700)).await;
    redis.signal("-CONT");

    // The release got through (lease_ttl is 30 s: expiry cannot be what freed the slot).
    eventually("the slot is free again", Duration::from_secs(5), || async {
        agents[1]
            .queue_status(Q)
            .await
            .is_ok_and(|s| s.inflight.is_empty() && s.waiting == 0)
    })
    .await;
    let lease = agents[1]
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    assert_eq!(lease.addr(), pod(1));
    assert_eq!(agents[1].queue_status(Q).await.unwrap().leases_expired, 0);
}

/// Redis hangs for longer than lease_ttl (SIGSTOP): nobody could renew, so nobody is reaped
/// when it answers again — a waiter must not be given the slots of agents that are alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalled_longer_than_lease_ttl_reaps_nobody() {
    let redis = Redis::start();
    let ttl = Duration::from_millis(1_000);
    let agents = agents(&redis, 4, opts(1_000, 200)).await;
    let pods = AgentView::new((1..=3).map(|i| (pod(i), 1)).collect(), 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let held = Arc::new(Held::default());
    let mut leases = Vec::new();
    for agent in &agents[..3] {
        let lease = agent
            .acquire(Q, &pods, &[], 10, far(), &mut None)
            .await
            .unwrap();
        held.take(lease.addr());
        leases.push(lease);
    }
    let waiter = {
        let (agent, pods, held) = (Arc::clone(&agents[3]), pods.clone(), Arc::clone(&held));
        tokio::spawn(async move {
            let lease = agent
                .acquire(Q, &pods, &[], 10, far(), &mut None)
                .await
                .unwrap();
            held.take(lease.addr());
            lease
        })
    };
    eventually("queued", Duration::from_secs(5), || async {
        agents[0].queue_status(Q).await.unwrap().waiting == 1
    })
    .await;

    redis.signal("-STOP");
    sleep(ttl + ttl / 2).await;
    redis.signal("-CONT");
    sleep(ttl + ttl / 2).await;

    let s = agents[0].queue_status(Q).await.unwrap();
    assert_eq!(s.leases_expired, 0, "live agents were reaped");
    assert_eq!(s.waiting, 1);
    assert_eq!(
        s.inflight,
        pods.pods.iter().map(|(a, _)| (*a, 1)).collect::<Vec<_>>()
    );
    assert!(
        !waiter.is_finished(),
        "the waiter got a slot that a live lease holds"
    );

    let freed = leases.remove(0);
    let addr = freed.addr();
    held.give(addr);
    drop(freed);
    let lease = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.addr(), addr);
    for (a, _) in &pods.pods {
        assert!(held.max(*a) <= 1, "{a}: {} at once", held.max(*a));
    }
}

/// Two pools (two routes, or a pool and its replacement after a reload) reaching the same pod.
const QA: &str = "static[127.0.1.1:80,127.0.1.2:80]";
const QB: &str = "static[127.0.1.2:80,127.0.1.3:80]";

/// Requests waiting in all the given pools, all agents together.
async fn waiting_in(agent: &RedisLedger, pools: &[&str]) -> u64 {
    let mut n = 0;
    for p in pools {
        n += agent.queue_status(p).await.unwrap().waiting;
    }
    n
}

/// Two pools whose pod lists share pod 2, limit 1, a burst through three agents on both: pod 2
/// has one cap, not one per pool (the test's own lease count and Redis's global count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_sharing_a_pod_share_its_cap() {
    let redis = Redis::start();
    let agents = agents(&redis, 3, opts(5_000, 300)).await;
    let pools = [
        (QA, AgentView::new(vec![(pod(1), 1), (pod(2), 1)], 1)),
        (QB, AgentView::new(vec![(pod(2), 1), (pod(3), 1)], 1)),
    ];
    let held = Arc::new(Held::default());
    let stop = Arc::new(AtomicBool::new(false));
    let watchers = [
        watch_global(Arc::clone(&agents[0]), QA, Arc::clone(&stop)),
        watch_global(Arc::clone(&agents[1]), QB, Arc::clone(&stop)),
    ];
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let agent = Arc::clone(&agents[i as usize % 3]);
        let (queue, pods) = pools[(i / 3) as usize % 2].clone();
        let held = Arc::clone(&held);
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let lease = agent
                .acquire(queue, &pods, &[], 1000, deadline, &mut None)
                .await?;
            held.take(lease.addr());
            sleep(Duration::from_millis(5 + (i * 7) % 30)).await;
            held.give(lease.addr());
            drop(lease);
            Ok::<_, AcquireError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every request is served");
    }
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        for (addr, g) in w.await.unwrap() {
            assert!(g <= 1, "{addr}: global count {g} in Redis");
        }
    }
    for i in 1..=3 {
        assert!(
            held.max(pod(i)) <= 1,
            "{}: {} leases held at once",
            pod(i),
            held.max(pod(i))
        );
    }
    assert_eq!(held.max(pod(2)), 1, "the shared pod was used");
    eventually("all slots back", Duration::from_secs(5), || async {
        let (a, b) = (
            agents[2].queue_status(QA).await.unwrap(),
            agents[2].queue_status(QB).await.unwrap(),
        );
        a.inflight.is_empty() && b.inflight.is_empty() && a.waiting + b.waiting == 0
    })
    .await;
}

/// One pod in two pools, limit 1: waiters queued in both pools through three agents get the
/// freed slot in their arrival order, whichever pool they wait in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_shared_pod_goes_to_the_oldest_waiter_of_any_pool() {
    let redis = Redis::start();
    let agents = agents(&redis, 3, opts(5_000, 200)).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let first = agents[0]
        .acquire(QA, &pods, &[], 100, far(), &mut None)
        .await
        .unwrap();

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..8usize {
        let agent = Arc::clone(&agents[[1, 2, 0][i % 3]]);
        let queue = [QB, QA][i % 2];
        let (pods, order) = (pods.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let lease = agent
                .acquire(queue, &pods, &[], 100, far(), &mut None)
                .await
                .unwrap();
            order.lock().unwrap().push(i);
            sleep(Duration::from_millis(10)).await;
            lease.release().await;
        }));
        eventually("the waiter is queued", Duration::from_secs(5), || async {
            waiting_in(&agents[0], &[QA, QB]).await == i as u64 + 1
        })
        .await;
    }
    assert_eq!(agents[0].queue_status(QA).await.unwrap().waiting, 4);
    assert_eq!(agents[0].queue_status(QB).await.unwrap().waiting, 4);
    drop(first);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("every waiter served")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
}

/// A waiter is only given a pod of its own pool, as its agent sees that pool: pool A is pod 1,
/// pool B pods 1 and 2, on the same agent. A's older waiter keeps waiting when pod 2 frees up
/// (B's younger waiter gets it), and gets pod 1 when that frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_never_given_a_pod_outside_its_pool() {
    let redis = Redis::start();
    let agents = agents(&redis, 2, opts(5_000, 200)).await;
    let a_pods = AgentView::new(vec![(pod(1), 1)], 1);
    let b_pods = AgentView::new(vec![(pod(1), 1), (pod(2), 1)], 1);
    let far = || Instant::now() + Duration::from_secs(20);
    let on_1 = agents[1]
        .acquire(QA, &a_pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    let on_2 = agents[1]
        .acquire(QB, &b_pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    assert_eq!((on_1.addr(), on_2.addr()), (pod(1), pod(2)));

    let spawn_waiter = |queue: &'static str, pods: &AgentView| {
        let (agent, pods) = (Arc::clone(&agents[0]), pods.clone());
        tokio::spawn(async move {
            agent
                .acquire(queue, &pods, &[], 10, far(), &mut None)
                .await
                .unwrap()
        })
    };
    let a_waiter = spawn_waiter(QA, &a_pods);
    eventually("A's request queued", Duration::from_secs(5), || async {
        agents[1].queue_status(QA).await.unwrap().waiting == 1
    })
    .await;
    let b_waiter = spawn_waiter(QB, &b_pods);
    eventually("B's request queued", Duration::from_secs(5), || async {
        agents[1].queue_status(QB).await.unwrap().waiting == 1
    })
    .await;

    drop(on_2);
    let b_lease = tokio::time::timeout(Duration::from_secs(5), b_waiter)
        .await
        .expect("B's request gets the freed pod 2")
        .unwrap();
    assert_eq!(b_lease.addr(), pod(2));
    sleep(Duration::from_millis(300)).await;
    assert!(!a_waiter.is_finished(), "A's request was given a pod of B");
    assert_eq!(agents[1].queue_status(QA).await.unwrap().waiting, 1);

    drop(on_1);
    let a_lease = tokio::time::timeout(Duration::from_secs(5), a_waiter)
        .await
        .expect("A's request gets pod 1")
        .unwrap();
    assert_eq!(a_lease.addr(), pod(1));
    let s = agents[1].queue_status(QB).await.unwrap();
    assert_eq!(s.inflight, vec![(pod(1), 1), (pod(2), 1)]);
    assert_eq!(s.waiting, 0);
}

/// A TCP relay between agents and Redis on loopback: delays every chunk by `delay` (a Redis a
/// network hop away, which widens the races a restart opens) and can cut its clients off
/// (existing connections closed, new ones closed at once) while Redis itself stays up.
struct Relay {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(redis: &Redis, delay: Duration) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = redis.port;
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *cut_rx.borrow() {
                    continue; // dropped: closed at once
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, delay) => {}
                        _ = pipe(sr, cw, delay) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Relay { port, cut, task }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.set_cut(true);
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        sleep(delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn agent_via(relay: &Relay, name: &str, o: LedgerOptions) -> Arc<RedisLedger> {
    let _ = env_logger::builder().is_test(true).try_init();
    RedisLedger::connect_with(&relay.url(), format!("{name}-{}", std::process::id()), o)
        .await
        .unwrap()
}

/// Issue 21, item 1. A request that ends while its agent re-asserts after a Redis restart
/// sends its release; it can reach the new, empty ledger before the re-assertion that still
/// lists it, and the re-assertion must not take that slot again (no request would ever
/// release it: the pod would stay "full" while idle, until the next epoch change). Redis
/// restarted 20 times under load, agents 2 ms away through relays; after each restart the
/// traffic pauses until every request has ended, and the ledger must then count nothing on any
/// pod. No pod ever had more leases at once than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_load_leave_no_ghost_slot_and_hold_the_caps() {
    let mut redis = Redis::start();
    let delay = Duration::from_millis(2);
    let relays = [
        Relay::start(&redis, delay).await,
        Relay::start(&redis, delay).await,
    ];
    let o = opts(2_000, 200);
    let agents = [
        agent_via(&relays[0], "ghost-a", o).await,
        agent_via(&relays[1], "ghost-b", o).await,
    ];
    let limit = 5;
    let pods = AgentView::new((1..=2).map(|i| (pod(i), limit)).collect(), 1);
    let held = Arc::new(Held::default());
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..16u64 {
        let agent = Arc::clone(&agents[c as usize % 2]);
        let (pods, held) = (pods.clone(), Arc::clone(&held));
        let (stop, paused, active) = (Arc::clone(&stop), Arc::clone(&paused), Arc::clone(&active));
        clients.push(tokio::spawn(async move {
            let mut served = 0u32;
            // Bounded: at most 100,000 rounds, and it stops when told.
            for i in 0..100_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if paused.load(Ordering::Relaxed) {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(5);
                if let Ok(lease) = agent
                    .acquire(Q, &pods, &[], 1000, deadline, &mut None)
                    .await
                {
                    held.take(lease.addr());
                    // Long enough that requests span each outage and end around the
                    // re-assertion that follows it.
                    sleep(Duration::from_millis(50 + (c * 37 + i * 53) % 350)).await;
                    held.give(lease.addr());
                    drop(lease);
                    served += 1;
                }
                active.fetch_sub(1, Ordering::SeqCst);
            }
            served
        }));
    }
    let mut ghosts = Vec::new();
    for round in 0..20 {
        sleep(Duration::from_millis(300)).await;
        redis.kill();
        sleep(Duration::from_millis(150)).await;
        redis.restart();
        sleep(Duration::from_millis(400)).await;
        // Quiet: every request ends, every release lands.
        paused.store(true, Ordering::SeqCst);
        eventually("requests ended", Duration::from_secs(10), || async {
            active.load(Ordering::SeqCst) == 0
        })
        .await;
        sleep(Duration::from_millis(300)).await;
        let s = agents[0].queue_status(Q).await;
        if let Ok(s) = s {
            if !s.inflight.is_empty() || s.waiting > 0 {
                ghosts.push((round, s.inflight, s.waiting));
            }
        }
        paused.store(false, Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for c in clients {
        served += tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("clients stop")
            .unwrap();
    }
    assert!(served > 50, "traffic ran through the restarts ({served})");
    let changes: u64 = agents.iter().map(|a| a.status().epoch_changes).sum();
    assert!(changes >= 20, "restarts noticed: {changes}");
    assert_eq!(
        ghosts,
        vec![],
        "(round, slots, waiters) counted in the ledger after every request had ended"
    );
    for (a, _) in &pods.pods {
        assert!(held.max(*a) <= limit, "{a}: {} at once", held.max(*a));
    }
    let over: u64 = agents
        .iter()
        .map(|a| a.status().reasserted_over_limit)
        .sum();
    assert_eq!(over, 0, "a re-assertion found its pod given away");
}

/// Issue 21, item 2. Agent B holds the only slot of a pod (limit 1, lease_ttl 30 s); Redis
/// restarts empty while B is cut off from it for 4 s, far less than its lease_ttl. Agent A,
/// which saw B alive before the restart, must not be given the pod until B has re-asserted its
/// lease — not after a fixed hold (300 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_reasserts_late_keeps_its_slot() {
    let mut redis = Redis::start();
    let relay_b = Relay::start(&redis, Duration::ZERO).await;
    let o = opts(30_000, 300);
    let a = agents(&redis, 1, o).await.remove(0);
    let b = agent_via(&relay_b, "late-b", o).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let held = Arc::new(Held::default());
    let far = || Instant::now() + Duration::from_secs(30);

    let lease_b = b
        .acquire(Q, &pods, &[], 10, far(), &mut None)
        .await
        .unwrap();
    held.take(lease_b.addr());
    // A has seen B's registration in a keep-alive (at most a second apart).
    let mut arrival = None;
    let warm = a.acquire(
        Q,
        &pods,
        &[],
        10,
        Instant::now() + Duration::from_millis(100),
        &mut arrival,
    );
    assert!(warm.await.is_err(), "the pod is B's");
    sleep(Duration::from_millis(1_200)).await;

    relay_b.set_cut(true);
    redis.kill();
    sleep(Duration::from_millis(200)).await;
    redis.restart();
    let waiter = {
        let (a, pods, held) = (Arc::clone(&a), pods.clone(), Arc::clone(&held));
        tokio::spawn(async move {
            let lease = a
                .acquire(Q, &pods, &[], 10, far(), &mut None)
                .await
                .unwrap();
            held.take(lease.addr());
            lease
        })
    };
    sleep(Duration::from_millis(4_000)).await;
    assert!(
        !waiter.is_finished(),
        "A was given the pod while B's request still runs on it"
    );

    relay_b.set_cut(false);
    eventually("B re-asserted", Duration::from_secs(10), || async {
        a.queue_status(Q)
            .await
            .is_ok_and(|s| s.inflight == vec![(pod(1), 1)])
    })
    .await;
    sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "A got the pod B re-asserted");
    held.give(lease_b.addr());
    drop(lease_b);
    let lease_a = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("A is served once B releases")
        .unwrap();
    assert_eq!(lease_a.addr(), pod(1));
    assert!(held.max(pod(1)) <= 1, "{} at once", held.max(pod(1)));
}

/// Issue 21 / 18: grants resume when the replicas have re-asserted, not after a timer. The
/// first request on an empty ledger of a Redis that has been up a while is served at once even
/// with a long `recovery_hold`; after a restart with every agent connected, a waiter gets the
/// freed pod long before that hold would end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_resume_when_every_replica_reasserted() {
    let mut redis = Redis::start();
    // uptime_in_seconds ≥ 2: older than the hold below.
    sleep(Duration::from_millis(2_100)).await;
    let o = opts(5_000, 2_000);
    let agents = agents(&redis, 2, o).await;
    let pods = AgentView::new(vec![(pod(1), 1)], 1);
    let asked = Instant::now();
    let first = agents[0]
        .acquire(
            Q,
            &pods,
            &[],
            10,
            Instant::now() + Duration::from_millis(500),
            &mut None,
        )
        .await
        .expect("a fresh ledger on a running Redis grants at once");
    println!("first grant on a fresh ledger: {:?}", asked.elapsed());
    sleep(Duration::from_millis(1_200)).await; // a keep-alive: each agent has seen the other

    redis.kill();
    sleep(Duration::from_millis(200)).await;
    redis.restart();
    let waiter = {
        let (agent, pods) = (Arc::clone(&agents[1]), pods.clone());
        tokio::spawn(async move {
            let lease = agent
                .acquire(
                    Q,
                    &pods,
                    &[],
                    10,
                    Instant::now() + Duration::from_secs(10),
                    &mut None,
                )
                .await
                .unwrap();
            (lease, Instant::now())
        })
    };
    eventually("lease re-asserted", Duration::from_secs(5), || async {
        agents[0]
            .queue_status(Q)
            .await
            .is_ok_and(|s| s.inflight == vec![(pod(1), 1)] && s.waiting == 1)
    })
    .await;
    let restarted = Instant::now();
    drop(first);
    let (_lease, at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    // The 2 s recovery_hold would still run here; only the re-assertions were waited for.
    println!(
        "waiter served {:?} after the release (re-assertions done before)",
        at.duration_since(restarted)
    );
    assert!(
        at.duration_since(restarted) < Duration::from_millis(1_000),
        "the waiter was served {:?} after the release",
        at.duration_since(restarted)
    );
}

/// Review finding (issue 21's tombstones, one case further): an epoch change on a Redis that
/// kept its data (a failover to a replica, a restart that reloads a snapshot). A request ends
/// while its agent re-asserts: its release reaches Redis first and *finds* the old lease there,
/// so it must still leave a tombstone, or the re-assertion that lists the lease takes the slot
/// again for a request that no longer exists (limit 1: the pod is lost). The scripts are run
/// here as the agent runs them (common.lua + each script), in the racing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_racing_reassertion_on_a_kept_ledger_is_not_undone() {
    const COMMON: &str = include_str!("../src/balance/shared/scripts/common.lua");
    let script = |part: &str| redis::Script::new(&format!("{COMMON}{part}"));
    let ensure = script(include_str!("../src/balance/shared/scripts/ensure.lua"));
    let acquire = script(include_str!("../src/balance/shared/scripts/acquire.lua"));
    let leave = script(include_str!("../src/balance/shared/scripts/leave.lua"));
    let reassert = script(include_str!("../src/balance/shared/scripts/reassert.lua"));
    let peek = script(include_str!("../src/balance/shared/scripts/peek.lua"));
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = "lb:{ledger}:";
    let view = "127.0.0.1:9=1";
    async fn run(
        s: &redis::Script,
        conn: &mut redis::aio::MultiplexedConnection,
        prefix: &str,
        args: &[&str],
    ) -> redis::Value {
        let mut call = s.prepare_invoke();
        call.key(prefix);
        for a in args {
            call.arg(*a);
        }
        call.invoke_async(conn).await.unwrap()
    }
    let first_epoch = |v: redis::Value| match v {
        redis::Value::Array(items) => match &items[0] {
            redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let e1 = first_epoch(run(&ensure, &mut conn, prefix, &[Q, "S1", "n1", "0", "0"]).await);
    let granted = run(
        &acquire,
        &mut conn,
        prefix,
        &[Q, &e1, "a", "30000", "0", "a#1", view, "", "10"],
    )
    .await;
    assert!(format!("{granted:?}").contains("granted"), "{granted:?}");
    // Another server id with the data kept: a new epoch over the old leases.
    let e2 = first_epoch(run(&ensure, &mut conn, prefix, &[Q, "S2", "n2", "0", "0"]).await);
    assert_ne!(e1, e2);
    // The release wins the race against the re-assertion that still lists a#1.
    run(&leave, &mut conn, prefix, &[Q, "a#1", "10000"]).await;
    run(
        &reassert,
        &mut conn,
        prefix,
        &[
            Q,
            &e2,
            "a",
            "30000",
            view,
            "1",
            "0",
            "L",
            "a#1",
            "127.0.0.1:9",
            "",
        ],
    )
    .await;
    let status = run(&peek, &mut conn, prefix, &[Q]).await;
    let redis::Value::Array(items) = status else {
        panic!("{status:?}")
    };
    assert_eq!(
        items[3],
        redis::Value::Array(vec![]),
        "a slot is counted for a request that ended"
    );
}
