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
