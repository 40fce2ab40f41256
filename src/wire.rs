//! What travels on the brokers: the [`TaskMessage`] put on a work queue for each task, and the
//! [`TaskEvent`] published on the bus topic [`EVENTS_TOPIC`] at every state change. Both are
//! JSON, readable by the lab's Python agents.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{QueueName, Task, TaskId, TaskStatus};

/// The message put on a work queue for a task: the lab's notification, `{"task_id": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// The task to run.
    pub task_id: TaskId,
}

impl TaskMessage {
    /// Encodes the message.
    pub fn encode(task_id: &TaskId) -> Vec<u8> {
        // A TaskId only holds [A-Za-z0-9_.:-]: no escaping needed.
        format!("{{\"task_id\":\"{task_id}\"}}").into_bytes()
    }

    /// Decodes a message, with an error that says what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<TaskMessage> {
        serde_json::from_slice(bytes).map_err(|e| {
            let preview: String = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into();
            Error::invalid(
                "message",
                format!("malformed message {preview:?}: {e}; expected {{\"task_id\": \"...\"}}"),
            )
        })
    }
}

/// The bus topic that carries [`TaskEvent`]s.
pub const EVENTS_TOPIC: &str = "events";

/// A task changed state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task.
    pub task_id: TaskId,
    /// Its queue.
    pub queue: QueueName,
    /// Its new status.
    pub status: TaskStatus,
    /// Its attempt after the change.
    pub attempt: u32,
    /// The worker involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// When the change happened.
    pub at: DateTime<Utc>,
}

impl TaskEvent {
    /// The event describing `task`'s current state.
    pub fn of(task: &Task) -> Self {
        TaskEvent {
            task_id: task.task_id.clone(),
            queue: task.queue.clone(),
            status: task.state.status,
            attempt: task.state.attempt,
            worker_id: task.state.worker_id.clone(),
            at: task.state.updated_at,
        }
    }

    /// Encodes the event as JSON.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(
            &self.task_id,
            &self.queue,
            self.status,
            self.attempt,
            self.worker_id.as_deref(),
            self.at,
        )
    }

    /// Decodes an event; `None` (and a debug log) for bytes that are not an event.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match serde_json::from_slice(bytes) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a non-event on the events topic");
                None
            }
        }
    }
}

/// Hand-written JSON, because it runs for every state change: ids, queue names and statuses
/// hold no character that needs escaping; the worker id may, and goes through serde.
pub(crate) fn encode_parts(
    task_id: &TaskId,
    queue: &QueueName,
    status: TaskStatus,
    attempt: u32,
    worker_id: Option<&str>,
    at: DateTime<Utc>,
) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(160);
    let _ = write!(out, "{{\"task_id\":\"{task_id}");
    write_before_attempt(&mut out, queue, status);
    let _ = write!(out, "{attempt}");
    write_after_attempt(&mut out, worker_id, at);
    out
}

/// The text of an event after its task id and before its attempt number, and after the attempt
/// number: for a backend script that knows the id and the attempt only when it runs.
/// `{"task_id":"<id>` + the first + the attempt + the second is what [`encode_parts`] writes.
#[cfg(any(feature = "redis", test))]
pub(crate) fn around_attempt(
    queue: &QueueName,
    status: TaskStatus,
    worker_id: Option<&str>,
    at: DateTime<Utc>,
) -> (Vec<u8>, Vec<u8>) {
    let mut before = Vec::with_capacity(64);
    write_before_attempt(&mut before, queue, status);
    let mut after = Vec::with_capacity(96);
    write_after_attempt(&mut after, worker_id, at);
    (before, after)
}

fn write_before_attempt(out: &mut Vec<u8>, queue: &QueueName, status: TaskStatus) {
    use std::io::Write as _;
    let _ = write!(
        out,
        "\",\"queue\":\"{queue}\",\"status\":\"{status}\",\"attempt\":"
    );
}

fn write_after_attempt(out: &mut Vec<u8>, worker_id: Option<&str>, at: DateTime<Utc>) {
    use std::io::Write as _;
    if let Some(w) = worker_id {
        out.extend_from_slice(b",\"worker_id\":");
        let _ = serde_json::to_writer(&mut *out, w);
    }
    let _ = write!(
        out,
        ",\"at\":\"{}\"}}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_encoding_round_trips_through_serde() {
        let ev = TaskEvent {
            task_id: TaskId::parse("task_1").unwrap(),
            queue: QueueName::parse("research_tasks").unwrap(),
            status: TaskStatus::Running,
            attempt: 2,
            worker_id: Some("w \"quoted\" \u{1F600}".into()),
            at: Utc::now(),
        };
        assert_eq!(TaskEvent::decode(&ev.encode()), Some(ev.clone()));
        let none = TaskEvent {
            worker_id: None,
            ..ev
        };
        assert_eq!(TaskEvent::decode(&none.encode()), Some(none));
    }

    #[test]
    fn split_encoding_is_the_same_text() {
        let id = TaskId::parse("t-1").unwrap();
        let q = QueueName::parse("q").unwrap();
        let at = Utc::now();
        let (before, after) = around_attempt(&q, TaskStatus::Running, Some("w\"1"), at);
        let mut joined = b"{\"task_id\":\"t-1".to_vec();
        joined.extend_from_slice(&before);
        joined.extend_from_slice(b"7");
        joined.extend_from_slice(&after);
        assert_eq!(
            joined,
            encode_parts(&id, &q, TaskStatus::Running, 7, Some("w\"1"), at)
        );
    }
}
