//! A real DNS server on loopback (UDP, speaking the DNS wire protocol through hickory-proto)
//! whose zone the test changes while lb-agent is running.
#![allow(dead_code)]

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

/// How the server answers a name.
#[derive(Debug, Clone)]
pub enum Answer {
    Records(Vec<IpAddr>),
    /// A different record set on every A query, cycling through the list: an answer that
    /// never repeats, however fast or slow the resolver asks.
    Alternating(Vec<Vec<IpAddr>>),
    NxDomain,
    ServFail,
    Refused,
    /// No reply at all: the client's query times out.
    Silent,
}

#[derive(Default)]
struct Zone {
    names: HashMap<String, Answer>,
    /// A queries answered per name (drives `Answer::Alternating`).
    a_answered: HashMap<String, usize>,
    /// Queries seen per name.
    asked: HashMap<String, usize>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    pub queries: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let mut s = DnsServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            zone: Arc::default(),
            queries: Arc::default(),
            task: None,
        };
        s.bind().await;
        s
    }

    async fn bind(&mut self) {
        let sock = UdpSocket::bind(self.addr).await.expect("bind DNS");
        self.addr = sock.local_addr().unwrap();
        let zone = Arc::clone(&self.zone);
        let queries = Arc::clone(&self.queries);
        self.task = Some(tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                queries.fetch_add(1, Ordering::SeqCst);
                if let Some(query) = q.queries.first() {
                    let name = key(&query.name().to_string());
                    *zone.lock().unwrap().asked.entry(name).or_default() += 1;
                }
                let Some(reply) = answer(&zone, &q) else {
                    continue;
                };
                if let Ok(bytes) = reply.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        }));
    }

    /// Sets how `name` is answered from now on.
    pub fn set(&self, name: &str, a: Answer) {
        self.zone.lock().unwrap().names.insert(key(name), a);
    }

    pub fn set_ips(&self, name: &str, ips: &[IpAddr]) {
        self.set(name, Answer::Records(ips.to_vec()));
    }

    /// How many queries (any record type) asked for `name`.
    pub fn queries_for(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .asked
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }

    /// Stops answering: the port is closed.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        self.stop();
        // The aborted task drops its socket asynchronously; retry the bind briefly.
        for _ in 0..100 {
            if UdpSocket::bind(self.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.bind().await;
    }
}

/// The reply to `q`; `None` to stay silent.
fn answer(zone: &Mutex<Zone>, q: &Message) -> Option<Message> {
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.authoritative = true;
    let Some(query) = q.queries.first() else {
        r.metadata.response_code = ResponseCode::FormErr;
        return Some(r);
    };
    r.add_query(query.clone());
    let name = query.name().clone();
    let mode = {
        let mut z = zone.lock().unwrap();
        let k = key(&name.to_ascii());
        let mode = z.names.get(&k).cloned().unwrap_or(Answer::NxDomain);
        match mode {
            Answer::Alternating(sets) if !sets.is_empty() => {
                let n = z.a_answered.entry(k).or_default();
                let set = sets[*n % sets.len()].clone();
                if query.query_type() == RecordType::A {
                    *n += 1;
                }
                Answer::Records(set)
            }
            other => other,
        }
    };
    match mode {
        Answer::NxDomain => r.metadata.response_code = ResponseCode::NXDomain,
        Answer::ServFail => r.metadata.response_code = ResponseCode::ServFail,
        Answer::Refused => r.metadata.response_code = ResponseCode::Refused,
        Answer::Silent => return None,
        Answer::Alternating(_) => {}
        Answer::Records(ips) => {
            for ip in ips {
                let rdata = match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                r.add_answer(Record::from_rdata(name.clone(), 0, rdata));
            }
        }
    }
    Some(r)
}
