//! URI → route table.
//!
//! Exact matches win; among prefix routes the longest prefix wins, so `/api/v2/` can override
//! `/api/`. The query string never takes part in matching (it is passed on unchanged).

use crate::config::{MatchKind, RouteConfig};
use std::collections::HashMap;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
}
