//! The one error type of the crate.
//!
//! Every backend converts its private errors into [`Error`] and says which backend they came from.
//! Each error is either *temporary* (a dropped connection, a broker restarting: retrying the same
//! call later may succeed) or *permanent* (bad input, a lost compare-and-set: retrying cannot help).
//! The worker retries temporary errors and never turns them into task failures.

use crate::model::{TaskId, TaskStatus};

/// The result type used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in agent-orchestra.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input was rejected: the field and the reason say what was wrong.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The field or argument that was wrong (`priority`, `queue`, `task_id`, `payload`, ...).
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A configuration key had an invalid value or was missing.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The configuration key (`ORCHESTRA_URL`, `worker.concurrency`, ...).
        key: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A URL named a scheme whose cargo feature is not compiled in.
    #[error("backend `{scheme}` is not available: rebuild with the cargo feature `{feature}` (features = [\"{feature}\"])")]
    FeatureDisabled {
        /// The URL scheme (`redis`, `nats`, `amqp`, ...).
        scheme: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// A URL could not be understood (its secrets are redacted in `url`).
    #[error("unsupported URL `{url}`: {reason}")]
    UnsupportedUrl {
        /// The URL with any password or token replaced by `***`.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The task does not exist.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// A task with this id already exists.
    #[error("task {0} already exists")]
    TaskExists(TaskId),
    /// A compare-and-set on a task lost: the task is no longer in the expected state.
    #[error("task {task_id} changed concurrently: expected {expected_status} attempt {expected_attempt}, found {actual_status} attempt {actual_attempt}")]
    Conflict {
        /// The task.
        task_id: TaskId,
        /// The status the caller expected.
        expected_status: TaskStatus,
        /// The attempt (fencing token) the caller expected.
        expected_attempt: u32,
        /// The status found.
        actual_status: TaskStatus,
        /// The attempt found.
        actual_attempt: u32,
    },
    /// The task model does not allow this change of status.
    #[error(
        "illegal transition of task {task_id}: {from} -> {to} ({})",
        crate::model::TaskStatus::moves_from(*from)
    )]
    IllegalTransition {
        /// The task.
        task_id: TaskId,
        /// Current status.
        from: TaskStatus,
        /// Requested status.
        to: TaskStatus,
    },
    /// A lock operation was attempted with a lease that no longer holds the lock.
    #[error("lock `{key}` is not held by this lease (expired or taken by another owner)")]
    NotLockOwner {
        /// The lock key.
        key: String,
    },
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The component is shutting down and refused new work.
    #[error("shutting down")]
    Shutdown,
    /// The backend does not offer this operation (a default trait method it did not
    /// implement). Permanent.
    #[error("the {backend} backend does not support {operation}")]
    Unsupported {
        /// Which backend.
        backend: &'static str,
        /// What was asked (`pausing queues`, `removing dead letters`, ...).
        operation: &'static str,
    },
    /// An error from a backend's client or server.
    #[error("{backend} backend: {message}")]
    Backend {
        /// Which backend (`memory`, `redis`, `nats`, `rabbitmq`).
        backend: &'static str,
        /// Whether retrying may succeed.
        temporary: bool,
        /// What happened, with secrets redacted.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// True when retrying the same operation later may succeed (a dropped connection, a
    /// broker restarting, a timeout). Permanent errors (bad input, a lost compare-and-set)
    /// return false.
    pub fn is_temporary(&self) -> bool {
        match self {
            Error::Backend { temporary, .. } => *temporary,
            Error::Timeout(_) => true,
            _ => false,
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for a temporary [`Error::Backend`] (connection lost, broker unavailable).
    pub fn temporary(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Error::Backend {
            backend,
            temporary: true,
            message: message.into(),
            source: source.into(),
        }
    }

    /// Shorthand for a permanent [`Error::Backend`] (protocol error, corrupt data).
    pub fn permanent(
        backend: &'static str,
        message: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Error::Backend {
            backend,
            temporary: false,
            message: message.into(),
            source: source.into(),
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
