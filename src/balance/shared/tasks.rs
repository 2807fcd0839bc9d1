//! The background tasks of an agent's ledger client: the keep-alive (renews leases, retries
//! releases, probes Redis while it is unreachable, asks which waiters were granted) and the
//! grant listener (this agent's pub/sub channel), and how a grant reaches its waiting request.

use super::*;

/// While Redis is unreachable, how often the agent tries it again (and how soon its pub/sub
/// connection is re-made after a drop, which is how a restart is noticed).
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(100);

/// The longest between two keep-alives, whatever `lease_ttl`: the keep-alive also makes up for
/// a grant whose pub/sub message was lost, so it bounds that rare extra wait.
pub(super) const MAX_KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

impl Drop for RedisLedger {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// Renews leases every `keepalive_every`, or probes Redis every [`PROBE_EVERY`] while it is
/// unreachable. Holds the ledger only while working, so dropping the last `Arc` ends it.
pub(super) async fn keepalive_task(weak: Weak<RedisLedger>, kick: Arc<Notify>) {
    loop {
        let wait = match weak.upgrade() {
            Some(me) if *me.reachable.borrow() => me.keepalive_every,
            Some(_) => PROBE_EVERY,
            None => return,
        };
        tokio::select! {
            _ = sleep(wait) => {}
            _ = kick.notified() => {}
        }
        let Some(me) = weak.upgrade() else { return };
        if me.stopped.load(Ordering::Relaxed) {
            return;
        }
        if !*me.reachable.borrow() {
            let mut conn = me.conn.clone();
            let ping = redis::cmd("PING");
            match timeout(me.opts.io_timeout, ping.query_async::<String>(&mut conn)).await {
                Ok(Ok(_)) => {
                    if let Err(e) = me.back().await {
                        me.errors.fetch_add(1, Ordering::Relaxed);
                        log::debug!("redis ledger: still unreachable: {e}");
                        continue;
                    }
                }
                _ => continue,
            }
        }
        if let Err(e) = me.keepalive_round().await {
            me.lost(&e);
        }
    }
}

/// Listens on this agent's grant channel; re-subscribes after a drop and then kicks a
/// keep-alive, which finds the grants published while nobody listened.
pub(super) async fn grants_task(weak: Weak<RedisLedger>) {
    loop {
        let Some(me) = weak.upgrade() else { return };
        let client = me.client.clone();
        let channel = format!("lb:grant:{}", me.agent);
        let io_timeout = me.opts.io_timeout;
        let kick = Arc::clone(&me.kick);
        drop(me);
        let subscribed = timeout(io_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let Ok(Ok(pubsub)) = subscribed else {
            sleep(PROBE_EVERY).await;
            continue;
        };
        kick.notify_one();
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Some(me) = weak.upgrade() else { return };
            if let Ok(payload) = msg.get_payload::<String>() {
                me.on_grant(&payload);
            }
        }
        // The connection dropped (Redis restarted?): let the keep-alive find out now.
        kick.notify_one();
        sleep(PROBE_EVERY).await;
    }
}

impl RedisLedger {
    /// Renews this agent in every queue it knows, and picks up grants whose message was lost.
    pub(super) async fn keepalive_round(&self) -> Result<(), RedisError> {
        let failed = std::mem::take(&mut lock(&self.state).failed_leaves);
        for (i, (queue, n)) in failed.iter().enumerate() {
            if let Err(e) = self.leave(queue, *n).await {
                lock(&self.state)
                    .failed_leaves
                    .extend(failed[i..].iter().cloned());
                return Err(e);
            }
        }
        let queues: Vec<String> = lock(&self.state).queues.keys().cloned().collect();
        for queue in queues {
            self.keepalive_queue(&queue).await?;
        }
        Ok(())
    }

