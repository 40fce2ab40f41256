//! The [`Dispatcher`]: registers tasks and announces them; waits for outcomes; cancels and
//! retries.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use crate::bundle::Backends;
use crate::error::{Error, Result};
use crate::model::{Limits, Priority, QueueName, Task, TaskId, TaskState, TaskStatus};

use super::builder::TaskBuilder;
use super::flow;
use crate::task_queue::{withdraw, NOT_ANNOUNCED};
use crate::wire::{TaskEvent, EVENTS_TOPIC};

/// Options of [`Dispatcher::dispatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchOptions {
    /// Attempts before the task FAILS for good (default 3).
    pub max_attempts: u32,
    /// Tasks that must COMPLETE first; the task waits in WAITING until then, and FAILS if one
    /// of them fails.
    pub depends_on: Vec<TaskId>,
    /// Run no earlier than this long from now.
    pub delay: Duration,
    /// Use this id instead of a generated one. A dispatch is idempotent by id: when the id is
    /// taken by a task with the same queue, payload, priority, attempts and dependencies, the
    /// dispatch returns that task's id (announcing it again if it was never claimed, so a
    /// caller who retries a dispatch that failed loses nothing and creates no duplicate);
    /// when the id is taken by another task, it fails with [`Error::TaskExists`].
    pub task_id: Option<TaskId>,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            max_attempts: 3,
            depends_on: Vec::new(),
            delay: Duration::ZERO,
            task_id: None,
        }
    }
}

impl DispatchOptions {
    /// Sets `depends_on`.
    pub fn after(mut self, parents: impl IntoIterator<Item = TaskId>) -> Self {
        self.depends_on = parents.into_iter().collect();
        self
    }

    /// Sets `max_attempts`.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Sets `delay`.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

/// Registers tasks in the registry and announces them on their queue. [`Dispatcher::task`]
/// describes one task by name; [`Dispatcher::dispatch`] takes the same by position.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use agent_orchestra::{Backends, DispatchOptions, Dispatcher};
/// let d = Dispatcher::new(Backends::memory());
/// let id = d.task("research_tasks").json(serde_json::json!({"topic": "AI agents"})).priority(3)
///     .send().await.unwrap();
/// assert_eq!(d.get(&id).await.unwrap().status(), agent_orchestra::TaskStatus::Pending);
/// assert!(d.dispatch("research_tasks", serde_json::json!({}), 11, DispatchOptions::default()).await.is_err());
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct Dispatcher {
    backends: Backends,
    limits: Limits,
}

impl Dispatcher {
    /// A dispatcher with default [`Limits`].
    pub fn new(backends: Backends) -> Self {
        Dispatcher {
            backends,
            limits: Limits::default(),
        }
    }

    /// Replaces the input limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Describes a task for `queue`, to [`send`](TaskBuilder::send): payload of any
    /// `Serialize` type, priority, delay, attempts, id and dependencies by name.
    pub fn task(&self, queue: &str) -> TaskBuilder<'_> {
        TaskBuilder::new(self, queue)
    }

    /// The backends this dispatcher uses.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// Validates and builds a task without storing it.
    pub fn build(
        &self,
        queue: &str,
        payload: Value,
        priority: i64,
        options: &DispatchOptions,
    ) -> Result<Task> {
        let queue = QueueName::parse(queue)?;
        let priority = Priority::new(priority)?;
        let mut task = Task::new(
            queue,
            payload,
            priority,
            options.max_attempts,
            options.depends_on.clone(),
            &self.limits,
        )?;
        if let Some(id) = &options.task_id {
            task.task_id = id.clone();
        }
        if task.depends_on.contains(&task.task_id) {
            return Err(Error::invalid(
                "depends_on",
                "a task cannot depend on itself",
            ));
        }
        if !options.delay.is_zero() && !task.depends_on.is_empty() {
            return Err(Error::invalid(
                "delay",
                "a task with dependencies is announced when they complete; a delay cannot be combined with depends_on",
            ));
        }
        if let Some(max) = self.backends.bus.max_delay() {
            if options.delay > max {
                return Err(Error::invalid(
                    "delay",
                    format!(
                        "{} is longer than the {} bus keeps a delayed message ({})",
                        crate::clock::format_duration(options.delay),
                        self.backends.bus.backend(),
                        crate::clock::format_duration(max)
                    ),
                ));
            }
        }
        self.check_budget(&task)?;
        Ok(task)
    }

