//! Picking backends by URL.
//!
//! `memory://` is always compiled in; `redis://`/`rediss://`, `nats://`/`tls://`, and
//! `amqp://`/`amqps://` need the cargo features `redis`, `nats` and `rabbitmq`. The bus, the
//! registry and the locks may each come from a different URL (and so a different backend);
//! roles that share a URL share one connection. One table says which backend
//! serves which scheme and how it opens, drops and surveys a namespace.

use futures::future::BoxFuture;
use url::Url;

use crate::backends;
use crate::bundle::{Backends, ConnectOptions, Parts, Roles};
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::redact::redact_url;

/// [`Driver::footprint`]'s answer: whether the registry's storage exists, and each queue.
type Survey<'a> = BoxFuture<'a, Result<(bool, Vec<bool>)>>;

/// What one backend does with a URL of its schemes.
struct Driver {
    /// The URL schemes it serves.
    schemes: &'static [&'static str],
    /// Whether it talks to a broker over the network (and so may need TLS).
    remote: bool,
    /// Opens the requested roles.
    open: for<'a> fn(&'a Url, &'a Roles, &'a ConnectOptions) -> BoxFuture<'a, Result<Parts>>,
    /// Deletes everything under the prefix (see [`drop_namespace`]).
    drop_namespace:
        for<'a> fn(&'a Url, &'a ConnectOptions, &'a [QueueName]) -> BoxFuture<'a, Result<()>>,
    /// Whether the registry's storage (when asked) and each queue exist (see [`footprint`]).
    footprint: for<'a> fn(&'a Url, &'a ConnectOptions, bool, &'a [QueueName]) -> Survey<'a>,
}

/// Every scheme any build knows, with the cargo feature that compiles its backend in.
const KNOWN_SCHEMES: &[(&str, Option<&str>)] = &[
    ("memory", None),
    ("redis", Some("redis")),
    ("rediss", Some("redis")),
    ("redis+cluster", Some("redis")),
    ("rediss+cluster", Some("redis")),
    ("nats", Some("nats")),
    ("tls", Some("nats")),
    ("amqp", Some("rabbitmq")),
    ("amqps", Some("rabbitmq")),
];

/// Reading creates nothing on this backend: the registry and every queue count as existing.
fn nothing_to_survey<'a>(
    _: &'a Url,
    _: &'a ConnectOptions,
    _: bool,
    queues: &'a [QueueName],
) -> Survey<'a> {
    let answer = (true, vec![true; queues.len()]);
    Box::pin(async move { Ok(answer) })
}

/// The backends compiled into this build, by scheme.
const DRIVERS: &[Driver] = &[
    Driver {
        schemes: &["memory"],
        remote: false,
        open: |_, roles, opts| {
            let parts = backends::memory::open(roles, opts);
            Box::pin(async move { Ok(parts) })
        },
        // The state lives in the process's `Backends`: nothing to delete.
        drop_namespace: |_, _, _| Box::pin(async { Ok(()) }),
        footprint: nothing_to_survey,
    },
    #[cfg(feature = "redis")]
    Driver {
        schemes: &["redis", "rediss", "redis+cluster", "rediss+cluster"],
        remote: true,
        open: |url, roles, opts| Box::pin(backends::redis::open(url, roles, opts)),
        drop_namespace: |url, opts, _| Box::pin(backends::redis::drop_namespace(url, opts)),
        footprint: nothing_to_survey,
    },
    #[cfg(feature = "nats")]
    Driver {
        schemes: &["nats", "tls"],
        remote: true,
        open: |url, roles, opts| Box::pin(backends::nats::open(url, roles, opts)),
        drop_namespace: |url, opts, _| Box::pin(backends::nats::drop_namespace(url, opts)),
        footprint: |url, opts, registry, queues| {
            Box::pin(backends::nats::footprint(url, opts, registry, queues))
        },
    },
    #[cfg(feature = "rabbitmq")]
    Driver {
        schemes: &["amqp", "amqps"],
        remote: true,
        open: |url, roles, opts| Box::pin(backends::rabbitmq::open(url, roles, opts)),
        drop_namespace: |url, opts, queues| {
            Box::pin(backends::rabbitmq::drop_namespace(url, opts, queues))
        },
        footprint: |url, opts, registry, queues| {
            Box::pin(backends::rabbitmq::footprint(url, opts, registry, queues))
        },
    },
];

