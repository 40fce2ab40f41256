//! The NATS JetStream backend (cargo feature `nats`): [`NatsBus`], [`NatsRegistry`] and
//! [`NatsLockManager`] over one connection.
//!
//! * Work queues are JetStream streams with work-queue retention and file storage, one stream per
//!   queue with one subject and one durable pull consumer per priority level (plus a `delayed`
//!   subject for messages enqueued with a delay). Fetches take from level 1 first. Enqueuers
//!   send a core-NATS wake-up per batch and level, so an idle fetch reacts within a
//!   millisecond without polling.
//! * Events are plain core-NATS subjects `{prefix}events.<topic>`.
//! * Tasks live in a JetStream key-value bucket (compare-and-set on the revision); counts, the
//!   stale-RUNNING query, lists and dependents come from an in-process index that follows the
//!   bucket's stream (headers only), never from reading every task.
//! * Locks live in a second key-value bucket; the revision of the acquiring write is the
//!   fencing token.
//!
//! URLs: `nats://[user:password@]host[:port]`, `nats://TOKEN@host`, `tls://host` (or
//! `?tls=true`), with optional query parameters `token=`, `creds=/path/to/user.creds`,
//! `nkey=SEED`, `tls_ca=/path/ca.pem`, `tls_cert=/path/cert.pem&tls_key=/path/key.pem`. See
//! `docs/backends/nats.md` for the design, the costs and the guarantees.

mod blob;
mod bus;
mod control;
mod errors;
mod kv;
mod leases;
mod listeners;
mod lock;
mod names;
mod queue;
mod registry;
mod retry;
mod schedules;
mod streams;
mod tasks;
mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use url::Url;

use crate::bundle::{ConnectOptions, Parts, Roles};
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::redact::redact_url;

pub use bus::NatsBus;
pub use lock::NatsLockManager;
pub use registry::NatsRegistry;
pub use tasks::NatsTaskQueue;

use names::Names;

const BACKEND: &str = "nats";
const DEFAULT_PORT: u16 = 4222;

/// What every role shares: one connection, one JetStream context, the naming scheme.
#[derive(Clone)]
pub(crate) struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Arc<Names>,
    /// The largest message the server accepts (payload plus headers).
    max_payload: usize,
    /// Starts the id of every message this connection enqueues.
    origin: Arc<str>,
    /// The replica count of every stream and bucket this backend creates (`replicas=` in the
    /// URL, default 1).
    replicas: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("names", &self.names)
            .field("max_payload", &self.max_payload)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

/// Opens the requested roles from one `nats://` or `tls://` URL, over one shared connection.
pub async fn open(url: &Url, roles: &Roles, opts: &ConnectOptions) -> Result<Parts> {
    let shared = connect(url, opts).await?;
    let mut parts = Parts::default();
    let bus = roles
        .bus
        .then(|| Arc::new(NatsBus::new(shared.clone(), opts.max_deliveries)));
    let registry = match roles.registry {
        true => Some(Arc::new(NatsRegistry::open(shared.clone()).await?)),
        false => None,
    };
    if let (Some(b), Some(r)) = (&bus, &registry) {
        parts.tasks = Some(Arc::new(NatsTaskQueue::new(shared.clone(), b.clone(), r.clone())) as _);
    }
    parts.bus = bus.map(|b| b as _);
    parts.registry = registry.map(|r| r as _);
    if roles.locks {
        parts.locks = Some(Arc::new(NatsLockManager::open(shared.clone()).await?) as _);
    }
    Ok(parts)
}

/// [`crate::connect::drop_namespace`] on NATS: the streams this prefix's backend makes (each
/// queue's work and dead-letter streams, the blob stream) and its three buckets (tasks,
/// dependents, locks), matched by their exact names (`Names::owns_stream`).
pub async fn drop_namespace(url: &Url, opts: &ConnectOptions) -> Result<()> {
    use async_nats::jetstream::context::DeleteStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    use futures::TryStreamExt;
    let shared = connect(url, opts).await?;
    let names: Vec<String> = shared
        .js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| errors::nats_err("list the streams", e))?;
    for name in names {
        if !shared.names.owns_stream(&name) {
            continue;
        }
        match shared.js.delete_stream(&name).await {
            Ok(_) => {}
            // Deleted meanwhile (by another drop, or an operator).
            Err(e)
                if matches!(e.kind(), DeleteStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(errors::nats_err("delete a stream of the prefix", e)),
        }
    }
    Ok(())
}

