//! Connecting to Redis: the URL (TLS, AUTH, ACL user, database), the shared command
//! connection, scripts, and the mapping of redis errors to [`crate::Error`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo,
    ProtocolVersion, RedisError, Script, ScriptInvocation, ServerErrorKind, Value,
};
use url::Url;

use crate::error::{Error, Result};
use crate::{bundle::ConnectOptions, redact::redact_url};

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "redis";

/// How long one command (or script) may take before the call fails with a temporary error.
/// Generous: the longest script (a fetch or enqueue batch) takes a few milliseconds.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Query parameters this backend understands (everything else is rejected, to catch typos).
const QUERY_KEYS: [&str; 4] = ["protocol", "tls_ca_file", "tls_cert_file", "tls_key_file"];

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

/// A parsed `redis://` / `rediss://` URL.
#[derive(Clone)]
pub(crate) struct Target {
    /// What redis-rs needs to connect (host, port, TLS, db, user, password, protocol).
    pub info: ConnectionInfo,
    /// Whether the scheme is `rediss`.
    pub tls: bool,
    /// TLS files from the query.
    pub tls_files: TlsFiles,
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
    /// optional query parameters `protocol`, `tls_ca_file`, `tls_cert_file`, `tls_key_file`.
    pub fn parse(url: &Url) -> Result<Target> {
        let redacted = redact_url(url.as_str());
        let bad = |reason: String| Error::UnsupportedUrl {
            url: redacted.clone(),
            reason,
        };
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(bad(format!(
                    "scheme `{other}` is not redis:// or rediss://"
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
        let mut tls_files = TlsFiles::default();
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
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
        let info = clean
            .into_connection_info()
            .map_err(|e| bad(scrub(&e.to_string(), url.password())))?;
        let secret = info
            .redis_settings()
            .password()
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        Ok(Target {
            info,
            tls,
            tls_files,
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
        let built = if self.tls && (self.tls_files.ca.is_some() || self.tls_files.cert.is_some()) {
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
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            Client::open(info)
        };
        built.map_err(|e| Error::UnsupportedUrl {
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

/// One connection to Redis shared by every role opened from one URL: a [`ConnectionManager`]
/// (multiplexed, so concurrent calls pipeline on one socket; reconnects by itself).
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    manager: ConnectionManager,
    target: Target,
    prefix: String,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("url", &self.inner.target.redacted)
            .field("prefix", &self.inner.prefix)
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

impl Conn {
    /// Connects (failing fast with the real cause: refused, auth, TLS), then builds the
    /// self-reconnecting manager and loads every script.
    pub async fn open(target: Target, opts: &ConnectOptions) -> Result<Conn> {
        if target.tls {
            // rustls needs one process-wide crypto provider (also when called directly rather
            // than through `backends::open`).
            crate::backends::install_tls_provider();
        }
        let client = target.client(false)?;
        // One plain attempt first: the manager retries every error for several seconds,
        // which would hide a wrong password behind a timeout.
        let probe_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.connect_timeout));
        let probe = client
            .get_multiplexed_async_connection_with_config(&probe_config)
            .await
            .map_err(|e| target.error("connect", e))?;
        drop(probe);
        let manager = tokio::time::timeout(
            opts.connect_timeout,
            ConnectionManager::new_with_config(client, manager_config(opts.connect_timeout)),
        )
        .await
        .map_err(|_| {
            Error::temporary(
                BACKEND,
                format!(
                    "connect to {}: no answer within {:?}",
                    target.redacted, opts.connect_timeout
                ),
                None,
            )
        })?
        .map_err(|e| target.error("connect", e))?;
        let conn = Conn {
            inner: Arc::new(ConnInner {
                manager,
                target,
                prefix: opts.prefix.clone(),
                connect_timeout: opts.connect_timeout,
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
    pub fn manager(&self) -> ConnectionManager {
        self.inner.manager.clone()
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
