//! What a worker runs: [`Handler`]s, from closures or typed functions.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::model::{Task, TaskId, TaskStatus};
use crate::registry::Registry;

/// Why a handler did not produce a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    /// What went wrong, recorded in the task's `error`.
    pub message: String,
    /// False for errors that another attempt cannot fix (bad input): the task FAILS at once.
    pub retryable: bool,
}

impl TaskError {
    /// An error worth another attempt (a flaky dependency, a timeout).
    pub fn retryable(message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retryable: true,
        }
    }

    /// An error no retry can fix (the payload is wrong): the task FAILS now.
    pub fn permanent(message: impl fmt::Display) -> Self {
        TaskError {
            message: message.to_string(),
            retryable: false,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for TaskError {
    fn from(e: E) -> Self {
        TaskError::retryable(e)
    }
}

/// What a handler gets: the task, and read access to the registry (to read a parent's result,
/// as the lab's Writer reads the Researcher's).
#[derive(Clone)]
pub struct TaskContext {
    /// The task as claimed (status RUNNING, `attempt` = this attempt).
    pub task: Task,
    /// The id of the worker running it.
    pub worker_id: Arc<str>,
    registry: Arc<dyn Registry>,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.task.task_id)
            .field("attempt", &self.task.state.attempt)
            .field("worker_id", &self.worker_id)
            .finish()
    }
}

impl TaskContext {
    /// Builds a context (used by the worker, and by tests that call a handler directly).
    pub fn new(task: Task, worker_id: Arc<str>, registry: Arc<dyn Registry>) -> Self {
        TaskContext {
            task,
            worker_id,
            registry,
        }
    }

    /// The results of the tasks in `depends_on`, in order. All of them are COMPLETED when a
    /// task with dependencies runs.
    pub async fn parent_results(&self) -> Result<Vec<(TaskId, Value)>> {
        let mut out = Vec::with_capacity(self.task.depends_on.len());
        for id in &self.task.depends_on {
            let parent = self
                .registry
                .get(id)
                .await?
                .ok_or_else(|| crate::Error::TaskNotFound(id.clone()))?;
            if parent.state.status != TaskStatus::Completed {
                return Err(crate::Error::invalid(
                    "depends_on",
                    format!("dependency {id} is {}, not COMPLETED", parent.state.status),
                ));
            }
            out.push((id.clone(), parent.state.result.unwrap_or(Value::Null)));
        }
        Ok(out)
    }
}

/// Runs tasks of a queue.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of `ctx.task`. A panic is caught by the worker and treated as a
    /// retryable error.
    async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError>;
}

/// A [`Handler`] from an async closure taking the [`TaskContext`].
///
/// ```
/// use agent_orchestra::engine::{handler_fn, TaskError};
/// let h = handler_fn(|ctx| async move {
///     Ok::<_, TaskError>(serde_json::json!({"echo": ctx.task.payload}))
/// });
/// # let _ = h;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    struct FnHandler<F>(F);
    #[async_trait]
    impl<F, Fut> Handler for FnHandler<F>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
            (self.0)(ctx).await
        }
    }
    Arc::new(FnHandler(f))
}

/// A [`Handler`] from a typed async function: the payload is deserialized into `I` (a payload
/// that does not fit FAILS the task at once with the reason), the output `O` is serialized into
/// the result.
///
/// ```
/// use agent_orchestra::engine::{typed, TaskError, TaskContext};
/// #[derive(serde::Deserialize)]
/// struct Research { topic: String }
/// #[derive(serde::Serialize)]
/// struct Findings { summary: String }
/// let h = typed(|input: Research, _ctx: TaskContext| async move {
///     Ok::<_, TaskError>(Findings { summary: format!("notes on {}", input.topic) })
/// });
/// # let _ = h;
/// ```
pub fn typed<I, O, F, Fut>(f: F) -> Arc<dyn Handler>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
{
    struct Typed<I, O, F>(F, PhantomData<fn(I) -> O>);
    #[async_trait]
    impl<I, O, F, Fut> Handler for Typed<I, O, F>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        async fn handle(&self, ctx: TaskContext) -> Result<Value, TaskError> {
            let input: I = serde_json::from_value(ctx.task.payload.clone()).map_err(|e| {
                TaskError::permanent(format!(
                    "payload does not match the handler's input type {}: {e}",
                    std::any::type_name::<I>()
                ))
            })?;
            let out = (self.0)(input, ctx).await?;
            serde_json::to_value(out).map_err(|e| {
                TaskError::permanent(format!("the handler's output could not be encoded: {e}"))
            })
        }
    }
    Arc::new(Typed(f, PhantomData))
}
