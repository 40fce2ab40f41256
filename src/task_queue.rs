//! The [`TaskQueue`] trait: the worker's hot path as three steps that each span the bus and the
//! registry — fetch and claim, claim one delivery, record an outcome and settle its message.
//!
//! Every step has a generic implementation over any [`Bus`] + [`Registry`] pair
//! ([`Composed`], used by the memory, NATS, RabbitMQ and mixed backends). A backend that holds
//! both roles in one server may do a step in fewer round trips (Redis does each in one Lua
//! script); its implementation must behave exactly like [`Composed`], which the conformance
//! suite checks on every backend.
//!
//! **For backend authors; not a stable API yet.** An application uses these traits through
//! [`Backends`](crate::Backends) and the engine ([`Dispatcher`](crate::Dispatcher),
//! [`Worker`](crate::Worker), [`Monitor`](crate::Monitor)); a backend implements them and checks
//! itself with the conformance suite (feature `testkit`). Their methods may still change
//! between 0.x releases.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::bus::{Bus, Delivery, FetchOptions, OutgoingMessage};
use crate::error::{Error, Result};
use crate::model::{QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::registry::Registry;
use crate::wire::TaskMessage;

/// How the error of a task whose dispatch was undone starts (see [`withdraw`]).
pub(crate) const NOT_ANNOUNCED: &str = "not announced";

/// Undoes the registration of `task`, just created PENDING at attempt 0, whose message could
/// not be sent (`cause`): the task becomes FAILED at attempt 0 with an error that starts with
/// [`NOT_ANNOUNCED`], so that nothing runs a task whose caller was told its dispatch failed, and
/// a dispatch with the same id sends it again (see
/// [`Dispatcher::dispatch`](crate::Dispatcher::dispatch)). The compare-and-set loses only to a
/// worker that claimed the task: the failed enqueue had reached the broker after all, and the
/// task runs.
///
/// Returns the error for the caller, temporary when `cause` is. When the registry cannot be
/// written either, the task stays PENDING with no message: a dispatch with the same id
/// announces it, and so does the monitor once `reannounce_pending_after` has passed.
pub(crate) async fn withdraw(
    bus: &dyn Bus,
    registry: &dyn Registry,
    task: &Task,
    cause: &Error,
) -> Error {
    let now = Utc::now();
    let next = TaskState {
        status: TaskStatus::Failed,
        error: Some(format!("{NOT_ANNOUNCED}: the dispatch could not enqueue the task's message ({cause}); dispatch it again with the same id")),
        finished_at: Some(now),
        updated_at: now,
        ..task.state.clone()
    };
    let id = &task.task_id;
    let message = match registry.transition(id, task.expect(), next).await {
        Ok(failed) => {
            crate::bus::publish_event(bus, &failed).await;
            format!("task {id} was not announced ({cause}); its registration was undone (FAILED, attempt 0): dispatch it again with the same id")
        }
        Err(Error::Conflict { .. }) => {
            format!("the enqueue of task {id} reported an error ({cause}), but a worker has claimed the task: it was announced after all")
        }
        Err(e) => {
            tracing::warn!(task_id = %id, error = %e, "a task whose announcement failed stays PENDING with no message");
            format!("task {id} was registered but not announced ({cause}), and could not be withdrawn ({e}): it stays PENDING until a dispatch with the same id or the monitor announces it")
        }
    };
    Error::Backend {
        backend: bus.backend(),
        temporary: cause.is_temporary(),
        message,
        source: None,
    }
}

/// Who claims, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimSpec {
    /// Recorded as the task's `worker_id`.
    pub worker_id: Arc<str>,
    /// The registry lease of the claim (the bus lease is [`FetchOptions::lease`]).
    pub lease: Duration,
}

