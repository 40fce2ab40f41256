//! Finding a real broker for a backend's tests, and isolating each test under its own prefix.
//!
//! [`broker_url`] answers, in this order:
//!
//! 1. the environment variable `ORCHESTRA_TEST_REDIS_URL`, `ORCHESTRA_TEST_NATS_URL` or
//!    `ORCHESTRA_TEST_AMQP_URL`, used as given;
//! 2. when a Docker daemon answers (`DOCKER_HOST`, else `/var/run/docker.sock`), a container
//!    started with testcontainers (Redis 7.2, NATS with JetStream, RabbitMQ 3.10), started once
//!    and kept for the whole test binary, then removed when the binary exits;
//! 3. the broker's default local port, if something accepts a connection there within a second;
//! 4. otherwise a panic that says how to provide a broker. A test never skips silently.
//!
//! Every test then works under its own [`unique_prefix`], which every backend puts in front of
//! everything it creates, so tests can share one broker (and run concurrently) without seeing each
//! other's keys, streams or queues. Nothing here ever flushes a broker.

use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::redact::redact_url;

/// How long a probe (Docker ping, local port) may take before the answer counts as "no".
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a container may take to start (pulling the image included).
const CONTAINER_STARTUP: Duration = Duration::from_secs(180);

/// A broker the conformance and engine suites can run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// Redis (the `redis` feature).
    Redis,
    /// NATS with JetStream (the `nats` feature).
    Nats,
    /// RabbitMQ (the `rabbitmq` feature).
    Amqp,
}

impl BrokerKind {
    /// The environment variable that names this broker's URL for the tests.
    pub fn env_var(self) -> &'static str {
        match self {
            BrokerKind::Redis => "ORCHESTRA_TEST_REDIS_URL",
            BrokerKind::Nats => "ORCHESTRA_TEST_NATS_URL",
            BrokerKind::Amqp => "ORCHESTRA_TEST_AMQP_URL",
        }
    }

    /// The URL of the broker on its default local port.
    pub fn default_local_url(self) -> &'static str {
        match self {
            BrokerKind::Redis => "redis://127.0.0.1:6379",
            BrokerKind::Nats => "nats://127.0.0.1:4222",
            BrokerKind::Amqp => "amqp://guest:guest@127.0.0.1:5672/%2f",
        }
    }

    fn default_local_addr(self) -> SocketAddr {
        let port = match self {
            BrokerKind::Redis => 6379,
            BrokerKind::Nats => 4222,
            BrokerKind::Amqp => 5672,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn index(self) -> usize {
        match self {
            BrokerKind::Redis => 0,
            BrokerKind::Nats => 1,
            BrokerKind::Amqp => 2,
        }
    }

    fn how_to_run_locally(self) -> &'static str {
        match self {
            BrokerKind::Redis => "redis-server --port 6379",
            BrokerKind::Nats => "nats-server -js -p 4222",
            BrokerKind::Amqp => "rabbitmq-server (user guest/guest on port 5672)",
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokerKind::Redis => "Redis",
            BrokerKind::Nats => "NATS (JetStream)",
            BrokerKind::Amqp => "RabbitMQ",
        })
    }
}

/// Per broker kind, the URL found by the Docker / local-port steps (decided once per binary).
static RESOLVED: [OnceCell<String>; 3] = [
    OnceCell::const_new(),
    OnceCell::const_new(),
    OnceCell::const_new(),
];

/// Containers (and their reapers) kept alive until the test binary exits.
static KEPT_ALIVE: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

/// The URL of a `kind` broker for tests: the environment variable, else a testcontainers
/// container when Docker answers, else the default local port when it answers.
///
/// # Panics
///
/// When none of these provides a broker, with a message saying how to provide one. Tests that
/// need a broker must fail, not skip, when there is none.
pub async fn broker_url(kind: BrokerKind) -> String {
    if let Ok(url) = std::env::var(kind.env_var()) {
        let url = url.trim().to_string();
        if !url.is_empty() {
            return url;
        }
    }
    RESOLVED[kind.index()]
        .get_or_init(|| resolve_without_env(kind))
        .await
        .clone()
}

