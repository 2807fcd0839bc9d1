//! The fake API server against the real kube-rs client and `kube::runtime::watcher`: what
//! lb-agent's discovery will see, list, watch, relist and recover from.
//!
//! Each watcher runs in a task of its own (with kube's default backoff, as discovery will run
//! it), so it keeps watching between the test's steps; the test reads its events from a
//! channel, each within a bounded time.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Status;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config};
use testkit::fakeapi::{Endpoint, FakeApi, SlicePort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const NS: &str = "ai-media";
const SVC: &str = "svc";
const WAIT: Duration = Duration::from_secs(5);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 1, last])
}

fn http_port() -> Vec<SlicePort> {
    vec![SlicePort::new("http", 20109)]
}

/// A client built the way lb-agent builds one from a kubeconfig.
async fn client(api: &FakeApi) -> Client {
    let path = std::env::temp_dir().join(format!(
        "testkit-fakeapi-{}-{}.kubeconfig",
        std::process::id(),
        api.addr().port()
    ));
    api.write_kubeconfig(&path, NS).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, NS);
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    Client::try_from(config).unwrap()
}

type Item = Result<Event<EndpointSlice>, watcher::Error>;

/// A watcher of the slices of `SVC` in `NS`, running in its own task.
struct Watcher {
    rx: mpsc::UnboundedReceiver<Item>,
    task: JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    fn start(client: Client, config: watcher::Config) -> Watcher {
        let slices = Api::<EndpointSlice>::namespaced(client, NS);
        let config = config.labels(&format!("kubernetes.io/service-name={SVC}"));
        let mut stream = watcher(slices, config).default_backoff().boxed();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        Watcher { rx, task }
    }

    async fn next(&mut self) -> Item {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("the watcher yields within 5 s")
            .expect("the watcher runs")
    }

    /// The next event, described; an error fails the test.
    async fn event(&mut self) -> String {
        match self.next().await {
            Ok(event) => describe(&event),
            Err(e) => panic!("expected an event, got the error {e}"),
        }
    }

    /// The next event's slice, with the event described.
    async fn slice(&mut self) -> (String, EndpointSlice) {
        match self.next().await {
            Ok(Event::Apply(s) | Event::InitApply(s) | Event::Delete(s)) => {
                let text = describe(&Event::Apply(s.clone()));
                (text, s)
            }
            other => panic!("expected a slice, got {other:?}"),
        }
    }

    /// The next error.
    async fn error(&mut self) -> watcher::Error {
        match self.next().await {
            Err(e) => e,
            Ok(event) => panic!("expected an error, got {}", describe(&event)),
        }
    }
}

/// `Init`, `InitApply name [ips]`, `InitDone`, `Apply name [ips]`, `Delete name`.
fn describe(event: &Event<EndpointSlice>) -> String {
    let slice = |s: &EndpointSlice| {
        let ips: Vec<&str> = s
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect();
        format!(
            "{} [{}]",
            s.metadata.name.as_deref().unwrap_or("?"),
            ips.join(" ")
        )
    };
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(s) => format!("InitApply {}", slice(s)),
        Event::InitDone => "InitDone".into(),
        Event::Apply(s) => format!("Apply {}", slice(s)),
        Event::Delete(s) => format!("Delete {}", slice(s)),
    }
}

/// The API `Status` an error carries, wherever the watcher put it.
fn status_of(e: &watcher::Error) -> Option<&Status> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s),
        watcher::Error::WatchError(s) => Some(s),
        _ => None,
    }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting after 5 s until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Slices of another service in the namespace, and of the service in another namespace,
/// which no watcher here may ever see.
fn put_strangers(api: &FakeApi, tag: &str) {
    let other_svc = format!("other-svc-{tag}");
    api.put_slice(
        NS,
        &other_svc,
        "other",
        vec![Endpoint::ready(ip(9))],
        http_port(),
    );
    api.put_slice(
        "elsewhere",
        &format!("elsewhere-{tag}"),
        SVC,
        vec![Endpoint::ready(ip(9))],
        http_port(),
    );
}

