//! A fake Kubernetes API server that serves EndpointSlices, for lb-agent's discovery tests.
//!
//! No kube-apiserver can run where the tests run, yet discovery must be tested against the real
//! kube-rs client and its `kube::runtime::watcher`, with their own list/watch/relist logic. So
//! this is a small HTTP/1.1 server (hyper) on loopback that speaks just enough of the API for
//! that client: `discovery.k8s.io/v1` EndpointSlices, listed and watched by namespace and label
//! selector, with resourceVersions, bookmarks, `410 Expired`, `403 Forbidden` and outages that
//! the test switches on and off.
//!
//! What it serves (GET only; anything else is a `Status` with 404 or 405):
//! - `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices` (and the cluster-wide
//!   `/apis/discovery.k8s.io/v1/endpointslices`): a list, or with `watch=true` a watch;
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated) narrows both;
//! - `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{name}`: one slice;
//! - `/version`: a v1.33 version, for a client that checks it can reach the server.
//!
//! How it differs from a real API server, on purpose:
//! - a list is always served from the newest state: `resourceVersion`/`resourceVersionMatch`
//!   are accepted and ignored, and `limit` too (every list fits in one page, no `continue`);
//! - a watch replays every change after its `resourceVersion` (the server keeps them all until
//!   [`FakeApi::expire_watches`]), so a watcher that lost its connection misses nothing, as
//!   with a real server's watch cache; `resourceVersion` absent or `0`, or
//!   `sendInitialEvents=true`, first sends every matching slice as `ADDED` (the latter then a
//!   bookmark annotated `k8s.io/initial-events-end`, for kube's streaming lists);
//! - no authentication: the bearer token of [`FakeApi::write_kubeconfig`] is not checked;
//! - `fieldSelector` is refused (400) rather than half-supported, so a test that needs it fails
//!   loudly.
//!
//! In a test (`testkit/tests/fakeapi.rs` drives it with the real watcher):
//! ```ignore
//! let api = FakeApi::start().await;
//! api.put_slice("ai-media", "svc-abc", "svc", vec![Endpoint::ready(ip)], vec![SlicePort::new("http", 20109)]);
//! api.write_kubeconfig(&path, "ai-media")?; // then KUBECONFIG=path, or Kubeconfig::read_from
//! // … start the watcher; then change the world under it:
//! api.expire_watches(); // 410: the watcher lists again
//! api.set_forbidden(true); // 403 Status on list and watch
//! api.set_down(true); // connections cut and refused
//! ```

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};

/// How often an open watch that asked for bookmarks (`allowWatchBookmarks=true`) gets one.
/// A real server sends them about once a minute; a second keeps the tests short while still
/// moving the watcher's resourceVersion forward between changes.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// The label that ties an EndpointSlice to its Service (what discovery selects on).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

const GROUP_VERSION: &str = "discovery.k8s.io/v1";
const SLICES_PREFIX: &str = "/apis/discovery.k8s.io/v1/";

/// One endpoint of a slice: an address and the three conditions, each of which may be absent
/// (the API says an absent `ready` means ready, and discovery must read it so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Endpoint {
    /// A running, ready pod.
    pub fn ready(ip: IpAddr) -> Self {
        Self::with(ip, true, true, false)
    }

    /// A running pod that fails its readiness probe.
    pub fn not_ready(ip: IpAddr) -> Self {
        Self::with(ip, false, false, false)
    }

    /// A pod being deleted that still serves (graceful termination): not ready, serving,
    /// terminating.
    pub fn terminating(ip: IpAddr) -> Self {
        Self::with(ip, false, true, true)
    }

    /// An endpoint without any condition (`conditions` absent from the JSON).
    pub fn unknown(ip: IpAddr) -> Self {
        Endpoint {
            ip,
            ready: None,
            serving: None,
            terminating: None,
        }
    }

    fn with(ip: IpAddr, ready: bool, serving: bool, terminating: bool) -> Self {
        Endpoint {
            ip,
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }
    }

    fn to_json(&self) -> Value {
        let mut conditions = serde_json::Map::new();
        for (key, value) in [
            ("ready", self.ready),
            ("serving", self.serving),
            ("terminating", self.terminating),
        ] {
            if let Some(v) = value {
                conditions.insert(key.to_string(), Value::Bool(v));
            }
        }
        let mut endpoint = json!({ "addresses": [self.ip.to_string()] });
        if !conditions.is_empty() {
            endpoint["conditions"] = Value::Object(conditions);
        }
        endpoint
    }
}

