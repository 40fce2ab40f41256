//! # agent-orchestra
//!
//! Event-driven task orchestration for independent agents: a [`Dispatcher`] registers tasks in
//! a [`Registry`] and announces them on a [`Bus`]; [`Worker`]s serving a queue (their
//! specialty) claim them by compare-and-set, run them under a lease and record the outcome; a
//! [`Monitor`] counts tasks by status and recovers tasks whose worker died. The engine is
//! written once against three traits — [`Bus`], [`Registry`], [`LockManager`] — implemented in
//! memory (always), and for Redis, NATS JetStream and RabbitMQ behind the cargo features
//! `redis`, `nats` and `rabbitmq`. Its hot path is the [`TaskQueue`] trait, implemented once
//! over a [`Bus`] and a [`Registry`] ([`task_queue::Composed`]) and by a backend holding both in
//! one server in fewer round trips ([`Backends::tasks`]).
//!
//! ## Example
//!
//! A Researcher agent and a Writer agent that builds on its result, in memory (the same code
//! runs on a broker: [`Config::connect`](config::Config::connect) picks the backend by URL).
//!
//! ```
//! use std::time::Duration;
//! use agent_orchestra::prelude::*;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Research { topic: String }
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Findings { summary: String }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let backends = Backends::memory();
//! let worker = Worker::new(backends.clone(), WorkerConfig::default())
//!     .handle("research_tasks", typed(|r: Research, _ctx: TaskContext| async move {
//!         Ok::<_, TaskError>(Findings { summary: format!("notes on {}", r.topic) })
//!     }))?
//!     .handle("writing_tasks", handler_fn(|ctx: TaskContext| async move {
//!         let findings: Findings = ctx.parent_result().await?;
//!         Ok(serde_json::json!({ "article": format!("Article: {}", findings.summary) }))
//!     }))?
//!     .start()?;
//!
//! let dispatcher = Dispatcher::new(backends);
//! let research = dispatcher
//!     .task("research_tasks")
//!     .payload(&Research { topic: "AI agents".into() })
//!     .priority(2)
//!     .send()
//!     .await?;
//! let article = dispatcher.task("writing_tasks").after([research.clone()]).send().await?;
//!
//! let done = dispatcher.wait(&article, Duration::from_secs(10)).await?;
//! assert_eq!(done.status(), TaskStatus::Completed);
//! assert_eq!(done.state.result.unwrap()["article"], "Article: notes on AI agents");
//! worker.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Modules, by layer
//!
//! Imports run one way, from the foundations up (docs/design.md, "Layers"):
//!
//! 1. foundations: [`model`], [`schedule`], [`error`], [`wire`], [`redact_url`], the clock;
//! 2. contracts: the traits [`bus`], [`registry`], [`lock`], [`task_queue`], and the bundle
//!    ([`Backends`], [`bundle`]);
//! 3. the [`engine`] (dispatcher, worker, monitor) and the [`backends`], which never import each
//!    other;
//! 4. [`connect`](mod@connect) (URL to backend) and [`config`];
//! 5. the CLI (feature `cli`) and the [`testkit`](crate#features) (feature `testkit`).
//!
//! The traits, [`bundle`] and [`task_queue`] are for backend authors: they are public so that a
//! third-party backend can implement them, and are **not a stable API** yet.
//!
//! ## Features
//!
//! `redis`, `nats`, `rabbitmq`: the broker backends. `testkit`: the conformance suite and the
//! real-broker test harness, for a third-party backend's tests. `cli`: the `orchestra` binary's
//! code. `full`: all of them.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backends;
pub mod bundle;
pub mod bus;
mod clock;
pub mod config;
pub mod connect;
#[cfg(feature = "dashboard")]
#[cfg_attr(docsrs, doc(cfg(feature = "dashboard")))]
pub mod dashboard;
pub mod engine;
pub mod error;
pub mod lock;
pub mod model;
#[cfg(feature = "nats")]
mod presence;
pub mod queue_limits;
mod redact;
pub mod registry;
pub mod schedule;
pub mod task_queue;
mod task_table;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod wire;

pub use bundle::{Backends, ConnectOptions};
pub use bus::{Bus, DeadLetter, QueueStats, Subscription};
pub use connect::{connect, BackendUrls};
pub use engine::{
    handler_fn, typed, DispatchOptions, Dispatcher, Monitor, MonitorConfig, MonitorHandle,
    Schedules, TaskContext, TaskError, Worker, WorkerConfig, WorkerHandle,
};
pub use error::{Error, Result};
pub use lock::{Lease, LockHolder, LockManager};
pub use model::{Expected, Limits, Priority, QueueName, Task, TaskId, TaskState, TaskStatus};
pub use queue_limits::{QueueLimits, Rate};
pub use redact::redact_url;
pub use registry::{Registry, Retention, StatusCounts, TaskFilter, TaskPage};
pub use schedule::{CatchUp, Recurrence, Schedule, ScheduleName};
pub use task_queue::TaskQueue;
pub use wire::{TaskEvent, EVENTS_TOPIC};

/// The names most programs need: `use agent_orchestra::prelude::*;`.
pub mod prelude {
    pub use crate::config::Config;
    pub use crate::engine::{
        handler_fn, typed, DispatchOptions, Dispatcher, Monitor, MonitorConfig, TaskContext,
        TaskError, TaskResultExt, Worker, WorkerConfig,
    };
    pub use crate::{Backends, Error, Priority, QueueName, Task, TaskId, TaskStatus};
}
