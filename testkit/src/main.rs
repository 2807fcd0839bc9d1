//! `testkit demo` shows lb-agent's job on fake pods without a cluster; `testkit fakepods …`
//! serves fake pods for bench/ until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use testkit::fakepod::{start_serving, ServeOptions};

#[derive(Debug, Parser)]
#[command(
    name = "testkit",
    about = "lb-agent's test tools: the demo and fake pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start fake pods on loopback, send a burst at random and through lb-agent, print how the
    /// requests spread.
    Demo {
        /// lb-agent binary to run (default: $LB_AGENT_BIN, else the one built beside testkit;
        /// under `cargo run` it is built first).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Serve fake compute pods on IP, IP+1, … sharing one port.
    ///
    /// Each request sleeps ?ms=N (or header x-delay-ms: N). Each pod serves GET /_stats and
    /// POST /_stats/reset (JSON: inflight, max_inflight, started, finished, busy_ms, work_ms).
    /// Prints one line `fakepods ready <first>..<last> port <port>` once every pod listens;
    /// runs until SIGTERM or SIGINT.
    Fakepods(ServeOptions),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Demo { agent } => testkit::demo::run(agent),
        Cmd::Fakepods(opts) => fakepods(opts),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("testkit fakepods: {msg}");
    ExitCode::FAILURE
}

fn fakepods(opts: ServeOptions) -> ExitCode {
    if let Err(e) = opts.check() {
        eprintln!("testkit fakepods: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start a runtime: {e}")),
    };
    rt.block_on(async {
        let pods = match start_serving(&opts).await {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot listen: {e}")),
        };
        println!(
            "fakepods ready {}..{} port {}",
            opts.ip(0),
            opts.ip(opts.count - 1),
            pods[0].addr.port()
        );
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => return fail(&format!("cannot watch SIGTERM: {e}")),
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        drop(pods);
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn parse(args: &[&str]) -> Result<ServeOptions, String> {
        let cli = Cli::try_parse_from(["testkit", "fakepods"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Cmd::Fakepods(o) = cli.command else {
            unreachable!("fakepods parses as fakepods")
        };
        o.check().map(|()| o)
    }

    #[test]
    fn parses_fakepods_options() {
        let o = parse(&[
            "--first",
            "127.0.2.9",
            "--count",
            "3",
            "--port",
            "18000",
            "--workers",
            "2",
        ])
        .unwrap();
        assert_eq!(o.ip(0), Ipv4Addr::new(127, 0, 2, 9));
        assert_eq!(o.ip(2), Ipv4Addr::new(127, 0, 2, 11));
        assert_eq!((o.count, o.port, o.workers), (3, 18000, Some(2)));
        let d = parse(&[]).unwrap();
        assert_eq!(
            (d.first, d.count, d.port, d.workers),
            (Ipv4Addr::new(127, 0, 1, 1), 4, 0, None)
        );
        assert!(parse(&["--count", "0"]).is_err());
        assert!(parse(&["--first", "255.255.255.255", "--count", "2"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