/// One port of a slice. Both fields may be absent in the API (a headless Service without
/// ports; an unnamed single port), and discovery must cope with both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<u16>,
}

impl SlicePort {
    /// A named TCP port, the usual case.
    pub fn new(name: &str, port: u16) -> Self {
        SlicePort {
            name: Some(name.to_string()),
            port: Some(port),
        }
    }

    fn to_json(&self) -> Value {
        let mut port = json!({ "protocol": "TCP" });
        if let Some(name) = &self.name {
            port["name"] = json!(name);
        }
        if let Some(number) = self.port {
            port["port"] = json!(number);
        }
        port
    }
}

/// What the server has done, for tests to assert on (counts since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// Lists of EndpointSlices answered with 200.
    pub lists: u64,
    /// Watches answered with 200, those that got only a 410 included.
    pub watches: u64,
    /// `ERROR` events with a 410 `Expired` Status sent (one per watch that got one).
    pub expired: u64,
    /// Requests answered with 403 while forbidden.
    pub forbidden: u64,
    /// Connections closed unanswered while down.
    pub refused: u64,
}

/// A running fake API server on 127.0.0.1. Clones share the server; it stops, and cuts its
/// connections, when the last clone is dropped.
#[derive(Clone)]
pub struct FakeApi {
    shared: Arc<Shared>,
    _life: Arc<Life>,
}

/// Ends the server's tasks when the last [`FakeApi`] goes. Apart from [`Shared`] so that the
/// tasks, which hold `Shared`, do not keep the server alive themselves.
struct Life {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Life {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut state = self.shared.state();
        state.watches.clear();
        for (_, conn) in state.conns.drain() {
            conn.abort();
        }
    }
}

struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    /// The last resourceVersion given out; every change takes the next one.
    rv: u64,
    slices: BTreeMap<(String, String), Slice>,
    /// Every change since the last expiry, in resourceVersion order: what a watch from an
    /// older resourceVersion replays.
    history: Vec<Change>,
    /// A watch from a resourceVersion below this one gets 410 Expired.
    compacted: u64,
    watches: Vec<Watch>,
    /// The task of every open connection, so an outage can cut them.
    conns: HashMap<u64, AbortHandle>,
    next_conn: u64,
    down: bool,
    forbidden: bool,
    stats: ApiStats,
    requests: Vec<String>,
}

#[derive(Debug, Clone)]
struct Slice {
    namespace: String,
    name: String,
    service: String,
    uid: String,
    rv: u64,
    endpoints: Vec<Endpoint>,
    ports: Vec<SlicePort>,
}

impl Slice {
    fn labels(&self) -> BTreeMap<&str, &str> {
        BTreeMap::from([
            (SERVICE_NAME_LABEL, self.service.as_str()),
            (
                "endpointslice.kubernetes.io/managed-by",
                "endpointslice-controller.k8s.io",
            ),
        ])
    }

    /// The slice as the API serves it. `typed` adds `apiVersion` and `kind`, which a real
    /// server puts on a watched or fetched object but not on the items of a list.
    fn to_json(&self, typed: bool) -> Value {
        let ipv6 = self.endpoints.iter().any(|e| e.ip.is_ipv6());
        let mut slice = json!({
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": self.rv.to_string(),
                "labels": self.labels(),
            },
            "addressType": if ipv6 { "IPv6" } else { "IPv4" },
            "endpoints": self.endpoints.iter().map(Endpoint::to_json).collect::<Vec<_>>(),
            "ports": self.ports.iter().map(SlicePort::to_json).collect::<Vec<_>>(),
        });
        if typed {
            slice["apiVersion"] = json!(GROUP_VERSION);
            slice["kind"] = json!("EndpointSlice");
        }
        slice
    }
}

