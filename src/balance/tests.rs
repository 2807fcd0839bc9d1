//! The door's behaviour, through the door only: no test here touches the ledger's insides.
//! Paused time makes the queue tests instant and deterministic.

use super::*;
use proptest::prelude::*;
use std::time::Duration;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 1, i], 8000))
}

fn q(max_waiting: usize, ms: u64) -> QueuePolicy {
    QueuePolicy {
        max_waiting,
        timeout: Duration::from_millis(ms),
    }
}

fn after(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(ms)
}

const LONG: u64 = 60_000;

async fn pool(ledger: &Ledger, limit: usize, pods: &[u8]) -> Arc<Balancer> {
    let b = Arc::new(Balancer::new(ledger, "t", limit));
    b.set_pods(pods.iter().map(|i| addr(*i)).collect()).await;
    b
}

async fn take(b: &Balancer) -> Slot {
    b.acquire(&q(1000, LONG), after(LONG), &[], &mut Arrival::default())
        .await
        .unwrap()
}

/// Free slots on the pool's listed pods, as the ledger counts them.
fn free(b: &Balancer) -> usize {
    b.view()
        .pods
        .iter()
        .filter(|p| p.active)
        .map(|p| p.limit.saturating_sub(p.inflight))
        .sum()
}

/// A task that waits for a slot, holds it for `hold_ms`, and reports (tag, pod) when it got it.
fn spawn_waiter(
    b: &Arc<Balancer>,
    tag: usize,
    hold_ms: u64,
    tx: &tokio::sync::mpsc::UnboundedSender<(usize, SocketAddr)>,
) -> tokio::task::JoinHandle<Result<(), QueueError>> {
    let (b, tx) = (Arc::clone(b), tx.clone());
    tokio::spawn(async move {
        let slot = b
            .acquire(&q(1000, LONG), after(LONG), &[], &mut Arrival::default())
            .await?;
        let _ = tx.send((tag, slot.addr()));
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        drop(slot);
        Ok(())
    })
}

/// Lets every spawned task run until it blocks (paused time does not advance meanwhile).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn picks_least_loaded_and_rotates_ties() {
    let b = pool(&Ledger::new(), 3, &[1, 2, 3]).await;
    let mut slots = Vec::new();
    for _ in 0..3 {
        slots.push(take(&b).await);
    }
    let mut first: Vec<_> = slots.iter().map(|s| s.addr()).collect();
    first.sort();
    assert_eq!(first, vec![addr(1), addr(2), addr(3)], "one per pod first");
    slots.retain(|s| s.addr() != addr(2));
    assert_eq!(take(&b).await.addr(), addr(2), "the only least-loaded pod");
}

#[tokio::test(start_paused = true)]
async fn a_pod_that_timed_out_goes_last_even_when_it_accepts_connections() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let stuck = take(&b).await;
    let stuck_addr = stuck.addr();
    stuck.timed_out();
    drop(stuck);
    for _ in 0..4 {
        let s = take(&b).await;
        assert_ne!(s.addr(), stuck_addr, "the pod that timed out goes last");
        drop(s);
    }
    // Accepting a connection does not clear it (a hung pod accepts connections), and it still
    // takes requests when nothing else is free.
    let other = take(&b).await;
    let last = take(&b).await;
    assert_eq!(last.addr(), stuck_addr);
    last.connected();
    drop((other, last));
    assert_ne!(take(&b).await.addr(), stuck_addr);
    let view = b.view();
    assert!(view
        .pods
        .iter()
        .any(|p| p.addr == stuck_addr && p.recently_failed));
}

#[tokio::test(start_paused = true)]
async fn tried_pods_are_skipped() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let s = b
        .acquire(
            &q(10, LONG),
            after(LONG),
            &[addr(1)],
            &mut Arrival::default(),
        )
        .await;
    assert_eq!(s.as_ref().map(|s| s.addr()), Ok(addr(2)));
    drop(s);
    let all = [addr(1), addr(2)];
    assert_eq!(
        b.acquire(&q(10, LONG), after(LONG), &all, &mut Arrival::default())
            .await
            .unwrap_err(),
        QueueError::NoUntriedPod
    );
}

