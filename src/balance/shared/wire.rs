//! The wire format: the Lua scripts (each one `common.lua` plus its own part), how a call is
//! made (EVALSHA under the one ledger key, with its round trip sampled), and how views, ids,
//! job records and replies are written and read. The key layout itself is in `common.lua`.

use super::*;

/// Round-trip samples kept between two [`RedisLedger::take_round_trips`] calls; older ones are
/// dropped so an unread buffer cannot grow without bound.
pub(super) const ROUND_TRIP_SAMPLES: usize = 8192;

/// The scripts, each made of `common.lua` (keys, helpers, reap, pump) and its own part.
pub(super) struct Scripts {
    pub(super) ensure: Script,
    pub(super) acquire: Script,
    pub(super) leave: Script,
    pub(super) keepalive: Script,
    pub(super) reassert: Script,
    pub(super) peek: Script,
    pub(super) job_hold: Script,
    pub(super) job_end: Script,
    pub(super) job_adopt: Script,
}

macro_rules! script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("scripts/common.lua"),
            include_str!(concat!("scripts/", $file))
        ))
    };
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            ensure: script!("ensure.lua"),
            acquire: script!("acquire.lua"),
            leave: script!("leave.lua"),
            keepalive: script!("keepalive.lua"),
            reassert: script!("reassert.lua"),
            peek: script!("peek.lua"),
            job_hold: script!("job_hold.lua"),
            job_end: script!("job_end.lua"),
            job_adopt: script!("job_adopt.lua"),
        }
    }
}

impl JobRecord {
    /// `<job hex, 32 digits> <deadline> <route>\n<path>`: the Lua side reads the first 32
    /// characters only.
    pub(super) fn encode(&self) -> String {
        format!(
            "{:032x} {} {}\n{}",
            self.job,
            self.deadline_unix_ms,
            self.route,
            self.path.as_deref().unwrap_or("")
        )
    }

    pub(super) fn decode(s: &str) -> Option<JobRecord> {
        let (head, path) = s.split_once('\n')?;
        let mut parts = head.splitn(3, ' ');
        let job = u128::from_str_radix(parts.next()?, 16).ok()?;
        let deadline_unix_ms = parts.next()?.parse().ok()?;
        let route = parts.next()?.to_string();
        Some(JobRecord {
            job,
            deadline_unix_ms,
            route,
            path: (!path.is_empty()).then(|| path.to_string()),
        })
    }
}

/// A script's reply to an agent's call.
pub(super) enum Reply {
    Granted(SocketAddr),
    Queued {
        stamp: u64,
        hold_ms: u64,
    },
    Full,
    /// The queue's epoch is not the one the agent named: re-assert first.
    Epoch,
    /// The agent was reaped while alive: re-assert.
    Reaped,
}

/// Every key of the ledger, whatever the pool, has this prefix: a pod reached by several pools
/// has one count, and the queue is one across pools. The braces make it one Redis Cluster hash
/// slot (a script may only touch keys of one slot).
pub(super) const LEDGER_PREFIX: &str = "lb:{ledger}:";

/// `<version>;<addr>=<limit>,…`: the Lua side keeps the version apart and writes a view only
/// if it is not older than the one it has (`set_view` in common.lua).
pub(super) fn encode_view(view: &AgentView) -> String {
    let mut s = format!("{};", view.version);
    for (i, (addr, limit)) in view.pods.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{addr}={limit}");
    }
    s
}

pub(super) fn join_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

pub(super) fn reply_error(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Client,
        "unexpected ledger script reply",
        what.to_string(),
    ))
}

pub(super) fn parse_reply(v: Value) -> Result<Reply, RedisError> {
    let items = array(v).ok_or_else(|| reply_error("acquire"))?;
    let kind = items.first().and_then(string);
    Ok(match kind.as_deref() {
        Some("granted") => Reply::Granted(
            items
                .get(1)
                .and_then(string)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| reply_error("acquire: address"))?,
        ),
        Some("queued") => Reply::Queued {
            stamp: items.get(1).and_then(int).unwrap_or(0),
            hold_ms: items.get(2).and_then(int).unwrap_or(0),
        },
        Some("full") => Reply::Full,
        Some("epoch") => Reply::Epoch,
        Some("reaped") => Reply::Reaped,
        _ => return Err(reply_error("acquire")),
    })
}

/// A field of an `INFO` answer (`name:value` lines).
pub(super) fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// `{reg, ttl_ms, ...}` from a script into pairs.
pub(super) fn parse_peers(v: &Value) -> Option<Vec<(String, String)>> {
    let Value::Array(items) = v else { return None };
    Some(
        items
            .chunks(2)
            .filter_map(|pair| match pair {
                [reg, ttl] => Some((string(reg)?, int(ttl)?.to_string())),
                _ => None,
            })
            .collect(),
    )
}

pub(super) fn parse_counts(v: &Value) -> Vec<(SocketAddr, u32)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut counts: Vec<(SocketAddr, u32)> = items
        .chunks(2)
        .filter_map(|pair| match pair {
            [addr, n] => Some((string(addr)?.parse().ok()?, u32::try_from(int(n)?).ok()?)),
            _ => None,
        })
        .collect();
    counts.sort();
    counts
}

pub(super) fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

pub(super) fn string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

pub(super) fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => string(v)?.parse().ok(),
    }
}

impl RedisLedger {
    /// (registered?, view argument: "-" when Redis has it already).
    pub(super) fn call_view(&self, queue: &str) -> (bool, String) {
        let st = lock(&self.state);
        match st.queues.get(queue) {
            Some(q) if q.view_sent.as_ref() == Some(&q.view) => (q.known, "-".into()),
            Some(q) => (q.known, q.view.clone()),
            None => (false, String::new()),
        }
    }

    /// A call naming `view` succeeded: Redis has that view and knows the agent.
    pub(super) fn sent(&self, queue: &str, view: String) {
        if let Some(q) = lock(&self.state).queues.get_mut(queue) {
            q.known = true;
            if view != "-" {
                q.view_sent = Some(view);
            }
        }
    }

    pub(super) async fn eval(
        &self,
        script: &Script,
        queue: &str,
        args: &[String],
    ) -> Result<Value, RedisError> {
        let mut call = script.prepare_invoke();
        call.key(LEDGER_PREFIX);
        call.arg(queue);
        for a in args {
            call.arg(a);
        }
        let mut conn = self.conn.clone();
        let start = StdInstant::now();
        let v = call.invoke_async(&mut conn).await?;
        let mut samples = lock(&self.round_trips);
        if samples.len() >= ROUND_TRIP_SAMPLES {
            samples.clear();
        }
        samples.push(start.elapsed());
        Ok(v)
    }

    pub(super) fn wire_id(&self, n: u64) -> String {
        format!("{}#{n}", self.agent)
    }

    pub(super) fn parse_id(&self, id: &str) -> Option<u64> {
        let (agent, n) = id.rsplit_once('#')?;
        if agent != self.agent {
            return None;
        }
        n.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_and_ids_round_trip() {
        let a: SocketAddr = "127.0.1.1:80".parse().unwrap();
        let b: SocketAddr = "127.0.1.2:80".parse().unwrap();
        assert_eq!(
            encode_view(&AgentView::new(vec![(a, 2), (b, 3)], 7)),
            "7;127.0.1.1:80=2,127.0.1.2:80=3"
        );
        assert_eq!(encode_view(&AgentView::default()), "0;");
        assert_eq!(join_addrs(&[a, b]), "127.0.1.1:80,127.0.1.2:80");
    }
}
