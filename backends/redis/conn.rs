//! Connecting to Redis: the URL (TLS, AUTH, ACL user, database, or the seed nodes of a Redis
//! Cluster), the shared command connection ([`Link`]: one node or a cluster behind one type),
//! scripts, and the mapping of redis errors to [`crate::Error`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, Pipeline, ProtocolVersion, RedisError, RedisFuture, Script,
    ScriptInvocation, ServerError, ServerErrorKind, Value,
};
use url::Url;

use super::keys::{self, Layout, QueueKeys};
use crate::error::{Error, Result};
use crate::model::QueueName;
use crate::{bundle::ConnectOptions, redact::redact_url};

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "redis";

/// How long one command (or script) may take before the call fails with a temporary error.
/// Generous: the longest script (a fetch or enqueue batch) takes a few milliseconds.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Query parameters this backend understands (everything else is rejected, to catch typos).
const QUERY_KEYS: [&str; 6] = [
    "protocol",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "seeds",
    "wait_replicas",
];

/// How long a dispatch waits for the replicas `wait_replicas` asks for.
const WAIT_REPLICAS_TIMEOUT_MS: u64 = 2_000;

/// Where the pub/sub connection's push messages go.
pub(crate) type PushHandler =
    Box<dyn Fn(redis::PushInfo) -> std::result::Result<(), std::convert::Infallible> + Send + Sync>;

/// TLS material named by the URL's query (`rediss://` only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// PEM file of the certificate authorities to trust instead of the system's.
    pub ca: Option<PathBuf>,
    /// PEM file of the client certificate (mutual TLS), with `key`.
    pub cert: Option<PathBuf>,
    /// PEM file of the client key (mutual TLS), with `cert`.
    pub key: Option<PathBuf>,
}