#[tokio::test(start_paused = true)]
async fn retry_waits_for_an_untried_pod_without_blocking_others() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let held = b
        .acquire(
            &q(10, LONG),
            after(LONG),
            &[addr(1)],
            &mut Arrival::default(),
        )
        .await;
    assert_eq!(held.as_ref().map(|s| s.addr()), Ok(addr(2)));
    let b2 = Arc::clone(&b);
    let retry = tokio::spawn(async move {
        let s = b2
            .acquire(
                &q(10, LONG),
                after(LONG),
                &[addr(1)],
                &mut Arrival::default(),
            )
            .await;
        s.map(|s| s.addr())
    });
    settle().await;
    assert!(!retry.is_finished(), "only pod 1 is free, and it was tried");
    assert_eq!(take(&b).await.addr(), addr(1), "a newcomer may use pod 1");
    drop(held);
    assert_eq!(retry.await.unwrap(), Ok(addr(2)));
}

/// Waiters that tried different pods sit in different groups of the queue (issue 18: a
/// release asks each group's oldest, not every waiter); a freed slot still goes to the oldest
/// waiter of all that may use it, whichever group it is in.
#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_oldest_waiter_that_may_use_it_across_tried_groups() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let mut held = vec![take(&b).await, take(&b).await];
    let wait = |tried: Vec<SocketAddr>| {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            b.acquire(&q(10, LONG), after(LONG), &tried, &mut Arrival::default())
                .await
        })
    };
    let a = wait(vec![addr(1)]);
    settle().await;
    let newcomer = wait(vec![]);
    settle().await;
    let c = wait(vec![addr(2)]);
    settle().await;
    let d = wait(vec![addr(1)]);
    settle().await;
    let slot_of = |held: &[Slot], a| held.iter().position(|s| s.addr() == a).unwrap();
    // Pod 2 frees: the oldest waiter, A, may use it (it tried pod 1 only).
    let i = slot_of(&held, addr(2));
    drop(held.swap_remove(i));
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.addr(), addr(2));
    // Pod 1 frees: A and D tried it; the newcomer is older than C.
    let i = slot_of(&held, addr(1));
    drop(held.swap_remove(i));
    let newcomer = newcomer.await.unwrap().unwrap();
    assert_eq!(newcomer.addr(), addr(1));
    // Pod 2 again: D (tried 1) is younger than C, but C tried pod 2: D gets it.
    drop(a);
    let d = d.await.unwrap().unwrap();
    assert_eq!(d.addr(), addr(2));
    settle().await;
    assert!(!c.is_finished(), "C may use only pod 1, which is held");
    drop(newcomer);
    assert_eq!(c.await.unwrap().map(|s| s.addr()), Ok(addr(1)));
    drop(d);
    assert_eq!(b.view().waiting, 0);
}

/// Issue 18: a retry waiting for its one untried pod gets `NoUntriedPod` at once when that pod
/// leaves the pool (only pods it tried are left), not a queue timeout much later.
#[tokio::test(start_paused = true)]
async fn a_retry_whose_untried_pods_all_left_is_answered_at_once() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let held = b
        .acquire(
            &q(10, LONG),
            after(LONG),
            &[addr(1)],
            &mut Arrival::default(),
        )
        .await;
    assert_eq!(held.as_ref().map(|s| s.addr()), Ok(addr(2)));
    let b2 = Arc::clone(&b);
    let started = tokio::time::Instant::now();
    let retry = tokio::spawn(async move {
        let s = b2
            .acquire(
                &q(10, LONG),
                after(LONG),
                &[addr(1)],
                &mut Arrival::default(),
            )
            .await;
        (s.map(|s| s.addr()), started.elapsed())
    });
    settle().await;
    assert!(!retry.is_finished(), "waits for pod 2");
    b.set_pods([addr(1)].into_iter().collect()).await;
    let (result, waited) = retry.await.unwrap();
    assert_eq!(result, Err(QueueError::NoUntriedPod));
    assert!(waited < Duration::from_secs(1), "answered after {waited:?}");
    assert_eq!(b.view().waiting, 0);
    drop(held);
}

