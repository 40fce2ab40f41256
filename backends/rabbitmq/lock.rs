//! [`RabbitLockManager`]: a lock is an exclusive queue `{prefix}lock.{key}` declared by the
//! holder's dedicated connection. RabbitMQ refuses a second declaration from any other connection
//! with RESOURCE_LOCKED (405) and deletes the queue when the holder's connection dies, so the
//! broker arbitrates exclusivity and frees the locks of crashed holders.
//!
//! What a queue cannot carry (who holds it, until when, its fencing token) is recorded in the
//! lock log, the stream `{prefix}locks`: `acquired` / `extended` / `released` records, replayed
//! into a view. The fencing token of an acquisition is its record's position in that log (plus
//! one), so it grows strictly with every acquisition of a key, across releases and expiries.
//!
//! The TTL is enforced by the holder: a timer deletes the queue when the lease ends unless it was
//! extended. A holder process that is frozen as a whole (its timers do not run) keeps the lock
//! until RabbitMQ notices the dead connection by its missed heartbeats.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::link::{amqp_error, short, soft_error, CachedChannel, Link, BACKEND};
use super::log::{stream_arguments, Log, Machine, Writer};
use super::names::Names;
use crate::error::{Error, Result};
use crate::lock::{validate_lock_key, Lease, LockHolder, LockManager};

/// One record of the lock log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LockOp {
    Acquired {
        key: String,
        owner: String,
        token: String,
        expires_at: DateTime<Utc>,
    },
    /// Self-contained (owner and fencing token repeated), so a view built from a log whose
    /// older records were dropped by retention still knows a long-lived holder.
    Extended {
        key: String,
        owner: String,
        token: String,
        fencing_token: u64,
        expires_at: DateTime<Utc>,
    },
    Released {
        key: String,
        token: String,
    },
}

#[derive(Clone, Debug)]
struct HolderRecord {
    owner: String,
    token: String,
    fencing_token: u64,
    expires_at: DateTime<Utc>,
}

/// Latest holder record per key, in log order.
#[derive(Default)]
struct LockView {
    holders: HashMap<String, HolderRecord>,
}

impl Machine for LockView {
    type Op = LockOp;
    /// The fencing token this record would give (its log position + 1).
    type Outcome = u64;

    fn apply(&mut self, position: u64, op: LockOp) -> u64 {
        let fence = position + 1;
        match op {
            LockOp::Acquired {
                key,
                owner,
                token,
                expires_at,
            } => {
                self.holders.insert(
                    key,
                    HolderRecord {
                        owner,
                        token,
                        fencing_token: fence,
                        expires_at,
                    },
                );
            }
            LockOp::Extended {
                key,
                owner,
                token,
                fencing_token,
                expires_at,
            } => {
                let newer = self
                    .holders
                    .get(&key)
                    .is_none_or(|h| h.fencing_token <= fencing_token);
                if newer {
                    self.holders.insert(
                        key,
                        HolderRecord {
                            owner,
                            token,
                            fencing_token,
                            expires_at,
                        },
                    );
                }
            }
            LockOp::Released { key, token } => {
                if self.holders.get(&key).is_some_and(|h| h.token == token) {
                    self.holders.remove(&key);
                }
            }
        }
        fence
    }
}

/// A lock this process holds.
struct Held {
    lease: Lease,
    /// Generation of the holder connection that owns the queue.
    generation: u64,
    /// When the lease ends; the expiry timer watches it (dropping it stops the timer).
    deadline: watch::Sender<Instant>,
}

struct LockInner {
    log: Log<LockView>,
    holder_link: Arc<Link>,
    /// Appends on the holder connection: records about a lock travel on the connection that
    /// owns its queue.
    writer: Writer,
    control: CachedChannel,
    names: Names,
    held: tokio::sync::Mutex<HashMap<String, Held>>,
}

/// The RabbitMQ [`LockManager`]. See the module documentation and docs/backends/rabbitmq.md.
pub struct RabbitLockManager {
    inner: Arc<LockInner>,
}

impl std::fmt::Debug for RabbitLockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitLockManager")
            .field("holder_link", &self.inner.holder_link)
            .field("log", &self.inner.log)
            .finish_non_exhaustive()
    }
}

/// Lock log retention: records older than this are dropped (in 1 MB segments).
const LOCK_LOG_MAX_AGE: &str = "7D";
const LOCK_LOG_SEGMENT_BYTES: i64 = 1_000_000;