/// A parsed `redis://` / `rediss://` URL, or a `redis+cluster://` / `rediss+cluster://` one.
#[derive(Clone)]
pub(crate) struct Target {
    /// What redis-rs needs to connect (host, port, TLS, db, user, password, protocol); for a
    /// cluster, the first seed node.
    pub info: ConnectionInfo,
    /// For a cluster (`redis+cluster://`): every seed node, `info` first. Empty otherwise.
    pub seeds: Vec<ConnectionInfo>,
    /// Whether the scheme is `rediss` or `rediss+cluster`.
    pub tls: bool,
    /// TLS files from the query.
    pub tls_files: TlsFiles,
    /// `wait_replicas=N`: a dispatch returns only once N replicas have its write (`WAIT`).
    pub wait_replicas: Option<u32>,
    /// The URL with its password replaced by `***`, for messages.
    pub redacted: String,
    /// The password, to scrub it from any message that might echo it.
    secret: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.redacted)
            .field("tls_files", &self.tls_files)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Parses and checks a Redis URL: `redis[s]://[user][:password]@host[:port][/db]` with the
    /// optional query parameters `protocol`, `tls_ca_file`, `tls_cert_file`, `tls_key_file`;
    /// or `redis[s]+cluster://[user][:password]@host:port` with the other seed nodes in the
    /// query parameter `seeds=host:port,host:port` (what `connect` makes of the written form
    /// `redis+cluster://host:port,host:port`).
    pub fn parse(url: &Url) -> Result<Target> {
        let redacted = redact_url(url.as_str());
        let bad = |reason: String| Error::UnsupportedUrl {
            url: redacted.clone(),
            reason,
        };
        let (tls, cluster) = match url.scheme() {
            "redis" => (false, false),
            "rediss" => (true, false),
            "redis+cluster" => (false, true),
            "rediss+cluster" => (true, true),
            other => {
                return Err(bad(format!(
                    "scheme `{other}` is not redis://, rediss://, redis+cluster:// or \
                     rediss+cluster://"
                )))
            }
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host".into()));
        }
        if url.fragment().is_some() {
            return Err(bad(
                "URL fragments (such as #insecure) are not supported; to trust a self-signed \
                 server certificate, name its CA with ?tls_ca_file=/path/ca.pem"
                    .into(),
            ));
        }
        let db = url.path().trim_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(bad(format!(
                "the path must be a database number (like /0), got /{db}"
            )));
        }
        if cluster && !db.is_empty() && db != "0" {
            return Err(bad(format!(
                "a Redis Cluster has only database 0, got /{db}"
            )));
        }
        let mut tls_files = TlsFiles::default();
        let mut kept: Vec<(String, String)> = Vec::new();
        let mut more_seeds: Vec<(String, u16)> = Vec::new();
        let mut wait_replicas = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "wait_replicas" => {
                    wait_replicas = Some(v.parse::<u32>().map_err(|_| {
                        bad(format!(
                            "wait_replicas must be a number of replicas, got {v:?}"
                        ))
                    })?)
                    .filter(|n| *n > 0);
                }
                "seeds" if cluster => {
                    for seed in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        more_seeds.push(parse_seed(seed).map_err(&bad)?);
                    }
                }
                "tls_ca_file" => tls_files.ca = Some(PathBuf::from(v.as_ref())),
                "tls_cert_file" => tls_files.cert = Some(PathBuf::from(v.as_ref())),
                "tls_key_file" => tls_files.key = Some(PathBuf::from(v.as_ref())),
                "protocol" => kept.push((k.into_owned(), v.into_owned())),
                other => {
                    return Err(bad(format!(
                        "unknown query parameter `{other}`; known: {}",
                        QUERY_KEYS.join(", ")
                    )))
                }
            }
        }
        if !tls && tls_files != TlsFiles::default() {
            return Err(bad(
                "tls_ca_file / tls_cert_file / tls_key_file need the rediss:// scheme".into(),
            ));
        }
        if tls_files.cert.is_some() != tls_files.key.is_some() {
            return Err(bad(
                "tls_cert_file and tls_key_file go together (mutual TLS)".into(),
            ));
        }
        let mut clean = url.clone();
        if kept.is_empty() {
            clean.set_query(None);
        } else {
            clean.query_pairs_mut().clear().extend_pairs(kept);
        }
        if cluster {
            // redis-rs reads each node as a redis:// (rediss://) URL.
            clean
                .set_scheme(if tls { "rediss" } else { "redis" })
                .map_err(|()| bad("cannot rewrite the scheme".into()))?;
            clean.set_path("");
        }
        let to_info = |u: Url| {
            u.into_connection_info()
                .map_err(|e| bad(scrub(&e.to_string(), url.password())))
        };
        let info = to_info(clean.clone())?;
        let mut seeds = Vec::new();
        if cluster {
            seeds.push(info.clone());
            for (host, port) in more_seeds {
                let mut node = clean.clone();
                let bracketed = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                node.set_host(Some(&bracketed))
                    .map_err(|e| bad(format!("seed {host}:{port}: {e}")))?;
                node.set_port(Some(port))
                    .map_err(|()| bad(format!("seed {host}:{port}: bad port")))?;
                seeds.push(to_info(node)?);
            }
        }
        let secret = info
            .redis_settings()
            .password()
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        Ok(Target {
            info,
            seeds,
            tls,
            tls_files,
            wait_replicas,
            redacted,
            secret,
        })
    }

    /// A redis-rs client for this target, speaking RESP3 when `resp3` (needed for pub/sub push
    /// messages on a connection manager).
    pub fn client(&self, resp3: bool) -> Result<Client> {
        let mut info = self.info.clone();
        if resp3 {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        let built = match self.certificates()? {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        };
        built.map_err(|e| Error::UnsupportedUrl {
            url: self.redacted.clone(),
            reason: self.scrub(&e.to_string()),
        })
    }

    /// The TLS material named by the URL's query, read from disk (`None` when there is none:
    /// the system's roots are trusted).
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if !(self.tls && (self.tls_files.ca.is_some() || self.tls_files.cert.is_some())) {
            return Ok(None);
        }
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                Error::config(
                    "redis URL",
                    format!("cannot read TLS file {}: {e}", p.display()),
                )
            })
        };
        let root_cert = self.tls_files.ca.as_ref().map(read).transpose()?;
        let client_tls = match (&self.tls_files.cert, &self.tls_files.key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            _ => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// Whether this target is a Redis Cluster (`redis+cluster://`).
    pub fn is_cluster(&self) -> bool {
        !self.seeds.is_empty()
    }

    /// A redis-rs cluster client over the seed nodes (RESP3 with `push` set: pub/sub push
    /// messages of every node go there).
    pub fn cluster_client(
        &self,
        connect_timeout: Duration,
        push: Option<PushHandler>,
    ) -> Result<ClusterClient> {
        let mut b = ClusterClientBuilder::new(self.seeds.clone())
            .connection_timeout(connect_timeout)
            .response_timeout(RESPONSE_TIMEOUT)
            .max_retry_wait(2_000);
        if let Some(certs) = self.certificates()? {
            b = b.certs(certs);
        }
        if let Some(push) = push {
            b = b.use_protocol(ProtocolVersion::RESP3).push_sender(push);
        }
        b.build().map_err(|e| Error::UnsupportedUrl {
            url: self.redacted.clone(),
            reason: self.scrub(&e.to_string()),
        })
    }

    /// `text` with the password, if any, replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, self.secret.as_deref())
    }

    /// Converts a redis error into a [`crate::Error`]: connection trouble, timeouts, a server
    /// loading its data set, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY (a failover) and BUSY
    /// (a long script) are temporary; everything else is permanent. The password never appears.
    pub fn error(&self, what: &str, e: RedisError) -> Error {
        let temporary = is_temporary(&e);
        // The redis crate's own text for these is a multi-line parser dump, or a bare "timed
        // out": say what they most likely mean.
        let detail = if e.kind() == redis::ErrorKind::Parse || e.to_string().contains("Parse error")
        {
            "the server's reply is not the Redis protocol (is this the port of a Redis server?)"
                .to_string()
        } else if self.tls && e.is_timeout() {
            format!("{e} (a server that does not speak TLS never answers a rediss:// handshake)")
        } else {
            e.to_string()
        };
        let raw = format!("{what} on {}: {detail}", self.redacted);
        let message = self.scrub(&raw);
        let source: Option<crate::error::BoxError> = if message == raw {
            Some(Box::new(e))
        } else {
            None
        };
        Error::Backend {
            backend: BACKEND,
            temporary,
            message,
            source,
        }
    }
}

