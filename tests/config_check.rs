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

/// The Go agent read its file with a YAML 1.1 parser, where `yes`, `on`, `y` (any case) are
/// booleans: its ConfigMaps may say `debug: yes`, and must load here too.
#[test]
fn go_config_loads_with_every_yaml_1_1_boolean_form() {
    let go = std::fs::read_to_string("tests/fixtures/go-configmap.yaml").unwrap();
    assert!(go.contains("\ndebug: false\n"));
    for form in [
        "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "y", "Y",
        "n", "N", "true", "True", "TRUE", "false", "False", "FALSE", "yEs", "\"yes\"",
    ] {
        let text = go.replace("\ndebug: false\n", &format!("\ndebug: {form}\n"));
        let (ok, out) = check_text("yaml11-bool", &text);
        assert!(ok, "debug: {form} should pass --check: {out}");
    }
    // Anything else is still refused, naming the field.
    for bad in ["maybe", "1", "yess", "[]"] {
        let text = go.replace("\ndebug: false\n", &format!("\ndebug: {bad}\n"));
        let (ok, out) = check_text("yaml11-bool", &text);
        assert!(!ok, "debug: {bad} should fail --check");
        assert!(
            out.contains("lb-agent: config error: debug: ") && out.contains("yes/no"),
            "debug: {bad}: {out}"
        );
    }
}

