//! The config file format: what the YAML may say, as the Go lb-agent wrote it.
//!
//! Everything is optional here and field names follow the Go agent (`K8s_port`, `http_port`),
//! so a Go config loads unchanged; `deny_unknown_fields` makes a typo an error rather than a
//! silent default. Nothing here is checked beyond its YAML type: `validate.rs` turns this into
//! the [`Config`](super::Config) the rest of the crate uses. The only values typed here are the
//! enums (`match`, `protocol`, `client_abort`, `discovery`), `http_port` and the booleans ([`Yaml11Bool`]), whose
//! spelling belongs to the file format.
//!
//! serde stops at the first unknown key; `keys.rs` finds all of them first, reading the keys
//! from these structs (their field names and aliases), so nothing here is listed twice.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;

use super::{ClientAbort, DiscoveryKind, MatchKind, UpstreamProtocol};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    /// Go agent: raises the log level to debug.
    #[serde(default)]
    pub(super) debug: Yaml11Bool,
    pub(super) port: Option<u16>,
    pub(super) log_file: Option<String>,
    /// Go agent: path of a kubeconfig. When the file exists, `service_name` routes find their
    /// pods through the Kubernetes API with it (see `discovery`).
    pub(super) kube_config_file: Option<String>,
    /// How `service_name` routes find their pods, unless a route says otherwise.
    pub(super) discovery: Option<DiscoveryKind>,
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
    pub(super) response_buffer: Option<usize>,
    pub(super) response_buffer_total: Option<usize>,
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
    /// A number, or (Kubernetes API discovery) the name of the EndpointSlice port.
    pub(super) http_port: Option<FilePort>,
    pub(super) discovery: Option<DiscoveryKind>,
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
    /// Asynchronous jobs: a `202` with a `Location` keeps its pod's slot until the job is done.
    #[serde(rename = "async")]
    pub(super) async_jobs: Option<FileAsync>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAsync {
    pub(super) check_interval: Option<String>,
    pub(super) max_duration: Option<String>,
    pub(super) done_when: Option<FileDoneWhen>,
    pub(super) callback_base: Option<String>,
    pub(super) job_id: Option<FileJobId>,
}

/// `job_id`: where a submission's JSON answer names its job, and the job's status path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileJobId {
    pub(super) json: String,
    pub(super) status: String,
}

/// `done_when`: a convention's name, or where a JSON status answer says its state.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FileDoneWhen {
    Convention(String),
    Json(FileJsonState),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileJsonState {
    pub(super) json: String,
    pub(super) done: Vec<String>,
}

/// `http_port`: the Go agent's number, or a port's name as the Service's EndpointSlices name it
/// (`http`), which only the Kubernetes API can resolve. A quoted number is a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FilePort {
    Number(u16),
    Name(String),
}

impl<'de> Deserialize<'de> for FilePort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FilePortVisitor)
    }
}

struct FilePortVisitor;

impl Visitor<'_> for FilePortVisitor {
    type Value = FilePort;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1-65535) or a port name")
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<FilePort, E> {
        u16::try_from(value)
            .map(FilePort::Number)
            .map_err(|_| E::custom(format!("{value} is not a port number (1-65535)")))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<FilePort, E> {
        u64::try_from(value)
            .map_err(|_| E::custom(format!("{value} is not a port number (1-65535)")))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<FilePort, E> {
        match value.trim().parse::<u64>() {
            Ok(n) => self.visit_u64(n),
            Err(_) => Ok(FilePort::Name(value.trim().to_string())),
        }
    }
}

/// A boolean as the Go agent read it. Its YAML 1.1 parser took `yes/no`, `on/off` and `y/n`
/// (any case) as booleans besides `true/false`, and serde_yaml (YAML 1.2) only the last, so a Go
/// ConfigMap saying `debug: yes` would not load. Every boolean of the format has this type (a
/// test checks), and anything else is refused at the field's path. An empty value (`debug:`)
/// is false, as it was for the Go agent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Yaml11Bool(pub(super) bool);

impl Yaml11Bool {
    /// The YAML 1.1 spellings of a boolean, in any case.
    pub(super) fn parse(s: &str) -> Option<bool> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" => Some(true),
            "false" | "no" | "n" | "off" => Some(false),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Yaml11Bool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Yaml11BoolVisitor)
    }
}

struct Yaml11BoolVisitor;

impl Visitor<'_> for Yaml11BoolVisitor {
    type Value = Yaml11Bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a boolean (true/false, yes/no, on/off or y/n)")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Yaml11Bool, E> {
        Ok(Yaml11Bool(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Yaml11Bool, E> {
        Yaml11Bool::parse(value)
            .map(Yaml11Bool)
            .ok_or_else(|| E::invalid_value(de::Unexpected::Str(value), &self))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Yaml11Bool, E> {
        Ok(Yaml11Bool(false))
    }
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

impl<'de> Deserialize<'de> for DiscoveryKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(OneOf(&[
            ("dns", DiscoveryKind::Dns),
            ("kubernetes", DiscoveryKind::Kubernetes),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_take_the_yaml_1_1_forms_and_nothing_else() {
        let debug = |v: &str| {
            serde_yaml::from_str::<FileConfig>(&format!("debug: {v}\n")).map(|f| f.debug.0)
        };
        for v in [
            "true", "True", "TRUE", "yes", "Yes", "YES", "y", "Y", "on", "On", "ON", "yEs",
        ] {
            assert!(debug(v).unwrap(), "{v}");
        }
        for v in [
            "false", "False", "no", "NO", "n", "N", "off", "Off", "OFF", "~", "",
        ] {
            assert!(!debug(v).unwrap(), "{v}");
        }
        for v in ["maybe", "1", "0", "yess", "t", "[]", "{}"] {
            let e = debug(v).unwrap_err().to_string();
            assert!(e.starts_with("debug: ") && e.contains("yes/no"), "{v}: {e}");
        }
    }

    /// A plain `bool` field would take only `true`/`false` again.
    #[test]
    fn every_boolean_of_the_format_is_a_yaml_1_1_bool() {
        let fields = include_str!("file.rs")
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("pub(super) ") && l.ends_with(','));
        for line in fields {
            assert!(!line.contains("bool"), "use Yaml11Bool: {line}");
        }
    }
}
