//! Configuration shared by the `orchestra` CLI and embedding services.
//!
//! A [`Config`] is built in layers, each overriding the one before:
//!
//! 1. the defaults ([`Config::default`]: the in-memory backend, empty prefix, 8 worker slots,
//!    a 30 s lease...);
//! 2. a TOML file, given with `--config PATH` or the `ORCHESTRA_CONFIG` variable (unknown keys
//!    are rejected, so a typo never goes unnoticed);
//! 3. the environment ([`ENV_VARS`]: `ORCHESTRA_URL`, `ORCHESTRA_BUS_URL`,
//!    `ORCHESTRA_REGISTRY_URL`, `ORCHESTRA_LOCKS_URL`, `ORCHESTRA_PREFIX` and a few timings);
//! 4. the CLI's flags (applied by the CLI on the loaded value).
//!
//! Within one layer a role's own URL (`bus_url`, ...) beats the shared `url`; a later layer's
//! `url` replaces every URL of the earlier layers (so `--url` alone always decides).
//!
//! Every mistake is an [`Error::Config`] naming the key (`worker.lease`, `ORCHESTRA_URL`, ...)
//! and the reason. URLs are shown only through [`redact_url`]: the `Debug` and `Display` of a
//! config never contain a password or token.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use agent_orchestra::config::Config;
//! let config = Config::from_toml_str(r#"
//!     url = "memory://"
//!     prefix = "shop_"
//!     [worker]
//!     concurrency = 4
//!     lease = "10s"
//! "#).unwrap();
//! assert_eq!(config.worker_config().concurrency, 4);
//! let backends = config.connect().await.unwrap();
//! assert_eq!(backends.bus.backend(), "memory");
//! # });
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bundle::{Backends, ConnectOptions};
use crate::connect::BackendUrls;
use crate::engine::{Backoff, MonitorConfig, WorkerConfig};
use crate::error::{Error, Result};
use crate::model::{Limits, QueueName};
use crate::queue_limits::QueueLimits;
use crate::redact::redact_url;
use crate::registry::Retention;

pub use crate::clock::{duration_opt, duration_serde, format_duration, parse_duration};

/// Serde helpers for an optional duration where the word `"never"` (or `"off"`, `"none"`)
/// means `None`, so that TOML, which has no null, can switch a default timer off.
mod duration_or_never {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_str("never"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) if super::is_never(&t) => Ok(None),
            Raw::Text(t) => crate::clock::parse_duration(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
            Raw::Secs(s) => crate::clock::seconds(s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

fn is_never(text: &str) -> bool {
    matches!(
        text.trim().to_ascii_lowercase().as_str(),
        "never" | "off" | "none"
    )
}

/// The environment variable naming a TOML configuration file.
pub const ENV_CONFIG: &str = "ORCHESTRA_CONFIG";

/// Every environment variable [`Config::apply_env`] reads, with the key it sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("ORCHESTRA_URL", "url"),
    ("ORCHESTRA_BUS_URL", "bus_url"),
    ("ORCHESTRA_REGISTRY_URL", "registry_url"),
    ("ORCHESTRA_LOCKS_URL", "locks_url"),
    ("ORCHESTRA_PREFIX", "prefix"),
    ("ORCHESTRA_MAX_DELIVERIES", "max_deliveries"),
    ("ORCHESTRA_CONNECT_TIMEOUT", "connect_timeout"),
    ("ORCHESTRA_MAX_PAYLOAD_BYTES", "limits.max_payload_bytes"),
    ("ORCHESTRA_CONCURRENCY", "worker.concurrency"),
    ("ORCHESTRA_LEASE", "worker.lease"),
    ("ORCHESTRA_HEARTBEAT", "worker.heartbeat"),
    ("ORCHESTRA_HANDLER_TIMEOUT", "worker.handler_timeout"),
    ("ORCHESTRA_SHUTDOWN_TIMEOUT", "worker.shutdown_timeout"),
    ("ORCHESTRA_MONITOR_INTERVAL", "monitor.interval"),
];

/// The URL used for a role that no layer configured.
pub const DEFAULT_URL: &str = "memory://";

/// URL schemes the crate knows (whether or not their cargo feature is compiled in).
const KNOWN_SCHEMES: &[&str] = &[
    "memory",
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "nats",
    "tls",
    "amqp",
    "amqps",
];

/// Everything agent-orchestra can be configured with. See the [module docs](self) for the
/// loading order and an example.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// One URL for the bus, the registry and the locks. With neither it nor a role's own URL,
    /// [`Config::connect`] refuses to guess (see [`Config::or_url`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The bus's URL, if it differs from `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus_url: Option<String>,
    /// The registry's URL, if it differs from `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_url: Option<String>,
    /// The lock manager's URL, if it differs from `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locks_url: Option<String>,
    /// Namespace put in front of every key, stream, subject, queue and exchange (`""`).
    pub prefix: String,
    /// Deliveries of one queue message before it is dead-lettered (10).
    pub max_deliveries: u32,
    /// How long to wait for a broker to accept a connection (5 s).
    #[serde(with = "duration_serde")]
    pub connect_timeout: Duration,
    /// Bounds on incoming tasks.
    pub limits: LimitsSection,
    /// How workers behave.
    pub worker: WorkerSection,
    /// How the monitor behaves.
    pub monitor: MonitorSection,
    /// Per-queue limits across every worker, by queue name: the `[queues.NAME]` tables
    /// (`rate = "60/min"`, `concurrency = 4`). A limit set at runtime replaces its queue's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub queues: BTreeMap<String, QueueLimits>,
}

/// The `[limits]` table: bounds on incoming tasks (see [`Limits`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest payload, in bytes of its JSON encoding (2 MiB).
    pub max_payload_bytes: usize,
    /// Largest `max_attempts` a task may ask for (100).
    pub max_attempts_cap: u32,
    /// Most dependencies one task may have (64).
    pub max_dependencies: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let l = Limits::default();
        LimitsSection {
            max_payload_bytes: l.max_payload_bytes,
            max_attempts_cap: l.max_attempts_cap,
            max_dependencies: l.max_dependencies,
        }
    }
}