/// The view says how long the oldest waiter has waited (for `/status` and the live page).
#[tokio::test(start_paused = true)]
async fn the_view_reports_the_oldest_waiters_age() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let held = take(&b).await;
    assert_eq!(b.view().oldest_wait, None);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let first = spawn_waiter(&b, 0, LONG, &tx);
    settle().await;
    tokio::time::advance(Duration::from_millis(700)).await;
    let second = spawn_waiter(&b, 1, LONG, &tx);
    settle().await;
    tokio::time::advance(Duration::from_millis(300)).await;
    let age = b.view().oldest_wait.expect("two wait");
    assert!(age >= Duration::from_millis(1000), "{age:?}");
    drop(held);
    settle().await;
    assert_eq!(b.view().waiting, 1, "the first got the slot");
    let age = b.view().oldest_wait.expect("one waits");
    assert!(
        age >= Duration::from_millis(300) && age < Duration::from_millis(1000),
        "the second's age: {age:?}"
    );
    first.abort();
    second.abort();
}

#[tokio::test(start_paused = true)]
async fn closing_answers_waiters_and_spares_slots_in_flight() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let held = take(&b).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let waiter = spawn_waiter(&b, 0, 0, &tx);
    settle().await;
    b.close();
    assert_eq!(waiter.await.unwrap(), Err(QueueError::ShuttingDown));
    let late = b
        .acquire(&q(10, LONG), after(LONG), &[], &mut Arrival::default())
        .await;
    assert_eq!(late.unwrap_err(), QueueError::ShuttingDown);
    assert_eq!(b.view().inflight, 1);
    drop(held);
    assert_eq!(b.view().inflight, 0);
}

#[tokio::test(start_paused = true)]
async fn full_pool_queues_then_times_out() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let _held = take(&b).await;
    let start = tokio::time::Instant::now();
    let r = b
        .acquire(&q(10, 500), after(500), &[], &mut Arrival::default())
        .await;
    assert_eq!(r.unwrap_err(), QueueError::Timeout);
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    assert_eq!(b.view().waiting, 0);
}

#[tokio::test(start_paused = true)]
async fn queue_full_refuses_at_once() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let _held = take(&b).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let waiter = spawn_waiter(&b, 0, 0, &tx);
    settle().await;
    assert_eq!(b.view().waiting, 1);
    let start = tokio::time::Instant::now();
    let r = b
        .acquire(&q(1, 10_000), after(10_000), &[], &mut Arrival::default())
        .await;
    assert_eq!(r.unwrap_err(), QueueError::Full);
    assert_eq!(start.elapsed(), Duration::ZERO);
    waiter.abort();
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let held = take(&b).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..10 {
        spawn_waiter(&b, i, 10, &tx);
        settle().await;
    }
    assert_eq!(b.view().waiting, 10);
    drop(held);
    let mut order = Vec::new();
    for _ in 0..10 {
        order.push(rx.recv().await.unwrap().0);
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(free(&b), 1);
}

#[tokio::test(start_paused = true)]
async fn abandoned_waiter_leaves_queue_without_leaking() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let held = take(&b).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let waiter = spawn_waiter(&b, 0, 0, &tx);
    settle().await;
    assert_eq!(b.view().waiting, 1);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(b.view().waiting, 0);
    drop(held);
    assert_eq!((free(&b), b.view().inflight), (1, 0));
}

