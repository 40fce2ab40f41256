//! The [`Registry`] trait: where tasks live, changed only by compare-and-set.
//!
//! **For backend authors; not a stable API yet.** An application uses these traits through
//! [`Backends`](crate::Backends) and the engine ([`Dispatcher`](crate::Dispatcher),
//! [`Worker`](crate::Worker), [`Monitor`](crate::Monitor)); a backend implements them and checks
//! itself with the conformance suite (feature `testkit`). Their methods may still change
//! between 0.x releases.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Expected, QueueName, Task, TaskId, TaskState, TaskStatus};
use crate::queue_limits::QueueLimits;
use crate::schedule::{Schedule, ScheduleName};

/// Which tasks [`Registry::list`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    /// Only this status (required by some backends' indexes; `None` lists every status).
    pub status: Option<TaskStatus>,
    /// Only this queue.
    pub queue: Option<QueueName>,
}

/// One page of [`Registry::list`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskPage {
    /// The tasks, oldest status change first.
    pub tasks: Vec<Task>,
    /// Pass back as `cursor` to get the next page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Number of tasks in each status. Statuses with no task may be absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts(pub BTreeMap<TaskStatus, u64>);

impl StatusCounts {
    /// The count for one status (0 when absent).
    pub fn get(&self, status: TaskStatus) -> u64 {
        self.0.get(&status).copied().unwrap_or(0)
    }

    /// Sum over all statuses.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for StatusCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in TaskStatus::ALL {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={}", s, self.get(s))?;
        }
        Ok(())
    }
}

/// How long finished (COMPLETED, FAILED, CANCELLED) tasks are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Delete finished tasks that finished longer ago than this.
    #[serde(default, with = "crate::clock::duration_opt")]
    pub max_age: Option<std::time::Duration>,
    /// Keep at most this many finished tasks per status (the most recent).
    #[serde(default)]
    pub max_count: Option<u64>,
}

