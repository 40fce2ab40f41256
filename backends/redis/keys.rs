//! Every key and channel name the Redis backend uses, in one place.
//!
//! Everything of a queue `Q` is hash-tagged `{Q}`, so that each script touches one Redis Cluster
//! slot and different queues spread over the cluster's masters (docs/backends/redis.md has the
//! table of keys and slots):
//!
//! * the queue: `{prefix}q:{Q}:ready|delayed|inflight|seq|dead|bodies` and the channel
//!   `{prefix}q:{Q}:wake`;
//! * the indexes of the tasks of `Q`: `{prefix}q:{Q}:status:<STATUS>` (every status but
//!   RUNNING), `{prefix}q:{Q}:leases` (RUNNING, by lease end) and
//!   `{prefix}q:{Q}:dependents:<parent>` (the children of a parent of `Q`, wherever they live);
//! * a task's hash, in one of two layouts ([`Layout`]): `{prefix}task_registry:<id>` (the lab's
//!   key) on a single server, `{prefix}q:{Q}:task:<id>` on a cluster, where the pointer
//!   `{prefix}orchestra:task_queue:<id>` (a STRING: `Q`) finds it by id;
//! * the queues that have tasks: `{prefix}orchestra:queues` (a SET), for the work that spans
//!   queues (counts, the stale-lease scan, listings, retention);
//! * a lock: `{prefix}lock:{<key>}` and its fencing counter `{prefix}lock:{<key>}:fence`;
//! * events: the channel `{prefix}events:<topic>`.
//!
//! The prefix cannot hold a hash tag (the configuration refuses `{`): a tag in the prefix would
//! be the one Redis hashes, and every queue would land in one slot.

use crate::model::{QueueName, TaskId, TaskStatus};

/// Where a task's hash lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One server: `{prefix}task_registry:<id>`, the lab's key, readable by its
    /// `TaskRegistry.get_task` (with the default empty prefix).
    Lab,
    /// A Redis Cluster: `{prefix}q:{Q}:task:<id>`, in its queue's slot, found by id through the
    /// pointer `{prefix}orchestra:task_queue:<id>`.
    Sharded,
}

/// The keys of one work queue, and of the tasks of that queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueKeys {
    /// ZSET of ready message headers (`id:d:p:s`), by priority * 2^49 + sequence.
    pub ready: String,
    /// ZSET of delayed message headers, by due time (ms).
    pub delayed: String,
    /// ZSET of leased message headers, by lease end (ms).
    pub inflight: String,
    /// Counter for message ids and ready sequence numbers.
    pub seq: String,
    /// LIST of dead letters (`id:d:p:dead_at:reason`), newest first.
    pub dead: String,
    /// HASH of message bodies, by message id.
    pub bodies: String,
    /// Pub/sub channel that wakes waiting consumers.
    pub wake: String,
    /// ZSET of the queue's RUNNING tasks by lease end (µs): the RUNNING index.
    pub leases: String,
    /// What the queue's status indexes are named after: `…:status:`.
    pub status_prefix: String,
    /// What the dependents sets of the queue's tasks are named after: `…:dependents:`.
    pub dependents_prefix: String,
    /// What the queue's task hashes are named after (see [`Layout`]).
    pub task_prefix: String,
    /// LIST of purged tasks (`id`, `depends_on` pairs) whose entries in other slots (parents'
    /// dependents sets, id pointers) are still to be removed.
    pub purged: String,
}

impl QueueKeys {
    /// The keys of `queue` under `prefix`, its task hashes in `layout`.
    pub fn new(prefix: &str, layout: Layout, queue: &QueueName) -> Self {
        let base = format!("{prefix}q:{{{queue}}}");
        QueueKeys {
            ready: format!("{base}:ready"),
            delayed: format!("{base}:delayed"),
            inflight: format!("{base}:inflight"),
            seq: format!("{base}:seq"),
            dead: format!("{base}:dead"),
            bodies: format!("{base}:bodies"),
            wake: format!("{base}:wake"),
            leases: format!("{base}:leases"),
            status_prefix: format!("{base}:status:"),
            dependents_prefix: format!("{base}:dependents:"),
            purged: format!("{base}:purged"),
            task_prefix: match layout {
                Layout::Lab => format!("{prefix}task_registry:"),
                Layout::Sharded => format!("{base}:task:"),
            },
        }
    }

    /// The hash of task `id` of this queue.
    pub fn task(&self, id: &TaskId) -> String {
        format!("{}{id}", self.task_prefix)
    }

    /// ZSET of the queue's tasks in `status`, by updated_at (µs); for RUNNING, the lease index
    /// (by lease end), so that a claim and a finish each move a task in one index, not two.
    pub fn status_index(&self, status: TaskStatus) -> String {
        if status == TaskStatus::Running {
            return self.leases.clone();
        }
        format!("{}{}", self.status_prefix, status.as_str())
    }

    /// ZSET of the children of `parent` (a task of this queue), by their created_at (µs).
    pub fn dependents(&self, parent: &TaskId) -> String {
        format!("{}{parent}", self.dependents_prefix)
    }
}