/// `host:port` of a seed node (the port is required: cluster nodes rarely listen on 6379 alone).
fn parse_seed(seed: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = seed
        .rsplit_once(':')
        .ok_or_else(|| format!("seed node `{seed}` is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("seed node `{seed}` has no host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("seed node `{seed}` has a bad port"))?;
    Ok((host.to_string(), port))
}

fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && text.contains(s) => text.replace(s, "***"),
        _ => text.to_string(),
    }
}

/// Whether retrying after `e` may succeed.
pub(crate) fn is_temporary(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
        ) => true,
        ErrorKind::Io => true,
        _ => matches!(
            e.code(),
            Some("BUSY" | "LOADING" | "TRYAGAIN" | "CLUSTERDOWN")
        ),
    }
}

/// The command connection, one Redis server or a Redis Cluster behind one type, so that the
/// rest of the backend has one code path.
///
/// * `Single`: a [`ConnectionManager`] (multiplexed, so concurrent calls pipeline on one
///   socket; reconnects by itself).
/// * `Cluster`: a redis-rs [`ClusterConnection`]: routes each command by its first key's slot,
///   follows `MOVED`/`ASK`, refreshes the slot map, reconnects, and finds a promoted replica.
///   A pipeline is sent as its separate commands (concurrently, each to its slot's node), since
///   a cluster pipeline must stay in one slot; a keyless command such as `SCRIPT LOAD` goes to
///   every master.
#[derive(Clone)]
pub(crate) enum Link {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl Link {
    /// SUBSCRIBE (RESP3; the link resubscribes by itself after a reconnect).
    pub async fn subscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Link::Single(m) => m.subscribe(channel).await,
            Link::Cluster(c) => c.subscribe(channel).await,
        }
    }

    /// UNSUBSCRIBE.
    pub async fn unsubscribe(&mut self, channel: &[u8]) -> redis::RedisResult<()> {
        match self {
            Link::Single(m) => m.unsubscribe(channel).await,
            Link::Cluster(c) => c.unsubscribe(channel).await,
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(m) => m.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(m) => m.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => {
                let c = c.clone();
                async move {
                    let each = pipeline.cmd_iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { c.req_packed_command(cmd).await }
                    });
                    let mut out = Vec::with_capacity(count);
                    for r in futures::future::join_all(each).await {
                        out.push(match r {
                            Ok(v) => v,
                            // A command's own error stays in its slot of the reply (as in a
                            // pipeline); trouble with the connection fails the whole call.
                            Err(e) => match ServerError::try_from(e) {
                                Ok(server) => Value::ServerError(server),
                                Err(e) => return Err(e),
                            },
                        });
                    }
                    Ok(out.into_iter().skip(offset).take(count).collect())
                }
                .boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(m) => m.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// One connection to Redis shared by every role opened from one URL: a [`Link`].
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    link: Link,
    target: Target,
    prefix: String,
    connect_timeout: Duration,
    /// Queues this process has added to `{prefix}orchestra:queues`.
    queues_known: parking_lot::Mutex<std::collections::HashSet<crate::model::QueueName>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("url", &self.inner.target.redacted)
            .field("prefix", &self.inner.prefix)
            .field("cluster", &self.inner.target.is_cluster())
            .finish()
    }
}

