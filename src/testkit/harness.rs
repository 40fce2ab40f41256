//! Finding a real broker for a backend's tests, and isolating each test under its own prefix.
//!
//! [`broker_url`] answers, in this order:
//!
//! 1. the environment variable `ORCHESTRA_TEST_REDIS_URL`, `ORCHESTRA_TEST_NATS_URL` or
//!    `ORCHESTRA_TEST_AMQP_URL`, used as given;
//! 2. when a Docker daemon answers (see [`docker_host`] for where it is looked for), a container
//!    started with testcontainers from [`REDIS_IMAGE`], [`NATS_IMAGE`] (with JetStream) or
//!    [`RABBITMQ_IMAGE`], started once and kept for the whole test binary, then removed when the
//!    binary exits;
//! 3. the broker's default local port, if something accepts a connection there within a second;
//! 4. otherwise a panic that says how to provide a broker. A test never skips silently.
//!
//! `ORCHESTRA_TEST_BROKERS` narrows the choice: `containers` takes step 2 only (no Docker, a
//! container that does not start, or a URL variable that is set is a panic: CI uses it to prove
//! that containers ran), `local` skips step 2, `auto` (or unset) takes all the steps.
//!
//! The first time a binary settles on a broker of a kind, it writes one line to stderr (past the
//! test harness's output capture), for example
//! `test broker: Redis in container 84abe33e… (image redis:7.0) at redis://localhost:32772`.
//!
//! The images are the official ones: testcontainers pulls an image only when the daemon does not
//! have it. A machine without registry access can build look-alikes from installed brokers with
//! `.ci/containers/build-images` (docs/testing.md).
//!
//! Every test then works under its own [`unique_prefix`], which every backend puts in front of
//! everything it creates, so tests can share one broker (and run concurrently) without seeing each
//! other's keys, streams or queues. Nothing here ever flushes a broker.

use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use crate::redact::redact_url;

/// How long a probe (Docker ping, local port) may take before the answer counts as "no".
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a container may take to start (pulling the image included).
const CONTAINER_STARTUP: Duration = Duration::from_secs(180);

/// The Redis image the harness runs (`.ci/containers/build-images` builds the same tag).
pub const REDIS_IMAGE: &str = "redis:7.0";
/// The NATS image the harness runs, with `--jetstream` (`.ci/containers/build-images` builds the
/// same tag).
pub const NATS_IMAGE: &str = "nats:2.9";
/// The RabbitMQ image the harness runs (`.ci/containers/build-images` builds the same tag).
pub const RABBITMQ_IMAGE: &str = "rabbitmq:3.10";

/// The environment variable that chooses where test brokers come from (see [`BrokerSource`]).
pub const BROKERS_ENV: &str = "ORCHESTRA_TEST_BROKERS";

/// The label every harness container carries, so that CI (or a user) can find them:
/// `docker ps -a --filter label=org.agent-orchestra.testkit`.
pub const CONTAINER_LABEL: &str = "org.agent-orchestra.testkit";

/// Where [`broker_url`] may take a broker from, read from [`BROKERS_ENV`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerSource {
    /// `auto` or unset: the URL variable, else a container, else the default local port.
    Auto,
    /// `containers`: a testcontainers container only; anything else is a panic.
    Containers,
    /// `local`: the URL variable, else the default local port; Docker is not asked.
    Local,
}

