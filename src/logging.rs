//! Logging: env_logger to stderr, and a copy of every line to `log_file` when it is set.
//!
//! `RUST_LOG` overrides the level; otherwise `info`, or `debug` with the Go agent's `debug: true`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Writes every log line to stderr and to a file.
struct Tee {
    file: File,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // stderr is the primary sink (kubectl logs); a full disk must not stop logging there.
        let _ = io::stderr().write_all(buf);
        let _ = self.file.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.file.flush();
        io::stderr().flush()
    }
}

/// Sets up logging. Creates the log file's directory. Call once.
pub fn init(debug: bool, log_file: Option<&Path>) -> Result<(), String> {
    let default = if debug { "debug" } else { "info" };
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    // Pingora and hickory are chatty at info about things that are ours to report.
    if std::env::var_os("RUST_LOG").is_none() {
        builder.filter_module("pingora_core", log::LevelFilter::Warn);
        builder.filter_module("pingora_proxy", log::LevelFilter::Warn);
        builder.filter_module("hickory_resolver", log::LevelFilter::Warn);
        builder.filter_module("hickory_net", log::LevelFilter::Warn);
        builder.filter_module("hickory_proto", log::LevelFilter::Warn);
    }
    if let Some(path) = log_file {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("log_file: cannot create directory {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("log_file: cannot open {}: {e}", path.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(Tee { file })));
    }
    builder
        .try_init()
        .map_err(|e| format!("logging already initialised: {e}"))
}