/// The connection manager settings used for every connection we open.
pub(crate) fn manager_config(connect_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_max_delay(Duration::from_secs(2))
}

/// "no answer within …" as a temporary error.
pub(crate) fn no_answer(what: &str, target: &Target, within: Duration) -> Error {
    Error::temporary(
        BACKEND,
        format!("{what} {}: no answer within {within:?}", target.redacted),
        None,
    )
}

impl Conn {
    /// Connects (failing fast with the real cause: refused, auth, TLS, a cluster node named by
    /// a plain `redis://` URL), then builds the self-reconnecting link and loads every script.
    pub async fn open(target: Target, opts: &ConnectOptions) -> Result<Conn> {
        if target.tls {
            // rustls needs one process-wide crypto provider (also when called directly rather
            // than through `backends::open`).
            crate::backends::install_tls_provider();
        }
        let link = if target.is_cluster() {
            let client = target.cluster_client(opts.connect_timeout, None)?;
            let cluster = tokio::time::timeout(opts.connect_timeout, client.get_async_connection())
                .await
                .map_err(|_| no_answer("connect to", &target, opts.connect_timeout))?
                .map_err(|e| target.error("connect", e))?;
            Link::Cluster(cluster)
        } else {
            let client = target.client(false)?;
            // One plain attempt first: the manager retries every error for several seconds,
            // which would hide a wrong password behind a timeout.
            let probe_config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(opts.connect_timeout))
                .set_response_timeout(Some(opts.connect_timeout));
            let mut probe = client
                .get_multiplexed_async_connection_with_config(&probe_config)
                .await
                .map_err(|e| target.error("connect", e))?;
            refuse_cluster_node(&target, &mut probe).await?;
            drop(probe);
            let manager = tokio::time::timeout(
                opts.connect_timeout,
                ConnectionManager::new_with_config(client, manager_config(opts.connect_timeout)),
            )
            .await
            .map_err(|_| no_answer("connect to", &target, opts.connect_timeout))?
            .map_err(|e| target.error("connect", e))?;
            Link::Single(manager)
        };
        let conn = Conn {
            inner: Arc::new(ConnInner {
                link,
                target,
                prefix: opts.prefix.clone(),
                connect_timeout: opts.connect_timeout,
                queues_known: Default::default(),
            }),
        };
        conn.load_scripts().await?;
        tracing::debug!(url = %conn.inner.target.redacted, prefix = %conn.inner.prefix, "redis connected");
        Ok(conn)
    }

    /// Loads every script of this backend (one pipelined round trip), so that the first
    /// EVALSHA of each finds it.
    pub async fn load_scripts(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        for s in crate::backends::redis::scripts::ALL.iter() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(s.code);
        }
        let mut c = self.manager();
        pipe.query_async::<Vec<String>>(&mut c)
            .await
            .map_err(|e| self.error("load scripts", e))?;
        Ok(())
    }

    /// A handle on the shared connection (cheap: a clone of an `Arc`).
    pub fn manager(&self) -> Link {
        self.inner.link.clone()
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.target.is_cluster()
    }

    /// Where task hashes live on this connection's server(s).
    pub fn layout(&self) -> Layout {
        if self.is_cluster() {
            Layout::Sharded
        } else {
            Layout::Lab
        }
    }

    /// The keys of `queue` (and of its tasks).
    pub fn queue_keys(&self, queue: &QueueName) -> QueueKeys {
        QueueKeys::new(self.prefix(), self.layout(), queue)
    }

    /// The events channel as the scripts take it: on a cluster marked `!` (publish whether or
    /// not `PUBSUB NUMSUB` counts a subscriber, since it counts only the node's own, while a
    /// `PUBLISH` reaches every node's).
    pub fn script_events_channel(&self) -> String {
        let channel = keys::events(self.prefix(), crate::wire::EVENTS_TOPIC);
        if self.is_cluster() {
            format!("!{channel}")
        } else {
            channel
        }
    }

    /// Adds the queues not yet added by this process to the set of queues that have tasks
    /// (`SADD`, before their tasks are written: a crash after it leaves a name with no task,
    /// which costs the cross-queue reads one empty look).
    pub async fn note_queues<'a>(
        &self,
        queues: impl IntoIterator<Item = &'a QueueName>,
    ) -> Result<()> {
        let new: Vec<QueueName> = {
            let known = self.inner.queues_known.lock();
            let mut new: Vec<QueueName> = Vec::new();
            for q in queues {
                if !known.contains(q) && !new.contains(q) {
                    new.push(q.clone());
                }
            }
            new
        };
        if new.is_empty() {
            return Ok(());
        }
        let mut c = self.manager();
        let _: i64 = redis::cmd("SADD")
            .arg(keys::queues(self.prefix()))
            .arg(new.iter().map(QueueName::as_str).collect::<Vec<_>>())
            .query_async(&mut c)
            .await
            .map_err(|e| self.error("SADD the queue names", e))?;
        self.inner.queues_known.lock().extend(new);
        Ok(())
    }

    /// Every queue that has (had) tasks under the prefix.
    pub async fn task_queues(&self) -> Result<Vec<QueueName>> {
        let mut c = self.manager();
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::queues(self.prefix()))
            .query_async(&mut c)
            .await
            .map_err(|e| self.error("SMEMBERS the queue names", e))?;
        let mut out: Vec<QueueName> = names
            .iter()
            .filter_map(|n| QueueName::parse(n).ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// The key prefix of [`ConnectOptions::prefix`].
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The parsed URL.
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The connect timeout the connection was opened with.
    pub fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    /// See [`Target::error`].
    pub fn error(&self, what: &str, e: RedisError) -> Error {
        self.inner.target.error(what, e)
    }

    /// Runs a script invocation (EVALSHA, loading the script on NOSCRIPT).
    pub async fn eval<T: FromRedisValue>(
        &self,
        what: &str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut c = self.manager();
        invocation
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.error(what, e))
    }

    /// Runs an `EVALSHA` built by [`LuaScript::evalsha`] (its arguments in one buffer: cheaper
    /// than a [`ScriptInvocation`] for the hot scripts), loading the scripts and running it
    /// again on NOSCRIPT (it did not run the first time).
    pub async fn eval_cmd<T: FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        let mut c = self.manager();
        match cmd.query_async::<T>(&mut c).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.load_scripts().await?;
                cmd.query_async::<T>(&mut c)
                    .await
                    .map_err(|e| self.error(what, e))
            }
            r => r.map_err(|e| self.error(what, e)),
        }
    }

    /// [`Conn::eval_cmd`] for a write a caller is told succeeded (a dispatch): with
    /// `wait_replicas=N` in the URL, followed by `WAIT N` sent to the master of `key`'s slot (on
    /// the same multiplexed connection the script went through, so it covers the script's
    /// write), so that the call succeeds only once N replicas have it (a failover then cannot
    /// lose it). Fewer replicas within the timeout is a temporary error; the write was made.
    pub async fn eval_cmd_replicated<T: FromRedisValue>(
        &self,
        what: &str,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let reply = self.eval_cmd(what, cmd).await?;
        let Some(n) = self.inner.target.wait_replicas else {
            return Ok(reply);
        };
        let mut wait = redis::cmd("WAIT");
        wait.arg(n).arg(WAIT_REPLICAS_TIMEOUT_MS);
        let acked: redis::RedisResult<i64> = match self.manager() {
            Link::Single(mut m) => wait.query_async(&mut m).await,
            Link::Cluster(mut c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(keys::slot(key), SlotAddr::Master);
                c.route_command(
                    wait,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
                .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
            }
        };
        let acked = acked.map_err(|e| self.error("WAIT", e))?;
        if acked < i64::from(n) {
            return Err(Error::temporary(
                BACKEND,
                format!(
                    "{what} on {}: written, but only {acked} of {n} replicas confirmed it within \
                     {WAIT_REPLICAS_TIMEOUT_MS} ms (wait_replicas)",
                    self.inner.target.redacted
                ),
                None,
            ));
        }
        Ok(reply)
    }

    /// Runs a pipeline of independent commands and returns one result per command. Commands
    /// that failed because their script was not loaded (the server restarted without
    /// persistence of its script cache) are retried once after loading the scripts; they did
    /// not run the first time.
    pub async fn pipeline_each(
        &self,
        what: &str,
        build: impl Fn(&mut redis::Pipeline, usize),
        count: usize,
    ) -> Result<Vec<std::result::Result<Value, RedisError>>> {
        let run = |indexes: Vec<usize>| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &indexes {
                build(&mut pipe, i);
            }
            let mut c = self.manager();
            async move {
                let out: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut c).await?;
                Ok::<_, RedisError>((indexes, out))
            }
        };
        let (_, mut results) = run((0..count).collect())
            .await
            .map_err(|e| self.error(what, e))?;
        let missing: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                matches!(r, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            })
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            self.load_scripts().await?;
            let (indexes, again) = run(missing).await.map_err(|e| self.error(what, e))?;
            for (i, r) in indexes.into_iter().zip(again) {
                results[i] = r;
            }
        }
        Ok(results)
    }
}