impl BrokerSource {
    /// Parses a value of [`BROKERS_ENV`] (case-insensitive; empty means [`BrokerSource::Auto`]).
    pub fn parse(value: &str) -> Option<BrokerSource> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(BrokerSource::Auto),
            "containers" | "container" | "docker" => Some(BrokerSource::Containers),
            "local" => Some(BrokerSource::Local),
            _ => None,
        }
    }

    /// The source [`BROKERS_ENV`] chooses.
    ///
    /// # Panics
    ///
    /// When the variable holds something other than `auto`, `containers` or `local`: a typo must
    /// not quietly run the tests somewhere else than asked.
    pub fn from_env() -> BrokerSource {
        let value = std::env::var(BROKERS_ENV).unwrap_or_default();
        BrokerSource::parse(&value).unwrap_or_else(|| {
            panic!("{BROKERS_ENV}={value:?} is not one of auto, containers, local")
        })
    }
}

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
/// container when Docker answers, else the default local port when it answers, as
/// [`BROKERS_ENV`] allows (see the [module documentation](self)).
///
/// # Panics
///
/// When none of these provides a broker, with a message saying how to provide one. Tests that
/// need a broker must fail, not skip, when there is none. With `ORCHESTRA_TEST_BROKERS=containers`,
/// also when the broker's URL variable is set, when no Docker daemon answers, or when the
/// container does not start.
pub async fn broker_url(kind: BrokerKind) -> String {
    let source = BrokerSource::from_env();
    let from_env = std::env::var(kind.env_var())
        .map(|u| u.trim().to_string())
        .unwrap_or_default();
    if !from_env.is_empty() {
        if source == BrokerSource::Containers {
            panic!(
                "{BROKERS_ENV}=containers, but {var} is set: unset it, or unset {BROKERS_ENV} \
                 to use that URL",
                var = kind.env_var()
            );
        }
        announce(
            kind,
            &format!("{} from {}", redact_url(&from_env), kind.env_var()),
        );
        return from_env;
    }
    RESOLVED[kind.index()]
        .get_or_init(|| resolve_without_env(kind, source))
        .await
        .clone()
}

/// Writes `test broker: <kind> <what>` to stderr, once per kind and process. Written to the
/// stderr handle, not with `eprintln!`, so that the test harness does not capture it.
fn announce(kind: BrokerKind, what: &str) {
    use std::io::Write;
    static ANNOUNCED: [Once; 3] = [Once::new(), Once::new(), Once::new()];
    ANNOUNCED[kind.index()].call_once(|| {
        let _ = writeln!(std::io::stderr(), "test broker: {kind} {what}");
    });
}

async fn resolve_without_env(kind: BrokerKind, source: BrokerSource) -> String {
    let mut docker_problem = None;
    if source != BrokerSource::Local {
        match docker_host().await {
            Some(daemon) => match start_container(kind).await {
                Ok(started) => {
                    tracing::info!(%kind, url = %redact_url(&started.url), %daemon, container = %started.id, image = started.image, "test broker started in a container");
                    announce(
                        kind,
                        &format!(
                            "in container {} (image {}) at {}",
                            started.id,
                            started.image,
                            redact_url(&started.url)
                        ),
                    );
                    return started.url;
                }
                Err(e) if source == BrokerSource::Containers => panic!(
                    "{BROKERS_ENV}=containers, but the {kind} container did not start on the \
                     Docker daemon at {daemon}: {e}. Without registry access, build the image \
                     locally first: .ci/containers/build-images"
                ),
                Err(e) => {
                    tracing::warn!(%kind, %daemon, error = %e, "could not start a test broker container; trying the local port");
                    docker_problem = Some(format!(
                        "Docker answered at {daemon} but the container did not start: {e}"
                    ));
                }
            },
            None if source == BrokerSource::Containers => panic!(
                "{BROKERS_ENV}=containers, but no Docker daemon answered; looked at {}. \
                 Start one, or set DOCKER_HOST to where it listens",
                docker_candidates().join(", ")
            ),
            None => {}
        }
    }
    let addr = kind.default_local_addr();
    if matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    ) {
        let url = kind.default_local_url().to_string();
        tracing::info!(%kind, url = %redact_url(&url), "using the test broker on its default local port");
        announce(
            kind,
            &format!("on its default local port ({})", redact_url(&url)),
        );
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

/// Where to look for a Docker (or Podman) daemon, in order, as testcontainers does: `DOCKER_HOST`
/// alone when it is set; else the default socket `/var/run/docker.sock`, then rootless Docker
/// (`$XDG_RUNTIME_DIR/docker.sock`, `$XDG_RUNTIME_DIR/.docker/run/docker.sock`,
/// `~/.docker/run/docker.sock`, `~/.docker/desktop/docker.sock`), then Podman
/// (`$XDG_RUNTIME_DIR/podman/podman.sock`, `/run/podman/podman.sock`).
pub fn docker_candidates() -> Vec<String> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    candidates_from(
        var("DOCKER_HOST").map(|h| h.to_string_lossy().into_owned()),
        var("XDG_RUNTIME_DIR").map(PathBuf::from),
        var("HOME").map(PathBuf::from),
    )
}

