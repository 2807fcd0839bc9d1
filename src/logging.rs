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

/// Why logging could not be set up (a start-up error: the process exits with it).
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log_file: cannot create directory {}: {source}", dir.display())]
    CreateDir {
        dir: std::path::PathBuf,
        source: io::Error,
    },
    #[error("log_file: cannot open {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("logging already initialised: {0}")]
    AlreadyInitialised(#[from] log::SetLoggerError),
}

/// Sets up logging. Creates the log file's directory. Call once.
pub fn init(debug: bool, log_file: Option<&Path>) -> Result<(), LoggingError> {
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
            std::fs::create_dir_all(dir).map_err(|source| LoggingError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LoggingError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        builder.target(env_logger::Target::Pipe(Box::new(Tee { file })));
    }
    Ok(builder.try_init()?)
}
