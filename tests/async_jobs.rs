//! Asynchronous jobs (a route's `async:`), judged from the pods' side: a fake asynchronous pod
//! counts its own running jobs and the status requests that reached it for a job it never
//! accepted.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use testkit::asyncpod::{AsyncPod, Convention};

/// The value of the `/metrics` series of `name` whose labels include every one of `labels`
/// (`how="done"`), summed over the matching series.
async fn metric(agent: &Agent, name: &str, labels: &[&str]) -> f64 {
    let text = loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn pods(first: u8, n: u8, convention: Convention, callback: bool) -> Vec<AsyncPod> {
    let port = free_port();
    let mut v = Vec::new();
    for i in 0..n {
        let addr = SocketAddr::from(([127, 0, 1, first + i], port));
        v.push(AsyncPod::start(addr, convention, callback).await.unwrap());
    }
    v
}

fn route(pods: &[AsyncPod], limit: usize, async_block: &str) -> String {
    let list: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!(
        "routes:\n  - {{uri: /submit, limit: {limit}, endpoints: [{}], queue: {{timeout: 30s}}, async: {async_block}}}\n",
        list.join(", ")
    )
}

/// Submits one job and follows its handle until the result: what a client of an asynchronous
/// service does. Returns the result's body.
async fn run_job(agent: SocketAddr, ms: u64) -> Result<String, String> {
    let r = loadgen::request(agent, "POST", &format!("/submit?ms={ms}"), &[], b"{}")
        .await
        .map_err(|e| format!("submit: {e}"))?;
    if r.status != 202 {
        return Err(format!("submit: {} {}", r.status, r.body));
    }
    let mut at = r.header("location").ok_or("no location")?.to_string();
    if !at.starts_with("/_lb/jobs/") {
        return Err(format!("location not a job handle: {at}"));
    }
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let r = loadgen::get(agent, &at, &[])
            .await
            .map_err(|e| format!("poll: {e}"))?;
        match r.status {
            202 => tokio::time::sleep(Duration::from_millis(100)).await,
            303 => {
                at = r
                    .header("location")
                    .ok_or("303 without location")?
                    .to_string()
            }
            200 => return Ok(r.body),
            other => return Err(format!("poll {at}: {other} {}", r.body)),
        }
    }
    Err("job never finished".into())
}

/// The target: 2 pods, `limit: 1`, 12 jobs of 1 s submitted at once. Before jobs held
/// their slots, every `202` freed the slot at once and each pod ran 6 jobs together; now each
/// pod runs one job at a time, every poll reaches the pod that owns its job, and all 12 finish
/// after about six rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_holds_its_pods_slot_until_it_is_done_and_polls_reach_its_pod() {
    let pods = pods(101, 2, Convention::Redirect, false).await;
    let agent = Agent::start(&route(
        &pods,
        1,
        "{check_interval: 50ms, done_when: redirect}",
    ))
    .await;
    let started = Instant::now();
    let jobs: Vec<_> = (0..12)
        .map(|_| tokio::spawn(run_job(agent.addr, 1000)))
        .collect();
    let mut results = Vec::new();
    for j in jobs {
        results.push(j.await.unwrap());
    }
    let took = started.elapsed();
    for r in &results {
        let body = r.as_ref().expect("job finished");
        assert!(body.starts_with("result of job "), "{body}");
    }
    for p in &pods {
        let s = &p.stats;
        assert_eq!(s.max_running.load(Ordering::SeqCst), 1, "pod {}", p.addr);
        assert_eq!(s.unknown_polls.load(Ordering::SeqCst), 0, "pod {}", p.addr);
        assert_eq!(s.running.load(Ordering::SeqCst), 0);
    }
    let submitted: usize = pods
        .iter()
        .map(|p| p.stats.submitted.load(Ordering::SeqCst))
        .sum();
    assert_eq!(submitted, 12, "each job reached a pod once");
    // Six rounds of one second on each of two pods.
    assert!(took >= Duration::from_millis(5900), "took {took:?}");
    eventually(Duration::from_secs(5), "holds ended", || async {
        agent.inflight().await == 0
            && agent.status().await["jobs"]
                .as_array()
                .is_some_and(|j| j.is_empty())
    })
    .await;
    assert_eq!(
        metric(&agent, "lb_jobs_ended_total", &["how=\"done\""]).await,
        12.0
    );
    assert_eq!(metric(&agent, "lb_jobs_held", &[]).await, 0.0);
    // Every job's hold lasted at least its 1 s of work.
    assert_eq!(
        metric(&agent, "lb_job_duration_seconds_count", &[]).await,
        12.0
    );
    let under_1s: f64 = metric(&agent, "lb_job_duration_seconds_bucket", &["le=\"0.5\""]).await;
    assert_eq!(under_1s, 0.0);
}

