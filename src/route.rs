//! URI → route table.
//!
//! Exact matches win; among prefix routes the longest prefix wins, so `/api/v2/` can override
//! `/api/`. The query string never takes part in matching (it is passed on unchanged).
//!
//! The proxy normalises the path first ([`crate::path::normalize_path`]), so that a request
//! cannot match one route and be understood by the pod as a path outside it (`/p/../admin`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::balance::{Balancer, QueuePolicy};
use crate::config::{AsyncJobs, ClientAbort, MatchKind, RouteConfig, UpstreamProtocol};
use crate::metrics::RouteMetrics;

/// Routes by path. `T` is whatever the caller attaches to a route (the proxy attaches the
/// route's pool and queue policy).
pub struct RouteTable<T> {
    exact: HashMap<String, T>,
    /// Sorted longest prefix first.
    prefix: Vec<(String, T)>,
}

impl<T> RouteTable<T> {
    /// Builds the table from the validated routes, attaching `make(route)` to each.
    pub fn new(routes: &[RouteConfig], mut make: impl FnMut(&RouteConfig) -> T) -> Self {
        let mut exact = HashMap::new();
        let mut prefix = Vec::new();
        for r in routes {
            match r.match_kind {
                MatchKind::Exact => {
                    exact.insert(r.uri.clone(), make(r));
                }
                MatchKind::Prefix => prefix.push((r.uri.clone(), make(r))),
            }
        }
        prefix.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self { exact, prefix }
    }

    /// Finds the route for a request path (without the query string).
    pub fn lookup(&self, path: &str) -> Option<&T> {
        self.exact.get(path).or_else(|| {
            self.prefix
                .iter()
                .find(|(p, _)| path.starts_with(p.as_str()))
                .map(|(_, t)| t)
        })
    }

    /// Every route's attachment, exact routes first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.prefix.iter().map(|(_, t)| t))
    }
}

/// What a route resolves to at request time.
pub struct RouteEntry {
    pub uri: String,
    pub balancer: Arc<Balancer>,
    pub queue: QueuePolicy,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    pub client_abort: ClientAbort,
    /// A pooled connection to a pod idle longer than this is closed, not reused.
    pub upstream_idle_timeout: Duration,
    /// The longest a pod may make no progress on a request of this route.
    pub upstream_timeout: Duration,
    /// Asynchronous jobs: a `202` with a `Location` keeps its slot (see [`crate::jobs`]).
    pub async_jobs: Option<AsyncJobs>,
    /// This route's metric handles, looked up on its first request.
    pub metrics: OnceLock<RouteMetrics>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::path::normalize_path;

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let c = Config::parse(
            "routes:\n  - {uri: /api/, match: prefix, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /api/v2/, match: prefix, limit: 1, endpoints: [\"127.0.0.1:2\"]}\n  - {uri: /api/v2/special, limit: 1, endpoints: [\"127.0.0.1:3\"]}\n",
        )
        .unwrap();
        let t = RouteTable::new(&c.routes, |r| r.uri.clone());
        assert_eq!(t.lookup("/api/x").map(String::as_str), Some("/api/"));
        assert_eq!(t.lookup("/api/v2/x").map(String::as_str), Some("/api/v2/"));
        assert_eq!(
            t.lookup("/api/v2/special").map(String::as_str),
            Some("/api/v2/special")
        );
        assert_eq!(
            t.lookup("/api/v2/special/more").map(String::as_str),
            Some("/api/v2/")
        );
        assert_eq!(t.lookup("/other"), None);
        assert_eq!(t.lookup("/api"), None);
    }

    #[test]
    fn exact_route_does_not_match_longer_paths() {
        let c = Config::parse("routes:\n  - {uri: /a, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n")
            .unwrap();
        let t = RouteTable::new(&c.routes, |r| r.uri.clone());
        assert!(t.lookup("/a").is_some());
        assert!(t.lookup("/a/b").is_none());
        assert!(t.lookup("/ab").is_none());
    }

    #[test]
    fn routing_sees_the_normalised_path() {
        let c = Config::parse(
            "routes:\n  - {uri: /p/, match: prefix, limit: 1, endpoints: [\"127.0.0.1:1\"]}\n  - {uri: /admin, limit: 1, endpoints: [\"127.0.0.1:2\"]}\n",
        )
        .unwrap();
        let t = RouteTable::new(&c.routes, |r| r.uri.clone());
        let route = |p: &str| t.lookup(&normalize_path(p).unwrap()).cloned();
        assert_eq!(route("/p/../admin").as_deref(), Some("/admin"));
        assert_eq!(route("/p/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(route("//p//x").as_deref(), Some("/p/"));
        assert_eq!(route("/p/x/../y").as_deref(), Some("/p/"));
    }
}
