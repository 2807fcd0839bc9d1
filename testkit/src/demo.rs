//! `testkit demo` (`cargo run --release -p testkit -- demo`): the problem and the fix on one
//! machine, without a cluster.
//!
//! Starts 4 slow fake pods on 127.0.1.1–127.0.1.4 (one port, like real pods; each works on 2
//! requests at a time, extra ones wait inside the pod as on a busy CPU), runs the lb-agent
//! binary in front of them with `limit: 2`, and sends one burst of 16 requests of 500 ms each
//! twice: once the way kube-proxy's iptables mode spreads connections (a pod at random per
//! connection), once through lb-agent. It prints what each pod went through.
//!
//! Then the same for an asynchronous service: 2 fake pods on 127.0.1.5–127.0.1.6 that answer
//! `202` + `Location` at once and work on one job at a time; 8 jobs of 500 ms submitted at once,
//! each client polling its `Location` until its job is done, at random and through lb-agent
//! (`limit: 1`, `async:`: the job keeps its pod's slot until it is done, and the polls go to the
//! job's pod).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::asyncpod::{AsyncOptions, AsyncPod, Convention};
use crate::fakepod::{start_pods_with_workers, FakePod};
use crate::loadgen;

const PODS: usize = 4;
const LIMIT: usize = 2;
const REQUESTS: usize = 16;
const WORK_MS: u64 = 500;
const ASYNC_PODS: usize = 2;
const JOBS: usize = 8;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The lb-agent binary to run: `agent` if given, else `LB_AGENT_BIN` (as in bench/), else the
/// one built beside this binary. Under `cargo run` that one is (re)built first, so the demo
/// never runs a stale proxy: the product binary is not a dependency of testkit (testkit must
/// not pull the product into its build, nor the product testkit), so cargo would not build it.
fn agent_binary(agent: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = agent.or_else(|| std::env::var_os("LB_AGENT_BIN").map(PathBuf::from)) {
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let beside = exe.with_file_name("lb-agent");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut args: Vec<OsString> = ["build", "-p", "lb-agent", "--bin", "lb-agent"]
            .map(OsString::from)
            .to_vec();
        args.push("--manifest-path".into());
        args.push(manifest.into());
        if !cfg!(debug_assertions) {
            args.push("--release".into());
        }
        let status = Command::new(cargo)
            .args(&args)
            .status()
            .map_err(|e| format!("cannot run cargo to build lb-agent: {e}"))?;
        if !status.success() {
            return Err(format!("building lb-agent failed ({status})"));
        }
    }
    if beside.exists() {
        Ok(beside)
    } else {
        Err(format!(
            "no lb-agent binary at {}: build it (`cargo build --release`), or pass --agent PATH",
            beside.display()
        ))
    }
}

pub fn run(agent: Option<PathBuf>) -> ExitCode {
    let agent = match agent_binary(agent) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo(agent)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(title: &str, pods: &[FakePod], waits: &[Duration], makespan: Duration) {
    println!("\n{title}");
    println!("  {:<12} {:>9} {:>16}", "pod", "requests", "max in flight");
    for p in pods {
        println!(
            "  {:<12} {:>9} {:>16}",
            p.addr.ip().to_string(),
            p.stats.started(),
            p.stats.max_inflight()
        );
    }
    let mut w: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
    w.sort();
    println!(
        "  all {} requests done in {} ms (best possible: {} ms); request times min {} ms, median {} ms, max {} ms",
        waits.len(),
        makespan.as_millis(),
        WORK_MS * (REQUESTS as u64).div_ceil((PODS * LIMIT) as u64),
        w.first().copied().unwrap_or(0),
        w.get(w.len() / 2).copied().unwrap_or(0),
        w.last().copied().unwrap_or(0),
    );
}

async fn burst(targets: Vec<SocketAddr>) -> Result<(Vec<Duration>, Duration), String> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, addr) in targets.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let r = loadgen::get(
                addr,
                &format!("/VideoCodecService/VideoCodec?ms={WORK_MS}&n={i}"),
                &[],
            )
            .await;
            r.map_err(|e| e.to_string()).and_then(|r| {
                if r.status == 200 {
                    Ok(r.elapsed)
                } else {
                    Err(format!("status {}: {}", r.status, r.body.trim()))
                }
            })
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok((times, start.elapsed()))
}