impl ClaimSpec {
    /// The state a claim at `now` writes over `found`: RUNNING, attempt + 1 (the new fencing
    /// token), this worker, leased until `now + lease`, no result, no finish time; the last
    /// error and the last progress report are kept.
    pub fn claimed_state(&self, found: &TaskState, now: DateTime<Utc>) -> TaskState {
        TaskState {
            status: TaskStatus::Running,
            attempt: found.attempt.saturating_add(1),
            handed_back: found.handed_back,
            worker_id: Some(self.worker_id.to_string()),
            result: None,
            error: found.error.clone(),
            lease_until: Some(crate::clock::after(now, self.lease)),
            heartbeat_at: Some(now),
            started_at: Some(now),
            finished_at: None,
            ready_at: found.ready_at,
            progress: found.progress.clone(),
            updated_at: now,
        }
    }
}

/// Whether a task found at `now` may be claimed: PENDING, or RUNNING under an expired lease
/// with attempts left (a takeover from a worker that died).
pub fn claimable(task: &Task, now: DateTime<Utc>) -> bool {
    match task.state.status {
        TaskStatus::Pending => true,
        TaskStatus::Running => task.lease_expired(now) && task.attempts_left(),
        _ => false,
    }
}

/// What claiming a delivery's task gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The task is now RUNNING for this worker (stored, its event published).
    Claimed(Task),
    /// The task exists but is not claimable (see [`claimable`]); as found.
    Unclaimable(Task),
    /// No task has the id the message names.
    Missing(TaskId),
    /// The message is not a task message; why.
    Malformed(String),
}

/// What to do with the message once an outcome is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Remove it for good (a terminal outcome).
    Ack,
    /// Give it back, ready again after the delay (a retry or a hand-back).
    Nack(Duration),
}

/// An outcome as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// The task after the change.
    pub task: Task,
    /// For a terminal outcome, the ids of the tasks that depend on this one (to move on);
    /// empty otherwise.
    pub dependents: Vec<TaskId>,
}

/// The hot path of the dispatcher and the worker. See the module documentation.
#[async_trait]
pub trait TaskQueue: Send + Sync + fmt::Debug + 'static {
    /// Stores new tasks and announces each on its queue, ready at once, publishing their
    /// events: [`Registry::create_many`], then the messages ([`Bus::enqueue_many`]). For
    /// PENDING tasks without dependencies (the dispatcher handles the others). Not atomic as a
    /// whole: one result per task, in order ([`Error::TaskExists`] for a taken id). A task is
    /// announced only once stored. A task whose message cannot be sent after that gets an
    /// error and is not left PENDING behind: its registration is undone (FAILED at attempt 0,
    /// its error starting with "not announced"), so that a dispatch with the same id sends it
    /// again. Only a process that dies between the two steps leaves a PENDING task with no
    /// message; the monitor's re-announce of orphaned PENDING tasks covers that.
    async fn submit(&self, tasks: &[Task]) -> Result<Vec<Result<()>>>;

    /// Leases up to `options.max` messages of `queue` like [`Bus::fetch`], and claims the task
    /// of each where the backend can do so in the same step (`Some`); `None` leaves the claim
    /// to [`TaskQueue::claim`]. Deliveries whose claim is `Some(Claim::Claimed)` have had their
    /// RUNNING event published.
    async fn fetch_claim(
        &self,
        queue: &QueueName,
        options: FetchOptions,
        spec: &ClaimSpec,
    ) -> Result<Vec<(Delivery, Option<Claim>)>>;

    /// Claims the task a delivery names: decodes the message, reads the task, and if it is
    /// [`claimable`], moves it by compare-and-set to [`ClaimSpec::claimed_state`] and publishes
    /// the event. A lost compare-and-set gives `Unclaimable` with the task as it is now.
    async fn claim(&self, delivery: &Delivery, spec: &ClaimSpec) -> Result<Claim>;

    /// Records an outcome: compare-and-set from `current` (its status and attempt) to `next`,
    /// then settles the message as `settle` says and publishes the event. When the
    /// compare-and-set fails, the message is acked (this attempt is void) and the error is
    /// [`Error::Conflict`]; when the task is gone, [`Error::TaskNotFound`] and the message is
    /// left to its lease. Safe to call again after an error: a task already at `next`'s status
    /// and attempt (this call's own earlier write whose reply was lost) is settled as asked.
    async fn record(
        &self,
        delivery: &Delivery,
        current: &Task,
        next: TaskState,
        settle: Settle,
    ) -> Result<Recorded>;
}

