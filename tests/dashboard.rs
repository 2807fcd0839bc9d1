//! The live page on the admin port, rendered by a real browser: headless Chromium (Debian's
//! `chromium` package; `.ci/run` installs it) loads `GET /` from a running agent, runs its
//! script against `/status` and `/metrics`, and the rendered DOM must show what the fake pods
//! themselves count. A screenshot is saved as `target/tmp/dashboard.png`.

mod common;

use common::dns::DnsServer;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SECS: Duration = Duration::from_secs(10);

fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("Chromium is needed for the live page test (Debian: apt-get install chromium)");
}

/// Runs headless Chromium on `url` with `extra` arguments (after letting the page's script
/// run for 2.5 s of virtual time); returns its stdout.
fn headless(url: &str, extra: &[&str]) -> String {
    let profile = temp_dir("chromium");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(addr, local in flight, global in flight, limit)` of every pod row the page rendered.
fn pod_rows(dom: &str) -> Vec<(String, u64, u64, u64)> {
    let mut rows = Vec::new();
    for part in dom.split("data-addr=\"").skip(1) {
        let attr = |name: &str| -> u64 {
            let key = format!("{name}=\"");
            let at = part.find(&key).expect("attribute") + key.len();
            part[at..].split('"').next().unwrap().parse().unwrap()
        };
        let addr = part.split('"').next().unwrap().to_string();
        rows.push((
            addr,
            attr("data-inflight"),
            attr("data-global"),
            attr("data-limit"),
        ));
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_shows_what_the_pods_count() {
    let pods = start_pods(171, 2).await.unwrap();
    let agent = start_work_route("queue: {timeout: 30s}\n", 1, &pods).await;
    // Both pods busy (1 each, their limit) and two requests waiting.
    let burst: Vec<_> = (0..4)
        .map(|_| spawn_get(agent.addr, "/work?ms=6000"))
        .collect();
    eventually(SECS, "pods busy, two queued", || async {
        pods.iter().all(|p| p.stats.inflight() == 1) && agent.queue_depth().await == 2
    })
    .await;

    let url = format!("http://{}/", agent.admin);
    let dom = headless(&url, &["--dump-dom"]);
    let rows = pod_rows(&dom);
    assert_eq!(rows.len(), 2, "one row per pod:\n{dom}");
    for p in &pods {
        let row = rows
            .iter()
            .find(|r| r.0 == p.addr.to_string())
            .unwrap_or_else(|| panic!("no row for {}:\n{dom}", p.addr));
        assert_eq!(
            (row.1, row.2, row.3),
            (p.stats.inflight() as u64, p.stats.inflight() as u64, 1),
            "{}",
            p.addr
        );
    }
    let queued = agent.queue_depth().await;
    assert!(
        dom.contains(&format!("class=\"pool-queue\" data-n=\"{queued}\"")),
        "queue {queued} not shown:\n{dom}"
    );
    assert!(dom.contains(">ready<"), "readiness shown");
    assert!(
        dom.contains("class=\"pool-oldest\""),
        "the oldest waiter's age shown:\n{dom}"
    );
    let oldest = agent.status().await["pools"][0]["oldest_wait_ms"]
        .as_u64()
        .expect("oldest_wait_ms in /status");
    assert!(oldest > 0, "{oldest}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,800",
        ],
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "screenshot saved"
    );
    for b in burst {
        let _ = b.await;
    }
}

/// The page loads nothing from anywhere else: no external script, style, font or image.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_is_self_contained() {
    let pods = start_pods(173, 1).await.unwrap();
    let agent = start_work_route("", 1, &pods).await;
    let page = loadgen::get(agent.admin, "/", &[]).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/html")));
    for needle in ["http://", "https://", "src=", "@import", "url("] {
        assert!(!page.body.contains(needle), "the page refers to {needle}");
    }
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'none'"), "{csp}");
}

/// The page's discovery table: each source, how it finds pods, its last good answer, and the
/// single-address trap (a Service name answering one address: an ordinary Service's cluster
/// IP) as a warning a person sees, next to what `/status` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_shows_discovery_and_the_single_address_warning() {
    let pods = start_pods(175, 1).await.unwrap();
    let dns = DnsServer::start().await;
    let name = "codec.ai-media.svc.cluster.local";
    dns.set_ips(name, &[pods[0].addr.ip()]);
    let agent = Agent::start(&format!(
        "dns: {{nameservers: [\"{}\"], refresh_interval: 100ms, stability_samples: 2, stability_interval: 50ms}}\n\
         routes:\n  - {{uri: /work, limit: 1, service_name: codec, namespace: ai-media, http_port: {}}}\n",
        dns.addr,
        pods[0].addr.port()
    ))
    .await;
    eventually(SECS, "single address flagged in /status", || async {
        agent.status().await["discovery"][0]["single_address"] == true
    })
    .await;
    let status = agent.status().await;
    assert_eq!(status["discovery"][0]["source"], name, "{status}");

    let dom = headless(&format!("http://{}/", agent.admin), &["--dump-dom"]);
    let row_start = dom
        .find(&format!("data-source=\"{name}\""))
        .unwrap_or_else(|| panic!("no discovery row for {name}:\n{dom}"));
    let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").unwrap()];
    assert!(row.contains("data-kind=\"dns\""), "{row}");
    assert!(row.contains(">DNS<"), "{row}");
    assert!(row.contains(" s ago<"), "a last good answer shown: {row}");
    assert!(
        row.contains("one address: an ordinary Service's cluster IP"),
        "the trap is shown: {row}"
    );
    // When the pool's pod list last changed, as /status has it.
    assert!(status["pools"][0]["pods_changed_unix_ms"].as_u64().unwrap() > 0);
    assert!(dom.contains("class=\"pool-changed\""), "{dom}");
    assert!(dom.contains("pod list changed "), "{dom}");
}

/// A held asynchronous job shows on the page: its pod, its route, how long it has held its
/// slot, as `/status` lists it; and the page says so when none is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_lists_held_jobs() {
    use testkit::asyncpod::{AsyncPod, Convention};
    let pod = AsyncPod::start(
        std::net::SocketAddr::from(([127, 0, 1, 177], free_port())),
        Convention::Redirect,
        false,
    )
    .await
    .unwrap();
    let agent = Agent::start(&format!(
        "routes:\n  - {{uri: /submit, limit: 1, endpoints: [\"{}\"], async: {{check_interval: 100ms}}}}\n",
        pod.addr
    ))
    .await;
    let empty = headless(&format!("http://{}/", agent.admin), &["--dump-dom"]);
    assert!(empty.contains("no job holds a slot"), "{empty}");
    let r = loadgen::request(agent.addr, "POST", "/submit?ms=60000", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    let status = agent.status().await;
    assert_eq!(status["jobs"][0]["pod"], pod.addr.to_string(), "{status}");
    let dom = headless(&format!("http://{}/", agent.admin), &["--dump-dom"]);
    let row_start = dom
        .find(&format!("data-pod=\"{}\"", pod.addr))
        .unwrap_or_else(|| panic!("no job row for {}:\n{dom}", pod.addr));
    let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").unwrap()];
    assert!(row.contains(">/submit<"), "{row}");
    assert!(row.contains(" s<"), "the hold's age: {row}");
    assert_eq!(
        pod.stats.running.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