async fn resolve_without_env(kind: BrokerKind) -> String {
    let mut docker_problem = None;
    if let Some(daemon) = docker_daemon().await {
        match start_container(kind).await {
            Ok(url) => {
                tracing::info!(%kind, url = %redact_url(&url), %daemon, "test broker started in a container");
                return url;
            }
            Err(e) => {
                tracing::warn!(%kind, %daemon, error = %e, "could not start a test broker container; trying the local port");
                docker_problem = Some(format!(
                    "Docker answered at {daemon} but the container did not start: {e}"
                ));
            }
        }
    }
    let addr = kind.default_local_addr();
    if matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    ) {
        let url = kind.default_local_url().to_string();
        tracing::info!(%kind, url = %redact_url(&url), "using the test broker on its default local port");
        return url;
    }
    panic!(
        "no {kind} broker for the tests. Provide one in any of these ways: \
         (1) set {var} to its URL (for example {var}={example}); \
         (2) start a Docker daemon (or set DOCKER_HOST) so that testcontainers can run one; \
         (3) run one on its default local port {addr} (for example `{local}`).{docker}",
        var = kind.env_var(),
        example = kind.default_local_url(),
        local = kind.how_to_run_locally(),
        docker = docker_problem
            .map(|p| format!(" Note: {p}."))
            .unwrap_or_default(),
    );
}

/// Where a Docker daemon answered a ping, if one did within [`PROBE_TIMEOUT`].
async fn docker_daemon() -> Option<String> {
    let host = std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty());
    let target = host.unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let answered = tokio::time::timeout(PROBE_TIMEOUT, ping_docker(&target))
        .await
        .unwrap_or(false);
    answered.then_some(target)
}

/// Sends `GET /_ping` to the daemon at `target` (`unix://path` or `tcp://host:port`).
async fn ping_docker(target: &str) -> bool {
    const PING: &[u8] = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
    if let Some(path) = target.strip_prefix("unix://") {
        #[cfg(unix)]
        {
            if !Path::new(path).exists() {
                return false;
            }
            match tokio::net::UnixStream::connect(path).await {
                Ok(mut s) => http_ok(&mut s, PING).await,
                Err(_) => false,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (path, PING);
            false
        }
    } else if let Some(addr) = target
        .strip_prefix("tcp://")
        .or_else(|| target.strip_prefix("http://"))
        .or_else(|| target.strip_prefix("https://"))
    {
        let addr = addr.trim_end_matches('/');
        match tokio::net::TcpStream::connect(addr).await {
            // A TLS daemon does not speak plain HTTP: accepting the connection is the answer.
            Ok(_)
                if std::env::var_os("DOCKER_TLS_VERIFY").is_some()
                    || target.starts_with("https://") =>
            {
                true
            }
            Ok(mut s) => http_ok(&mut s, PING).await,
            Err(_) => false,
        }
    } else {
        false
    }
}

async fn http_ok<S: AsyncReadExt + AsyncWriteExt + Unpin>(stream: &mut S, request: &[u8]) -> bool {
    if stream.write_all(request).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf).await {
        Ok(n) if n > 0 => {
            let head = String::from_utf8_lossy(&buf[..n]);
            head.starts_with("HTTP/") && head.contains(" 200")
        }
        _ => false,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts a `kind` container, keeps it (and a reaper) alive until the process exits, and returns
/// its URL.
async fn start_container(kind: BrokerKind) -> Result<String, BoxError> {
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, Image, ImageExt};
    use testcontainers_modules::{nats, rabbitmq, redis};

    async fn run<I: Image + 'static>(
        request: testcontainers::core::ContainerRequest<I>,
        port: u16,
    ) -> Result<(String, u16, ContainerAsync<I>), BoxError> {
        let container = request
            .with_label("org.agent-orchestra.testkit", "1")
            .with_startup_timeout(CONTAINER_STARTUP)
            .start()
            .await?;
        let host = container.get_host().await?.to_string();
        let host_port = container.get_host_port_ipv4(port).await?;
        Ok((host, host_port, container))
    }

    let (url, id, keep): (String, String, Box<dyn Any + Send>) = match kind {
        BrokerKind::Redis => {
            let (host, port, c) =
                run(redis::Redis::default().with_tag("7.2"), redis::REDIS_PORT).await?;
            (
                format!("redis://{host}:{port}"),
                c.id().to_string(),
                Box::new(c),
            )
        }
        BrokerKind::Nats => {
            let cmd = nats::NatsServerCmd::default().with_jetstream();
            let (host, port, c) = run(nats::Nats::default().with_cmd(&cmd), 4222).await?;
            (
                format!("nats://{host}:{port}"),
                c.id().to_string(),
                Box::new(c),
            )
        }
        BrokerKind::Amqp => {
            let image = rabbitmq::RabbitMq::default().with_tag("3.10-management");
            let (host, port, c) = run(image, 5672).await?;
            (
                format!("amqp://guest:guest@{host}:{port}/%2f"),
                c.id().to_string(),
                Box::new(c),
            )
        }
    };
    let mut kept = KEPT_ALIVE.lock().unwrap_or_else(|p| p.into_inner());
    kept.push(keep);
    match spawn_reaper(&id) {
        Ok(reaper) => kept.push(Box::new(reaper)),
        Err(e) => tracing::warn!(
            container = %id, error = %e,
            "cannot arrange removal of the test container at exit; remove it with `docker rm -f {id}`"
        ),
    }
    Ok(url)
}