/// Fails with [`Error::UnsupportedUrl`] naming the cluster URL form when the server behind a
/// plain `redis://` URL is a Redis Cluster node (`INFO cluster` says `cluster_enabled:1`):
/// otherwise every multi-key call would fail later with `MOVED` or `CROSSSLOT`.
async fn refuse_cluster_node(
    target: &Target,
    probe: &mut redis::aio::MultiplexedConnection,
) -> Result<()> {
    let info: String = match redis::cmd("INFO").arg("cluster").query_async(probe).await {
        Ok(info) => info,
        // An ACL user without INFO: nothing to learn here.
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) => return Ok(()),
        Err(e) => return Err(target.error("INFO cluster", e)),
    };
    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        let scheme = if target.tls { "rediss" } else { "redis" };
        return Err(Error::UnsupportedUrl {
            url: target.redacted.clone(),
            reason: format!(
                "this server is a Redis Cluster node; a {scheme}:// URL names one server, use \
                 {scheme}+cluster://[user:password@]host:port[,host:port...] (the seed nodes) \
                 instead"
            ),
        });
    }
    Ok(())
}

/// A Lua script with its source kept for `SCRIPT LOAD`.
pub(crate) struct LuaScript {
    /// The source.
    pub code: &'static str,
    /// The redis-rs handle (SHA1 computed once).
    pub script: std::sync::LazyLock<Script>,
}