/// A handle that does not verify is refused and never proxied: altered by one character, or
/// made up.
#[tokio::test]
async fn a_forged_or_altered_handle_is_refused_and_reaches_no_pod() {
    let pods = pods(111, 1, Convention::Redirect, false).await;
    let agent = Agent::start(&route(&pods, 1, "{check_interval: 50ms}")).await;
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=200", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let handle = r.header("location").unwrap().to_string();
    let mut altered = handle.clone().into_bytes();
    let i = "/_lb/jobs/".len() + 5;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    for bad in [
        altered.as_str(),
        "/_lb/jobs/bm90IGEgam9i.AAAA",
        "/_lb/jobs/",
    ] {
        let r = agent.get(bad).await;
        assert_eq!(r.status, 404, "{bad}: {}", r.body);
    }
    // The real handle still works, and the pod never saw a request for a job it does not
    // have (nothing reached it but the real job's polls and lb-agent's checks of it).
    let r = agent.get(&handle).await;
    assert!(matches!(r.status, 202 | 303), "{}", r.status);
    assert_eq!(pods[0].stats.unknown_polls.load(Ordering::SeqCst), 0);
    assert_eq!(pods[0].stats.submitted.load(Ordering::SeqCst), 1);
    // Counted as what they are, not as requests without a route.
    assert_eq!(
        metric(&agent, "lb_requests_total", &["outcome=\"job_refused\""]).await,
        3.0
    );
    assert_eq!(
        metric(&agent, "lb_requests_total", &["outcome=\"no_route\""]).await,
        0.0
    );
}

/// The pod's completion callback frees the slot: with lb-agent's own checks an hour apart,
/// only the callback can start the next queued job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_callback_frees_the_slot_and_the_next_job_starts() {
    let pods = pods(121, 1, Convention::Redirect, true).await;
    let agent = Agent::start(&route(&pods, 1, "{check_interval: 1h}")).await;
    let jobs: Vec<_> = (0..4)
        .map(|_| {
            let addr = agent.addr;
            tokio::spawn(async move {
                loadgen::request(addr, "POST", "/submit?ms=200", &[], b"")
                    .await
                    .map(|r| r.status)
            })
        })
        .collect();
    for j in jobs {
        assert_eq!(j.await.unwrap().unwrap(), 202);
    }
    // A job counts as finished before its callback is answered: wait for both.
    eventually(
        Duration::from_secs(10),
        "all four ran and called back",
        || async {
            pods[0].stats.finished.load(Ordering::SeqCst) == 4
                && pods[0].stats.callbacks_sent.load(Ordering::SeqCst) == 4
        },
    )
    .await;
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
    eventually(Duration::from_secs(5), "the last hold ended", || async {
        agent.inflight().await == 0
    })
    .await;
    assert_eq!(
        metric(&agent, "lb_requests_total", &["outcome=\"job_callback\""]).await,
        4.0
    );
    assert_eq!(
        metric(&agent, "lb_jobs_ended_total", &["how=\"callback\""]).await,
        4.0
    );
}

