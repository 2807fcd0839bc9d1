//! Live config reload: the config background service.
//!
//! In Kubernetes a ConfigMap edit reaches the pod as a new mounted file, swapped in through a
//! symlink (`config.yaml -> ..data/config.yaml`, `..data -> ..2026_11_22_…`). Watching with
//! inotify would have to follow that symlink dance; reading the small file every
//! `reload_interval` and comparing bytes cannot miss it. `SIGHUP` reloads at once.
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::live::Live;

pub struct ConfigService {
    live: Arc<Live>,
    /// `None`: no file to watch (the config did not come from one).
    path: Option<PathBuf>,
    /// Zero: no polling; SIGHUP still reloads.
    interval: Duration,
    /// The bytes the running config was loaded from.
    loaded: Option<Vec<u8>>,
}

/// Why a reload did not apply.
#[derive(Debug)]
pub enum Rejected {
    Unreadable(String),
    Invalid(String),
}

impl ConfigService {
    pub fn new(live: Arc<Live>, path: Option<PathBuf>, interval: Duration) -> Self {
        let loaded = path
            .as_ref()
            .and_then(|p| crate::config::read_bounded(p).ok());
        Self {
            live,
            path,
            interval,
            loaded,
        }
    }

    async fn sighup() -> Option<tokio::signal::unix::Signal> {
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP ({e}); config reload only by polling");
                None
            }
        }
    }
}

/// Reads the file; if its bytes differ from `last` (or `force`), validates and applies it.
/// Returns `Ok(None)` when nothing changed, `Ok(Some(summary))` when applied.
pub async fn reload_once(
    live: &Live,
    path: &std::path::Path,
    last: &mut Option<Vec<u8>>,
    force: bool,
) -> Result<Option<String>, Rejected> {
    let bytes = crate::config::read_bounded(path)
        .map_err(|e| Rejected::Unreadable(format!("cannot read {}: {e}", path.display())))?;
    if !force && last.as_deref() == Some(bytes.as_slice()) {
        return Ok(None);
    }
    // Remember the bytes even if they are invalid: the error is logged once per edit, not once
    // per poll.
    *last = Some(bytes.clone());
    let text = String::from_utf8(bytes)
        .map_err(|_| Rejected::Invalid("the file is not UTF-8 text".to_string()))?;
    let config = Config::parse(&text).map_err(|e| Rejected::Invalid(e.to_string()))?;
    Ok(Some(live.apply(&config).await))
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
        let Some(path) = self.path.clone() else {
            let _ = shutdown.changed().await;
            self.live.stop_discovery();
            return;
        };
        let mut hup = Self::sighup().await;
        let mut last = self.loaded.clone();
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
            match reload_once(&self.live, &path, &mut last, force).await {
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