/// [`docker_candidates`] for the given `DOCKER_HOST`, `XDG_RUNTIME_DIR` and `HOME`.
fn candidates_from(
    docker_host: Option<String>,
    runtime: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Vec<String> {
    if let Some(host) = docker_host.filter(|h| !h.trim().is_empty()) {
        return vec![host.trim().to_string()];
    }
    let mut paths = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(dir) = &runtime {
        paths.push(dir.join("docker.sock"));
        paths.push(dir.join(".docker/run/docker.sock"));
    }
    if let Some(dir) = &home {
        paths.push(dir.join(".docker/run/docker.sock"));
        paths.push(dir.join(".docker/desktop/docker.sock"));
    }
    if let Some(dir) = &runtime {
        paths.push(dir.join("podman/podman.sock"));
    }
    paths.push(PathBuf::from("/run/podman/podman.sock"));
    paths
        .into_iter()
        .map(|p| format!("unix://{}", p.display()))
        .collect()
}

/// The first of [`docker_candidates`] whose daemon answers a ping within a second,
/// found once per process.
///
/// When `DOCKER_HOST` is unset and the daemon found is not the one testcontainers would pick
/// (it reads only `DOCKER_HOST` and a shorter list of sockets), `DOCKER_HOST` is set to it, so
/// that testcontainers and the Docker CLI that removes the containers at exit talk to the daemon
/// found.
pub async fn docker_host() -> Option<String> {
    static FOUND: OnceCell<Option<String>> = OnceCell::const_new();
    FOUND
        .get_or_init(|| async {
            let explicit = std::env::var("DOCKER_HOST")
                .ok()
                .is_some_and(|h| !h.trim().is_empty());
            for candidate in docker_candidates() {
                let answered = tokio::time::timeout(PROBE_TIMEOUT, ping_docker(&candidate))
                    .await
                    .unwrap_or(false);
                if answered {
                    if !explicit && candidate != testcontainers_default_host() {
                        // Only for a socket testcontainers would not pick itself (a rootless
                        // or Podman one), once per process: other threads may read the
                        // environment meanwhile, which std's lock covers for Rust readers.
                        std::env::set_var("DOCKER_HOST", &candidate);
                    }
                    return Some(candidate);
                }
            }
            None
        })
        .await
        .clone()
}

/// The daemon testcontainers 0.27 uses when `DOCKER_HOST` is unset: the first of its sockets
/// that exists (answering or not), else the default socket.
fn testcontainers_default_host() -> String {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let candidates = [
        Some(PathBuf::from("/var/run/docker.sock")),
        runtime.map(|d| d.join(".docker/run/docker.sock")),
        home.as_ref().map(|d| d.join(".docker/run/docker.sock")),
        home.map(|d| d.join(".docker/desktop/docker.sock")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .map_or_else(
            || "unix:///var/run/docker.sock".to_string(),
            |p| format!("unix://{}", p.display()),
        )
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

/// A container the harness started.
struct Started {
    url: String,
    id: String,
    image: &'static str,
}

/// Starts a `kind` container, keeps it (and a reaper) alive until the process exits, and returns
/// its URL.
async fn start_container(kind: BrokerKind) -> Result<Started, BoxError> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage, Image, ImageExt};
    use testcontainers_modules::{nats, redis};

    async fn run<I: Image + 'static>(
        request: testcontainers::core::ContainerRequest<I>,
        port: u16,
    ) -> Result<(String, u16, ContainerAsync<I>), BoxError> {
        let container = request
            .with_label(CONTAINER_LABEL, "1")
            .with_startup_timeout(CONTAINER_STARTUP)
            .start()
            .await?;
        let host = container.get_host().await?.to_string();
        let host_port = container.get_host_port_ipv4(port).await?;
        Ok((host, host_port, container))
    }

    fn tag_of(image: &str) -> &str {
        image.split_once(':').map_or("latest", |(_, tag)| tag)
    }

    let (image, url, id, keep): (&'static str, String, String, Box<dyn Any + Send>) = match kind {
        BrokerKind::Redis => {
            // The module waits for "Ready to accept connections" on stdout.
            let request = redis::Redis::default().with_tag(tag_of(REDIS_IMAGE));
            let (host, port, c) = run(request, redis::REDIS_PORT).await?;
            let id = c.id().to_string();
            (
                REDIS_IMAGE,
                format!("redis://{host}:{port}"),
                id,
                Box::new(c),
            )
        }
        BrokerKind::Nats => {
            // The module passes `--jetstream` as the command (the image's entrypoint is the
            // server) and waits for "Server is ready" on stderr.
            let cmd = nats::NatsServerCmd::default().with_jetstream();
            let request = nats::Nats::default()
                .with_cmd(&cmd)
                .with_tag(tag_of(NATS_IMAGE));
            let (host, port, c) = run(request, 4222).await?;
            let id = c.id().to_string();
            (NATS_IMAGE, format!("nats://{host}:{port}"), id, Box::new(c))
        }
        BrokerKind::Amqp => {
            // Not the module's image: it waits for the "4 plugins" of a -management tag, which
            // the tests do not need and which starts slower.
            let (name, tag) = RABBITMQ_IMAGE
                .split_once(':')
                .unwrap_or((RABBITMQ_IMAGE, "latest"));
            let image = GenericImage::new(name, tag)
                .with_exposed_port(5672.tcp())
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete"));
            let (host, port, c) = run(image.into(), 5672).await?;
            let id = c.id().to_string();
            (
                RABBITMQ_IMAGE,
                format!("amqp://guest:guest@{host}:{port}/%2f"),
                id,
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
    Ok(Started { url, id, image })
}

/// A container kept in a static is never dropped, so testcontainers never removes it. This child
/// process waits for its stdin to close (which happens when the test binary exits, however it
/// exits) and then removes the container with the Docker CLI (at `DOCKER_HOST`, which
/// [`docker_host`] has set), or Podman's when there is no Docker CLI.
fn spawn_reaper(container_id: &str) -> std::io::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(
            r#"cat >/dev/null; docker rm -f -v "$0" >/dev/null 2>&1 || exec podman rm -f -v "$0" >/dev/null 2>&1"#,
        )
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

    #[test]
    fn broker_source_reads_the_documented_values_and_refuses_others() {
        assert_eq!(BrokerSource::parse(""), Some(BrokerSource::Auto));
        assert_eq!(BrokerSource::parse("auto"), Some(BrokerSource::Auto));
        assert_eq!(
            BrokerSource::parse(" Containers "),
            Some(BrokerSource::Containers)
        );
        assert_eq!(BrokerSource::parse("local"), Some(BrokerSource::Local));
        assert_eq!(BrokerSource::parse("contianers"), None);
    }

    #[test]
    fn docker_host_alone_is_the_only_candidate_when_set() {
        let home = Some(PathBuf::from("/home/u"));
        assert_eq!(
            candidates_from(Some(" tcp://10.0.0.2:2375 ".into()), None, home.clone()),
            ["tcp://10.0.0.2:2375"]
        );
        // An empty DOCKER_HOST counts as unset, as for the Docker CLI.
        assert_eq!(
            candidates_from(Some(String::new()), None, home)[0],
            "unix:///var/run/docker.sock"
        );
    }

    #[test]
    fn docker_candidates_go_default_then_rootless_then_podman() {
        let found = candidates_from(
            None,
            Some(PathBuf::from("/run/user/1000")),
            Some(PathBuf::from("/home/u")),
        );
        assert_eq!(
            found,
            [
                "unix:///var/run/docker.sock",
                "unix:///run/user/1000/docker.sock",
                "unix:///run/user/1000/.docker/run/docker.sock",
                "unix:///home/u/.docker/run/docker.sock",
                "unix:///home/u/.docker/desktop/docker.sock",
                "unix:///run/user/1000/podman/podman.sock",
                "unix:///run/podman/podman.sock",
            ]
        );
        assert_eq!(
            candidates_from(None, None, None),
            [
                "unix:///var/run/docker.sock",
                "unix:///run/podman/podman.sock"
            ]
        );
    }

    #[test]
    fn image_tags_are_official_looking_and_match_the_build_script() {
        let script = include_str!("../../.ci/containers/build-images");
        for (var, image) in [
            ("REDIS_IMAGE", REDIS_IMAGE),
            ("NATS_IMAGE", NATS_IMAGE),
            ("RABBITMQ_IMAGE", RABBITMQ_IMAGE),
        ] {
            assert!(
                script.contains(&format!("\n{var}={image}\n")),
                "{var}={image} is not what .ci/containers/build-images tags"
            );
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
