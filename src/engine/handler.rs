//! What a worker runs: [`Handler`]s, from closures or typed functions.

use std::any::Any;
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

/// `?` on an error inside a handler: errors that another attempt cannot fix are
/// **permanent** — a JSON decode error ([`serde_json::Error`] other than I/O), a number, bool,
/// UTF-8, date, UUID or URL that does not parse, and this crate's own [`Error`](crate::Error)
/// when it is not temporary (bad input, a task not found) — and everything else is
/// **retryable** (I/O, timeouts, a client's error). Say it yourself where this guess is wrong:
/// [`TaskResultExt::retryable`] and [`TaskResultExt::permanent`], or build the error with
/// [`TaskError::retryable`] / [`TaskError::permanent`].
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        if is_permanent(&e) {
            TaskError::permanent(e)
        } else {
            TaskError::retryable(e)
        }
    }
}

/// Whether `e` is a kind of error no retry can fix: bad data, not a failing service.
fn is_permanent(e: &(dyn Any + Send + Sync)) -> bool {
    if let Some(json) = e.downcast_ref::<serde_json::Error>() {
        return !json.is_io();
    }
    if let Some(ours) = e.downcast_ref::<crate::Error>() {
        return !ours.is_temporary();
    }
    e.is::<std::num::ParseIntError>()
        || e.is::<std::num::ParseFloatError>()
        || e.is::<std::num::TryFromIntError>()
        || e.is::<std::str::ParseBoolError>()
        || e.is::<std::str::Utf8Error>()
        || e.is::<std::string::FromUtf8Error>()
        || e.is::<chrono::ParseError>()
        || e.is::<uuid::Error>()
        || e.is::<url::ParseError>()
}

/// Says how a handler's error should be treated, where the default of `?` (see
/// [`TaskError`]'s `From`) does not fit.
///
/// ```
/// use agent_orchestra::prelude::*;
/// async fn call_model(prompt: &str) -> Result<String, std::io::Error> { Ok(prompt.into()) }
///
/// let h = handler_fn(|ctx: TaskContext| async move {
///     // A missing field is the caller's mistake: fail now, no retry.
///     let prompt = ctx.task.payload["prompt"].as_str().ok_or("no prompt").permanent()?;
///     // The model's service may be down for a minute: try again later.
///     let answer = call_model(prompt).await.retryable()?;
///     Ok(serde_json::json!({ "answer": answer }))
/// });
/// # let _ = h;
/// ```
pub trait TaskResultExt<T> {
    /// The error, if any, is worth another attempt.
    fn retryable(self) -> Result<T, TaskError>;
    /// The error, if any, fails the task now, whatever attempts are left.
    fn permanent(self) -> Result<T, TaskError>;
}

impl<T, E: fmt::Display> TaskResultExt<T> for std::result::Result<T, E> {
    fn retryable(self) -> Result<T, TaskError> {
        self.map_err(TaskError::retryable)
    }

    fn permanent(self) -> Result<T, TaskError> {
        self.map_err(TaskError::permanent)
    }
}

impl<T> TaskResultExt<T> for Option<T> {
    fn retryable(self) -> Result<T, TaskError> {
        self.ok_or_else(|| TaskError::retryable("a value was missing"))
    }

    fn permanent(self) -> Result<T, TaskError> {
        self.ok_or_else(|| TaskError::permanent("a value was missing"))
    }
}

/// The cancellation signal of one running attempt: set when an operator cancels the task
/// ([`Dispatcher::cancel`](crate::engine::Dispatcher::cancel), `orchestra cancel`) while it
/// runs, or when the attempt runs over its timeout ([`Task::timeout`](crate::Task::timeout),
/// else the worker's `handler_timeout`: the attempt then fails retryably). A handler that does long work polls [`is_cancelled`](Self::is_cancelled) between steps
/// or races its work against [`cancelled`](Self::cancelled), and returns early (what it returns
/// then is discarded: the task is already CANCELLED, or the attempt timed out). A handler that
/// ignores the signal is dropped by its worker after [`WorkerConfig::cancel_grace`](crate::engine::WorkerConfig).
#[derive(Clone, Debug)]
pub struct Cancellation(tokio::sync::watch::Receiver<bool>);

impl Cancellation {
    /// A signal and the sender that sets it (the worker keeps the sender).
    pub(crate) fn channel() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Cancellation(rx))
    }

    /// A signal that is never set (a context built outside a worker).
    pub fn never() -> Self {
        Cancellation::channel().1
    }

    /// True once the task was cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the task is cancelled; never, if it is not.
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        let sender_gone = rx.wait_for(|set| *set).await.is_err();
        if sender_gone {
            std::future::pending::<()>().await;
        }
    }
}

