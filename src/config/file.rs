//! The config file format: what the YAML may say, as the Go lb-agent wrote it.
//!
//! Everything is optional here and field names follow the Go agent (`K8s_port`, `http_port`),
//! so a Go config loads unchanged; `deny_unknown_fields` makes a typo an error rather than a
//! silent default. Nothing here is checked beyond its YAML type: `validate.rs` turns this into
//! the [`Config`](super::Config) the rest of the crate uses. The only values typed here are the
//! three enums (`match`, `protocol`, `client_abort`), whose spelling belongs to the file format.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;

use super::{ClientAbort, MatchKind, UpstreamProtocol};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    /// Go agent: raises the log level to debug.
    #[serde(default)]
    pub(super) debug: bool,
    pub(super) port: Option<u16>,
    pub(super) log_file: Option<String>,
    /// Go agent: path of a kubeconfig. Accepted and ignored: discovery uses DNS.
    #[allow(dead_code)]
    pub(super) kube_config_file: Option<String>,
    pub(super) listen: Option<String>,
    pub(super) threads: Option<usize>,
    pub(super) admin_listen: Option<String>,
    pub(super) cluster_domain: Option<String>,
    #[serde(default)]
    pub(super) dns: FileDns,
    #[serde(default)]
    pub(super) queue: FileQueue,
    pub(super) connect_timeout: Option<String>,
    pub(super) upstream_idle_timeout: Option<String>,
    pub(super) upstream_timeout: Option<String>,
    pub(super) max_attempts: Option<usize>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) shutdown_delay: Option<String>,
    pub(super) reload_interval: Option<String>,
    #[serde(default)]
    pub(super) client: FileClient,
    #[serde(default)]
    pub(super) ledger: FileLedger,
    #[serde(default)]
    pub(super) routes: Vec<FileRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLedger {
    pub(super) redis: Option<String>,
    pub(super) lease_ttl: Option<String>,
    pub(super) recovery_hold: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClient {
    pub(super) header_timeout: Option<String>,
    pub(super) keepalive_timeout: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) max_header_size: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDns {
    pub(super) nameservers: Option<Vec<String>>,
    pub(super) refresh_interval: Option<String>,
    pub(super) stability_samples: Option<usize>,
    pub(super) stability_interval: Option<String>,
    pub(super) unstable_retry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQueue {
    pub(super) max_waiting: Option<usize>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) uri: Option<String>,
    #[serde(rename = "match")]
    pub(super) match_kind: Option<MatchKind>,
    pub(super) limit: Option<usize>,
    pub(super) service_name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) http_port: Option<u16>,
    /// Older Go route form: a full DNS name …
    pub(super) k8s_host: Option<String>,
    /// … and its port, spelled with a capital K in those configs.
    #[serde(rename = "K8s_port", alias = "k8s_port")]
    pub(super) k8s_port: Option<u16>,
    pub(super) host: Option<String>,
    pub(super) endpoints: Option<Vec<String>>,
    pub(super) queue: Option<FileQueue>,
    pub(super) protocol: Option<UpstreamProtocol>,
    pub(super) client_abort: Option<ClientAbort>,
    pub(super) upstream_timeout: Option<String>,
}

/// The spelling of the enums in the file. Deserialized through a visitor (not `try_from`), so
/// that serde_yaml reports an unknown value at its own path with the allowed values:
/// `routes[0].protocol: "grpc" is not one of: http1, h2c`.
struct OneOf<T: 'static>(&'static [(&'static str, T)]);

impl<T: Copy> OneOf<T> {
    fn names(&self) -> String {
        let names: Vec<&str> = self.0.iter().map(|(n, _)| *n).collect();
        names.join(", ")
    }
}

impl<T: Copy> Visitor<'_> for OneOf<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "one of: {}", self.names())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        self.0
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| E::custom(format!("{value:?} is not one of: {}", self.names())))
    }
}

impl<'de> Deserialize<'de> for MatchKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(OneOf(&[
            ("exact", MatchKind::Exact),
            ("prefix", MatchKind::Prefix),
        ]))
    }
}

impl<'de> Deserialize<'de> for UpstreamProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(OneOf(&[
            ("http1", UpstreamProtocol::Http1),
            ("h2c", UpstreamProtocol::H2c),
        ]))
    }
}

impl<'de> Deserialize<'de> for ClientAbort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(OneOf(&[
            ("finish", ClientAbort::Finish),
            ("cancel", ClientAbort::Cancel),
        ]))
    }
}