/// Where tasks live. The lab's `TaskRegistry`, made safe under concurrency.
///
/// Every change after creation is a compare-and-set on `(status, attempt)`: a worker whose lease
/// was lost (its attempt number is no longer the task's) cannot overwrite the attempt that
/// replaced it.
#[async_trait]
pub trait Registry: Send + Sync + fmt::Debug + 'static {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// Stores a new task. Fails with [`Error::TaskExists`] if the id is taken. Durable when it
    /// returns `Ok` (as durable as the backend).
    async fn create(&self, task: &Task) -> Result<()>;

    /// Stores several new tasks (batched where the backend can). Not atomic as a whole: each
    /// task is created or fails on its own; returns one result per task, in order.
    async fn create_many(&self, tasks: &[Task]) -> Result<Vec<Result<()>>> {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            match self.create(t).await {
                Err(e) if e.is_temporary() => return Err(e),
                r => out.push(r),
            }
        }
        Ok(out)
    }

    /// Reads a task; `None` if there is none with this id.
    async fn get(&self, id: &TaskId) -> Result<Option<Task>>;

    /// Atomically replaces the task's state with `next` if, and only if, its current status and
    /// attempt equal `expected`. Errors: [`Error::TaskNotFound`]; [`Error::Conflict`] (with what
    /// was found) when the precondition fails; [`Error::IllegalTransition`] when the model forbids
    /// `expected.status → next.status`. Indexes (status, lease) change in the same atomic step.
    /// Returns the task as stored after the change.
    async fn transition(&self, id: &TaskId, expected: Expected, next: TaskState) -> Result<Task>;

    /// Lists tasks matching `filter`, `limit` at a time, continuing after `cursor`. Served from a
    /// per-status index when `filter.status` is set.
    async fn list(
        &self,
        filter: &TaskFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<TaskPage>;

    /// Number of tasks per status, from counters or index sizes: never by reading every task.
    async fn counts(&self) -> Result<StatusCounts>;

    /// RUNNING tasks whose lease ended before `before`, oldest lease first, at most `limit`.
    /// Served from an index ordered by lease end: never by reading every task.
    async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>>;

    /// The ids of tasks created with `parent` in their `depends_on`.
    async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>>;

    /// Deletes finished tasks beyond `retention`; returns how many were deleted.
    async fn purge_finished(&self, retention: &Retention) -> Result<u64>;

    /// Housekeeping the backend needs now and then, called by the acting monitor on every
    /// pass (retention or not). RabbitMQ writes a snapshot of its view when enough records
    /// were applied since the last one, which bounds what a new process replays; the others
    /// have nothing to do.
    async fn maintain(&self) -> Result<()> {
        Ok(())
    }

    /// The queues that have tasks, sorted. The default pages through every task with
    /// [`Registry::list`] (O(tasks)); a backend that keeps a set of its queues answers from it.
    async fn queues(&self) -> Result<Vec<QueueName>> {
        let mut found = BTreeSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .list(&TaskFilter::default(), cursor.as_deref(), LIST_PAGE)
                .await?;
            found.extend(page.tasks.into_iter().map(|t| t.queue));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(found.into_iter().collect()),
            }
        }
    }

    /// Number of tasks of `queue` in each status. The default pages through the queue's tasks
    /// of each status with [`Registry::list`] (O(tasks of the queue)); a backend with
    /// per-queue indexes counts from their sizes.
    async fn queue_counts(&self, queue: &QueueName) -> Result<StatusCounts> {
        let mut counts = StatusCounts::default();
        for status in TaskStatus::ALL {
            let filter = TaskFilter {
                status: Some(status),
                queue: Some(queue.clone()),
            };
            let mut n = 0u64;
            let mut cursor: Option<String> = None;
            loop {
                let page = self.list(&filter, cursor.as_deref(), LIST_PAGE).await?;
                n += page.tasks.len() as u64;
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            if n > 0 {
                counts.0.insert(status, n);
            }
        }
        Ok(counts)
    }

    /// The queues paused now ([`Registry::set_queue_paused`]): every worker of such a queue,
    /// in every process, claims nothing from it until it is resumed. The default, for a
    /// backend that cannot store the flag: none.
    async fn paused_queues(&self) -> Result<BTreeSet<QueueName>> {
        Ok(BTreeSet::new())
    }

    /// Durably marks `queue` paused (or not): stored with the namespace's tasks, so that it
    /// holds for every process and survives their restarts, until changed again. Returns
    /// whether the flag changed (false: it already was so). Atomic per call; concurrent calls
    /// on one queue leave the last one's flag. The default: [`Error::Unsupported`].
    async fn set_queue_paused(&self, queue: &QueueName, paused: bool) -> Result<bool> {
        let _ = (queue, paused);
        Err(Error::Unsupported {
            backend: self.backend(),
            operation: "pausing queues",
        })
    }

    /// The limits set at runtime ([`Registry::set_queue_limits`]), by queue: every worker of
    /// such a queue, in every process, enforces them (over its own configured ones). The
    /// default, for a backend that cannot store them: none.
    async fn queue_limits(&self) -> Result<BTreeMap<QueueName, QueueLimits>> {
        Ok(BTreeMap::new())
    }

    /// Durably sets `queue`'s limits (unlimited ones clear them): stored with the namespace's
    /// tasks, like a pause, so that they hold for every process and survive restarts. Returns
    /// whether they changed. Atomic per call; concurrent calls on one queue leave the last
    /// one's limits. The default: [`Error::Unsupported`].
    async fn set_queue_limits(&self, queue: &QueueName, limits: &QueueLimits) -> Result<bool> {
        let _ = (queue, limits);
        Err(Error::Unsupported {
            backend: self.backend(),
            operation: "limiting queues",
        })
    }

    /// The stored [`Schedule`]s, sorted by name. A record that is no valid schedule (written
    /// by another program) is skipped. The default, for a backend that cannot store them:
    /// none.
    async fn schedules(&self) -> Result<Vec<Schedule>> {
        Ok(Vec::new())
    }

    /// Durably stores `schedule` under its name, replacing any schedule of that name, with
    /// the namespace's tasks (every process sees it and it survives their restarts). Returns
    /// whether it is new (false: it replaced one). Atomic per call; concurrent calls for one
    /// name leave one of them whole. The caller has validated it. The default:
    /// [`Error::Unsupported`].
    async fn put_schedule(&self, schedule: &Schedule) -> Result<bool> {
        let _ = schedule;
        Err(Error::Unsupported {
            backend: self.backend(),
            operation: "schedules",
        })
    }

    /// Deletes the schedule named `name`; returns whether there was one. The tasks it
    /// dispatched stay. The default: [`Error::Unsupported`].
    async fn remove_schedule(&self, name: &ScheduleName) -> Result<bool> {
        let _ = name;
        Err(Error::Unsupported {
            backend: self.backend(),
            operation: "schedules",
        })
    }
}

