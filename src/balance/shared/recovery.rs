//! Epochs and recovery: noticing that Redis restarted or failed over (or reaped this agent),
//! starting or joining the new epoch, re-asserting this agent's leases and waiters with their
//! old arrival stamps, the recovery hold, tombstones, and the unreachable episodes.

use super::*;

/// Default [`LedgerOptions::recovery_hold`]: several times the time an agent needs to notice a
/// restarted Redis (its pub/sub connection is re-made every [`PROBE_EVERY`]) and re-assert.
/// Only an agent that knew of no other replica applies it, and only on a Redis younger than
/// it.
pub const DEFAULT_RECOVERY_HOLD: Duration = Duration::from_secs(2);

/// Shortest time an id released while absent from the ledger is remembered as gone.
pub(super) const TOMBSTONE_MIN: Duration = Duration::from_secs(10);

impl RedisLedger {
    /// The queue's epoch, after (re-)asserting this agent's entries if it changed.
    pub(super) async fn ready(&self, queue: &str) -> Result<String, RedisError> {
        if let Some(e) = self.epoch(queue) {
            return Ok(e);
        }
        let _one = self.recovery.lock().await;
        for _ in 0..3 {
            if let Some(e) = self.epoch(queue) {
                return Ok(e);
            }
            let sid = self.server_id().await?;
            let nonce = format!(
                "{}.{}",
                self.agent,
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let (young, peers) = {
                let st = lock(&self.state);
                // Unknown uptime (INFO refused): as if Redis had just started.
                let up = st.uptime.unwrap_or_default();
                (self.opts.recovery_hold.saturating_sub(up), st.peers.clone())
            };
            let mut args = vec![
                sid,
                nonce,
                young.as_millis().to_string(),
                peers.len().to_string(),
            ];
            for (reg, ttl) in peers {
                args.extend([reg, ttl]);
            }
            let v = self.eval(&self.scripts.ensure, queue, &args).await?;
            let items = array(v).unwrap_or_default();
            let Some(epoch) = items.first().and_then(string) else {
                return Err(reply_error("ensure"));
            };
            if self.reassert(queue, &epoch).await? {
                return Ok(epoch);
            }
        }
        Err(reply_error("the queue's epoch keeps changing"))
    }

    /// Asserts everything this agent holds or waits for in `queue` under `epoch`. False: the
    /// epoch changed meanwhile.
    pub(super) async fn reassert(&self, queue: &str, epoch: &str) -> Result<bool, RedisError> {
        let (args, leases, waiters, view) = {
            let st = lock(&self.state);
            let view = st
                .queues
                .get(queue)
                .map(|q| q.view.clone())
                .unwrap_or_default();
            let mut args = vec![
                epoch.to_string(),
                self.agent.clone(),
                self.opts.lease_ttl.as_millis().to_string(),
                view.clone(),
                // Every id below next_id that is not listed is over (ids are taken under this
                // same lock before their acquire is sent).
                st.next_id.saturating_sub(1).to_string(),
                st.peers.len().to_string(),
            ];
            for (reg, ttl) in &st.peers {
                args.extend([reg.clone(), ttl.clone()]);
            }
            let (mut leases, mut waiters) = (0, 0);
            for (n, entry) in st.entries.iter().filter(|(_, e)| e.queue == queue) {
                match &entry.slot {
                    Slot::Leased(addr) => {
                        leases += 1;
                        args.extend([
                            "L".into(),
                            self.wire_id(*n),
                            addr.to_string(),
                            entry.job.clone().unwrap_or_default(),
                        ]);
                    }
                    Slot::Waiting { stamp: 0, .. } | Slot::Adopting => {
                        args.extend(["K".into(), self.wire_id(*n), "".into(), "".into()]);
                    }
                    Slot::Waiting { stamp, tried, .. } => {
                        waiters += 1;
                        args.extend([
                            "W".into(),
                            self.wire_id(*n),
                            stamp.to_string(),
                            tried.clone(),
                        ]);
                    }
                }
            }
            (args, leases, waiters, view)
        };
        if self.stopped.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let v = self.eval(&self.scripts.reassert, queue, &args).await?;
        let items = array(v).ok_or_else(|| reply_error("reassert"))?;
        match items.first().and_then(string).as_deref() {
            Some("ok") => {}
            Some("epoch") => return Ok(false),
            _ => return Err(reply_error("reassert")),
        }
        let hold_ms = items.get(1).and_then(int).unwrap_or(0);
        let over = items.get(3).and_then(int).unwrap_or(0);
        if over > 0 {
            self.reasserted_over_limit
                .fetch_add(over, Ordering::Relaxed);
            log::error!(
                "redis ledger: queue {queue}: {over} re-asserted leases put their pod above its \
                 limit (a slot was granted before this agent re-asserted)"
            );
        }
        {
            let mut st = lock(&self.state);
            if let Some(peers) = items.get(4).and_then(parse_peers) {
                st.peers = peers;
            }
            let q = st.queues.entry(queue.to_string()).or_default();
            let changed = q.last_epoch.as_deref().is_some_and(|last| last != epoch);
            q.epoch = Some(epoch.to_string());
            q.last_epoch = Some(epoch.to_string());
            q.known = true;
            q.view_sent = Some(view);
            if changed {
                self.epoch_changes.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "redis ledger: queue {queue} has a new epoch (Redis restarted or failed \
                     over); re-asserted {leases} leases and {waiters} waiting requests"
                );
            }
        }
        if let Some(granted) = items.get(2) {
            self.deliver_pairs(granted);
        }
        if hold_ms > 0 {
            self.kick_after(Duration::from_millis(hold_ms));
        }
        Ok(true)
    }

