//! The dedicated pub/sub connection: event subscriptions and the wake-up channels of work
//! queues.
//!
//! One RESP3 [`ConnectionManager`] per bus carries every SUBSCRIBE. Push messages are routed
//! by channel straight from the connection's reader (no extra task): to each event subscriber's
//! bounded channel (a full one misses the event, as the trait allows), or to a queue's
//! [`Notify`]. The manager resubscribes by itself after a reconnect; when the connection drops,
//! a watchdog task pings until it is back (the manager only reconnects when used), then wakes
//! every waiting consumer, since wake-ups sent meanwhile were lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};

use super::conn::{manager_config, no_answer, Conn, Link, PushHandler, BACKEND};
use crate::bus::Subscription;
use crate::error::Result;

/// Events buffered per subscriber before it starts missing them (as in the memory bus).
const SUBSCRIBER_BUFFER: usize = 65_536;
/// Pause between pings while the pub/sub connection is down.
const RECONNECT_PING_EVERY: Duration = Duration::from_millis(250);

type Subscribers = Vec<(u64, mpsc::Sender<Vec<u8>>)>;

/// Routing tables shared with the push handler.
#[derive(Default)]
struct Routes {
    events: Mutex<HashMap<Vec<u8>, Subscribers>>,
    wakes: Mutex<HashMap<Vec<u8>, Arc<Wake>>>,
    reconnecting: AtomicBool,
    hub: OnceLock<Weak<PubSub>>,
}

impl Routes {
    fn on_push(self: &Arc<Self>, push: PushInfo) {
        match push.kind {
            PushKind::Message => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    return;
                };
                let (Some(channel), Some(payload)) = (bytes(channel), bytes(payload)) else {
                    return;
                };
                if let Some(w) = self.wakes.lock().get(&channel) {
                    w.fire();
                    return;
                }
                let mut events = self.events.lock();
                if let Some(subs) = events.get_mut(&channel) {
                    for (_, tx) in subs.iter() {
                        if let Err(mpsc::error::TrySendError::Full(_)) =
                            tx.try_send(payload.clone())
                        {
                            tracing::warn!(
                                channel = %String::from_utf8_lossy(&channel),
                                "slow subscriber missed an event"
                            );
                        }
                    }
                }
            }
            PushKind::Disconnection => {
                tracing::warn!(backend = BACKEND, "pub/sub connection lost; reconnecting");
                // Wake-ups are lost from now on: what a fetch learnt about a queue being
                // empty no longer holds (see `Wake::generation`).
                for w in self.wakes.lock().values() {
                    w.generation.fetch_add(1, Ordering::AcqRel);
                }
                if !self.reconnecting.swap(true, Ordering::AcqRel) {
                    match tokio::runtime::Handle::try_current() {
                        Ok(rt) => {
                            let routes = self.clone();
                            rt.spawn(async move { routes.reconnect().await });
                        }
                        // The runtime is shutting down: nothing left to wake.
                        Err(_) => self.reconnecting.store(false, Ordering::Release),
                    }
                }
            }
            _ => {}
        }
    }

    /// Pings through the manager until it has reconnected (and resubscribed), then wakes every
    /// waiting consumer. Ends early when the bus is gone.
    async fn reconnect(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RECONNECT_PING_EVERY).await;
            let Some(hub) = self.hub.get().and_then(Weak::upgrade) else {
                break;
            };
            let mut conn = hub.manager.clone();
            drop(hub);
            if redis::cmd("PING")
                .query_async::<Value>(&mut conn)
                .await
                .is_ok()
            {
                tracing::info!(
                    backend = BACKEND,
                    "pub/sub connection is back; resubscribed"
                );
                break;
            }
        }
        self.reconnecting.store(false, Ordering::Release);
        for w in self.wakes.lock().values() {
            w.fire();
        }
    }
}

/// The wake-ups of one queue: a [`Notify`] for the consumers waiting now, and a count of the
/// wake-ups (and of the losses of the connection that carries them), with which a consumer
/// knows that none came since a given moment.
#[derive(Default)]
pub(crate) struct Wake {
    notify: Notify,
    generation: AtomicU64,
}

