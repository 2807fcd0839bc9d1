//! A Service's EndpointSlices → the pods a pool may send new requests to.
//!
//! Pure rules, unit-tested here; [`super::kube`] keeps the slices up to date from the watch.
//! The rules are the API's and kube-proxy's own, so lb-agent and the rest of the cluster agree
//! on which pods serve:
//! - a Service has several slices, and an address may appear in more than one (while the
//!   controller moves it): they are merged and de-duplicated;
//! - `ready: null` means ready; `serving: null` means "as `ready`"; `terminating: null` means
//!   not terminating;
//! - ready (and not terminating) pods get new requests. A terminating pod gets none: it is left
//!   out, and the balancer drains it (its in-flight requests finish, see
//!   [`crate::balance::Balancer::set_pods`]). Only when no pod is ready, the serving terminating
//!   ones are used, as kube-proxy does, so that a rollout of a one-pod service does not leave a
//!   gap with no pod at all;
//! - the pod port: a number is used as it is (the Go agent's `http_port`, whatever the
//!   Service's ports say); a name is looked up in each slice's `ports` (a slice whose ports lack
//!   it contributes nothing).

use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::config::PodPort;

/// What lb-agent keeps of one EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceView {
    pub endpoints: Vec<EndpointView>,
    /// `(name, port)`; an unnamed port has the name "" (the API's rule).
    pub ports: Vec<(String, Option<u16>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub ips: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Every slice of a Service, by slice name.
pub type Slices = BTreeMap<String, SliceView>;

impl SliceView {
    /// The parts of `slice` that name pods. An FQDN slice (or an address that is not an IP)
    /// names none: lb-agent connects to addresses.
    pub fn of(slice: &EndpointSlice) -> SliceView {
        let ip_slice = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let endpoints = slice
            .endpoints
            .iter()
            .filter(|_| ip_slice)
            .map(|e| {
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                EndpointView {
                    ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                }
            })
            .collect();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.port.and_then(port16)))
            .collect();
        SliceView { endpoints, ports }
    }
}

fn port16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p > 0)
}

/// The pods a pool on `port` may give new requests to: the ready ones, or, when none is ready,
/// the serving terminating ones.
pub fn pods(slices: &Slices, port: &PodPort) -> BTreeSet<SocketAddr> {
    let mut ready = BTreeSet::new();
    let mut fallback = BTreeSet::new();
    for slice in slices.values() {
        let Some(port) = (match port {
            PodPort::Number(n) => Some(*n),
            PodPort::Named(name) => slice
                .ports
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, p)| *p),
        }) else {
            continue;
        };
        for e in &slice.endpoints {
            let set = if e.ready && !e.terminating {
                &mut ready
            } else if e.serving && e.terminating {
                &mut fallback
            } else {
                continue;
            };
            set.extend(e.ips.iter().map(|ip| SocketAddr::new(*ip, port)));
        }
    }
    if ready.is_empty() {
        fallback
    } else {
        ready
    }
}