/// The `[worker]` table (see [`WorkerConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// The worker's id (default `worker-<pid>-<4 hex>`, unique per process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Tasks run at once (8).
    pub concurrency: usize,
    /// How long a claim lasts without a heartbeat (30 s).
    #[serde(with = "duration_serde")]
    pub lease: Duration,
    /// How often a running task renews its lease (default: a third of the lease).
    #[serde(
        with = "duration_opt",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub heartbeat: Option<Duration>,
    /// How long one fetch waits for work (1 s).
    #[serde(with = "duration_serde")]
    pub fetch_wait: Duration,
    /// Fails an attempt running longer than this (`"never"` by default).
    #[serde(with = "duration_or_never")]
    pub handler_timeout: Option<Duration>,
    /// How long a graceful shutdown waits for running tasks (30 s).
    #[serde(with = "duration_serde")]
    pub shutdown_timeout: Duration,
    /// How long a backend call is retried through temporary errors (60 s).
    #[serde(with = "duration_serde")]
    pub backend_retry_budget: Duration,
    /// How often the worker announces itself on the bus (2 s; `"never"`: not at all).
    #[serde(with = "duration_or_never")]
    pub announce_every: Option<Duration>,
    /// How long a handler cancelled while running may take to return before it is dropped (5 s).
    #[serde(with = "duration_serde")]
    pub cancel_grace: Duration,
    /// Backoff between a task's attempts.
    pub retry: RetrySection,
}

impl Default for WorkerSection {
    fn default() -> Self {
        let w = WorkerConfig::default();
        WorkerSection {
            id: None,
            concurrency: w.concurrency,
            lease: w.lease,
            heartbeat: w.heartbeat,
            fetch_wait: w.fetch_wait,
            handler_timeout: w.handler_timeout,
            shutdown_timeout: w.shutdown_timeout,
            backend_retry_budget: w.backend_retry_budget,
            announce_every: w.announce_every,
            cancel_grace: w.cancel_grace,
            retry: RetrySection::from(w.retry),
        }
    }
}

/// The `[worker.retry]` table (see [`Backoff`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySection {
    /// The first delay (1 s).
    #[serde(with = "duration_serde")]
    pub base: Duration,
    /// Growth per attempt (2.0).
    pub factor: f64,
    /// The largest delay (5 min).
    #[serde(with = "duration_serde")]
    pub max: Duration,
    /// Randomised fraction of each delay, 0..=1 (0.2).
    pub jitter: f64,
}

impl Default for RetrySection {
    fn default() -> Self {
        RetrySection::from(Backoff::default())
    }
}

impl From<Backoff> for RetrySection {
    fn from(b: Backoff) -> Self {
        RetrySection {
            base: b.base,
            factor: b.factor,
            max: b.max,
            jitter: b.jitter,
        }
    }
}

impl From<RetrySection> for Backoff {
    fn from(r: RetrySection) -> Self {
        Backoff {
            base: r.base,
            factor: r.factor,
            max: r.max,
            jitter: r.jitter,
        }
    }
}

/// The `[monitor]` table (see [`MonitorConfig`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorSection {
    /// The monitor's id (default `monitor-<pid>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Time between passes (5 s).
    #[serde(with = "duration_serde")]
    pub interval: Duration,
    /// The lock that elects the acting monitor (`monitor`).
    pub lock_key: String,
    /// Re-announce PENDING tasks unchanged this long (10 min; `"never"` to switch off).
    #[serde(with = "duration_or_never")]
    pub reannounce_pending_after: Option<Duration>,
    /// Most tasks handled per kind per pass (500).
    pub batch: usize,
    /// How late a schedule's occurrence may fire as on time (60 s; at least four intervals).
    #[serde(with = "duration_serde")]
    pub schedule_grace: Duration,
    /// How long finished tasks are kept (forever by default).
    pub retention: RetentionSection,
}

