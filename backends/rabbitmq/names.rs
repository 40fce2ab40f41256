//! Every queue, stream and exchange name this backend creates, in one place, all under the
//! configured prefix.
//!
//! | what | name |
//! |---|---|
//! | work queue, `queue_type=classic` (durable, `x-max-priority` 10) | `{prefix}q.{queue}` |
//! | its delay buckets (TTL, dead-letter back) | `{prefix}q.{queue}.delay.{ms}` |
//! | work queue of priority `n` (1–10), `queue_type=quorum` | `{prefix}q.{queue}.p{n}` |
//! | its delay buckets (quorum, at-least-once dead-lettering back) | `{prefix}q.{queue}.p{n}.delay.{ms}` |
//! | its dead letters (durable, of the configured type) | `{prefix}q.{queue}.dead` |
//! | events exchange (direct) | `{prefix}events` |
//! | registry log (stream) | `{prefix}registry` |
//! | registry snapshots (stream) | `{prefix}registry.snapshots` |
//! | lock log (stream) | `{prefix}locks` |
//! | a held lock (exclusive queue) | `{prefix}lock.{key}` |

use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::QueueName;

/// The kind of queue that carries the bus's work, delays and dead letters (the `queue_type`
/// URL parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum QueueType {
    /// One durable classic queue per work queue with `x-max-priority` 10: it lives on the node
    /// that declared it, not replicated.
    #[default]
    Classic,
    /// Quorum queues (Raft-replicated over the cluster): one per priority level, since quorum
    /// queues in RabbitMQ 3.x have no priorities.
    Quorum,
}

impl QueueType {
    /// Parses the `queue_type` parameter's value.
    pub(crate) fn parse(value: &str) -> std::result::Result<QueueType, String> {
        match value {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!(
                "queue_type must be `classic` or `quorum`, got {other:?}"
            )),
        }
    }

    /// The parameter's value for this type.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// The work queues ("lanes") of one queue: lane 0 alone for classic (priorities inside the
    /// queue), lanes 1 to 10 for quorum (lane `n` holds priority `n`), most urgent first.
    pub(crate) fn lanes(self) -> std::ops::RangeInclusive<u8> {
        match self {
            QueueType::Classic => 0..=0,
            QueueType::Quorum => 1..=10,
        }
    }

    /// The lane a message of priority `p` goes to.
    pub(crate) fn lane_of(self, p: crate::model::Priority) -> u8 {
        match self {
            QueueType::Classic => 0,
            QueueType::Quorum => p.get(),
        }
    }
}

/// Longest prefix accepted: leaves room for the longest suffix under AMQP's 255-byte limit.
pub(crate) const MAX_PREFIX_BYTES: usize = 120;

/// Name builder for one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    /// Sanitizes `prefix` deterministically: control characters and whitespace become `_`, and a
    /// prefix starting with `amq.` (reserved by the broker) gets a leading `_`.
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let mut clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_control() || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        if clean.starts_with("amq.") {
            clean.insert(0, '_');
        }
        if clean.len() > MAX_PREFIX_BYTES {
            return Err(Error::invalid(
                "prefix",
                format!(
                    "is {} bytes; RabbitMQ names are limited to 255 bytes, so the prefix may have at most {MAX_PREFIX_BYTES}",
                    clean.len()
                ),
            ));
        }
        Ok(Names { prefix: clean })
    }

    /// The sanitized prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn work(&self, queue: &QueueName) -> String {
        format!("{}q.{}", self.prefix, queue)
    }

    /// The work queue of `lane` ([`QueueType::lanes`]): lane 0 is the classic queue.
    pub(crate) fn work_lane(&self, queue: &QueueName, lane: u8) -> String {
        match lane {
            0 => self.work(queue),
            n => format!("{}q.{}.p{n}", self.prefix, queue),
        }
    }

    /// The delay queue of `ms` that dead-letters into `lane`'s work queue.
    pub(crate) fn delay_lane(&self, queue: &QueueName, lane: u8, ms: u64) -> String {
        match lane {
            0 => self.delay(queue, ms),
            n => format!("{}q.{}.p{n}.delay.{}", self.prefix, queue, ms),
        }
    }

    pub(crate) fn dead(&self, queue: &QueueName) -> String {
        format!("{}q.{}.dead", self.prefix, queue)
    }

    pub(crate) fn delay(&self, queue: &QueueName, ms: u64) -> String {
        format!("{}q.{}.delay.{}", self.prefix, queue, ms)
    }

    pub(crate) fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    pub(crate) fn registry_log(&self) -> String {
        format!("{}registry", self.prefix)
    }

    pub(crate) fn registry_snapshots(&self) -> String {
        format!("{}registry.snapshots", self.prefix)
    }

    pub(crate) fn lock_log(&self) -> String {
        format!("{}locks", self.prefix)
    }

    /// The exclusive queue of a lock. Keys are ASCII (validated by the caller); a key too long
    /// to fit AMQP's 255 bytes with the prefix is cut and suffixed with a hash of the whole key.
    pub(crate) fn lock(&self, key: &str) -> String {
        let name = format!("{}lock.{}", self.prefix, key);
        if name.len() <= 255 {
            return name;
        }
        let keep = 255 - self.prefix.len() - "lock.".len() - 17;
        let cut = key.get(..keep).unwrap_or(key);
        format!("{}lock.{cut}~{:016x}", self.prefix, fnv1a(key.as_bytes()))
    }
}

