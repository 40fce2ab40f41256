//! Task events: every state change is published on the bus topic [`EVENTS_TOPIC`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::model::{QueueName, Task, TaskId, TaskStatus};

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

/// Publishes `task`'s new state. Events are at-most-once by design: a failure is logged, not
/// returned, because the registry (not the event) is the source of truth.
pub async fn publish(bus: &dyn Bus, task: &Task) {
    let event = TaskEvent::of(task);
    let bytes = match serde_json::to_vec(&event) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "could not encode a task event");
            return;
        }
    };
    if let Err(e) = bus.publish(EVENTS_TOPIC, &bytes).await {
        tracing::warn!(task_id = %task.task_id, error = %e, "could not publish a task event");
    }
}