fn ttl_to_chrono(ttl: Duration) -> Result<chrono::Duration> {
    crate::lock::ttl_span(ttl)
}

impl RabbitLockManager {
    /// Opens the lock log (on `link`) and uses `holder_link`, a dedicated connection, to own the
    /// exclusive lock queues.
    pub(crate) async fn open(
        link: Arc<Link>,
        holder_link: Arc<Link>,
        names: &Names,
    ) -> Result<Self> {
        let args = stream_arguments(&[
            ("x-max-age", AMQPValue::LongString(LOCK_LOG_MAX_AGE.into())),
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongLongInt(LOCK_LOG_SEGMENT_BYTES),
            ),
        ]);
        let log = Log::open(link, names.lock_log(), args, LockView::default()).await?;
        let writer = log.writer_on(CachedChannel::new(holder_link.clone(), true, None));
        Ok(RabbitLockManager {
            inner: Arc::new(LockInner {
                log,
                writer,
                control: CachedChannel::new(holder_link.clone(), false, None),
                holder_link,
                names: names.clone(),
                held: tokio::sync::Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl LockInner {
    /// Whether a held lock is still ours: its connection is the current one and alive, and its
    /// lease has not ended.
    fn alive(&self, h: &Held) -> bool {
        h.generation == self.holder_link.generation()
            && self.holder_link.is_connected()
            && h.lease.expires_at > Utc::now()
    }

    /// Deletes a lock queue owned by connection `generation` (gone already if that connection
    /// died).
    async fn delete_queue(&self, key: &str, generation: u64) {
        let result = async {
            let (ch, current, _) = self.control.get().await?;
            if current != generation {
                return Ok(());
            }
            ch.queue_delete(short(self.names.lock(key))?, QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error("delete a lock queue", e))?;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "cannot delete a lock queue; it goes away with its connection");
        }
    }

    /// The lease ended without an extension: free the lock.
    async fn expire(&self, key: &str, token: &str) {
        let mut held = self.held.lock().await;
        if held.get(key).is_some_and(|h| h.lease.token == token) {
            if let Some(h) = held.remove(key) {
                tracing::debug!(key, owner = %h.lease.owner, "lock lease ended; releasing the lock queue");
                self.delete_queue(key, h.generation).await;
            }
        }
    }

    async fn append(&self, op: LockOp) -> Result<u64> {
        self.log
            .submit_via(&self.writer, std::slice::from_ref(&op))
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(Error::permanent(
                    BACKEND,
                    "a lock log append produced no outcome",
                    None,
                ))
            })
    }
}

/// Frees the lock when its deadline passes without being moved; stops when the sender is
/// dropped (released).
async fn expire_when_due(
    inner: Weak<LockInner>,
    key: String,
    token: String,
    mut deadline: watch::Receiver<Instant>,
) {
    loop {
        let due = *deadline.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {
                if *deadline.borrow() == due {
                    break;
                }
            }
            changed = deadline.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.expire(&key, &token).await;
    }
}

#[async_trait]
impl LockManager for RabbitLockManager {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        validate_lock_key(key)?;
        let ttl_c = ttl_to_chrono(ttl)?;
        let inner = &self.inner;
        let name = short(inner.names.lock(key))?;
        let mut held = inner.held.lock().await;
        if let Some(h) = held.get(key) {
            if inner.alive(h) {
                return Ok(None);
            }
            if let Some(h) = held.remove(key) {
                inner.delete_queue(key, h.generation).await;
            }
        }
        let started = Instant::now();
        let session = inner.holder_link.session().await?;
        // A throwaway channel: a refused declaration closes the channel it was made on.
        let ch = session.channel(false).await?;
        let declared = ch
            .queue_declare(
                name,
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = ch.close(200, "lock declared".into()).await;
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::RESOURCELOCKED) => return Ok(None),
            Err(e) => return Err(amqp_error("declare a lock queue", e)),
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = Utc::now() + ttl_c;
        let appended = inner
            .append(LockOp::Acquired {
                key: key.to_string(),
                owner: owner.to_string(),
                token: token.clone(),
                expires_at,
            })
            .await;
        let still_ours = session.is_alive() && inner.holder_link.generation() == session.generation;
        let fence = match appended {
            Ok(fence) if still_ours => fence,
            Ok(_) => {
                return Err(Error::temporary(
                    BACKEND,
                    "the lock connection was lost while acquiring; the lock was released",
                    None,
                ))
            }
            Err(e) => {
                inner.delete_queue(key, session.generation).await;
                return Err(e);
            }
        };
        let lease = Lease {
            key: key.to_string(),
            owner: owner.to_string(),
            token: token.clone(),
            fencing_token: fence,
            expires_at,
        };
        let (tx, rx) = watch::channel(started + ttl);
        tokio::spawn(expire_when_due(
            Arc::downgrade(inner),
            key.to_string(),
            token,
            rx,
        ));
        held.insert(
            key.to_string(),
            Held {
                lease: lease.clone(),
                generation: session.generation,
                deadline: tx,
            },
        );
        Ok(Some(lease))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let ttl_c = ttl_to_chrono(ttl)?;
        let inner = &self.inner;
        let mut held = inner.held.lock().await;
        let Some(h) = held
            .get_mut(&lease.key)
            .filter(|h| h.lease.token == lease.token)
        else {
            return Err(Error::NotLockOwner {
                key: lease.key.clone(),
            });
        };
        if !inner.alive(h) {
            return Err(Error::NotLockOwner {
                key: lease.key.clone(),
            });
        }
        let due = Instant::now() + ttl;
        let expires_at = Utc::now() + ttl_c;
        inner
            .append(LockOp::Extended {
                key: lease.key.clone(),
                owner: h.lease.owner.clone(),
                token: h.lease.token.clone(),
                fencing_token: h.lease.fencing_token,
                expires_at,
            })
            .await?;
        h.lease.expires_at = expires_at;
        let _ = h.deadline.send(due);
        Ok(Lease {
            expires_at,
            ..h.lease.clone()
        })
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let inner = &self.inner;
        let mut held = inner.held.lock().await;
        let ours = held
            .get(&lease.key)
            .is_some_and(|h| h.lease.token == lease.token && inner.alive(h));
        if !ours {
            return Ok(false);
        }
        let Some(h) = held.remove(&lease.key) else {
            return Ok(false);
        };
        inner.delete_queue(&lease.key, h.generation).await;
        let released = inner
            .append(LockOp::Released {
                key: lease.key.clone(),
                token: lease.token.clone(),
            })
            .await;
        if let Err(e) = released {
            // The queue is gone, so the lock is free; the log keeps a stale holder record that
            // holder() ignores because it checks the queue first.
            tracing::warn!(key = %lease.key, error = %e, "lock released but its release record was not appended");
        }
        Ok(true)
    }

    async fn holder(&self, key: &str) -> Result<Option<LockHolder>> {
        validate_lock_key(key)?;
        let inner = &self.inner;
        {
            let held = inner.held.lock().await;
            if let Some(h) = held.get(key).filter(|h| inner.alive(h)) {
                return Ok(Some(LockHolder {
                    owner: h.lease.owner.clone(),
                    fencing_token: h.lease.fencing_token,
                    expires_at: h.lease.expires_at,
                }));
            }
        }
        // Is the queue held by some other connection? (A passive declaration: 405 if another
        // connection owns it, 404 if nobody does. Either closes the channel: a throwaway one.)
        let session = inner.holder_link.session().await?;
        let ch = session.channel(false).await?;
        let probe = ch
            .queue_declare(
                short(inner.names.lock(key))?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match probe {
            Ok(_) => {
                // Our own connection's queue of a lease that just ended: being released.
                let _ = ch.close(200, "probed".into()).await;
                return Ok(None);
            }
            Err(e) => match soft_error(&e) {
                Some(AMQPSoftError::NOTFOUND) => return Ok(None),
                Some(AMQPSoftError::RESOURCELOCKED) => {}
                _ => return Err(amqp_error("look up a lock queue", e)),
            },
        }
        // Held elsewhere: its record is in the log (appended right after the declaration).
        for attempt in 0..3 {
            inner.log.sync().await?;
            if let Some(r) = inner.log.read(|v| v.holders.get(key).cloned()) {
                return Ok(Some(LockHolder {
                    owner: r.owner,
                    fencing_token: r.fencing_token,
                    expires_at: r.expires_at,
                }));
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        Ok(Some(LockHolder {
            owner: "(unknown: acquisition not yet recorded)".to_string(),
            fencing_token: 0,
            expires_at: Utc::now(),
        }))
    }
}