#[tokio::test]
async fn lists_then_watches_changes_of_its_service_only() {
    let api = FakeApi::start().await;
    api.put_slice(NS, "svc-a", SVC, vec![Endpoint::ready(ip(1))], http_port());
    put_strangers(&api, "1");
    let mut w = Watcher::start(client(&api).await, watcher::Config::default());

    assert_eq!(w.event().await, "Init");
    assert_eq!(w.event().await, "InitApply svc-a [127.0.1.1]");
    assert_eq!(w.event().await, "InitDone");

    // A change to the slice, after changes the watcher must not see: the change is next.
    put_strangers(&api, "2");
    api.put_slice(
        NS,
        "svc-a",
        SVC,
        vec![
            Endpoint::ready(ip(1)),
            Endpoint::not_ready(ip(2)),
            Endpoint::terminating(ip(3)),
            Endpoint::unknown(ip(4)),
        ],
        vec![SlicePort {
            name: None,
            port: None,
        }],
    );
    let (text, slice) = w.slice().await;
    assert_eq!(
        text,
        "Apply svc-a [127.0.1.1 127.0.1.2 127.0.1.3 127.0.1.4]"
    );
    let conditions: Vec<_> = slice
        .endpoints
        .iter()
        .map(|e| {
            e.conditions
                .as_ref()
                .map(|c| (c.ready, c.serving, c.terminating))
        })
        .collect();
    assert_eq!(
        conditions,
        [
            Some((Some(true), Some(true), Some(false))),
            Some((Some(false), Some(false), Some(false))),
            Some((Some(false), Some(true), Some(true))),
            None,
        ]
    );
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (None, None));
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(slice.metadata.namespace.as_deref(), Some(NS));

    // A new slice, then its deletion; the strangers' deletions go unseen.
    api.put_slice(NS, "svc-b", SVC, vec![Endpoint::ready(ip(5))], http_port());
    assert_eq!(w.event().await, "Apply svc-b [127.0.1.5]");
    api.delete_slice(NS, "other-svc-1");
    api.delete_slice("elsewhere", "elsewhere-1");
    api.delete_slice(NS, "svc-b");
    assert_eq!(w.event().await, "Delete svc-b [127.0.1.5]");

    // A slice that moves to another service leaves the watch as a deletion.
    api.put_slice(
        NS,
        "svc-a",
        "other",
        vec![Endpoint::ready(ip(1))],
        http_port(),
    );
    assert_eq!(
        w.event().await,
        "Delete svc-a [127.0.1.1 127.0.1.2 127.0.1.3 127.0.1.4]"
    );

    let stats = api.stats();
    assert_eq!((stats.lists, stats.watches, stats.expired), (1, 1, 0));
    let requests = api.requests();
    eprintln!("requests the watcher sent: {requests:#?}");
    let path = "/apis/discovery.k8s.io/v1/namespaces/ai-media/endpointslices?";
    let selector = "labelSelector=kubernetes.io%2Fservice-name%3Dsvc";
    assert!(
        requests[0].starts_with(&format!("GET {path}")),
        "{requests:?}"
    );
    assert!(requests[0].contains(selector) && !requests[0].contains("watch="));
    assert!(requests[1].contains(selector) && requests[1].contains("watch=true"));
    assert!(requests[1].contains("allowWatchBookmarks=true"));
    assert_eq!(
        requests.len(),
        2,
        "nothing but a list and a watch: {requests:?}"
    );
}

#[tokio::test]
async fn expired_watches_make_the_watcher_list_again() {
    let api = FakeApi::start().await;
    api.put_slice(NS, "svc-a", SVC, vec![Endpoint::ready(ip(1))], http_port());
    let client = client(&api).await;
    let mut w = Watcher::start(client.clone(), watcher::Config::default());
    for expected in ["Init", "InitApply svc-a [127.0.1.1]", "InitDone"] {
        assert_eq!(w.event().await, expected);
    }
    wait_until("the watcher watches", || api.open_watches() == 1).await;
    let old = api.resource_version();
    api.put_slice(NS, "svc-b", SVC, vec![Endpoint::ready(ip(2))], http_port());
    assert_eq!(w.event().await, "Apply svc-b [127.0.1.2]");

    api.expire_watches();
    let e = w.error().await;
    let status = status_of(&e).unwrap_or_else(|| panic!("a Status in {e:?}"));
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    for expected in [
        "Init",
        "InitApply svc-a [127.0.1.1]",
        "InitApply svc-b [127.0.1.2]",
        "InitDone",
    ] {
        assert_eq!(w.event().await, expected);
    }
    let stats = api.stats();
    assert_eq!((stats.lists, stats.expired), (2, 1));

    // After the relist the watcher watches again, from the new version, and sees changes.
    api.delete_slice(NS, "svc-a");
    assert_eq!(w.event().await, "Delete svc-a [127.0.1.1]");

    // A watch from a version older than the expiry gets 410 as its first event.
    let slices = Api::<EndpointSlice>::namespaced(client, NS);
    let mut stream = slices
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
    match first {
        Some(Ok(WatchEvent::Error(status))) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 event, got {other:?}"),
    }
    assert_eq!(api.stats().expired, 2);
}

