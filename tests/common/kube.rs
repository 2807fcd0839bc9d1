//! The shipped Kubernetes bundles as a cluster would get them: rendered by the real
//! `kubectl kustomize`, and validated offline against the Kubernetes API schemas by
//! `kubernetes-validate` (PyPI), which the first test to need it installs into a virtualenv
//! under `target/tmp` once.
#![allow(dead_code)]

use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Pinned: the schemas it carries (Kubernetes 1.25 to 1.37) are part of the package.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The Kubernetes versions every object is validated against: the oldest and the newest whose
/// schemas the pinned package carries.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

/// `kubectl kustomize DIR`: the rendered YAML, and the objects in it.
pub fn kustomize(dir: &str) -> (String, Vec<Value>) {
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl: {e} (Debian: apt-get install kubernetes-client; .ci/run does)")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{dir} renders bad YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect();
    assert!(!objects.is_empty(), "{dir} renders nothing");
    (text, objects)
}

/// The virtualenv's python with `kubernetes_validate` importable (see
/// [`super::venv_python`]).
pub fn kubernetes_validate_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            super::venv_python(
                "kubernetes-validate-venv",
                KUBERNETES_VALIDATE,
                "kubernetes_validate",
            )
        })
        .clone()
}

/// What `kubernetes-validate --strict` (unknown fields are errors) said of every object of a
/// YAML stream, against each of [`KUBERNETES_VERSIONS`].
pub struct Validation {
    /// The validator exited 0.
    pub ok: bool,
    /// `kind/name` of each object it validated and passed, once per version.
    pub passed: Vec<String>,
    /// Its `ERROR` lines.
    pub errors: Vec<String>,
    /// Objects it has no schema for (custom resources), as its `WARN` lines.
    pub no_schema: Vec<String>,
}

pub fn validate(yaml: &str) -> Validation {
    let dir = super::temp_dir("kubernetes-validate");
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = Command::new(kubernetes_validate_python());
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["-k", version]);
    }
    let out = cmd.arg(&file).output().expect("run kubernetes-validate");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = |prefix: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    };
    Validation {
        ok: out.status.success(),
        passed: lines("INFO ")
            .iter()
            .filter_map(|l| {
                let rest = l.split(" passed for resource ").nth(1)?;
                Some(rest.split(' ').next()?.to_string())
            })
            .collect(),
        errors: lines("ERROR "),
        no_schema: lines("WARN "),
    }
}
