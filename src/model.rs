//! The task model: identifiers, statuses and their legal transitions, and the task record.
//!
//! A [`Task`] is the lab's Pydantic `Task` grown up: the immutable part written once by the
//! dispatcher (id, queue, payload, priority, dependencies, attempt budget) and a mutable
//! [`TaskState`] that only changes through [`Registry::transition`](crate::Registry::transition),
//! a compare-and-set on `(status, attempt)`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Largest payload accepted by default (1 MiB + slack for the JSON envelope). Configurable.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

/// The identifier of a task: `task_<32 hex digits>` when generated; any 1..=128 characters from
/// `[A-Za-z0-9_.:-]` starting with a letter or digit when supplied by a caller (the lab used
/// `task_001`-style ids).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    /// A fresh random id, `task_` followed by a v4 UUID in simple form.
    pub fn generate() -> Self {
        TaskId(format!("task_{}", uuid::Uuid::new_v4().simple()))
    }

    /// Validates a caller-supplied id.
    ///
    /// ```
    /// use agent_orchestra::TaskId;
    /// assert!(TaskId::parse("task_001").is_ok());
    /// assert!(TaskId::parse("").is_err());
    /// assert!(TaskId::parse("has space").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        validate_name(s, 128, &['_', '.', ':', '-'])
            .map_err(|reason| Error::invalid("task_id", format!("{reason} (got {s:?})")))?;
        Ok(TaskId(s.to_string()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TaskId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TaskId::parse(s)
    }
}

impl TryFrom<String> for TaskId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        TaskId::parse(&s)
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.0
    }
}

/// The name of a work queue (the lab's "specialty channel", e.g. `research_tasks`):
/// 1..=64 characters from `[A-Za-z0-9_-]`, starting with a letter or digit, so that it is a
/// valid Redis key part, NATS subject token and stream name, and RabbitMQ queue name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    /// Validates a queue name.
    ///
    /// ```
    /// use agent_orchestra::QueueName;
    /// assert!(QueueName::parse("research_tasks").is_ok());
    /// assert!(QueueName::parse("bad name").is_err());
    /// assert!(QueueName::parse("").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        validate_name(s, 64, &['_', '-'])
            .map_err(|reason| Error::invalid("queue", format!("{reason} (got {s:?})")))?;
        Ok(QueueName(s.to_string()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for QueueName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        QueueName::parse(s)
    }
}

impl TryFrom<String> for QueueName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        QueueName::parse(&s)
    }
}

impl From<QueueName> for String {
    fn from(q: QueueName) -> String {
        q.0
    }
}

pub(crate) fn validate_name(
    s: &str,
    max: usize,
    extra: &[char],
) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > max {
        return Err(format!("must be at most {max} characters, is {}", s.len()));
    }
    let first = s.chars().next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() {
        return Err("must start with an ASCII letter or digit".into());
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(c)))
    {
        let allowed: String = extra.iter().collect();
        return Err(format!(
            "contains {bad:?}; only ASCII letters, digits and {allowed:?} are allowed"
        ));
    }
    Ok(())
}