impl LuaScript {
    /// Starts an invocation.
    pub fn prepare(&'static self) -> ScriptInvocation<'static> {
        self.script.prepare_invoke()
    }

    /// `EVALSHA <sha> <keys>`: append the keys, then the arguments, and run it with
    /// [`Conn::eval_cmd`].
    pub fn evalsha(&'static self, keys: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(keys);
        cmd
    }
}

/// Declares a `static` [`LuaScript`] from source text.
macro_rules! lua_script {
    ($(#[$m:meta])* $name:ident = $code:expr) => {
        $(#[$m])*
        pub(crate) static $name: $crate::backends::redis::conn::LuaScript =
            $crate::backends::redis::conn::LuaScript {
                code: $code,
                script: ::std::sync::LazyLock::new(|| ::redis::Script::new($code)),
            };
    };
}
pub(crate) use lua_script;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Target> {
        Target::parse(&Url::parse(s).expect("url"))
    }

    #[test]
    fn plain_url_gives_host_port_db_user_and_password() {
        let t = parse("redis://alice:s3cret@example.com:6380/3").expect("parse");
        assert!(!t.tls);
        assert_eq!(t.info.redis_settings().db(), 3);
        assert_eq!(t.info.redis_settings().username(), Some("alice"));
        assert_eq!(t.info.redis_settings().password(), Some("s3cret"));
        assert_eq!(t.redacted, "redis://alice:***@example.com:6380/3");
        assert_eq!(t.scrub("bad password s3cret"), "bad password ***");
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn password_only_url_is_plain_auth() {
        let t = parse("redis://:pw%40x@localhost").expect("parse");
        assert_eq!(t.info.redis_settings().username(), None);
        assert_eq!(t.info.redis_settings().password(), Some("pw@x"));
    }

    #[test]
    fn rediss_takes_tls_files_from_the_query() {
        let t = parse(
            "rediss://h:6379/0?tls_ca_file=/etc/ca.pem&tls_cert_file=c.pem&tls_key_file=k.pem",
        )
        .expect("parse");
        assert!(t.tls);
        assert_eq!(
            t.tls_files.ca.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert!(matches!(
            t.info.addr(),
            redis::ConnectionAddr::TcpTls {
                insecure: false,
                ..
            }
        ));
        assert!(matches!(
            parse("rediss://h?tls_cert_file=c.pem"),
            Err(Error::UnsupportedUrl { .. })
        ));
    }

    #[test]
    fn bad_urls_are_rejected_with_a_reason_and_no_password() {
        for (url, needle) in [
            ("redis://:pw@h/notadb", "database number"),
            ("redis://:pw@h/0?tls_ca_file=x", "rediss://"),
            ("redis://:pw@h/0?timeout=3", "unknown query parameter"),
            ("rediss://:pw@h/0#insecure", "tls_ca_file"),
            ("redis://", "no host"),
        ] {
            match parse(url) {
                Err(Error::UnsupportedUrl { url: shown, reason }) => {
                    assert!(reason.contains(needle), "{url}: {reason}");
                    assert!(!shown.contains("pw@"), "{shown}");
                }
                other => panic!("{url}: expected UnsupportedUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn cluster_url_names_every_seed_node() {
        // What `connect` makes of redis+cluster://alice:pw@h1:7000,h2:7001,[::1]:7002.
        let url =
            Url::parse("redis+cluster://alice:pw@h1:7000?seeds=h2:7001,[::1]:7002").expect("parse");
        let t = Target::parse(&url).expect("target");
        assert!(t.is_cluster() && !t.tls);
        let seeds: Vec<String> = t.seeds.iter().map(|s| s.addr().to_string()).collect();
        assert_eq!(seeds, ["h1:7000", "h2:7001", "::1:7002"]);
        for s in &t.seeds {
            assert_eq!(s.redis_settings().username(), Some("alice"));
            assert_eq!(s.redis_settings().password(), Some("pw"));
        }
        assert!(!t.redacted.contains("pw"), "{}", t.redacted);
        let t = Target::parse(&Url::parse("rediss+cluster://h1:7000?wait_replicas=1").unwrap())
            .expect("tls target");
        assert!(t.is_cluster() && t.tls);
        assert_eq!(t.wait_replicas, Some(1));
        assert!(!parse("redis://h:1").expect("plain").is_cluster());
        for (url, needle) in [
            ("redis+cluster://h1:7000/3", "database 0"),
            ("redis+cluster://h1:7000?seeds=h2", "host:port"),
            ("redis+cluster://h1:7000?seeds=h2:x", "bad port"),
            ("redis://h1:7000?wait_replicas=x", "wait_replicas"),
        ] {
            match parse(url) {
                Err(Error::UnsupportedUrl { reason, .. }) => {
                    assert!(reason.contains(needle), "{url}: {reason}")
                }
                other => panic!("{url}: expected UnsupportedUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn protocol_parameter_passes_through() {
        let t = parse("redis://h/0?protocol=resp3").expect("parse");
        assert_eq!(t.info.redis_settings().protocol(), ProtocolVersion::RESP3);
    }

    #[test]
    fn connection_errors_are_temporary_and_server_errors_permanent() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(is_temporary(&io));
        let loading =
            RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "loading"));
        assert!(is_temporary(&loading));
        let wrong = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!is_temporary(&wrong));
    }
}
