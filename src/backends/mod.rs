//! Picking backends by URL.
//!
//! `memory://` is always compiled in; `redis://`/`rediss://`, `nats://`/`tls://`, and
//! `amqp://`/`amqps://` need the cargo features `redis`, `nats` and `rabbitmq`. The bus, the
//! registry and the locks may each come from a different URL (and so a different backend);
//! roles that share a URL share one connection.

use std::sync::Arc;

use url::Url;

use crate::bus::Bus;
use crate::error::{Error, Result};
use crate::lock::LockManager;
use crate::model::QueueName;
use crate::registry::Registry;
use crate::task_queue::{Composed, TaskQueue};

pub mod memory;

#[cfg(feature = "redis")]
#[path = "../../backends/redis/mod.rs"]
pub mod redis;

#[cfg(feature = "nats")]
#[path = "../../backends/nats/mod.rs"]
pub mod nats;

#[cfg(feature = "rabbitmq")]
#[path = "../../backends/rabbitmq/mod.rs"]
pub mod rabbitmq;

/// The three services the engine runs on.
#[derive(Clone, Debug)]
pub struct Backends {
    /// Events and work queues.
    pub bus: Arc<dyn Bus>,
    /// Task storage.
    pub registry: Arc<dyn Registry>,
    /// Distributed locks.
    pub locks: Arc<dyn LockManager>,
    /// The worker's hot path over `bus` and `registry` (see [`TaskQueue`]).
    tasks: Arc<dyn TaskQueue>,
}

impl Backends {
    /// The three roles, with the generic [`Composed`] worker path over `bus` and `registry`.
    pub fn new(
        bus: Arc<dyn Bus>,
        registry: Arc<dyn Registry>,
        locks: Arc<dyn LockManager>,
    ) -> Self {
        let tasks = Arc::new(Composed::new(bus.clone(), registry.clone()));
        Backends {
            bus,
            registry,
            locks,
            tasks,
        }
    }

    /// The worker's hot path: a backend's own when one server holds both the bus and the
    /// registry (fewer round trips), else [`Composed`].
    pub fn tasks(&self) -> &Arc<dyn TaskQueue> {
        &self.tasks
    }

    /// The same roles with another hot path: for a layer around [`Backends::tasks`] (metrics,
    /// tracing, fault injection in tests). The layer must keep the [`TaskQueue`] contract.
    pub fn with_task_queue(mut self, tasks: Arc<dyn TaskQueue>) -> Self {
        self.tasks = tasks;
        self
    }

    /// A fresh, private in-memory bundle (the embedded default).
    pub fn memory() -> Self {
        let opts = ConnectOptions::default();
        let parts = memory::open(&Roles::ALL, &opts);
        parts.into_backends().expect("memory opens all roles")
    }
}

/// Options every backend understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Namespace prepended to every key, stream, subject, queue and exchange the backend creates
    /// (`""` by default, so the Redis registry uses the lab's `task_registry:{id}` keys).
    pub prefix: String,
    /// Deliveries after which a work-queue message is dead-lettered.
    pub max_deliveries: u32,
    /// How long to wait for a broker to answer a connection attempt.
    pub connect_timeout: std::time::Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            prefix: String::new(),
            max_deliveries: 10,
            connect_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// Which roles to open from one URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// Open a [`Bus`].
    pub bus: bool,
    /// Open a [`Registry`].
    pub registry: bool,
    /// Open a [`LockManager`].
    pub locks: bool,
}

impl Roles {
    /// All three roles.
    pub const ALL: Roles = Roles {
        bus: true,
        registry: true,
        locks: true,
    };
}

/// What a backend opened for the requested [`Roles`].
#[derive(Default)]
pub struct Parts {
    /// The bus, if requested.
    pub bus: Option<Arc<dyn Bus>>,
    /// The registry, if requested.
    pub registry: Option<Arc<dyn Registry>>,
    /// The lock manager, if requested.
    pub locks: Option<Arc<dyn LockManager>>,
    /// The backend's own [`TaskQueue`], when it opened both the bus and the registry and has
    /// one.
    pub tasks: Option<Arc<dyn TaskQueue>>,
}