/// Parses a URL, accepting a list of hosts where the backend takes one (not a URL by RFC 3986):
/// in a Redis Cluster URL (`redis+cluster://[user:password@]host:port,host:port,...`) the first
/// seed stays the host and the others move to the query parameter `seeds`; in a NATS URL they
/// move to `servers` ([`fold_seed_hosts`]); in a RabbitMQ URL the list stays the host,
/// percent-encoded ([`encode_node_list`]).
pub(crate) fn parse_url(url: &str) -> std::result::Result<Url, url::ParseError> {
    let trimmed = url.trim();
    let rewritten = match trimmed.split_once("://") {
        Some((scheme, rest)) if scheme.ends_with("+cluster") => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let (userinfo, hosts) = match authority.rfind('@') {
                Some(at) => authority.split_at(at + 1),
                None => ("", authority),
            };
            match hosts.split_once(',') {
                Some((first, others)) => {
                    let (path, query) = match tail.split_once('?') {
                        Some((p, q)) => (p, format!("{q}&")),
                        None => (tail, String::new()),
                    };
                    format!("{scheme}://{userinfo}{first}{path}?{query}seeds={others}")
                }
                None => trimmed.to_string(),
            }
        }
        _ => fold_seed_hosts(trimmed).into_owned(),
    };
    // Any other list of hosts (`amqp://u:p@h1:5672,h2:5672/vhost`) stays the URL's host,
    // percent-encoded, for the backend to split.
    match Url::parse(&rewritten) {
        Ok(parsed) => Ok(parsed),
        Err(e) => match encode_node_list(&rewritten) {
            Some(encoded) => Url::parse(&encoded),
            None => Err(e),
        },
    }
}

/// The parsed URL and the driver of its scheme, with TLS ready for a remote one.
fn driver(url: &str) -> Result<(Url, &'static Driver)> {
    let parsed = parse_url(url).map_err(|e| Error::UnsupportedUrl {
        url: redact_url(url),
        reason: format!("not a URL: {e}"),
    })?;
    let scheme = parsed.scheme();
    let Some(d) = DRIVERS.iter().find(|d| d.schemes.contains(&scheme)) else {
        return Err(scheme_error(url, scheme));
    };
    if d.remote {
        #[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
        backends::install_tls_provider();
    }
    Ok((parsed, d))
}

/// A NATS URL naming several seed servers, `nats://a:4222,b:4222` (which [`Url`] cannot
/// parse), as the NATS backend's `nats://a:4222?servers=b:4222`; any other URL unchanged.
pub(crate) fn fold_seed_hosts(url: &str) -> std::borrow::Cow<'_, str> {
    #[cfg(feature = "nats")]
    return backends::nats::fold_seed_hosts(url);
    #[cfg(not(feature = "nats"))]
    std::borrow::Cow::Borrowed(url)
}

/// `url` with the host list of its authority percent-encoded, if it has one (a comma).
fn encode_node_list(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    // Only RabbitMQ's backend splits such a host; anywhere else it stays an error.
    let scheme = url[..start - 3].to_ascii_lowercase();
    if scheme != "amqp" && scheme != "amqps" {
        return None;
    }
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hosts_at = authority.rfind('@').map_or(0, |i| i + 1);
    let hosts = &authority[hosts_at..];
    if !hosts.contains(',') {
        return None;
    }
    let encoded: String = hosts
        .chars()
        .map(|c| match c {
            ':' => "%3A".to_string(),
            '[' => "%5B".to_string(),
            ']' => "%5D".to_string(),
            c => c.to_string(),
        })
        .collect();
    Some(format!(
        "{}{}{encoded}{}",
        &url[..start],
        &authority[..hosts_at],
        &rest[end..]
    ))
}

