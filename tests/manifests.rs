//! The shipped Dockerfile and k8s/ bundles (rendered by `kubectl kustomize`, validated against
//! the Kubernetes schemas) agree with each other and with the config.

mod common;

use lb_agent::config::Target;
use serde_yaml::Value;
use std::process::Command;

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} does not parse: {e}"))
}

/// Where the Go agent read its config, and so where the image and the Deployment put it.
const CONFIG_PATH: &str = "/usr/local/services/ai-media/conf/config.yaml";

/// The overlays that exist: every directory under k8s/overlays (so a new one is checked too),
/// which must include the three setups the README documents.
fn overlays() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir("k8s/overlays")
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    dirs.sort();
    for want in [
        "k8s/overlays/headless-dns",
        "k8s/overlays/kube-api",
        "k8s/overlays/replicas-redis",
    ] {
        assert!(
            dirs.iter().any(|d| d == want),
            "{want} is missing: {dirs:?}"
        );
    }
    dirs
}

/// The one object of `kind` named `name` in a rendered bundle.
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}");
    found[0]
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// Every object of every bundle (the overlays, and k8s/keda) as `kubectl kustomize` renders it
/// passes the Kubernetes API schemas (strict: an unknown field is an error), for the oldest and
/// the newest Kubernetes the validator knows. The KEDA ScaledObject is a custom resource the
/// validator has no schema for (it cannot take a CRD's): it is checked by hand below.
#[test]
fn every_bundle_renders_and_passes_the_kubernetes_schemas() {
    let mut bundles = overlays();
    bundles.push("k8s/keda".to_string());
    for dir in bundles {
        let (yaml, objects) = common::kube::kustomize(&dir);
        let v = common::kube::validate(&yaml);
        assert!(
            v.ok && v.errors.is_empty(),
            "{dir} does not validate:\n{}",
            v.errors.join("\n")
        );
        for o in &objects {
            let kind = o["kind"].as_str().unwrap();
            let name = o["metadata"]["name"].as_str().unwrap();
            let id = format!("{}/{name}", kind.to_lowercase());
            if kind == "ScaledObject" {
                assert_eq!(
                    v.no_schema.len(),
                    common::kube::KUBERNETES_VERSIONS.len(),
                    "{dir}: {:?}",
                    v.no_schema
                );
            } else {
                assert_eq!(
                    v.passed.iter().filter(|p| **p == id).count(),
                    common::kube::KUBERNETES_VERSIONS.len(),
                    "{dir}: {id} was not validated against every version: {:?} {:?}",
                    v.passed,
                    v.no_schema
                );
            }
        }
    }
}