/// A tiny xorshift, so the random spread needs no extra dependency; `salt` tells apart the
/// sequences of callers that start at the same moment.
fn random_picks(n: usize, of: usize, salt: u64) -> Vec<usize> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ 0x9e37_79b9_7f4a_7c15
        ^ (std::process::id() as u64)
        ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % of as u64) as usize
        })
        .collect()
}

/// Asynchronous pods on 127.0.1.5, 127.0.1.6, … sharing one port, one job at a time each, job
/// ids distinct across pods (a poll at a pod that did not accept the job is a `404`).
async fn start_async_pods() -> Result<Vec<AsyncPod>, String> {
    let mut pods: Vec<AsyncPod> = Vec::new();
    for i in 0..ASYNC_PODS {
        let port = pods.first().map_or(0, |p| p.addr.port());
        let opts = AsyncOptions {
            workers: Some(1),
            first_id: (i as u64 + 1) * 1_000_000,
            ..AsyncOptions::new(Convention::Redirect, true)
        };
        let addr: SocketAddr = ([127, 0, 1, 5 + i as u8], port).into();
        pods.push(
            AsyncPod::start_with(addr, opts)
                .await
                .map_err(|e| format!("cannot start an async pod on {addr}: {e}"))?,
        );
    }
    Ok(pods)
}

/// What the clients of a burst of jobs saw: (done, lost to a `404`, the time until the last job
/// was seen done).
async fn job_burst(
    submit_to: Vec<SocketAddr>,
    poll_at: Vec<SocketAddr>,
) -> Result<(usize, usize, Duration), String> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, addr) in submit_to.into_iter().enumerate() {
        let poll_at = poll_at.clone();
        tasks.push(tokio::spawn(async move {
            let r = loadgen::request(
                addr,
                "POST",
                &format!("/submit?ms={WORK_MS}&n={i}"),
                &[],
                b"",
            )
            .await
            .map_err(|e| e.to_string())?;
            let at = match (r.status, r.header("location")) {
                (202, Some(at)) => at.to_string(),
                _ => {
                    return Err(format!(
                        "submission answered {}: {}",
                        r.status,
                        r.body.trim()
                    ))
                }
            };
            // Each poll is a new connection: at random, one of `poll_at`.
            for pick in random_picks(300, poll_at.len(), i as u64 + 1) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let r = loadgen::get(poll_at[pick], &at, &[])
                    .await
                    .map_err(|e| e.to_string())?;
                match r.status {
                    202 => continue,
                    303 => return Ok(true),
                    404 => return Ok(false),
                    s => return Err(format!("poll answered {s}: {}", r.body.trim())),
                }
            }
            Err("a job still ran after 30 s".into())
        }));
    }
    let (mut done, mut lost) = (0, 0);
    for t in tasks {
        if t.await.map_err(|e| e.to_string())?? {
            done += 1;
        } else {
            lost += 1;
        }
    }
    Ok((done, lost, start.elapsed()))
}

/// Waits until the pods have no job running (each pod works its jobs to the end, whatever the
/// clients saw), then prints what each went through.
async fn report_jobs(title: &str, pods: &[AsyncPod], seen: (usize, usize, Duration)) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods
        .iter()
        .any(|p| p.stats.running.load(std::sync::atomic::Ordering::SeqCst) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::SeqCst);
    println!("\n{title}");
    println!(
        "  {:<12} {:>6} {:>15} {:>25}",
        "pod", "jobs", "max jobs held", "polls for a job not here"
    );
    for p in pods {
        println!(
            "  {:<12} {:>6} {:>15} {:>25}",
            p.addr.ip().to_string(),
            n(&p.stats.submitted),
            n(&p.stats.max_running),
            n(&p.stats.unknown_polls)
        );
    }
    let (done, lost, took) = seen;
    println!(
        "  {done} of {JOBS} clients saw their job done ({} ms after the burst); {lost} lost it \
         (a poll reached a pod that did not have it: 404)",
        took.as_millis()
    );
}

