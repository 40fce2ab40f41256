//! [`RabbitLockManager`]: a lock is an exclusive queue `{prefix}lock.{key}` declared by one of
//! the lock manager's own connections. RabbitMQ refuses a second declaration from any other
//! connection with RESOURCE_LOCKED (405) and deletes the queue when the holder's connection
//! dies, so the broker arbitrates exclusivity and frees the locks of crashed holders.
//!
//! What a queue cannot carry (who holds it, until when, its fencing token) is recorded in the
//! lock log, the stream `{prefix}locks`: `acquired` / `extended` / `released` records, replayed
//! into a view. The fencing token of an acquisition is its record's position in that log (plus
//! one), so it grows strictly with every acquisition of a key, across releases and expiries.
//!
//! The TTL is enforced by the holder: a timer deletes the queue when the lease ends unless it was
//! extended. A holder process that is frozen as a whole (its timers do not run) keeps the lock
//! until RabbitMQ notices the dead connection by its missed heartbeats.
//!
//! **Connections.** A refused declaration closes the channel it was made on, and lapin (4.x)
//! never gives the id of a channel the broker closed back to its connection: every refusal
//! costs its connection one of its `channel_max` channels (2,047 on RabbitMQ) for as long as the
//! connection lives. Attempts therefore run on the pool's *current* connection, which is retired
//! after [`LockConn::budget`] wasted channels (half its `channel_max`); a retired connection
//! takes no new attempt and is closed as soon as it holds no lock (closing it earlier would free
//! its locks), and the next attempt opens a new current connection. A won lock stays on the
//! connection that declared it, and so do its log records, its extensions and its release.
//!
//! **One lock per key.** Each key has its own async mutex, held across that key's broker round
//! trips; nothing is held across a round trip for all keys, so a slow acquisition of one key
//! does not delay the extension of another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

use super::link::{amqp_error, short, soft_error, CachedChannel, Link, Session, BACKEND};
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

/// Makes the link of a new lock connection (each link is used for one connection).
pub(crate) type Connect = Box<dyn Fn() -> Result<Arc<Link>> + Send + Sync>;

/// One connection of the lock manager.
struct LockConn {
    id: u64,
    link: Arc<Link>,
    session: Arc<Session>,
    /// Appends on this connection: records about a lock travel on the connection that owns
    /// its queue.
    writer: Writer,
    /// A channel for deletions, opened on first use.
    control: tokio::sync::Mutex<Option<lapin::Channel>>,
    /// Channels the broker closed on this connection (refused declarations, probes), which the
    /// client never frees.
    wasted: AtomicUsize,
    /// Wasted channels after which the connection takes no new attempt.
    budget: usize,
}

impl LockConn {
    async fn open(connect: &Connect, log: &Log<LockView>, id: u64) -> Result<Arc<Self>> {
        let link = connect()?;
        let session = link.session().await?;
        let writer = log.writer_on(CachedChannel::new(link.clone(), true, None));
        let budget = Self::budget(session.conn.configuration().channel_max());
        Ok(Arc::new(LockConn {
            id,
            link,
            session,
            writer,
            control: tokio::sync::Mutex::new(None),
            wasted: AtomicUsize::new(0),
            budget,
        }))
    }

    /// Half the channels the connection may open (0 means no limit: 65,535): the other half is
    /// left for the attempts in flight when the budget runs out, and for the writer and control
    /// channels of the locks the connection keeps holding.
    fn budget(channel_max: u16) -> usize {
        let max = if channel_max == 0 {
            u16::MAX
        } else {
            channel_max
        };
        usize::from(max / 2).max(1)
    }

    /// The connection is up and is still the one its link opened first (a link that lost its
    /// connection reconnects on use; its locks died with the first one).
    fn alive(&self) -> bool {
        self.link.is_connected() && self.link.generation() == self.session.generation
    }

    fn exhausted(&self) -> bool {
        self.wasted.load(Ordering::Relaxed) >= self.budget
    }

    /// A channel the broker closed on this connection.
    fn waste(&self) {
        self.wasted.fetch_add(1, Ordering::Relaxed);
    }

