//! The [`Dispatcher`]: registers tasks and announces them; waits for outcomes; cancels and
//! retries.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::bundle::Backends;
use crate::error::{Error, Result};
use crate::model::{Limits, Priority, QueueName, Task, TaskId, TaskState, TaskStatus};

use super::builder::TaskBuilder;
use super::flow;
use super::trace;
use super::unique::{self, Unique};
use super::worker::{CancelNotice, CANCELS_TOPIC};
use crate::task_queue::{withdraw, NOT_ANNOUNCED};
use crate::wire::{TaskEvent, EVENTS_TOPIC};
use tracing::Instrument;

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
    /// when the id is taken by another task, it fails with [`Error::TaskExists`]. (The
    /// deadline is not compared: a deadline given as "in 10 minutes" differs from one call
    /// to the next.)
    pub task_id: Option<TaskId>,
    /// Run each attempt at most this long (whole milliseconds, more than zero): past it the
    /// handler's cancellation signal is set, the handler is dropped after the worker's
    /// `cancel_grace`, and the attempt fails retryably ("timed out after T"). Overrides the
    /// worker's `handler_timeout`. See docs/design.md, "Per-task timeout and deadline".
    pub timeout: Option<Duration>,
    /// Start no attempt after this time: a task still unstarted then fails ("deadline ...
    /// passed before a worker started it") instead of running late, and a failed attempt is
    /// not retried when the retry would start after it. Must be in the future at dispatch.
    pub deadline: Option<DateTime<Utc>>,
    /// Dispatch at most one task per key while the key lives: see [`DispatchOptions::unique`].
    pub unique: Option<Unique>,
    /// A W3C `traceparent` to continue (from an incoming request, say): the dispatch span is
    /// its child. Without it the dispatch span continues the current span's trace (feature
    /// `otel`). Without the feature it is stored with the task as given.
    pub traceparent: Option<String>,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            max_attempts: 3,
            depends_on: Vec::new(),
            delay: Duration::ZERO,
            task_id: None,
            timeout: None,
            deadline: None,
            unique: None,
            traceparent: None,
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

    /// Sets `timeout`: each attempt runs at most `t`.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Sets `deadline`: no attempt starts after `at`.
    pub fn deadline(mut self, at: DateTime<Utc>) -> Self {
        self.deadline = Some(at);
        self
    }

    /// Checks the timeout, the deadline (not passed, and not before the end of the delay) and
    /// the unique key and TTL, as [`Dispatcher::dispatch`] does; errors are
    /// [`Error::InvalidInput`] naming the option (`timeout`, `deadline`, `unique_key`,
    /// `unique_for`).
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.timeout {
            check_timeout(t)?;
        }
        if let Some(at) = self.deadline {
            check_deadline(at, crate::clock::after(Utc::now(), self.delay))?;
        }
        if let Some(u) = &self.unique {
            u.validate()?;
        }
        if let Some(tp) = &self.traceparent {
            crate::model::validate_traceparent(tp)?;
        }
        Ok(())
    }

    /// Makes the dispatch unique by `key` for `ttl`: while the key lives, a dispatch with the
    /// same key registers nothing and returns the id of the task that took the key. The key
    /// lives for `ttl` from the dispatch that took it, whatever becomes of that task (an
    /// idempotency key: a duplicate within the TTL gets the first id even after that task
    /// finished); after it, the next dispatch creates a new task. Keys are namespace-wide
    /// (not per queue): 1..=192 characters from `[A-Za-z0-9_.:-]`; the TTL is more than zero
    /// and at most 365 days. See docs/design.md, "Unique tasks".
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use agent_orchestra::{Backends, DispatchOptions, Dispatcher};
    /// let d = Dispatcher::new(Backends::memory());
    /// let once = || DispatchOptions::default().unique("report-2026-12-07", Duration::from_secs(600));
    /// let first = d.dispatch("reports", serde_json::json!({}), 5, once()).await.unwrap();
    /// let again = d.dispatch("reports", serde_json::json!({}), 5, once()).await.unwrap();
    /// assert_eq!(first, again);
    /// # });
    /// ```
    pub fn unique(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        self.unique = Some(Unique {
            key: key.into(),
            ttl,
        });
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
        options.validate()?;
        task.timeout = options.timeout.map(check_timeout).transpose()?;
        task.deadline = options.deadline;
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

    /// Checks a task handed to [`Dispatcher::dispatch_many`] as [`Dispatcher::build`] checks
    /// what it builds (its fields are public, so it may come from anywhere): the limits on
    /// payload, attempts and dependencies, the timeout, the deadline, the traceparent and the
    /// delivery budget.
    fn check_task(&self, task: &Task) -> Result<()> {
        crate::model::check_limits(
            &task.payload,
            task.max_attempts,
            &task.depends_on,
            &self.limits,
        )?;
        if let Some(t) = task.timeout {
            check_timeout(t)?;
        }
        if let Some(at) = task.deadline {
            check_deadline(at, Utc::now())?;
        }
        if let Some(tp) = &task.traceparent {
            crate::model::validate_traceparent(tp)?;
        }
        self.check_budget(task)
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
    /// complete). Returns its id once it is durably registered and queued; with
    /// [`DispatchOptions::unique`], the id of the task that holds the key when one does.
    pub async fn dispatch(
        &self,
        queue: &str,
        payload: Value,
        priority: i64,
        options: DispatchOptions,
    ) -> Result<TaskId> {
        let mut task = self.build(queue, payload, priority, &options)?;
        let span = trace::publish_span(self.backends.bus.backend(), &task);
        if let Some(tp) = &options.traceparent {
            trace::set_remote_parent(&span, tp);
        }
        // The dispatch span's own context when traces are on, else what the caller gave.
        task.traceparent = trace::traceparent_of(&span).or_else(|| options.traceparent.clone());
        if !task.depends_on.is_empty() {
            trace::link_parents(&span, self.backends.registry.as_ref(), &task.depends_on).await;
        }
        let run = async {
            match &options.unique {
                Some(u) => unique::dispatch(self, u, task, &options).await,
                None => self.dispatch_built(task, &options).await,
            }
        };
        run.instrument(span).await
    }

    /// [`Dispatcher::dispatch`] of a task already built and validated.
    pub(super) async fn dispatch_built(
        &self,
        mut task: Task,
        options: &DispatchOptions,
    ) -> Result<TaskId> {
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
    /// forever) and is not registered. So does a task that [`Dispatcher::build`] would not
    /// have built: a payload, attempts or dependencies over the limits, a timeout out of
    /// bounds, a deadline that has passed, a malformed traceparent.
    pub async fn dispatch_many(&self, tasks: Vec<Task>) -> Result<Vec<Result<TaskId>>> {
        if tasks
            .iter()
            .all(|t| t.depends_on.is_empty() && self.check_task(t).is_ok())
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
            if let Err(e) = self.check_task(t) {
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
    /// priority, attempts, dependencies and timeout) returns the id: a task whose dispatch was undone
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
            && found.depends_on == wanted.depends_on
            && found.timeout == wanted.timeout;
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
        self.wait_watching(id, timeout, REREAD, |_| {}).await
    }

    /// [`wait`](Self::wait), also reading the task at least every `every` and calling `seen`
    /// with it whenever its status, attempt or progress ([`TaskState::progress`]) changed:
    /// how a caller shows a running task's progress while it waits. `seen` is called with
    /// the first read too, and with the terminal task before it is returned. `every` is at
    /// least 100 ms.
    ///
    /// ```no_run
    /// # async fn f(d: agent_orchestra::engine::Dispatcher, id: agent_orchestra::TaskId) -> agent_orchestra::Result<()> {
    /// use std::time::Duration;
    /// let done = d
    ///     .wait_watching(&id, Duration::from_secs(60), Duration::from_secs(1), |t| {
    ///         if let Some(p) = &t.state.progress {
    ///             eprintln!("{}: {p}", t.task_id);
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_watching(
        &self,
        id: &TaskId,
        timeout: Duration,
        every: Duration,
        mut seen: impl FnMut(&Task) + Send,
    ) -> Result<Task> {
        let every = every.max(Duration::from_millis(100));
        let mut sub = self.backends.bus.subscribe(EVENTS_TOPIC).await?;
        let deadline = tokio::time::Instant::now() + crate::clock::capped(timeout);
        let mut last: Option<(TaskStatus, u32, Option<Value>)> = None;
        loop {
            let task = self.get(id).await?;
            let now = (
                task.state.status,
                task.state.attempt,
                task.state.progress.clone(),
            );
            if last.as_ref() != Some(&now) {
                seen(&task);
                last = Some(now);
            }
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
            let until = deadline.min(tokio::time::Instant::now() + every);
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

    /// Cancels a WAITING, PENDING or RUNNING task. Its dependents fail.
    ///
    /// A RUNNING task becomes CANCELLED at once, by compare-and-set on its attempt: that
    /// attempt's outcome can no longer be recorded (a late completion is refused like any
    /// outcome of a lost lease). Its worker is told on the bus ([`CANCELS_TOPIC`]), or finds
    /// out at the attempt's next heartbeat if the notice is lost; it sets the handler's
    /// [`TaskContext::cancelled`](crate::engine::TaskContext::cancelled) signal and drops a
    /// handler that has not returned after [`WorkerConfig::cancel_grace`](crate::engine::WorkerConfig).
    /// A finished task cannot be cancelled: [`Error::IllegalTransition`].
    pub async fn cancel(&self, id: &TaskId) -> Result<Task> {
        let task = self.get(id).await?;
        let now = Utc::now();
        let running = task.state.status == TaskStatus::Running;
        let next = TaskState {
            status: TaskStatus::Cancelled,
            error: Some(match running {
                true => format!(
                    "cancelled by an operator while running (attempt {} on worker {})",
                    task.state.attempt,
                    task.state.worker_id.as_deref().unwrap_or("?")
                ),
                false => "cancelled by an operator".into(),
            }),
            lease_until: None,
            finished_at: Some(now),
            updated_at: now,
            ..task.state.clone()
        };
        let updated = self
            .backends
            .registry
            .transition(id, task.expect(), next)
            .await?;
        if running {
            let notice = CancelNotice {
                task_id: id.clone(),
                attempt: task.state.attempt,
            };
            let bus = self.backends.bus.as_ref();
            if bus.may_have_subscribers(CANCELS_TOPIC) {
                if let Err(e) = bus.publish(CANCELS_TOPIC, &notice.encode()).await {
                    tracing::warn!(task_id = %id, error = %e, "could not tell the worker now; it stops the handler at its next heartbeat");
                }
            }
        }
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

/// The longest per-task timeout: a longer one is a typo (a task's lease is renewed anyway).
pub const MAX_TASK_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// Checks a per-task timeout and keeps it in whole milliseconds (what every registry stores).
fn check_timeout(t: Duration) -> Result<Duration> {
    let ms = Duration::from_millis(u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    if ms.is_zero() {
        return Err(Error::invalid(
            "timeout",
            format!(
                "must be at least 1ms, got {}",
                crate::clock::format_duration(t)
            ),
        ));
    }
    if ms > MAX_TASK_TIMEOUT {
        return Err(Error::invalid(
            "timeout",
            format!(
                "must be at most 365 days, got {}",
                crate::clock::format_duration(t)
            ),
        ));
    }
    Ok(ms)
}

/// Refuses a deadline that has passed, or that comes before the task's first possible start
/// (`ready`: now plus its delay): such a task could only fail.
fn check_deadline(at: DateTime<Utc>, ready: DateTime<Utc>) -> Result<()> {
    let now = Utc::now();
    if at <= now {
        return Err(Error::invalid(
            "deadline",
            format!(
                "{} has passed (now is {})",
                at.to_rfc3339(),
                now.to_rfc3339()
            ),
        ));
    }
    if at < ready {
        return Err(Error::invalid(
            "deadline",
            format!(
                "{} comes before the task may start ({}, after its delay)",
                at.to_rfc3339(),
                ready.to_rfc3339()
            ),
        ));
    }
    Ok(())
}