/// Urgency of a task: 1 (most urgent) ..= 10 (least urgent), default 5, as in the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The most urgent priority, 1.
    pub const HIGHEST: Priority = Priority(1);
    /// The least urgent priority, 10.
    pub const LOWEST: Priority = Priority(10);
    /// The default priority, 5.
    pub const DEFAULT: Priority = Priority(5);

    /// Validates a priority.
    ///
    /// ```
    /// use agent_orchestra::Priority;
    /// assert_eq!(Priority::new(1).unwrap().get(), 1);
    /// assert!(Priority::new(0).is_err());
    /// assert!(Priority::new(11).is_err());
    /// ```
    pub fn new(p: i64) -> Result<Self> {
        if (1..=10).contains(&p) {
            Ok(Priority(p as u8))
        } else {
            Err(Error::invalid(
                "priority",
                format!("must be between 1 (most urgent) and 10 (least urgent), got {p}"),
            ))
        }
    }

    /// The numeric value, 1..=10.
    pub fn get(self) -> u8 {
        self.0
    }

    /// Index 0..=9 where 0 is the most urgent (handy for per-level structures).
    pub fn index(self) -> usize {
        (self.0 - 1) as usize
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

impl TryFrom<u8> for Priority {
    type Error = Error;
    fn try_from(p: u8) -> Result<Self> {
        Priority::new(p as i64)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a task is in its life.
///
/// The lab's four statuses plus `WAITING` (dependencies not yet completed) and `CANCELLED`.
/// A retry goes back to `PENDING` with the previous error kept and its message delayed on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    /// Waiting for the tasks in `depends_on` to complete; not on any queue yet.
    Waiting,
    /// Ready (or delayed) on its queue, waiting for a worker.
    Pending,
    /// Claimed by a worker that holds a lease on it.
    Running,
    /// Finished with a result. Terminal.
    Completed,
    /// Failed for good (attempts spent, bad input, a failed dependency, a timeout).
    Failed,
    /// Cancelled by an operator: before it ran, or while it ran (its worker is asked to stop the
    /// handler, and any outcome of that attempt is refused).
    Cancelled,
}

impl TaskStatus {
    /// All statuses, in life order.
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Waiting,
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The wire name, as in the lab (`PENDING`, `RUNNING`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Waiting => "WAITING",
            TaskStatus::Pending => "PENDING",
            TaskStatus::Running => "RUNNING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Failed => "FAILED",
            TaskStatus::Cancelled => "CANCELLED",
        }
    }

    /// True for COMPLETED, FAILED and CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// The one table of legal transitions.
    ///
    /// * WAITING → PENDING (parents completed), FAILED (a parent failed), CANCELLED
    /// * PENDING → RUNNING (claimed), CANCELLED, FAILED (e.g. attempts already spent),
    ///   PENDING (re-announced by the monitor after its message was lost)
    /// * RUNNING → RUNNING (lease renewed, or a stale lease taken over with a new attempt),
    ///   COMPLETED, FAILED, PENDING (retry, lease lost, or handed back on shutdown),
    ///   CANCELLED (an operator's cancel; the running attempt is fenced off)
    /// * FAILED, CANCELLED → PENDING (an operator's retry)
    /// * COMPLETED → nothing
    pub fn can_transition_to(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Waiting, Pending | Failed | Cancelled)
                | (Pending, Pending | Running | Cancelled | Failed)
                | (Running, Running | Completed | Failed | Pending | Cancelled)
                | (Failed | Cancelled, Pending)
        )
    }
}

impl TaskStatus {
    /// Where a task of status `from` may go, in words (for the error that refuses a move).
    pub(crate) fn moves_from(from: TaskStatus) -> String {
        let to: Vec<&str> = TaskStatus::ALL
            .into_iter()
            .filter(|t| *t != from && from.can_transition_to(*t))
            .map(TaskStatus::as_str)
            .collect();
        if to.is_empty() {
            format!("a {from} task never changes")
        } else {
            format!("a {from} task may only become {}", to.join(" or "))
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::invalid(
                    "status",
                    format!("unknown status {s:?}; expected one of WAITING, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED"),
                )
            })
    }
}

/// The mutable part of a task, replaced as a whole by each compare-and-set transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// Current status.
    pub status: TaskStatus,
    /// How many times the task has been claimed. Each claim increments it; it is the fencing
    /// token of the claim: a worker whose lease was lost cannot write over a newer attempt.
    pub attempt: u32,
    /// How many of those claims a worker handed back unfinished when it shut down. They do not
    /// count against `max_attempts` (see [`Task::charged_attempts`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub handed_back: u32,
    /// The worker that holds (or last held) the task.
    pub worker_id: Option<String>,
    /// The handler's output, when COMPLETED.
    pub result: Option<Value>,
    /// The last error (kept across retries, and on FAILED).
    pub error: Option<String>,
    /// When the running attempt's lease ends unless renewed.
    pub lease_until: Option<DateTime<Utc>>,
    /// When the running attempt last renewed its lease.
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When the current (or last) attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the task reached a terminal status.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the message of a PENDING task becomes ready, when that is later than the change
    /// that announced it: a dispatch delay or a retry's backoff. (Kept as history after that;
    /// the monitor does not take a task whose message is still delayed for an orphan.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<DateTime<Utc>>,
    /// The running attempt's last progress report ([`TaskContext::progress`](crate::engine::TaskContext::progress)):
    /// a small JSON value, written at most once a second, kept while the task runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    /// When the task last changed.
    pub updated_at: DateTime<Utc>,
}

