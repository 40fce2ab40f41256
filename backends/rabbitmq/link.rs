//! One AMQP connection that comes back: [`Link`] hands out the live connection, reconnecting
//! (once, for all callers) when the broker or the network dropped it. A URL may name several
//! nodes of a cluster: a connection goes to the first that answers, starting from a random one,
//! and a reconnection starts with the node after the one that was lost.
//!
//! lapin does not reconnect by itself (its experimental auto-recovery would silently re-declare
//! exclusive lock queues, which must not survive a lost connection). Everything in this backend
//! that holds broker state therefore keys it by the connection's *generation*: when the
//! generation changes, channels are reopened, topology is declared again and consumers are
//! resumed by their owners.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use parking_lot::Mutex;

use crate::error::{Error, Result};

pub(crate) const BACKEND: &str = "rabbitmq";

/// A live connection and the generation it belongs to.
pub(crate) struct Session {
    pub(crate) conn: Connection,
    pub(crate) generation: u64,
}

impl Session {
    /// True while the broker has not closed the connection.
    pub(crate) fn is_alive(&self) -> bool {
        self.conn.status().connected()
    }

    /// Opens a channel, optionally in publisher-confirm mode.
    pub(crate) async fn channel(&self, confirms: bool) -> Result<Channel> {
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(|e| amqp_error("open a channel", e))?;
        if confirms {
            ch.confirm_select(Default::default())
                .await
                .map_err(|e| amqp_error("enable publisher confirms", e))?;
        }
        Ok(ch)
    }
}

/// A self-healing connection to one broker URL (one node, or any of several).
pub(crate) struct Link {
    /// The nodes, each with its connection parameters; at least one.
    uris: Vec<lapin::uri::AMQPUri>,
    redacted: String,
    name: String,
    connect_timeout: Duration,
    /// The node to try first at the next connection.
    next: AtomicUsize,
    current: Mutex<Option<Arc<Session>>>,
    reconnect: tokio::sync::Mutex<()>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.redacted)
            .field("name", &self.name)
            .field("generation", &self.generations.load(Ordering::Relaxed))
            .finish()
    }
}

impl Link {
    /// A link to any of `uris` (at least one) that connects lazily (call [`Link::session`]
    /// once to connect eagerly). The first connection tries the nodes from a random one, so
    /// that clients spread over a cluster.
    pub(crate) fn new(
        uris: Vec<lapin::uri::AMQPUri>,
        redacted: String,
        name: String,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        assert!(!uris.is_empty(), "a link needs at least one node");
        let first = rand::random_range(0..uris.len());
        Arc::new(Link {
            uris,
            redacted,
            name,
            connect_timeout,
            next: AtomicUsize::new(first),
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            generations: AtomicU64::new(0),
        })
    }

    fn live(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .as_ref()
            .filter(|s| s.is_alive())
            .cloned()
    }

    /// The live connection, reconnecting if it was lost. Concurrent callers share one attempt.
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _one_at_a_time = self.reconnect.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let (conn, node) = self.connect_any().await?;
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        if generation > 1 {
            tracing::info!(url = %self.redacted, %node, name = %self.name, generation, "reconnected to RabbitMQ");
        } else {
            tracing::debug!(url = %self.redacted, %node, name = %self.name, "connected to RabbitMQ");
        }
        let session = Arc::new(Session { conn, generation });
        *self.current.lock() = Some(session.clone());
        Ok(session)
    }

    /// A new connection to the first node that accepts one, trying each once from `next`;
    /// returns it with the node's `host:port`. With one node the error is that node's; with
    /// several it lists every node's, and is permanent only if every node's was.
    async fn connect_any(&self) -> Result<(Connection, String)> {
        let n = self.uris.len();
        let first = self.next.load(Ordering::Relaxed) % n;
        let mut failures = Vec::with_capacity(n);
        let mut all_permanent = true;
        for k in 0..n {
            let i = (first + k) % n;
            let uri = &self.uris[i];
            let node = format!("{}:{}", uri.authority.host, uri.authority.port);
            let props =
                ConnectionProperties::default().with_connection_name(self.name.clone().into());
            let attempt = Connection::connect_uri(uri.clone(), props);
            let failure = match tokio::time::timeout(self.connect_timeout, attempt).await {
                Ok(Ok(conn)) => {
                    // When this connection is lost, try the other nodes first.
                    self.next.store((i + 1) % n, Ordering::Relaxed);
                    return Ok((conn, node));
                }
                Ok(Err(e)) if n == 1 => {
                    return Err(classify(format!("cannot connect to {}", self.redacted), e))
                }
                Ok(Err(e)) => classify(node.clone(), e),
                Err(_) if n == 1 => {
                    return Err(Error::temporary(
                        BACKEND,
                        format!(
                            "cannot connect to {}: no answer within {:?}",
                            self.redacted, self.connect_timeout
                        ),
                        None,
                    ))
                }
                Err(_) => Error::temporary(
                    BACKEND,
                    format!("{node}: no answer within {:?}", self.connect_timeout),
                    None,
                ),
            };
            tracing::debug!(%node, error = %failure, "cannot connect to this RabbitMQ node; trying the next");
            all_permanent &= !failure.is_temporary();
            failures.push(failure.to_string());
        }
        let message = format!(
            "cannot connect to any node of {}: {}",
            self.redacted,
            failures.join("; ")
        );
        Err(if all_permanent {
            Error::permanent(BACKEND, message, None)
        } else {
            Error::temporary(BACKEND, message, None)
        })
    }

    /// Like [`Link::session`], but keeps trying (with backoff) until it succeeds or `give_up`
    /// says stop. Used by background consumers.
    pub(crate) async fn session_retrying(
        &self,
        give_up: impl Fn() -> bool,
    ) -> Option<Arc<Session>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if give_up() {
                return None;
            }
            match self.session().await {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(name = %self.name, error = %e, "RabbitMQ unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// True while the current connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        self.live().is_some()
    }

    /// The current generation (0 before the first connection).
    pub(crate) fn generation(&self) -> u64 {
        self.generations.load(Ordering::SeqCst)
    }
}

