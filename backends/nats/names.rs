//! Deterministic names for everything the backend creates, derived from the prefix.
//!
//! Stream and bucket names may not contain `.`, `*`, `>`, whitespace or path separators, and
//! subjects are `.`-separated tokens without wildcards or whitespace. The prefix is mapped
//! character by character (anything outside `[A-Za-z0-9_-]`, and `.` for names, becomes `_`),
//! queue names are already `[A-Za-z0-9_-]`, and task ids / lock keys are mapped one-to-one onto
//! key-value keys (`.` → `/`, `:` → `=`; neither `/` nor `=` can occur in an id).

use crate::model::QueueName;

/// The names of one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    /// Prepended to stream and bucket names.
    name: String,
    /// Prepended to subjects (`""` or ends where the caller's prefix ends).
    subject: String,
}

fn map_chars(s: &str, keep_dot: bool) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || (keep_dot && c == '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A topic as subject tokens, each sanitized (an empty one becomes `_`).
fn topic_tokens(topic: &str) -> String {
    let mut tokens: Vec<String> = Vec::new();
    for t in topic.split('.') {
        let t = map_chars(t, false);
        tokens.push(if t.is_empty() { "_".into() } else { t });
    }
    tokens.join(".")
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        let name = map_chars(prefix, false);
        // Subjects keep dots as token separators but may not have empty tokens.
        let mut subject = String::with_capacity(prefix.len());
        for c in map_chars(prefix, true).chars() {
            if c == '.' && (subject.is_empty() || subject.ends_with('.')) {
                subject.push('_');
            }
            subject.push(c);
        }
        Names { name, subject }
    }

    /// Whether `stream` is one this prefix's backend makes: a queue's work or dead-letter
    /// stream, the blob stream, or the stream of the task, dependents, control or lock bucket.
    pub(crate) fn owns_stream(&self, stream: &str) -> bool {
        if let Some(bucket) = stream.strip_prefix("KV_") {
            let tasks = self.task_bucket();
            if bucket == tasks
                || bucket == format!("{tasks}_deps")
                || bucket == format!("{tasks}_control")
                || bucket == self.lock_bucket()
            {
                return true;
            }
        }
        let Some(rest) = stream.strip_prefix(self.name.as_str()) else {
            return false;
        };
        rest == "ORCH_BLOBS"
            || rest
                .strip_prefix("ORCH_Q_")
                .or_else(|| rest.strip_prefix("ORCH_DLQ_"))
                .is_some_and(|q| QueueName::parse(q).is_ok())
    }

    /// `{prefix}events.<topic>`, the topic's tokens sanitized.
    pub(crate) fn event_subject(&self, topic: &str) -> String {
        format!("{}events.{}", self.subject, topic_tokens(topic))
    }

    /// `{prefix}orch.listeners.<topic>`: where a new subscriber of a topic says hello.
    pub(crate) fn listener_subject(&self, topic: &str) -> String {
        format!("{}orch.listeners.{}", self.subject, topic_tokens(topic))
    }

    /// `{prefix}orch.echo.<random>`: where `subscribe` sends itself the message that proves
    /// the server has processed its `SUB` (inside the namespace's `orch.>` subjects, which the
    /// backend needs anyway; not `_INBOX.>`, which some accounts may not publish to).
    pub(crate) fn echo_subject(&self) -> String {
        format!(
            "{}orch.echo.{}",
            self.subject,
            uuid::Uuid::new_v4().simple()
        )
    }

    /// The work stream of a queue.
    pub(crate) fn work_stream(&self, q: &QueueName) -> String {
        format!("{}ORCH_Q_{}", self.name, q)
    }

    /// The dead-letter stream of a queue.
    pub(crate) fn dead_stream(&self, q: &QueueName) -> String {
        format!("{}ORCH_DLQ_{}", self.name, q)
    }

    /// The stream holding chunks of payloads too large for one message.
    pub(crate) fn blob_stream(&self) -> String {
        format!("{}ORCH_BLOBS", self.name)
    }

    /// `{prefix}orch.q.<queue>` — levels are `.1` ..= `.10`, delayed messages `.delayed`.
    pub(crate) fn work_subject_base(&self, q: &QueueName) -> String {
        format!("{}orch.q.{}", self.subject, q)
    }

    /// Where enqueuers send the core-NATS wake-ups of a queue's levels.
    pub(crate) fn wake_subject_base(&self, q: &QueueName) -> String {
        format!("{}orch.wake.{}", self.subject, q)
    }

    /// The dead-letter subject of a queue.
    pub(crate) fn dead_subject(&self, q: &QueueName) -> String {
        format!("{}orch.dlq.{}", self.subject, q)
    }

    /// `{prefix}orch.blob` — chunk `i` of blob `id` is `.<id>.<i>`.
    pub(crate) fn blob_subject_base(&self) -> String {
        format!("{}orch.blob", self.subject)
    }

    /// The task bucket.
    pub(crate) fn task_bucket(&self) -> String {
        format!("{}orch_tasks", self.name)
    }

    /// The lock bucket.
    pub(crate) fn lock_bucket(&self) -> String {
        format!("{}orch_locks", self.name)
    }
}

/// A task id or lock key (`[A-Za-z0-9_.:-]`) as one key-value key token.
pub(crate) fn encode_key(id: &str) -> String {
    id.chars()
        .map(|c| match c {
            '.' => '/',
            ':' => '=',
            c => c,
        })
        .collect()
}

/// The inverse of [`encode_key`].
pub(crate) fn decode_key(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            '/' => '.',
            '=' => ':',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_owns_exactly_the_streams_it_makes() {
        let n = Names::new("test");
        let q = QueueName::parse("research_tasks").unwrap();
        for mine in [
            n.work_stream(&q),
            n.dead_stream(&q),
            n.blob_stream(),
            format!("KV_{}", n.task_bucket()),
            format!("KV_{}_deps", n.task_bucket()),
            format!("KV_{}", n.lock_bucket()),
        ] {
            assert!(n.owns_stream(&mine), "{mine}");
        }
        for other in [
            "testimonials",
            "testORCH_Q_",
            "testORCH_Q_a b",
            "test2ORCH_Q_research_tasks",
            "KV_testimonials",
            "KV_test2orch_tasks",
            "KV_testorch_tasks_x",
            "ORCH_Q_research_tasks",
        ] {
            assert!(!n.owns_stream(other), "{other}");
        }
        // The empty prefix owns only the unprefixed names (drop_namespace refuses it anyway).
        assert!(!Names::new("").owns_stream("KV_other"));
    }

    #[test]
    fn names_are_valid_and_deterministic() {
        let n = Names::new("test:a.b c*");
        let q = QueueName::parse("research_tasks").unwrap();
        assert_eq!(n.work_stream(&q), "test_a_b_c_ORCH_Q_research_tasks");
        assert_eq!(n.event_subject("events"), "test_a.b_c_events.events");
        assert_eq!(n.event_subject("a..b *"), "test_a.b_c_events.a._.b__");
        assert_eq!(Names::new("").event_subject("events"), "events.events");
        assert_eq!(Names::new(".x").event_subject("t"), "_.xevents.t");
        assert_eq!(
            Names::new("orch.").work_subject_base(&q),
            "orch.orch.q.research_tasks"
        );
        assert_eq!(n, Names::new("test:a.b c*"));
    }

    #[test]
    fn keys_round_trip() {
        for id in ["task_1", "a.b:c-d", "x..y.", "9"] {
            let k = encode_key(id);
            assert!(!k.contains('.') && !k.contains(':'));
            assert_eq!(decode_key(&k), id);
        }
    }
}
