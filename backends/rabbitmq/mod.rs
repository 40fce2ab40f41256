//! The RabbitMQ backend (feature `rabbitmq`, lapin on tokio): `amqp://` and `amqps://` URLs.
//!
//! * [`RabbitBus`]: durable classic queues with `x-max-priority` 10 (or, with
//!   `queue_type=quorum`, one replicated quorum queue per priority level), persistent messages,
//!   publisher confirms, `basic.get` batches for exact priority order, per-delay TTL queues that
//!   dead-letter back, a dead-letter queue per work queue, events on a direct exchange.
//! * [`RabbitRegistry`]: an append-only log of task changes in a stream queue, replayed into an
//!   in-process view; compare-and-set is decided by log order.
//! * [`RabbitLockManager`]: exclusive queues held by the lock manager's own connections, with
//!   fencing tokens and holder records in a lock log stream.
//!
//! All state lives in RabbitMQ. docs/backends/rabbitmq.md explains the design, its guarantees
//! and its costs.

mod bus;
mod control;
mod events;
mod leases;
mod link;
mod lock;
mod log;
mod names;
mod registry;
mod schedules;
mod snapshot;
mod view;
mod writer;

use std::sync::Arc;

use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use url::Url;

pub use bus::RabbitBus;
pub use lock::RabbitLockManager;
pub use registry::RabbitRegistry;

use self::link::Link;
use self::names::{Names, QueueType};
use crate::bundle::{ConnectOptions, Parts, Roles};
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::redact::redact_url;

/// Heartbeat asked for when the URL does not say (`?heartbeat=N` seconds): a peer that stops
/// answering is noticed within about twice this, and its deliveries and locks are released.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Opens the requested roles on one shared connection (plus connections of its own for the
/// exclusive lock queues when `roles.locks` is set, see `lock.rs`).
///
/// The URL gives the user, password, host, port and vhost (`amqp://user:pass@host:5672/vhost`,
/// `%2f` for `/`; an empty path means `/`), and optionally `heartbeat`, `frame_max`,
/// `channel_max`, `connection_timeout` (ms) and `auth_mechanism` query parameters, and
/// `queue_type=classic|quorum` (the bus's queues; classic by default). `amqps://` connects
/// with TLS (rustls, the platform's trust store).
pub async fn open(url: &Url, roles: &Roles, opts: &ConnectOptions) -> Result<Parts> {
    let (link, names) = link_for(url, opts, "main")?;
    let settings = parse_url(url)?;
    link.session().await?;
    let mut parts = Parts::default();
    if roles.bus {
        parts.bus = Some(Arc::new(RabbitBus::new(
            link.clone(),
            names.clone(),
            settings.queue_type,
            opts.max_deliveries,
        )?) as _);
    }
    if roles.registry {
        parts.registry = Some(Arc::new(RabbitRegistry::open(link.clone(), &names).await?) as _);
    }
    if roles.locks {
        let (url, opts) = (url.clone(), opts.clone());
        let connect = Box::new(move || link_for(&url, &opts, "locks").map(|(l, _)| l));
        parts.locks =
            Some(Arc::new(RabbitLockManager::open(link.clone(), connect, &names).await?) as _);
    }
    Ok(parts)
}

/// Channels deleting at once in [`drop_namespace`] (AMQP allows one delete in flight per
/// channel).
const DROP_CHANNELS: usize = 16;