/// A channel kept open and reopened on demand (after a reconnect or a channel error).
pub(crate) struct CachedChannel {
    link: Arc<Link>,
    confirms: bool,
    prefetch: Option<u16>,
    slot: tokio::sync::Mutex<Option<(u64, Channel)>>,
}

impl CachedChannel {
    /// A channel opened on first use, in confirm mode if `confirms`, with a per-consumer
    /// prefetch if `prefetch` is set.
    pub(crate) fn new(link: Arc<Link>, confirms: bool, prefetch: Option<u16>) -> Self {
        CachedChannel {
            link,
            confirms,
            prefetch,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// The channel and the generation of the connection it lives on. The bool is true when it
    /// was (re)opened by this call, so the caller re-declares what it needs.
    pub(crate) async fn get(&self) -> Result<(Channel, u64, bool)> {
        let mut slot = self.slot.lock().await;
        if let Some((generation, ch)) = slot.as_ref() {
            if ch.status().connected() {
                return Ok((ch.clone(), *generation, false));
            }
        }
        let session = self.link.session().await?;
        let opening = async {
            let ch = session.channel(self.confirms).await?;
            if let Some(prefetch) = self.prefetch {
                ch.basic_qos(prefetch, Default::default())
                    .await
                    .map_err(|e| amqp_error("set the prefetch", e))?;
            }
            Ok::<_, Error>(ch)
        };
        let ch = tokio::time::timeout(ROUND_TRIP_TIMEOUT, opening)
            .await
            .map_err(|_| {
                Error::temporary(
                    BACKEND,
                    format!(
                        "open a channel: the broker did not answer within {ROUND_TRIP_TIMEOUT:?}"
                    ),
                    None,
                )
            })??;
        *slot = Some((session.generation, ch.clone()));
        Ok((ch, session.generation, true))
    }
}

/// How long one broker round trip (a get, a publisher confirm, a declaration, a consume) may
/// take before the call gives up with a temporary error. Without it a call could wait forever
/// on a broker that keeps the connection open but does not answer: a quorum queue without a
/// leader, a channel still addressing a lost leader, a connection blocked by a resource alarm.
pub(crate) const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `call`, one or more pipelined round trips on `ch`, for at most `limit`. When the broker
/// does not answer in time the channel is closed (in the background: the close is a round trip
/// too), so that late answers cannot arrive on it (messages a late `basic.get` hands out are
/// requeued by the broker), and a temporary error naming `what` is returned; the channel's
/// owner opens a new one on its next use.
pub(crate) async fn bounded<T>(
    ch: &Channel,
    what: &str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => {
            let stale = ch.clone();
            tokio::spawn(async move {
                let closing = stale.close(200, "no answer in time".into());
                if tokio::time::timeout(ROUND_TRIP_TIMEOUT, closing)
                    .await
                    .is_err()
                {
                    tracing::debug!("a channel that timed out did not close in time either");
                }
            });
            Err(Error::temporary(
                BACKEND,
                format!(
                    "{what}: the broker did not answer within {limit:?} (the channel was closed; \
                     retrying is safe)"
                ),
                None,
            ))
        }
    }
}

/// A short string for the wire; names longer than 255 bytes are a caller error.
pub(crate) fn short(s: impl Into<String>) -> Result<ShortString> {
    let s = s.into();
    ShortString::try_new(s.clone()).map_err(|_| {
        Error::invalid(
            "name",
            format!("{s:?} is longer than the 255 bytes AMQP allows for a name"),
        )
    })
}

/// The AMQP reply code of a channel-level (soft) error, if that is what `e` is.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// True when `e` is the broker's NOT_FOUND (a queue or exchange that does not exist, perhaps
/// deleted behind this process's back).
pub(crate) fn is_not_found(e: &Error) -> bool {
    let Error::Backend {
        source: Some(source),
        ..
    } = e
    else {
        return false;
    };
    source
        .downcast_ref::<lapin::Error>()
        .and_then(soft_error)
        .is_some_and(|s| s == AMQPSoftError::NOTFOUND)
}

/// Converts a lapin error into ours: connection and channel trouble is temporary (retrying on a
/// fresh channel or connection may succeed); refused access and mismatched declarations are
/// permanent.
pub(crate) fn amqp_error(context: &str, e: lapin::Error) -> Error {
    classify(context.to_string(), e)
}

fn classify(context: String, e: lapin::Error) -> Error {
    let permanent = match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                    | AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE)
            ) || matches!(
                amqp.kind(),
                AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::NOTALLOWED)
            )
        }
        ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::AuthProviderError(_)
        | ErrorKind::SerialisationError(_)
        | ErrorKind::NoDefaultRuntime => true,
        _ => false,
    };
    let message = match e.kind() {
        // lapin's text is a Debug dump of its parser's state.
        ErrorKind::ParsingError(_) => format!(
            "{context}: the server's reply is not AMQP 0-9-1 (is this the port of a RabbitMQ server?)"
        ),
        _ => format!("{context}: {e}"),
    };
    if permanent {
        Error::permanent(BACKEND, message, Some(Box::new(e) as _))
    } else {
        Error::temporary(BACKEND, message, Some(Box::new(e) as _))
    }
}
