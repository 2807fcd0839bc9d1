//! What a config reload changes, worked out from the config in force and the new one alone.
//!
//! [`plan`] is a pure function, so the reload rules are unit-tested here without a server;
//! [`crate::live::Live::apply`] carries the plan out (and also revives a retired pool that a
//! new config names again, which only the running state can know about).

use std::collections::BTreeSet;

use crate::config::Config;
use crate::discovery::Source;

/// The changes of one reload, each list sorted by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Settings that changed but only take effect after a restart.
    pub restart_only: Vec<&'static str>,
    /// Pools in both configs whose `limit` changed: (pool, before, after).
    pub limits: Vec<(String, usize, usize)>,
    /// Pools the new config adds.
    pub added_pools: Vec<String>,
    /// Pools the new config no longer has: retired (their requests finish under them).
    pub dropped_pools: Vec<String>,
    /// Discovery sources (DNS names, Services) to start.
    pub start_discovery: Vec<String>,
    /// Discovery sources no longer used by any pool: they stop.
    pub stop_discovery: Vec<String>,
    /// Routes (or what a route resolves to at request time) changed.
    pub routes_changed: bool,
}

impl Plan {
    /// Nothing to do but report "no changes".
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The discovery sources of a config: DNS names and `k8s:<namespace>/<service>`.
fn dns_names(c: &Config) -> BTreeSet<String> {
    c.pools
        .iter()
        .filter_map(|p| Source::of(&p.target).map(|(s, _)| s.to_string()))
        .collect()
}

/// The reload from `old` (in force) to `new`. `started_with` is the config the process started
/// with: restart-only settings are compared with it, since they never changed since.
pub fn plan(started_with: &Config, old: &Config, new: &Config) -> Plan {
    let mut limits = Vec::new();
    let mut added_pools = Vec::new();
    for p in &new.pools {
        match old.pools.iter().find(|o| o.name == p.name) {
            Some(o) if o.limit != p.limit => limits.push((p.name.clone(), o.limit, p.limit)),
            Some(_) => {}
            None => added_pools.push(p.name.clone()),
        }
    }
    let mut dropped_pools: Vec<String> = old
        .pools
        .iter()
        .filter(|o| !new.pools.iter().any(|p| p.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    limits.sort();
    added_pools.sort();
    dropped_pools.sort();
    let (before, after) = (dns_names(old), dns_names(new));
    Plan {
        restart_only: started_with.restart_only().changed(&new.restart_only()),
        limits,
        added_pools,
        dropped_pools,
        start_discovery: after.difference(&before).cloned().collect(),
        stop_discovery: before.difference(&after).cloned().collect(),
        routes_changed: old.routes != new.routes
            || old.connect_timeout != new.connect_timeout
            || old.upstream_idle_timeout != new.upstream_idle_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(body: &str) -> Config {
        Config::parse(body).unwrap()
    }

    const DNS_A: &str =
        "routes:\n  - {uri: /a, limit: 2, host: a.ns.svc.cluster.local, http_port: 80}\n";

    #[test]
    fn an_identical_config_changes_nothing() {
        let c = config(DNS_A);
        assert!(plan(&c, &c, &c).is_empty());
    }

    #[test]
    fn a_limit_change_is_applied_to_the_same_pool() {
        let old = config(DNS_A);
        let new = config(&DNS_A.replace("limit: 2", "limit: 3"));
        let p = plan(&old, &old, &new);
        assert_eq!(
            p.limits,
            vec![("a.ns.svc.cluster.local:80".to_string(), 2, 3)]
        );
        assert!(p.added_pools.is_empty() && p.dropped_pools.is_empty());
        assert!(p.start_discovery.is_empty() && p.stop_discovery.is_empty());
        assert!(
            !p.routes_changed,
            "a limit belongs to the pool, not the route"
        );
    }

    #[test]
    fn a_new_name_starts_discovery_and_a_dropped_one_stops_it() {
        let old = config(DNS_A);
        let new = config(
            "routes:\n  - {uri: /b, limit: 2, host: b.ns.svc.cluster.local, http_port: 80}\n",
        );
        let p = plan(&old, &old, &new);
        assert_eq!(p.start_discovery, vec!["b.ns.svc.cluster.local"]);
        assert_eq!(p.stop_discovery, vec!["a.ns.svc.cluster.local"]);
        assert_eq!(p.added_pools, vec!["b.ns.svc.cluster.local:80"]);
        assert_eq!(p.dropped_pools, vec!["a.ns.svc.cluster.local:80"]);
        assert!(p.routes_changed);
    }

    #[test]
    fn a_second_port_on_the_same_name_keeps_its_discovery() {
        let old = config(DNS_A);
        let new = config(&format!(
            "{DNS_A}  - {{uri: /a2, limit: 1, host: a.ns.svc.cluster.local, http_port: 81}}\n"
        ));
        let p = plan(&old, &old, &new);
        assert!(p.start_discovery.is_empty() && p.stop_discovery.is_empty());
        assert_eq!(p.added_pools, vec!["a.ns.svc.cluster.local:81"]);
    }

    #[test]
    fn restart_only_settings_are_compared_with_the_start() {
        let start = config(DNS_A);
        let old = start.clone();
        let new = config(&format!("threads: 2\n{DNS_A}"));
        let p = plan(&start, &old, &new);
        assert_eq!(p.restart_only, vec!["threads"]);
        assert!(!p.routes_changed && p.limits.is_empty());
    }

    #[test]
    fn a_queue_setting_is_a_route_change_only() {
        let old = config(DNS_A);
        let new = config(&format!("queue: {{timeout: 5s}}\n{DNS_A}"));
        let p = plan(&old, &old, &new);
        assert!(p.routes_changed);
        assert!(p.limits.is_empty() && p.added_pools.is_empty() && p.dropped_pools.is_empty());
    }

    #[test]
    fn an_upstream_timeout_is_a_live_route_change() {
        let old = config(DNS_A);
        for new in [
            format!("upstream_timeout: 1m\n{DNS_A}"),
            DNS_A.replace("http_port: 80}", "http_port: 80, upstream_timeout: 1m}"),
        ] {
            let p = plan(&old, &old, &config(&new));
            assert!(p.routes_changed, "{new}");
            assert!(p.restart_only.is_empty(), "{new}");
            assert!(p.limits.is_empty() && p.added_pools.is_empty());
        }
    }
}
