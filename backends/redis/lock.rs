//! [`RedisLockManager`]: `SET NX PX` with a random token, compare-and-set scripts for extend and
//! release, and a fencing token from a per-key counter.
//!
//! The lock key holds `<token>|<fencing token>|<owner>`; the counter `lock:{key}:fence` shares
//! the lock's hash tag and never expires, so fencing tokens never repeat for a key.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use super::conn::{Conn, BACKEND};
use super::keys;
use super::scripts;
use crate::error::{Error, Result};
use crate::lock::{validate_lock_key, Lease, LockHolder, LockManager};

/// The Redis lock manager.
pub struct RedisLockManager {
    conn: Conn,
}

impl std::fmt::Debug for RedisLockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLockManager")
            .field("conn", &self.conn)
            .finish()
    }
}

fn ttl_ms(ttl: Duration) -> Result<(u64, chrono::Duration)> {
    let chrono_ttl = crate::lock::ttl_span(ttl)?;
    // (at most 365 days: the milliseconds fit)
    Ok((ttl.as_millis().max(1) as u64, chrono_ttl))
}

/// Splits a stored lock value into (token, fencing token, owner).
fn parse_value(v: &str) -> Result<(&str, u64, &str)> {
    let bad = || {
        Error::permanent(
            BACKEND,
            format!("lock value {v:?} is not token|fence|owner"),
            None,
        )
    };
    let mut parts = v.splitn(3, '|');
    let token = parts.next().ok_or_else(bad)?;
    let fence = parts.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
    let owner = parts.next().ok_or_else(bad)?;
    Ok((token, fence, owner))
}

impl RedisLockManager {
    pub(crate) fn new(conn: Conn) -> Self {
        RedisLockManager { conn }
    }
}

#[async_trait]
impl LockManager for RedisLockManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        validate_lock_key(key)?;
        let (ms, chrono_ttl) = ttl_ms(ttl)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let p = self.conn.prefix();
        let mut inv = scripts::LOCK_ACQUIRE.prepare();
        inv.key(keys::lock(p, key))
            .key(keys::fence(p, key))
            .arg(&token)
            .arg(ms)
            .arg(owner);
        let now = Utc::now();
        let fence: Option<u64> = self.conn.eval("acquire lock", &inv).await?;
        Ok(fence.map(|fencing_token| Lease {
            key: key.to_string(),
            owner: owner.to_string(),
            token,
            fencing_token,
            expires_at: now + chrono_ttl,
        }))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let (ms, chrono_ttl) = ttl_ms(ttl)?;
        let mut inv = scripts::LOCK_EXTEND.prepare();
        inv.key(keys::lock(self.conn.prefix(), &lease.key))
            .arg(&lease.token)
            .arg(ms);
        let now = Utc::now();
        let done: i64 = self.conn.eval("extend lock", &inv).await?;
        if done == 1 {
            Ok(Lease {
                expires_at: now + chrono_ttl,
                ..lease.clone()
            })
        } else {
            Err(Error::NotLockOwner {
                key: lease.key.clone(),
            })
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let mut inv = scripts::LOCK_RELEASE.prepare();
        inv.key(keys::lock(self.conn.prefix(), &lease.key))
            .arg(&lease.token);
        let done: i64 = self.conn.eval("release lock", &inv).await?;
        Ok(done == 1)
    }

    async fn holder(&self, key: &str) -> Result<Option<LockHolder>> {
        validate_lock_key(key)?;
        let mut inv = scripts::LOCK_HOLDER.prepare();
        inv.key(keys::lock(self.conn.prefix(), key));
        let now = Utc::now();
        let found: Option<(String, i64)> = self.conn.eval("lock holder", &inv).await?;
        let Some((value, pttl)) = found else {
            return Ok(None);
        };
        let (_, fencing_token, owner) = parse_value(&value)?;
        Ok(Some(LockHolder {
            owner: owner.to_string(),
            fencing_token,
            expires_at: now + chrono::Duration::milliseconds(pttl.max(0)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_values_split_with_owners_that_contain_the_separator() {
        assert_eq!(
            parse_value("abc|7|monitor|a").unwrap(),
            ("abc", 7, "monitor|a")
        );
        assert!(parse_value("abc|x|o").is_err());
        assert!(parse_value("abc").is_err());
    }

    #[test]
    fn zero_ttl_is_invalid_input() {
        assert!(matches!(
            ttl_ms(Duration::ZERO),
            Err(Error::InvalidInput { .. })
        ));
        assert_eq!(ttl_ms(Duration::from_micros(10)).unwrap().0, 1);
    }
}
