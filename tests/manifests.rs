//! The shipped Dockerfile and k8s/ manifests agree with each other and with the config.

mod common;

use serde_yaml::Value;
use std::process::Command;

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

#[test]
fn manifests_dockerfile_and_config_agree() {
    // Every manifest parses and lives in the Go agent's namespace.
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir("k8s").unwrap() {
        let path = entry.unwrap().path();
        let v = load(path.to_str().unwrap());
        assert_eq!(v["metadata"]["namespace"], "ai-media", "{}", path.display());
        kinds.push(v["kind"].as_str().unwrap().to_string());
    }
    for k in ["ConfigMap", "Deployment", "Service"] {
        assert!(kinds.iter().any(|x| x == k), "k8s/ lacks a {k}");
    }

    // The ConfigMap's config passes --check.
    let cm = load("k8s/configmap.yaml");
    let config_text = cm["data"]["config.yaml"].as_str().unwrap();
    let dir = common::temp_dir("manifests");
    let path = dir.join("config.yaml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(common::bin())
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_yaml::from_str(config_text).unwrap();
    let port = config["port"].as_u64().unwrap();
    let admin_port: u64 = config["admin_listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // Deployment: ports, probes, config mount path, grace period.
    let dep = load("k8s/deployment.yaml");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let ports: Vec<u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, vec![port, admin_port]);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = "/usr/local/services/ai-media/conf/config.yaml";
    assert_eq!(args, vec!["-c", config_path]);
    assert_eq!(
        format!("{}/config.yaml", mount["mountPath"].as_str().unwrap()),
        config_path
    );
    // The kubelet's SIGKILL must not come before lb-agent's own deadline: the delay, then
    // the grace, then a moment to exit.
    let parsed = lb_agent::config::Config::parse(config_text).unwrap();
    let needed = parsed.shutdown_delay + parsed.shutdown_grace + std::time::Duration::from_secs(1);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        std::time::Duration::from_secs(termination) >= needed,
        "terminationGracePeriodSeconds {termination} must cover shutdown_delay + shutdown_grace + 1 s = {needed:?}"
    );
    assert!(
        c.get("lifecycle").is_none(),
        "no preStop hook: the shutdown delay is lb-agent's own"
    );
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The agent's Service: lb-agent:8080 → the container's proxy port.
    let svc = load("k8s/service.yaml");
    assert_eq!(svc["metadata"]["name"], "lb-agent");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"].as_u64().unwrap(),
        port
    );
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["selector"]["matchLabels"]
    );

    // Several replicas share one cap: the ConfigMap's ledger is the Redis that k8s/ runs, a
    // PodDisruptionBudget keeps all but one up, and replicas spread over nodes.
    let replicas = dep["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "replicas: {replicas}");
    let ledger_svc = load("k8s/ledger-redis-service.yaml");
    let ledger_dep = load("k8s/ledger-redis.yaml");
    assert_eq!(
        parsed.ledger.redis.as_deref(),
        Some(
            format!(
                "redis://{}.{}.svc.cluster.local:{}/0",
                ledger_svc["metadata"]["name"].as_str().unwrap(),
                ledger_svc["metadata"]["namespace"].as_str().unwrap(),
                ledger_svc["spec"]["ports"][0]["port"].as_u64().unwrap()
            )
            .as_str()
        ),
        "with several replicas the ConfigMap must point at the ledger Service"
    );
    assert_eq!(
        ledger_svc["spec"]["selector"],
        ledger_dep["spec"]["selector"]["matchLabels"]
    );
    let pdb = load("k8s/pdb.yaml");
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );
    assert!(pdb["spec"]["maxUnavailable"].as_u64().unwrap() < replicas);
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );

    // The backend Service is headless and serves the route's port.
    let backend = load("k8s/backend-headless-service.yaml");
    assert_eq!(backend["spec"]["clusterIP"], "None");
    let route = &config["routes"][0];
    assert_eq!(backend["metadata"]["name"], route["service_name"]);
    assert_eq!(backend["spec"]["ports"][0]["port"], route["http_port"]);

    // Dockerfile: exposes both ports, uses the drop-in config path, runs as non-root.
    let docker = std::fs::read_to_string("Dockerfile").unwrap();
    let expose = docker.lines().find(|l| l.starts_with("EXPOSE")).unwrap();
    assert!(
        expose.contains(&port.to_string()) && expose.contains(&admin_port.to_string()),
        "{expose}"
    );
    assert!(docker.contains(config_path));
    assert!(docker.contains("USER 10001"));
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert!(docker.contains("cmake"), "the build stage installs cmake");
    let _ = std::fs::remove_dir_all(dir);
}

/// The Dockerfile split into stages: (the `FROM` line, the instructions after it, with
/// continuation lines joined).
fn docker_stages(text: &str) -> Vec<(String, Vec<String>)> {
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let instruction = std::mem::take(&mut current).trim().to_string();
        if instruction.starts_with("FROM ") {
            stages.push((instruction, Vec::new()));
        } else if !instruction.is_empty() {
            stages.last_mut().expect("FROM first").1.push(instruction);
        }
    }
    stages
}