/// A container kept in a static is never dropped, so testcontainers never removes it. This child
/// process waits for its stdin to close (which happens when the test binary exits, however it
/// exits) and then removes the container with the Docker CLI.
fn spawn_reaper(container_id: &str) -> std::io::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(r#"cat >/dev/null; exec docker rm -f -v "$0" >/dev/null 2>&1"#)
        .arg(container_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// A short prefix unique to this call, for one test: `t_<name>_<8 hex digits>_`, made only of
/// `[a-z0-9_]` so that every backend can use it in keys, subjects, stream and queue names.
///
/// The name part is `test_name` lowercased, other characters replaced by `_`, cut to 24
/// characters. The hex part never repeats within a process and is random across processes, so
/// concurrent test binaries sharing a broker do not collide.
///
/// ```
/// use agent_orchestra::testkit::harness::unique_prefix;
/// let p = unique_prefix("Lock expiry!");
/// assert!(p.starts_with("t_lock_expiry__"), "{p}");
/// assert!(p.ends_with('_'));
/// assert_ne!(p, unique_prefix("Lock expiry!"));
/// ```
pub fn unique_prefix(test_name: &str) -> String {
    static BASE: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = *BASE.get_or_init(rand::random::<u32>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // An odd multiplier makes n -> tag a bijection on u32: no repeats within the process.
    let tag = base.wrapping_add(n.wrapping_mul(0x9E37_79B1));
    let name: String = test_name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    format!("t_{name}_{tag:08x}_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_prefix_is_short_safe_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let p = unique_prefix("Fan-out reaches Every subscriber, with a long name");
            assert!(p.len() <= 2 + 24 + 1 + 8 + 1, "{p}");
            assert!(
                p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{p}"
            );
            assert!(seen.insert(p.clone()), "repeated prefix {p}");
        }
    }

    #[test]
    fn env_vars_and_default_urls_are_the_documented_ones() {
        assert_eq!(BrokerKind::Redis.env_var(), "ORCHESTRA_TEST_REDIS_URL");
        assert_eq!(BrokerKind::Nats.env_var(), "ORCHESTRA_TEST_NATS_URL");
        assert_eq!(BrokerKind::Amqp.env_var(), "ORCHESTRA_TEST_AMQP_URL");
        for kind in [BrokerKind::Redis, BrokerKind::Nats, BrokerKind::Amqp] {
            let url = url::Url::parse(kind.default_local_url()).expect("valid URL");
            assert_eq!(url.port(), Some(kind.default_local_addr().port()));
        }
    }

    #[tokio::test]
    async fn docker_probe_answers_no_for_a_missing_socket() {
        assert!(!ping_docker("unix:///nonexistent/docker.sock").await);
        assert!(!ping_docker("ftp://nowhere").await);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn docker_probe_recognises_a_daemon_that_answers_its_ping() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind a fake daemon");
        let daemon = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.expect("read the ping");
            assert!(buf[..n].starts_with(b"GET /_ping "), "unexpected probe");
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .await
                .expect("answer");
        });
        assert!(ping_docker(&format!("unix://{}", path.display())).await);
        daemon.await.expect("fake daemon");
    }
}