/// A client's `DELETE` on the handle, accepted by the pod, frees the slot: the next job starts
/// at once instead of waiting out a minute-long job.
#[tokio::test]
async fn a_cancelled_job_frees_its_slot() {
    let pods = pods(131, 1, Convention::Redirect, false).await;
    let agent = Agent::start(&route(&pods, 1, "{check_interval: 100ms}")).await;
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=60000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let handle = r.header("location").unwrap().to_string();
    assert_eq!(agent.inflight().await, 1, "the job holds the slot");
    assert_eq!(metric(&agent, "lb_jobs_held", &[]).await, 1.0);
    let r = loadgen::request(agent.addr, "DELETE", &handle, &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(pods[0].stats.running.load(Ordering::SeqCst), 0);
    assert_eq!(
        metric(&agent, "lb_jobs_ended_total", &["how=\"cancelled\""]).await,
        1.0
    );
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=100", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    assert!(r.elapsed < Duration::from_secs(2), "{:?}", r.elapsed);
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
}

/// `max_duration` ends a hold whatever the pod says; `done_when: not_accepted` and a JSON state
/// end it when the pod says so.
#[tokio::test]
async fn max_duration_and_the_other_conventions_end_a_hold() {
    let pods = pods(141, 1, Convention::Redirect, false).await;
    let agent = Agent::start(&route(
        &pods,
        1,
        "{check_interval: 50ms, max_duration: 300ms}",
    ))
    .await;
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=60000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    eventually(Duration::from_secs(5), "the hold timed out", || async {
        agent.inflight().await == 0
    })
    .await;
    drop(agent);

    for (convention, done_when) in [
        (Convention::NotAccepted, "not_accepted"),
        (
            Convention::Json,
            "{json: /state, done: [succeeded, canceled]}",
        ),
    ] {
        let pods = pods_for(convention).await;
        let agent = Agent::start(&route(
            &pods,
            1,
            &format!("{{check_interval: 50ms, done_when: {done_when}}}"),
        ))
        .await;
        let jobs: Vec<_> = (0..3)
            .map(|_| {
                let addr = agent.addr;
                tokio::spawn(async move {
                    loadgen::request(addr, "POST", "/submit?ms=300", &[], b"")
                        .await
                        .map(|r| r.status)
                })
            })
            .collect();
        for j in jobs {
            assert_eq!(j.await.unwrap().unwrap(), 202, "{done_when}");
        }
        eventually(Duration::from_secs(10), "the holds ended", || async {
            agent.inflight().await == 0
        })
        .await;
        assert_eq!(pods[0].stats.finished.load(Ordering::SeqCst), 3);
        assert_eq!(
            pods[0].stats.max_running.load(Ordering::SeqCst),
            1,
            "{done_when}"
        );
    }
}

async fn pods_for(convention: Convention) -> Vec<AsyncPod> {
    let first = match convention {
        Convention::NotAccepted => 151,
        _ => 161,
    };
    pods(first, 1, convention, false).await
}

/// Submits a job of 1.5 s that the pod answers after 400 ms, and leaves after 150 ms: before
/// the answer, with the pod already running the job.
async fn leave_a_job_of_1500ms_before_its_answer(agent: SocketAddr) {
    let left = tokio::time::timeout(
        Duration::from_millis(150),
        loadgen::request(agent, "POST", "/submit?ms=1500&accept_ms=400", &[], b""),
    )
    .await;
    assert!(left.is_err(), "the client left before the answer");
}

/// The `second` submission after [`leave_a_job_of_1500ms_before_its_answer`] waited for the
/// first job's end, and then both holds ended.
async fn waited_for_the_first_and_both_ended(agent: &Agent, second: &loadgen::Response) {
    assert!(
        second.elapsed >= Duration::from_millis(1000),
        "the second job waited for the first: {:?}",
        second.elapsed
    );
    eventually(Duration::from_secs(5), "both ended", || async {
        agent.inflight().await == 0
    })
    .await;
}

/// A client that leaves before the pod's `202` has come back: the pod has accepted the job all
/// the same, so its slot stays held (the drain reads the `202` and hands the slot to the job)
/// and the next submission waits for the job's end. Before, the slot was freed when the drained
/// answer ended, and the pod ran two jobs with `limit: 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_202_does_not_free_the_jobs_slot() {
    let pods = pods(171, 1, Convention::Redirect, false).await;
    let agent = Agent::start(&route(&pods, 1, "{check_interval: 50ms}")).await;
    leave_a_job_of_1500ms_before_its_answer(agent.addr).await;
    assert_eq!(pods[0].stats.running.load(Ordering::SeqCst), 1);
    let second = loadgen::request(agent.addr, "POST", "/submit?ms=100", &[], b"")
        .await
        .unwrap();
    assert_eq!(second.status, 202, "{}", agent.log());
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
    waited_for_the_first_and_both_ended(&agent, &second).await;
    assert_eq!(pods[0].stats.finished.load(Ordering::SeqCst), 2);
}

