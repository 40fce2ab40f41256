//! The [`LockManager`] trait: leases with fencing tokens.
//!
//! The lab's `SETNX` then `EXPIRE` was two steps (a crash between them left a lock forever) and
//! its `DELETE` freed anyone's lock. A [`Lease`] is taken atomically with its TTL, is renewed and
//! released only by its owner, and carries a fencing token that grows with every acquisition of
//! the key, so a resource can refuse writes from a holder whose lease already ended.
//!
//! **For backend authors; not a stable API yet.** An application uses these traits through
//! [`Backends`](crate::Backends) and the engine ([`Dispatcher`](crate::Dispatcher),
//! [`Worker`](crate::Worker), [`Monitor`](crate::Monitor)); a backend implements them and checks
//! itself with the conformance suite (feature `testkit`). Their methods may still change
//! between 0.x releases.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Proof of holding a lock until `expires_at`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The lock's key.
    pub key: String,
    /// Who asked for it (a worker or monitor id; informative).
    pub owner: String,
    /// A secret unique to this acquisition; only its bearer can extend or release the lease.
    pub token: String,
    /// Grows strictly with each successful acquisition of `key` (never reused, also across
    /// expiries).
    pub fencing_token: u64,
    /// When the lease ends unless extended.
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("fencing_token", &self.fencing_token)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The fencing token of this acquisition.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }
}

/// Who holds a lock now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// The holder's owner name.
    pub owner: String,
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// When its lease ends unless extended (backends that cannot tell exactly round up).
    pub expires_at: DateTime<Utc>,
}

/// Distributed locks with TTLs, owner-checked renewal and release, and fencing tokens.
#[async_trait]
pub trait LockManager: Send + Sync + fmt::Debug + 'static {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// Takes `key` for `ttl` if nobody holds it (or its holder's lease ended). Atomic: the lock
    /// and its expiry are set in one step. Returns `None` when someone else holds it.
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extends a held lease to `ttl` from now. Fails with
    /// [`Error::NotLockOwner`](crate::Error::NotLockOwner) if `lease` no longer holds the lock.
    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Releases the lock if, and only if, `lease` still holds it. Returns `false` (and changes
    /// nothing) otherwise: a non-owner can never free someone else's lock.
    async fn release(&self, lease: &Lease) -> Result<bool>;

    /// The current holder of `key`, if any.
    async fn holder(&self, key: &str) -> Result<Option<LockHolder>>;
}

/// The longest lock TTL any backend accepts: 365 days.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// Checks a lock TTL (more than zero, at most [`MAX_TTL`]) and returns it as a chrono span.
pub(crate) fn ttl_span(ttl: std::time::Duration) -> Result<chrono::Duration> {
    if ttl.is_zero() {
        return Err(crate::Error::invalid("ttl", "must be greater than zero"));
    }
    if ttl > MAX_TTL {
        return Err(crate::Error::invalid(
            "ttl",
            format!(
                "must be at most 365 days, got {}",
                crate::clock::format_duration(ttl)
            ),
        ));
    }
    Ok(crate::clock::span(ttl))
}

/// Validates a lock key: 1..=200 characters from `[A-Za-z0-9_.:-]`.
pub fn validate_lock_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::invalid(
            "lock key",
            format!("must be 1..=200 characters from [A-Za-z0-9_.:-], got {key:?}"),
        ))
    }
}