/// A scheme no compiled-in backend handles: its feature is off, or it is unknown.
fn scheme_error(url: &str, scheme: &str) -> Error {
    match KNOWN_SCHEMES.iter().find(|(s, _)| *s == scheme) {
        Some((_, Some(feature))) => Error::FeatureDisabled {
            scheme: scheme.to_string(),
            feature,
        },
        _ => {
            let all: Vec<String> = KNOWN_SCHEMES
                .iter()
                .map(|(s, _)| format!("{s}://"))
                .collect();
            let (last, rest) = all.split_last().expect("the table is not empty");
            Error::UnsupportedUrl {
                url: redact_url(url),
                reason: format!(
                    "unknown scheme `{scheme}`; expected {} or {last}",
                    rest.join(", ")
                ),
            }
        }
    }
}

/// The URLs of the three roles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendUrls {
    /// URL of the bus.
    pub bus: String,
    /// URL of the registry.
    pub registry: String,
    /// URL of the lock manager.
    pub locks: String,
}

impl BackendUrls {
    /// The same URL for all three roles.
    pub fn all(url: impl Into<String>) -> Self {
        let url = url.into();
        BackendUrls {
            bus: url.clone(),
            registry: url.clone(),
            locks: url,
        }
    }
}

/// Connects the three roles, one connection per distinct URL.
///
/// ```
/// # tokio_test_block_on(async {
/// use agent_orchestra::{connect, BackendUrls, ConnectOptions};
/// let b = connect(&BackendUrls::all("memory://"), &ConnectOptions::default()).await.unwrap();
/// assert_eq!(b.bus.backend(), "memory");
/// let err = connect(&BackendUrls::all("kafka://localhost"), &ConnectOptions::default()).await.unwrap_err();
/// assert!(err.to_string().contains("kafka"));
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Runtime::new().unwrap().block_on(f)
/// # }
/// ```
pub async fn connect(urls: &BackendUrls, opts: &ConnectOptions) -> Result<Backends> {
    let mut groups: Vec<(String, Roles)> = Vec::new();
    for (url, role) in [(&urls.bus, 0usize), (&urls.registry, 1), (&urls.locks, 2)] {
        let idx = match groups.iter().position(|(u, _)| u == url) {
            Some(i) => i,
            None => {
                groups.push((url.clone(), Roles::default()));
                groups.len() - 1
            }
        };
        let roles = &mut groups[idx].1;
        match role {
            0 => roles.bus = true,
            1 => roles.registry = true,
            _ => roles.locks = true,
        }
    }
    let mut all = Parts::default();
    for (url, roles) in groups {
        let parts = open(&url, &roles, opts).await?;
        // A backend's own worker path only when the bus and the registry are both its own.
        if roles.bus && roles.registry {
            all.tasks = parts.tasks;
        }
        all.bus = all.bus.or(parts.bus);
        all.registry = all.registry.or(parts.registry);
        all.locks = all.locks.or(parts.locks);
    }
    all.into_backends().ok_or_else(|| Error::UnsupportedUrl {
        url: redact_url(&urls.bus),
        reason: "backend did not open every requested role".into(),
    })
}

/// Deletes everything stored under `opts.prefix` on the brokers `urls` name: queues with their
/// messages and dead letters, tasks, locks, counters. For a namespace that is thrown away (the
/// CLI's bench and demo, tests); irreversible. What it finds, per backend:
///
/// - memory: nothing to do (the state lives in the process's [`Backends`]);
/// - Redis: the keys of the four families the backend writes under the prefix (`SCAN MATCH`,
///   which walks the server's whole keyspace, then `UNLINK`); a prefix that begins another one
///   (`a_` and `a_b_`) takes the other's keys too;
/// - NATS: the streams and key-value buckets the prefix's backend makes, by their exact names;
/// - RabbitMQ: the work, dead-letter and delay queues of `queues` (AMQP cannot list queues),
///   the registry's and the locks' queues, and the events exchange.
///
/// An empty prefix is refused.
pub async fn drop_namespace(
    urls: &BackendUrls,
    opts: &ConnectOptions,
    queues: &[QueueName],
) -> Result<()> {
    if opts.prefix.is_empty() {
        return Err(Error::invalid(
            "prefix",
            "dropping a namespace needs a non-empty prefix: everything whose name starts with it is deleted",
        ));
    }
    let mut done: Vec<&String> = Vec::new();
    for url in [&urls.bus, &urls.registry, &urls.locks] {
        if done.contains(&url) {
            continue;
        }
        done.push(url);
        let (parsed, d) = driver(url)?;
        (d.drop_namespace)(&parsed, opts, queues).await?;
    }
    Ok(())
}