/// A task as stored in the [`Registry`](crate::Registry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Unique id.
    pub task_id: TaskId,
    /// The work queue (specialty) that runs it.
    pub queue: QueueName,
    /// The input, any JSON value.
    pub payload: Value,
    /// 1 (most urgent) ..= 10.
    pub priority: Priority,
    /// How many attempts the task may use before it FAILS for good (>= 1).
    pub max_attempts: u32,
    /// Tasks that must COMPLETE before this one is queued.
    pub depends_on: Vec<TaskId>,
    /// When the task was registered.
    pub created_at: DateTime<Utc>,
    /// The longest one attempt may run: past it the handler is signalled and, after the
    /// worker's `cancel_grace`, dropped, and the attempt fails retryably ("timed out after
    /// T"). Overrides the worker's `handler_timeout`. Whole milliseconds.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::clock::duration_opt"
    )]
    pub timeout: Option<Duration>,
    /// "Not after": a task that no worker started by then fails with a reason instead of
    /// running late, and a retry that would start after it is not made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of the dispatch (`00-<trace id>-<span id>-<flags>`): each
    /// attempt's span is its child, so a pipeline's tasks form one trace (feature `otel`; without
    /// it the field is only carried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The mutable state.
    #[serde(flatten)]
    pub state: TaskState,
}

/// The bounds `limits` puts on a task's payload, attempts and dependencies.
pub(crate) fn check_limits(
    payload: &Value,
    max_attempts: u32,
    depends_on: &[TaskId],
    limits: &Limits,
) -> Result<()> {
    let size = payload_size(payload);
    if size > limits.max_payload_bytes {
        return Err(Error::invalid(
            "payload",
            format!(
                "is {size} bytes of JSON, more than the limit of {} bytes",
                limits.max_payload_bytes
            ),
        ));
    }
    if max_attempts == 0 || max_attempts > limits.max_attempts_cap {
        return Err(Error::invalid(
            "max_attempts",
            format!(
                "must be between 1 and {}, got {max_attempts}",
                limits.max_attempts_cap
            ),
        ));
    }
    if depends_on.len() > limits.max_dependencies {
        return Err(Error::invalid(
            "depends_on",
            format!(
                "at most {} dependencies, got {}",
                limits.max_dependencies,
                depends_on.len()
            ),
        ));
    }
    Ok(())
}

/// Bounds applied to incoming tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest payload, in bytes of its JSON encoding.
    pub max_payload_bytes: usize,
    /// Largest `max_attempts` a task may ask for.
    pub max_attempts_cap: u32,
    /// Most dependencies a task may have.
    pub max_dependencies: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_attempts_cap: 100,
            max_dependencies: 64,
        }
    }
}

impl Task {
    /// A new task in PENDING (or WAITING when it has dependencies), attempt 0.
    ///
    /// Validates the payload size, `max_attempts` and dependencies against `limits`.
    pub fn new(
        queue: QueueName,
        payload: Value,
        priority: Priority,
        max_attempts: u32,
        depends_on: Vec<TaskId>,
        limits: &Limits,
    ) -> Result<Task> {
        check_limits(&payload, max_attempts, &depends_on, limits)?;
        let now = Utc::now();
        let status = if depends_on.is_empty() {
            TaskStatus::Pending
        } else {
            TaskStatus::Waiting
        };
        Ok(Task {
            task_id: TaskId::generate(),
            queue,
            payload,
            priority,
            max_attempts,
            depends_on,
            created_at: now,
            timeout: None,
            deadline: None,
            traceparent: None,
            state: TaskState {
                status,
                attempt: 0,
                handed_back: 0,
                worker_id: None,
                result: None,
                error: None,
                lease_until: None,
                heartbeat_at: None,
                started_at: None,
                finished_at: None,
                ready_at: None,
                progress: None,
                updated_at: now,
            },
        })
    }

    /// The task's status.
    pub fn status(&self) -> TaskStatus {
        self.state.status
    }

    /// The compare-and-set precondition matching this task's current state.
    pub fn expect(&self) -> Expected {
        Expected {
            status: self.state.status,
            attempt: self.state.attempt,
        }
    }