/// The generic [`TaskQueue`]: each step as calls on the bus and the registry.
#[derive(Clone, Debug)]
pub struct Composed {
    bus: Arc<dyn Bus>,
    registry: Arc<dyn Registry>,
}

impl Composed {
    /// Over this bus and registry.
    pub fn new(bus: Arc<dyn Bus>, registry: Arc<dyn Registry>) -> Self {
        Composed { bus, registry }
    }
}

#[async_trait]
impl TaskQueue for Composed {
    async fn submit(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let mut created = self.registry.create_many(tasks).await?;
        let mut by_queue: BTreeMap<&QueueName, (Vec<OutgoingMessage>, Vec<usize>)> =
            BTreeMap::new();
        let mut announced = Vec::new();
        for (i, (task, r)) in tasks.iter().zip(&created).enumerate() {
            if r.is_ok() {
                announced.push(crate::bus::publish_event(self.bus.as_ref(), task));
                let (messages, positions) = by_queue.entry(&task.queue).or_default();
                messages.push(OutgoingMessage::new(
                    TaskMessage::encode(&task.task_id),
                    task.priority,
                ));
                positions.push(i);
            }
        }
        futures::future::join_all(announced).await;
        for (queue, (messages, positions)) in by_queue {
            // A failed enqueue must not leave registered tasks behind with no message.
            if let Err(cause) = self.bus.enqueue_many(queue, messages).await {
                for i in positions {
                    created[i] =
                        Err(
                            withdraw(self.bus.as_ref(), self.registry.as_ref(), &tasks[i], &cause)
                                .await,
                        );
                }
            }
        }
        Ok(created)
    }

    async fn fetch_claim(
        &self,
        queue: &QueueName,
        options: FetchOptions,
        _spec: &ClaimSpec,
    ) -> Result<Vec<(Delivery, Option<Claim>)>> {
        let got = self.bus.fetch(queue, options).await?;
        Ok(got.into_iter().map(|d| (d, None)).collect())
    }

    async fn claim(&self, delivery: &Delivery, spec: &ClaimSpec) -> Result<Claim> {
        let id = match TaskMessage::decode(&delivery.payload) {
            Ok(m) => m.task_id,
            Err(e) => return Ok(Claim::Malformed(e.to_string())),
        };
        let Some(mut task) = self.registry.get(&id).await? else {
            return Ok(Claim::Missing(id));
        };
        // A claim that loses its compare-and-set reads the task again and, if it is still
        // claimable (the first read was stale), claims once more; otherwise whoever moved it
        // on is responsible for its message.
        for tries_left in [true, false] {
            let now = Utc::now();
            if !claimable(&task, now) {
                return Ok(Claim::Unclaimable(task));
            }
            if task.state.status == TaskStatus::Running {
                tracing::warn!(task_id = %id, attempt = task.state.attempt, "taking over a task whose lease expired");
            }
            let next = spec.claimed_state(&task.state, now);
            match self.registry.transition(&id, task.expect(), next).await {
                Ok(running) => {
                    crate::bus::publish_event(self.bus.as_ref(), &running).await;
                    return Ok(Claim::Claimed(running));
                }
                Err(Error::Conflict { .. }) => match self.registry.get(&id).await? {
                    Some(again) if tries_left => task = again,
                    Some(again) => return Ok(Claim::Unclaimable(again)),
                    None => return Ok(Claim::Missing(id)),
                },
                Err(e) => return Err(e),
            }
        }
        Ok(Claim::Unclaimable(task))
    }