async fn demo(agent_bin: PathBuf) -> Result<(), String> {
    println!(
        "lb-agent demo: {PODS} fake compute pods on 127.0.1.1-127.0.1.{PODS}, each request takes {WORK_MS} ms,\n\
         limit {LIMIT} per pod, a burst of {REQUESTS} requests at once."
    );

    // 1. kube-proxy (iptables mode): every connection goes to a pod picked at random.
    let direct = start_pods_with_workers(1, PODS, Some(LIMIT))
        .await
        .map_err(|e| format!("cannot start fake pods: {e}"))?;
    let addrs: Vec<SocketAddr> = direct.iter().map(|p| p.addr).collect();
    let picks = random_picks(REQUESTS, PODS, 0)
        .into_iter()
        .map(|i| addrs[i])
        .collect();
    let (waits, makespan) = burst(picks).await?;
    report(
        "Without lb-agent (a random pod per connection, like kube-proxy):",
        &direct,
        &waits,
        makespan,
    );
    drop(direct);

    // 2. The same burst through lb-agent.
    let pods = start_pods_with_workers(1, PODS, Some(LIMIT))
        .await
        .map_err(|e| format!("cannot start fake pods: {e}"))?;
    let port = free_port().map_err(|e| e.to_string())?;
    let admin = free_port().map_err(|e| e.to_string())?;
    let endpoints: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    let async_pods = start_async_pods().await?;
    let async_endpoints: Vec<String> = async_pods
        .iter()
        .map(|p| format!("\"{}\"", p.addr))
        .collect();
    let config = format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nqueue: {{max_waiting: 100, timeout: 30s}}\nroutes:\n  - uri: /VideoCodecService/VideoCodec\n    limit: {LIMIT}\n    endpoints: [{}]\n  - uri: /submit\n    limit: 1\n    endpoints: [{}]\n    async: {{check_interval: 1s, done_when: redirect}}\n",
        endpoints.join(", "),
        async_endpoints.join(", ")
    );
    let dir = std::env::temp_dir().join(format!("lb-agent-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let _agent = Agent(
        Command::new(&agent_bin)
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", agent_bin.display()))?,
    );
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = loadgen::get(admin_addr, "/readyz", &[]).await {
            if r.status == 200 {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err("lb-agent did not become ready within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent: SocketAddr = ([127, 0, 0, 1], port).into();
    let (waits, makespan) = burst(vec![agent; REQUESTS]).await?;
    report(
        &format!("Through lb-agent (least in flight, limit {LIMIT}, FIFO queue):"),
        &pods,
        &waits,
        makespan,
    );
    let over = pods
        .iter()
        .filter(|p| p.stats.max_inflight() > LIMIT)
        .count();
    println!(
        "\n{} pods went over the limit of {LIMIT} through lb-agent.",
        if over == 0 {
            "No".to_string()
        } else {
            over.to_string()
        }
    );

    // 3. An asynchronous service: at random, then through lb-agent.
    println!(
        "\nAn asynchronous service: {ASYNC_PODS} pods answering 202 + Location at once, each working on \
         one job at a time;\n{JOBS} jobs of {WORK_MS} ms submitted at once, each client polling \
         its Location every 100 ms."
    );
    let direct = start_async_pods().await?;
    let addrs: Vec<SocketAddr> = direct.iter().map(|p| p.addr).collect();
    let picks = random_picks(JOBS, ASYNC_PODS, 0)
        .into_iter()
        .map(|i| addrs[i])
        .collect();
    let seen = job_burst(picks, addrs.clone()).await?;
    report_jobs(
        "Without lb-agent (a random pod per connection, polls included):",
        &direct,
        seen,
    )
    .await;
    drop(direct);
    let seen = job_burst(vec![agent; JOBS], vec![agent]).await?;
    report_jobs(
        "Through lb-agent (limit 1; a job keeps its slot until done; polls go to its pod):",
        &async_pods,
        seen,
    )
    .await;
    let over = async_pods
        .iter()
        .filter(|p| {
            p.stats
                .max_running
                .load(std::sync::atomic::Ordering::SeqCst)
                > 1
        })
        .count();
    println!(
        "\n{} async pods held more than 1 job at once through lb-agent.",
        if over == 0 {
            "No".to_string()
        } else {
            over.to_string()
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