    /// Refuses a task whose attempts the bus cannot deliver: every attempt is a delivery of its
    /// message, and past the bus's `max_deliveries` the message is dead-lettered while the task
    /// still has attempts left (it would stay PENDING with no message).
    fn check_budget(&self, task: &Task) -> Result<()> {
        let max = self.backends.bus.max_deliveries();
        if task.max_attempts > max {
            return Err(Error::invalid(
                "max_attempts",
                format!(
                    "{} attempts need as many deliveries of the task's message, but the bus dead-letters a message after {max} (max_deliveries): lower max_attempts or raise max_deliveries (ORCHESTRA_MAX_DELIVERIES)",
                    task.max_attempts
                ),
            ));
        }
        Ok(())
    }

    /// Registers a task and announces it (or parks it in WAITING until its dependencies
    /// complete). Returns its id once it is durably registered and queued.
    pub async fn dispatch(
        &self,
        queue: &str,
        payload: Value,
        priority: i64,
        options: DispatchOptions,
    ) -> Result<TaskId> {
        let mut task = self.build(queue, payload, priority, &options)?;
        if !options.delay.is_zero() {
            // The monitor must not take a delayed task for one whose message was lost.
            task.state.ready_at = Some(crate::clock::after(task.created_at, options.delay));
        }
        for parent in &task.depends_on {
            if self.backends.registry.get(parent).await?.is_none() {
                return Err(Error::invalid(
                    "depends_on",
                    format!("dependency {parent} does not exist"),
                ));
            }
        }
        if task.depends_on.is_empty() && options.delay.is_zero() {
            // Stored, announced and its event published in one step where the backend can.
            let mut created = self
                .backends
                .tasks()
                .submit(std::slice::from_ref(&task))
                .await?;
            let r = created.pop().ok_or_else(|| {
                Error::permanent(
                    self.backends.registry.backend(),
                    "submit returned no result for the task",
                    None,
                )
            })?;
            match r {
                Err(Error::TaskExists(_)) => return self.redispatch(&task, options.delay).await,
                r => r?,
            }
            tracing::debug!(task_id = %task.task_id, queue = %task.queue, priority = %task.priority, "dispatched");
            return Ok(task.task_id);
        }
        match self.backends.registry.create(&task).await {
            Err(Error::TaskExists(_)) => return self.redispatch(&task, options.delay).await,
            r => r?,
        }
        crate::bus::publish_event(self.backends.bus.as_ref(), &task).await;
        if task.depends_on.is_empty() {
            if let Err(cause) = flow::announce(&self.backends, &task, options.delay).await {
                let b = &self.backends;
                return Err(withdraw(b.bus.as_ref(), b.registry.as_ref(), &task, &cause).await);
            }
        } else {
            // The parents may have finished before the edges existed: check once now.
            flow::resolve_waiting(&self.backends, &task).await?;
        }
        tracing::debug!(task_id = %task.task_id, queue = %task.queue, priority = %task.priority, "dispatched");
        Ok(task.task_id)
    }

