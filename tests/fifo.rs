//! FIFO means the order in which requests arrived: a burst of requests sent one right after
//! the other (each connection opened and its request written before the next) reaches the
//! pods in that order, even though they all land in lb-agent within a millisecond or two.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_is_served_in_the_order_it_arrived() {
    let pods = start_pods(1, 1).await.unwrap();
    let agent = start_work_route("", 1, &pods).await;
    let blocker = spawn_get(agent.addr, "/work?ms=500");
    eventually(SECS, "blocker at the pod", || async {
        pods[0].stats.inflight() == 1
    })
    .await;
    // 40 requests, back to back, from one task: arrival order is the loop's order.
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(agent.addr).await.unwrap();
        s.write_all(
            format!(
                "GET /work?ms=1 HTTP/1.1\r\nhost: x\r\nx-req-id: {i}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        conns.push(s);
    }
    assert_eq!(blocker.await.unwrap().unwrap().status, 200);
    for mut s in conns {
        let mut out = Vec::new();
        tokio::time::timeout(SECS, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    let arrivals = pods[0].stats.arrivals();
    let want: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    assert_eq!(arrivals, want, "pod saw {arrivals:?}");
}