/// SET of the names of the queues that have (had) tasks.
pub(crate) fn queues(prefix: &str) -> String {
    format!("{prefix}orchestra:queues")
}

/// STRING naming the queue of task `id` ([`Layout::Sharded`] only).
pub(crate) fn task_queue(prefix: &str, id: &TaskId) -> String {
    format!("{prefix}orchestra:task_queue:{id}")
}

/// The lock key.
pub(crate) fn lock(prefix: &str, key: &str) -> String {
    format!("{prefix}lock:{{{key}}}")
}

/// The lock's fencing counter (same hash tag as the lock).
pub(crate) fn fence(prefix: &str, key: &str) -> String {
    format!("{prefix}lock:{{{key}}}:fence")
}

/// The channel of an event topic.
pub(crate) fn events(prefix: &str, topic: &str) -> String {
    format!("{prefix}events:{topic}")
}

/// `SCAN MATCH` patterns of every key this backend writes under an (escaped) prefix: queues,
/// tasks, the registry's indexes and edges, locks.
pub(crate) fn families(escaped_prefix: &str) -> [String; 4] {
    [
        format!("{escaped_prefix}q:{{*"),
        format!("{escaped_prefix}task_registry:*"),
        format!("{escaped_prefix}orchestra:*"),
        format!("{escaped_prefix}lock:{{*"),
    ]
}

/// `s` with the characters that `SCAN MATCH` treats as a pattern escaped.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Redis Cluster slot of `key` (CRC16/XMODEM of the hash tag or the whole key, mod 16384),
/// as Redis computes it: where a command goes that redis-rs cannot route by itself (`WAIT`
/// after a script), and what the tests that prove which scripts are cluster safe check.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_slot(keys: &[String]) -> bool {
        keys.windows(2).all(|w| slot(&w[0]) == slot(&w[1]))
    }

    /// Every key of a queue that holds data (not the wake channel), with the indexes and
    /// dependents sets of its tasks and, in `layout`, a task hash.
    fn stored(q: &QueueKeys, layout: Layout) -> Vec<String> {
        let id = TaskId::parse("task_001").unwrap();
        let mut k = vec![
            q.ready.clone(),
            q.delayed.clone(),
            q.inflight.clone(),
            q.seq.clone(),
            q.dead.clone(),
            q.bodies.clone(),
            q.dependents(&id),
            q.purged.clone(),
        ];
        k.extend(TaskStatus::ALL.iter().map(|s| q.status_index(*s)));
        if layout == Layout::Sharded {
            k.push(q.task(&id));
        }
        k
    }

    #[test]
    fn slot_matches_redis_reference_values() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    #[test]
    fn every_key_of_a_queue_and_its_tasks_shares_one_slot() {
        for prefix in ["", "app:"] {
            for layout in [Layout::Lab, Layout::Sharded] {
                let q = QueueKeys::new(prefix, layout, &QueueName::parse("research").unwrap());
                let keys = stored(&q, layout);
                assert!(same_slot(&keys), "prefix {prefix:?}: {keys:?}");
            }
        }
        let a = QueueKeys::new("", Layout::Sharded, &QueueName::parse("research").unwrap());
        let b = QueueKeys::new("", Layout::Sharded, &QueueName::parse("writing").unwrap());
        assert_ne!(slot(&a.ready), slot(&b.ready), "queues spread over slots");
    }

    #[test]
    fn the_lab_layout_keeps_the_lab_key() {
        let q = QueueKeys::new("", Layout::Lab, &QueueName::parse("research").unwrap());
        let id = TaskId::parse("task_001").unwrap();
        assert_eq!(q.task(&id), "task_registry:task_001");
        let q = QueueKeys::new("", Layout::Sharded, &QueueName::parse("research").unwrap());
        assert_eq!(q.task(&id), "q:{research}:task:task_001");
    }

    #[test]
    fn every_key_falls_in_one_family_and_the_prefix_is_escaped() {
        let prefix = "app[1]*:";
        let escaped = glob_escape(prefix);
        assert_eq!(escaped, "app\\[1\\]\\*:");
        let starts: Vec<String> = families(prefix)
            .iter()
            .map(|f| f.trim_end_matches('*').to_string())
            .collect();
        let id = TaskId::parse("task_001").unwrap();
        let mut all = vec![
            queues(prefix),
            task_queue(prefix, &id),
            lock(prefix, "monitor"),
            fence(prefix, "monitor"),
        ];
        for layout in [Layout::Lab, Layout::Sharded] {
            let q = QueueKeys::new(prefix, layout, &QueueName::parse("research").unwrap());
            all.extend(stored(&q, layout));
            all.push(q.task(&id));
        }
        for key in all {
            assert_eq!(
                starts
                    .iter()
                    .filter(|s| key.starts_with(s.as_str()))
                    .count(),
                1,
                "{key}"
            );
        }
    }

    #[test]
    fn lock_and_its_fence_share_one_slot() {
        for prefix in ["", "x:"] {
            assert_eq!(
                slot(&lock(prefix, "monitor")),
                slot(&fence(prefix, "monitor"))
            );
        }
    }
}