#[tokio::test]
async fn forbidden_is_a_403_status_and_passes() {
    let api = FakeApi::start().await;
    api.put_slice(NS, "svc-a", SVC, vec![Endpoint::ready(ip(1))], http_port());
    let client = client(&api).await;

    // A watcher that starts without the permission fails its list.
    api.set_forbidden(true);
    let mut w = Watcher::start(client.clone(), watcher::Config::default());
    assert_eq!(w.event().await, "Init");
    let e = w.error().await;
    assert!(matches!(e, watcher::Error::InitialListFailed(_)), "{e:?}");
    let status = status_of(&e).unwrap();
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "endpointslices.discovery.k8s.io is forbidden: User \
         \"system:serviceaccount:ai-media:lb-agent\" cannot list resource \"endpointslices\" \
         in API group \"discovery.k8s.io\" in the namespace \"ai-media\""
    );
    let details = status.details.as_ref().unwrap();
    assert_eq!(
        (details.group.as_str(), details.kind.as_str()),
        ("discovery.k8s.io", "endpointslices")
    );

    // Given the permission, it lists (after its backoff) and watches.
    api.set_forbidden(false);
    for expected in ["Init", "InitApply svc-a [127.0.1.1]", "InitDone"] {
        assert_eq!(w.event().await, expected);
    }
    wait_until("the watcher watches", || api.open_watches() == 1).await;

    // Taken away while watching: the watch is cut and the watch that follows is refused.
    api.set_forbidden(true);
    let mut seen = Vec::new();
    let status = loop {
        let e = w.error().await;
        if let Some(s) = status_of(&e) {
            break s.clone();
        }
        seen.push(e.to_string());
        assert!(seen.len() < 3, "no 403 among {seen:?}");
    };
    eprintln!("errors before the 403: {seen:?}");
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert!(
        status.message.contains("cannot watch resource"),
        "{}",
        status.message
    );

    // And back: the watcher resumes its watch and misses nothing.
    api.put_slice(NS, "svc-b", SVC, vec![Endpoint::ready(ip(2))], http_port());
    api.set_forbidden(false);
    assert_eq!(w.event().await, "Apply svc-b [127.0.1.2]");
    assert!(api.stats().forbidden >= 2, "{:?}", api.stats());
}

#[tokio::test]
async fn the_watcher_recovers_from_an_outage() {
    let api = FakeApi::start().await;
    api.put_slice(NS, "svc-a", SVC, vec![Endpoint::ready(ip(1))], http_port());
    let mut w = Watcher::start(client(&api).await, watcher::Config::default());
    for expected in ["Init", "InitApply svc-a [127.0.1.1]", "InitDone"] {
        assert_eq!(w.event().await, expected);
    }
    wait_until("the watcher watches", || api.open_watches() == 1).await;

    api.set_down(true);
    let e = w.error().await;
    eprintln!("the watcher's error while down: {e}");
    assert!(
        matches!(
            e,
            watcher::Error::WatchStartFailed(_) | watcher::Error::WatchFailed(_)
        ),
        "{e:?}"
    );
    api.put_slice(NS, "svc-b", SVC, vec![Endpoint::ready(ip(2))], http_port());
    put_strangers(&api, "down");
    wait_until("a connection was refused", || api.stats().refused >= 1).await;

    api.set_down(false);
    assert_eq!(w.event().await, "Apply svc-b [127.0.1.2]");
    api.delete_slice(NS, "svc-a");
    assert_eq!(w.event().await, "Delete svc-a [127.0.1.1]");
    // It resumed its watch from where it was: no second list was needed.
    assert_eq!(api.stats().lists, 1);
}

#[tokio::test]
async fn streaming_lists_and_bookmarks() {
    let api = FakeApi::start().await;
    api.put_slice(NS, "svc-a", SVC, vec![Endpoint::ready(ip(1))], http_port());
    put_strangers(&api, "1");
    let client = client(&api).await;
    let mut w = Watcher::start(client.clone(), watcher::Config::default().streaming_lists());
    for expected in ["Init", "InitApply svc-a [127.0.1.1]", "InitDone"] {
        assert_eq!(w.event().await, expected);
    }
    api.put_slice(NS, "svc-b", SVC, vec![Endpoint::ready(ip(2))], http_port());
    assert_eq!(w.event().await, "Apply svc-b [127.0.1.2]");
    assert_eq!(api.stats().lists, 0);
    let first = &api.requests()[0];
    assert!(first.contains("sendInitialEvents=true"), "{first}");

    // A raw watch gets a bookmark at the current version within a bookmark period.
    let slices = Api::<EndpointSlice>::namespaced(client, NS);
    let now = api.resource_version().to_string();
    let mut stream = slices
        .watch(
            &WatchParams::default().labels("kubernetes.io/service-name=svc"),
            &now,
        )
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(b.metadata.resource_version, now),
        other => panic!("expected a bookmark, got {other:?}"),
    }
}
