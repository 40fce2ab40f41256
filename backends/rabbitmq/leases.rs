//! The bus's lease table: every delivered, unacked message this process holds, with the moment its
//! lease ends.
//!
//! RabbitMQ requeues an unacked message when the channel or connection holding it dies, but it
//! has no notion of a lease for a consumer that is alive and merely stuck (its only timer,
//! `consumer_timeout`, closes the whole channel after 30 minutes by default). The backend
//! therefore keeps the lease itself: a reaper task takes expired entries out of this table and
//! hands the message back (republished with its delivery count, then acked). The table is also
//! what makes `ack`/`nack`/`extend` of an ended lease a harmless no-op: once an entry is gone,
//! nothing can act on its delivery tag twice (a second ack of one tag would close the channel).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use lapin::Acker;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::{Priority, QueueName};

/// A leased message as this process received it, enough to publish it again.
#[derive(Clone, Debug)]
pub(crate) struct HeldMessage {
    pub(crate) message_id: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) priority: Priority,
    /// Deliveries so far, this one included.
    pub(crate) deliveries: u32,
}

/// One lease.
pub(crate) struct LeaseEntry {
    pub(crate) queue: QueueName,
    /// Acks (or rejects) this delivery on the channel that received it. Poisoned by lapin when
    /// that channel dies, in which case the broker has already requeued the message.
    pub(crate) acker: Acker,
    pub(crate) deadline: Instant,
    pub(crate) message: HeldMessage,
}

#[derive(Default)]
struct State {
    entries: HashMap<u64, LeaseEntry>,
    by_deadline: BTreeSet<(Instant, u64)>,
    per_queue: HashMap<QueueName, u64>,
    next_id: u64,
}

impl State {
    fn forget(&mut self, id: u64) -> Option<LeaseEntry> {
        let entry = self.entries.remove(&id)?;
        self.by_deadline.remove(&(entry.deadline, id));
        if let Some(n) = self.per_queue.get_mut(&entry.queue) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_queue.remove(&entry.queue);
            }
        }
        Some(entry)
    }
}

/// Leases held by one bus instance.
#[derive(Default)]
pub(crate) struct LeaseTable {
    state: Mutex<State>,
    wake: Notify,
}

impl LeaseTable {
    /// Records a lease; returns its id (part of the delivery's receipt).
    pub(crate) fn insert(&self, entry: LeaseEntry) -> u64 {
        let mut st = self.state.lock();
        st.next_id += 1;
        let id = st.next_id;
        let earliest = st
            .by_deadline
            .first()
            .is_none_or(|(d, _)| entry.deadline < *d);
        st.by_deadline.insert((entry.deadline, id));
        *st.per_queue.entry(entry.queue.clone()).or_default() += 1;
        st.entries.insert(id, entry);
        drop(st);
        if earliest {
            self.wake.notify_one();
        }
        id
    }

    /// Ends a lease (ack, nack, dead letter): whoever takes the entry owns the delivery tag.
    pub(crate) fn take(&self, id: u64) -> Option<LeaseEntry> {
        self.state.lock().forget(id)
    }

    /// Puts back an entry taken by [`LeaseTable::take`] when acting on it failed.
    pub(crate) fn restore(&self, entry: LeaseEntry) -> u64 {
        self.insert(entry)
    }

    /// Moves a lease's end to `deadline`; `false` when the lease already ended (or its channel
    /// died, which requeued the message).
    pub(crate) fn extend(&self, id: u64, deadline: Instant) -> bool {
        let mut st = self.state.lock();
        let Some(entry) = st.entries.get_mut(&id) else {
            return false;
        };
        if !entry.acker.usable() {
            st.forget(id);
            return false;
        }
        let old = std::mem::replace(&mut entry.deadline, deadline);
        st.by_deadline.remove(&(old, id));
        st.by_deadline.insert((deadline, id));
        true
    }

    /// Leases of `queue` held now (entries whose channel died are dropped on the way: the broker
    /// has already made those messages ready again).
    pub(crate) fn in_flight(&self, queue: &QueueName) -> u64 {
        let mut st = self.state.lock();
        let dead: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| &e.queue == queue && !e.acker.usable())
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            st.forget(id);
        }
        st.per_queue.get(queue).copied().unwrap_or(0)
    }

    /// Takes every lease that ended at or before `now`.
    pub(crate) fn take_expired(&self, now: Instant) -> Vec<LeaseEntry> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = st.by_deadline.first() {
            if deadline > now {
                break;
            }
            if let Some(e) = st.forget(id) {
                out.push(e);
            }
        }
        out
    }

    /// Waits until the earliest lease may have ended (or a new, earlier lease was added), at
    /// most `cap`.
    pub(crate) async fn wait_for_expiry(&self, cap: Duration) {
        let notified = self.wake.notified();
        let next = self.state.lock().by_deadline.first().map(|(d, _)| *d);
        let until = next.map_or(Instant::now() + cap, |d| d.min(Instant::now() + cap));
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}