/// What a handler gets: the task, read access to the registry (to read a parent's result,
/// as the lab's Writer reads the Researcher's), and the attempt's cancellation signal.
#[derive(Clone)]
pub struct TaskContext {
    /// The task as claimed (status RUNNING, `attempt` = this attempt).
    pub task: Task,
    /// The id of the worker running it.
    pub worker_id: Arc<str>,
    registry: Arc<dyn Registry>,
    cancellation: Cancellation,
    progress: Arc<tokio::sync::watch::Sender<Option<Value>>>,
}

/// The largest progress report, in bytes of its JSON encoding.
pub const MAX_PROGRESS_BYTES: usize = 4096;

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
            cancellation: Cancellation::never(),
            progress: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    /// The same context reporting progress to `sender` (the worker keeps its receiver).
    pub(crate) fn with_progress(
        mut self,
        sender: Arc<tokio::sync::watch::Sender<Option<Value>>>,
    ) -> Self {
        self.progress = sender;
        self
    }

    /// Reports how far the task has got: a small JSON value (at most [`MAX_PROGRESS_BYTES`]),
    /// shown by `orchestra task get` and the dashboard, and kept on the task. It costs nothing
    /// at the call: the worker writes the latest report with the attempt's next write, at most
    /// once a second (earlier reports in between are replaced, not queued). A value that does
    /// not encode, or is too large, is an [`Error::InvalidInput`](crate::Error::InvalidInput)
    /// and changes nothing.
    ///
    /// ```
    /// use agent_orchestra::prelude::*;
    /// let h = handler_fn(|ctx: TaskContext| async move {
    ///     for step in 1..=3 {
    ///         ctx.progress(serde_json::json!({ "step": step, "of": 3 }))?;
    ///     }
    ///     Ok(serde_json::json!("done"))
    /// });
    /// # let _ = h;
    /// ```
    pub fn progress(&self, value: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(value)
            .map_err(|e| crate::Error::invalid("progress", format!("does not encode: {e}")))?;
        let size = value.to_string().len();
        if size > MAX_PROGRESS_BYTES {
            return Err(crate::Error::invalid(
                "progress",
                format!("is {size} bytes of JSON; at most {MAX_PROGRESS_BYTES} are kept"),
            ));
        }
        self.progress.send_replace(Some(value));
        Ok(())
    }

    /// The same context with `signal` as its cancellation signal.
    pub fn with_cancellation(mut self, signal: Cancellation) -> Self {
        self.cancellation = signal;
        self
    }

    /// The attempt's cancellation signal (a clone can be moved into spawned work).
    pub fn cancellation(&self) -> &Cancellation {
        &self.cancellation
    }

    /// True once an operator cancelled the task while this attempt runs, or the attempt ran
    /// over its timeout.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }

    /// Resolves when an operator cancels the task while this attempt runs, or when the attempt
    /// runs over its timeout; never otherwise.
    ///
    /// ```
    /// use agent_orchestra::prelude::*;
    /// let h = handler_fn(|ctx: TaskContext| async move {
    ///     tokio::select! {
    ///         _ = ctx.cancelled() => Err(TaskError::permanent("cancelled")),
    ///         _ = tokio::time::sleep(std::time::Duration::from_secs(600)) => Ok(serde_json::json!("done")),
    ///     }
    /// });
    /// # let _ = h;
    /// ```
    pub async fn cancelled(&self) {
        self.cancellation.cancelled().await
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

    /// The results of the tasks in `depends_on`, in order, each decoded into `T`. A result
    /// that does not decode is a permanent error naming the parent; a registry that cannot be
    /// read is a retryable one.
    pub async fn parent_results_as<T: DeserializeOwned>(&self) -> Result<Vec<T>, TaskError> {
        self.parent_results()
            .await?
            .into_iter()
            .map(|(id, value)| decode_parent::<T>(&id, value))
            .collect()
    }

    /// The result of the one task in `depends_on`, decoded into `T` (the Writer reading the
    /// Researcher's findings). A permanent error when the task has no dependency or several.
    pub async fn parent_result<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        match self.task.depends_on.len() {
            1 => {}
            n => {
                return Err(TaskError::permanent(format!(
                    "parent_result needs exactly one dependency; task {} has {n} (use parent_results_as)",
                    self.task.task_id
                )))
            }
        }
        let mut all = self.parent_results_as::<T>().await?;
        all.pop()
            .ok_or_else(|| TaskError::permanent("the dependency's result is missing"))
    }
}