    async fn record(
        &self,
        delivery: &Delivery,
        current: &Task,
        next: TaskState,
        settle: Settle,
    ) -> Result<Recorded> {
        let (status, attempt, updated_at) = (next.status, next.attempt, next.updated_at);
        let stored = match self
            .registry
            .transition(&current.task_id, current.expect(), next)
            .await
        {
            Ok(t) => t,
            // Our own write, made by an earlier call whose reply was lost: settle as intended.
            // (Same status and attempt, but another `updated_at`, is another writer's: the
            // monitor hands an expired lease back just as a worker's retry would.)
            Err(
                e @ Error::Conflict {
                    actual_status,
                    actual_attempt,
                    ..
                },
            ) if actual_status == status && actual_attempt == attempt => {
                let stored = self
                    .registry
                    .get(&current.task_id)
                    .await?
                    .ok_or_else(|| Error::TaskNotFound(current.task_id.clone()))?;
                if stored.state.updated_at != updated_at {
                    self.bus.ack(delivery).await?;
                    return Err(e);
                }
                stored
            }
            Err(e @ Error::Conflict { .. }) => {
                self.bus.ack(delivery).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match settle {
            Settle::Ack => self.bus.ack(delivery).await?,
            Settle::Nack(delay) => self.bus.nack(delivery, delay).await?,
        }
        crate::bus::publish_event(self.bus.as_ref(), &stored).await;
        let dependents = if stored.state.status.is_terminal() {
            self.registry.dependents(&stored.task_id).await?
        } else {
            Vec::new()
        };
        Ok(Recorded {
            task: stored,
            dependents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Backends;
    use crate::bus::{FetchOptions, OutgoingMessage};
    use crate::model::{Priority, QueueName};
    use crate::registry::tests::Wrapped;
    use crate::wire::TaskMessage;

    /// A claim whose first read was stale loses its compare-and-set, reads again, finds the
    /// task still claimable and claims it (before, it gave up and the worker dropped the
    /// message, stranding a PENDING task).
    #[tokio::test]
    async fn a_claim_that_read_a_stale_copy_claims_again() {
        let b = Backends::memory();
        let q = QueueName::parse("q").unwrap();
        let task = Task::new(
            q.clone(),
            serde_json::json!({}),
            Priority::default(),
            3,
            vec![],
            &crate::model::Limits::default(),
        )
        .unwrap();
        b.registry.create(&task).await.unwrap();
        // Its first attempt ran and was retried: PENDING at attempt 1 now.
        let mut s = task.state.clone();
        s.status = TaskStatus::Running;
        s.attempt = 1;
        let running = b
            .registry
            .transition(&task.task_id, task.expect(), s)
            .await
            .unwrap();
        let mut s = running.state.clone();
        s.status = TaskStatus::Pending;
        b.registry
            .transition(&task.task_id, running.expect(), s)
            .await
            .unwrap();
        b.bus
            .enqueue(
                &q,
                OutgoingMessage::new(TaskMessage::encode(&task.task_id), task.priority),
            )
            .await
            .unwrap();
        let d = b
            .bus
            .fetch(
                &q,
                FetchOptions {
                    max: 1,
                    wait: Duration::from_secs(1),
                    lease: Duration::from_secs(30),
                },
            )
            .await
            .unwrap()
            .pop()
            .unwrap();
        // The claim's first read answers the copy from before attempt 1.
        let lagging = Arc::new(Wrapped::new(b.registry.clone()));
        *lagging.old.lock() = Some(task.clone());
        let tasks = Composed::new(b.bus.clone(), lagging);
        let spec = ClaimSpec {
            worker_id: "w".into(),
            lease: Duration::from_secs(30),
        };
        match tasks.claim(&d, &spec).await.unwrap() {
            Claim::Claimed(t) => assert_eq!(t.state.attempt, 2),
            other => panic!("expected a claim after the re-read, got {other:?}"),
        }
    }
}
