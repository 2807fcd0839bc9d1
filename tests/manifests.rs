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
