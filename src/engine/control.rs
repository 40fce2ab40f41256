//! The operator's control of queues: list them with their sizes and task counts, pause and
//! resume them, and put back or delete their dead letters. [`Control`] is the library API;
//! `orchestra queues` and `orchestra dead-letters` call it.
//!
//! * **Pause** is a flag stored in the registry ([`Registry::set_queue_paused`]), so it holds
//!   for every worker of the namespace, on every machine, and survives their restarts. A worker
//!   reads the paused queues when it starts (before its first fetch), again every
//!   [`WorkerConfig::announce_every`](crate::WorkerConfig) (or every lease heartbeat when it
//!   does not announce itself), and at once when [`Control::pause`] publishes on
//!   [`CONTROL_TOPIC`] (an at-most-once hint: the periodic read is the guarantee). A paused
//!   worker lets its running tasks finish and record their outcome, fetches nothing more from
//!   the queue, and hands back unrun (to PENDING, at no attempt's cost) what a fetch already on
//!   its way brings. Messages stay queued; nothing is lost or run twice.
//! * **Limits** ([`Control::set_limits`]): a rate (at most N tasks started per interval) and a
//!   concurrency cap of a queue, across every worker. Stored in the registry
//!   ([`Registry::set_queue_limits`]) and learned by the workers like a pause (at once by the
//!   hint on [`CONTROL_TOPIC`], at their next periodic read at the latest); a limit set here
//!   replaces the one a worker was configured with for that queue. The workers enforce them
//!   through the lock manager before they fetch (see docs/design.md).
//! * **Requeue** puts a dead letter back as a new message: its task, when the registry knows it,
//!   first goes back to PENDING (from FAILED or CANCELLED, keeping its attempt count, like
//!   [`Dispatcher::retry`](crate::Dispatcher::retry)); the new message is enqueued before the
//!   dead letter is deleted, so a failure in between leaves a duplicate message (the claim's
//!   compare-and-set runs the task once), never a loss.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::bundle::Backends;
use crate::bus::{DeadLetter, OutgoingMessage};
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::queue_limits::QueueLimits;
use crate::registry::StatusCounts;
use crate::wire::TaskMessage;

/// The bus topic [`Control::pause`], [`Control::resume`] and [`Control::set_limits`] publish
/// on, so that workers read the paused queues and the limits at once instead of at their next
/// periodic read. The payload is the
/// queue's name.
pub const CONTROL_TOPIC: &str = "queue_control";

/// Most dead letters read at once when looking for the ones to requeue or delete.
const DEAD_SCAN: usize = 10_000;

/// A queue as [`Control::queues`] sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The queue.
    pub queue: QueueName,
    /// Whether it is paused (workers claim nothing from it).
    pub paused: bool,
    /// Its limits set at runtime (unlimited when none is).
    #[serde(default)]
    pub limits: QueueLimits,
    /// Messages not leased: ready, or waiting for a delay.
    pub waiting: u64,
    /// Of `waiting`, those waiting for a delay; `None` when the bus cannot tell cheaply.
    pub delayed: Option<u64>,
    /// Messages leased to a worker.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
    /// The queue's tasks by status.
    pub tasks: StatusCounts,
}

/// Which dead letters of a queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// Every dead letter the queue has when the call starts.
    All,
    /// Those with these message ids.
    Ids(Vec<String>),
}

/// What happened to one dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DeadLetterOutcome {
    /// Enqueued again as a new message, then deleted from the dead letters.
    Requeued {
        /// The dead letter's message id.
        message_id: String,
        /// The id of the new message.
        new_message_id: String,
        /// The task the message names, when the registry knows it.
        task_id: Option<TaskId>,
        /// That task's status now (PENDING), when known.
        task_status: Option<TaskStatus>,
    },
    /// Deleted from the dead letters.
    Deleted {
        /// The dead letter's message id.
        message_id: String,
    },
    /// Left as it is, with why.
    Skipped {
        /// The dead letter's message id.
        message_id: String,
        /// The task the message names.
        task_id: Option<TaskId>,
        /// Why it was left.
        reason: String,
    },
    /// No dead letter of the queue has this id (already requeued or deleted, or mistyped).
    NotFound {
        /// The id asked for.
        message_id: String,
    },
}

