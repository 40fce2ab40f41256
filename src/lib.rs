//! # agent-orchestra
//!
//! Event-driven task orchestration for independent agents: a [`Dispatcher`](engine::Dispatcher)
//! registers tasks in a [`Registry`] and announces them on a [`Bus`]; [`Worker`](engine::Worker)s
//! serving a queue (their specialty) claim them by compare-and-set, run them under a lease and
//! record the outcome; a [`Monitor`](engine::Monitor) counts tasks by status and recovers tasks
//! whose worker died. The engine is written once against three traits — [`Bus`], [`Registry`],
//! [`LockManager`] — implemented in memory (always), and for Redis, NATS JetStream and RabbitMQ
//! behind the cargo features `redis`, `nats` and `rabbitmq`. Its hot path is the [`TaskQueue`]
//! trait, implemented once over a [`Bus`] and a [`Registry`] ([`task_queue::Composed`]) and by a
//! backend holding both in one server in fewer round trips ([`Backends::tasks`]).
#![warn(missing_docs)]

pub mod backends;
pub mod bus;
mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod lock;
pub mod model;
#[cfg(feature = "nats")]
mod presence;
pub mod registry;
pub mod task_queue;
mod task_table;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use backends::{connect, BackendUrls, Backends, ConnectOptions};
pub use bus::{Bus, DeadLetter, Delivery, FetchOptions, OutgoingMessage, QueueStats, Subscription};
pub use error::{Error, Result};
pub use lock::{Lease, LockHolder, LockManager};
pub use model::{Expected, Limits, Priority, QueueName, Task, TaskId, TaskState, TaskStatus};
pub use registry::{Registry, Retention, StatusCounts, TaskFilter, TaskPage};
pub use task_queue::{Claim, ClaimSpec, Recorded, Settle, TaskQueue};