fn decode_parent<T: DeserializeOwned>(id: &TaskId, value: Value) -> Result<T, TaskError> {
    serde_json::from_value(value).map_err(|e| {
        TaskError::permanent(format!(
            "the result of dependency {id} does not match {}: {e}",
            std::any::type_name::<T>()
        ))
    })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bundle::Backends;
    use crate::engine::{Dispatcher, Worker, WorkerConfig};

    fn from<E: std::error::Error + Send + Sync + 'static>(e: E) -> TaskError {
        TaskError::from(e)
    }

    #[test]
    fn question_mark_on_bad_data_is_permanent_and_on_a_failing_service_retryable() {
        let json = serde_json::from_str::<u32>("\"x\"").unwrap_err();
        assert!(!from(json).retryable);
        assert!(!from("x".parse::<i64>().unwrap_err()).retryable);
        assert!(!from(crate::Error::invalid("payload", "bad")).retryable);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(from(io).retryable);
        assert!(from(crate::Error::Timeout("slow".into())).retryable);
    }

    #[test]
    fn the_caller_overrides_the_guess() {
        let json = serde_json::from_str::<u32>("\"x\"");
        assert!(json.retryable().unwrap_err().retryable);
        let io: std::result::Result<(), _> = Err(std::io::Error::other("x"));
        assert!(!io.permanent().unwrap_err().retryable);
        assert!(!None::<u8>.permanent().unwrap_err().retryable);
    }

    #[tokio::test]
    async fn a_payload_decode_error_fails_the_task_on_its_first_attempt() {
        let b = Backends::memory();
        let worker = Worker::new(b.clone(), WorkerConfig::default())
            .handle(
                "q",
                handler_fn(|ctx: TaskContext| async move {
                    let n: u32 = serde_json::from_value(ctx.task.payload["n"].clone())?;
                    Ok(serde_json::json!(n))
                }),
            )
            .unwrap()
            .start()
            .unwrap();
        let d = Dispatcher::new(b);
        let id = d
            .task("q")
            .json(serde_json::json!({"n": "not a number"}))
            .max_attempts(3)
            .send()
            .await
            .unwrap();
        let done = d.wait(&id, Duration::from_secs(10)).await.unwrap();
        worker.shutdown().await;
        assert_eq!(done.status(), TaskStatus::Failed);
        assert_eq!(done.state.attempt, 1, "a decode error must not be retried");
    }

    #[tokio::test]
    async fn typed_parent_results_decode_or_fail_permanently() {
        #[derive(serde::Deserialize)]
        struct Findings {
            summary: String,
        }
        let b = Backends::memory();
        let worker = Worker::new(b.clone(), WorkerConfig::default())
            .handle(
                "research",
                handler_fn(|_| async { Ok(serde_json::json!({"summary": "notes"})) }),
            )
            .unwrap()
            .handle(
                "writing",
                handler_fn(|ctx: TaskContext| async move {
                    let f: Findings = ctx.parent_result().await?;
                    Ok(serde_json::json!(format!("article on {}", f.summary)))
                }),
            )
            .unwrap()
            .handle(
                "wrong_type",
                handler_fn(|ctx: TaskContext| async move {
                    let n: Vec<u64> = ctx.parent_results_as().await?;
                    Ok(serde_json::json!(n))
                }),
            )
            .unwrap()
            .start()
            .unwrap();
        let d = Dispatcher::new(b);
        let parent = d.task("research").send().await.unwrap();
        let good = d
            .task("writing")
            .after([parent.clone()])
            .send()
            .await
            .unwrap();
        let bad = d.task("wrong_type").after([parent]).send().await.unwrap();
        let good = d.wait(&good, Duration::from_secs(10)).await.unwrap();
        let bad = d.wait(&bad, Duration::from_secs(10)).await.unwrap();
        worker.shutdown().await;
        assert_eq!(
            good.state.result,
            Some(serde_json::json!("article on notes"))
        );
        assert_eq!(bad.status(), TaskStatus::Failed);
        assert_eq!(bad.state.attempt, 1);
        let why = bad.state.error.unwrap_or_default();
        assert!(why.contains("does not match"), "{why}");
    }

    #[tokio::test]
    async fn only_a_caught_panic_counts_as_one() {
        let b = Backends::memory();
        let worker = Worker::new(b.clone(), WorkerConfig::default())
            .handle(
                "says",
                handler_fn(|_| async { Err(TaskError::permanent("handler panicked: not really")) }),
            )
            .unwrap()
            .handle("panics", handler_fn(|_| async { panic!("for real") }))
            .unwrap()
            .start()
            .unwrap();
        let d = Dispatcher::new(b);
        let says = d.task("says").send().await.unwrap();
        let panics = d.task("panics").max_attempts(1).send().await.unwrap();
        d.wait(&says, Duration::from_secs(10)).await.unwrap();
        d.wait(&panics, Duration::from_secs(10)).await.unwrap();
        let m = worker.metrics();
        worker.shutdown().await;
        assert_eq!(m.panics, 1);
    }

    #[test]
    fn a_second_handler_for_one_queue_is_refused() {
        let w = Worker::new(Backends::memory(), WorkerConfig::default())
            .handle("q", handler_fn(|_| async { Ok(serde_json::Value::Null) }))
            .unwrap();
        let err = w
            .handle("q", handler_fn(|_| async { Ok(serde_json::Value::Null) }))
            .unwrap_err();
        assert!(err.to_string().contains("already has a handler"), "{err}");
    }
}
