//! `lb-agent [-c PATH] [--check]` runs (or validates) the proxy. The demo and the fake pods
//! are not part of the product: they live in the `testkit` crate
//! (`cargo run --release -p testkit -- demo`).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// A strict least-in-flight load balancer for compute services on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version)]
struct Args {
    /// Config file (default: conf/config.yaml, then
    /// /usr/local/services/ai-media/conf/config.yaml)
    #[arg(short = 'c', long = "config", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit (0: valid)
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // Before anything else: until SIGHUP has a handler, a reload signal kills the process.
    let hangup = lb_agent::reload::Hangup::catch();
    // A bad command line prints the error and the usage, and exits 2.
    let Args {
        config: config_path,
        check,
    } = Args::parse();
    let (source, config) = match lb_agent::config::Config::locate(config_path.as_deref())
        .and_then(|p| lb_agent::reload::Source::load(&p))
    {
        Ok((c, source)) => {
            if check {
                println!(
                    "{}: ok ({} routes, {} pools)",
                    source.path.display(),
                    c.routes.len(),
                    c.pools.len()
                );
                for line in c.discovery_summary() {
                    println!("  {line}");
                }
                return ExitCode::SUCCESS;
            }
            (source, c)
        }
        // Every problem on its own line: one run of `--check` lists all there is to fix.
        Err(e) => {
            for problem in e.problems() {
                eprintln!("lb-agent: config error: {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = lb_agent::logging::init(config.debug, config.log_file.as_deref()) {
        return fail(&e.to_string());
    }
    log::info!(
        "lb-agent listening on {} ({} routes)",
        config.listen,
        config.routes.len()
    );
    for line in config.discovery_summary() {
        log::info!("{line}");
    }
    match lb_agent::build_server(&config, Some(source), Some(hangup)) {
        Ok(agent) => agent.run(),
        Err(e) => fail(&e.to_string()),
    }
}

/// A runtime error (config, log file, listen address): one line that names the problem (exit 1).
/// The usage text would suggest the arguments were wrong when they were not.
fn fail(msg: &str) -> ExitCode {
    eprintln!("lb-agent: {msg}");
    ExitCode::FAILURE
}
