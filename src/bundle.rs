//! The bundle the engine runs on ([`Backends`]) and what a backend opens from one URL
//! ([`Parts`] for the requested [`Roles`], with [`ConnectOptions`]).
//!
//! An application gets a [`Backends`] from [`Config::connect`](crate::config::Config::connect),
//! [`connect`](crate::connect()) or [`Backends::memory`]. [`Parts`] and [`Roles`] are for backend
//! authors and **not a stable API yet**.

use std::sync::Arc;

use crate::bus::Bus;
use crate::lock::LockManager;
use crate::registry::Registry;
use crate::task_queue::{Composed, TaskQueue};

/// The three services the engine runs on.
#[derive(Clone, Debug)]
pub struct Backends {
    /// Events and work queues.
    pub bus: Arc<dyn Bus>,
    /// Task storage.
    pub registry: Arc<dyn Registry>,
    /// Distributed locks.
    pub locks: Arc<dyn LockManager>,
    /// The worker's hot path over `bus` and `registry` (see [`TaskQueue`]).
    tasks: Arc<dyn TaskQueue>,
}

impl Backends {
    /// The three roles, with the generic [`Composed`] worker path over `bus` and `registry`.
    pub fn new(
        bus: Arc<dyn Bus>,
        registry: Arc<dyn Registry>,
        locks: Arc<dyn LockManager>,
    ) -> Self {
        let tasks = Arc::new(Composed::new(bus.clone(), registry.clone()));
        Backends {
            bus,
            registry,
            locks,
            tasks,
        }
    }

    /// The worker's hot path: a backend's own when one server holds both the bus and the
    /// registry (fewer round trips), else [`Composed`].
    pub fn tasks(&self) -> &Arc<dyn TaskQueue> {
        &self.tasks
    }

    /// The same roles with another hot path: for a layer around [`Backends::tasks`] (metrics,
    /// tracing, fault injection in tests). The layer must keep the [`TaskQueue`] contract.
    pub fn with_task_queue(mut self, tasks: Arc<dyn TaskQueue>) -> Self {
        self.tasks = tasks;
        self
    }
}

/// Options every backend understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Namespace prepended to every key, stream, subject, queue and exchange the backend creates
    /// (`""` by default, so the Redis registry uses the lab's `task_registry:{id}` keys).
    pub prefix: String,
    /// Deliveries after which a work-queue message is dead-lettered.
    pub max_deliveries: u32,
    /// How long to wait for a broker to answer a connection attempt.
    pub connect_timeout: std::time::Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            prefix: String::new(),
            max_deliveries: 10,
            connect_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// Which roles to open from one URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Open a [`Bus`].
    pub bus: bool,
    /// Open a [`Registry`].
    pub registry: bool,
    /// Open a [`LockManager`].
    pub locks: bool,
}

impl Roles {
    /// All three roles.
    pub const ALL: Roles = Roles {
        bus: true,
        registry: true,
        locks: true,
    };
}

/// What a backend opened for the requested [`Roles`].
#[derive(Default)]
pub struct Parts {
    /// The bus, if requested.
    pub bus: Option<Arc<dyn Bus>>,
    /// The registry, if requested.
    pub registry: Option<Arc<dyn Registry>>,
    /// The lock manager, if requested.
    pub locks: Option<Arc<dyn LockManager>>,
    /// The backend's own [`TaskQueue`], when it opened both the bus and the registry and has
    /// one.
    pub tasks: Option<Arc<dyn TaskQueue>>,
}

impl Parts {
    pub(crate) fn into_backends(self) -> Option<Backends> {
        let mut b = Backends::new(self.bus?, self.registry?, self.locks?);
        if let Some(t) = self.tasks {
            b.tasks = t;
        }
        Some(b)
    }
}