/// [`crate::connect::drop_namespace`] on RabbitMQ: the work and dead-letter queues of
/// `queues`, every delay queue they could have, the registry's and the locks' queues, and the
/// events exchange. AMQP cannot list queues, so the caller names the work queues. Delay queue
/// names are a bounded set (`names::delay_buckets`), deleted whether declared or not. Lock
/// queues are exclusive to their connection and go with it. Only NOT_FOUND is forgiven; a
/// refused delete (ACCESS_REFUSED, RESOURCE_LOCKED) is an error.
pub async fn drop_namespace(url: &Url, opts: &ConnectOptions, queues: &[QueueName]) -> Result<()> {
    let (link, names) = link_for(url, opts, "drop")?;
    let queue_type = parse_url(url)?.queue_type;
    let session = link.session().await?;
    let mut doomed: Vec<String> = Vec::new();
    for q in queues {
        doomed.extend(
            QueueType::Classic
                .lanes()
                .chain(QueueType::Quorum.lanes())
                .map(|lane| names.work_lane(q, lane)),
        );
        doomed.push(names.dead(q));
        for lane in queue_type.lanes() {
            doomed.extend(names::delay_buckets().map(|ms| names.delay_lane(q, lane, ms)));
        }
    }
    doomed.extend([
        names.registry_log(),
        names.registry_snapshots(),
        control::stream_name(&names),
        schedules::stream_name(&names),
        names.lock_log(),
    ]);
    let per_channel = doomed.len().div_ceil(DROP_CHANNELS).max(1);
    let deletes = doomed.chunks(per_channel).map(|chunk| {
        let session = session.clone();
        async move {
            let mut ch = session.channel(false).await?;
            for name in chunk {
                match ch
                    .queue_delete(link::short(name.clone())?, Default::default())
                    .await
                {
                    Ok(_) => {}
                    // An older broker's NOT_FOUND for a queue never declared; it closed the
                    // channel.
                    Err(e) if is_not_found_error(&e) => ch = session.channel(false).await?,
                    Err(e) => return Err(link::amqp_error(&format!("delete queue {name}"), e)),
                }
            }
            Ok::<(), crate::error::Error>(())
        }
    });
    futures::future::try_join_all(deletes).await?;
    let ch = session.channel(false).await?;
    match ch
        .exchange_delete(link::short(names.events())?, Default::default())
        .await
    {
        Ok(()) => {}
        Err(e) if is_not_found_error(&e) => {} // never declared
        Err(e) => return Err(link::amqp_error("delete the events exchange", e)),
    }
    Ok(())
}

/// [`crate::connect::footprint`] on RabbitMQ: whether the registry's log queue exists (when
/// `registry` asks), and for each queue whether its work or dead-letter queue does. Asked with
/// passive declarations, which create nothing (a NOT_FOUND closes the channel: the next
/// question gets a new one).
pub async fn footprint(
    url: &Url,
    opts: &ConnectOptions,
    registry: bool,
    queues: &[QueueName],
) -> Result<(bool, Vec<bool>)> {
    let (link, names) = link_for(url, opts, "inspect")?;
    let session = link.session().await?;
    let mut ch = session.channel(false).await?;
    let mut has = async |name: String| -> Result<bool> {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(link::short(name.clone())?, passive, Default::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_not_found_error(&e) => {
                ch = session.channel(false).await?;
                Ok(false)
            }
            Err(e) => Err(link::amqp_error(&format!("look for queue {name}"), e)),
        }
    };
    let tasks = match registry {
        true => has(names.registry_log()).await?,
        false => true,
    };
    let mut found = Vec::with_capacity(queues.len());
    for q in queues {
        found.push(has(names.work(q)).await? || has(names.dead(q)).await?);
    }
    Ok((tasks, found))
}

fn is_not_found_error(e: &lapin::Error) -> bool {
    link::soft_error(e).is_some_and(|s| s == lapin::protocol::AMQPSoftError::NOTFOUND)
}

/// A (not yet connected) link for `url` named after `role`, and the names under the prefix.
fn link_for(url: &Url, opts: &ConnectOptions, role: &str) -> Result<(Arc<Link>, Names)> {
    let uris = parse_url(url)?.uris;
    let names = Names::new(&opts.prefix)?;
    let name = format!(
        "agent-orchestra {role} prefix={} pid={}",
        names.prefix(),
        std::process::id()
    );
    let link = Link::new(uris, redact_url(url.as_str()), name, opts.connect_timeout);
    Ok((link, names))
}

/// What an `amqp://` / `amqps://` URL says: lapin's connection parameters and this backend's
/// own settings.
#[derive(Debug)]
struct Settings {
    /// One per node the URL names, in its order.
    uris: Vec<AMQPUri>,
    queue_type: QueueType,
}

