//! In-memory [`LockManager`].

use rustc_hash::FxHashMap as HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::lock::{validate_lock_key, Lease, LockHolder, LockManager};

struct Held {
    owner: String,
    token: String,
    fencing_token: u64,
    expires_at: DateTime<Utc>,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    /// Last fencing token handed out per key; kept after release so tokens never repeat.
    fences: HashMap<String, u64>,
}

/// The in-memory lock manager.
#[derive(Default)]
pub struct MemoryLockManager {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryLockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLockManager").finish_non_exhaustive()
    }
}

impl MemoryLockManager {
    /// An empty lock manager.
    pub fn new() -> Self {
        Self::default()
    }
}

fn ttl_to_chrono(ttl: Duration) -> Result<chrono::Duration> {
    crate::lock::ttl_span(ttl)
}

#[async_trait]
impl LockManager for MemoryLockManager {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        validate_lock_key(key)?;
        let ttl = ttl_to_chrono(ttl)?;
        let now = Utc::now();
        let mut st = self.state.lock();
        if st.held.get(key).is_some_and(|h| h.expires_at > now) {
            return Ok(None);
        }
        let fence = st.fences.entry(key.to_string()).or_insert(0);
        *fence += 1;
        let lease = Lease {
            key: key.to_string(),
            owner: owner.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            fencing_token: *fence,
            expires_at: now + ttl,
        };
        st.held.insert(
            key.to_string(),
            Held {
                owner: lease.owner.clone(),
                token: lease.token.clone(),
                fencing_token: lease.fencing_token,
                expires_at: lease.expires_at,
            },
        );
        Ok(Some(lease))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let ttl = ttl_to_chrono(ttl)?;
        let now = Utc::now();
        let mut st = self.state.lock();
        match st.held.get_mut(&lease.key) {
            Some(h) if h.token == lease.token && h.expires_at > now => {
                h.expires_at = now + ttl;
                Ok(Lease {
                    expires_at: h.expires_at,
                    ..lease.clone()
                })
            }
            _ => Err(Error::NotLockOwner {
                key: lease.key.clone(),
            }),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = Utc::now();
        let mut st = self.state.lock();
        match st.held.get(&lease.key) {
            Some(h) if h.token == lease.token && h.expires_at > now => {
                st.held.remove(&lease.key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn holder(&self, key: &str) -> Result<Option<LockHolder>> {
        validate_lock_key(key)?;
        let now = Utc::now();
        let st = self.state.lock();
        Ok(st
            .held
            .get(key)
            .filter(|h| h.expires_at > now)
            .map(|h| LockHolder {
                owner: h.owner.clone(),
                fencing_token: h.fencing_token,
                expires_at: h.expires_at,
            }))
    }
}
