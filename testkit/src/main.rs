//! `testkit demo` shows lb-agent's job on fake pods without a cluster; `testkit fakepods …`
//! and `testkit asyncpods …` serve fake pods for bench/ until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use std::future::Future;
use std::net::Ipv4Addr;

use clap::{Parser, Subcommand};
use testkit::asyncpod::AsyncServeOptions;
use testkit::fakepod::ServeOptions;

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
    /// Serve fake asynchronous pods on IP, IP+1, … sharing one port.
    ///
    /// POST /submit?ms=N starts a job of N ms and answers 202 + Location /jobs/<id> (ids are
    /// distinct across pods: a poll at the wrong pod is a 404). Each pod serves GET /_stats and
    /// POST /_stats/reset (JSON: submitted, running, max_running, finished, unknown_polls,
    /// polls, callbacks_sent, work_ms, last_done_unix_ms). Prints one line
    /// `asyncpods ready <first>..<last> port <port>` once every pod listens; runs until
    /// SIGTERM or SIGINT.
    Asyncpods(AsyncServeOptions),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Demo { agent } => testkit::demo::run(agent),
        Cmd::Fakepods(opts) => match opts.check() {
            Err(e) => refuse("fakepods", &e),
            Ok(()) => serve(
                "fakepods",
                opts.ip(0),
                opts.ip(opts.count - 1),
                async move {
                    let pods = testkit::fakepod::start_serving(&opts).await?;
                    Ok((pods[0].addr.port(), pods))
                },
            ),
        },
        Cmd::Asyncpods(opts) => match opts.check() {
            Err(e) => refuse("asyncpods", &e),
            Ok(()) => serve(
                "asyncpods",
                opts.ip(0),
                opts.ip(opts.count - 1),
                async move {
                    let pods = testkit::asyncpod::start_serving(&opts).await?;
                    Ok((pods[0].addr.port(), pods))
                },
            ),
        },
    }
}

/// Options that clap took but `check` refused: exit 2, as clap does for its own refusals.
fn refuse(what: &str, why: &str) -> ExitCode {
    eprintln!("testkit {what}: {why}");
    ExitCode::from(2)
}

/// Runs `start` (the pods, and the port they share), says `<what> ready <first>..<last> port
/// <port>` and serves until SIGTERM or SIGINT.
fn serve<P>(
    what: &str,
    first: Ipv4Addr,
    last: Ipv4Addr,
    start: impl Future<Output = std::io::Result<(u16, P)>>,
) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("testkit {what}: {msg}");
        ExitCode::FAILURE
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start a runtime: {e}")),
    };
    rt.block_on(async {
        let (port, pods) = match start.await {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot listen: {e}")),
        };
        println!("{what} ready {first}..{last} port {port}");
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
    use testkit::asyncpod::Convention;

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

    #[test]
    fn parses_asyncpods_options() {
        let cli = Cli::try_parse_from([
            "testkit",
            "asyncpods",
            "--count",
            "2",
            "--workers",
            "1",
            "--convention",
            "not-accepted",
            "--callback",
        ])
        .unwrap();
        let Cmd::Asyncpods(o) = cli.command else {
            panic!("asyncpods parsed as something else")
        };
        assert_eq!(o.ip(1), Ipv4Addr::new(127, 0, 1, 2));
        assert_eq!(
            (o.count, o.workers, o.convention, o.callback),
            (2, Some(1), Convention::NotAccepted, true)
        );
        assert!(Cli::try_parse_from(["testkit", "asyncpods", "--convention", "x"]).is_err());
    }
}