/// One change to one slice: created (`prev` absent), replaced, or deleted (`cur` absent).
/// Both sides are kept because a watch must see a slice that stops matching its selector as
/// deleted, and one that starts matching as added.
struct Change {
    rv: u64,
    prev: Option<Slice>,
    cur: Option<Slice>,
}

impl Change {
    /// The watch event line this change makes for a watch on `scope`, if any.
    fn event_for(&self, scope: &Scope) -> Option<Bytes> {
        let prev = self.prev.as_ref().filter(|s| scope.matches(s));
        let cur = self.cur.as_ref().filter(|s| scope.matches(s));
        match (prev, cur) {
            (None, Some(cur)) => Some(event_line("ADDED", cur.to_json(true))),
            (Some(_), Some(cur)) => Some(event_line("MODIFIED", cur.to_json(true))),
            (Some(prev), None) => {
                // Like a real server: the last state, stamped with the deletion's version.
                let gone = Slice {
                    rv: self.rv,
                    ..prev.clone()
                };
                Some(event_line("DELETED", gone.to_json(true)))
            }
            (None, None) => None,
        }
    }
}

/// Which slices a list or watch covers.
struct Scope {
    /// `None`: every namespace.
    namespace: Option<String>,
    selector: Vec<Requirement>,
}

impl Scope {
    fn matches(&self, slice: &Slice) -> bool {
        let labels = slice.labels();
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == slice.namespace)
            && self.selector.iter().all(|r| r.matches(&labels))
    }
}

/// One term of a label selector, in the equality-based syntax.
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<&str, &str>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k.as_str()) == Some(&v.as_str()),
            Requirement::NotEquals(k, v) => labels.get(k.as_str()) != Some(&v.as_str()),
            Requirement::Exists(k) => labels.contains_key(k.as_str()),
            Requirement::Absent(k) => !labels.contains_key(k.as_str()),
        }
    }
}

/// Parses `k=v,k2!=v2,k3,!k4`; set-based terms (`in`, `notin`) are refused.
fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let mut terms = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else if term.contains(char::is_whitespace) || term.contains('(') {
            return Err(format!(
                "the fake API server understands only equality-based selectors, not {term:?}"
            ));
        } else {
            Requirement::Exists(term.into())
        };
        terms.push(req);
    }
    Ok(terms)
}

/// An open watch: where its events go and which slices it covers.
struct Watch {
    conn: u64,
    scope: Scope,
    bookmarks: bool,
    /// `timeoutSeconds`: the server ends the watch then, as a real one does.
    deadline: Option<Instant>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    /// Queues one line; false when the client has gone.
    fn send(&self, line: Bytes) -> bool {
        self.tx.send(line).is_ok()
    }
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        json!({ "apiVersion": GROUP_VERSION, "kind": "EndpointSlice", "metadata": metadata }),
    )
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

fn expired_line(requested: u64, oldest: u64) -> Bytes {
    let message = format!("too old resource version: {requested} ({oldest})");
    event_line("ERROR", status(StatusCode::GONE, "Expired", &message, None))
}

type ApiBody = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, body: &Value) -> Response<ApiBody> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response<ApiBody> {
    json_response(code, &status(code, reason, message, None))
}

/// A watch response body: the lines queued for the watch, each sent (and flushed) as one
/// chunk as soon as it is queued. It ends when the server drops the watch's sender.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Returned by the request handler to make hyper drop the connection without an answer
/// (a request that raced an outage).
#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake API server is down")
    }
}

impl std::error::Error for Down {}

/// The query string, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query(pairs)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request under `/apis/discovery.k8s.io/v1/` names.
enum Target {
    /// The slices of a namespace (`None`: all namespaces).
    Collection(Option<String>),
    One(String, String),
}