    /// Deletes a lock queue this connection owns (gone already if the connection died).
    async fn delete_queue(&self, name: &str) -> Result<()> {
        if !self.alive() {
            return Ok(());
        }
        let mut control = self.control.lock().await;
        let ch = match control.as_ref().filter(|ch| ch.status().connected()) {
            Some(ch) => ch.clone(),
            None => {
                let ch = self.session.channel(false).await?;
                *control = Some(ch.clone());
                ch
            }
        };
        let deleted = ch
            .queue_delete(short(name)?, QueueDeleteOptions::default())
            .await;
        if let Err(e) = deleted {
            if soft_error(&e).is_some() {
                self.waste();
            }
            return Err(amqp_error("delete a lock queue", e));
        }
        Ok(())
    }

    async fn close(&self) {
        let _ = self
            .session
            .conn
            .close(200, "lock connection retired".into())
            .await;
    }
}

/// The lock manager's connections: the current one, which takes new attempts, and retired ones
/// kept open for the locks they hold. Each connection counts its users (locks held on it and
/// attempts in progress); a retired connection is closed when its last user leaves.
#[derive(Default)]
struct Pool {
    current: Option<Arc<LockConn>>,
    retired: HashMap<u64, Arc<LockConn>>,
    users: HashMap<u64, usize>,
}

impl Pool {
    /// Takes the current connection for one more user, retiring it first if it is dead or has
    /// wasted its budget. `None` when a new current connection must be opened.
    fn checkout(&mut self) -> Option<Arc<LockConn>> {
        let conn = self.current.clone()?;
        if conn.alive() && !conn.exhausted() {
            *self.users.entry(conn.id).or_default() += 1;
            return Some(conn);
        }
        self.current = None;
        if conn.alive() {
            tracing::debug!(
                wasted = conn.wasted.load(Ordering::Relaxed),
                "lock connection retired: too many refused declarations"
            );
        }
        if self.users.get(&conn.id).copied().unwrap_or(0) > 0 {
            self.retired.insert(conn.id, conn);
        } else {
            self.users.remove(&conn.id);
            tokio::spawn(async move { conn.close().await });
        }
        None
    }

