//! Every key and channel name the Redis backend uses, in one place.
//!
//! * a work queue: `{prefix}q:{<queue>}:ready|delayed|inflight|seq|dead|bodies` and the channel
//!   `{prefix}q:{<queue>}:wake` — hash-tagged by the queue, so every queue script touches one
//!   slot (and different queues spread over a cluster);
//! * a task: `{prefix}task_registry:<id>` (the lab's key), with the indexes
//!   `{prefix}orchestra:status:<STATUS>`, `{prefix}orchestra:leases` and
//!   `{prefix}orchestra:dependents:<parent>`;
//! * a lock: `{prefix}lock:{<key>}` and its fencing counter `{prefix}lock:{<key>}:fence`;
//! * events: the channel `{prefix}events:<topic>`.
//!
//! When the prefix itself holds a hash tag (`{orchestra}:`), Redis hashes only that tag, so
//! every key lands in one slot: that is how the registry becomes Redis Cluster safe (see
//! docs/backends/redis.md).

use crate::model::{QueueName, TaskId, TaskStatus};

/// The keys of one work queue.
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
}

impl QueueKeys {
    /// The keys of `queue` under `prefix`.
    pub fn new(prefix: &str, queue: &QueueName) -> Self {
        let base = format!("{prefix}q:{{{queue}}}");
        QueueKeys {
            ready: format!("{base}:ready"),
            delayed: format!("{base}:delayed"),
            inflight: format!("{base}:inflight"),
            seq: format!("{base}:seq"),
            dead: format!("{base}:dead"),
            bodies: format!("{base}:bodies"),
            wake: format!("{base}:wake"),
        }
    }
}

/// The lab's task key: `{prefix}task_registry:<id>`.
pub(crate) fn task(prefix: &str, id: &TaskId) -> String {
    format!("{prefix}task_registry:{id}")
}

/// ZSET of the tasks in `status`, by updated_at (µs); for RUNNING, the lease index (by lease
/// end), so that a claim and a finish each move a task in one index, not two.
pub(crate) fn status_index(prefix: &str, status: TaskStatus) -> String {
    if status == TaskStatus::Running {
        return lease_index(prefix);
    }
    format!("{}{}", status_prefix(prefix), status.as_str())
}

/// What the index of a status (other than RUNNING) is named after: `{prefix}orchestra:status:`.
pub(crate) fn status_prefix(prefix: &str) -> String {
    format!("{prefix}orchestra:status:")
}

/// What a dependents set is named after: `{prefix}orchestra:dependents:`.
pub(crate) fn dependents_prefix(prefix: &str) -> String {
    format!("{prefix}orchestra:dependents:")
}

/// ZSET of RUNNING tasks by lease end (µs).
pub(crate) fn lease_index(prefix: &str) -> String {
    format!("{prefix}orchestra:leases")
}

/// ZSET of the children of `parent`, by their created_at (µs).
pub(crate) fn dependents(prefix: &str, parent: &TaskId) -> String {
    format!("{}{parent}", dependents_prefix(prefix))
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
/// as Redis computes it. Used by the tests that prove which scripts are cluster safe.
#[cfg(test)]
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

    #[test]
    fn slot_matches_redis_reference_values() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    /// Every key of a queue that holds data (not the wake channel).
    fn stored(q: &QueueKeys) -> Vec<String> {
        vec![
            q.ready.clone(),
            q.delayed.clone(),
            q.inflight.clone(),
            q.seq.clone(),
            q.dead.clone(),
            q.bodies.clone(),
        ]
    }

    #[test]
    fn every_key_of_a_queue_shares_one_slot_with_any_prefix() {
        for prefix in ["", "app:", "{orchestra}:"] {
            let q = QueueKeys::new(prefix, &QueueName::parse("research").unwrap());
            let keys = stored(&q);
            assert!(same_slot(&keys), "prefix {prefix:?}: {keys:?}");
        }
        let a = QueueKeys::new("", &QueueName::parse("research").unwrap());
        let b = QueueKeys::new("", &QueueName::parse("writing").unwrap());
        assert_ne!(slot(&a.ready), slot(&b.ready), "queues spread over slots");
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
        let q = QueueKeys::new(prefix, &QueueName::parse("research").unwrap());
        let mut all = vec![
            task(prefix, &id),
            lease_index(prefix),
            dependents(prefix, &id),
            lock(prefix, "monitor"),
            fence(prefix, "monitor"),
        ];
        all.extend(stored(&q));
        all.extend(TaskStatus::ALL.iter().map(|s| status_index(prefix, *s)));
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
        for prefix in ["", "x:", "{orchestra}:"] {
            assert_eq!(
                slot(&lock(prefix, "monitor")),
                slot(&fence(prefix, "monitor"))
            );
        }
    }

    #[test]
    fn registry_keys_share_one_slot_only_under_a_hash_tagged_prefix() {
        let id = TaskId::parse("task_001").unwrap();
        let parent = TaskId::parse("task_000").unwrap();
        let keys = |prefix: &str| {
            let mut k = vec![
                task(prefix, &id),
                lease_index(prefix),
                dependents(prefix, &parent),
            ];
            k.extend(TaskStatus::ALL.iter().map(|s| status_index(prefix, *s)));
            k
        };
        assert!(same_slot(&keys("{orchestra}:")));
        assert!(
            !same_slot(&keys("")),
            "the lab's untagged keys spread over slots"
        );
    }
}
