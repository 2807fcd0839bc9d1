//! Asynchronous jobs in the shared ledger: a lease marked as a job's outlives its request and
//! its agent; any agent of the pool can adopt an orphaned hold, or end a hold by the job's id.

use super::*;

/// How long a job reported done before its hold was known is remembered (a `202` slower than
/// the job itself).
pub(super) const JOB_DONE_MEMORY: Duration = Duration::from_secs(600);

impl Lease {
    /// The lease's request started asynchronous job `record`: the lease is the job's from now
    /// on, in Redis too, where it outlives this agent (another agent of the pool adopts it if
    /// this one vanishes). `Done`: the job was reported done before (at another agent); the
    /// caller releases the lease.
    pub fn hold_job(
        &self,
        record: &JobRecord,
    ) -> impl std::future::Future<Output = Result<JobHold, LedgerError>> + Send + 'static {
        let wire = record.encode();
        if let Some(e) = lock(&self.ledger.state).entries.get_mut(&self.n) {
            e.job = Some(wire.clone());
        }
        let (ledger, queue) = (Arc::clone(&self.ledger), self.queue.clone());
        let args = [ledger.wire_id(self.n), wire];
        async move {
            let v = ledger
                .eval(&ledger.scripts.job_hold, &queue, &args)
                .await
                .map_err(LedgerError::Redis)?;
            Ok(match string(&v).as_deref() {
                Some("done") => JobHold::Done,
                Some("held") => JobHold::Held,
                // Not in this ledger now (an epoch change): the re-assertion brings it, record
                // and all.
                _ => JobHold::Later,
            })
        }
    }
}

/// An asynchronous job, as the shared ledger keeps it with the lease it holds: enough for any
/// agent of the pool to go on asking the pod about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub job: u128,
    /// When `max_duration` ends the hold, in Unix milliseconds.
    pub deadline_unix_ms: u64,
    /// The route (its `uri`) that accepted the job: its `async` settings apply.
    pub route: String,
    /// The job's status path on the pod, if the pod's answer named one.
    pub path: Option<String>,
}

/// What [`Lease::hold_job`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobHold {
    Held,
    /// Reported done before its hold was known: release the lease.
    Done,
    /// The lease is not in the ledger now (it restarted): held once this agent re-asserts.
    Later,
}

impl RedisLedger {
    /// Ends the hold of asynchronous job `job` of `queue`, whichever agent holds it (a
    /// callback, a cancel or a final status answer can reach any agent): the pool it was held
    /// in. `None`: no lease holds it; it is then remembered as done for a while, so that a
    /// hold still on its way (the `202` not yet passed on) does not start.
    pub async fn end_job(&self, queue: &str, job: u128) -> Result<Option<String>, LedgerError> {
        let args = [
            format!("{job:032x}"),
            self.tombstone_ms(),
            JOB_DONE_MEMORY.as_millis().to_string(),
        ];
        let v = self
            .eval(&self.scripts.job_end, queue, &args)
            .await
            .map_err(LedgerError::Redis)?;
        let items = array(v).ok_or_else(|| LedgerError::Reply("job_end".into()))?;
        Ok(match items.first().and_then(string).as_deref() {
            Some("ended") => items.get(1).and_then(string),
            _ => None,
        })
    }

    /// Takes over up to `max` job holds of `queue` whose agent vanished: each becomes a lease
    /// of this agent (the pod's count never changed), to be checked and ended here.
    pub async fn adopt_jobs(
        self: &Arc<Self>,
        queue: &str,
        max: usize,
    ) -> Result<Vec<(Lease, JobRecord)>, LedgerError> {
        let epoch = self.ready(queue).await.map_err(LedgerError::Redis)?;
        let (known, _) = self.call_view(queue);
        // The ids are reserved, as placeholders, before the call: a re-assertion meanwhile
        // keeps what the call adopts, and if the reply is lost the next call asks about them.
        let (first, earlier) = {
            let mut st = lock(&self.state);
            let first = st.next_id;
            st.next_id += max as u64;
            let earlier: Vec<u64> = st
                .entries
                .iter()
                .filter(|(_, e)| e.queue == queue && matches!(e.slot, Slot::Adopting))
                .map(|(n, _)| *n)
                .collect();
            for n in first..first + max as u64 {
                st.entries.insert(
                    n,
                    Entry {
                        queue: queue.to_string(),
                        slot: Slot::Adopting,
                        job: None,
                    },
                );
            }
            (first, earlier)
        };
        let mut args = vec![
            epoch,
            self.agent.clone(),
            self.opts.lease_ttl.as_millis().to_string(),
            flag(known),
            first.to_string(),
            max.to_string(),
            self.tombstone_ms(),
        ];
        args.extend(earlier.iter().map(u64::to_string));
        let this_round = first..first + max as u64;
        let v = match self.eval(&self.scripts.job_adopt, queue, &args).await {
            Ok(v) => v,
            Err(e) => {
                // The placeholders stay: the next call asks about them.
                self.lost(&e);
                return Err(LedgerError::Redis(e));
            }
        };
        let items = array(v).ok_or_else(|| LedgerError::Reply("job_adopt".into()))?;
        let outcome = items.first().and_then(string);
        if outcome.as_deref() != Some("ok") {
            // Nothing was written by this call.
            lock(&self.state)
                .entries
                .retain(|n, _| !this_round.contains(n));
            match outcome.as_deref() {
                Some("epoch") => self.invalidate(queue),
                Some("reaped") => self.reaped(queue),
                _ => return Err(LedgerError::Reply("job_adopt".into())),
            }
            return Ok(Vec::new());
        }
        let flat = items.get(1).cloned().and_then(array).unwrap_or_default();
        let (mut adopted, mut unreadable) = (Vec::new(), Vec::new());
        let mut st = lock(&self.state);
        for c in flat.chunks(3) {
            let [n, addr, rec] = c else { continue };
            let (Some(n), Some(addr), Some(rec)) = (
                int(n),
                string(addr).and_then(|a| a.parse::<SocketAddr>().ok()),
                string(rec),
            ) else {
                continue;
            };
            let Some(entry) = st.entries.get_mut(&n) else {
                continue;
            };
            entry.slot = Slot::Leased(addr);
            entry.job = Some(rec.clone());
            match JobRecord::decode(&rec) {
                Some(record) => adopted.push((n, addr, record)),
                None => {
                    // Our own format: only a corrupted ledger gets here. Without a record
                    // nobody could end the hold; it is given back instead.
                    log::error!(
                        "redis ledger: an orphaned job's record does not read ({rec:?}); its slot on {addr} is given back"
                    );
                    unreadable.push((n, addr));
                }
            }
        }
        // The call answered for every placeholder: those it did not name hold nothing.
        st.entries
            .retain(|_, e| !(e.queue == queue && matches!(e.slot, Slot::Adopting)));
        drop(st);
        for (n, addr) in unreadable {
            drop(self.lease(queue, n, addr));
        }
        Ok(adopted
            .into_iter()
            .map(|(n, addr, record)| (self.lease(queue, n, addr), record))
            .collect())
    }
}
