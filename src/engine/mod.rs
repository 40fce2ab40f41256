//! The engine, written once against `Arc<dyn Bus>`, `Arc<dyn Registry>` and
//! `Arc<dyn LockManager>`: the [`Dispatcher`], the [`Worker`] and the [`Monitor`].

mod builder;
mod dispatcher;
mod flow;
mod handler;
pub mod metrics;
mod monitor;
mod retry;
mod roster;
mod worker;

pub use builder::TaskBuilder;
pub use dispatcher::{DispatchOptions, Dispatcher};
pub use handler::{handler_fn, typed, Handler, TaskContext, TaskError, TaskResultExt};
#[cfg(feature = "metrics")]
pub use metrics::prometheus::backend_gauges;
pub use metrics::{MetricsSnapshot, WorkerMetrics};
pub use monitor::{Monitor, MonitorConfig, MonitorHandle, MonitorReport};
pub use retry::Backoff;
pub use roster::{list_workers, RunningTask, WorkerInfo, MAX_LISTEN, WORKERS_TOPIC};
pub use worker::{default_worker_id, Finished, ShutdownReport, Worker, WorkerConfig, WorkerHandle};