/// [`crate::connect::footprint`] on NATS: whether the task bucket's stream exists (when
/// `registry` asks), and for each queue whether its work or dead-letter stream does. Asked
/// with `STREAM.INFO`, which creates nothing.
pub async fn footprint(
    url: &Url,
    opts: &ConnectOptions,
    registry: bool,
    queues: &[QueueName],
) -> Result<(bool, Vec<bool>)> {
    let shared = connect(url, opts).await?;
    let names = &shared.names;
    let has = |name: String| {
        let js = shared.js.clone();
        async move {
            match js.get_stream(&name).await {
                Ok(_) => Ok(true),
                Err(e) if bus::js_not_found(&e.kind()) => Ok(false),
                Err(e) => Err(errors::nats_err("look for a stream of the prefix", e)),
            }
        }
    };
    let tasks = match registry {
        true => has(format!("KV_{}", names.task_bucket())).await?,
        false => true,
    };
    let mut found = Vec::with_capacity(queues.len());
    for q in queues {
        found.push(has(names.work_stream(q)).await? || has(names.dead_stream(q)).await?);
    }
    Ok((tasks, found))
}

/// The most replicas a JetStream stream may have.
const MAX_REPLICAS: usize = 5;

/// The first nats-server release whose replicated streams check an expected last sequence
/// against the writes still being proposed (nats-server issue #4320, fixed in 2.9.21).
const SAFE_REPLICATED_CAS: [u64; 3] = [2, 9, 21];

/// `replicas` above 1 on a server older than [`SAFE_REPLICATED_CAS`] is refused: there,
/// concurrent compare-and-set writes to one key of a replicated stream can all be accepted
/// (measured on 2.9.10 with three replicas: 15 of 50 concurrent claims of one task won), so
/// neither a task's claim nor a lock would be exclusive. A version that does not parse is let
/// through (a development build names itself otherwise).
fn check_replicas_are_safe(version: &str, replicas: usize) -> Result<()> {
    if replicas <= 1 {
        return Ok(());
    }
    let parts: Vec<u64> = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .take(3)
        .map_while(|p| p.parse().ok())
        .collect();
    if parts.len() == 3 && parts.as_slice() < SAFE_REPLICATED_CAS.as_slice() {
        return Err(Error::config(
            "replicas",
            format!(
                "replicas={replicas} needs nats-server 2.9.21 or later, and this server is {version}: \
                 on older servers concurrent compare-and-set writes to a replicated stream can all \
                 succeed (nats-server issue #4320), so claims and locks would not be exclusive; \
                 upgrade the servers, or use replicas=1"
            ),
        ));
    }
    Ok(())
}