/// Unknown keys stay errors, but one run names every one of them (with its path and the key
/// that was probably meant) and every invalid value, so an old ConfigMap is fixed in one pass.
#[test]
fn every_unknown_key_and_bad_value_is_reported_in_one_run() {
    let want = [
        "lb-agent: config error: log_fle: unknown field `log_fle`; did you mean `log_file`?",
        "lb-agent: config error: queue.max_waitng: unknown field `max_waitng`; did you mean `max_waiting`?",
        "lb-agent: config error: routes[1].htp_port: unknown field `htp_port`; did you mean `http_port`?",
        "lb-agent: config error: routes[1].limit: must be at least 1",
    ];
    // `--check`, and a start with the same file, say the same.
    for args in [
        &["--check", "-c", "tests/fixtures/typos.yaml"][..],
        &["-c", "tests/fixtures/typos.yaml"][..],
    ] {
        let (status, stderr) = run_bounded(args);
        assert!(!status.success(), "{args:?}: {status:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines, want, "{args:?}");
    }
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
    assert!(!stderr.to_lowercase().contains("usage"), "{stderr:?}");

    // A bad argument still shows the usage.
    let (status, stderr) = run_bounded(&["--bogus"]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("'--bogus'") && stderr.contains("Usage: lb-agent"),
        "{stderr:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A proxy port another process holds is a start-up error naming the field (before, Pingora's
/// failed bind ended only the proxy's thread: the agent ran on, its admin port ready, its
/// proxy port refusing every connection).
#[test]
fn a_taken_listen_port_is_a_start_error_naming_the_field() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = common::temp_dir("listen-taken");
    for (field, body) in [
        (
            "listen",
            format!(
                "listen: {addr}\nadmin_listen: 127.0.0.1:{}\n",
                common::free_port()
            ),
        ),
        (
            "admin_listen",
            format!(
                "listen: 127.0.0.1:{}\nadmin_listen: {addr}\n",
                common::free_port()
            ),
        ),
    ] {
        let config = dir.join(format!("{field}.yaml"));
        std::fs::write(
            &config,
            format!("{body}routes:\n  - {{uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}}\n"),
        )
        .unwrap();
        let (status, stderr) = run_bounded(&["-c", config.to_str().unwrap()]);
        assert_eq!(status.code(), Some(1), "{field}: {status:?} {stderr:?}");
        let want = format!("lb-agent: {field}: cannot listen on {addr}: ");
        assert!(
            stderr.lines().any(|l| l.starts_with(&want)),
            "{field}: {stderr:?}"
        );
    }
    drop(taken);
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------------
// Upper bounds: every number that could overflow or panic at run time is refused by --check,
// with a message naming the field. Each test writes one absurd value into an otherwise valid
// config and runs the real binary.
// ---------------------------------------------------------------------------------------------

/// A valid route, appended to the settings under test.
const ROUTE: &str = "routes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:80\"]}\n";

/// Runs `--check` on `text`; (passed, stderr).
fn check_text(tag: &str, text: &str) -> (bool, String) {
    let dir = common::temp_dir(tag);
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    let (status, stderr) = run_bounded(&["--check", "-c", path.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(dir);
    (status.success(), stderr)
}

/// `--check` on `text` exits non-zero and its stderr contains `want` (which names the field).
fn refused(text: &str, want: &str) {
    let (ok, stderr) = check_text("bound", text);
    assert!(!ok, "config {text:?} should fail --check");
    assert!(
        stderr.contains(want),
        "config {text:?}\n gave {stderr:?}\n want it to contain {want:?}"
    );
}

/// `--check` on `text` exits 0: the bound itself is allowed.
fn accepted(text: &str) {
    let (ok, stderr) = check_text("at-bound", text);
    assert!(ok, "config {text:?} should pass --check: {stderr}");
}

#[test]
fn limit_is_bounded_far_below_the_semaphore_maximum() {
    accepted("routes:\n  - {uri: /a, limit: 100000, endpoints: [\"127.0.0.1:80\"]}\n");
    refused(
        "routes:\n  - {uri: /a, limit: 100001, endpoints: [\"127.0.0.1:80\"]}\n",
        "routes[0].limit: must be at most 100000 (got 100001)",
    );
    // 2^61: one pod's slots alone would be above tokio's Semaphore::MAX_PERMITS.
    refused(
        "routes:\n  - {uri: /a, limit: 2305843009213693952, service_name: s, namespace: n, http_port: 80}\n",
        "routes[0].limit: must be at most 100000",
    );
}

#[test]
fn queue_max_waiting_is_bounded() {
    accepted(&format!("queue: {{max_waiting: 1000000}}\n{ROUTE}"));
    refused(
        &format!("queue: {{max_waiting: 1000001}}\n{ROUTE}"),
        "queue.max_waiting: must be at most 1000000",
    );
    refused(
        "routes:\n  - {uri: /a, limit: 1, queue: {max_waiting: 18446744073709551615}, endpoints: [\"127.0.0.1:80\"]}\n",
        "routes[0].queue.max_waiting: must be at most 1000000",
    );
}

#[test]
fn queue_timeout_is_bounded() {
    accepted(&format!("queue: {{timeout: 24h}}\n{ROUTE}"));
    for absurd in ["18446744073709551615s", "1000000000000s", "25h"] {
        refused(
            &format!("queue: {{timeout: {absurd}}}\n{ROUTE}"),
            "queue.timeout: must be at most 24h",
        );
    }
    refused(
        "routes:\n  - {uri: /a, limit: 1, queue: {timeout: 1000000000000s}, endpoints: [\"127.0.0.1:80\"]}\n",
        "routes[0].queue.timeout: must be at most 24h",
    );
}

#[test]
fn threads_are_bounded() {
    accepted(&format!("threads: 1024\n{ROUTE}"));
    refused(
        &format!("threads: 4294967296\n{ROUTE}"),
        "threads: must be at most 1024",
    );
    refused(
        &format!("threads: 0\n{ROUTE}"),
        "threads: must be at least 1",
    );
}

#[test]
fn max_attempts_is_bounded() {
    accepted(&format!("max_attempts: 100\n{ROUTE}"));
    refused(
        &format!("max_attempts: 1000000000000\n{ROUTE}"),
        "max_attempts: must be at most 100",
    );
}

#[test]
fn dns_stability_samples_are_bounded() {
    accepted(&format!("dns: {{stability_samples: 100}}\n{ROUTE}"));
    refused(
        &format!("dns: {{stability_samples: 100000000000}}\n{ROUTE}"),
        "dns.stability_samples: must be at most 100",
    );
}

#[test]
fn dns_intervals_are_bounded() {
    for field in ["refresh_interval", "stability_interval", "unstable_retry"] {
        accepted(&format!("dns: {{{field}: 24h}}\n{ROUTE}"));
        refused(
            &format!("dns: {{{field}: 1000000000000s}}\n{ROUTE}"),
            &format!("dns.{field}: must be at most 24h"),
        );
    }
}

#[test]
fn reload_interval_is_bounded() {
    accepted(&format!("reload_interval: 24h\n{ROUTE}"));
    refused(
        &format!("reload_interval: 18446744073709551615s\n{ROUTE}"),
        "reload_interval: must be at most 24h",
    );
}

#[test]
fn connect_timeout_is_bounded() {
    accepted(&format!("connect_timeout: 10m\n{ROUTE}"));
    refused(
        &format!("connect_timeout: 1000000000000s\n{ROUTE}"),
        "connect_timeout: must be at most 10m",
    );
}

#[test]
fn upstream_idle_timeout_is_bounded() {
    accepted(&format!("upstream_idle_timeout: 300s\n{ROUTE}"));
    refused(
        &format!("upstream_idle_timeout: 18446744073709551615s\n{ROUTE}"),
        "upstream_idle_timeout: must be at most 300s",
    );
}

#[test]
fn shutdown_settings_are_bounded() {
    accepted(&format!(
        "shutdown_grace: 24h\nshutdown_delay: 10m\n{ROUTE}"
    ));
    refused(
        &format!("shutdown_grace: 18446744073709551615s\n{ROUTE}"),
        "shutdown_grace: must be at most 24h",
    );
    refused(
        &format!("shutdown_delay: 1000000000000s\n{ROUTE}"),
        "shutdown_delay: must be at most 10m",
    );
}

#[test]
fn client_limits_are_bounded() {
    for field in ["header_timeout", "keepalive_timeout", "timeout"] {
        refused(
            &format!("client: {{{field}: 18446744073709551615s}}\n{ROUTE}"),
            &format!("client.{field}: must be greater than 0 and at most 24h"),
        );
    }
    refused(
        &format!("client: {{max_header_size: 18446744073709551615}}\n{ROUTE}"),
        "client.max_header_size: must be between 1024 and 1048576",
    );
    refused(
        &format!("client: {{response_buffer: 2147483648}}\n{ROUTE}"),
        "client.response_buffer: must be at most 1073741824 bytes",
    );
    refused(
        &format!("client: {{response_buffer: 1048576, response_buffer_total: 1000}}\n{ROUTE}"),
        "client.response_buffer_total: must be at least client.response_buffer (1048576)",
    );
}

#[test]
fn endpoints_must_name_one_host_on_a_real_port() {
    for (endpoint, want) in [
        ("127.0.0.1:0", "port must be between 1 and 65535"),
        ("224.0.0.1:80", "must be the address of one host"),
        ("[ff02::1]:80", "must be the address of one host"),
        ("0.0.0.0:80", "must be the address of one host"),
        ("[::]:80", "must be the address of one host"),
        ("255.255.255.255:80", "must be the address of one host"),
    ] {
        refused(
            &format!(
                "routes:\n  - {{uri: /a, limit: 1, endpoints: [\"127.0.0.1:80\", \"{endpoint}\"]}}\n"
            ),
            &format!("routes[0].endpoints[1]: {endpoint}: {want}"),
        );
    }
    refused(
        &format!("dns: {{nameservers: [\"0.0.0.0\"]}}\n{ROUTE}"),
        "dns.nameservers[0]: 0.0.0.0:53: must be the address of one host",
    );
}

#[test]
fn dns_names_must_be_rfc_1123() {
    let svc = |svc: &str, ns: &str| {
        format!("routes:\n  - {{uri: /a, limit: 1, service_name: \"{svc}\", namespace: \"{ns}\", http_port: 80}}\n")
    };
    refused(&svc("codec", ""), "routes[0].namespace: must not be empty");
    refused(
        &svc("codec", "ai_media"),
        "routes[0].namespace: \"ai_media\" is not a DNS label",
    );
    refused(
        &svc("video_codec", "n"),
        "routes[0].service_name: \"video_codec\" is not a DNS label",
    );
    refused(
        &svc("-codec", "n"),
        "routes[0].service_name: \"-codec\" is not a DNS label",
    );
    refused(&svc(&"a".repeat(64), "n"), "routes[0].service_name:");
    refused(
        &svc("a.b", "n"),
        "routes[0].service_name: \"a.b\" is not a DNS label",
    );
    refused(
        "routes:\n  - {uri: /a, limit: 1, host: \"bad..name\", http_port: 80}\n",
        "routes[0].host: \"bad..name\" is not a DNS name",
    );
    refused(
        "routes:\n  - {uri: /a, limit: 1, k8s_host: \"codec svc\", K8s_port: 80}\n",
        "routes[0].k8s_host: \"codec svc\" is not a DNS name",
    );
    refused(
        &format!("cluster_domain: corp_local\n{}", svc("codec", "n")),
        "cluster_domain: \"corp_local\" is not a DNS name",
    );
    // Upper case and a trailing dot are fine: DNS names are case-insensitive and may be rooted.
    accepted("routes:\n  - {uri: /a, limit: 1, k8s_host: Codec.AI-Media.svc.cluster.local., K8s_port: 80}\n");
}

#[test]
fn enum_values_name_the_field_and_the_allowed_values() {
    for (key, value, allowed) in [
        ("match", "fuzzy", "exact, prefix"),
        ("protocol", "grpc", "http1, h2c"),
        ("client_abort", "never", "finish, cancel"),
    ] {
        refused(
            &format!("routes:\n  - {{uri: /a, limit: 1, {key}: {value}, endpoints: [\"127.0.0.1:80\"]}}\n"),
            &format!("routes[0].{key}: \"{value}\" is not one of: {allowed}"),
        );
    }
}

#[test]
fn an_oversized_file_is_refused_without_parsing() {
    // Valid YAML: one long comment. Above 1 MiB it is refused whatever it says.
    let padding = format!("# {}\n", "x".repeat(1024 * 1024));
    refused(&format!("{padding}{ROUTE}"), "larger than 1048576 bytes");
}

#[test]
fn deep_nesting_is_refused_at_once() {
    // A 200 KB file of nested flow sequences took 43 s of CPU (69 s wall) to reject before,
    // blocking the reload service meanwhile.
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let n = 200_000 / open.len() / 2;
        let text = format!("{ROUTE}x: {}{}\n", open.repeat(n), close.repeat(n));
        let started = std::time::Instant::now();
        refused(&text, "config nests deeper than 32 levels (at line 3)");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }
    // Block nesting, by indentation and by compact sequences.
    let mut block = String::from(ROUTE);
    for level in 0..40 {
        block.push_str(&format!("{}k{level}:\n", "  ".repeat(level)));
    }
    refused(&block, "config nests deeper than 32 levels");
    refused(
        &format!("{ROUTE}x:\n{}1\n", "- ".repeat(40)),
        "config nests deeper than 32 levels",
    );
    // Brackets inside quoted strings and comments are not nesting.
    accepted(&format!(
        "# {}\nlog_file: \"/tmp/{}\"\n{ROUTE}",
        "[".repeat(100),
        "{".repeat(100)
    ));
}