#[test]
fn image_is_stripped_small_in_context_and_writable_where_it_logs() {
    let docker = std::fs::read_to_string("Dockerfile").unwrap();
    let stages = docker_stages(&docker);
    let (build_from, build) = &stages[0];
    let (_, runtime) = stages.last().unwrap();
    assert!(build_from.ends_with(" AS build"), "{build_from}");

    // The runtime stage ships the binary without debug info, split off in the build stage
    // (which also keeps it, for profiling, in a stage of its own).
    let copy_bin = runtime
        .iter()
        .find(|i| i.ends_with(" /usr/local/bin/lb-agent"))
        .expect("the runtime stage copies the binary");
    assert_eq!(
        copy_bin,
        "COPY --from=build /out/lb-agent /usr/local/bin/lb-agent"
    );
    let cargo = build
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("a cargo build step");
    // The shipped binary is built with the tuned `dist` profile (LTO, one codegen unit).
    assert!(
        cargo.contains("cargo build --profile dist ")
            && cargo.contains("objcopy --only-keep-debug target/dist/lb-agent /out/lb-agent.debug")
            && cargo.contains("objcopy --strip-debug")
            && cargo.ends_with("target/dist/lb-agent /out/lb-agent"),
        "{cargo}"
    );
    assert!(
        stages
            .iter()
            .any(|(from, steps)| from == "FROM scratch AS debug-symbols"
                && steps == &["COPY --from=build /out/lb-agent.debug /"]),
        "a debug-symbols stage exports the debug info"
    );

    // The directory of the shipped config's log_file (relative to WORKDIR, as the Go agent ran)
    // exists, owned by 10001, with a mode that a tmpfs mounted there inherits and uid 10001 can
    // write to (runc gives the tmpfs the directory's mode, not its owner).
    let workdir = runtime
        .iter()
        .find_map(|i| i.strip_prefix("WORKDIR "))
        .unwrap();
    let config = load("conf/config.yaml");
    let log_file = config["log_file"].as_str().unwrap();
    let log_dir = std::path::Path::new(workdir)
        .join(log_file)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .replace("/./", "/");
    assert_eq!(log_dir, "/usr/local/services/ai-media/logs");
    let run = runtime
        .iter()
        .find(|i| i.starts_with("RUN ") && i.contains("useradd"))
        .unwrap();
    assert!(run.contains("--uid 10001 --gid 10001"), "{run}");
    assert!(
        run.contains(&format!("install -d -o 10001 -g 10001 -m 1777 {log_dir}")),
        "{run}"
    );
    assert!(!docker.contains("ai-media/log "), "no unused log directory");
    // Kubernetes mounts its emptyDir for logs at the same place.
    let dep = load("k8s/deployment.yaml");
    let mounts = dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .clone();
    assert!(
        mounts.iter().any(|m| m["mountPath"] == log_dir.as_str()),
        "{mounts:?}"
    );

    // .dockerignore excludes everything (target/ above all) but what the Dockerfile copies.
    let ignore = std::fs::read_to_string(".dockerignore").expect(".dockerignore exists");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "everything is excluded first");
    let included: Vec<&str> = rules.iter().filter_map(|r| r.strip_prefix('!')).collect();
    for excluded in ["target", ".git", "bench", "logs", "tests"] {
        assert!(
            !included
                .iter()
                .any(|i| i.trim_end_matches('/') == excluded
                    || i.starts_with(&format!("{excluded}/"))),
            "{excluded} must stay out of the build context: {included:?}"
        );
    }
    let sources: Vec<&str> = stages
        .iter()
        .flat_map(|(_, steps)| steps)
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from="))
        .flat_map(|i| {
            let words: Vec<&str> = i.split_whitespace().skip(1).collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    assert!(sources.contains(&"src"), "{sources:?}");
    for source in sources {
        let source = source.trim_end_matches('/');
        assert!(
            included.contains(&source),
            "COPY {source} is not in the build context: add !{source} to .dockerignore"
        );
    }
}

/// The `[profile.NAME]` section of Cargo.toml as `key = value` lines (comments dropped).
fn cargo_profile(cargo_toml: &str, name: &str) -> Vec<String> {
    let header = format!("[profile.{name}]");
    cargo_toml
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.replace(' ', ""))
        .collect()
}

/// The image is built with whole-program optimisation, the tests are not (CI builds them with
/// `--release`, which must stay quick), and no profile aborts on panic: a panic must stay inside
/// its request, not take every queued and in-flight request of the process with it.
#[test]
fn dist_profile_is_tuned_release_stays_quick_and_panics_unwind() {
    let cargo = std::fs::read_to_string("Cargo.toml").unwrap();
    let dist = cargo_profile(&cargo, "dist");
    for want in ["inherits=\"release\"", "lto=\"fat\"", "codegen-units=1"] {
        assert!(
            dist.iter().any(|l| l == want),
            "[profile.dist] lacks {want}: {dist:?}"
        );
    }
    let release = cargo_profile(&cargo, "release");
    assert!(!release.is_empty(), "Cargo.toml has a [profile.release]");
    assert!(
        !release.iter().any(|l| l.starts_with("lto=")),
        "[profile.release] has no LTO (cargo test --release must stay quick): {release:?}"
    );
    assert!(
        !cargo.replace(' ', "").contains("panic=\"abort\""),
        "no profile sets panic = \"abort\""
    );
}