/// A one-line account of the slices for the log: ready, terminating and not-ready addresses.
pub fn summary(slices: &Slices) -> String {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    let mut not_ready = BTreeSet::new();
    for e in slices.values().flat_map(|s| &s.endpoints) {
        let set = if e.terminating {
            &mut terminating
        } else if e.ready {
            &mut ready
        } else {
            &mut not_ready
        };
        set.extend(e.ips.iter().copied());
    }
    let list = |s: &BTreeSet<IpAddr>| {
        s.iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "ready [{}], terminating [{}], not ready [{}] in {} slice(s)",
        list(&ready),
        list(&terminating),
        list(&not_ready),
        slices.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> SliceView {
        SliceView::of(&serde_json::from_value(json).expect("an EndpointSlice"))
    }

    fn ep(ip: &str, conditions: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"addresses": [ip], "conditions": conditions})
    }

    fn of(slices: Vec<SliceView>) -> Slices {
        slices
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("s{i}"), s))
            .collect()
    }

    fn addrs(list: &[&str]) -> BTreeSet<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn v4(endpoints: Vec<serde_json::Value>, ports: serde_json::Value) -> SliceView {
        slice(serde_json::json!({
            "metadata": {"name": "x"},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }))
    }

    #[test]
    fn ready_null_is_ready_and_terminating_pods_get_nothing_new() {
        let s = of(vec![v4(
            vec![
                ep("127.0.1.1", serde_json::json!({})),
                ep("127.0.1.2", serde_json::json!({"ready": true})),
                ep(
                    "127.0.1.3",
                    serde_json::json!({"ready": false, "serving": true, "terminating": true}),
                ),
                ep("127.0.1.4", serde_json::json!({"ready": false})),
            ],
            serde_json::json!([]),
        )]);
        assert_eq!(
            pods(&s, &PodPort::Number(80)),
            addrs(&["127.0.1.1:80", "127.0.1.2:80"])
        );
    }

    #[test]
    fn with_no_ready_pod_the_serving_terminating_ones_are_used() {
        let s = of(vec![v4(
            vec![
                ep(
                    "127.0.1.3",
                    serde_json::json!({"ready": false, "serving": true, "terminating": true}),
                ),
                ep(
                    "127.0.1.4",
                    serde_json::json!({"ready": false, "serving": false, "terminating": true}),
                ),
                ep("127.0.1.5", serde_json::json!({"ready": false})),
            ],
            serde_json::json!([]),
        )]);
        assert_eq!(pods(&s, &PodPort::Number(80)), addrs(&["127.0.1.3:80"]));
    }

    #[test]
    fn slices_merge_and_an_address_in_two_slices_counts_once() {
        let a = v4(
            vec![
                ep("127.0.1.1", serde_json::json!({"ready": true})),
                ep("127.0.1.2", serde_json::json!({"ready": true})),
            ],
            serde_json::json!([]),
        );
        let b = v4(
            vec![
                ep("127.0.1.2", serde_json::json!({"ready": true})),
                ep("127.0.1.3", serde_json::json!(null)),
            ],
            serde_json::json!([]),
        );
        assert_eq!(
            pods(&of(vec![a, b]), &PodPort::Number(20109)),
            addrs(&["127.0.1.1:20109", "127.0.1.2:20109", "127.0.1.3:20109"])
        );
    }

    #[test]
    fn a_named_port_is_looked_up_per_slice() {
        let a = v4(
            vec![ep("127.0.1.1", serde_json::json!({}))],
            serde_json::json!([{"name": "http", "port": 8000}, {"name": "grpc", "port": 9000}]),
        );
        let b = v4(
            vec![ep("127.0.1.2", serde_json::json!({}))],
            serde_json::json!([{"name": "http", "port": 8001}]),
        );
        let c = v4(
            vec![ep("127.0.1.3", serde_json::json!({}))],
            serde_json::json!([{"name": "http"}]),
        );
        let s = of(vec![a, b, c]);
        assert_eq!(
            pods(&s, &PodPort::Named("http".into())),
            addrs(&["127.0.1.1:8000", "127.0.1.2:8001"])
        );
        assert_eq!(
            pods(&s, &PodPort::Named("grpc".into())),
            addrs(&["127.0.1.1:9000"])
        );
        assert!(pods(&s, &PodPort::Named("metrics".into())).is_empty());
    }

    #[test]
    fn fqdn_slices_and_non_ip_addresses_name_no_pod() {
        let fqdn = slice(serde_json::json!({
            "metadata": {"name": "x"},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["pod.example"]}],
        }));
        let odd = v4(
            vec![ep("not-an-ip", serde_json::json!({}))],
            serde_json::json!([]),
        );
        let v6 = slice(serde_json::json!({
            "metadata": {"name": "y"},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["::1"]}],
        }));
        assert_eq!(
            pods(&of(vec![fqdn, odd, v6]), &PodPort::Number(80)),
            addrs(&["[::1]:80"])
        );
    }
}