/// The validator is not a rubber stamp: a misspelt field in a rendered Deployment fails.
#[test]
fn the_validator_rejects_a_misspelt_field() {
    let (yaml, _) = common::kube::kustomize("k8s/overlays/headless-dns");
    assert!(yaml.contains("terminationGracePeriodSeconds:"));
    let typo = yaml.replace(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    let v = common::kube::validate(&typo);
    assert!(!v.ok, "the typo passed");
    assert!(
        v.errors.iter().any(
            |e| e.contains("deployment/lb-agent") && e.contains("terminationGracePeriodSecond")
        ),
        "{:?}",
        v.errors
    );
}

#[test]
fn manifests_dockerfile_and_config_agree() {
    for dir in overlays() {
        overlay_agrees_with_its_config_and_the_dockerfile(&dir);
    }
}

fn overlay_agrees_with_its_config_and_the_dockerfile(dir: &str) {
    let (_, objects) = common::kube::kustomize(dir);
    // Every object lives in the Go agent's namespace (a generated ConfigMap included).
    for o in &objects {
        assert_eq!(o["metadata"]["namespace"], "ai-media", "{dir}: {o:?}");
    }
    for k in ["ConfigMap", "Deployment", "Service"] {
        assert!(!of_kind(&objects, k).is_empty(), "{dir} lacks a {k}");
    }

    // The ConfigMap's config passes --check.
    let dep = find(&objects, "Deployment", "lb-agent");
    let pod = &dep["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .expect("a config volume");
    let cm_name = volume["configMap"]["name"].as_str().unwrap();
    let cm = find(&objects, "ConfigMap", cm_name);
    assert_eq!(volume["configMap"]["items"][0]["key"], "config.yaml");
    assert_eq!(volume["configMap"]["items"][0]["path"], "config.yaml");
    let config_text = cm["data"]["config.yaml"].as_str().unwrap();
    let tmp = common::temp_dir("manifests");
    let path = tmp.join("config.yaml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(common::bin())
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(tmp);
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

    // Deployment: ports, probes on the admin port, config mount path, grace period.
    let c = &pod["containers"][0];
    let ports: Vec<u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, vec![port, admin_port], "{dir}");
    let named_port = |name: &Value| -> u64 {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("{dir}: no container port named {name:?}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{dir}: {probe}");
        assert_eq!(
            named_port(&c[probe]["httpGet"]["port"]),
            admin_port,
            "{dir}: {probe} is not on admin_listen's port"
        );
    }
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
    assert_eq!(args, vec!["-c", CONFIG_PATH]);
    assert_eq!(
        format!("{}/config.yaml", mount["mountPath"].as_str().unwrap()),
        CONFIG_PATH
    );
    // The kubelet's SIGKILL must not come before lb-agent's own deadline: the delay, then
    // the grace, then a moment to exit.
    let parsed = lb_agent::config::Config::parse(config_text).unwrap();
    let needed = parsed.shutdown_delay + parsed.shutdown_grace + std::time::Duration::from_secs(1);
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        std::time::Duration::from_secs(termination) >= needed,
        "{dir}: terminationGracePeriodSeconds {termination} must cover shutdown_delay + shutdown_grace + 1 s = {needed:?}"
    );
    assert!(
        c.get("lifecycle").is_none(),
        "no preStop hook: the shutdown delay is lb-agent's own"
    );
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The agent's Service: lb-agent:8080 → the container's proxy port.
    let svc = find(&objects, "Service", "lb-agent");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    assert_eq!(
        svc["spec"]["ports"][0]["targetPort"].as_u64().unwrap(),
        port
    );
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["selector"]["matchLabels"]
    );

    // Several replicas share one cap only through the ledger: then the config's ledger is the
    // Redis that the bundle runs, a PodDisruptionBudget keeps all but one up, and replicas
    // spread over nodes. One replica needs none of it.
    let replicas = dep["spec"]["replicas"].as_u64().unwrap();
    match dir.rsplit('/').next().unwrap() {
        "headless-dns" | "kube-api" => assert_eq!(replicas, 1, "{dir}"),
        "replicas-redis" => assert!(replicas >= 2, "{dir}: replicas: {replicas}"),
        _ => {}
    }
    if replicas >= 2 {
        let url = parsed.ledger.redis.as_deref().unwrap_or_else(|| {
            panic!("{dir}: {replicas} replicas without ledger.redis would each count alone")
        });
        let ledger_svc = find(&objects, "Service", "lb-ledger");
        assert_eq!(
            url,
            format!(
                "redis://{}.{}.svc.cluster.local:{}/0",
                ledger_svc["metadata"]["name"].as_str().unwrap(),
                ledger_svc["metadata"]["namespace"].as_str().unwrap(),
                ledger_svc["spec"]["ports"][0]["port"].as_u64().unwrap()
            ),
            "{dir}: ledger.redis must point at the ledger Service"
        );
        let ledger_dep = find(&objects, "Deployment", "lb-ledger");
        assert_eq!(
            ledger_svc["spec"]["selector"],
            ledger_dep["spec"]["selector"]["matchLabels"]
        );
        let ledger_c = &ledger_dep["spec"]["template"]["spec"]["containers"][0];
        let target = &ledger_svc["spec"]["ports"][0]["targetPort"];
        assert!(
            ledger_c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["containerPort"] == *target || p["name"] == *target),
            "{dir}: the ledger Service's targetPort {target:?} is not a port of the Redis container"
        );
        let pdbs = of_kind(&objects, "PodDisruptionBudget");
        assert_eq!(pdbs.len(), 1, "{dir}: one PodDisruptionBudget");
        assert_eq!(
            pdbs[0]["spec"]["selector"]["matchLabels"],
            dep["spec"]["selector"]["matchLabels"]
        );
        assert!(pdbs[0]["spec"]["maxUnavailable"].as_u64().unwrap() < replicas);
        assert_eq!(
            pod["topologySpreadConstraints"][0]["topologyKey"],
            "kubernetes.io/hostname"
        );
    } else {
        assert_eq!(
            parsed.ledger.redis, None,
            "{dir}: one replica needs no ledger"
        );
    }

    // How each route finds its pods in the agent's pod: the route's `discovery`, else the
    // top-level one, else DNS (a `kube_config_file` that exists, the rule's third case, cannot
    // apply: no bundle mounts one). DNS: the bundle ships the route's Service, headless (an
    // ordinary one answers its one cluster IP), serving the route's port. The Kubernetes API:
    // lb-agent agrees, and the Service is the user's own, unchanged, so the bundle ships none.
    let routes = config["routes"].as_sequence().unwrap();
    assert_eq!(routes.len(), parsed.routes.len(), "{dir}");
    let mut api_namespaces: Vec<&str> = Vec::new();
    for (route, r) in routes.iter().zip(&parsed.routes) {
        let service = route["service_name"].as_str().unwrap();
        let namespace = route["namespace"].as_str().unwrap();
        let discovery = route["discovery"]
            .as_str()
            .or(config["discovery"].as_str())
            .unwrap_or("dns");
        match discovery {
            "dns" => {
                let backend = find(&objects, "Service", service);
                assert_eq!(
                    backend["spec"]["clusterIP"], "None",
                    "{dir}: {service} must be headless for DNS discovery"
                );
                assert_eq!(backend["spec"]["ports"][0]["port"], route["http_port"]);
                assert_eq!(backend["metadata"]["namespace"], namespace);
            }
            "kubernetes" => {
                match &parsed.pools[r.pool].target {
                    Target::Kube {
                        namespace: n,
                        service: s,
                        ..
                    } => assert_eq!((n.as_str(), s.as_str()), (namespace, service), "{dir}"),
                    other => panic!("{dir}: {service} is not found through the API: {other}"),
                }
                assert!(
                    of_kind(&objects, "Service")
                        .iter()
                        .all(|s| s["metadata"]["name"] != service),
                    "{dir}: ships a Service {service}: API discovery takes the existing one as it is"
                );
                api_namespaces.push(namespace);
            }
            other => panic!("{dir}: discovery {other:?}"),
        }
    }
    match dir.rsplit('/').next().unwrap() {
        "headless-dns" | "replicas-redis" => {
            assert!(api_namespaces.is_empty(), "{dir}: every route by DNS")
        }
        "kube-api" => {
            assert_eq!(config["discovery"], "kubernetes", "{dir}");
            assert_eq!(
                api_namespaces.len(),
                routes.len(),
                "{dir}: every route by the API"
            );
        }
        _ => {}
    }

    // Through the API, as lb-agent does without kube_config_file: the pods run as a
    // ServiceAccount of the bundle with its token mounted, and a RoleBinding in each route's
    // namespace gives that account a Role there with get, list and watch on endpointslices.
    if !api_namespaces.is_empty() {
        assert_eq!(
            parsed.kube_config_file, None,
            "{dir}: lb-agent would read kube_config_file instead of the service account"
        );
        let account = pod["serviceAccountName"].as_str().unwrap_or_else(|| {
            panic!("{dir}: no serviceAccountName: the pods would run as the namespace's default")
        });
        let sa = find(&objects, "ServiceAccount", account);
        let sa_namespace = sa["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(dep["metadata"]["namespace"], sa_namespace, "{dir}");
        // The pod's setting wins over the account's; unset in both, the token is mounted.
        let mounted = pod["automountServiceAccountToken"]
            .as_bool()
            .or(sa["automountServiceAccountToken"].as_bool())
            .unwrap_or(true);
        assert!(
            mounted,
            "{dir}: automountServiceAccountToken is false: lb-agent would have no credentials"
        );
        for namespace in api_namespaces {
            let roles: Vec<&Value> = of_kind(&objects, "RoleBinding")
                .into_iter()
                .filter(|b| b["metadata"]["namespace"] == namespace)
                .filter(|b| {
                    b["subjects"].as_sequence().is_some_and(|subjects| {
                        subjects.iter().any(|s| {
                            s["kind"] == "ServiceAccount"
                                && s["name"] == account
                                && s["namespace"] == sa_namespace
                        })
                    })
                })
                .filter(|b| {
                    b["roleRef"]["kind"] == "Role"
                        && b["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
                })
                .map(|b| {
                    let name = &b["roleRef"]["name"];
                    let found: Vec<&Value> = of_kind(&objects, "Role")
                        .into_iter()
                        .filter(|r| r["metadata"]["namespace"] == namespace)
                        .filter(|r| r["metadata"]["name"] == *name)
                        .collect();
                    assert_eq!(
                        found.len(),
                        1,
                        "{dir}: RoleBinding's roleRef {name:?} in {namespace}"
                    );
                    found[0]
                })
                .collect();
            assert!(
                !roles.is_empty(),
                "{dir}: no RoleBinding in {namespace} binds a Role to ServiceAccount {sa_namespace}/{account}"
            );
            for verb in ["get", "list", "watch"] {
                assert!(
                    roles.iter().any(|r| grants_endpointslices(r, verb)),
                    "{dir}: ServiceAccount {account} may not {verb} endpointslices (discovery.k8s.io) in {namespace}"
                );
            }
        }
    }

    // Dockerfile: exposes both ports, uses the drop-in config path, runs as non-root.
    let docker = std::fs::read_to_string("Dockerfile").unwrap();
    let expose = docker.lines().find(|l| l.starts_with("EXPOSE")).unwrap();
    assert!(
        expose.contains(&port.to_string()) && expose.contains(&admin_port.to_string()),
        "{expose}"
    );
    assert!(docker.contains(CONFIG_PATH));
    assert!(docker.contains("USER 10001"));
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert!(docker.contains("cmake"), "the build stage installs cmake");
}

/// A Role's rule lets `verb` on every `endpointslices` of group `discovery.k8s.io` (no
/// `resourceNames`, which would leave out the list and watch of the whole collection).
fn grants_endpointslices(role: &Value, verb: &str) -> bool {
    role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|rule| {
            let has = |key: &str, want: &str| {
                rule[key]
                    .as_sequence()
                    .is_some_and(|l| l.iter().any(|v| v == want || v == "*"))
            };
            has("apiGroups", "discovery.k8s.io")
                && has("resources", "endpointslices")
                && has("verbs", verb)
                && rule.get("resourceNames").is_none()
        })
}

