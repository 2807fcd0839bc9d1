//! The admin endpoints on `admin_listen`: `/` (a live page), `/healthz`, `/readyz`, `/status`,
//! `/metrics`.
//!
//! Kept off the proxy port so a route can never shadow them and so they can be firewalled
//! separately.
//!
//! Try it: `curl localhost:9090/readyz`, `curl localhost:9090/status`, or open
//! `http://localhost:9090/` in a browser.

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;
use std::sync::Arc;

use crate::live::Live;

/// The live page (`GET /`): one self-contained HTML file.
const DASHBOARD: &str = include_str!("dashboard.html");

pub struct AdminApp {
    pub live: Arc<Live>,
    pub proxy: ProxyListening,
}

/// Whether the proxy port accepts connections yet.
///
/// Pingora starts each service on its own thread and binds a service's port only when that
/// thread gets to it, so the admin port can answer while the proxy port still refuses
/// connections (or never binds: a port taken by another process fails only the proxy's
/// thread). `/readyz` saying 200 then would send traffic to a closed port. Checked by
/// connecting to it, until the first success: a bound listener stays bound until shutdown.
pub struct ProxyListening {
    addr: std::net::SocketAddr,
    seen: std::sync::atomic::AtomicBool,
}

impl ProxyListening {
    /// How long one check waits for the proxy port to accept.
    const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

