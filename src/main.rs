//! `lb-agent [-c PATH] [--check]` runs (or validates) the proxy. The demo and the fake pods
//! are not part of the product: they live in the `testkit` crate
//! (`cargo run --release -p testkit -- demo`).

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: lb-agent [-c|--config PATH] [--check]

  -c, --config PATH  config file (default: conf/config.yaml, then
                     /usr/local/services/ai-media/conf/config.yaml)
  --check            validate the config and exit (0: valid)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config_path: Option<PathBuf> = None;
    let mut check = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => match args.next() {
                Some(p) => config_path = Some(PathBuf::from(p)),
                None => return usage_error("-c needs a path"),
            },
            "--check" => check = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    let (path, config) = match lb_agent::config::Config::locate(config_path.as_deref())
        .and_then(|p| lb_agent::config::Config::load(&p).map(|c| (p, c)))
    {
        Ok((path, c)) => {
            if check {
                println!(
                    "{}: ok ({} routes, {} pools)",
                    path.display(),
                    c.routes.len(),
                    c.pools.len()
                );
                return ExitCode::SUCCESS;
            }
            (path, c)
        }
        Err(e) => return fail(&format!("config error: {e}")),
    };
    if let Err(e) = lb_agent::logging::init(config.debug, config.log_file.as_deref()) {
        return fail(&e.to_string());
    }
    log::info!(
        "lb-agent listening on {} ({} routes)",
        config.listen,
        config.routes.len()
    );
    match lb_agent::build_server(&config, Some(&path)) {
        Ok(agent) => agent.run(),
        Err(e) => fail(&e.to_string()),
    }
}

/// A bad command line: the message, then the usage text (exit 2).
fn usage_error(msg: &str) -> ExitCode {
    eprintln!("lb-agent: {msg}\n{USAGE}");
    ExitCode::from(2)
}

/// A runtime error (config, log file, listen address): one line that names the problem (exit 1).
/// The usage text would suggest the arguments were wrong when they were not.
fn fail(msg: &str) -> ExitCode {
    eprintln!("lb-agent: {msg}");
    ExitCode::FAILURE
}