/// The slot handed to a waiter whose future is dropped at that very moment (its deadline, its
/// client gone) comes back instead of being lost.
#[tokio::test(start_paused = true)]
async fn a_slot_granted_to_a_waiter_that_left_comes_back() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    let held = take(&b).await;
    let b2 = Arc::clone(&b);
    let waiter = tokio::spawn(async move {
        b2.acquire(&q(10, LONG), after(LONG), &[], &mut Arrival::default())
            .await
    });
    settle().await;
    drop(held); // granted to the waiter, which has not run yet
    waiter.abort(); // and never will
    let _ = waiter.await;
    assert_eq!((free(&b), b.view().inflight, b.view().waiting), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn added_pod_wakes_queued_request() {
    let b = pool(&Ledger::new(), 1, &[]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    spawn_waiter(&b, 0, LONG, &tx);
    settle().await;
    assert_eq!(b.view().waiting, 1);
    b.set_pods([addr(7)].into()).await;
    assert_eq!(rx.recv().await.unwrap(), (0, addr(7)));
}

#[tokio::test(start_paused = true)]
async fn removed_pod_keeps_counting_until_its_requests_finish() {
    let b = pool(&Ledger::new(), 2, &[1, 2]).await;
    let mut slots = Vec::new();
    for _ in 0..4 {
        slots.push(take(&b).await);
    }
    b.set_pods([addr(2)].into()).await;
    assert_eq!(b.view().inflight, 4);
    assert_eq!(b.view().pods.len(), 2, "pod 1 is shown while it works");
    drop(slots);
    assert_eq!((b.view().inflight, free(&b)), (0, 2));
    assert_eq!(b.view().pods.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn reappearing_pod_keeps_counting_old_requests() {
    let b = pool(&Ledger::new(), 2, &[1]).await;
    let a = take(&b).await;
    b.set_pods([].into()).await;
    b.set_pods([addr(1)].into()).await;
    assert_eq!(
        free(&b),
        1,
        "the old request still holds one of its two slots"
    );
    let c = take(&b).await;
    assert_eq!(b.view().pods[0].inflight, 2);
    let r = b
        .acquire(&q(10, 100), after(100), &[], &mut Arrival::default())
        .await;
    assert_eq!(r.unwrap_err(), QueueError::Timeout);
    drop((a, c));
    assert_eq!(free(&b), 2);
}

#[tokio::test(start_paused = true)]
async fn lowering_the_limit_holds_new_requests_until_below_it() {
    let b = pool(&Ledger::new(), 3, &[1]).await;
    let x = take(&b).await;
    let y = take(&b).await;
    b.set_limit(1);
    assert_eq!(free(&b), 0);
    drop(x);
    assert_eq!(free(&b), 0, "still at the new cap");
    drop(y);
    assert_eq!(free(&b), 1);
    b.set_limit(2);
    assert_eq!(free(&b), 2);
}

#[tokio::test]
async fn longest_recent_hold_forgets_old_requests() {
    let b = pool(&Ledger::new(), 1, &[1]).await;
    assert_eq!(
        b.view().longest_recent_hold,
        Duration::ZERO,
        "no history yet"
    );
    let long = take(&b).await;
    std::thread::sleep(Duration::from_millis(50));
    drop(long);
    assert!(b.view().longest_recent_hold >= Duration::from_millis(50));
    for _ in 0..16 {
        drop(take(&b).await);
    }
    let recent = b.view().longest_recent_hold;
    assert!(recent < Duration::from_millis(50), "{recent:?}");
}

/// Two pools (two routes, overlapping endpoint lists) reach pod 2: it has one cap, not one per
/// pool.
#[tokio::test(start_paused = true)]
async fn overlapping_pools_share_one_cap_per_address() {
    let ledger = Ledger::new();
    let a = pool(&ledger, 1, &[1, 2]).await;
    let b = pool(&ledger, 1, &[2, 3]).await;
    let held = [take(&b).await, take(&b).await];
    let mut pods: Vec<_> = held.iter().map(|s| s.addr()).collect();
    pods.sort();
    assert_eq!(pods, vec![addr(2), addr(3)]);
    let on_1 = take(&a).await;
    assert_eq!(on_1.addr(), addr(1));
    // Pod 2 is busy through the other pool: a's next request waits.
    let r = a
        .acquire(&q(10, 100), after(100), &[], &mut Arrival::default())
        .await;
    assert_eq!(r.unwrap_err(), QueueError::Timeout);
    for v in [a.view(), b.view()] {
        assert!(v.pods.iter().all(|p| p.inflight == 1), "{v:?}");
    }
}

/// A slot freed on a shared pod goes to the oldest waiter that may use it, whichever route it
/// came by.
#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_oldest_waiter_of_any_pool() {
    let ledger = Ledger::new();
    let a = pool(&ledger, 1, &[1]).await;
    let b = pool(&ledger, 1, &[1]).await;
    let held = take(&a).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..6 {
        spawn_waiter(if i % 2 == 0 { &b } else { &a }, i, 10, &tx);
        settle().await;
    }
    drop(held);
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(rx.recv().await.unwrap().0);
    }
    assert_eq!(order, (0..6).collect::<Vec<_>>());
}

/// A reload that replaces a pool (a static list grew): the new pool sees the old pool's request
/// in flight, and the request queued in the old pool keeps its place ahead of newcomers.
#[tokio::test(start_paused = true)]
async fn a_replacing_pool_counts_the_old_pools_slots_and_keeps_its_queue_order() {
    let ledger = Ledger::new();
    let old = pool(&ledger, 1, &[1]).await;
    let running = take(&old).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    spawn_waiter(&old, 0, 10, &tx);
    settle().await;
    let new = pool(&ledger, 1, &[1, 2]).await;
    let on_2 = take(&new).await;
    assert_eq!(
        on_2.addr(),
        addr(2),
        "pod 1 is busy with the old pool's request"
    );
    spawn_waiter(&new, 1, 10, &tx);
    settle().await;
    assert_eq!(new.view().waiting, 1, "the newcomer waits too");
    drop(running);
    assert_eq!(
        rx.recv().await.unwrap(),
        (0, addr(1)),
        "the older waiter first"
    );
    assert_eq!(rx.recv().await.unwrap(), (1, addr(1)));
}

/// A pool whose balancer is gone while one of its slots is still in flight (a request finishing
/// on its pod after its client left) keeps that pod capped until the slot comes back.
#[tokio::test(start_paused = true)]
async fn a_dropped_pool_keeps_its_pods_capped_until_its_last_slot_returns() {
    let ledger = Ledger::new();
    let old = pool(&ledger, 1, &[1]).await;
    let running = take(&old).await;
    drop(old);
    let new = pool(&ledger, 1, &[1]).await;
    let r = new
        .acquire(&q(10, 100), after(100), &[], &mut Arrival::default())
        .await;
    assert_eq!(r.unwrap_err(), QueueError::Timeout);
    drop(running);
    assert_eq!(take(&new).await.addr(), addr(1));
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(bool),
    Release(usize),
    SetPods(bool, Vec<u8>),
    SetLimit(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(Op::Acquire),
        3 => (0usize..64).prop_map(Op::Release),
        1 => (any::<bool>(), proptest::collection::vec(1u8..6, 0..5))
            .prop_map(|(p, v)| Op::SetPods(p, v)),
        1 => (1usize..4).prop_map(Op::SetLimit),
    ]
}

proptest! {
    /// Two pools with overlapping pod lists (and one shared limit), any interleaving of takes,
    /// releases, pod-list and limit changes: no pod ever holds more than the cap from both
    /// pools together, the counts match the slots held, and once everything is released every
    /// slot is usable again (nothing leaked, nothing double-counted).
    #[test]
    fn no_interleaving_exceeds_a_cap(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let ledger = Ledger::new();
            let pools = [pool(&ledger, 2, &[1, 2, 3]).await, pool(&ledger, 2, &[3, 4]).await];
            let mut limit = 2;
            let mut held: Vec<Slot> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(p) => {
                        let b = &pools[p as usize];
                        if let Ok(s) = b.acquire(&q(1000, 1), after(1), &[], &mut Arrival::default()).await {
                            prop_assert!(b.trusted_pods().contains(&s.addr()), "slot on a pod not in the list");
                            let mine = held.iter().filter(|h| h.addr() == s.addr()).count();
                            prop_assert!(mine < limit, "pod {} taken above cap {}", s.addr(), limit);
                            held.push(s);
                        }
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            let i = i % held.len();
                            held.swap_remove(i);
                        }
                    }
                    Op::SetPods(p, v) => pools[p as usize].set_pods(v.iter().map(|i| addr(*i)).collect()).await,
                    Op::SetLimit(l) => {
                        limit = l;
                        for b in &pools {
                            b.set_limit(l);
                        }
                    }
                }
                for b in &pools {
                    for p in b.view().pods {
                        let mine = held.iter().filter(|s| s.addr() == p.addr).count();
                        prop_assert_eq!(p.inflight, mine, "pod {} count matches held slots", p.addr);
                    }
                }
            }
            drop(held);
            for b in &pools {
                let v = b.view();
                prop_assert_eq!(v.inflight, 0);
                prop_assert_eq!(free(b), v.pods.len() * limit);
            }
            Ok(())
        })?;
    }
}