    /// For the proxy's `listen` address; an unspecified address (`0.0.0.0`, `[::]`) is checked
    /// on loopback, where it also accepts.
    pub fn new(listen: std::net::SocketAddr) -> ProxyListening {
        let mut addr = listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        ProxyListening {
            addr,
            seen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True once a connection to the proxy port has succeeded.
    async fn check(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.seen.load(Ordering::Relaxed) {
            return true;
        }
        let connect = tokio::net::TcpStream::connect(self.addr);
        let ok = matches!(
            tokio::time::timeout(Self::CONNECT_TIMEOUT, connect).await,
            Ok(Ok(_))
        );
        if ok {
            self.seen.store(true, Ordering::Relaxed);
        }
        ok
    }
}

#[derive(Serialize)]
struct PodStatus {
    addr: String,
    inflight: usize,
    limit: usize,
    active: bool,
    recently_failed: bool,
    requests: u64,
    connect_failures: u64,
}

#[derive(Serialize)]
struct PoolStatus {
    name: String,
    limit: usize,
    resolved: bool,
    queue_depth: usize,
    /// How long the oldest queued request (of this agent, in-process ledger) has waited.
    oldest_wait_ms: Option<u64>,
    inflight: usize,
    /// Removed by a config reload, still finishing requests that started on it.
    retired: bool,
    /// Unix milliseconds of the last change of the pod list (0: none yet).
    pods_changed_unix_ms: u64,
    pods: Vec<PodStatus>,
}

#[derive(Serialize)]
struct RouteStatus {
    uri: String,
    pool: String,
}

#[derive(Serialize)]
struct Status {
    ready: bool,
    /// The config file content in force: path, content hash, when it was loaded.
    config: Option<crate::live::ConfigInForce>,
    /// Pools in force with no pod list yet (their requests wait). Readiness waits only for
    /// those of the config the agent started with; one added by a reload shows here only.
    unresolved: Vec<String>,
    ledger: LedgerStatus,
    routes: Vec<RouteStatus>,
    pools: Vec<PoolStatus>,
    /// Every discovery source: a DNS name, or `k8s:<namespace>/<service>` (Kubernetes API).
    discovery: Vec<DiscoveryStatus>,
    /// Asynchronous jobs holding their pod's slot (this agent's), oldest first per pod.
    jobs: Vec<crate::jobs::HeldView>,
    /// Jobs whose hold ended, by pool and how.
    jobs_ended: Vec<JobsEnded>,
}

#[derive(Serialize)]
struct JobsEnded {
    pool: String,
    how: &'static str,
    count: u64,
}

#[derive(Serialize)]
struct DiscoveryStatus {
    source: String,
    /// `dns` or `kubernetes`.
    kind: &'static str,
    errors: u64,
    /// DNS: changed answers not trusted because they did not repeat (the stability check).
    unstable_ignored: u64,
    /// Unix seconds of the last good answer (0: none yet).
    last_success_unix: u64,
    /// The DNS name of a Service answered one address: probably an ordinary Service's
    /// cluster IP, seen as a single pod (see the log's warning).
    single_address: bool,
}

/// Which ledger is in force and, for a shared one, what all agents together hold.
#[derive(Serialize, Default)]
struct LedgerStatus {
    /// `in_process` or `redis`.
    kind: &'static str,
    reachable: bool,
    /// Requests waiting in the queues of this agent's pools, all agents together.
    queue_depth: u64,
    /// Per pool of this agent: global queue and per-pod in-flight counts (all agents).
    pools: Vec<SharedPoolStatus>,
    errors: u64,
    unreachable_episodes: u64,
    epoch_changes: u64,
    /// Leases re-asserted after a Redis restart above their pod's limit (should stay 0).
    reasserted_over_limit: u64,
}

#[derive(Serialize)]
struct SharedPoolStatus {
    name: String,
    queue_depth: u64,
    /// How long the pool's oldest waiter has waited, all agents together.
    oldest_wait_ms: Option<u64>,
    leases_expired: u64,
    inflight: std::collections::BTreeMap<String, u32>,
}

/// How long `/status` waits for the shared ledger before showing it as unreachable.
const LEDGER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

impl AdminApp {
    /// Ready once every pool of the start-up config has learned its pod list at least once (an
    /// empty list counts: requests then queue until pods appear) or has pods; from then on a
    /// reload never takes readiness away (see [`Live::readiness_waits_for`]). Not ready from
    /// SIGTERM on: new traffic belongs to other replicas, even while this one still accepts it.
    /// And not before the proxy port accepts connections ([`ProxyListening`]).
    pub async fn ready(&self) -> bool {
        !self.live.shutdown.stopping()
            && self.live.readiness_waits_for().is_empty()
            && self.proxy.check().await
    }

    async fn ledger_status(&self) -> LedgerStatus {
        let Some(redis) = self.live.ledger.redis() else {
            return LedgerStatus {
                kind: "in_process",
                reachable: true,
                ..LedgerStatus::default()
            };
        };
        let known = redis.status();
        let mut status = LedgerStatus {
            kind: "redis",
            reachable: known.reachable,
            errors: known.errors,
            unreachable_episodes: known.unreachable_episodes,
            epoch_changes: known.epoch_changes,
            reasserted_over_limit: known.reasserted_over_limit,
            ..LedgerStatus::default()
        };
        // Retired pools too: their queued requests still wait in the ledger.
        for b in self.live.all_pools().iter() {
            let read = tokio::time::timeout(LEDGER_READ_TIMEOUT, redis.queue_status(b.name()));
            let Ok(Ok(q)) = read.await else {
                status.reachable = false;
                continue;
            };
            status.queue_depth += q.waiting;
            status.pools.push(SharedPoolStatus {
                name: b.name().to_string(),
                queue_depth: q.waiting,
                oldest_wait_ms: q
                    .oldest_wait
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                leases_expired: q.leases_expired,
                inflight: q
                    .inflight
                    .iter()
                    .map(|(a, n)| (a.to_string(), *n))
                    .collect(),
            });
        }
        status
    }

    async fn status(&self) -> Status {
        let ledger = self.ledger_status().await;
        let snapshot = self.live.snapshot();
        let in_force = snapshot.pools.len();
        let pools: Vec<PoolStatus> = snapshot
            .pools
            .iter()
            .cloned()
            .chain(self.live.retired_pools())
            .enumerate()
            .map(|(i, b)| {
                let v = b.view();
                PoolStatus {
                    name: v.name,
                    limit: v.limit,
                    resolved: b.resolved(),
                    queue_depth: v.waiting,
                    oldest_wait_ms: v
                        .oldest_wait
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    inflight: v.inflight,
                    retired: i >= in_force,
                    pods_changed_unix_ms: b.pods_changed_unix_ms(),
                    pods: v
                        .pods
                        .into_iter()
                        .map(|x| PodStatus {
                            addr: x.addr.to_string(),
                            inflight: x.inflight,
                            limit: x.limit,
                            active: x.active,
                            recently_failed: x.recently_failed,
                            requests: x.requests,
                            connect_failures: x.connect_failures,
                        })
                        .collect(),
                }
            })
            .collect();
        let discovery = self
            .live
            .discovery_stats()
            .into_iter()
            .map(|(source, st)| DiscoveryStatus {
                kind: if source.starts_with("k8s:") {
                    "kubernetes"
                } else {
                    "dns"
                },
                source,
                errors: st.errors.load(std::sync::atomic::Ordering::Relaxed),
                unstable_ignored: st
                    .unstable_ignored
                    .load(std::sync::atomic::Ordering::Relaxed),
                last_success_unix: st
                    .last_success_unix
                    .load(std::sync::atomic::Ordering::Relaxed),
                single_address: st.single_address.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        Status {
            jobs: self.live.jobs.view(),
            jobs_ended: self
                .live
                .jobs
                .ended()
                .into_iter()
                .map(|(pool, how, count)| JobsEnded {
                    pool,
                    how: how.as_str(),
                    count,
                })
                .collect(),
            discovery,
            ready: self.ready().await,
            config: self.live.config_in_force(),
            unresolved: self
                .live
                .unresolved()
                .iter()
                .map(|b| b.name().to_string())
                .collect(),
            ledger,
            routes: snapshot
                .route_list
                .iter()
                .map(|(uri, pool)| RouteStatus {
                    uri: uri.clone(),
                    pool: pools[*pool].name.clone(),
                })
                .collect(),
            pools,
        }
    }
}

fn reply(code: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            // The page is static; its figures come from /status and /metrics, so ten open
            // pages cost ten small JSON answers a second, not ten renderings.
            "/" | "/index.html" => Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/html; charset=utf-8")
                .header("cache-control", "no-store")
                // Everything the page uses is in it or on this port: nothing else may load.
                .header(
                    "content-security-policy",
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src 'self' data:",
                )
                .header("content-length", DASHBOARD.len())
                .body(DASHBOARD.as_bytes().to_vec())
                .unwrap_or_else(|_| Response::new(Vec::new())),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.ready().await {
                    reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else if self.live.shutdown.stopping() {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"not ready: shutting down\n".to_vec(),
                    )
                } else if self.live.readiness_waits_for().is_empty() {
                    let body = format!(
                        "not ready: the proxy port {} does not accept connections yet\n",
                        self.proxy.addr
                    );
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        body.into_bytes(),
                    )
                } else {
                    let pools = self.live.readiness_waits_for();
                    let waiting: Vec<&str> = pools.iter().map(|b| b.name()).collect();
                    let body = format!("not ready: no pod list yet for {}\n", waiting.join(", "));
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        body.into_bytes(),
                    )
                }
            }
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::state_metrics::render(),
            ),
            "/status" => {
                let body = serde_json::to_vec_pretty(&self.status().await).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"admin endpoints: / (live page) /healthz /readyz /status /metrics\n".to_vec(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProxyListening;

    /// The CI flake this exists for: `/readyz` said 200 while the proxy port refused
    /// connections. Not listening is not ready; once it accepts, it stays ready.
    #[tokio::test]
    async fn the_proxy_port_counts_as_listening_only_once_it_accepts() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let listening = ProxyListening::new(addr);
        assert!(!listening.check().await, "nothing listens on {addr} yet");
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        assert!(listening.check().await);
        drop(listener);
        assert!(
            listening.check().await,
            "a seen listener is not checked again"
        );
    }

    /// `0.0.0.0` and `[::]` are checked on loopback.
    #[test]
    fn an_unspecified_listen_address_is_checked_on_loopback() {
        let v4 = ProxyListening::new("0.0.0.0:8080".parse().unwrap());
        assert_eq!(v4.addr, "127.0.0.1:8080".parse().unwrap());
        let v6 = ProxyListening::new("[::]:8080".parse().unwrap());
        assert_eq!(v6.addr, "[::1]:8080".parse().unwrap());
        let given = ProxyListening::new("127.0.0.3:80".parse().unwrap());
        assert_eq!(given.addr, "127.0.0.3:80".parse().unwrap());
    }
}