/// Turns an `amqp://` / `amqps://` URL into lapin's connection parameters and the backend's
/// settings.
fn parse_url(url: &Url) -> Result<Settings> {
    let redacted = || redact_url(url.as_str());
    let bad = |reason: String| Error::UnsupportedUrl {
        url: redacted(),
        reason,
    };
    let scheme = match url.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        other => return Err(bad(format!("scheme `{other}` is not amqp or amqps"))),
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host".into()))?;
    let default_port = match scheme {
        AMQPScheme::AMQP => 5672,
        AMQPScheme::AMQPS => 5671,
    };
    // Several nodes: `h1:5672,h2:5672,h3` (connect::parse_url keeps such a list as the host,
    // its colons and brackets percent-encoded).
    let nodes: Vec<(String, u16)> = if host.contains(',') || host.contains('%') {
        let mut list = percent_decode(host).map_err(|e| bad(format!("host list: {e}")))?;
        // `h1,h2:6000` is a valid URL by itself: its port is the last node's.
        if let Some(port) = url.port() {
            list = format!("{list}:{port}");
        }
        list.split(',')
            .map(|node| split_node(node.trim(), default_port).map_err(&bad))
            .collect::<Result<_>>()?
    } else {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        vec![(host.to_string(), url.port().unwrap_or(default_port))]
    };
    let defaults = AMQPUserInfo::default();
    let username = match url.username() {
        "" => defaults.username,
        u => percent_decode(u).map_err(|e| bad(format!("user name: {e}")))?,
    };
    let password = match url.password() {
        None => defaults.password,
        Some(p) => percent_decode(p).map_err(|e| bad(format!("password: {e}")))?,
    };
    let path = url.path();
    let vhost = match path.strip_prefix('/').unwrap_or(path) {
        "" => "/".to_string(),
        v if v.contains('/') => {
            return Err(bad(format!(
                "the vhost must be one path segment (write `/` as %2f), got {path:?}"
            )))
        }
        v => percent_decode(v).map_err(|e| bad(format!("vhost: {e}")))?,
    };
    let mut query = AMQPQueryString {
        heartbeat: Some(DEFAULT_HEARTBEAT_SECS),
        ..AMQPQueryString::default()
    };
    let mut queue_type = QueueType::default();
    for (key, value) in url.query_pairs() {
        let int = |what: &str| -> Result<u64> {
            value
                .parse::<u64>()
                .map_err(|_| bad(format!("{what} must be a whole number, got {value:?}")))
        };
        match key.as_ref() {
            "heartbeat" => {
                query.heartbeat = Some(
                    u16::try_from(int("heartbeat")?)
                        .map_err(|_| bad("heartbeat is too large".into()))?,
                )
            }
            "frame_max" => {
                query.frame_max = Some(
                    u32::try_from(int("frame_max")?)
                        .map_err(|_| bad("frame_max is too large".into()))?,
                )
            }
            "channel_max" => {
                query.channel_max = Some(
                    u16::try_from(int("channel_max")?)
                        .map_err(|_| bad("channel_max is too large".into()))?,
                )
            }
            "connection_timeout" => query.connection_timeout = Some(int("connection_timeout")?),
            "auth_mechanism" => {
                query.auth_mechanism = Some(value.parse().map_err(bad)?);
            }
            "queue_type" => queue_type = QueueType::parse(&value).map_err(bad)?,
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}`; supported: heartbeat, frame_max, channel_max, connection_timeout, auth_mechanism, queue_type"
                )))
            }
        }
    }
    let uris = nodes
        .into_iter()
        .map(|(host, port)| AMQPUri {
            scheme: scheme.clone(),
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: username.clone(),
                    password: password.clone(),
                },
                host,
                port,
            },
            vhost: vhost.clone(),
            query: query.clone(),
        })
        .collect();
    Ok(Settings { uris, queue_type })
}

/// One node of a host list: `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_node(node: &str, default_port: u16) -> std::result::Result<(String, u16), String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("node {node:?}: the port must be a number up to 65535"))
    };
    let (host, port) = if let Some(rest) = node.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("node {node:?}: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (v6, port_of(p)?),
            None if after.is_empty() => (v6, default_port),
            None => {
                return Err(format!(
                    "node {node:?}: unexpected {after:?} after the address"
                ))
            }
        }
    } else {
        match node.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (node, default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("an empty node in the host list ({node:?})"));
    }
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AMQPUri> {
        let mut uris = parse_url(&Url::parse(s).expect("url"))?.uris;
        assert_eq!(uris.len(), 1);
        Ok(uris.remove(0))
    }

    fn nodes(s: &str) -> Result<Vec<(String, u16)>> {
        let url = crate::connect::parse_url(s).expect("url");
        Ok(parse_url(&url)?
            .uris
            .into_iter()
            .map(|u| (u.authority.host, u.authority.port))
            .collect())
    }

    #[test]
    fn a_url_may_name_several_nodes() {
        let n = |h: &str, p: u16| (h.to_string(), p);
        assert_eq!(
            nodes("amqp://u:p@h1:5672,h2:5673,h3:5674/v").unwrap(),
            vec![n("h1", 5672), n("h2", 5673), n("h3", 5674)]
        );
        assert_eq!(
            nodes("amqps://u:p@h1,h2:6000/v?queue_type=quorum").unwrap(),
            vec![n("h1", 5671), n("h2", 6000)]
        );
        assert_eq!(
            nodes("amqp://[::1]:5672,[::2],10.0.0.3:5000/%2f").unwrap(),
            vec![n("::1", 5672), n("::2", 5672), n("10.0.0.3", 5000)]
        );
        let url = crate::connect::parse_url("amqp://alice:s%40cret@h1:1,h2:2/prod").unwrap();
        let all = parse_url(&url).unwrap().uris;
        assert!(all
            .iter()
            .all(|u| u.authority.userinfo.password == "s@cret" && u.vhost == "prod"));
        let err = nodes("amqp://u:hunter2@h1:1,h2:x/v")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(nodes("amqp://h1:1,,h2:2/v").is_err());
    }

    #[test]
    fn queue_type_is_a_query_parameter_classic_by_default() {
        let of = |s: &str| parse_url(&Url::parse(s).expect("url")).map(|s| s.queue_type);
        assert_eq!(of("amqp://h/v").unwrap(), QueueType::Classic);
        assert_eq!(
            of("amqp://h/v?queue_type=classic").unwrap(),
            QueueType::Classic
        );
        assert_eq!(
            of("amqp://h/v?heartbeat=5&queue_type=quorum").unwrap(),
            QueueType::Quorum
        );
        let err = of("amqp://u:hunter2@h/v?queue_type=stream")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("queue_type must be `classic` or `quorum`"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn url_gives_user_password_host_port_and_vhost() {
        let u = parse("amqp://alice:s%40cret@10.1.2.3:5673/prod").unwrap();
        assert_eq!(u.scheme, AMQPScheme::AMQP);
        assert_eq!(u.authority.userinfo.username, "alice");
        assert_eq!(u.authority.userinfo.password, "s@cret");
        assert_eq!(u.authority.host, "10.1.2.3");
        assert_eq!(u.authority.port, 5673);
        assert_eq!(u.vhost, "prod");
        assert_eq!(u.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
    }

    #[test]
    fn default_vhost_is_slash_written_plain_or_escaped() {
        assert_eq!(parse("amqp://127.0.0.1:5672/%2f").unwrap().vhost, "/");
        assert_eq!(parse("amqp://127.0.0.1:5672").unwrap().vhost, "/");
        assert_eq!(parse("amqp://127.0.0.1:5672/").unwrap().vhost, "/");
        let u = parse("amqp://h").unwrap();
        assert_eq!(u.authority.userinfo.username, "guest");
        assert_eq!(u.authority.port, 5672);
    }

    #[test]
    fn amqps_selects_tls_and_its_default_port() {
        let u = parse("amqps://u:p@broker.example.com/v?heartbeat=30").unwrap();
        assert_eq!(u.scheme, AMQPScheme::AMQPS);
        assert_eq!(u.authority.port, 5671);
        assert_eq!(u.authority.host, "broker.example.com");
        assert_eq!(u.query.heartbeat, Some(30));
        let v6 = parse("amqps://[::1]:5671/%2f").unwrap();
        assert_eq!(v6.authority.host, "::1");
    }

    #[test]
    fn bad_urls_are_rejected_with_the_password_redacted() {
        let err = parse("amqp://u:hunter2@h/v?tls_cert=x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown query parameter `tls_cert`"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse("amqp://u:hunter2@h/a/b").unwrap_err().to_string();
        assert!(err.contains("one path segment"), "{err}");
        assert!(parse("amqp://h/v?heartbeat=soon").is_err());
        assert!(parse("amqp://h/%zz").is_err());
    }
}