impl Default for MonitorSection {
    fn default() -> Self {
        let m = MonitorConfig::default();
        MonitorSection {
            id: None,
            interval: m.interval,
            lock_key: m.lock_key,
            reannounce_pending_after: m.reannounce_pending_after,
            batch: m.batch,
            schedule_grace: m.schedule_grace,
            retention: RetentionSection::default(),
        }
    }
}

/// The `[monitor.retention]` table (see [`Retention`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSection {
    /// Delete finished tasks older than this (e.g. `"7d"`).
    #[serde(
        with = "duration_opt",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub max_age: Option<Duration>,
    /// Keep at most this many finished tasks per status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        let c = ConnectOptions::default();
        Config {
            url: None,
            bus_url: None,
            registry_url: None,
            locks_url: None,
            prefix: c.prefix,
            max_deliveries: c.max_deliveries,
            connect_timeout: c.connect_timeout,
            limits: LimitsSection::default(),
            worker: WorkerSection::default(),
            monitor: MonitorSection::default(),
            queues: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Parses a TOML document over the defaults (no environment, no validation of ranges yet:
    /// see [`Config::validate`]). Errors name the offending key.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| toml_error(text, &e, None))
    }

    /// Reads a TOML file over the defaults. Errors name the file and the key. The file is read
    /// up to [`MAX_CONFIG_BYTES`]: a larger one (or a device such as `/dev/zero`, which never
    /// ends) is refused, not read until memory runs out.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = read_config_file(path)?;
        toml::from_str(&text).map_err(|e| toml_error(&text, &e, Some(path)))
    }

    /// Loads defaults < the TOML file (`path`, else `$ORCHESTRA_CONFIG` if set) < the process
    /// environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        Config::load_with(path, |k| std::env::var(k).ok())
    }

    /// [`Config::load`] with an explicit environment lookup (for tests and embedding services
    /// that keep their settings elsewhere).
    pub fn load_with(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let config = Config::from_layers(path, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults < the TOML file (`path`, else `$ORCHESTRA_CONFIG` as found by `env`) < the
    /// variables found by `env`, without [`Config::validate`]: for callers (like the CLI) that
    /// apply one more layer of their own before validating.
    pub fn from_layers(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let from_env = env(ENV_CONFIG).filter(|p| !p.trim().is_empty());
        let mut config = match (path, from_env) {
            // An unreadable file given as a flag is named as the flag, not as the variable.
            (Some(p), _) => Config::from_file(p).map_err(|e| match e {
                Error::Config { key, reason } if key == ENV_CONFIG => Error::Config {
                    key: "--config".into(),
                    reason,
                },
                e => e,
            })?,
            (None, Some(p)) => Config::from_file(Path::new(&p))?,
            (None, None) => Config::default(),
        };
        config.apply_env_with(env)?;
        Ok(config)
    }

    /// Applies the process environment ([`ENV_VARS`]) over this config.
    pub fn apply_env(&mut self) -> Result<()> {
        self.apply_env_with(|k| std::env::var(k).ok())
    }

    /// Applies the variables of [`ENV_VARS`] found by `env` (empty values count as unset).
    /// Errors name the variable.
    pub fn apply_env_with(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<()> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let duration = |k: &str| -> Result<Option<Duration>> {
            get(k)
                .map(|v| parse_duration(&v).map_err(|reason| Error::config(k, reason)))
                .transpose()
        };
        let number = |k: &str| -> Result<Option<u64>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        Error::config(k, format!("{v:?} is not a non-negative whole number"))
                    })
                })
                .transpose()
        };
        self.set_urls(
            get("ORCHESTRA_URL"),
            get("ORCHESTRA_BUS_URL"),
            get("ORCHESTRA_REGISTRY_URL"),
            get("ORCHESTRA_LOCKS_URL"),
        );
        if let Some(p) = env("ORCHESTRA_PREFIX") {
            // An empty prefix is a legitimate value (the lab's key names).
            self.prefix = p.trim().to_string();
        }
        if let Some(n) = number("ORCHESTRA_MAX_DELIVERIES")? {
            self.max_deliveries = to_u32("ORCHESTRA_MAX_DELIVERIES", n)?;
        }
        if let Some(d) = duration("ORCHESTRA_CONNECT_TIMEOUT")? {
            self.connect_timeout = d;
        }
        if let Some(n) = number("ORCHESTRA_MAX_PAYLOAD_BYTES")? {
            self.limits.max_payload_bytes = n as usize;
        }
        if let Some(n) = number("ORCHESTRA_CONCURRENCY")? {
            self.worker.concurrency = n as usize;
        }
        if let Some(d) = duration("ORCHESTRA_LEASE")? {
            self.worker.lease = d;
        }
        if let Some(d) = duration("ORCHESTRA_HEARTBEAT")? {
            self.worker.heartbeat = Some(d);
        }
        if let Some(v) = get("ORCHESTRA_HANDLER_TIMEOUT") {
            self.worker.handler_timeout = if is_never(&v) {
                None
            } else {
                Some(
                    parse_duration(&v)
                        .map_err(|reason| Error::config("ORCHESTRA_HANDLER_TIMEOUT", reason))?,
                )
            };
        }
        if let Some(d) = duration("ORCHESTRA_SHUTDOWN_TIMEOUT")? {
            self.worker.shutdown_timeout = d;
        }
        if let Some(d) = duration("ORCHESTRA_MONITOR_INTERVAL")? {
            self.monitor.interval = d;
        }
        Ok(())
    }

    /// Applies one layer's URLs: a shared `url` replaces every URL set by earlier layers; a
    /// role's own URL then overrides it for that role. `None` leaves things as they are.
    pub fn set_urls(
        &mut self,
        url: Option<String>,
        bus_url: Option<String>,
        registry_url: Option<String>,
        locks_url: Option<String>,
    ) {
        if let Some(u) = url {
            self.url = Some(u);
            self.bus_url = None;
            self.registry_url = None;
            self.locks_url = None;
        }
        if bus_url.is_some() {
            self.bus_url = bus_url;
        }
        if registry_url.is_some() {
            self.registry_url = registry_url;
        }
        if locks_url.is_some() {
            self.locks_url = locks_url;
        }
    }

    /// Checks every value; the error names the first bad key and says why.
    pub fn validate(&self) -> Result<()> {
        for (key, url) in [
            ("url", &self.url),
            ("bus_url", &self.bus_url),
            ("registry_url", &self.registry_url),
            ("locks_url", &self.locks_url),
        ] {
            if let Some(u) = url {
                check_url(key, u)?;
            }
        }
        if self.prefix.len() > 64 {
            return Err(Error::config(
                "prefix",
                format!("must be at most 64 characters, is {}", self.prefix.len()),
            ));
        }
        if let Some(bad) = self
            .prefix
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
        {
            return Err(Error::config(
                "prefix",
                format!("contains {bad:?}; use ASCII letters, digits and _ - . :"),
            ));
        }
        if self.max_deliveries == 0 {
            return Err(Error::config("max_deliveries", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.limits.max_payload_bytes == 0 {
            return Err(Error::config(
                "limits.max_payload_bytes",
                "must be at least 1",
            ));
        }
        if self.limits.max_attempts_cap == 0 {
            return Err(Error::config(
                "limits.max_attempts_cap",
                "must be at least 1",
            ));
        }
        if self.worker.fetch_wait.is_zero() {
            return Err(Error::config(
                "worker.fetch_wait",
                "must be greater than zero",
            ));
        }
        if self.worker.handler_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::config(
                "worker.handler_timeout",
                "must be greater than zero (or \"never\")",
            ));
        }
        if self.worker.backend_retry_budget.is_zero() {
            return Err(Error::config(
                "worker.backend_retry_budget",
                "must be greater than zero",
            ));
        }
        for (name, limits) in &self.queues {
            let key = format!("queues.{name}");
            QueueName::parse(name).map_err(|e| Error::config(key.clone(), e.to_string()))?;
            limits
                .validate()
                .map_err(|e| Error::config(key, e.to_string()))?;
        }
        self.worker_config().validate()?;
        self.monitor_config().validate()
    }

    /// The URL of each role (`memory://` for a role nothing configured).
    pub fn backend_urls(&self) -> BackendUrls {
        let shared = self.url.as_deref().unwrap_or(DEFAULT_URL);
        let pick = |own: &Option<String>| own.as_deref().unwrap_or(shared).to_string();
        BackendUrls {
            bus: pick(&self.bus_url),
            registry: pick(&self.registry_url),
            locks: pick(&self.locks_url),
        }
    }

    /// The roles for which neither `url` nor the role's own URL is set: [`Config::connect`]
    /// refuses to guess them (a service that forgot its URL would otherwise run alone in
    /// memory, and its tasks vanish with it).
    pub fn roles_without_url(&self) -> Vec<&'static str> {
        if self.url.is_some() {
            return Vec::new();
        }
        [
            ("bus", &self.bus_url),
            ("registry", &self.registry_url),
            ("locks", &self.locks_url),
        ]
        .into_iter()
        .filter(|(_, own)| own.is_none())
        .map(|(role, _)| role)
        .collect()
    }

    /// The same configuration with `url` set to `url` when it is not set: an explicit default,
    /// such as `memory://` for a program that runs on its own unless told otherwise.
    ///
    /// ```
    /// use agent_orchestra::config::Config;
    /// let c = Config::default().or_url("memory://");
    /// assert!(c.is_memory());
    /// let c = Config { url: Some("redis://127.0.0.1".into()), ..Config::default() }.or_url("memory://");
    /// assert!(!c.is_memory());
    /// ```
    pub fn or_url(mut self, url: impl Into<String>) -> Self {
        if self.url.is_none() {
            self.url = Some(url.into());
        }
        self
    }

    /// Whether every role runs on `memory://` (also when no URL is set: see
    /// [`Config::roles_without_url`]).
    pub fn is_memory(&self) -> bool {
        self.roles_on_memory().len() == 3
    }

    /// The roles (`"bus"`, `"registry"`, `"locks"`) that run on the in-memory backend.
    pub fn roles_on_memory(&self) -> Vec<&'static str> {
        let u = self.backend_urls();
        [("bus", u.bus), ("registry", u.registry), ("locks", u.locks)]
            .into_iter()
            .filter(|(_, url)| url.trim_start().to_ascii_lowercase().starts_with("memory:"))
            .map(|(role, _)| role)
            .collect()
    }

    /// The options every backend gets.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            prefix: self.prefix.clone(),
            max_deliveries: self.max_deliveries,
            connect_timeout: self.connect_timeout,
        }
    }

    /// The dispatcher's input limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.limits.max_payload_bytes,
            max_attempts_cap: self.limits.max_attempts_cap,
            max_dependencies: self.limits.max_dependencies,
        }
    }

    /// A worker's configuration.
    pub fn worker_config(&self) -> WorkerConfig {
        let w = &self.worker;
        WorkerConfig {
            worker_id: w
                .id
                .clone()
                .unwrap_or_else(crate::engine::default_worker_id),
            concurrency: w.concurrency,
            lease: w.lease,
            heartbeat: w.heartbeat,
            fetch_wait: w.fetch_wait,
            retry: w.retry.into(),
            handler_timeout: w.handler_timeout,
            shutdown_timeout: w.shutdown_timeout,
            backend_retry_budget: w.backend_retry_budget,
            announce_every: w.announce_every,
            cancel_grace: w.cancel_grace,
            // A name that is no queue is refused by `validate`.
            queue_limits: self
                .queues
                .iter()
                .filter_map(|(name, l)| Some((QueueName::parse(name).ok()?, *l)))
                .collect(),
        }
    }

    /// The retention of finished tasks.
    pub fn retention(&self) -> Retention {
        Retention {
            max_age: self.monitor.retention.max_age,
            max_count: self.monitor.retention.max_count,
        }
    }

    /// A monitor's configuration.
    pub fn monitor_config(&self) -> MonitorConfig {
        let m = &self.monitor;
        let defaults = MonitorConfig::default();
        MonitorConfig {
            monitor_id: m.id.clone().unwrap_or(defaults.monitor_id),
            interval: m.interval,
            lock_key: m.lock_key.clone(),
            reannounce_pending_after: m.reannounce_pending_after,
            retention: self.retention(),
            batch: m.batch,
            schedule_grace: m.schedule_grace,
        }
    }

    /// Validates, then connects the three roles.
    ///
    /// Logs a warning when some roles are on `memory://` and others on a broker: a registry
    /// in this process's memory is invisible to the workers of other processes (they
    /// dead-letter its tasks' messages as unknown), and an in-memory bus is invisible to them
    /// too. (The CLI refuses that mix for its one-shot commands.) Every `connect` on
    /// `memory://` makes a new, private set of state.
    pub async fn connect(&self) -> Result<Backends> {
        self.validate()?;
        let unset = self.roles_without_url();
        if !unset.is_empty() {
            return Err(Error::config(
                "url",
                format!(
                    "no URL is configured for the {}: set ORCHESTRA_URL (or `url` in the config file), or say `memory://` to keep everything in this process (Config::or_url(\"memory://\"))",
                    unset.join(" and ")
                ),
            ));
        }
        let on_memory = self.roles_on_memory();
        match on_memory.len() {
            0 => {}
            3 => tracing::info!("memory:// for bus, registry and locks: the state lives in this process only, and is new on every connect"),
            _ => tracing::warn!(
                roles = %on_memory.join(", "),
                "some roles on memory:// and the others on a broker: what the memory roles hold lives in this process only, so other processes cannot see it (set their URLs too)"
            ),
        }
        crate::connect::connect(&self.backend_urls(), &self.connect_options()).await
    }

    /// What exists under the prefix on the brokers, asked without creating anything
    /// ([`crate::connect::footprint`]).
    pub async fn footprint(
        &self,
        queues: &[crate::model::QueueName],
    ) -> Result<crate::connect::Footprint> {
        self.validate()?;
        crate::connect::footprint(&self.backend_urls(), &self.connect_options(), queues).await
    }

    /// A copy whose URLs have their secrets replaced by `***` (safe to print or log).
    pub fn redacted(&self) -> Config {
        let r = |u: &Option<String>| u.as_deref().map(redact_url);
        Config {
            url: r(&self.url),
            bus_url: r(&self.bus_url),
            registry_url: r(&self.registry_url),
            locks_url: r(&self.locks_url),
            ..self.clone()
        }
    }

    /// The config as TOML, with secrets redacted.
    pub fn to_toml_redacted(&self) -> String {
        toml::to_string(&self.redacted())
            .unwrap_or_else(|e| format!("# the configuration could not be shown: {e}\n"))
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.redacted();
        f.debug_struct("Config")
            .field("url", &c.url)
            .field("bus_url", &c.bus_url)
            .field("registry_url", &c.registry_url)
            .field("locks_url", &c.locks_url)
            .field("prefix", &c.prefix)
            .field("max_deliveries", &c.max_deliveries)
            .field("connect_timeout", &c.connect_timeout)
            .field("limits", &c.limits)
            .field("worker", &c.worker)
            .field("monitor", &c.monitor)
            .field("queues", &c.queues)
            .finish()
    }
}