/// What exists under a prefix on the brokers, found by [`footprint`] without creating anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Whether the registry's storage exists (on NATS its task bucket, on RabbitMQ its log
    /// queue). Redis and memory create nothing to read, so there it is always `true`.
    pub registry: bool,
    /// For each queue asked about, in order, whether the bus holds it (on NATS its work stream,
    /// on RabbitMQ its work queue; always `true` on Redis and memory).
    pub queues: Vec<bool>,
}

/// What exists under `opts.prefix`: the registry's storage on the registry's URL and `queues`
/// on the bus's URL, asked without creating anything. Opening a backend declares what its
/// roles need (NATS buckets and streams, RabbitMQ queues and exchanges), so a command that only
/// reads (the CLI's `task get`, `tasks list`, `stats`, `dead-letters`) asks this first and
/// answers for what is missing without opening it: an inspection with a mistyped prefix or
/// queue leaves nothing behind.
pub async fn footprint(
    urls: &BackendUrls,
    opts: &ConnectOptions,
    queues: &[QueueName],
) -> Result<Footprint> {
    let (registry, queues) = if urls.registry == urls.bus {
        survey(&urls.bus, opts, true, queues).await?
    } else {
        let (registry, _) = survey(&urls.registry, opts, true, &[]).await?;
        let (_, queues) = survey(&urls.bus, opts, false, queues).await?;
        (registry, queues)
    };
    Ok(Footprint { registry, queues })
}

/// On the broker of `url`: whether the registry's storage exists (`true` when not asked), and
/// whether each of `queues` does.
async fn survey(
    url: &str,
    opts: &ConnectOptions,
    registry: bool,
    queues: &[QueueName],
) -> Result<(bool, Vec<bool>)> {
    let (parsed, d) = driver(url)?;
    (d.footprint)(&parsed, opts, registry, queues).await
}

/// Opens the requested roles from one URL.
pub async fn open(url: &str, roles: &Roles, opts: &ConnectOptions) -> Result<Parts> {
    let (parsed, d) = driver(url)?;
    (d.open)(&parsed, roles, opts).await
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn a_cluster_seed_list_becomes_the_first_host_and_a_seeds_parameter() {
        let u = parse_url("redis+cluster://u:p@h1:7000,h2:7001,h3:7002").expect("parse");
        assert_eq!(
            u.as_str(),
            "redis+cluster://u:p@h1:7000?seeds=h2:7001,h3:7002"
        );
        let u = parse_url("rediss+cluster://h1:7000,h2:7001/0?tls_ca_file=ca.pem").expect("parse");
        assert_eq!(
            u.as_str(),
            "rediss+cluster://h1:7000/0?tls_ca_file=ca.pem&seeds=h2:7001"
        );
        // One seed is parsed as it is; a NATS list moves to `servers`, another scheme's list
        // stays the host, percent-encoded.
        assert_eq!(
            parse_url("redis+cluster://h1:7000").unwrap().as_str(),
            "redis+cluster://h1:7000"
        );
        #[cfg(feature = "nats")]
        assert_eq!(
            parse_url("nats://a,b").unwrap().as_str(),
            "nats://a?servers=b"
        );
        assert_eq!(
            parse_url("amqp://u:p@h1:5672,h2/v").unwrap().host_str(),
            Some("h1%3A5672,h2")
        );
        assert_eq!(
            parse_url("redis://a,b:6379").map(|u| u.to_string()).ok(),
            url::Url::parse("redis://a,b:6379")
                .map(|u| u.to_string())
                .ok()
        );
    }
}