impl DeadLetterOutcome {
    /// Whether this outcome is a dead letter not found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DeadLetterOutcome::NotFound { .. })
    }
}

/// The operator's control of queues; see the module documentation.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use agent_orchestra::{Backends, QueueName};
/// use agent_orchestra::engine::Control;
/// let control = Control::new(Backends::memory());
/// let q = QueueName::parse("research_tasks").unwrap();
/// assert!(control.pause(&q).await.unwrap());
/// assert!(control.queues(&[q.clone()]).await.unwrap()[0].paused);
/// assert!(control.resume(&q).await.unwrap());
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Control {
    backends: Backends,
}

impl Control {
    /// Over these backends.
    pub fn new(backends: Backends) -> Self {
        Control { backends }
    }

    /// Every queue that has tasks, is paused, or is named in `also`, sorted, with its sizes,
    /// whether it is paused and its tasks by status.
    pub async fn queues(&self, also: &[QueueName]) -> Result<Vec<QueueInfo>> {
        let registry = &self.backends.registry;
        let paused = registry.paused_queues().await?;
        let limits = registry.queue_limits().await?;
        let mut names: BTreeSet<QueueName> = registry.queues().await?.into_iter().collect();
        names.extend(paused.iter().cloned());
        names.extend(limits.keys().cloned());
        names.extend(also.iter().cloned());
        let mut out = Vec::with_capacity(names.len());
        for queue in names {
            let mut info = self.queue_info(&queue, paused.contains(&queue)).await?;
            info.limits = limits.get(&queue).copied().unwrap_or_default();
            out.push(info);
        }
        Ok(out)
    }

    async fn queue_info(&self, queue: &QueueName, paused: bool) -> Result<QueueInfo> {
        let bus = &self.backends.bus;
        let (stats, delayed, tasks) = futures::try_join!(
            bus.stats(queue),
            bus.delayed(queue),
            self.backends.registry.queue_counts(queue)
        )?;
        Ok(QueueInfo {
            queue: queue.clone(),
            paused,
            limits: QueueLimits::default(),
            waiting: stats.waiting,
            delayed,
            in_flight: stats.in_flight,
            dead: stats.dead,
            tasks,
        })
    }

    /// The paused queues.
    pub async fn paused(&self) -> Result<BTreeSet<QueueName>> {
        self.backends.registry.paused_queues().await
    }

    /// Pauses `queue` on every worker; returns false when it already was paused. Workers stop
    /// claiming from it within one of their pause reads (see the module documentation).
    pub async fn pause(&self, queue: &QueueName) -> Result<bool> {
        self.set_paused(queue, true).await
    }

    /// Resumes `queue`; returns false when it was not paused.
    pub async fn resume(&self, queue: &QueueName) -> Result<bool> {
        self.set_paused(queue, false).await
    }

    async fn set_paused(&self, queue: &QueueName, paused: bool) -> Result<bool> {
        let changed = self
            .backends
            .registry
            .set_queue_paused(queue, paused)
            .await?;
        self.hint(queue).await;
        tracing::info!(queue = %queue, paused, changed, "queue pause changed");
        Ok(changed)
    }

    /// The limits set at runtime, by queue.
    pub async fn limits(&self) -> Result<std::collections::BTreeMap<QueueName, QueueLimits>> {
        self.backends.registry.queue_limits().await
    }

    /// Sets `queue`'s limits on every worker (unlimited ones clear them: the workers go back
    /// to the limits they were configured with); returns false when they already were so.
    /// Workers apply them within one of their pause reads (see the module documentation).
    pub async fn set_limits(&self, queue: &QueueName, limits: &QueueLimits) -> Result<bool> {
        limits.validate()?;
        let changed = self
            .backends
            .registry
            .set_queue_limits(queue, limits)
            .await?;
        self.hint(queue).await;
        tracing::info!(queue = %queue, limits = %limits, changed, "queue limits changed");
        Ok(changed)
    }

