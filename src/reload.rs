//! Live config reload: the config background service.
//!
//! In Kubernetes a ConfigMap edit reaches the pod as a new mounted file, swapped in through a
//! symlink (`config.yaml -> ..data/config.yaml`, `..data -> ..2026_11_22_…`). Watching with
//! inotify would have to follow that symlink dance; reading the small file every
//! `reload_interval` and comparing bytes cannot miss it. `SIGHUP` reloads at once.
//!
//! Editors, `docker cp`, bind mounts and config-management tools rewrite a file in place, so a
//! read can catch it half-written. A changed file is therefore applied only once it has read
//! the same for [`SETTLE`] (at the default `reload_interval` of 2 s: two reads in a row); a
//! version that changed again before that is skipped, with a log line saying so. A file swapped
//! in whole through a symlink (the kubelet's ConfigMap update: the path now leads to another
//! file) is complete by construction and applies at once. `SIGHUP` means "the file is
//! complete": it applies what it reads at once.
//!
//! A file that does not parse or validate is rejected with a logged error naming the field, and
//! the running config stays in force; so does a file that cannot be read (a swap in progress).
//! A valid file is applied by [`Live::apply`]: limits, routes, queue settings, targets and
//! `connect_timeout`, `upstream_idle_timeout`, `upstream_timeout` change live; the rest is
//! reported as needing a restart.
//!
//! This service also runs the DNS discovery tasks, so starting and stopping them as names come
//! and go is one job with one owner.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::live::Live;

/// How long a changed file must keep reading the same before it is applied.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The config file the agent runs, as it was read at start-up: later reads are compared with
/// exactly the bytes that were parsed, so an edit landing just after start-up is a change.
pub struct Source {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// The file `path` led to (through symlinks) just before it was read.
    pub file: Option<PathBuf>,
}

impl Source {
    /// Reads and validates the config file, keeping the bytes that were parsed.
    pub fn load(path: &Path) -> Result<(Config, Source), ConfigError> {
        let file = std::fs::canonicalize(path).ok();
        let (config, bytes) = Config::load_with_bytes(path)?;
        let source = Source {
            path: path.to_path_buf(),
            bytes,
            file,
        };
        Ok((config, source))
    }
}

/// SIGHUP, caught from the first line of `main` on. Its default action ends the process, so
/// until a handler is installed a SIGHUP (a reload sent just after a deploy) would kill the
/// agent; one that arrives before the reload service runs is kept and reloads then.
pub struct Hangup(Result<Signal, String>);

impl Hangup {
    /// Installs the SIGHUP handler now. Tokio installs it process-wide when the stream is
    /// created, which needs a runtime with an IO driver; the stream itself is then read on
    /// Pingora's runtime, whose driver delivers the signals (also those sent meanwhile).
    pub fn catch() -> Hangup {
        let stream = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                let _in_runtime = rt.enter();
                signal(SignalKind::hangup()).map_err(|e| e.to_string())
            });
        Hangup(stream)
    }
}

pub struct ConfigService {
    live: Arc<Live>,
    /// `None`: no file to watch (the config did not come from one).
    source: Option<Source>,
    /// Zero: no polling; SIGHUP still reloads.
    interval: Duration,
    /// Taken by the service when it starts.
    hangup: Mutex<Option<Hangup>>,
}

/// Why a reload did not apply.
#[derive(Debug)]
pub enum Rejected {
    Unreadable(String),
    Invalid(String),
}

impl ConfigService {
    pub fn new(
        live: Arc<Live>,
        source: Option<Source>,
        interval: Duration,
        hangup: Option<Hangup>,
    ) -> Self {
        Self {
            live,
            source,
            interval,
            hangup: Mutex::new(hangup),
        }
    }
}

/// What the reload service knows of the file between two reads.
pub struct FileState {
    /// The bytes last applied (or rejected: an invalid file is logged once, not on every read).
    last: Vec<u8>,
    /// The file the path led to when last read (`None`: not known).
    file: Option<PathBuf>,
    /// Changed bytes not applied yet, and when they were first read.
    pending: Option<(Vec<u8>, Instant)>,
}

impl FileState {
    pub fn new(source: &Source) -> Self {
        Self {
            last: source.bytes.clone(),
            file: source.file.clone(),
            pending: None,
        }
    }
}