    pub(super) async fn keepalive_queue(&self, queue: &str) -> Result<(), RedisError> {
        let epoch = self.ready(queue).await?;
        let (known, view) = self.call_view(queue);
        let mut args = vec![
            epoch,
            self.agent.clone(),
            self.opts.lease_ttl.as_millis().to_string(),
            flag(known),
            view.clone(),
        ];
        {
            let st = lock(&self.state);
            for (n, entry) in &st.entries {
                if entry.queue == queue && matches!(entry.slot, Slot::Waiting { .. }) {
                    args.push(self.wire_id(*n));
                }
            }
        }
        let v = self.eval(&self.scripts.keepalive, queue, &args).await?;
        let items = array(v).ok_or_else(|| reply_error("keepalive"))?;
        match items.first().and_then(string).as_deref() {
            Some("ok") => {}
            Some("epoch") => {
                self.invalidate(queue);
                self.kick.notify_one();
                return Ok(());
            }
            Some("reaped") => {
                self.reaped(queue);
                self.kick.notify_one();
                return Ok(());
            }
            _ => return Err(reply_error("keepalive")),
        }
        self.sent(queue, view);
        let hold_ms = items.get(1).and_then(int).unwrap_or(0);
        let status = QueueStatus {
            waiting: items.get(2).and_then(int).unwrap_or(0),
            leases_expired: items.get(3).and_then(int).unwrap_or(0),
            inflight: items.get(4).map(parse_counts).unwrap_or_default(),
            // Asked for by `/status` only (peek), not at every keep-alive.
            oldest_wait: None,
        };
        {
            let mut st = lock(&self.state);
            if let Some(peers) = items.get(6).and_then(parse_peers) {
                st.peers = peers;
            }
            if let Some(q) = st.queues.get_mut(queue) {
                q.status = status;
            }
        }
        if let Some(granted) = items.get(5) {
            self.deliver_pairs(granted);
        }
        if hold_ms > 0 {
            self.kick_after(Duration::from_millis(hold_ms));
        }
        Ok(())
    }

    /// A grant for waiter `n` (from the acquire reply, pub/sub or a keep-alive).
    pub(super) fn deliver(&self, n: u64, addr: SocketAddr) {
        let mut st = lock(&self.state);
        if let Some(entry) = st.entries.get_mut(&n) {
            if let Slot::Waiting { wake, .. } = &mut entry.slot {
                let wake = wake.take();
                entry.slot = Slot::Leased(addr);
                if let Some(wake) = wake {
                    let _ = wake.send(addr);
                }
            }
        }
        // Unknown: the request left meanwhile; its leave (sent after) gives the slot back.
    }

    pub(super) fn deliver_pairs(&self, pairs: &Value) {
        let Value::Array(items) = pairs else { return };
        for pair in items.chunks(2) {
            if let [id, addr] = pair {
                if let (Some(n), Some(addr)) = (
                    string(id).and_then(|id| self.parse_id(&id)),
                    string(addr).and_then(|a| a.parse().ok()),
                ) {
                    self.deliver(n, addr);
                }
            }
        }
    }

    pub(super) fn on_grant(&self, payload: &str) {
        let mut words = payload.split(' ');
        if let (Some(Some(n)), Some(Ok(addr))) = (
            words.next().map(|id| self.parse_id(id)),
            words.next().map(str::parse::<SocketAddr>),
        ) {
            self.deliver(n, addr);
        }
    }

    /// Kicks the keep-alive after `d` (the end of a recovery hold: somebody must pump then).
    pub(super) fn kick_after(&self, d: Duration) {
        let at = Instant::now() + d + Duration::from_millis(5);
        {
            let mut st = lock(&self.state);
            if st.hold_kick.is_some_and(|k| k > Instant::now() && k <= at) {
                return;
            }
            st.hold_kick = Some(at);
        }
        let kick = Arc::clone(&self.kick);
        self.runtime.spawn(async move {
            sleep_until(at).await;
            kick.notify_one();
        });
    }
}