/// The pod list's last change is when it changed, not when discovery last answered the same.
#[tokio::test]
async fn the_pod_lists_last_change_is_kept_across_identical_answers() {
    let ledger = Ledger::new();
    let b = Balancer::new(&ledger, "t", 1);
    assert_eq!(b.pods_changed_unix_ms(), 0);
    b.set_pods([addr(1)].into_iter().collect()).await;
    let first = b.pods_changed_unix_ms();
    assert!(first > 0);
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.set_pods([addr(1)].into_iter().collect()).await;
    assert_eq!(
        b.pods_changed_unix_ms(),
        first,
        "the same list is no change"
    );
    b.set_pods([addr(1), addr(2)].into_iter().collect()).await;
    assert!(b.pods_changed_unix_ms() > first);
}

/// Issue 18, item 3: a request retried after a connect failure keeps its place in the queue.
/// R waits first, then T, then U; R is given the first pod that frees, fails to connect to it
/// and asks again excluding it (the freed pod goes to T). When the other pod frees, it is R's:
/// R arrived before U. Before, the retry had a new number and U was served first.
#[tokio::test(start_paused = true)]
async fn a_retry_keeps_its_place_in_the_queue() {
    let b = pool(&Ledger::new(), 1, &[1, 2]).await;
    let x = take(&b).await;
    let y = take(&b).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (r_tx, mut r_rx) = tokio::sync::mpsc::unbounded_channel();
    let first_try = {
        let (b, r_tx) = (Arc::clone(&b), r_tx.clone());
        tokio::spawn(async move {
            let mut arrival = Arrival::default();
            let slot = b
                .acquire(&q(10, LONG), after(LONG), &[], &mut arrival)
                .await;
            let _ = r_tx.send((slot.unwrap(), arrival));
        })
    };
    settle().await;
    let t = spawn_waiter(&b, 1, LONG, &tx);
    settle().await;
    let u = spawn_waiter(&b, 2, LONG, &tx);
    settle().await;
    assert_eq!(b.view().waiting, 3);

    let x_addr = x.addr();
    drop(x);
    settle().await;
    let (slot, arrival) = r_rx.try_recv().expect("R, the oldest, has the freed pod");
    assert_eq!(slot.addr(), x_addr);
    first_try.await.unwrap();
    // R could not connect: its slot goes back (to T) and it asks again without that pod.
    drop(slot);
    settle().await;
    assert_eq!(rx.try_recv().ok(), Some((1, x_addr)), "T has R's pod");
    let retry = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            let mut arrival = arrival;
            let slot = b
                .acquire(&q(10, LONG), after(LONG), &[x_addr], &mut arrival)
                .await;
            let _ = r_tx.send((slot.unwrap(), arrival));
        })
    };
    settle().await;
    assert_eq!(b.view().waiting, 2, "R and U wait");

    let y_addr = y.addr();
    drop(y);
    settle().await;
    let (slot, _) = r_rx.try_recv().expect("R arrived before U: the pod is R's");
    assert_eq!(slot.addr(), y_addr);
    assert!(rx.try_recv().is_err(), "U still waits");
    retry.await.unwrap();
    t.abort();
    u.abort();
}
