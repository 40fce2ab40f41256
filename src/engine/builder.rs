//! [`TaskBuilder`]: one task to dispatch, described by name rather than by position.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{Priority, TaskId};

use super::dispatcher::{DispatchOptions, Dispatcher};

/// A task being described for [`Dispatcher::task`]: its payload (any `Serialize` type), its
/// priority, delay, attempts, id, dependencies, timeout, deadline and unique key, each named. Nothing is stored before
/// [`send`](TaskBuilder::send), which validates everything and reports the first problem as
/// [`Error::InvalidInput`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use agent_orchestra::prelude::*;
///
/// #[derive(serde::Serialize)]
/// struct Research { topic: String }
///
/// let d = Dispatcher::new(Backends::memory());
/// let id = d
///     .task("research_tasks")
///     .payload(&Research { topic: "AI agents".into() })
///     .priority(1)
///     .max_attempts(5)
///     .delay(Duration::from_secs(2))
///     .send()
///     .await?;
/// assert_eq!(d.get(&id).await?.priority, Priority::new(1)?);
///
/// // Bad input is a typed error from `send`, and nothing is registered.
/// let err = d.task("research_tasks").priority(11).send().await.unwrap_err();
/// assert!(matches!(err, Error::InvalidInput { field: "priority", .. }));
/// # Ok::<(), Error>(())
/// # }).unwrap();
/// ```
#[must_use = "a task is dispatched only by `send`"]
#[derive(Debug)]
pub struct TaskBuilder<'d> {
    dispatcher: &'d Dispatcher,
    queue: String,
    payload: std::result::Result<Value, String>,
    priority: i64,
    options: DispatchOptions,
}

impl<'d> TaskBuilder<'d> {
    pub(super) fn new(dispatcher: &'d Dispatcher, queue: &str) -> Self {
        TaskBuilder {
            dispatcher,
            queue: queue.to_string(),
            payload: Ok(Value::Object(Default::default())),
            priority: i64::from(Priority::DEFAULT.get()),
            options: DispatchOptions::default(),
        }
    }

    /// The payload, serialized to JSON (default `{}`). A value that cannot be serialized
    /// (a map with non-string keys, a failing `Serialize`) makes `send` fail.
    pub fn payload<T: Serialize + ?Sized>(mut self, payload: &T) -> Self {
        self.payload = serde_json::to_value(payload).map_err(|e| e.to_string());
        self
    }

    /// The payload as JSON already built.
    pub fn json(mut self, payload: Value) -> Self {
        self.payload = Ok(payload);
        self
    }

    /// The priority, 1 (most urgent) to 10; default 5.
    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }

    /// Attempts before the task FAILS for good (default 3).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.options.max_attempts = n;
        self
    }

    /// Run no earlier than `delay` from now (not with [`after`](TaskBuilder::after)).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.options.delay = delay;
        self
    }

    /// Run each attempt at most `timeout` (see [`DispatchOptions::timeout`]): overrides the
    /// worker's `handler_timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Start no attempt after `at` (see [`DispatchOptions::deadline`]).
    pub fn deadline(mut self, at: chrono::DateTime<chrono::Utc>) -> Self {
        self.options.deadline = Some(at);
        self
    }

    /// At most one task per `key` while it lives, `ttl` from now: a duplicate returns the id
    /// of the task that took the key (see [`DispatchOptions::unique`]).
    pub fn unique(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        self.options = self.options.unique(key, ttl);
        self
    }

    /// Use this id instead of a generated one: `send` fails with [`Error::TaskExists`] if it is
    /// taken.
    pub fn id(mut self, id: TaskId) -> Self {
        self.options.task_id = Some(id);
        self
    }

    /// Tasks that must COMPLETE first: the task waits in WAITING, and FAILS if one of them
    /// fails. Their results reach the handler through
    /// [`TaskContext::parent_results_as`](super::TaskContext::parent_results_as).
    pub fn after(mut self, parents: impl IntoIterator<Item = TaskId>) -> Self {
        self.options.depends_on = parents.into_iter().collect();
        self
    }

    /// Validates, registers and announces the task (see [`Dispatcher::dispatch`]).
    pub async fn send(self) -> Result<TaskId> {
        let payload = self.payload.map_err(|e| {
            Error::invalid(
                "payload",
                format!("the payload could not be serialized: {e}"),
            )
        })?;
        self.dispatcher
            .dispatch(&self.queue, payload, self.priority, self.options)
            .await
    }
}