/// `nats://[userinfo@]h1:p1,h2:p2/rest?q` as `nats://[userinfo@]h1:p1/rest?q&servers=h2:p2`
/// (also for `tls://`), which [`Url`] can parse; any other URL unchanged. The comma list is the
/// form NATS tools take for several seed servers.
pub fn fold_seed_hosts(url: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let Some(s) = url.find("://") else {
        return Cow::Borrowed(url);
    };
    let scheme = &url[..s];
    if !scheme.eq_ignore_ascii_case("nats") && !scheme.eq_ignore_ascii_case("tls") {
        return Cow::Borrowed(url);
    }
    let rest = &url[s + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let Some((first, others)) = hosts.split_once(',') else {
        return Cow::Borrowed(url);
    };
    let tail = &rest[end..];
    let (before_fragment, fragment) = match tail.find('#') {
        Some(h) => (&tail[..h], &tail[h..]),
        None => (tail, ""),
    };
    let (path, query) = match before_fragment.find('?') {
        Some(q) => (&before_fragment[..q], &before_fragment[q + 1..]),
        None => (before_fragment, ""),
    };
    let query = match query {
        "" => format!("servers={others}"),
        q => format!("{q}&servers={others}"),
    };
    Cow::Owned(format!(
        "{scheme}://{userinfo}{first}{path}?{query}{fragment}"
    ))
}

/// Connection settings read from a URL.
#[derive(Debug, Default, PartialEq, Eq)]
struct UrlSettings {
    /// The seed servers: the URL's host first, then those of `servers=`.
    servers: Vec<String>,
    /// The replica count of the streams and buckets this backend creates.
    replicas: usize,
    tls: bool,
    user: Option<(String, String)>,
    token: Option<String>,
    creds: Option<PathBuf>,
    nkey: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_client: Option<(PathBuf, PathBuf)>,
}

fn parse_url(url: &Url) -> Result<UrlSettings> {
    let bad = |reason: String| Error::UnsupportedUrl {
        url: redact_url(url.as_str()),
        reason,
    };
    let mut s = UrlSettings {
        tls: url.scheme() == "tls",
        replicas: 1,
        ..Default::default()
    };
    let mut more_hosts: Vec<(String, u16)> = Vec::new();
    match url.scheme() {
        "nats" | "tls" => {}
        other => {
            return Err(bad(format!(
                "the nats backend cannot open `{other}://` URLs"
            )))
        }
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("missing host".into()))?;
    let port = url.port().unwrap_or(DEFAULT_PORT);
    let decode = |v: &str| {
        percent_decode(v).map_err(|_| bad("user or password is not valid percent-encoding".into()))
    };
    if !url.username().is_empty() {
        let user = decode(url.username())?;
        match url.password() {
            Some(p) => s.user = Some((user, decode(p)?)),
            None => s.token = Some(user),
        }
    }
    let mut tls_cert = None;
    let mut tls_key = None;
    for (k, v) in url.query_pairs() {
        let v = v.into_owned();
        match k.as_ref() {
            "tls" => {
                s.tls = match v.as_str() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => s.tls,
                    _ => return Err(bad(format!("tls must be true or false, got {v:?}"))),
                }
            }
            "token" => s.token = Some(v),
            "creds" => s.creds = Some(PathBuf::from(v)),
            "nkey" => s.nkey = Some(v),
            "tls_ca" => {
                s.tls = true;
                s.tls_ca = Some(PathBuf::from(v));
            }
            "tls_cert" => tls_cert = Some(PathBuf::from(v)),
            "tls_key" => tls_key = Some(PathBuf::from(v)),
            "replicas" => {
                s.replicas = match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_REPLICAS).contains(&n) => n,
                    _ => {
                        return Err(bad(format!(
                            "replicas must be a whole number from 1 to {MAX_REPLICAS}, got {v:?}"
                        )))
                    }
                }
            }
            "servers" => {
                for one in v.split(',') {
                    more_hosts.push(seed_host(one).ok_or_else(|| {
                        bad(format!(
                            "servers must be a comma-separated list of host[:port], got {v:?}"
                        ))
                    })?);
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}` (known: tls, token, creds, nkey, tls_ca, tls_cert, tls_key, replicas, servers)"
                )))
            }
        }
    }
    match (tls_cert, tls_key) {
        (Some(c), Some(k)) => {
            s.tls = true;
            s.tls_client = Some((c, k));
        }
        (None, None) => {}
        _ => return Err(bad("tls_cert and tls_key go together".into())),
    }
    let scheme = if s.tls { "tls" } else { "nats" };
    let address = |host: &str, port: u16| {
        if host.contains(':') && !host.starts_with('[') {
            format!("{scheme}://[{host}]:{port}")
        } else {
            format!("{scheme}://{host}:{port}")
        }
    };
    s.servers.push(address(host, port));
    for (h, p) in more_hosts {
        s.servers.push(address(&h, p));
    }
    Ok(s)
}

/// One `host[:port]` of a seed list (the port 4222 when left out), `None` if it is not one.
fn seed_host(text: &str) -> Option<(String, u16)> {
    if text.is_empty() || text.contains(['/', '?', '#', '@']) {
        return None;
    }
    let url = Url::parse(&format!("nats://{text}")).ok()?;
    let host = url.host_str().filter(|h| !h.is_empty())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), url.port().unwrap_or(DEFAULT_PORT)))
}

fn percent_decode(v: &str) -> std::result::Result<String, ()> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// The files the URL names (CA, client certificate and key) must be readable files: a missing
/// one is a configuration error (exit 2 in the CLI), where async-nats, which reads them while
/// connecting, would report a failure to connect.
fn check_tls_files(s: &UrlSettings) -> Result<()> {
    let named = s.tls_ca.iter().map(|p| ("tls_ca", p)).chain(
        s.tls_client
            .iter()
            .flat_map(|(c, k)| [("tls_cert", c), ("tls_key", k)]),
    );
    for (key, path) in named {
        let readable = std::fs::metadata(path).and_then(|m| {
            if m.is_file() {
                std::fs::File::open(path).map(drop)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        });
        if let Err(e) = readable {
            return Err(Error::config(
                key,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    Ok(())
}

async fn connect(url: &Url, opts: &ConnectOptions) -> Result<Shared> {
    let settings = parse_url(url)?;
    check_tls_files(&settings)?;
    let replicas = settings.replicas;
    let shown = redact_url(url.as_str());
    let mut options = async_nats::ConnectOptions::new()
        .name("agent-orchestra")
        .connection_timeout(opts.connect_timeout)
        .max_reconnects(None::<usize>)
        .reconnect_delay_callback(|attempt| {
            // Quick first retries (a broker restart takes a second or two), capped at 2 s.
            Duration::from_millis((50u64 << attempt.min(5)).min(2_000))
        })
        .event_callback({
            let shown = shown.clone();
            move |event| {
                let shown = shown.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(url = %shown, "nats connected")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(url = %shown, "nats disconnected; reconnecting")
                        }
                        other => tracing::debug!(url = %shown, event = %other, "nats event"),
                    }
                }
            }
        });
    if settings.tls {
        options = options.require_tls(true);
    }
    if let Some(ca) = settings.tls_ca {
        options = options.add_root_certificates(ca);
    }
    if let Some((cert, key)) = settings.tls_client {
        options = options.add_client_certificate(cert, key);
    }
    if let Some((user, password)) = settings.user {
        options = options.user_and_password(user, password);
    }
    if let Some(token) = settings.token {
        options = options.token(token);
    }
    if let Some(seed) = settings.nkey {
        options = options.nkey(seed);
    }
    if let Some(path) = settings.creds {
        options = options.credentials_file(&path).await.map_err(|e| {
            Error::config(
                "creds",
                format!("cannot read NATS credentials file {}: {e}", path.display()),
            )
        })?;
    }
    let client = tokio::time::timeout(
        opts.connect_timeout + Duration::from_secs(1),
        options.connect(settings.servers.as_slice()),
    )
    .await
    .map_err(|_| Error::temporary(BACKEND, format!("timed out connecting to {shown}"), None))?
    .map_err(|e| {
        let text = e.to_string();
        // Another server's greeting (an SSH banner, HTTP, Redis) reaches the client's parser,
        // whose error quotes the foreign line with its line break: say what it means instead.
        let foreign = matches!(e.kind(), async_nats::ConnectErrorKind::ServerParse)
            || text.contains("invalid server operation");
        let temporary = !foreign
            && !matches!(
                e.kind(),
                async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Tls
            );
        let message = if foreign {
            format!("cannot connect to {shown}: the server's reply is not the NATS protocol (is this the port of a NATS server?)")
        } else {
            format!("cannot connect to {shown}: {}", text.replace(['\r', '\n'], " "))
        };
        if temporary {
            Error::temporary(BACKEND, message, Some(Box::new(e) as _))
        } else {
            Error::permanent(BACKEND, message, Some(Box::new(e) as _))
        }
    })?;
    check_replicas_are_safe(&client.server_info().version, replicas)?;
    let max_payload = client.server_info().max_payload.max(64 * 1024);
    let js = jetstream::new(client.clone());
    Ok(Shared {
        client,
        js,
        names: Arc::new(Names::new(&opts.prefix)),
        max_payload,
        origin: Arc::from(&uuid::Uuid::new_v4().simple().to_string()[..16]),
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<UrlSettings> {
        parse_url(&Url::parse(s).unwrap())
    }

    #[test]
    fn url_carries_user_password_token_and_tls() {
        let s = parse("nats://alice:s%40cret@localhost:4333").unwrap();
        assert_eq!(s.servers, ["nats://localhost:4333"]);
        assert_eq!(s.replicas, 1);
        assert_eq!(s.user, Some(("alice".into(), "s@cret".into())));
        let s = parse("nats://T0KEN@localhost").unwrap();
        assert_eq!(s.token.as_deref(), Some("T0KEN"));
        assert_eq!(s.servers, ["nats://localhost:4222"]);
        let s = parse("tls://h:1").unwrap();
        assert!(s.tls);
        assert_eq!(s.servers, ["tls://h:1"]);
        let s = parse("nats://h?tls=true&creds=/tmp/x.creds").unwrap();
        assert!(s.tls);
        assert_eq!(s.creds, Some(PathBuf::from("/tmp/x.creds")));
    }

    #[test]
    fn replicas_above_one_need_a_server_without_the_cas_race() {
        for (version, replicas, ok) in [
            ("2.9.10", 1, true),
            ("2.9.10", 3, false),
            ("v2.9.20", 2, false),
            ("2.9.21", 3, true),
            ("2.10.26", 3, true),
            ("2.11.0-beta.1", 3, true),
            ("2.8.4", 3, false),
            ("nightly", 3, true),
        ] {
            let got = check_replicas_are_safe(version, replicas);
            assert_eq!(got.is_ok(), ok, "{version} replicas={replicas}: {got:?}");
            if let Err(e) = got {
                let text = e.to_string();
                assert!(text.contains("2.9.21") && text.contains(version), "{text}");
            }
        }
    }

    #[test]
    fn url_carries_replicas_and_several_seed_servers() {
        let folded = fold_seed_hosts("nats://u:p@a:4001,b:4002,[::1]/x?replicas=3#f");
        assert_eq!(
            folded,
            "nats://u:p@a:4001/x?replicas=3&servers=b:4002,[::1]#f"
        );
        let s = parse(&folded).unwrap();
        assert_eq!(
            s.servers,
            ["nats://a:4001", "nats://b:4002", "nats://[::1]:4222"]
        );
        assert_eq!(s.replicas, 3);
        assert_eq!(fold_seed_hosts("nats://a,b"), "nats://a?servers=b");
        assert_eq!(
            fold_seed_hosts("tls://a:1,b:2?tls_ca=/c"),
            "tls://a:1?tls_ca=/c&servers=b:2"
        );
        assert_eq!(fold_seed_hosts("nats://a:1"), "nats://a:1");
        assert_eq!(fold_seed_hosts("redis://a,b"), "redis://a,b");
        let s = parse("tls://a?servers=b:9").unwrap();
        assert_eq!(s.servers, ["tls://a:4222", "tls://b:9"]);
        for bad in [
            "nats://h?replicas=0",
            "nats://h?replicas=6",
            "nats://h?replicas=three",
            "nats://h?servers=",
            "nats://h?servers=a,,b",
            "nats://h?servers=x:notaport",
        ] {
            match parse(bad) {
                Err(Error::UnsupportedUrl { reason, .. }) => {
                    assert!(
                        reason.contains("replicas") || reason.contains("servers"),
                        "{bad}: {reason}"
                    )
                }
                other => panic!("{bad}: expected an URL error, got {other:?}"),
            }
        }
    }

    #[test]
    fn url_errors_are_redacted_and_explain() {
        let e = parse("nats://h?token=abc&bogus=1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(!e.contains("abc"), "{e}");
        let e = parse("nats://h?tls_cert=/a").unwrap_err().to_string();
        assert!(e.contains("tls_key"), "{e}");
    }

    #[test]
    fn unreadable_tls_files_are_configuration_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let ok = parse(&format!("nats://h?tls_ca={}", ca.display())).unwrap();
        check_tls_files(&ok).unwrap();
        for (url, key) in [
            ("nats://h?tls_ca=/nonexistent/ca.pem".to_string(), "tls_ca"),
            (
                format!("nats://h?tls_ca={}", dir.path().display()),
                "tls_ca",
            ),
            (
                format!(
                    "nats://h?tls_cert={}&tls_key=/nonexistent/k.pem",
                    ca.display()
                ),
                "tls_key",
            ),
        ] {
            match check_tls_files(&parse(&url).unwrap()) {
                Err(Error::Config { key: k, reason }) => {
                    assert_eq!(k, key, "{url}: {reason}");
                    assert!(reason.contains("cannot read"), "{reason}");
                }
                other => panic!("{url}: expected a configuration error, got {other:?}"),
            }
        }
    }
}