/// FNV-1a, 64 bits: a stable hash (the same in every process and version).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Rounds a delay up to two significant digits of milliseconds (at most 10% later than asked,
/// never earlier), so that retries with many different backoffs share a bounded number of
/// delay queues: at most 90 per decade.
pub(crate) fn delay_bucket_ms(delay: std::time::Duration) -> u64 {
    let ms = delay.as_millis().min(u128::from(u32::MAX)) as u64;
    let ms = if Duration::from_millis(ms) < delay {
        ms + 1
    } else {
        ms
    }
    .max(1);
    let mut scale = 1u64;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms.div_ceil(scale) * scale
}

/// Every value [`delay_bucket_ms`] can return, smallest first: 1 to 99, then two significant
/// digits times a power of ten, up to the bucket of `u32::MAX` ms.
pub(crate) fn delay_buckets() -> impl Iterator<Item = u64> {
    let top = delay_bucket_ms(Duration::from_millis(u64::from(u32::MAX)));
    (1..100u64).chain((1..=9u32).flat_map(move |k| {
        (10..100u64)
            .map(move |v| v * 10u64.pow(k))
            .filter(move |&b| b <= top)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delay_falls_in_a_listed_bucket() {
        let all: std::collections::BTreeSet<u64> = delay_buckets().collect();
        assert!(all.len() < 1000, "{}", all.len());
        let mut ms = 0u64;
        while ms <= u64::from(u32::MAX) * 2 {
            for d in [ms, ms + 1, ms.saturating_sub(1)] {
                let b = delay_bucket_ms(Duration::from_millis(d));
                assert!(all.contains(&b), "{d} ms -> bucket {b} not listed");
            }
            ms = ms * 3 / 2 + 7;
        }
    }

    #[test]
    fn delay_buckets_round_up_to_two_significant_digits() {
        assert_eq!(delay_bucket_ms(Duration::ZERO), 1);
        assert_eq!(delay_bucket_ms(Duration::from_micros(1)), 1);
        assert_eq!(delay_bucket_ms(Duration::from_millis(99)), 99);
        assert_eq!(delay_bucket_ms(Duration::from_millis(101)), 110);
        assert_eq!(delay_bucket_ms(Duration::from_millis(1234)), 1300);
        assert_eq!(delay_bucket_ms(Duration::from_secs(60)), 60_000);
        assert_eq!(delay_bucket_ms(Duration::from_micros(1_500)), 2);
        for ms in 1..5000u64 {
            let b = delay_bucket_ms(Duration::from_millis(ms));
            assert!(b >= ms && b * 10 <= ms * 11 + 10, "{ms} -> {b}");
        }
    }

    #[test]
    fn queue_types_parse_and_give_their_lanes() {
        assert_eq!(QueueType::parse("classic"), Ok(QueueType::Classic));
        assert_eq!(QueueType::parse("quorum"), Ok(QueueType::Quorum));
        assert!(QueueType::parse("stream").unwrap_err().contains("classic"));
        assert_eq!(QueueType::Classic.lanes().collect::<Vec<_>>(), vec![0]);
        assert_eq!(QueueType::Quorum.lanes().count(), 10);
        let urgent = crate::model::Priority::new(1).unwrap();
        assert_eq!(QueueType::Quorum.lane_of(urgent), 1);
        assert_eq!(QueueType::Classic.lane_of(urgent), 0);
        assert_eq!(QueueType::default(), QueueType::Classic);
    }

    #[test]
    fn prefixes_are_sanitized_deterministically() {
        assert_eq!(Names::new("t 1\n").unwrap().prefix(), "t_1_");
        assert_eq!(Names::new("amq.x").unwrap().prefix(), "_amq.x");
        assert!(Names::new(&"p".repeat(121)).is_err());
        let q = QueueName::parse("research").unwrap();
        let n = Names::new("pre.").unwrap();
        assert_eq!(n.work(&q), "pre.q.research");
        assert_eq!(n.delay(&q, 1300), "pre.q.research.delay.1300");
        assert_eq!(n.work_lane(&q, 0), "pre.q.research");
        assert_eq!(n.work_lane(&q, 3), "pre.q.research.p3");
        assert_eq!(n.delay_lane(&q, 0, 1300), "pre.q.research.delay.1300");
        assert_eq!(n.delay_lane(&q, 10, 1300), "pre.q.research.p10.delay.1300");
        assert_eq!(n.lock("leader"), "pre.lock.leader");
        let long = Names::new(&"p".repeat(120)).unwrap();
        let a = long.lock(&"k".repeat(200));
        let b = long.lock(&format!("{}x", "k".repeat(199)));
        assert_eq!(a.len(), 255);
        assert_ne!(a, b, "long keys stay distinct");
    }
}