    /// A hint for the workers to read the flags now; the registry holds the truth.
    async fn hint(&self, queue: &QueueName) {
        let bus = self.backends.bus.as_ref();
        if bus.may_have_subscribers(CONTROL_TOPIC) {
            if let Err(e) = bus.publish(CONTROL_TOPIC, queue.as_str().as_bytes()).await {
                tracing::debug!(queue = %queue, error = %e, "could not publish the queue's change; workers see it at their next read");
            }
        }
    }

    /// Puts the selected dead letters of `queue` back on it as new messages (see the module
    /// documentation). A dead letter whose task cannot run again from here (COMPLETED,
    /// RUNNING, WAITING) is skipped and stays, with the reason.
    pub async fn requeue_dead_letters(
        &self,
        queue: &QueueName,
        which: &DeadLetterSelection,
    ) -> Result<Vec<DeadLetterOutcome>> {
        self.each_dead_letter(queue, which, Action::Requeue).await
    }

    /// Deletes the selected dead letters of `queue` for good. Their tasks are not changed.
    pub async fn delete_dead_letters(
        &self,
        queue: &QueueName,
        which: &DeadLetterSelection,
    ) -> Result<Vec<DeadLetterOutcome>> {
        self.each_dead_letter(queue, which, Action::Delete).await
    }

    async fn each_dead_letter(
        &self,
        queue: &QueueName,
        which: &DeadLetterSelection,
        action: Action,
    ) -> Result<Vec<DeadLetterOutcome>> {
        let bus = &self.backends.bus;
        let mut out = Vec::new();
        match which {
            DeadLetterSelection::Ids(ids) => {
                if ids.is_empty() {
                    return Err(Error::invalid(
                        "message ids",
                        "name at least one dead letter (or select them all)",
                    ));
                }
                // Not bounded by the dead count: a backend's count may lag its queue (a
                // RabbitMQ quorum queue's does).
                let letters = bus.dead_letters(queue, DEAD_SCAN).await?;
                let mut seen = BTreeSet::new();
                let mut chosen = Vec::new();
                for id in ids {
                    if !seen.insert(id.as_str()) {
                        continue;
                    }
                    match letters.iter().find(|l| &l.message_id == id) {
                        Some(l) => chosen.push(l),
                        None => out.push(DeadLetterOutcome::NotFound {
                            message_id: id.clone(),
                        }),
                    }
                }
                let mut done = self.act(queue, &chosen, action).await?;
                done.append(&mut out);
                out = done;
            }
            DeadLetterSelection::All => {
                // Only the dead letters there now: a requeued message that dies again comes
                // back with another id, and is left for the next call.
                // The count may lag the queue (a RabbitMQ quorum queue's does): what a first
                // read finds counts too.
                let mut page = bus.dead_letters(queue, DEAD_SCAN).await?;
                let mut budget = (bus.stats(queue).await?.dead as usize).max(page.len());
                let mut handled: BTreeSet<String> = BTreeSet::new();
                while budget > 0 {
                    if !handled.is_empty() {
                        let limit = (handled.len() + budget).min(DEAD_SCAN);
                        page = bus.dead_letters(queue, limit).await?;
                    }
                    let fresh: Vec<&DeadLetter> = page
                        .iter()
                        .filter(|l| !handled.contains(&l.message_id))
                        .take(budget)
                        .collect();
                    if fresh.is_empty() {
                        break;
                    }
                    budget -= fresh.len();
                    handled.extend(fresh.iter().map(|l| l.message_id.clone()));
                    out.extend(self.act(queue, &fresh, action).await?);
                }
            }
        }
        Ok(out)
    }

