//! [`NatsLockManager`]: locks in a JetStream key-value bucket.
//!
//! One key per lock in bucket `{prefix}orch_locks`. A value records the owner, a random token,
//! the end of the lease and the fencing token. Acquiring is a create (expected revision 0), or,
//! when the stored lease has ended or the key was released, an update expecting the revision
//! that was read: both are compare-and-set, so two acquirers cannot both win. The fencing token
//! is the revision of the acquiring write (the bucket stream's sequence: it only grows, also
//! across releases and expiries); extensions keep it in the value. Extend and release are
//! compare-and-set on the revision read just before, after checking the token and the expiry.
//!
//! Key-value `max_age` is bucket-wide (2.9 has no per-key TTL), so per-lock TTLs are enforced by
//! the `expires_at` stored in the value: an expired value counts as free and is taken over by a
//! compare-and-set. The bucket's `max_age` (24 h) only collects locks nobody touches any more,
//! and TTLs are capped below it.

use std::time::Duration;

use async_nats::HeaderMap;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::kv::{Bucket, Entry, Write};
use super::{Shared, BACKEND};
use crate::error::{Error, Result};
use crate::lock::{validate_lock_key, Lease, LockHolder, LockManager};

/// The bucket's max age: garbage collection of abandoned locks.
const BUCKET_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The longest TTL accepted (a held lock must outlive no write by more than the bucket's age).
const MAX_TTL: Duration = Duration::from_secs(23 * 3600);

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    owner: String,
    token: String,
    /// Microseconds since the Unix epoch.
    expires_at: i64,
    /// The fencing token; absent on the acquiring write, whose revision is the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
}

impl Stored {
    fn expires(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.expires_at).unwrap_or_default()
    }
}

/// The NATS lock manager.
#[derive(Debug)]
pub struct NatsLockManager {
    bucket: Bucket,
}

fn decode(e: &Entry) -> Result<Option<Stored>> {
    if !e.live {
        return Ok(None);
    }
    serde_json::from_slice(e.value())
        .map(Some)
        .map_err(|err| Error::permanent(BACKEND, format!("corrupt lock value: {err}"), None))
}

fn check_ttl(ttl: Duration) -> Result<chrono::Duration> {
    if ttl.is_zero() {
        return Err(Error::invalid("ttl", "must be greater than zero"));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid(
            "ttl",
            format!(
                "at most {} hours on NATS (the lock bucket's max age collects older locks)",
                MAX_TTL.as_secs() / 3600
            ),
        ));
    }
    crate::lock::ttl_span(ttl)
}

fn encode(s: &Stored) -> Result<Vec<u8>> {
    serde_json::to_vec(s)
        .map_err(|e| Error::permanent(BACKEND, format!("cannot encode a lock: {e}"), None))
}

impl NatsLockManager {
    pub(crate) async fn open(shared: Shared) -> Result<Self> {
        let name = shared.names.lock_bucket();
        Ok(NatsLockManager {
            bucket: Bucket::open(shared, name, Some(BUCKET_MAX_AGE)).await?,
        })
    }

    /// The stored lease of `lease.key` if `lease` still holds it, with the revision read.
    async fn held_by(&self, lease: &Lease) -> Result<Option<(u64, Stored)>> {
        let Some(entry) = self.bucket.get(&lease.key).await? else {
            return Ok(None);
        };
        let Some(stored) = decode(&entry)? else {
            return Ok(None);
        };
        let fence = stored.fence.unwrap_or(entry.revision());
        if stored.token == lease.token
            && fence == lease.fencing_token
            && stored.expires() > Utc::now()
        {
            Ok(Some((entry.revision(), stored)))
        } else {
            Ok(None)
        }
    }
}

#[async_trait]
impl LockManager for NatsLockManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        validate_lock_key(key)?;
        let ttl = check_ttl(ttl)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let now = Utc::now();
        let stored = Stored {
            owner: owner.to_string(),
            token: token.clone(),
            expires_at: (now + ttl).timestamp_micros(),
            fence: None,
        };
        let value = encode(&stored)?;
        let expected = match self.bucket.get(key).await? {
            None => 0,
            Some(entry) => match decode(&entry)? {
                Some(current) if current.expires() > now => return Ok(None),
                // Released (a marker) or expired: take it over at the revision read.
                _ => entry.revision(),
            },
        };
        match self
            .bucket
            .put(key, HeaderMap::new(), value, expected)
            .await?
        {
            Write::Done(revision) => Ok(Some(Lease {
                key: key.to_string(),
                owner: owner.to_string(),
                token,
                fencing_token: revision,
                expires_at: stored.expires(),
            })),
            Write::Stale => Ok(None),
        }
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let ttl = check_ttl(ttl)?;
        let not_owner = || Error::NotLockOwner {
            key: lease.key.clone(),
        };
        let (revision, mut stored) = self.held_by(lease).await?.ok_or_else(not_owner)?;
        stored.fence = Some(lease.fencing_token);
        stored.expires_at = (Utc::now() + ttl).timestamp_micros();
        match self
            .bucket
            .put(&lease.key, HeaderMap::new(), encode(&stored)?, revision)
            .await?
        {
            Write::Done(_) => Ok(Lease {
                expires_at: stored.expires(),
                ..lease.clone()
            }),
            Write::Stale => Err(not_owner()),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let Some((revision, _)) = self.held_by(lease).await? else {
            return Ok(false);
        };
        Ok(matches!(
            self.bucket.delete(&lease.key, revision).await?,
            Write::Done(_)
        ))
    }

    async fn holder(&self, key: &str) -> Result<Option<LockHolder>> {
        validate_lock_key(key)?;
        let Some(entry) = self.bucket.get(key).await? else {
            return Ok(None);
        };
        Ok(decode(&entry)?
            .filter(|s| s.expires() > Utc::now())
            .map(|s| LockHolder {
                fencing_token: s.fence.unwrap_or(entry.revision()),
                expires_at: s.expires(),
                owner: s.owner,
            }))
    }
}