/// A SIGTERM drain does not wait for held jobs: they run on their pods, not in the agent. With a
/// job of a minute held, the agent exits as soon as its requests are done, not at the end of
/// `shutdown_grace`.
#[tokio::test]
async fn the_shutdown_drain_does_not_wait_for_held_jobs() {
    let pods = pods(181, 1, Convention::Redirect, false).await;
    let mut agent = Agent::start(&format!(
        "shutdown_delay: 0s\nshutdown_grace: 30s\n{}",
        route(&pods, 1, "{check_interval: 100ms}")
    ))
    .await;
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=60000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    assert_eq!(agent.inflight().await, 1);
    agent.terminate();
    let exited = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(
        exited.is_some_and(|s| s.success()),
        "exited: {exited:?}\n{}",
        agent.log()
    );
}

/// Three agents on one Redis ledger, sharing `LB_AGENT_JOB_KEY`: jobs submitted through any
/// agent keep the cap across all of them, and every poll, sent each time through another
/// agent, reaches the pod that owns its job. A handle also works through an agent that started
/// after it was given out (a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_through_three_agents_keep_the_cap_and_polls_reach_the_pod_from_any_agent() {
    let redis = common::redis::Redis::start();
    let pods = pods(191, 2, Convention::Redirect, false).await;
    let body = format!(
        "ledger: {{redis: \"{}\", lease_ttl: 2s}}\nshutdown_delay: 0s\n{}",
        redis.url(),
        route(&pods, 1, "{check_interval: 50ms}")
    );
    let key = [("LB_AGENT_JOB_KEY", "one key for every replica, 32+ bytes")];
    let agents = [
        Agent::start_with_env(&body, &key).await,
        Agent::start_with_env(&body, &key).await,
        Agent::start_with_env(&body, &key).await,
    ];
    let addrs: Vec<SocketAddr> = agents.iter().map(|a| a.addr).collect();
    let jobs: Vec<_> = (0..6)
        .map(|i| {
            let addrs = addrs.clone();
            tokio::spawn(async move {
                let submit = addrs[i % 3];
                let r = loadgen::request(submit, "POST", "/submit?ms=400", &[], b"")
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status != 202 {
                    return Err(format!("submit: {} {}", r.status, r.body));
                }
                let mut at = r.header("location").ok_or("no location")?.to_string();
                for n in 0..600 {
                    // Each poll through another agent than the last.
                    let via = addrs[(i + n + 1) % 3];
                    let r = loadgen::get(via, &at, &[])
                        .await
                        .map_err(|e| e.to_string())?;
                    match r.status {
                        202 => tokio::time::sleep(Duration::from_millis(50)).await,
                        303 => at = r.header("location").ok_or("no location")?.to_string(),
                        200 => return Ok((r.body, at)),
                        other => return Err(format!("poll via {via}: {other} {}", r.body)),
                    }
                }
                Err("never finished".to_string())
            })
        })
        .collect();
    let mut result_handle = None;
    for j in jobs {
        let (body, at) = j.await.unwrap().expect("job finished");
        assert!(body.starts_with("result of job "), "{body}");
        result_handle = Some(at);
    }
    for p in &pods {
        assert_eq!(
            p.stats.max_running.load(Ordering::SeqCst),
            1,
            "pod {}",
            p.addr
        );
        assert_eq!(
            p.stats.unknown_polls.load(Ordering::SeqCst),
            0,
            "pod {}",
            p.addr
        );
    }
    let submitted: usize = pods
        .iter()
        .map(|p| p.stats.submitted.load(Ordering::SeqCst))
        .sum();
    assert_eq!(submitted, 6);
    // An agent that did not exist when the handle was given out reads it.
    let later = Agent::start_with_env(&body, &key).await;
    let r = loadgen::get(later.addr, result_handle.as_deref().unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("result of job "));
    // Without the key, the same handle is refused.
    let stranger = Agent::start(&body).await;
    let r = loadgen::get(stranger.addr, result_handle.as_deref().unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    for p in &pods {
        assert_eq!(p.stats.unknown_polls.load(Ordering::SeqCst), 0);
    }
}

