//! The steps shared by the dispatcher, the worker and the monitor: announcing a task on its
//! queue, and moving dependents on when a parent finishes.

use std::time::Duration;

use chrono::Utc;

use crate::bundle::Backends;
use crate::bus::OutgoingMessage;
use crate::error::{Error, Result};
use crate::model::{Task, TaskId, TaskState, TaskStatus};
use crate::wire::TaskMessage;

/// Puts `task` on its queue, ready after `delay`.
pub async fn announce(b: &Backends, task: &Task, delay: Duration) -> Result<String> {
    let msg =
        OutgoingMessage::new(TaskMessage::encode(&task.task_id), task.priority).delayed(delay);
    b.bus.enqueue(&task.queue, msg).await
}

/// What a WAITING task's parents say.
enum Readiness {
    Ready,
    Blocked,
    Doomed(String),
}

async fn readiness(b: &Backends, task: &Task) -> Result<Readiness> {
    let mut blocked = false;
    for parent in &task.depends_on {
        match b.registry.get(parent).await? {
            None => {
                return Ok(Readiness::Doomed(format!(
                    "dependency {parent} does not exist"
                )))
            }
            Some(p) => match p.state.status {
                TaskStatus::Completed => {}
                TaskStatus::Failed | TaskStatus::Cancelled => {
                    let why = p.state.error.as_deref().unwrap_or("no reason recorded");
                    return Ok(Readiness::Doomed(format!(
                        "dependency {parent} {}: {why}",
                        p.state.status
                    )));
                }
                _ => blocked = true,
            },
        }
    }
    Ok(if blocked {
        Readiness::Blocked
    } else {
        Readiness::Ready
    })
}

/// Moves a WAITING task on if its parents allow: all COMPLETED → PENDING and announced; one
/// FAILED, CANCELLED or missing → FAILED with the reason, and its own dependents follow.
/// Safe to call concurrently from several places: the compare-and-set picks one winner.
pub async fn resolve_waiting(b: &Backends, task: &Task) -> Result<()> {
    let mut stack = vec![task.clone()];
    while let Some(task) = stack.pop() {
        if task.state.status != TaskStatus::Waiting {
            continue;
        }
        let now = Utc::now();
        let next = match readiness(b, &task).await? {
            Readiness::Blocked => continue,
            Readiness::Ready => TaskState {
                status: TaskStatus::Pending,
                updated_at: now,
                ..task.state.clone()
            },
            Readiness::Doomed(reason) => TaskState {
                status: TaskStatus::Failed,
                error: Some(reason),
                finished_at: Some(now),
                updated_at: now,
                ..task.state.clone()
            },
        };
        let updated = match b
            .registry
            .transition(&task.task_id, task.expect(), next)
            .await
        {
            Ok(t) => t,
            Err(Error::Conflict { .. }) => continue, // someone else moved it on
            Err(e) => return Err(e),
        };
        crate::bus::publish_event(b.bus.as_ref(), &updated).await;
        if updated.state.status == TaskStatus::Pending {
            tracing::info!(task_id = %updated.task_id, "dependencies completed; task queued");
            announce(b, &updated, Duration::ZERO).await?;
        } else {
            tracing::info!(task_id = %updated.task_id, reason = ?updated.state.error, "dependency failed; task failed");
            for child in children(b, &updated.task_id).await? {
                stack.push(child);
            }
        }
    }
    Ok(())
}

async fn children(b: &Backends, parent: &TaskId) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for id in b.registry.dependents(parent).await? {
        if let Some(t) = b.registry.get(&id).await? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Called after `parent` reached a terminal status: moves its WAITING dependents on.
pub async fn parent_finished(b: &Backends, parent: &Task) -> Result<()> {
    let ids = b.registry.dependents(&parent.task_id).await?;
    move_dependents_on(b, &ids).await
}

/// Moves on the WAITING tasks among `ids` (the dependents of a parent that finished).
pub async fn move_dependents_on(b: &Backends, ids: &[TaskId]) -> Result<()> {
    for id in ids {
        if let Some(child) = b.registry.get(id).await? {
            resolve_waiting(b, &child).await?;
        }
    }
    Ok(())
}
