//! The in-memory backend: complete, always compiled, and the embedded default.
//!
//! Everything lives in this process, so nothing survives it; within it, the backend keeps every
//! promise of the traits (leases, redelivery, strict priority, fan-out, compare-and-set,
//! fencing tokens, lock expiry). Each `memory://` URL opened is a new, private instance.

mod bus;
mod lock;
mod registry;

use std::sync::Arc;

pub use bus::MemoryBus;
pub use lock::MemoryLockManager;
pub use registry::MemoryRegistry;

use crate::bundle::{Backends, ConnectOptions, Parts, Roles};

/// Opens the requested roles as fresh in-memory instances.
pub fn open(roles: &Roles, opts: &ConnectOptions) -> Parts {
    Parts {
        bus: roles
            .bus
            .then(|| Arc::new(MemoryBus::new(opts.max_deliveries)) as _),
        registry: roles.registry.then(|| Arc::new(MemoryRegistry::new()) as _),
        locks: roles.locks.then(|| Arc::new(MemoryLockManager::new()) as _),
        tasks: None,
    }
}

impl Backends {
    /// A fresh, private in-memory bundle (the embedded default).
    pub fn memory() -> Self {
        open(&Roles::ALL, &ConnectOptions::default())
            .into_backends()
            .expect("memory opens all roles")
    }
}