    /// Registers and announces many tasks in batches: one round trip per batch where the
    /// backend allows ([`TaskQueue::submit`](crate::TaskQueue::submit)). Tasks with
    /// dependencies are registered WAITING and move on as in [`Dispatcher::dispatch`]. Returns
    /// one result per task.
    ///
    /// A dependency must exist, or come earlier in the batch (so a batch cannot hold a cycle);
    /// a task that depends on itself, on a task that does not exist, on a later one in the
    /// batch, or on one refused here gets `Error::InvalidInput` as its result (it would wait
    /// forever) and is not registered.
    pub async fn dispatch_many(&self, tasks: Vec<Task>) -> Result<Vec<Result<TaskId>>> {
        if tasks
            .iter()
            .all(|t| t.depends_on.is_empty() && self.check_budget(t).is_ok())
        {
            let submitted = self.backends.tasks().submit(&tasks).await?;
            let mut out = Vec::with_capacity(tasks.len());
            for (t, r) in tasks.iter().zip(submitted) {
                out.push(self.dispatched(t, r).await);
            }
            return Ok(out);
        }
        let mut out: Vec<Option<Result<TaskId>>> = (0..tasks.len()).map(|_| None).collect();
        let position: HashMap<&TaskId, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (&t.task_id, i))
            .collect();
        let mut exists: HashMap<&TaskId, bool> = HashMap::new();
        for (i, t) in tasks.iter().enumerate() {
            if let Err(e) = self.check_budget(t) {
                out[i] = Some(Err(e));
                continue;
            }
            for parent in &t.depends_on {
                let problem = if *parent == t.task_id {
                    Some("a task cannot depend on itself".to_string())
                } else if let Some(&j) = position.get(parent) {
                    if j > i {
                        Some(format!("dependency {parent} comes after it in the batch: list parents before their dependents"))
                    } else if out[j].is_some() {
                        Some(format!("dependency {parent} was refused"))
                    } else {
                        None
                    }
                } else {
                    let found = match exists.get(parent) {
                        Some(&found) => found,
                        None => {
                            let found = self.backends.registry.get(parent).await?.is_some();
                            exists.insert(parent, found);
                            found
                        }
                    };
                    (!found).then(|| format!("dependency {parent} does not exist"))
                };
                if let Some(reason) = problem {
                    out[i] = Some(Err(Error::invalid("depends_on", reason)));
                    break;
                }
            }
        }
        let (ready, waiting): (Vec<usize>, Vec<usize>) = (0..tasks.len())
            .filter(|&i| out[i].is_none())
            .partition(|&i| tasks[i].depends_on.is_empty());
        if !ready.is_empty() {
            let batch: Vec<Task> = ready.iter().map(|&i| tasks[i].clone()).collect();
            let submitted = self.backends.tasks().submit(&batch).await?;
            for (&i, r) in ready.iter().zip(submitted) {
                out[i] = Some(self.dispatched(&tasks[i], r).await);
            }
        }
        if !waiting.is_empty() {
            let batch: Vec<Task> = waiting.iter().map(|&i| tasks[i].clone()).collect();
            let created = self.backends.registry.create_many(&batch).await?;
            for ((&i, task), r) in waiting.iter().zip(&batch).zip(created) {
                out[i] = Some(match r {
                    Ok(()) => {
                        crate::bus::publish_event(self.backends.bus.as_ref(), task).await;
                        flow::resolve_waiting(&self.backends, task).await?;
                        Ok(task.task_id.clone())
                    }
                    Err(e) => self.dispatched(task, Err(e)).await,
                });
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The result of one task of a batch: a taken id is idempotent as in [`Dispatcher::dispatch`].
    async fn dispatched(&self, task: &Task, r: Result<()>) -> Result<TaskId> {
        match r {
            Ok(()) => Ok(task.task_id.clone()),
            Err(Error::TaskExists(_)) => self.redispatch(task, Duration::ZERO).await,
            Err(e) => Err(e),
        }
    }

    /// A dispatch of `wanted` whose id is taken. The same request again (same queue, payload,
    /// priority, attempts and dependencies) returns the id: a task whose dispatch was undone
    /// (FAILED, "not announced") is put back to PENDING and announced; a PENDING task never
    /// claimed is announced again (its message may be the one that was lost; if not, the worker
    /// that finds the task already claimed drops the extra one); any other is left as it is.
    /// Another request under a taken id is [`Error::TaskExists`].
    async fn redispatch(&self, wanted: &Task, delay: Duration) -> Result<TaskId> {
        let id = &wanted.task_id;
        let Some(found) = self.backends.registry.get(id).await? else {
            return Err(Error::TaskExists(id.clone())); // removed meanwhile: a race, say so
        };
        let same = found.queue == wanted.queue
            && found.payload == wanted.payload
            && found.priority == wanted.priority
            && found.max_attempts == wanted.max_attempts
            && found.depends_on == wanted.depends_on;
        if !same {
            return Err(Error::TaskExists(id.clone()));
        }
        let s = &found.state;
        let undone = s.status == TaskStatus::Failed
            && s.attempt == 0
            && s.error
                .as_deref()
                .is_some_and(|e| e.starts_with(NOT_ANNOUNCED));
        let b = &self.backends;
        if undone {
            let now = Utc::now();
            let next = TaskState {
                status: TaskStatus::Pending,
                error: None,
                finished_at: None,
                ready_at: (!delay.is_zero()).then(|| crate::clock::after(now, delay)),
                updated_at: now,
                ..s.clone()
            };
            let revived = match b.registry.transition(id, found.expect(), next).await {
                Ok(t) => t,
                Err(Error::Conflict { .. }) => return Ok(id.clone()), // another caller revived it
                Err(e) => return Err(e),
            };
            crate::bus::publish_event(b.bus.as_ref(), &revived).await;
            if let Err(cause) = flow::announce(b, &revived, delay).await {
                return Err(withdraw(b.bus.as_ref(), b.registry.as_ref(), &revived, &cause).await);
            }
            tracing::debug!(task_id = %id, "dispatched again after an undone dispatch");
        } else if s.status == TaskStatus::Pending && s.attempt == 0 {
            let left = s
                .ready_at
                .and_then(|at| (at - Utc::now()).to_std().ok())
                .unwrap_or_default();
            flow::announce(b, &found, left).await?;
            tracing::debug!(task_id = %id, "announced again by a repeated dispatch");
        }
        Ok(id.clone())
    }

    /// Reads a task; [`Error::TaskNotFound`] if there is none.
    pub async fn get(&self, id: &TaskId) -> Result<Task> {
        self.backends
            .registry
            .get(id)
            .await?
            .ok_or_else(|| Error::TaskNotFound(id.clone()))
    }

    /// Waits until the task reaches a terminal status (COMPLETED, FAILED, CANCELLED) and returns
    /// it; [`Error::Timeout`] after `timeout`.
    ///
    /// Reacts to the task's events: it subscribes first, then reads the registry once, then
    /// re-reads when an event for this task arrives. Because events are at-most-once, it also
    /// re-reads every 5 s whatever other tasks' events arrive, and once more at the deadline
    /// (a safety net against a lost event, not a poll loop).
    pub async fn wait(&self, id: &TaskId, timeout: Duration) -> Result<Task> {
        /// The longest a wait goes without reading the task, whatever other events arrive.
        const REREAD: Duration = Duration::from_secs(5);
        let mut sub = self.backends.bus.subscribe(EVENTS_TOPIC).await?;
        let deadline = tokio::time::Instant::now() + crate::clock::capped(timeout);
        loop {
            let task = self.get(id).await?;
            if task.state.status.is_terminal() {
                return Ok(task);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "task {id} still {} after {timeout:?}",
                    task.state.status
                )));
            }
            // Until this task's terminal event, the next re-read, or the deadline (which reads
            // once more before giving up): other tasks' events do not put the re-read off.
            let until = deadline.min(tokio::time::Instant::now() + REREAD);
            loop {
                match tokio::time::timeout_at(until, sub.recv()).await {
                    Ok(Some(bytes)) => match TaskEvent::decode(&bytes) {
                        Some(ev) if ev.task_id == *id && ev.status.is_terminal() => break,
                        _ => continue,
                    },
                    Ok(None) => {
                        sub = self.backends.bus.subscribe(EVENTS_TOPIC).await?;
                        break;
                    }
                    Err(_) => break, // the re-read is due
                }
            }
        }
    }

    /// Cancels a WAITING or PENDING task. Its dependents fail. A RUNNING task cannot be
    /// cancelled (its handler is already running): [`Error::IllegalTransition`].
    pub async fn cancel(&self, id: &TaskId) -> Result<Task> {
        let task = self.get(id).await?;
        let now = Utc::now();
        let next = TaskState {
            status: TaskStatus::Cancelled,
            error: Some("cancelled by an operator".into()),
            finished_at: Some(now),
            updated_at: now,
            ..task.state.clone()
        };
        let updated = self
            .backends
            .registry
            .transition(id, task.expect(), next)
            .await?;
        crate::bus::publish_event(self.backends.bus.as_ref(), &updated).await;
        flow::parent_finished(&self.backends, &updated).await?;
        Ok(updated)
    }

    /// Puts a FAILED or CANCELLED task back to PENDING and announces it. The attempt counter
    /// (the fencing token) keeps growing, so a task whose budget was spent gets one more
    /// attempt; one that failed early (bad input) gets what is left of its budget. A PENDING
    /// task is announced again as it is: for one whose message was lost (dead-lettered, or
    /// never sent because its dispatcher died); if its message still exists, the extra one is
    /// dropped by the worker that finds the task already claimed.
    pub async fn retry(&self, id: &TaskId) -> Result<Task> {
        let task = self.get(id).await?;
        if !matches!(
            task.state.status,
            TaskStatus::Failed | TaskStatus::Cancelled | TaskStatus::Pending
        ) {
            return Err(Error::IllegalTransition {
                task_id: id.clone(),
                from: task.state.status,
                to: TaskStatus::Pending,
            });
        }
        let next = TaskState {
            status: TaskStatus::Pending,
            finished_at: None,
            ready_at: None, // announced now
            updated_at: Utc::now(),
            ..task.state.clone()
        };
        let updated = self
            .backends
            .registry
            .transition(id, task.expect(), next)
            .await?;
        crate::bus::publish_event(self.backends.bus.as_ref(), &updated).await;
        flow::announce(&self.backends, &updated, Duration::ZERO).await?;
        Ok(updated)
    }
}