    /// True when RUNNING and its lease ended before `now`.
    pub fn lease_expired(&self, now: DateTime<Utc>) -> bool {
        self.state.status == TaskStatus::Running
            && self.state.lease_until.is_none_or(|until| until <= now)
    }

    /// The attempts that count against `max_attempts`: the claims, less those handed back by a
    /// worker shutting down (a hand-back is not a failure, so it costs no retry).
    pub fn charged_attempts(&self) -> u32 {
        self.state.attempt.saturating_sub(self.state.handed_back)
    }

    /// Whether another attempt is allowed after the current one.
    pub fn attempts_left(&self) -> bool {
        self.charged_attempts() < self.max_attempts
    }

    /// Whether the task's deadline is before `at` (an attempt starting then would be late).
    pub fn past_deadline(&self, at: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|d| d < at)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Checks a W3C `traceparent` (version 00): `00-` then 32 and 16 lowercase hex digits, neither
/// all zeros, and two hex digits of flags, separated by `-`.
///
/// ```
/// use agent_orchestra::model::validate_traceparent;
/// assert!(validate_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok());
/// assert!(validate_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err());
/// assert!(validate_traceparent("not a traceparent").is_err());
/// ```
pub fn validate_traceparent(s: &str) -> Result<()> {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |p: &str| p.bytes().all(|b| b == b'0');
    let ok = parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && !zero(parts[1])
        && hex(parts[2], 16)
        && !zero(parts[2])
        && hex(parts[3], 2);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "traceparent",
            format!("{s:?} is not a W3C traceparent such as 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ))
    }
}

/// Parses a JSON payload given as text, with a typed error for text that is not JSON.
///
/// ```
/// use agent_orchestra::model::parse_payload;
/// assert!(parse_payload(r#"{"topic": "quantum"}"#).is_ok());
/// assert!(parse_payload("{not json").is_err());
/// ```
pub fn parse_payload(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| Error::invalid("payload", format!("is not JSON: {e}")))
}

fn payload_size(v: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// The precondition of a compare-and-set: the status and attempt the caller last saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Expected current status.
    pub status: TaskStatus,
    /// Expected current attempt (the fencing token).
    pub attempt: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_transition_says_where_the_task_may_go() {
        let e = |from, to| {
            Error::IllegalTransition {
                task_id: TaskId::parse("r1").unwrap(),
                from,
                to,
            }
            .to_string()
        };
        assert_eq!(
            e(TaskStatus::Running, TaskStatus::Waiting),
            "illegal transition of task r1: RUNNING -> WAITING (a RUNNING task may only become PENDING or COMPLETED or FAILED or CANCELLED)"
        );
        assert_eq!(
            e(TaskStatus::Completed, TaskStatus::Pending),
            "illegal transition of task r1: COMPLETED -> PENDING (a COMPLETED task never changes)"
        );
    }

    #[test]
    fn transition_table_is_closed_over_terminal_completed() {
        for to in TaskStatus::ALL {
            assert!(!TaskStatus::Completed.can_transition_to(to));
        }
        assert!(TaskStatus::Pending.can_transition_to(TaskStatus::Running));
        assert!(!TaskStatus::Pending.can_transition_to(TaskStatus::Completed));
        assert!(!TaskStatus::Waiting.can_transition_to(TaskStatus::Running));
    }

    #[test]
    fn status_round_trips_through_its_wire_name() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("DONE".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn oversized_payload_is_rejected_with_its_size() {
        let limits = Limits {
            max_payload_bytes: 10,
            ..Limits::default()
        };
        let q = QueueName::parse("q").unwrap();
        let err = Task::new(
            q,
            serde_json::json!({"a": "0123456789"}),
            Priority::DEFAULT,
            1,
            vec![],
            &limits,
        )
        .unwrap_err();
        assert!(err.to_string().contains("limit of 10 bytes"), "{err}");
    }

    #[test]
    fn names_reject_bad_characters() {
        assert!(QueueName::parse("a.b").is_err());
        assert!(QueueName::parse("-a").is_err());
        assert!(QueueName::parse(&"a".repeat(65)).is_err());
        assert!(TaskId::parse("task_0b8f").is_ok());
        assert!(TaskId::parse("task/1").is_err());
        assert!(serde_json::from_str::<TaskId>("\"bad id\"").is_err());
        assert!(serde_json::from_str::<Priority>("11").is_err());
    }
}
