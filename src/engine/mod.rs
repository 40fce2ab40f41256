//! The engine, written once against `Arc<dyn Bus>`, `Arc<dyn Registry>` and
//! `Arc<dyn LockManager>`: the [`Dispatcher`], the [`Worker`] and the [`Monitor`].

mod builder;
mod control;
mod dispatcher;
mod flow;
mod handler;
pub mod metrics;
mod monitor;
mod retry;
mod roster;
mod schedule;
mod trace;
mod unique;
mod worker;

pub use builder::TaskBuilder;
pub use control::{Control, DeadLetterOutcome, DeadLetterSelection, QueueInfo, CONTROL_TOPIC};
pub use dispatcher::{DispatchOptions, Dispatcher, MAX_TASK_TIMEOUT};
pub use handler::{
    handler_fn, typed, Cancellation, Handler, TaskContext, TaskError, TaskResultExt,
    MAX_PROGRESS_BYTES,
};
#[cfg(feature = "metrics")]
pub use metrics::prometheus::backend_gauges;
pub use metrics::{MetricsSnapshot, WorkerMetrics};
pub use monitor::{Monitor, MonitorConfig, MonitorHandle, MonitorReport};
pub use retry::Backoff;
pub use roster::{list_workers, RunningTask, WorkerInfo, MAX_LISTEN, WORKERS_TOPIC};
pub use schedule::{ScheduleInfo, SchedulePass, Schedules};
pub use unique::{Unique, MAX_UNIQUE_KEY};
pub use worker::{
    default_worker_id, CancelNotice, Finished, ShutdownReport, Worker, WorkerConfig, WorkerHandle,
    CANCELS_TOPIC,
};