    /// Requeues or deletes `letters`: the requeued ones are enqueued first, then all of them
    /// are removed from the dead letters in one call.
    async fn act(
        &self,
        queue: &QueueName,
        letters: &[&DeadLetter],
        action: Action,
    ) -> Result<Vec<DeadLetterOutcome>> {
        let mut out = Vec::with_capacity(letters.len());
        let mut remove = Vec::with_capacity(letters.len());
        for letter in letters {
            let id = letter.message_id.clone();
            if action == Action::Delete {
                remove.push(id.clone());
                out.push(DeadLetterOutcome::Deleted { message_id: id });
                continue;
            }
            let task_id = TaskMessage::decode(&letter.payload).ok().map(|m| m.task_id);
            let task = match &task_id {
                Some(t) => self.backends.registry.get(t).await?,
                None => None,
            };
            let (payload, priority, task) = match task {
                Some(task) => match self.make_pending(task).await? {
                    Ok(task) => (
                        TaskMessage::encode(&task.task_id),
                        task.priority,
                        Some(task),
                    ),
                    Err(reason) => {
                        out.push(DeadLetterOutcome::Skipped {
                            message_id: id,
                            task_id,
                            reason,
                        });
                        continue;
                    }
                },
                // Not a task message, or a task the registry does not know (purged, or never
                // registered): the bytes go back as they were.
                None => (letter.payload.clone(), Priority::default(), None),
            };
            let new_message_id = self
                .backends
                .bus
                .enqueue(queue, OutgoingMessage::new(payload, priority))
                .await?;
            remove.push(id.clone());
            out.push(DeadLetterOutcome::Requeued {
                message_id: id,
                new_message_id,
                task_id: task.as_ref().map(|t| t.task_id.clone()),
                task_status: task.as_ref().map(|t| t.state.status),
            });
        }
        if remove.is_empty() {
            return Ok(out);
        }
        let removed: BTreeSet<String> = self
            .backends
            .bus
            .remove_dead_letters(queue, &remove)
            .await?
            .into_iter()
            .collect();
        for o in out.iter_mut() {
            match o {
                DeadLetterOutcome::Deleted { message_id } if !removed.contains(message_id) => {
                    // Deleted meanwhile by another call.
                    *o = DeadLetterOutcome::NotFound {
                        message_id: message_id.clone(),
                    };
                }
                DeadLetterOutcome::Requeued { message_id, .. } if !removed.contains(message_id) => {
                    // Requeued or deleted meanwhile by another call: ours is a duplicate
                    // message, which the claim's compare-and-set makes harmless.
                    tracing::info!(queue = %queue, message_id = %message_id, "a dead letter requeued by this call was removed meanwhile by another");
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The task, PENDING: as it is when PENDING, moved back from FAILED or CANCELLED (its
    /// attempt count kept, as by a retry); otherwise why it cannot be requeued.
    async fn make_pending(&self, task: Task) -> Result<std::result::Result<Task, String>> {
        let now = Utc::now();
        let why = match task.state.status {
            TaskStatus::Pending => return Ok(Ok(task)),
            TaskStatus::Failed | TaskStatus::Cancelled => {
                let next = TaskState {
                    status: TaskStatus::Pending,
                    finished_at: None,
                    ready_at: None,
                    updated_at: now,
                    ..task.state.clone()
                };
                return match self
                    .backends
                    .registry
                    .transition(&task.task_id, task.expect(), next)
                    .await
                {
                    Ok(pending) => {
                        crate::bus::publish_event(self.backends.bus.as_ref(), &pending).await;
                        Ok(Ok(pending))
                    }
                    Err(Error::Conflict { actual_status, .. }) => Ok(Err(format!(
                        "task {} changed concurrently (now {actual_status}); look again",
                        task.task_id
                    ))),
                    Err(e) => Err(e),
                };
            }
            TaskStatus::Completed => "its task is COMPLETED".to_string(),
            TaskStatus::Waiting => {
                "its task is WAITING for its dependencies (announced when they complete)"
                    .to_string()
            }
            TaskStatus::Running if task.lease_expired(now) => {
                "its task is RUNNING under an expired lease: the monitor hands it back".to_string()
            }
            TaskStatus::Running => format!(
                "its task is RUNNING on {}",
                task.state.worker_id.as_deref().unwrap_or("a worker")
            ),
        };
        Ok(Err(why))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Requeue,
    Delete,
}

/// How often a worker reads the paused queues when nothing tells it sooner.
pub(crate) fn pause_read_every(announce_every: Option<Duration>, heartbeat: Duration) -> Duration {
    announce_every.unwrap_or(heartbeat)
}