    /// How long a released id is remembered as gone, in ms (the scripts' `tombstone_ms`): long
    /// enough to outlast any re-assertion in flight that still lists the id (a few round
    /// trips, each bounded by the io timeout).
    pub(super) fn tombstone_ms(&self) -> String {
        self.opts
            .lease_ttl
            .max(TOMBSTONE_MIN)
            .as_millis()
            .to_string()
    }

    pub(super) fn epoch(&self, queue: &str) -> Option<String> {
        lock(&self.state)
            .queues
            .get(queue)
            .and_then(|q| q.epoch.clone())
    }

    pub(super) fn invalidate(&self, queue: &str) {
        if let Some(q) = lock(&self.state).queues.get_mut(queue) {
            q.epoch = None;
            q.known = false;
        }
    }

    pub(super) fn reaped(&self, queue: &str) {
        self.reaped_while_alive.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "redis ledger: this agent's entries in queue {queue} expired while it was alive \
             (no keep-alive got through for {:?}); re-asserting them",
            self.opts.lease_ttl
        );
        self.invalidate(queue);
    }

    pub(super) async fn wait_reachable(&self, deadline: Instant) -> bool {
        let mut rx = self.reachable.subscribe();
        tokio::select! {
            r = rx.wait_for(|up| *up) => r.is_ok(),
            _ = sleep_until(deadline) => false,
        }
    }

    /// A Redis call failed: count it; the first failure of an episode logs and marks Redis
    /// unreachable, which holds new calls until the keep-alive task gets through again.
    pub(super) fn lost(&self, e: &RedisError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self
            .reachable
            .send_if_modified(|up| std::mem::replace(up, false))
        {
            self.unreachable_episodes.fetch_add(1, Ordering::Relaxed);
            lock(&self.state).unreachable_since = Some(StdInstant::now());
            log::warn!(
                "redis ledger unreachable ({e}): requests wait in their queue until it is back \
                 or they time out; requests on pods run on"
            );
            self.kick.notify_one();
        }
    }

    /// Redis answers again: look for a server change, then let requests through.
    pub(super) async fn back(&self) -> Result<(), RedisError> {
        let sid = self.server_id().await?;
        let since = {
            let mut st = lock(&self.state);
            if st.server.as_ref().is_some_and(|old| *old != sid) {
                for q in st.queues.values_mut() {
                    q.epoch = None;
                    q.known = false;
                }
            }
            st.server = Some(sid);
            st.unreachable_since.take()
        };
        self.reachable.send_replace(true);
        log::info!(
            "redis ledger reachable again{}",
            since
                .map(|s| format!(" after {:?}", s.elapsed()))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Redis's `run_id`: changes with a restart or a failover. A server that refuses `INFO`
    /// (some managed offerings restrict it) gets "-": a restart is still seen by its missing
    /// epoch, a failover to a replica then only by the dropped connections.
    pub(super) async fn server_id(&self) -> Result<String, RedisError> {
        let mut conn = self.conn.clone();
        let info = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut conn)
            .await;
        let (sid, uptime) = match info {
            Ok(info) => (
                info_field(&info, "run_id")
                    .filter(|s| !s.is_empty() && !s.contains('/'))
                    .unwrap_or_else(|| "-".into()),
                info_field(&info, "uptime_in_seconds")
                    .and_then(|s| s.parse().ok())
                    .map(Duration::from_secs),
            ),
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(e)
            }
            Err(_) => ("-".into(), None),
        };
        let mut st = lock(&self.state);
        st.uptime = uptime;
        if st.server.is_none() {
            st.server = Some(sid.clone());
        }
        Ok(sid)
    }
}
