//! Test helpers: run the real `lb-agent` binary against fake pods on loopback.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use testkit::fakepod::{start_pods, FakePod};
pub use testkit::loadgen;

/// A running lb-agent process; killed on drop.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port for a process the test starts (an agent's proxy or admin port, a Redis), free now.
///
/// Taken below Linux's ephemeral range (32768-60999), from a slice of its own per test
/// process, each port once: a port that `bind(0)` handed out and the test released could be
/// taken meanwhile by an outgoing connection's local port or by another test's `bind(0)` before
/// the agent binds it (seen as an agent whose proxy port refused connections).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 12_000;
    const SLICE: u32 = 1_250;
    let base = FIRST + (std::process::id() % 16) * SLICE;
    for _ in 0..SLICE {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % SLICE;
        let port = u16::try_from(base + n).expect("below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{base}..{}", base + SLICE);
}

/// Python in a virtualenv under the test target dir with `requirement` (a pinned PyPI
/// package) installed so that `import` works, made once and reused by later runs. Made in a
/// scratch dir and renamed into place, so an interrupted install is never mistaken for a
/// finished one. Callers keep the result in a `OnceLock`.
pub fn venv_python(name: &str, requirement: &str, import: &str) -> PathBuf {
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin").join("python");
    let works = |python: &std::path::Path| {
        Command::new(python)
            .args(["-c", &format!("import {import}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&python) {
        return python;
    }
    let scratch = venv.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&scratch),
        "python3 -m venv (Debian: apt-get install python3-venv)",
    );
    run(
        Command::new(scratch.join("bin").join("python")).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
        ]),
        &format!("pip install {requirement}"),
    );
    if std::fs::rename(&scratch, &venv).is_err() {
        // Another test process finished first: use its venv.
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(works(&python), "no {import} in {}", venv.display());
    python
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("lb-agent-test-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb-agent")
}

/// `endpoints: [...]` YAML for a set of pods.
pub fn endpoints(pods: &[FakePod]) -> String {
    let v: Vec<String> = pods.iter().map(|p| format!("\"{}\"", p.addr)).collect();
    format!("[{}]", v.join(", "))
}

impl Agent {
    /// Starts lb-agent with `body` (a config without `listen`/`admin_listen`, which are added)
    /// and waits until /readyz answers 200.
    pub async fn start(body: &str) -> Agent {
        let agent = Self::spawn(body);
        agent.wait_ready(Duration::from_secs(20)).await;
        agent
    }

    /// [`Agent::start`] with extra environment variables for the process.
    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> Agent {
        let agent = Self::spawn_with_env(body, env);
        agent.wait_ready(Duration::from_secs(20)).await;
        agent
    }

    /// Starts lb-agent without waiting for readiness.
    pub fn spawn(body: &str) -> Agent {
        Self::spawn_with_env(body, &[])
    }

    /// [`Agent::spawn`] with extra environment variables for the process.
    pub fn spawn_with_env(body: &str, env: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let admin = free_port();
        let dir = temp_dir("agent");
        let config = format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n{body}");
        write_configmap(&dir, &config);
        Self::launch(dir, port, admin, env)
    }

    /// Runs lb-agent on `dir/config.yaml`, which the caller has prepared (or is about to: the
    /// process is started at once) with `listen` on `port` and `admin_listen` on `admin`.
    pub fn launch(dir: PathBuf, port: u16, admin: u16, env: &[(&str, &str)]) -> Agent {
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new(bin())
            .arg("-c")
            .arg(dir.join("config.yaml"))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lb-agent");
        Agent {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            dir,
        }
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = loadgen::get(self.admin, "/readyz", &[]).await {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "lb-agent not ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM.
    /// The agent's process id (for reading its memory use from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Kills the process at once (SIGKILL): no drain, no goodbye to anyone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; `None` if it is still running after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces the config file the way a ConfigMap update does (see [`write_configmap`]),
    /// with the same `listen`/`admin_listen` in front of `body`.
    pub fn update_config(&self, body: &str) {
        let config = format!(
            "listen: {}\nadmin_listen: {}\n{body}",
            self.addr, self.admin
        );
        write_configmap(&self.dir, &config);
    }

    /// Replaces the config file with `text` as it is (no listen addresses added).
    pub fn update_config_raw(&self, text: &str) {
        write_configmap(&self.dir, text);
    }

    /// Sends SIGHUP (reload the config now).
    pub fn hangup(&self) {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub async fn status(&self) -> serde_json::Value {
        let r = loadgen::get(self.admin, "/status", &[])
            .await
            .expect("status");
        serde_json::from_str(&r.body).expect("status json")
    }

    /// Queue depth of the first pool.
    pub async fn queue_depth(&self) -> u64 {
        self.status().await["pools"][0]["queue_depth"]
            .as_u64()
            .unwrap()
    }

    /// In-flight slots of the first pool, summed over pods.
    pub async fn inflight(&self) -> u64 {
        self.status().await["pools"][0]["inflight"]
            .as_u64()
            .unwrap()
    }

    /// Active pod addresses of the first pool, from /status.
    pub async fn active_pods(&self) -> std::collections::BTreeSet<String> {
        self.status().await["pools"][0]["pods"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["active"] == true)
            .map(|p| p["addr"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn get(&self, path: &str) -> loadgen::Response {
        loadgen::get(self.addr, path, &[])
            .await
            .expect("request through lb-agent")
    }
}

/// Writes `dir/config.yaml` the way the kubelet writes a mounted ConfigMap: the content goes
/// into a fresh directory `..<n>`, the symlink `..data` is swapped to it atomically (rename),
/// and `config.yaml` is a symlink to `..data/config.yaml`.
pub fn write_configmap(dir: &std::path::Path, text: &str) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let version = format!("..v{n}");
    std::fs::create_dir_all(dir.join(&version)).unwrap();
    std::fs::write(dir.join(&version).join("config.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("config.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/config.yaml", &link).unwrap();
    }
}

/// Starts lb-agent with top-level keys `top` (may be empty) and one exact route `/work` with
/// `limit` over `pods`.
pub async fn start_work_route(top: &str, limit: usize, pods: &[FakePod]) -> Agent {
    Agent::start(&format!(
        "{top}routes:\n  - {{uri: /work, limit: {limit}, endpoints: {}}}\n",
        endpoints(pods)
    ))
    .await
}

/// Sends `GET path` to `addr` in a task of its own.
pub fn spawn_get(
    addr: SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<std::io::Result<loadgen::Response>> {
    let path = path.to_string();
    tokio::spawn(async move { loadgen::get(addr, &path, &[]).await })
}

/// Sends `GET path` through `agent` in a task of its own, tagged `x-req-id: id` (the fake pods
/// record the ids in arrival order).
pub fn get_tagged(
    agent: &Agent,
    path: &str,
    id: &str,
) -> tokio::task::JoinHandle<std::io::Result<loadgen::Response>> {
    let (addr, path, id) = (agent.addr, path.to_string(), id.to_string());
    tokio::spawn(async move { loadgen::get(addr, &path, &[("x-req-id", id.as_str())]).await })
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub mod dns;
pub mod kube;
pub mod redis;

/// One prior-knowledge HTTP/2 (h2c) client connection to `addr` (hyper), driven in a task.
pub async fn h2c_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}
