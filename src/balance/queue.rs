//! One pool's queue: its waiters in arrival order, grouped by the pods they have already tried.
//!
//! Why the groups: when a slot frees, the ledger hands it to the oldest waiter that may use it.
//! A retry after a failed connect may not use the pods it tried, so with a plain arrival-order
//! list the ledger had to walk past every waiter that excludes the freed pod, under its lock:
//! 137 µs per release at 1,000 such waiters, 1.45 ms at 10,000. Waiters that tried the same
//! pods can use the same pods, so the oldest of each group answers for the whole group: a
//! dispatch asks one waiter per group, and there are few groups (most waiters tried nothing;
//! retries tried one pod or a few).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

struct Entry<W> {
    /// The group's key: the pods it tried, sorted, without repeats.
    tried: Vec<SocketAddr>,
    waiter: W,
}

/// Waiters of type `W` keyed by their arrival number (lower is older).
pub(super) struct Queue<W> {
    by_seq: BTreeMap<u64, Entry<W>>,
    by_tried: HashMap<Vec<SocketAddr>, BTreeSet<u64>>,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Queue {
            by_seq: BTreeMap::new(),
            by_tried: HashMap::new(),
        }
    }
}

impl<W> Queue<W> {
    pub(super) fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        self.by_seq.contains_key(&seq)
    }

    /// Queues `waiter` as number `seq`, a waiter that may not use the pods in `tried`. A
    /// number already queued is replaced.
    pub(super) fn insert(&mut self, seq: u64, tried: &[SocketAddr], waiter: W) {
        self.remove(seq);
        let mut tried = tried.to_vec();
        tried.sort_unstable();
        tried.dedup();
        self.by_tried.entry(tried.clone()).or_default().insert(seq);
        self.by_seq.insert(seq, Entry { tried, waiter });
    }

    pub(super) fn remove(&mut self, seq: u64) -> Option<W> {
        let entry = self.by_seq.remove(&seq)?;
        if let Some(group) = self.by_tried.get_mut(&entry.tried) {
            group.remove(&seq);
            if group.is_empty() {
                self.by_tried.remove(&entry.tried);
            }
        }
        Some(entry.waiter)
    }

    /// The oldest waiter.
    pub(super) fn oldest(&self) -> Option<&W> {
        self.by_seq.values().next().map(|e| &e.waiter)
    }

    /// Each group's tried pods and its oldest waiter's number, in no particular order.
    pub(super) fn groups(&self) -> impl Iterator<Item = (&[SocketAddr], u64)> {
        self.by_tried
            .iter()
            .filter_map(|(tried, seqs)| Some((tried.as_slice(), *seqs.first()?)))
    }

    /// Takes out every waiter of the groups whose tried pods `refuse` names, oldest first.
    pub(super) fn take_groups(&mut self, refuse: impl Fn(&[SocketAddr]) -> bool) -> Vec<W> {
        let keys: Vec<Vec<SocketAddr>> = self
            .by_tried
            .keys()
            .filter(|tried| refuse(tried))
            .cloned()
            .collect();
        let mut seqs: Vec<u64> = keys
            .iter()
            .filter_map(|k| self.by_tried.remove(k))
            .flatten()
            .collect();
        seqs.sort_unstable();
        seqs.iter()
            .filter_map(|seq| self.by_seq.remove(seq))
            .map(|e| e.waiter)
            .collect()
    }

    /// Takes out every waiter, oldest first.
    pub(super) fn take_all(&mut self) -> Vec<W> {
        self.by_tried.clear();
        std::mem::take(&mut self.by_seq)
            .into_values()
            .map(|e| e.waiter)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 1, i], 8080))
    }

    #[test]
    fn each_group_answers_with_its_oldest_waiter() {
        let mut q = Queue::default();
        q.insert(5, &[], "a");
        q.insert(3, &[pod(2), pod(1)], "b");
        q.insert(4, &[pod(1), pod(2), pod(1)], "c");
        q.insert(9, &[pod(1)], "d");
        let mut groups: Vec<(Vec<SocketAddr>, u64)> =
            q.groups().map(|(t, s)| (t.to_vec(), s)).collect();
        groups.sort();
        // The two orders of pods 1 and 2 (and the repeat) are one group, whose oldest is 3.
        assert_eq!(
            groups,
            vec![(vec![], 5), (vec![pod(1)], 9), (vec![pod(1), pod(2)], 3)]
        );
        assert_eq!((q.len(), q.oldest()), (4, Some(&"b")));
        assert_eq!(q.remove(3), Some("b"));
        assert!(q.groups().any(|(t, s)| t == [pod(1), pod(2)] && s == 4));
        assert_eq!(q.remove(4), Some("c"));
        // An emptied group is gone, not left behind with no oldest.
        assert_eq!(q.groups().count(), 2);
        assert_eq!(q.remove(4), None);
        assert!(q.contains(9) && !q.contains(4));
    }

    #[test]
    fn groups_are_taken_out_whole_and_in_arrival_order() {
        let mut q = Queue::default();
        for (seq, tried) in [
            (1, vec![pod(1)]),
            (2, vec![]),
            (3, vec![pod(1)]),
            (4, vec![pod(2)]),
        ] {
            q.insert(seq, &tried, seq);
        }
        assert_eq!(q.take_groups(|t| !t.is_empty()), vec![1, 3, 4]);
        assert_eq!((q.len(), q.groups().count()), (1, 1));
        q.insert(7, &[pod(3)], 7);
        q.insert(2, &[pod(3)], 20);
        // Re-inserting a number replaces its waiter and moves it to its new group.
        assert_eq!(q.groups().count(), 1);
        assert_eq!(q.take_all(), vec![20, 7]);
        assert_eq!((q.len(), q.groups().count(), q.oldest()), (0, 0, None));
    }
}
