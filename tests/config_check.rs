//! `lb-agent --check` on the shipped configs, the Go agent's configs, and every bad fixture.

mod common;

use std::path::Path;
use std::process::Command;

fn check(path: &Path) -> (bool, String) {
    let out = Command::new(common::bin())
        .arg("--check")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn go_agent_and_shipped_configs_pass() {
    for f in [
        "tests/fixtures/go-configmap.yaml",
        "tests/fixtures/go-repo-config.yaml",
        "tests/fixtures/go-old-route-form.yaml",
        "tests/fixtures/grpc-routes.yaml",
        "conf/config.yaml",
    ] {
        let (ok, text) = check(Path::new(f));
        assert!(ok, "{f} should pass --check: {text}");
    }
}

#[test]
fn every_bad_config_fails_and_names_its_field() {
    let mut n = 0;
    for entry in std::fs::read_dir("tests/fixtures/bad").unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect:' first line", path.display()));
        let (ok, out) = check(&path);
        assert!(!ok, "{} should fail --check", path.display());
        assert!(
            out.contains(want),
            "{}: output {out:?} does not contain {want:?}",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 10, "expected the bad fixtures, found {n}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let (ok, out) = check(Path::new("/nonexistent/lb-agent.yaml"));
    assert!(!ok);
    assert!(
        out.contains("cannot read /nonexistent/lb-agent.yaml"),
        "{out}"
    );
}

/// Runs lb-agent with `args`, killed if it has not exited within 10 s; (exit status, stderr).
fn run_bounded(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("lb-agent {args:?} still running after 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_runtime_error_is_one_line_naming_the_problem_without_the_usage_text() {
    let dir = common::temp_dir("log-file-error");
    // A directory where the log file should be: it cannot be opened for writing (also as root).
    let log_file = dir.join("agent.log");
    std::fs::create_dir_all(&log_file).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{}\nlog_file: {}\nroutes:\n  - {{uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}}\n",
            common::free_port(),
            log_file.display()
        ),
    )
    .unwrap();
    let (status, stderr) = run_bounded(&["-c", config.to_str().unwrap()]);
    assert!(!status.success(), "{status:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr:?}");
    assert!(
        lines[0].starts_with("lb-agent: log_file: cannot open")
            && lines[0].contains(log_file.to_str().unwrap()),
        "{stderr:?}"
    );
    assert!(!stderr.contains("usage"), "{stderr:?}");

    // A bad argument still shows the usage.
    let (status, stderr) = run_bounded(&["--bogus"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("unknown argument \"--bogus\"") && stderr.contains("usage:"));
    let _ = std::fs::remove_dir_all(dir);
}