/// A synchronous answer on an async route (a `200`, no job) whose client leaves while its body
/// is still being passed on frees its slot once the pod's answer is complete, as on any route:
/// it is no job. Before, the drain handed the slot to a "job" it could not see, held until
/// `max_duration`, and the next submission waited out its queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_synchronous_answer_does_not_hold_the_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods = pods(185, 1, Convention::Redirect, false).await;
    let agent = Agent::start(&format!(
        "queue: {{timeout: 5s}}\n{}",
        route(&pods, 1, "{check_interval: 100ms}").replace("queue: {timeout: 30s}, ", "")
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    conn.write_all(
        b"POST /submit?sync_bytes=33554432 HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    // Read the head and a little of the body, then leave.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "no answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(conn);
    let next = loadgen::request(agent.addr, "POST", "/submit?ms=100", &[], b"")
        .await
        .unwrap();
    assert_eq!(next.status, 202, "{}", next.body);
    assert!(agent.status().await["jobs"]
        .as_array()
        .is_some_and(|j| j.len() <= 1));
    eventually(Duration::from_secs(5), "the job's hold ended", || async {
        agent.inflight().await == 0
    })
    .await;
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
}

/// Issue 17, item 4: a job's hold outlives the agent that held it. Two agents on a shared
/// ledger, one pod with `limit: 1`: a 4 s job is accepted through A, then A dies (`kill -9`)
/// or shuts down (SIGTERM), and a second job is submitted through B. The second job must wait
/// until the first is done: the pod never runs two. Before, A's lease expired after
/// `lease_ttl` (1 s) and the second job started beside the first. B adopts the orphaned hold,
/// checks the job and ends the hold when the pod says it is done.
async fn a_jobs_hold_outlives_its_agent(first_pod: u8, kill: bool) {
    let redis = common::redis::Redis::start();
    let pods = pods(first_pod, 1, Convention::Redirect, false).await;
    let body = format!(
        "ledger: {{redis: \"{}\", lease_ttl: 1s}}\nshutdown_delay: 0s\nshutdown_grace: 1s\n{}",
        redis.url(),
        route(&pods, 1, "{check_interval: 50ms}")
    );
    let key = [("LB_AGENT_JOB_KEY", "one key for every replica, 32+ bytes")];
    let mut a = Agent::start_with_env(&body, &key).await;
    let b = Agent::start_with_env(&body, &key).await;
    let r = loadgen::request(a.addr, "POST", "/submit?ms=4000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let first = r.header("location").unwrap().to_string();
    if kill {
        a.kill9();
    } else {
        a.terminate();
        a.wait_exit(Duration::from_secs(10)).await.expect("A exits");
    }
    let second = {
        let addr = b.addr;
        tokio::spawn(async move { loadgen::request(addr, "POST", "/submit?ms=10", &[], b"").await })
    };
    // B counts the job it adopted as its own in flight (its /status, lb_pod_inflight, the
    // autoscaling query) while the job runs.
    eventually(
        Duration::from_secs(3),
        "B holds the adopted job",
        || async {
            let s = b.status().await;
            s["jobs"].as_array().is_some_and(|j| j.len() == 1) && s["pools"][0]["inflight"] == 1
        },
    )
    .await;
    assert_eq!(
        pods[0].stats.finished.load(Ordering::SeqCst),
        0,
        "still running"
    );
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status, 202, "{}", second.body);
    assert_eq!(
        pods[0].stats.max_running.load(Ordering::SeqCst),
        1,
        "the pod ran two jobs at once"
    );
    assert!(pods[0].stats.finished.load(Ordering::SeqCst) >= 1);
    assert!(
        metric(&b, "lb_jobs_ended_total", &["how=\"done\""]).await >= 1.0,
        "B ended the adopted hold"
    );
    // The first job's handle works through B.
    let r = loadgen::get(b.addr, &first, &[]).await.unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(pods[0].stats.unknown_polls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_hold_outlives_an_agent_that_is_killed() {
    a_jobs_hold_outlives_its_agent(201, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_hold_outlives_an_agent_that_shuts_down() {
    a_jobs_hold_outlives_its_agent(202, false).await;
}

/// `async.callback_base` names where pods call back (lb-agent's Service, say), and with a
/// shared ledger any agent can take a job's callback: here every callback goes to B while the
/// jobs were accepted (and are held) by A. Checks are an hour apart, so only the callbacks can
/// end the holds: each ends at B, and A's next submission starts at once (before, B only
/// remembered the callback for a hold of its own, and A's next submission waited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_to_another_agent_ends_the_hold() {
    let redis = common::redis::Redis::start();
    let pods = pods(211, 1, Convention::Redirect, true).await;
    let key = [("LB_AGENT_JOB_KEY", "one key for every replica, 32+ bytes")];
    let top = format!(
        "ledger: {{redis: \"{}\", lease_ttl: 2s}}\nshutdown_delay: 0s\n",
        redis.url()
    );
    let b = Agent::start_with_env(
        &format!("{top}{}", route(&pods, 1, "{check_interval: 1h}")),
        &key,
    )
    .await;
    let a = Agent::start_with_env(
        &format!(
            "{top}{}",
            route(
                &pods,
                1,
                &format!(
                    "{{check_interval: 1h, callback_base: \"http://{}\"}}",
                    b.addr
                )
            )
        ),
        &key,
    )
    .await;
    for i in 0..3 {
        let r = loadgen::request(a.addr, "POST", "/submit?ms=200", &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 202, "job {i}: {}", r.body);
    }
    eventually(Duration::from_secs(10), "all three called back", || async {
        pods[0].stats.callbacks_sent.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
    eventually(Duration::from_secs(5), "B ended the holds", || async {
        metric(&b, "lb_jobs_ended_total", &["how=\"callback\""]).await == 3.0
    })
    .await;
    assert_eq!(
        metric(&b, "lb_requests_total", &["outcome=\"job_callback\""]).await,
        3.0
    );
}

/// The route of pods that name their jobs in JSON (`async.job_id`), judged by the pods' own
/// state (`done_when: {json: /state}`).
fn json_id_route(pods: &[AsyncPod], limit: usize) -> String {
    route(
        pods,
        limit,
        "{check_interval: 50ms, done_when: {json: /state, done: [succeeded, canceled]}, job_id: {json: /task_id, status: \"/tasks/{id}\"}}",
    )
}

/// Submits a job to a JSON-id service and follows it the way its clients do: the id from the
/// answer, in the service's own status and result paths. Returns (the submission's answer,
/// the result).
async fn run_json_job(agent: SocketAddr, ms: u64) -> Result<(String, String), String> {
    let r = loadgen::request(agent, "POST", &format!("/submit?ms={ms}"), &[], b"{}")
        .await
        .map_err(|e| format!("submit: {e}"))?;
    if r.status != 200 {
        return Err(format!("submit: {} {}", r.status, r.body));
    }
    let answer: serde_json::Value =
        serde_json::from_str(&r.body).map_err(|e| format!("submit answer {}: {e}", r.body))?;
    let id = answer["task_id"].as_str().ok_or("no task_id")?.to_string();
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let s = loadgen::get(agent, &format!("/tasks/{id}"), &[])
            .await
            .map_err(|e| format!("poll: {e}"))?;
        if s.status != 200 {
            return Err(format!("poll: {} {}", s.status, s.body));
        }
        let state: serde_json::Value = serde_json::from_str(&s.body).map_err(|e| e.to_string())?;
        if state["state"] == "succeeded" {
            let res = loadgen::get(agent, &format!("/tasks/{id}/result"), &[])
                .await
                .map_err(|e| format!("result: {e}"))?;
            return match res.status {
                200 => Ok((r.body, res.body)),
                other => Err(format!("result: {other} {}", res.body)),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("job never finished".into())
}

/// Issue 17: a service that names its job in its JSON answer (`{"task_id": …}`, no
/// `Location`). Each pod runs one job at a time (its own count), the client's status and
/// result requests, made with the id it was given in the service's own paths, all reach the
/// job's pod, and the answer keeps its other fields, in order. Without `job_id` (tried), the
/// `200` freed the slot and the first poll, `/tasks/<pod's id>`, got `404 no route`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_named_in_json_holds_its_slot_and_its_id_reaches_its_pod() {
    let pods = pods(221, 2, Convention::JsonId, false).await;
    let agent = Agent::start(&json_id_route(&pods, 1)).await;
    let jobs: Vec<_> = (0..6)
        .map(|_| tokio::spawn(run_json_job(agent.addr, 400)))
        .collect();
    let mut ids = std::collections::HashSet::new();
    for j in jobs {
        let (answer, result) = j.await.unwrap().expect("job finished");
        assert!(result.starts_with("result of job "), "{result}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let id = v["task_id"].as_str().unwrap();
        assert!(
            id.len() > 40,
            "the id is lb-agent's handle, not the pod's: {id}"
        );
        assert_eq!(
            answer,
            format!("{{\"task_id\":\"{id}\",\"status\":\"pending\",\"queue\":[1,2]}}"),
            "the rest of the answer as the pod sent it, in its order"
        );
        ids.insert(id.to_string());
    }
    assert_eq!(ids.len(), 6);
    for p in &pods {
        let s = &p.stats;
        assert_eq!(s.max_running.load(Ordering::SeqCst), 1, "pod {}", p.addr);
        assert_eq!(s.unknown_polls.load(Ordering::SeqCst), 0, "pod {}", p.addr);
        assert_eq!(s.submitted.load(Ordering::SeqCst), 3, "pod {}", p.addr);
    }
    eventually(Duration::from_secs(5), "holds ended", || async {
        agent.inflight().await == 0
    })
    .await;
    assert_eq!(
        metric(&agent, "lb_jobs_ended_total", &["how=\"done\""]).await,
        6.0
    );
}

/// A JSON-id handle altered by one character is refused (`404`) and reaches no pod; a
/// submission answer that names no job (not JSON) frees the slot as any answer does; a
/// `DELETE` on the service's own path cancels the job and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_job_handle_is_checked_and_an_answer_without_an_id_is_no_job() {
    let pods = pods(231, 1, Convention::JsonId, false).await;
    let agent = Agent::start(&json_id_route(&pods, 1)).await;
    // Not JSON: no job. With limit 1, the next submission is served at once.
    let r = loadgen::request(agent.addr, "POST", "/submit?sync_bytes=10", &[], b"")
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "xxxxxxxxxx"));
    assert_eq!(
        agent.inflight().await,
        0,
        "an answer naming no job holds nothing"
    );
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=60000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let id = v["task_id"].as_str().unwrap().to_string();
    assert_eq!(agent.inflight().await, 1, "the job holds the slot");
    let mut altered = id.clone().into_bytes();
    altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let bad = agent.get(&format!("/tasks/{altered}")).await;
    assert_eq!(bad.status, 404, "{}", bad.body);
    assert_eq!(pods[0].stats.unknown_polls.load(Ordering::SeqCst), 0);
    let polls_before = pods[0].stats.polls.load(Ordering::SeqCst);
    let ok = agent.get(&format!("/tasks/{id}")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("running"), "{}", ok.body);
    assert!(pods[0].stats.polls.load(Ordering::SeqCst) > polls_before);
    let r = loadgen::request(agent.addr, "DELETE", &format!("/tasks/{id}"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(pods[0].stats.running.load(Ordering::SeqCst), 0);
    assert_eq!(
        agent.inflight().await,
        0,
        "the cancelled job's slot is free"
    );
    assert_eq!(
        metric(&agent, "lb_jobs_ended_total", &["how=\"cancelled\""]).await,
        1.0
    );
}

/// A client that leaves before a JSON-id pod's answer: the pod has started the job, whose id
/// nobody read, so the slot stays held until the job's callback, and the next submission waits
/// for it. Before, the drained `200` freed the slot and the pod ran two jobs with `limit: 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_a_json_jobs_answer_does_not_free_its_slot() {
    let pods = pods(241, 1, Convention::JsonId, true).await;
    let agent = Agent::start(&json_id_route(&pods, 1)).await;
    leave_a_job_of_1500ms_before_its_answer(agent.addr).await;
    let second = loadgen::request(agent.addr, "POST", "/submit?ms=100", &[], b"")
        .await
        .unwrap();
    assert_eq!(second.status, 200, "{}", agent.log());
    assert_eq!(pods[0].stats.max_running.load(Ordering::SeqCst), 1);
    waited_for_the_first_and_both_ended(&agent, &second).await;
    assert_eq!(pods[0].stats.callbacks_sent.load(Ordering::SeqCst), 2);
}