/// Reads the file; if its bytes differ from the ones in force and either were swapped in whole
/// or have read the same for [`SETTLE`] (or `force`), validates and applies them. Returns
/// `Ok(None)` when nothing was applied, `Ok(Some(summary))` when applied.
pub async fn reload_once(
    live: &Live,
    path: &Path,
    state: &mut FileState,
    force: bool,
) -> Result<Option<String>, Rejected> {
    let unreadable = |e| Rejected::Unreadable(format!("cannot read {}: {e}", path.display()));
    // Read the file the path leads to now, so the bytes and the file are one.
    let file = std::fs::canonicalize(path).map_err(unreadable)?;
    let bytes = crate::config::read_bounded(&file).map_err(unreadable)?;
    let swapped = state.file.as_ref().is_some_and(|f| *f != file);
    state.file = Some(file);
    if !force && bytes == state.last {
        if state.pending.take().is_some() {
            log::info!(
                "config reload: {} changed and changed back before it settled; nothing to apply",
                path.display()
            );
        }
        return Ok(None);
    }
    if !force && !swapped {
        match &state.pending {
            Some((seen, since)) if *seen == bytes => {
                if since.elapsed() < SETTLE {
                    return Ok(None);
                }
            }
            Some((seen, _)) => {
                log::info!(
                    "config reload: {} changed again within {SETTLE:?}; the version read before ({} bytes) is skipped (a file being written?)",
                    path.display(),
                    seen.len()
                );
                state.pending = Some((bytes, Instant::now()));
                return Ok(None);
            }
            None => {
                log::debug!(
                    "config reload: {} changed in place; applying it once it reads the same for {SETTLE:?}",
                    path.display()
                );
                state.pending = Some((bytes, Instant::now()));
                return Ok(None);
            }
        }
    }
    // Remember the bytes even if they are invalid: the error is logged once per edit, not once
    // per poll.
    state.pending = None;
    state.last = bytes.clone();
    let in_force = crate::live::ConfigInForce::new(path, &bytes);
    let text = String::from_utf8(bytes)
        .map_err(|_| Rejected::Invalid("the file is not UTF-8 text".to_string()))?;
    let config = Config::parse(&text).map_err(|e| Rejected::Invalid(e.to_string()))?;
    let summary = live.apply(&config).await;
    live.set_config_in_force(in_force);
    Ok(Some(summary))
}

fn count(result: &str) {
    if let Some(m) = crate::metrics::get() {
        m.config_reloads.with_label_values(&[result]).inc();
    }
}

#[async_trait]
impl BackgroundService for ConfigService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.live.start_discovery();
        self.live.start_job_adoption();
        let Some(source) = &self.source else {
            let _ = shutdown.changed().await;
            self.live.stop_discovery();
            return;
        };
        let path = &source.path;
        let hangup = self.hangup.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut hup = match hangup.map(|h| h.0) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                log::warn!("cannot listen for SIGHUP ({e}); config reload only by polling");
                None
            }
            None => None,
        };
        self.live
            .set_config_in_force(crate::live::ConfigInForce::new(path, &source.bytes));
        let mut state = FileState::new(source);
        let mut unreadable = false;
        loop {
            let force = tokio::select! {
                _ = shutdown.changed() => break,
                _ = async {
                    match hup.as_mut() {
                        Some(h) => { h.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    log::info!("SIGHUP: reloading {}", path.display());
                    true
                }
                _ = async {
                    if self.interval.is_zero() {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep(self.interval).await
                    }
                } => false,
            };
            match reload_once(&self.live, path, &mut state, force).await {
                Ok(None) => {}
                Ok(Some(summary)) => {
                    unreadable = false;
                    count("applied");
                    log::info!("config reloaded from {}: {summary}", path.display());
                }
                Err(Rejected::Unreadable(e)) => {
                    // A symlink swap can leave the path missing for a moment: say it once.
                    if !unreadable || force {
                        log::warn!("config reload: {e}; the running config stays in force");
                    }
                    unreadable = true;
                    if force {
                        count("rejected");
                    }
                }
                Err(Rejected::Invalid(e)) => {
                    unreadable = false;
                    count("rejected");
                    log::error!(
                        "config reload rejected: {}: {e}; the running config stays in force",
                        path.display()
                    );
                }
            }
        }
        self.live.stop_discovery();
    }
}