impl Wake {
    fn fire(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// Completes at the next wake-up after it is enabled (as [`Notify::notified`]).
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Wake-ups (and connection losses) so far: unchanged between two readings means no
    /// wake-up came between them.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// The pub/sub side of one bus.
pub(crate) struct PubSub {
    manager: Link,
    routes: Arc<Routes>,
    /// Serializes SUBSCRIBE/UNSUBSCRIBE with the routing-table changes around them.
    changes: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    conn: Conn,
}

impl PubSub {
    /// Opens the dedicated RESP3 connection of `conn`'s target. On a Redis Cluster, a cluster
    /// connection: `PUBLISH` reaches the subscribers of every node (the cluster bus forwards
    /// it), so a SUBSCRIBE on whichever node redis-rs picks hears every queue's wake-ups and
    /// every event; redis-rs resubscribes after a reconnect or a failover.
    pub async fn open(conn: &Conn) -> Result<Arc<PubSub>> {
        let target = conn.target();
        let routes = Arc::new(Routes::default());
        let handler_routes = routes.clone();
        let handler: PushHandler = Box::new(move |push: PushInfo| {
            handler_routes.on_push(push);
            Ok(())
        });
        let manager = if target.is_cluster() {
            let client = target.cluster_client(conn.connect_timeout(), Some(handler))?;
            let c = tokio::time::timeout(conn.connect_timeout(), client.get_async_connection())
                .await
                .map_err(|_| {
                    no_answer(
                        "open the pub/sub connection to",
                        target,
                        conn.connect_timeout(),
                    )
                })?
                .map_err(|e| conn.error("open the pub/sub connection", e))?;
            Link::Cluster(c)
        } else {
            let client = target.client(true)?;
            let config = manager_config(conn.connect_timeout())
                .set_push_sender(handler)
                .set_automatic_resubscription();
            let m = tokio::time::timeout(
                conn.connect_timeout(),
                ConnectionManager::new_with_config(client, config),
            )
            .await
            .map_err(|_| {
                no_answer(
                    "open the pub/sub connection to",
                    target,
                    conn.connect_timeout(),
                )
            })?
            .map_err(|e| conn.error("open the pub/sub connection", e))?;
            Link::Single(m)
        };
        let hub = Arc::new(PubSub {
            manager,
            routes: routes.clone(),
            changes: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            conn: conn.clone(),
        });
        let _ = routes.hub.set(Arc::downgrade(&hub));
        Ok(hub)
    }

    /// Subscribes to an event channel. The returned subscription is live when this returns;
    /// dropping it unsubscribes (once no other local subscriber listens to the channel).
    pub async fn subscribe(self: &Arc<Self>, channel: String) -> Result<Subscription> {
        let key = channel.clone().into_bytes();
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let _guard = self.changes.lock().await;
            let first = {
                let mut events = self.routes.events.lock();
                let subs = events.entry(key.clone()).or_default();
                subs.push((id, tx.clone()));
                subs.len() == 1
            };
            if first {
                let mut m = self.manager.clone();
                if let Err(e) = m.subscribe(channel.as_bytes()).await {
                    self.routes.events.lock().remove(&key);
                    return Err(self.conn.error("SUBSCRIBE", e));
                }
            }
        }
        let hub = Arc::downgrade(self);
        tokio::spawn(async move {
            tx.closed().await;
            if let Some(hub) = hub.upgrade() {
                hub.unsubscribe(key, id).await;
            }
        });
        Ok(Subscription::new(rx))
    }

    async fn unsubscribe(&self, key: Vec<u8>, id: u64) {
        let _guard = self.changes.lock().await;
        let last = {
            let mut events = self.routes.events.lock();
            match events.get_mut(&key) {
                Some(subs) => {
                    subs.retain(|(i, _)| *i != id);
                    if subs.is_empty() {
                        events.remove(&key);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if last {
            let mut m = self.manager.clone();
            if let Err(e) = m.unsubscribe(&key).await {
                tracing::debug!(error = %self.conn.error("UNSUBSCRIBE", e), "unsubscribe failed");
            }
        }
    }

    /// The [`Wake`] fired when `channel` (a queue's wake channel) gets a message, after a
    /// reconnect, subscribing on first use.
    pub async fn wake(&self, channel: &str) -> Result<Arc<Wake>> {
        let key = channel.as_bytes();
        if let Some(n) = self.routes.wakes.lock().get(key) {
            return Ok(n.clone());
        }
        let _guard = self.changes.lock().await;
        if let Some(n) = self.routes.wakes.lock().get(key) {
            return Ok(n.clone());
        }
        let mut m = self.manager.clone();
        m.subscribe(channel.as_bytes())
            .await
            .map_err(|e| self.conn.error("SUBSCRIBE", e))?;
        let n = Arc::new(Wake::default());
        self.routes.wakes.lock().insert(key.to_vec(), n.clone());
        Ok(n)
    }
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("events", &self.routes.events.lock().len())
            .field("wakes", &self.routes.wakes.lock().len())
            .finish()
    }
}