/// The redacted TOML form.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_toml_redacted())
    }
}

/// The largest configuration file read (1 MiB; a real one is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The text of a configuration file, at most [`MAX_CONFIG_BYTES`] long. Read through a bounded
/// reader rather than by its size, which a pipe (`--config <(...)`) or a device does not have.
fn read_config_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let cannot = |e: &dyn fmt::Display| {
        Error::config(
            ENV_CONFIG,
            format!("cannot read config file {}: {e}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::config(
            ENV_CONFIG,
            format!(
                "config file {} is larger than {} KiB; is it the right file?",
                path.display(),
                MAX_CONFIG_BYTES / 1024
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| cannot(&format!("not UTF-8 text ({e})")))
}

fn to_u32(key: &str, n: u64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::config(key, format!("{n} is too large")))
}

fn check_url(key: &str, url: &str) -> Result<()> {
    let parsed = crate::connect::parse_url(url)
        .map_err(|e| Error::config(key, format!("{} is not a URL: {e}", redact_url(url))))?;
    if !KNOWN_SCHEMES.contains(&parsed.scheme()) {
        return Err(Error::config(
            key,
            format!(
                "{} has unknown scheme `{}`; expected memory://, redis://, rediss://, redis+cluster://, rediss+cluster://, nats://, tls://, amqp:// or amqps://",
                redact_url(url),
                parsed.scheme()
            ),
        ));
    }
    Ok(())
}

/// Turns a TOML error into [`Error::Config`] naming the key (`worker.lease`) it is about.
fn toml_error(source: &str, err: &toml::de::Error, file: Option<&Path>) -> Error {
    let key = err
        .span()
        .and_then(|span| key_at(source, span.start))
        .unwrap_or_else(|| "config".to_string());
    let mut reason = err.message().trim().to_string();
    if let Some(span) = err.span() {
        let line = source[..span.start.min(source.len())].matches('\n').count() + 1;
        reason = match file {
            Some(p) => format!("{reason} (at {}:{line})", p.display()),
            None => format!("{reason} (at line {line})"),
        };
    }
    Error::config(key, reason)
}

/// The dotted key at byte offset `at`: the innermost `[table]` header above it plus the key
/// on its line (a best effort for error messages; values never appear in the key).
fn key_at(source: &str, at: usize) -> Option<String> {
    let at = at.min(source.len());
    let line_start = source[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[at..].find('\n').map_or(source.len(), |i| at + i);
    let line = source[line_start..line_end].trim();
    let mut table = String::new();
    for l in source[..line_start].lines().rev() {
        let l = l.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            break;
        }
    }
    let key = if line.starts_with('[') {
        // The error is about a whole table (e.g. an unknown `[wokrer]`).
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    } else {
        line.split('=').next()?.trim().trim_matches('"').to_string()
    };
    if key.is_empty() {
        return (!table.is_empty()).then_some(table);
    }
    Some(if table.is_empty() {
        key
    } else {
        format!("{table}.{key}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn key_of(e: Error) -> String {
        match e {
            Error::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_use_memory_and_validate() {
        let c = Config::load_with(None, env(&[])).unwrap();
        assert_eq!(c.backend_urls(), BackendUrls::all("memory://"));
        assert!(c.is_memory());
        assert_eq!(c.connect_options(), ConnectOptions::default());
        assert_eq!(c.worker_config().concurrency, 8);
        assert_eq!(c.monitor_config().interval, Duration::from_secs(5));
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orchestra.toml");
        std::fs::write(
            &path,
            r#"
url = "redis://file-host:6379"
prefix = "from_file_"
[worker]
concurrency = 3
lease = "12s"
[monitor]
interval = "2s"
reannounce_pending_after = "never"
[monitor.retention]
max_age = "7d"
"#,
        )
        .unwrap();
        let c = Config::load_with(Some(&path), env(&[])).unwrap();
        assert_eq!(c.backend_urls(), BackendUrls::all("redis://file-host:6379"));
        assert_eq!(c.prefix, "from_file_");
        assert_eq!(c.worker.concurrency, 3);
        assert_eq!(c.worker_config().lease, Duration::from_secs(12));
        assert_eq!(c.monitor_config().reannounce_pending_after, None);
        assert_eq!(c.retention().max_age, Some(Duration::from_secs(7 * 86_400)));

        let c = Config::load_with(
            Some(&path),
            env(&[
                ("ORCHESTRA_PREFIX", "from_env_"),
                ("ORCHESTRA_CONCURRENCY", "5"),
                ("ORCHESTRA_BUS_URL", "nats://env-host:4222"),
            ]),
        )
        .unwrap();
        assert_eq!(c.prefix, "from_env_");
        assert_eq!(c.worker.concurrency, 5);
        assert_eq!(c.worker.lease, Duration::from_secs(12), "untouched by env");
        let urls = c.backend_urls();
        assert_eq!(urls.bus, "nats://env-host:4222");
        assert_eq!(urls.registry, "redis://file-host:6379");
    }

    #[test]
    fn config_file_can_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.toml");
        std::fs::write(&path, "prefix = \"via_env_file_\"\n").unwrap();
        let p = path.to_string_lossy().to_string();
        let c = Config::load_with(None, env(&[("ORCHESTRA_CONFIG", &p)])).unwrap();
        assert_eq!(c.prefix, "via_env_file_");
    }

    #[test]
    fn a_nats_url_with_several_seed_servers_is_a_url() {
        let c = Config::load_with(
            None,
            env(&[("ORCHESTRA_URL", "nats://a:4222,b:4222,c:4222?replicas=3")]),
        )
        .unwrap();
        assert_eq!(
            c.backend_urls().registry,
            "nats://a:4222,b:4222,c:4222?replicas=3"
        );
        let e = Config::load_with(None, env(&[("ORCHESTRA_URL", "redis://a:1,b:2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a URL"), "{e}");
    }

    #[test]
    fn a_later_shared_url_replaces_earlier_role_urls() {
        let mut c = Config::from_toml_str(
            "bus_url = \"nats://a:4222\"\nregistry_url = \"redis://b:6379\"\n",
        )
        .unwrap();
        c.apply_env_with(env(&[("ORCHESTRA_URL", "amqp://c:5672")]))
            .unwrap();
        assert_eq!(c.backend_urls(), BackendUrls::all("amqp://c:5672"));
        // Flags are one more layer.
        c.set_urls(None, None, Some("redis://flag:6379".into()), None);
        assert_eq!(c.backend_urls().registry, "redis://flag:6379");
        assert_eq!(c.backend_urls().bus, "amqp://c:5672");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = Config::from_toml_str("[worker]\nconcurency = 3\n").unwrap_err();
        let msg = e.to_string();
        assert_eq!(key_of(e), "worker.concurency");
        assert!(msg.contains("unknown field"), "{msg}");
        let e = Config::from_toml_str("urll = \"memory://\"\n").unwrap_err();
        assert_eq!(key_of(e), "urll");
        let e = Config::from_toml_str("[wokrer]\nconcurrency = 3\n").unwrap_err();
        assert_eq!(key_of(e), "wokrer");
    }

    #[test]
    fn a_redis_cluster_url_with_its_seed_list_is_accepted_from_file_and_env() {
        let url = "redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001";
        let c = Config::from_toml_str(&format!("url = \"{url}\"\n")).unwrap();
        assert_eq!(c.backend_urls(), BackendUrls::all(url));
        let c = Config::load_with(None, env(&[("ORCHESTRA_URL", url)])).unwrap();
        assert_eq!(c.backend_urls(), BackendUrls::all(url));
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw@"), "{shown}");
        let e = Config::load_with(None, env(&[("ORCHESTRA_URL", "redis+cluster://h:x,h2:1")]))
            .unwrap_err();
        assert_eq!(key_of(e), "url");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::from_toml_str("[worker]\nlease = \"soon\"\n").unwrap_err();
        assert_eq!(key_of(e), "worker.lease");
        let e = Config::from_toml_str("[monitor.retention]\nmax_count = -1\n").unwrap_err();
        assert_eq!(key_of(e), "monitor.retention.max_count");
        let e = Config::load_with(None, env(&[("ORCHESTRA_LEASE", "ten seconds")])).unwrap_err();
        assert_eq!(key_of(e), "ORCHESTRA_LEASE");
        let e = Config::load_with(None, env(&[("ORCHESTRA_CONCURRENCY", "many")])).unwrap_err();
        assert_eq!(key_of(e), "ORCHESTRA_CONCURRENCY");
        let e = Config::load_with(None, env(&[("ORCHESTRA_CONCURRENCY", "0")])).unwrap_err();
        assert_eq!(key_of(e), "worker.concurrency");
        let e = Config::load_with(None, env(&[("ORCHESTRA_URL", "kafka://x")])).unwrap_err();
        assert_eq!(key_of(e), "url");
        let e = Config::load_with(None, env(&[("ORCHESTRA_PREFIX", "a b")])).unwrap_err();
        assert_eq!(key_of(e), "prefix");
        let e = Config::from_toml_str("[worker]\nlease = \"1s\"\nheartbeat = \"2s\"\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(key_of(e), "worker.heartbeat");
        let e = Config::from_toml_str("max_deliveries = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(key_of(e), "max_deliveries");
        let e = Config::from_toml_str("[worker.retry]\nfactor = 0.5\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(key_of(e), "worker.retry.factor");
    }

    #[test]
    fn secrets_never_show_in_debug_display_or_errors() {
        let mut c = Config::default();
        c.set_urls(
            Some("redis://user:hunter2@host:6379".into()),
            Some("nats://host:4222?token=s3cret".into()),
            None,
            None,
        );
        for text in [format!("{c:?}"), c.to_string(), c.to_toml_redacted()] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains("***"), "{text}");
        }
        let e =
            Config::load_with(None, env(&[("ORCHESTRA_URL", "kafka://u:hunter2@x")])).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn durations_combine_units_in_files_and_variables() {
        let c = Config::from_toml_str(
            "connect_timeout = 7\n[worker]\nlease = \"1m30s\"\nshutdown_timeout = \"1h 2m\"\n[worker.retry]\nbase = 0.5\n",
        )
        .unwrap();
        assert_eq!(
            c.connect_timeout,
            Duration::from_secs(7),
            "a number is seconds"
        );
        assert_eq!(c.worker.lease, Duration::from_secs(90));
        assert_eq!(c.worker.shutdown_timeout, Duration::from_secs(3720));
        assert_eq!(c.worker.retry.base, Duration::from_millis(500));
        let c = Config::load_with(
            None,
            env(&[
                ("ORCHESTRA_LEASE", "1m30s"),
                ("ORCHESTRA_HANDLER_TIMEOUT", "2m 5s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.worker.lease, Duration::from_secs(90));
        assert_eq!(c.worker.handler_timeout, Some(Duration::from_secs(125)));
        let e = Config::from_toml_str("[worker]\nlease = \"1m30x\"\n").unwrap_err();
        let msg = e.to_string();
        assert_eq!(key_of(e), "worker.lease");
        assert!(msg.contains("1m30x"), "{msg}");
        let e = Config::from_toml_str("[monitor.retention]\nmax_age = \"36501d\"\n").unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }

    #[test]
    fn a_config_file_past_the_size_cap_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let mut text = String::from("prefix = \"p_\"\n");
        while (text.len() as u64) <= MAX_CONFIG_BYTES {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let e = Config::load_with(Some(&path), env(&[])).unwrap_err();
        assert!(e.to_string().contains("larger than 1024 KiB"), "{e}");
        assert_eq!(key_of(e), "--config");
        // Just under the cap is read.
        text.truncate(MAX_CONFIG_BYTES as usize - 1);
        let end = text.rfind('\n').unwrap() + 1;
        text.truncate(end);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            Config::load_with(Some(&path), env(&[])).unwrap().prefix,
            "p_"
        );
        #[cfg(unix)]
        {
            // A device that never ends: refused after the cap, not read until memory runs out.
            let e = Config::load_with(Some(Path::new("/dev/zero")), env(&[])).unwrap_err();
            assert!(e.to_string().contains("larger than"), "{e}");
            let e = Config::load_with(None, env(&[(ENV_CONFIG, "/dev/zero")])).unwrap_err();
            assert_eq!(key_of(e), ENV_CONFIG);
        }
    }

    #[test]
    fn redacted_toml_round_trips() {
        let c =
            Config::from_toml_str("prefix = \"p_\"\n[worker]\nhandler_timeout = \"5m\"\n").unwrap();
        let again = Config::from_toml_str(&c.to_toml_redacted()).unwrap();
        assert_eq!(again, c);
    }

    #[tokio::test]
    async fn connect_reports_a_disabled_feature_or_opens_memory() {
        let c = Config::default().or_url(DEFAULT_URL);
        assert_eq!(c.connect().await.unwrap().registry.backend(), "memory");
        #[cfg(not(feature = "redis"))]
        {
            let mut c = Config::default();
            c.set_urls(Some("redis://127.0.0.1:1".into()), None, None, None);
            assert!(matches!(
                c.connect().await,
                Err(Error::FeatureDisabled { .. })
            ));
        }
    }

    #[tokio::test]
    async fn connect_refuses_to_guess_a_missing_url() {
        let err = Config::default().connect().await.unwrap_err();
        assert!(
            matches!(&err, Error::Config { key, .. } if key == "url"),
            "{err}"
        );
        assert!(
            err.to_string().contains("bus and registry and locks"),
            "{err}"
        );
        let partial = Config {
            bus_url: Some("memory://".into()),
            ..Config::default()
        };
        let err = partial.connect().await.unwrap_err();
        assert!(err.to_string().contains("registry and locks"), "{err}");
        let b = Config::default()
            .or_url("memory://")
            .connect()
            .await
            .unwrap();
        assert_eq!(b.bus.backend(), "memory");
    }

    #[test]
    fn queue_limits_come_from_queues_tables_and_bad_ones_name_the_key() {
        let c = Config::from_toml_str(
            "[queues.research_tasks]\nrate = \"60/min\"\nconcurrency = 4\n[queues.writing]\nconcurrency = 1\n",
        )
        .unwrap();
        c.validate().unwrap();
        let w = c.worker_config();
        let q = QueueName::parse("research_tasks").unwrap();
        assert_eq!(w.queue_limits[&q].to_string(), "rate 60/min, concurrency 4");
        assert_eq!(w.queue_limits.len(), 2);
        let e = Config::from_toml_str("[queues.q]\nrate = \"0/s\"\n").unwrap_err();
        assert!(e.to_string().contains("queues"), "{e}");
        let e = Config::from_toml_str("[queues.q]\nrat = \"1/s\"\n").unwrap_err();
        assert!(e.to_string().contains("rat"), "{e}");
        let c = Config::from_toml_str("[queues.q]\nconcurrency = 0\n").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("queues.q"), "{e}");
        let c = Config::from_toml_str("[queues.\"bad queue\"]\nconcurrency = 1\n").unwrap();
        assert!(c.validate().is_err());
    }
}