    /// One user of `conn` leaves; a retired connection with no user left is closed.
    fn checkin(&mut self, conn: &LockConn) {
        let left = match self.users.get_mut(&conn.id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left > 0 {
            return;
        }
        self.users.remove(&conn.id);
        if let Some(retired) = self.retired.remove(&conn.id) {
            tokio::spawn(async move { retired.close().await });
        }
    }
}

/// A lock this process holds.
struct Held {
    lease: Lease,
    /// The connection that owns the queue (this lock is one of its users).
    conn: Arc<LockConn>,
    /// When the lease ends; the expiry timer watches it (dropping it stops the timer).
    deadline: watch::Sender<Instant>,
}

impl Held {
    /// Still ours: its connection is alive and its lease has not ended.
    fn alive(&self) -> bool {
        self.conn.alive() && self.lease.expires_at > Utc::now()
    }
}

/// One key's state: the lock this process holds on it, if any. Its mutex is held across the
/// key's broker round trips.
type Slot = Arc<tokio::sync::Mutex<Option<Held>>>;

struct LockInner {
    log: Log<LockView>,
    connect: Connect,
    pool: parking_lot::Mutex<Pool>,
    /// One opening of a current connection at a time.
    opening: tokio::sync::Mutex<()>,
    next_conn: AtomicU64,
    names: Names,
    keys: parking_lot::Mutex<HashMap<String, Slot>>,
    /// Test hook: acquisitions and extensions of a gated key wait at their gate, holding their
    /// key's mutex.
    #[cfg(test)]
    gates: parking_lot::Mutex<HashMap<String, Arc<Gate>>>,
}

/// Test hook: where an acquisition of a key stops (`reached` is notified) until `open` gives it
/// a permit.
#[cfg(test)]
struct Gate {
    reached: tokio::sync::Notify,
    open: tokio::sync::Semaphore,
}

#[cfg(test)]
impl Default for Gate {
    fn default() -> Self {
        Gate {
            reached: tokio::sync::Notify::new(),
            open: tokio::sync::Semaphore::new(0),
        }
    }
}

/// The RabbitMQ [`LockManager`]. See the module documentation and docs/backends/rabbitmq.md.
pub struct RabbitLockManager {
    inner: Arc<LockInner>,
}

impl std::fmt::Debug for RabbitLockManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pool = self.inner.pool.lock();
        f.debug_struct("RabbitLockManager")
            .field("log", &self.inner.log)
            .field(
                "current_connection",
                &pool.current.as_ref().map(|c| c.link.clone()),
            )
            .field("retired_connections", &pool.retired.len())
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
    /// Opens the lock log (on `link`) and a first lock connection made by `connect`; later lock
    /// connections come from `connect` too.
    pub(crate) async fn open(link: Arc<Link>, connect: Connect, names: &Names) -> Result<Self> {
        let args = stream_arguments(&[
            ("x-max-age", AMQPValue::LongString(LOCK_LOG_MAX_AGE.into())),
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongLongInt(LOCK_LOG_SEGMENT_BYTES),
            ),
        ]);
        let log = Log::open(link, names.lock_log(), args, LockView::default()).await?;
        let first = LockConn::open(&connect, &log, 0).await?;
        Ok(RabbitLockManager {
            inner: Arc::new(LockInner {
                log,
                connect,
                pool: parking_lot::Mutex::new(Pool {
                    current: Some(first),
                    ..Pool::default()
                }),
                opening: tokio::sync::Mutex::new(()),
                next_conn: AtomicU64::new(1),
                names: names.clone(),
                keys: parking_lot::Mutex::new(HashMap::new()),
                #[cfg(test)]
                gates: parking_lot::Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl LockInner {
    /// The current connection, for one more user (give it back with [`LockInner::checkin`]).
    async fn checkout(&self) -> Result<Arc<LockConn>> {
        loop {
            if let Some(conn) = self.pool.lock().checkout() {
                return Ok(conn);
            }
            let _one = self.opening.lock().await;
            if let Some(conn) = self.pool.lock().checkout() {
                return Ok(conn);
            }
            let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let conn = LockConn::open(&self.connect, &self.log, id).await?;
            self.pool.lock().current = Some(conn);
        }
    }

    fn checkin(&self, conn: &LockConn) {
        self.pool.lock().checkin(conn);
    }

    /// The key's slot, created if needed.
    fn slot(&self, key: &str) -> Slot {
        self.keys.lock().entry(key.to_string()).or_default().clone()
    }

    /// The key's slot if it has one.
    fn existing_slot(&self, key: &str) -> Option<Slot> {
        self.keys.lock().get(key).cloned()
    }

    /// Forgets a key's slot that holds nothing and that nobody else is using.
    fn tidy(&self, key: &str) {
        let mut keys = self.keys.lock();
        let unused = keys.get(key).is_some_and(|slot| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|held| held.is_none())
        });
        if unused {
            keys.remove(key);
        }
    }

    #[cfg(test)]
    /// Test hook: puts a gate on `key` (see `gates`).
    fn gate_key(&self, key: &str) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        self.gates.lock().insert(key.to_string(), gate.clone());
        gate
    }

    #[cfg(test)]
    async fn gate(&self, key: &str) {
        let gate = self.gates.lock().get(key).cloned();
        if let Some(gate) = gate {
            gate.reached.notify_one();
            if let Ok(permit) = gate.open.acquire().await {
                permit.forget();
            }
        }
    }

    /// Frees a lock this process held: deletes its queue (if its connection still owns it) and
    /// gives its connection back.
    async fn drop_held(&self, key: &str, h: Held) {
        let name = self.names.lock(key);
        if let Err(e) = h.conn.delete_queue(&name).await {
            tracing::warn!(key, error = %e, "cannot delete a lock queue; it goes away with its connection");
        }
        self.checkin(&h.conn);
    }

    /// The lease's deadline `due` passed: frees the lock, unless an extension moved the
    /// deadline meanwhile (one in flight holds the key's mutex across its log append, so it may
    /// complete after the timer fired and before this runs). Returns whether the timer is done:
    /// false when the lock was extended and its new deadline is to be watched.
    async fn expire(&self, key: &str, token: &str, due: Instant) -> bool {
        let Some(slot) = self.existing_slot(key) else {
            return true;
        };
        let done = {
            // The queue is deleted under the key's mutex: an acquisition of the key by this
            // process on the same connection would otherwise redeclare the queue (its owner may)
            // and then lose it to this deletion.
            let mut held = slot.lock().await;
            match held.as_ref() {
                Some(h) if h.lease.token == token && *h.deadline.borrow() > due => false,
                Some(h) if h.lease.token == token => {
                    if let Some(h) = held.take() {
                        tracing::debug!(key, owner = %h.lease.owner, "lock lease ended; releasing the lock queue");
                        self.drop_held(key, h).await;
                    }
                    true
                }
                _ => true,
            }
        };
        drop(slot);
        self.tidy(key);
        done
    }

    async fn append(&self, conn: &LockConn, op: LockOp) -> Result<u64> {
        self.log
            .submit_via(&conn.writer, std::slice::from_ref(&op))
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

    /// One acquisition attempt, with the key's slot locked and empty. On success the returned
    /// lease's connection stays checked out (the lock is its user).
    async fn try_acquire(
        self: &Arc<Self>,
        key: &str,
        owner: &str,
        ttl: Duration,
        ttl_c: chrono::Duration,
    ) -> Result<Option<Held>> {
        let name = short(self.names.lock(key))?;
        let started = Instant::now();
        let conn = self.checkout().await?;
        let declared = async {
            // A throwaway channel: a refused declaration closes the channel it was made on.
            let ch = conn.session.channel(false).await?;
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
                    Ok(true)
                }
                Err(e) => {
                    if soft_error(&e).is_some() {
                        conn.waste();
                    }
                    if soft_error(&e) == Some(AMQPSoftError::RESOURCELOCKED) {
                        Ok(false)
                    } else {
                        Err(amqp_error("declare a lock queue", e))
                    }
                }
            }
        }
        .await;
        match declared {
            Ok(true) => {}
            Ok(false) => {
                self.checkin(&conn);
                return Ok(None);
            }
            Err(e) => {
                self.checkin(&conn);
                return Err(e);
            }
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let expires_at = Utc::now() + ttl_c;
        let appended = self
            .append(
                &conn,
                LockOp::Acquired {
                    key: key.to_string(),
                    owner: owner.to_string(),
                    token: token.clone(),
                    expires_at,
                },
            )
            .await;
        let fence = match appended {
            Ok(fence) if conn.alive() => fence,
            Ok(_) => {
                self.checkin(&conn);
                return Err(Error::temporary(
                    BACKEND,
                    "the lock connection was lost while acquiring; the lock was released",
                    None,
                ));
            }
            Err(e) => {
                if let Err(d) = conn.delete_queue(&self.names.lock(key)).await {
                    tracing::warn!(key, error = %d, "cannot delete a lock queue; it goes away with its connection");
                }
                self.checkin(&conn);
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
            Arc::downgrade(self),
            key.to_string(),
            token,
            rx,
        ));
        Ok(Some(Held {
            lease,
            conn,
            deadline: tx,
        }))
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
                if *deadline.borrow() != due {
                    continue;
                }
                let Some(inner) = inner.upgrade() else { return };
                if inner.expire(&key, &token, due).await {
                    return;
                }
            }
            changed = deadline.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
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
        short(self.inner.names.lock(key))?;
        let inner = &self.inner;
        let slot = inner.slot(key);
        let result = async {
            let mut held = slot.lock().await;
            #[cfg(test)]
            inner.gate(key).await;
            if held.as_ref().is_some_and(Held::alive) {
                return Ok(None);
            }
            if let Some(h) = held.take() {
                inner.drop_held(key, h).await;
            }
            let won = inner.try_acquire(key, owner, ttl, ttl_c).await?;
            let lease = won.as_ref().map(|h| h.lease.clone());
            *held = won;
            Ok(lease)
        }
        .await;
        drop(slot);
        inner.tidy(key);
        result
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let ttl_c = ttl_to_chrono(ttl)?;
        let inner = &self.inner;
        let not_owner = || Error::NotLockOwner {
            key: lease.key.clone(),
        };
        let slot = inner.existing_slot(&lease.key).ok_or_else(not_owner)?;
        let mut held = slot.lock().await;
        let Some(h) = held
            .as_mut()
            .filter(|h| h.lease.token == lease.token && h.alive())
        else {
            return Err(not_owner());
        };
        #[cfg(test)]
        inner.gate(&lease.key).await;
        let due = Instant::now() + ttl;
        let expires_at = Utc::now() + ttl_c;
        inner
            .append(
                &h.conn,
                LockOp::Extended {
                    key: lease.key.clone(),
                    owner: h.lease.owner.clone(),
                    token: h.lease.token.clone(),
                    fencing_token: h.lease.fencing_token,
                    expires_at,
                },
            )
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
        let Some(slot) = inner.existing_slot(&lease.key) else {
            return Ok(false);
        };
        let released = async {
            let mut held = slot.lock().await;
            let ours = held
                .as_ref()
                .is_some_and(|h| h.lease.token == lease.token && h.alive());
            if !ours {
                return false;
            }
            let Some(h) = held.take() else {
                return false;
            };
            let conn = h.conn.clone();
            if let Err(e) = conn.delete_queue(&inner.names.lock(&lease.key)).await {
                tracing::warn!(key = %lease.key, error = %e, "cannot delete a lock queue; it goes away with its connection");
            }
            let appended = inner
                .append(
                    &conn,
                    LockOp::Released {
                        key: lease.key.clone(),
                        token: lease.token.clone(),
                    },
                )
                .await;
            if let Err(e) = appended {
                // The queue is gone, so the lock is free; the log keeps a stale holder record
                // that holder() ignores because it checks the queue first.
                tracing::warn!(key = %lease.key, error = %e, "lock released but its release record was not appended");
            }
            drop(h);
            inner.checkin(&conn);
            true
        }
        .await;
        drop(slot);
        inner.tidy(&lease.key);
        Ok(released)
    }

    async fn holder(&self, key: &str) -> Result<Option<LockHolder>> {
        validate_lock_key(key)?;
        let inner = &self.inner;
        if let Some(slot) = inner.existing_slot(key) {
            let held = slot.lock().await;
            if let Some(h) = held.as_ref().filter(|h| h.alive()) {
                return Ok(Some(LockHolder {
                    owner: h.lease.owner.clone(),
                    fencing_token: h.lease.fencing_token,
                    expires_at: h.lease.expires_at,
                }));
            }
        }
        // Is the queue held by some connection? (A passive declaration: 405 if another
        // connection owns it, 404 if nobody does. Either closes the channel: a throwaway one,
        // counted against the connection's budget.)
        let name = short(inner.names.lock(key))?;
        let conn = inner.checkout().await?;
        let probe = async {
            let ch = conn.session.channel(false).await?;
            let probe = ch
                .queue_declare(
                    name,
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match probe {
                Ok(_) => {
                    // This connection's queue of a lease that just ended: being released.
                    let _ = ch.close(200, "probed".into()).await;
                    Ok(false)
                }
                Err(e) => {
                    if soft_error(&e).is_some() {
                        conn.waste();
                    }
                    match soft_error(&e) {
                        Some(AMQPSoftError::NOTFOUND) => Ok(false),
                        Some(AMQPSoftError::RESOURCELOCKED) => Ok(true),
                        _ => Err(amqp_error("look up a lock queue", e)),
                    }
                }
            }
        }
        .await;
        inner.checkin(&conn);
        if !probe? {
            return Ok(None);
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

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::harness::{broker_url, unique_prefix, BrokerKind};

    async fn manager(prefix: &str) -> (RabbitLockManager, Arc<Link>, Names) {
        let url = url::Url::parse(&broker_url(BrokerKind::Amqp).await).expect("test URL");
        let opts = crate::bundle::ConnectOptions {
            prefix: prefix.to_string(),
            ..Default::default()
        };
        let (link, names) = super::super::link_for(&url, &opts, "lock-test").expect("link");
        let connect: Connect =
            Box::new(move || super::super::link_for(&url, &opts, "lock-test").map(|(l, _)| l));
        let manager = RabbitLockManager::open(link.clone(), connect, &names)
            .await
            .expect("open the lock manager");
        (manager, link, names)
    }

    async fn drop_lock_log(link: &Link, names: &Names) {
        let session = link.session().await.expect("session");
        let ch = session.channel(false).await.expect("channel");
        ch.queue_delete(names.lock_log().as_str().into(), Default::default())
            .await
            .expect("delete the lock log");
    }

    /// Bounds a call that must not wait for the stalled acquisition (which never ends by
    /// itself): a deadlock detector, not a timing requirement.
    async fn unblocked<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .unwrap_or_else(|_| panic!("{what} waited for the stalled acquisition of another key"))
    }

    /// An acquisition of one key that is stuck in the middle (at a test gate, holding what it
    /// holds during its broker round trips) does not hold up the extension, the holder lookup
    /// or the release of another key. With one mutex for every key, the extension waited for
    /// the acquisition, and the monitor's lease could run out meanwhile.
    #[tokio::test]
    async fn a_stalled_acquisition_of_one_key_does_not_delay_another_key() {
        let prefix = unique_prefix("lock_per_key");
        let (manager, link, names) = manager(&prefix).await;
        let manager = Arc::new(manager);
        let ttl = Duration::from_secs(30);
        let y = manager
            .acquire("y", "owner", ttl)
            .await
            .expect("acquire y")
            .expect("y is free");
        let gate = manager.inner.gate_key("x");
        let stalled = tokio::spawn({
            let manager = manager.clone();
            async move { manager.acquire("x", "owner", ttl).await }
        });
        gate.reached.notified().await;

        let extended = unblocked("extend", manager.extend(&y, Duration::from_secs(60)))
            .await
            .expect("extend y");
        assert!(extended.expires_at > y.expires_at);
        let holder = unblocked("holder", manager.holder("y"))
            .await
            .expect("holder of y")
            .expect("y is held");
        assert_eq!(holder.fencing_token, y.fencing_token);
        assert!(
            !stalled.is_finished(),
            "the gate did not hold the acquisition"
        );

        gate.open.add_permits(1);
        let x = stalled
            .await
            .expect("acquisition task")
            .expect("acquire x")
            .expect("x is free");
        assert!(x.fencing_token > y.fencing_token);
        assert!(manager.release(&x).await.expect("release x"));
        assert!(unblocked("release", manager.release(&extended))
            .await
            .expect("release y"));

        drop(manager);
        drop_lock_log(&link, &names).await;
    }

    /// An extension that is on its way when the lease's timer fires (it holds the key's mutex
    /// across its log append, here held at a test gate) keeps the lock: the timer finds the
    /// deadline moved and watches the new one. Before, the timer deleted the lock queue after
    /// the extension had succeeded, and another process acquired a lock its holder believed
    /// it held (seen as two workers starting tasks under one rate slot).
    #[tokio::test]
    async fn an_extension_racing_the_expiry_timer_keeps_the_lock() {
        let prefix = unique_prefix("lock_extend_race");
        let (other, _other_link, _) = manager(&prefix).await;
        let (manager, link, names) = manager(&prefix).await;
        let manager = Arc::new(manager);
        let lease = manager
            .acquire("z", "first", Duration::from_millis(800))
            .await
            .expect("acquire z")
            .expect("z is free");
        let gate = manager.inner.gate_key("z");
        let extending = tokio::spawn({
            let manager = manager.clone();
            let lease = lease.clone();
            async move { manager.extend(&lease, Duration::from_secs(30)).await }
        });
        gate.reached.notified().await;
        // The timer fires meanwhile and waits for the key's mutex.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        gate.open.add_permits(1);
        let extended = extending
            .await
            .expect("extension task")
            .expect("the extension started before the lease ended, so it holds");
        // Whatever the timer does, it has done it by now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            other
                .acquire("z", "second", Duration::from_secs(30))
                .await
                .expect("acquire z from another process"),
            None,
            "another process acquired a lock its holder had extended"
        );
        assert!(manager.release(&extended).await.expect("release z"));

        drop(manager);
        drop(other);
        drop_lock_log(&link, &names).await;
    }

    #[test]
    fn a_connection_wastes_at_most_half_its_channels() {
        assert_eq!(LockConn::budget(2047), 1023);
        assert_eq!(LockConn::budget(0), 32767);
        assert_eq!(LockConn::budget(1), 1);
    }
}