/// Tasks per page when a default method of [`Registry`] walks a listing.
const LIST_PAGE: usize = 500;

/// Checks what every [`Registry::transition`] must check before touching storage: that the
/// model allows `expected.status → next.status`. Backends call it first.
pub fn check_transition(id: &TaskId, expected: &Expected, next: &TaskState) -> Result<()> {
    if expected.status.can_transition_to(next.status) {
        Ok(())
    } else {
        Err(Error::IllegalTransition {
            task_id: id.clone(),
            from: expected.status,
            to: next.status,
        })
    }
}

/// Builds the [`Error::Conflict`] for a failed precondition.
pub fn conflict(id: &TaskId, expected: &Expected, actual: &TaskState) -> Error {
    Error::Conflict {
        task_id: id.clone(),
        expected_status: expected.status,
        expected_attempt: expected.attempt,
        actual_status: actual.status,
        actual_attempt: actual.attempt,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// A registry around another: its next `get` answers `old` when set (a lagging read), and
    /// it counts the calls of `maintain`.
    #[derive(Debug)]
    pub(crate) struct Wrapped {
        inner: Arc<dyn Registry>,
        pub(crate) old: Mutex<Option<Task>>,
        pub(crate) maintained: std::sync::atomic::AtomicU32,
        /// When set, what `stale_running` answers (a lagging stale query).
        pub(crate) stale: Mutex<Option<Vec<Task>>>,
    }

    impl Wrapped {
        pub(crate) fn new(inner: Arc<dyn Registry>) -> Self {
            Wrapped {
                inner,
                old: Mutex::new(None),
                maintained: Default::default(),
                stale: Mutex::new(None),
            }
        }
    }

    #[async_trait]
    impl Registry for Wrapped {
        fn backend(&self) -> &'static str {
            "lagging"
        }
        async fn create(&self, task: &Task) -> Result<()> {
            self.inner.create(task).await
        }
        async fn get(&self, id: &TaskId) -> Result<Option<Task>> {
            let old = self.old.lock().take();
            match old {
                Some(t) => Ok(Some(t)),
                None => self.inner.get(id).await,
            }
        }
        async fn transition(&self, id: &TaskId, e: Expected, next: TaskState) -> Result<Task> {
            self.inner.transition(id, e, next).await
        }
        async fn list(&self, f: &TaskFilter, c: Option<&str>, limit: usize) -> Result<TaskPage> {
            self.inner.list(f, c, limit).await
        }
        async fn counts(&self) -> Result<StatusCounts> {
            self.inner.counts().await
        }
        async fn stale_running(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<Task>> {
            let stale = self.stale.lock().clone();
            match stale {
                Some(listed) => Ok(listed),
                None => self.inner.stale_running(before, limit).await,
            }
        }
        async fn dependents(&self, parent: &TaskId) -> Result<Vec<TaskId>> {
            self.inner.dependents(parent).await
        }
        async fn purge_finished(&self, retention: &Retention) -> Result<u64> {
            self.inner.purge_finished(retention).await
        }
        async fn maintain(&self) -> Result<()> {
            self.maintained
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.maintain().await
        }
    }
}