/// `kubernetes-validate` has no schema for KEDA's ScaledObject and cannot be given a CRD, so
/// what KEDA's CRD (keda.sh/v1alpha1) requires is checked here: `scaleTargetRef.name` and
/// `triggers` (each with `type` and string-valued `metadata`), integer counts, and no field the
/// CRD lacks. And it scales the pool the config balances, with the route's limit as threshold.
#[test]
fn keda_scaled_object_has_what_its_crd_requires() {
    let (_, objects) = common::kube::kustomize("k8s/keda");
    assert_eq!(objects.len(), 1, "k8s/keda is the ScaledObject alone");
    let so = &objects[0];
    assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(so["kind"], "ScaledObject");
    assert_eq!(so["metadata"]["namespace"], "ai-media");
    let spec = so["spec"].as_mapping().expect("spec");
    let known = [
        "scaleTargetRef",
        "pollingInterval",
        "initialCooldownPeriod",
        "cooldownPeriod",
        "idleReplicaCount",
        "minReplicaCount",
        "maxReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    ];
    for key in spec.keys() {
        let key = key.as_str().unwrap();
        assert!(
            known.contains(&key),
            "ScaledObject spec.{key} is not in KEDA's CRD"
        );
    }
    let target = &so["spec"]["scaleTargetRef"];
    for key in target.as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            ["apiVersion", "kind", "name", "envSourceContainerName"].contains(&key),
            "scaleTargetRef.{key} is not in KEDA's CRD"
        );
    }
    let target_name = target["name"].as_str().expect("scaleTargetRef.name");
    for key in [
        "pollingInterval",
        "cooldownPeriod",
        "minReplicaCount",
        "maxReplicaCount",
    ] {
        if let Some(v) = spec.get(key) {
            let n = v
                .as_u64()
                .unwrap_or_else(|| panic!("spec.{key} must be an integer: {v:?}"));
            assert!(n <= i32::MAX as u64, "spec.{key} is an int32");
        }
    }
    assert!(
        so["spec"]["minReplicaCount"].as_u64() <= so["spec"]["maxReplicaCount"].as_u64(),
        "minReplicaCount above maxReplicaCount"
    );
    let triggers = so["spec"]["triggers"].as_sequence().expect("spec.triggers");
    assert!(!triggers.is_empty());
    for t in triggers {
        for key in t.as_mapping().unwrap().keys() {
            let key = key.as_str().unwrap();
            assert!(
                [
                    "type",
                    "name",
                    "metadata",
                    "authenticationRef",
                    "metricType",
                    "useCachedMetrics"
                ]
                .contains(&key),
                "triggers[].{key} is not in KEDA's CRD"
            );
        }
        assert!(t["type"].as_str().is_some(), "a trigger needs a type");
        let metadata = t["metadata"]
            .as_mapping()
            .expect("a trigger needs metadata");
        for (k, v) in metadata {
            assert!(
                v.is_string(),
                "trigger metadata {k:?} must be a string: {v:?}"
            );
        }
    }

    // It scales the compute service of the shipped config, on that route's pool and limit.
    let config = load("k8s/overlays/headless-dns/config.yaml");
    let route = &config["routes"][0];
    assert_eq!(target_name, route["service_name"].as_str().unwrap());
    let pool = format!(
        "{}.{}.svc.cluster.local:{}",
        route["service_name"].as_str().unwrap(),
        route["namespace"].as_str().unwrap(),
        route["http_port"].as_u64().unwrap()
    );
    let prometheus = triggers
        .iter()
        .find(|t| t["type"] == "prometheus")
        .expect("a prometheus trigger");
    let query = prometheus["metadata"]["query"].as_str().unwrap();
    assert!(query.contains(&format!("pool=\"{pool}\"")), "{query}");
    assert_eq!(
        prometheus["metadata"]["threshold"].as_str().unwrap(),
        route["limit"].as_u64().unwrap().to_string()
    );
    assert!(prometheus["metadata"]["serverAddress"].as_str().is_some());
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
    let (_, objects) = common::kube::kustomize("k8s/overlays/headless-dns");
    let dep = find(&objects, "Deployment", "lb-agent");
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