impl Parts {
    fn into_backends(self) -> Option<Backends> {
        let mut b = Backends::new(self.bus?, self.registry?, self.locks?);
        if let Some(t) = self.tasks {
            b.tasks = t;
        }
        Some(b)
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
/// use agent_orchestra::backends::{connect, BackendUrls, ConnectOptions};
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
        let parsed = parse_url(url)?;
        #[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
        if parsed.scheme() != "memory" {
            install_tls_provider();
        }
        let _ = queues;
        match parsed.scheme() {
            "memory" => {}
            #[cfg(feature = "redis")]
            "redis" | "rediss" => redis::drop_namespace(&parsed, opts).await?,
            #[cfg(feature = "nats")]
            "nats" | "tls" => nats::drop_namespace(&parsed, opts).await?,
            #[cfg(feature = "rabbitmq")]
            "amqp" | "amqps" => rabbitmq::drop_namespace(&parsed, opts, queues).await?,
            scheme => return Err(scheme_error(url, scheme)),
        }
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
    let parsed = parse_url(url)?;
    #[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
    if parsed.scheme() != "memory" {
        install_tls_provider();
    }
    let _ = (opts, registry);
    match parsed.scheme() {
        // Reading creates nothing there.
        "memory" => Ok((true, vec![true; queues.len()])),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok((true, vec![true; queues.len()])),
        #[cfg(feature = "nats")]
        "nats" | "tls" => nats::footprint(&parsed, opts, registry, queues).await,
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => rabbitmq::footprint(&parsed, opts, registry, queues).await,
        scheme => Err(scheme_error(url, scheme)),
    }
}

/// Installs rustls' `ring` crypto provider as the process default, once. Different client crates
/// bring different providers (ring, aws-lc-rs); with more than one compiled in, rustls refuses to
/// pick one and a TLS connect would panic. An application that installed its own provider first
/// keeps it.
#[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens the requested roles from one URL.
pub async fn open(url: &str, roles: &Roles, opts: &ConnectOptions) -> Result<Parts> {
    let parsed = parse_url(url)?;
    #[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
    if parsed.scheme() != "memory" {
        install_tls_provider();
    }
    match parsed.scheme() {
        "memory" => Ok(memory::open(roles, opts)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => redis::open(&parsed, roles, opts).await,
        #[cfg(feature = "nats")]
        "nats" | "tls" => nats::open(&parsed, roles, opts).await,
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => rabbitmq::open(&parsed, roles, opts).await,
        scheme => Err(scheme_error(url, scheme)),
    }
}

fn parse_url(url: &str) -> Result<Url> {
    Url::parse(url).map_err(|e| Error::UnsupportedUrl {
        url: redact_url(url),
        reason: format!("not a URL: {e}"),
    })
}

/// A scheme no compiled-in backend handles: its feature is off, or it is unknown.
fn scheme_error(url: &str, scheme: &str) -> Error {
    match feature_for(scheme) {
        Some(feature) => Error::FeatureDisabled {
            scheme: scheme.to_string(),
            feature,
        },
        None => Error::UnsupportedUrl {
            url: redact_url(url),
            reason: format!(
                "unknown scheme `{scheme}`; expected memory://, redis://, rediss://, nats://, tls://, amqp:// or amqps://"
            ),
        },
    }
}

fn feature_for(scheme: &str) -> Option<&'static str> {
    match scheme {
        "redis" | "rediss" => Some("redis"),
        "nats" | "tls" => Some("nats"),
        "amqp" | "amqps" => Some("rabbitmq"),
        _ => None,
    }
}

/// The URL with its password (or, without one, its user part: a NATS token), and any
/// `token`/`password`/`pass`/`secret`/`nkey`/`jwt` query value, replaced by
/// `***`. Used in every log line and error message that shows a URL.
///
/// ```
/// use agent_orchestra::backends::redact_url;
/// assert_eq!(redact_url("redis://user:hunter2@host:6379/0"), "redis://user:***@host:6379/0");
/// assert_eq!(redact_url("nats://host:4222?token=abc"), "nats://host:4222?token=***");
/// assert_eq!(redact_url("tls://s3cr3t@host:4222"), "tls://***@host:4222");
/// assert_eq!(redact_url("nats://s3cr3t@host:4222"), "nats://***@host:4222");
/// ```
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        // Not parseable: hide everything between "://" and the last '@', if any.
        return match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        // A user part without a password may be a secret itself: a NATS token
        // (nats://TOKEN@host, tls://TOKEN@host), or a password written where the user goes.
        let _ = parsed.set_username("***");
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| {
            let secret = matches!(
                k.to_ascii_lowercase().as_str(),
                "token" | "password" | "pass" | "secret" | "nkey" | "jwt"
            );
            (
                k.into_owned(),
                if secret { "***".into() } else { v.into_owned() },
            )
        })
        .collect();
    if !pairs.is_empty() {
        let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parsed.set_query(Some(&q.join("&")));
    }
    parsed.to_string()
}
