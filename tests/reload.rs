//! Live config reload: the config file is rewritten the way a ConfigMap update rewrites it
//! (symlink swap) while requests are in flight and queued.

mod common;

use common::*;
use std::time::Duration;

const SECS: Duration = Duration::from_secs(10);

fn work_route(limit: usize, pods: &[FakePod], extra: &str) -> String {
    format!(
        "reload_interval: 50ms\n{extra}routes:\n  - {{uri: /work, limit: {limit}, endpoints: {}}}\n",
        endpoints(pods)
    )
}

async fn pool_limit(agent: &Agent) -> u64 {
    agent.status().await["pools"][0]["limit"].as_u64().unwrap()
}

/// The limit of the pool serving `uri`, from /status (`None`: no such route).
async fn route_limit(agent: &Agent, uri: &str) -> Option<u64> {
    let status = agent.status().await;
    let pool = status["routes"]
        .as_array()?
        .iter()
        .find(|r| r["uri"] == uri)?["pool"]
        .clone();
    status["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pool && p["retired"] == false)?["limit"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raised_limit_starts_queued_requests_and_lowered_limit_holds_new_ones() {
    let pods = start_pods(1, 2).await.unwrap();
    let agent = Agent::start(&work_route(1, &pods, "")).await;

    // Limit 1 on 2 pods: 2 run, 4 wait.
    let long: Vec<_> = (0..6)
        .map(|_| spawn_get(agent.addr, "/work?ms=1500"))
        .collect();
    eventually(SECS, "2 in flight, 4 queued", || async {
        agent.queue_depth().await == 4 && agent.inflight().await == 2
    })
    .await;

    // Raise to 3: the 4 queued start at once, 3 per pod, nothing dropped.
    agent.update_config(&work_route(3, &pods, ""));
    eventually(
        SECS,
        "queued requests start under the new limit",
        || async { agent.queue_depth().await == 0 && agent.inflight().await == 6 },
    )
    .await;
    assert!(pods.iter().all(|p| p.stats.inflight() == 3));

    // Lower to 1 while 3 run on each pod: they go on, new requests wait until a pod is
    // below the new cap.
    agent.update_config(&work_route(1, &pods, ""));
    eventually(SECS, "limit 1 in force", || async {
        pool_limit(&agent).await == 1
    })
    .await;
    let short: Vec<_> = (0..2)
        .map(|_| spawn_get(agent.addr, "/work?ms=10"))
        .collect();
    eventually(
        SECS,
        "new requests queue behind the lowered cap",
        || async { agent.queue_depth().await == 2 },
    )
    .await;
    assert!(
        pods.iter().all(|p| p.stats.inflight() == 3),
        "no new request may start on a pod at or above the lowered cap"
    );
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 6);

    for t in long.into_iter().chain(short) {
        assert_eq!(t.await.unwrap().unwrap().status, 200);
    }
    assert!(pods.iter().all(|p| p.stats.max_inflight() == 3));
    assert_eq!(pods.iter().map(|p| p.stats.started()).sum::<usize>(), 8);
    // The slot is given back when the request's context is dropped, which can come a moment
    // after the client has read the whole response.
    eventually(SECS, "every slot given back", || async {
        agent.inflight().await == 0
    })
    .await;
    assert!(agent.log().contains("limit 1 -> 3"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_edit_is_rejected_and_the_running_config_stays() {
    let pods = start_pods(11, 1).await.unwrap();
    let agent = Agent::start(&work_route(1, &pods, "")).await;

    agent.update_config(&work_route(0, &pods, ""));
    eventually(SECS, "rejection logged", || async {
        agent.log().contains("config reload rejected")
    })
    .await;
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("config reload rejected"))
        .unwrap();
    assert!(line.contains("routes[0].limit"), "{line}");
    assert_eq!(pool_limit(&agent).await, 1);
    assert_eq!(agent.get("/work").await.status, 200);

    // Not YAML at all: also rejected, the config stays in force.
    agent.update_config_raw("routes: [ {uri: /work");
    eventually(SECS, "second rejection logged", || async {
        agent.log().matches("config reload rejected").count() == 2
    })
    .await;
    assert_eq!(agent.get("/work").await.status, 200);
    let metrics = loadgen::get(agent.admin, "/metrics", &[])
        .await
        .unwrap()
        .body;
    assert!(
        metrics.contains("lb_config_reloads_total{result=\"rejected\"} 2"),
        "{metrics}"
    );

    // A valid edit after the bad ones applies.
    agent.update_config(&work_route(2, &pods, ""));
    eventually(SECS, "valid edit applied", || async {
        pool_limit(&agent).await == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_adds_and_removes_routes_without_dropping_queued_requests() {
    let old_pods = start_pods(21, 1).await.unwrap();
    let new_pods = start_pods(25, 2).await.unwrap();
    let agent = Agent::start(&work_route(1, &old_pods, "")).await;

    // One request runs and one waits on /work when /work is removed.
    let running = spawn_get(agent.addr, "/work?ms=800");
    eventually(SECS, "running", || async {
        old_pods[0].stats.inflight() == 1
    })
    .await;
    let queued = spawn_get(agent.addr, "/work?ms=10");
    eventually(SECS, "queued", || async { agent.queue_depth().await == 1 }).await;

    agent.update_config(&format!(
        "reload_interval: 50ms\nroutes:\n  - {{uri: /other, limit: 2, endpoints: {}}}\n",
        endpoints(&new_pods)
    ));
    eventually(SECS, "new route served", || async {
        agent.get("/other").await.status == 200
    })
    .await;
    assert_eq!(agent.get("/work").await.status, 404);

    // The removed pool is retired but still shown while it serves its last requests.
    let status = agent.status().await;
    let retired: Vec<_> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["retired"] == true)
        .collect();
    assert_eq!(retired.len(), 1, "{status}");
    assert_eq!(retired[0]["queue_depth"], 1, "{status}");

    assert_eq!(running.await.unwrap().unwrap().status, 200);
    assert_eq!(queued.await.unwrap().unwrap().status, 200);
    assert_eq!(old_pods[0].stats.started(), 2);
    assert_eq!(old_pods[0].stats.max_inflight(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_and_restart_only_settings_are_reported() {
    let pods = start_pods(31, 1).await.unwrap();
    // No polling: only SIGHUP reloads.
    let body = |limit: usize, threads: usize| {
        format!(
            "reload_interval: 0s\nthreads: {threads}\nroutes:\n  - {{uri: /work, limit: {limit}, endpoints: {}}}\n",
            endpoints(&pods)
        )
    };
    let agent = Agent::start(&body(1, 1)).await;
    agent.update_config(&body(4, 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pool_limit(&agent).await,
        1,
        "no polling with reload_interval 0s"
    );

    agent.hangup();
    eventually(SECS, "SIGHUP applied the new limit", || async {
        pool_limit(&agent).await == 4
    })
    .await;
    let log = agent.log();
    assert!(
        log.contains("threads changed and only take effect after a restart"),
        "{log}"
    );
    assert_eq!(agent.get("/work").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_config_file_is_refused_without_reading_it_all() {
    let pods = start_pods(31, 1).await.unwrap();
    let agent = Agent::start(&work_route(1, &pods, "")).await;
    // A ConfigMap swap whose config.yaml is endless: the reload reads at most 1 MiB + 1 byte
    // of it, refuses it, and the running config stays.
    let version = agent.dir.join("..endless");
    std::fs::create_dir_all(&version).unwrap();
    std::os::unix::fs::symlink("/dev/zero", version.join("config.yaml")).unwrap();
    let tmp = agent.dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink("..endless", &tmp).unwrap();
    std::fs::rename(&tmp, agent.dir.join("..data")).unwrap();
    eventually(SECS, "endless file rejected", || async {
        agent.log().contains("config reload rejected")
    })
    .await;
    let log = agent.log();
    assert!(log.contains("larger than 1048576 bytes"), "{log}");
    assert_eq!(agent.get("/work").await.status, 200);
}

/// An editor, `docker cp` or a config-management tool rewrites the file in place: truncate, the
/// first route, a 400 ms pause, the rest. The fragment (a valid config without `/w`) is never
/// applied: no probe of `/w` sees a 404, and the complete file is applied once it settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_rewritten_in_place_is_applied_only_once_complete() {
    use std::io::Write;
    let pods = start_pods(61, 2).await.unwrap();
    let route = |uri: &str, limit: usize, pod: usize| {
        format!(
            "  - {{uri: {uri}, limit: {limit}, endpoints: {}}}\n",
            endpoints(&pods[pod..pod + 1])
        )
    };
    let agent = Agent::start(&format!(
        "reload_interval: 50ms\nroutes:\n{}{}",
        route("/a", 1, 0),
        route("/w", 1, 1)
    ))
    .await;
    let head = format!(
        "listen: {}\nadmin_listen: {}\nreload_interval: 50ms\nroutes:\n{}",
        agent.addr,
        agent.admin,
        route("/a", 1, 0)
    );
    let rest = route("/w", 2, 1);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = {
        let (stop, addr) = (std::sync::Arc::clone(&stop), agent.addr);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = loadgen::get(addr, "/w", &[]).await;
                statuses.push(r.map(|r| r.status).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = agent.dir.join("config.yaml");
    let written = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(head.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        f.write_all(rest.as_bytes()).unwrap();
        f.flush().unwrap();
        std::time::Instant::now()
    })
    .await
    .unwrap();
    eventually(SECS, "the complete file applied", || async {
        route_limit(&agent, "/w").await == Some(2)
    })
    .await;
    println!("complete file written to applied: {:?}", written.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = probes.await.unwrap();
    let missing = statuses.iter().filter(|s| **s == 404).count();
    println!("{} probes, {missing} saw 404", statuses.len());
    assert!(statuses.len() >= 20, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let log = agent.log();
    assert!(
        log.contains("is skipped"),
        "the fragment's skip logged:\n{log}"
    );
    assert!(!log.contains("routes updated"), "{log}");

    // A ConfigMap update swaps in a complete file through a symlink: no settling, it applies at
    // the first read that sees it.
    let swapped = std::time::Instant::now();
    agent.update_config(&format!(
        "reload_interval: 50ms\nroutes:\n{}{}",
        route("/a", 1, 0),
        route("/w", 3, 1)
    ));
    eventually(SECS, "the swapped-in file applied", || async {
        route_limit(&agent, "/w").await == Some(3)
    })
    .await;
    let took = swapped.elapsed();
    println!("symlink swap to applied: {took:?}");
    assert!(took < Duration::from_millis(900), "{took:?}");
}

/// Makes `dir/config.yaml` a named pipe: the agent's start-up read of its config blocks until
/// the test writes it, so the test can act at that exact point of start-up.
fn config_fifo(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    let ok = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo failed");
    path
}

fn fifo_config(port: u16, admin: u16, reload: &str, limit: usize, pods: &[FakePod]) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nreload_interval: {reload}\nroutes:\n  - {{uri: /work, limit: {limit}, endpoints: {}}}\n",
        endpoints(pods)
    )
}

/// An edit that lands while the agent is reading its config at start-up: the running config is
/// the version it parsed, and later reads are compared with those bytes, so the edit is a
/// change and is applied (it was lost for good when the file was read a second time as the
/// baseline).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_right_after_start_up_is_applied() {
    let pods = start_pods(65, 1).await.unwrap();
    let (port, admin) = (free_port(), free_port());
    let dir = temp_dir("startup-edit");
    let fifo = config_fifo(&dir);
    let first = fifo_config(port, admin, "50ms", 1, &pods);
    let edited = fifo_config(port, admin, "50ms", 2, &pods);
    let agent = Agent::launch(dir.clone(), port, admin, &[]);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        // Returns once the agent has opened its config to read it.
        let mut reading = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        // The edit lands now: a regular file replaces the pipe the agent is reading.
        std::fs::write(dir.join("edited.yaml"), edited).unwrap();
        std::fs::rename(dir.join("edited.yaml"), &fifo).unwrap();
        reading.write_all(first.as_bytes()).unwrap();
    })
    .await
    .unwrap();
    agent.wait_ready(SECS).await;
    eventually(SECS, "the edit applied", || async {
        pool_limit(&agent).await == 2
    })
    .await;
}

/// A SIGHUP while the agent is still starting (here: while it reads its config, before any
/// port is open) neither kills it nor is lost: the reload runs once the reload service does.
/// Polling is off, so only that SIGHUP can apply the edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sighup_during_start_up_reloads_instead_of_killing_the_agent() {
    let pods = start_pods(67, 1).await.unwrap();
    let (port, admin) = (free_port(), free_port());
    let dir = temp_dir("startup-hup");
    let fifo = config_fifo(&dir);
    let first = fifo_config(port, admin, "0s", 1, &pods);
    let edited = fifo_config(port, admin, "0s", 3, &pods);
    let mut agent = Agent::launch(dir.clone(), port, admin, &[]);
    let pid = agent.pid().to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut reading = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        // The agent is inside its start-up config read.
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(dir.join("edited.yaml"), edited).unwrap();
        std::fs::rename(dir.join("edited.yaml"), &fifo).unwrap();
        // Fails if the SIGHUP has killed the agent (nobody reads the pipe any more).
        let _ = reading.write_all(first.as_bytes());
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + SECS;
    loop {
        if let Some(status) = agent.wait_exit(Duration::ZERO).await {
            panic!("the agent died of a SIGHUP at start-up: {status}");
        }
        if let Ok(r) = loadgen::get(agent.admin, "/readyz", &[]).await {
            if r.status == 200 {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(SECS, "the early SIGHUP reloaded the edit", || async {
        pool_limit(&agent).await == 3
    })
    .await;
    assert!(agent.log().contains("SIGHUP: reloading"), "{}", agent.log());
}

/// Issue 26, item 2: `/status` says which config content is in force (its hash and when it was
/// loaded), so an operator can tell whether an edit reached an agent (a `subPath` mount never
/// updates in place) and whether replicas run the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_shows_the_config_in_force() {
    let pods = start_pods(161, 1).await.unwrap();
    let agent = Agent::start(&work_route(1, &pods, "")).await;
    let status = agent.status().await;
    let first = status["config"]["hash"]
        .as_str()
        .expect("a hash")
        .to_string();
    assert_eq!(first.len(), 16, "{status}");
    assert!(status["config"]["loaded_at"].as_str().is_some(), "{status}");
    agent.update_config(&work_route(2, &pods, ""));
    eventually(SECS, "reloaded", || async { pool_limit(&agent).await == 2 }).await;
    let second = agent.status().await["config"]["hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first, second, "the hash follows the content");
}

/// Issue 26, item 1: as with the Go agent (configor `env:` tags), `PORT` in the environment
/// wins over the file's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_from_the_environment_wins_over_the_file() {
    let pods = start_pods(162, 1).await.unwrap();
    let (file_port, env_port, admin) = (free_port(), free_port(), free_port());
    let dir = temp_dir("env-port");
    write_configmap(
        &dir,
        &format!(
            "listen: 127.0.0.1:{file_port}\nadmin_listen: 127.0.0.1:{admin}\nroutes:\n  - {{uri: /work, limit: 1, endpoints: {}}}\n",
            endpoints(&pods)
        ),
    );
    let env_port_text = env_port.to_string();
    let agent = Agent::launch(dir, env_port, admin, &[("PORT", &env_port_text)]);
    agent.wait_ready(SECS).await;
    assert_eq!(agent.get("/work").await.status, 200);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_port)).is_err(),
        "the file's port is not used"
    );
}
