//! Unique tasks: at most one task per idempotency key while the key lives
//! ([`DispatchOptions::unique`]).
//!
//! Written once over the [`LockManager`](crate::LockManager): the key is the lock
//! `unique:{key}`, taken for the TTL with the new task's id as its owner. Taking it is atomic
//! on every backend, so of many dispatches at once exactly one takes it and registers its task;
//! the others read the holder and return its id. A dispatch that took the key and then failed
//! to register its task releases the key (else the key would name a task that does not exist
//! until its TTL ends).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::{Task, TaskId};

use super::dispatcher::{DispatchOptions, Dispatcher};
use super::retry::Backoff;

/// The longest unique key: the lock key `unique:{key}` must fit the 200 characters of a lock
/// key.
pub const MAX_UNIQUE_KEY: usize = 192;

/// How long a duplicate dispatch waits for the task named by the key's holder to be
/// registered (its dispatcher took the key a moment ago and is registering it) before it
/// reports that the key names no task.
const REGISTRATION_WAIT: Duration = Duration::from_secs(5);

/// Tries at taking or reading the key: the holder's lease may end between a refused take and
/// the read of its holder, then the key is taken again.
const TRIES: u32 = 5;

/// An idempotency key and how long it lives ([`DispatchOptions::unique`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unique {
    /// The key: 1..=[`MAX_UNIQUE_KEY`] characters from `[A-Za-z0-9_.:-]`, namespace-wide.
    pub key: String,
    /// How long the key maps to the task that took it (more than zero, at most 365 days).
    pub ttl: Duration,
}

impl Unique {
    /// Checks the key and the TTL; errors are [`Error::InvalidInput`] naming `unique_key` or
    /// `unique_for`.
    pub fn validate(&self) -> Result<()> {
        let k = &self.key;
        if k.is_empty() {
            return Err(Error::invalid("unique_key", "must not be empty"));
        }
        if k.len() > MAX_UNIQUE_KEY {
            return Err(Error::invalid(
                "unique_key",
                format!(
                    "must be at most {MAX_UNIQUE_KEY} characters, is {}",
                    k.len()
                ),
            ));
        }
        if let Some(bad) = k
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
        {
            return Err(Error::invalid(
                "unique_key",
                format!("contains {bad:?}; only ASCII letters, digits and \"_.:-\" are allowed (hash a longer or freer key)"),
            ));
        }
        if self.ttl.is_zero() || self.ttl > crate::lock::MAX_TTL {
            return Err(Error::invalid(
                "unique_for",
                format!(
                    "must be more than zero and at most 365 days, got {}",
                    crate::clock::format_duration(self.ttl)
                ),
            ));
        }
        Ok(())
    }

    /// The lock that holds the key.
    pub(crate) fn lock_key(&self) -> String {
        format!("unique:{}", self.key)
    }
}

/// Dispatches `task` unless the key is held; returns the id of the task that holds it.
pub(super) async fn dispatch(
    d: &Dispatcher,
    unique: &Unique,
    task: Task,
    options: &DispatchOptions,
) -> Result<TaskId> {
    let locks = d.backends().locks.as_ref();
    let key = unique.lock_key();
    for _ in 0..TRIES {
        if let Some(lease) = locks
            .acquire(&key, task.task_id.as_str(), unique.ttl)
            .await?
        {
            let r = d.dispatch_built(task, options).await;
            if let Err(e) = &r {
                // The key must not name a task that was not registered.
                if let Err(re) = locks.release(&lease).await {
                    tracing::warn!(unique_key = %unique.key, error = %re, dispatch_error = %e, "could not release the unique key of a failed dispatch; it lives until its TTL ends");
                }
            }
            return r;
        }
        if let Some(holder) = locks.holder(&key).await? {
            let first = TaskId::parse(&holder.owner).map_err(|_| {
                Error::permanent(
                    locks.backend(),
                    format!(
                        "unique key {:?}: its lock {key:?} is held by {:?}, which is not a task id",
                        unique.key, holder.owner
                    ),
                    None,
                )
            })?;
            tracing::debug!(unique_key = %unique.key, task_id = %first, "duplicate dispatch; returning the task that holds the key");
            return registered(d, unique, first, holder.expires_at).await;
        }
        // The holder's lease ended between the two calls: take the key again.
    }
    Err(Error::Timeout(format!(
        "unique key {:?} was taken and freed {TRIES} times while this dispatch tried to take it",
        unique.key
    )))
}

/// `first` once it is registered: its dispatcher took the key just before registering it. A
/// key whose task never appears (its dispatcher died in between) is reported, with when the
/// key is free again.
async fn registered(
    d: &Dispatcher,
    unique: &Unique,
    first: TaskId,
    expires_at: chrono::DateTime<chrono::Utc>,
) -> Result<TaskId> {
    let until = tokio::time::Instant::now() + REGISTRATION_WAIT;
    let pause = Backoff::backend();
    let mut tries = 0;
    loop {
        if d.backends().registry.get(&first).await?.is_some() {
            return Ok(first);
        }
        tries += 1;
        let wait = pause.delay(tries);
        if tokio::time::Instant::now() + wait > until {
            return Err(Error::Timeout(format!(
                "unique key {:?} is held by task {first}, which is not registered (its dispatcher may have died before registering it); the key is free again at {}",
                unique.key,
                expires_at.to_rfc3339()
            )));
        }
        tokio::time::sleep(wait).await;
    }
}