fn parse_target(path: &str) -> Option<Target> {
    let rest = path.strip_prefix(SLICES_PREFIX)?.trim_end_matches('/');
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["endpointslices"] => Some(Target::Collection(None)),
        ["namespaces", ns, "endpointslices"] => Some(Target::Collection(Some(ns.to_string()))),
        ["namespaces", ns, "endpointslices", name] => {
            Some(Target::One(ns.to_string(), name.to_string()))
        }
        _ => None,
    }
}

impl FakeApi {
    /// Starts a server on 127.0.0.1 on a free port, serving in tokio tasks of the current
    /// runtime. Panics if no port can be bound (it is meant for tests).
    pub async fn start() -> FakeApi {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(listen)
            .await
            .expect("the fake API server binds 127.0.0.1:0")
    }

    /// Starts a server on `listen`.
    pub async fn start_on(listen: SocketAddr) -> std::io::Result<FakeApi> {
        let listener = TcpListener::bind(listen).await?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            state: Mutex::new(State::default()),
        });
        let tasks = vec![
            tokio::spawn(accept_loop(listener, Arc::clone(&shared))),
            tokio::spawn(bookmark_loop(Arc::clone(&shared))),
        ];
        let life = Arc::new(Life {
            shared: Arc::clone(&shared),
            tasks,
        });
        Ok(FakeApi {
            shared,
            _life: life,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`, the `server` of a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig whose current context points at this server, with `namespace` as
    /// the context's namespace and a bearer token (`fake`), so a client is built the way
    /// lb-agent builds one outside a cluster.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        // A JSON string is a valid YAML double-quoted scalar: whatever the namespace holds,
        // the file stays well-formed.
        let quote = |s: &str| Value::String(s.to_string()).to_string();
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fakeapi\n  cluster:\n    server: {server}\n\
             users:\n\
             - name: fakeapi\n  user:\n    token: fake\n\
             contexts:\n\
             - name: fakeapi\n  context:\n    cluster: fakeapi\n    user: fakeapi\n    namespace: {ns}\n\
             current-context: fakeapi\n\
             preferences: {{}}\n",
            server = quote(&self.url()),
            ns = quote(namespace),
        );
        std::fs::write(path, text)
    }

    /// Creates or replaces the slice `namespace/name` of `service`. It gets a new
    /// resourceVersion, and every open watch it concerns gets `ADDED` or `MODIFIED` at once
    /// (`DELETED` if the slice moved to another service out of the watch's selector).
    pub fn put_slice(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        endpoints: Vec<Endpoint>,
        ports: Vec<SlicePort>,
    ) {
        let mut state = self.shared.state();
        state.rv += 1;
        let rv = state.rv;
        let key = (namespace.to_string(), name.to_string());
        let prev = state.slices.get(&key).cloned();
        let slice = Slice {
            namespace: namespace.to_string(),
            name: name.to_string(),
            service: service.to_string(),
            // A replaced slice keeps its identity; a re-created one gets a new one.
            uid: prev.as_ref().map_or_else(|| uid(rv), |p| p.uid.clone()),
            rv,
            endpoints,
            ports,
        };
        state.slices.insert(key, slice.clone());
        state.publish(Change {
            rv,
            prev,
            cur: Some(slice),
        });
    }

    /// Deletes the slice `namespace/name` (if it exists): open watches that saw it get
    /// `DELETED`.
    pub fn delete_slice(&self, namespace: &str, name: &str) {
        let mut state = self.shared.state();
        let key = (namespace.to_string(), name.to_string());
        let Some(prev) = state.slices.remove(&key) else {
            return;
        };
        state.rv += 1;
        let rv = state.rv;
        state.publish(Change {
            rv,
            prev: Some(prev),
            cur: None,
        });
    }

    /// An outage. Down: every open connection (watches included) is cut without a final
    /// event or chunk, and new connections are accepted and closed at once without an answer
    /// (counted in [`ApiStats::refused`]). Up again: served as before; the slices and their
    /// history are kept, so a watcher that comes back sees what changed meanwhile.
    pub fn set_down(&self, down: bool) {
        let mut state = self.shared.state();
        state.down = down;
        if down {
            state.watches.clear();
            for (_, conn) in state.conns.drain() {
                conn.abort();
            }
        }
    }

    /// RBAC taken away (or given back). Forbidden: lists, watches and gets of EndpointSlices
    /// get 403 with the `Status` a real server sends to a service account without the
    /// permission, and open watches are cut.
    pub fn set_forbidden(&self, forbidden: bool) {
        let mut state = self.shared.state();
        state.forbidden = forbidden;
        if forbidden {
            state.cut_watches();
        }
    }

    /// What etcd compaction does to watchers: every open watch gets an `ERROR` event holding
    /// a 410 `Expired` Status and is closed, and a later watch from a resourceVersion older
    /// than the current one gets the same. kube's watcher answers by listing again.
    ///
    /// A watcher between its list and its watch is not affected (its list is as new as the
    /// expiry): wait for [`FakeApi::open_watches`] first to be sure it relists.
    pub fn expire_watches(&self) {
        let mut state = self.shared.state();
        let now = state.rv;
        state.compacted = now;
        state.history.clear();
        let line = expired_line(now.saturating_sub(1), now);
        let watches = std::mem::take(&mut state.watches);
        state.stats.expired += watches.len() as u64;
        for watch in watches {
            watch.send(line.clone());
        }
    }

    /// Counts since start.
    pub fn stats(&self) -> ApiStats {
        self.shared.state().stats
    }

    /// Every request served or refused-with-a-status, as `METHOD path?query`, in arrival
    /// order: what a test reads to see what the client really asked.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state().requests.clone()
    }

    /// Watches open now. Lets a test wait until a watcher is watching before it changes
    /// something that only an open watch would notice.
    pub fn open_watches(&self) -> usize {
        let mut state = self.shared.state();
        state.watches.retain(|w| !w.tx.is_closed());
        state.watches.len()
    }

    /// The last resourceVersion given out.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }
}

/// A uid that is unique per creation, like the API server's.
fn uid(rv: u64) -> String {
    format!("fa4e0000-0000-4000-8000-{rv:012}")
}

impl State {
    /// Records a change and sends it to the open watches it concerns.
    fn publish(&mut self, change: Change) {
        self.watches
            .retain(|watch| match change.event_for(&watch.scope) {
                Some(line) => watch.send(line),
                None => !watch.tx.is_closed(),
            });
        self.history.push(change);
    }

    /// Cuts the connection of every open watch, without a final event.
    fn cut_watches(&mut self) {
        for watch in std::mem::take(&mut self.watches) {
            if let Some(conn) = self.conns.remove(&watch.conn) {
                conn.abort();
            }
        }
    }

    fn forbidden_response(&mut self, verb: &str, namespace: Option<&str>) -> Response<ApiBody> {
        self.stats.forbidden += 1;
        let user = format!(
            "system:serviceaccount:{}:lb-agent",
            namespace.unwrap_or("default")
        );
        let place = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        let message = format!(
            "endpointslices.discovery.k8s.io is forbidden: User \"{user}\" cannot {verb} \
             resource \"endpointslices\" in API group \"discovery.k8s.io\" {place}"
        );
        let details = json!({ "group": "discovery.k8s.io", "kind": "endpointslices" });
        json_response(
            StatusCode::FORBIDDEN,
            &status(StatusCode::FORBIDDEN, "Forbidden", &message, Some(details)),
        )
    }

    fn list(&mut self, scope: &Scope) -> Response<ApiBody> {
        self.stats.lists += 1;
        let items: Vec<Value> = self
            .slices
            .values()
            .filter(|s| scope.matches(s))
            .map(|s| s.to_json(false))
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": GROUP_VERSION,
                "kind": "EndpointSliceList",
                "metadata": { "resourceVersion": self.rv.to_string() },
                "items": items,
            }),
        )
    }

    fn watch(&mut self, conn: u64, scope: Scope, query: &Query) -> Response<ApiBody> {
        let from = match query.get("resourceVersion") {
            None | Some("" | "0") => None,
            Some(text) => match text.parse::<u64>() {
                Ok(rv) => Some(rv),
                Err(_) => {
                    let message = format!("invalid resourceVersion {text:?}");
                    return failure(StatusCode::BAD_REQUEST, "BadRequest", &message);
                }
            },
        };
        let initial_events = query.flag("sendInitialEvents");
        let deadline = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|&t| t > 0)
            .map(|t| Instant::now() + Duration::from_secs(t));
        self.stats.watches += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let body = WatchBody { rx }.boxed();
        let mut response = Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if let Some(rv) = from.filter(|&rv| rv < self.compacted && !initial_events) {
            // Sent as an event of a 200 watch, like a real server, and the watch ends.
            self.stats.expired += 1;
            let _ = tx.send(expired_line(rv, self.compacted));
            return response;
        }
        let watch = Watch {
            conn,
            scope,
            bookmarks: query.flag("allowWatchBookmarks"),
            deadline,
            tx,
        };
        match from {
            Some(rv) if !initial_events => {
                for change in self.history.iter().filter(|c| c.rv > rv) {
                    if let Some(line) = change.event_for(&watch.scope) {
                        watch.send(line);
                    }
                }
            }
            _ => {
                for slice in self.slices.values().filter(|s| watch.scope.matches(s)) {
                    watch.send(event_line("ADDED", slice.to_json(true)));
                }
                if initial_events {
                    watch.send(bookmark_line(self.rv, true));
                }
            }
        }
        self.watches.push(watch);
        response
    }

    fn get(&mut self, namespace: String, name: String) -> Response<ApiBody> {
        match self.slices.get(&(namespace, name.clone())) {
            Some(slice) => json_response(StatusCode::OK, &slice.to_json(true)),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("endpointslices.discovery.k8s.io \"{name}\" not found"),
            ),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            // Out of file descriptors or the like: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut state = shared.state();
        if state.down {
            state.stats.refused += 1;
            drop(conn);
            continue;
        }
        let id = state.next_conn;
        state.next_conn += 1;
        // Registered under the lock the task takes to unregister, so it cannot leave first.
        let task = tokio::spawn(serve_connection(conn, id, Arc::clone(&shared)));
        state.conns.insert(id, task.abort_handle());
    }
}

async fn serve_connection(conn: TcpStream, id: u64, shared: Arc<Shared>) {
    let handler = Arc::clone(&shared);
    let service = service_fn(move |req| {
        let response = handler.handle(&req, id);
        async move { response }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(conn), service)
        .await;
    shared.state().conns.remove(&id);
}

/// Sends bookmarks to the watches that asked for them, and ends the watches whose
/// `timeoutSeconds` is over. The bookmark is queued under the state lock, behind every event
/// already queued, so it never claims a resourceVersion the watch has not been sent yet.
async fn bookmark_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(BOOKMARK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut state = shared.state();
        let line = bookmark_line(state.rv, false);
        state.watches.retain(|watch| {
            if watch.deadline.is_some_and(|d| d <= now) {
                return false;
            }
            if watch.bookmarks {
                watch.send(line.clone())
            } else {
                !watch.tx.is_closed()
            }
        });
    }
}

impl Shared {
    fn handle(&self, req: &Request<Incoming>, conn: u64) -> Result<Response<ApiBody>, Down> {
        let mut state = self.state();
        if state.down {
            return Err(Down);
        }
        let uri = req.uri();
        state.requests.push(format!(
            "{} {}",
            req.method(),
            uri.path_and_query().map_or(uri.path(), |pq| pq.as_str())
        ));
        if req.method() != Method::GET {
            let message = format!("the fake API server serves only GET, not {}", req.method());
            return Ok(failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &message,
            ));
        }
        if uri.path() == "/version" {
            return Ok(json_response(StatusCode::OK, &version()));
        }
        let Some(target) = parse_target(uri.path()) else {
            let message = format!(
                "the server could not find the requested resource ({})",
                uri.path()
            );
            return Ok(failure(StatusCode::NOT_FOUND, "NotFound", &message));
        };
        let query = Query::parse(uri.query());
        let watching = query.flag("watch");
        if state.forbidden {
            let (verb, namespace) = match &target {
                Target::Collection(ns) => (if watching { "watch" } else { "list" }, ns.clone()),
                Target::One(ns, _) => ("get", Some(ns.clone())),
            };
            return Ok(state.forbidden_response(verb, namespace.as_deref()));
        }
        if query.get("fieldSelector").is_some_and(|f| !f.is_empty()) {
            let message = "the fake API server does not support fieldSelector";
            return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", message));
        }
        let selector = match parse_selector(query.get("labelSelector").unwrap_or("")) {
            Ok(s) => s,
            Err(message) => return Ok(failure(StatusCode::BAD_REQUEST, "BadRequest", &message)),
        };
        Ok(match target {
            Target::One(namespace, name) => state.get(namespace, name),
            Target::Collection(namespace) => {
                let scope = Scope {
                    namespace,
                    selector,
                };
                if watching {
                    state.watch(conn, scope, &query)
                } else {
                    state.list(&scope)
                }
            }
        })
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fakeapi",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_query_kube_sends() {
        let q = Query::parse(Some(
            "&labelSelector=kubernetes.io%2Fservice-name%3Dsvc&limit=500&watch=true",
        ));
        assert_eq!(
            q.get("labelSelector"),
            Some("kubernetes.io/service-name=svc")
        );
        assert_eq!(q.get("limit"), Some("500"));
        assert!(q.flag("watch"));
        assert!(!q.flag("allowWatchBookmarks"));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a+b%zz"), "a b%zz");
    }

    #[test]
    fn selects_by_label_and_namespace() {
        let slice = |ns: &str, svc: &str| Slice {
            namespace: ns.into(),
            name: "s".into(),
            service: svc.into(),
            uid: uid(1),
            rv: 1,
            endpoints: vec![],
            ports: vec![],
        };
        let scope = |ns: Option<&str>, sel: &str| Scope {
            namespace: ns.map(String::from),
            selector: parse_selector(sel).unwrap(),
        };
        let svc = scope(Some("a"), "kubernetes.io/service-name=svc");
        assert!(svc.matches(&slice("a", "svc")));
        assert!(!svc.matches(&slice("a", "other")));
        assert!(!svc.matches(&slice("b", "svc")));
        assert!(scope(None, "kubernetes.io/service-name==svc").matches(&slice("b", "svc")));
        assert!(scope(None, "kubernetes.io/service-name!=x").matches(&slice("b", "svc")));
        assert!(scope(None, "kubernetes.io/service-name").matches(&slice("b", "svc")));
        assert!(!scope(None, "!kubernetes.io/service-name").matches(&slice("b", "svc")));
        assert!(scope(None, "").matches(&slice("b", "svc")));
        assert!(parse_selector("app in (a,b)").is_err());
    }

    #[test]
    fn a_slice_leaving_the_selector_is_deleted_for_the_watch() {
        let scope = Scope {
            namespace: None,
            selector: parse_selector("kubernetes.io/service-name=svc").unwrap(),
        };
        let slice = |svc: &str, rv| Slice {
            namespace: "ns".into(),
            name: "s".into(),
            service: svc.into(),
            uid: uid(1),
            rv,
            endpoints: vec![Endpoint::unknown(IpAddr::from([127, 0, 1, 1]))],
            ports: vec![SlicePort {
                name: None,
                port: None,
            }],
        };
        let change = Change {
            rv: 2,
            prev: Some(slice("svc", 1)),
            cur: Some(slice("other", 2)),
        };
        let line = change.event_for(&scope).unwrap();
        let event: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["type"], "DELETED");
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "2");
        assert_eq!(
            event["object"]["endpoints"][0],
            json!({"addresses": ["127.0.1.1"]})
        );
        assert_eq!(event["object"]["ports"][0], json!({"protocol": "TCP"}));
        let back = Change {
            rv: 3,
            prev: Some(slice("other", 2)),
            cur: Some(slice("svc", 3)),
        };
        let event: Value = serde_json::from_slice(&back.event_for(&scope).unwrap()).unwrap();
        assert_eq!(event["type"], "ADDED");
    }
}
