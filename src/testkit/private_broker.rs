//! Broker processes a test starts for itself on a free local port ([`PrivateBroker`]): Redis,
//! NATS and RabbitMQ, stopped and started again with the same port and storage. Re-exported by
//! [`brokers`](super::brokers), whose shared tests take them as a
//! [`BrokerControl`](super::brokers::BrokerControl).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::brokers::BrokerControl;

/// How long a private Redis or NATS may take to accept connections after it was started.
const STARTUP: Duration = Duration::from_secs(30);

/// How long a private RabbitMQ may take to accept connections (it boots an Erlang node).
const RABBITMQ_STARTUP: Duration = Duration::from_secs(120);

/// A free local TCP port (bound, then released, so the broker can take it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free local port: {e}"))
}

/// Starts `command` in a process group of its own (so that a kill also reaches what a launcher
/// script started), stdin closed, stdout and stderr appended to `log`; panics naming `what` if
/// it cannot.
pub(crate) fn spawn_logged(mut command: Command, log: &Path, what: &str) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} (is it installed?): {e}"))
}

/// SIGKILL to the process group of `child` (started by [`spawn_logged`]), then reaps it: no
/// shutdown, nothing flushed.
pub(crate) fn kill_group(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        #[cfg(unix)]
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A directory of its own under the system's temporary directory, deleted when dropped.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Creates `<tmp>/orchestra-<what>-<pid>-<n>` (a fresh, empty directory).
    pub fn new(what: &str) -> PrivateDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "orchestra-{what}-{}-{n}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        PrivateDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A broker process this test started on a free local port, with a directory of its own (its
/// storage and its log); killed (with every process it started), and its directory deleted,
/// when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    startup: Duration,
    port: u16,
    url: String,
    dir: PrivateDir,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts `program` with `args(port, dir)` on a free `port`, logging to `dir/broker.log`,
    /// and waits until the port accepts connections. `url(port)` is the URL clients use.
    pub async fn launch(
        program: &str,
        args: impl FnOnce(u16, &Path) -> Vec<String>,
        url: impl FnOnce(u16) -> String,
    ) -> PrivateBroker {
        PrivateBroker::launch_with(
            program,
            |port, dir| (args(port, dir), Vec::new()),
            STARTUP,
            url,
        )
        .await
    }

    /// [`launch`](PrivateBroker::launch) for a broker configured by its environment too:
    /// `setup(port, dir)` returns the arguments and the environment variables, and may write
    /// files into `dir`. The port must accept connections within `startup`.
    pub async fn launch_with(
        program: &str,
        setup: impl FnOnce(u16, &Path) -> (Vec<String>, Vec<(String, String)>),
        startup: Duration,
        url: impl FnOnce(u16) -> String,
    ) -> PrivateBroker {
        let port = free_port();
        let name = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "broker".to_string());
        let dir = PrivateDir::new(&name);
        let (args, env) = setup(port, dir.path());
        let mut broker = PrivateBroker {
            program: program.to_string(),
            args,
            env,
            startup,
            port,
            url: url(port),
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    /// A `redis-server` on 127.0.0.1 that saves no snapshot ([`redis_args`]), with `extra`
    /// arguments: [`REDIS_DURABLE`] for one that loses nothing it acknowledged when killed.
    pub async fn redis(extra: &[&str]) -> PrivateBroker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        PrivateBroker::launch(
            "redis-server",
            |port, dir| {
                let mut args = redis_args(port, dir);
                args.extend(extra);
                args
            },
            |port| format!("redis://127.0.0.1:{port}/0"),
        )
        .await
    }

    /// A `nats-server` on 127.0.0.1 with `extra` arguments (JetStream only if they ask for it).
    pub async fn nats(extra: &[&str]) -> PrivateBroker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        PrivateBroker::launch(
            "nats-server",
            |port, _| {
                let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string()]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                args.extend(extra);
                args
            },
            |port| format!("nats://127.0.0.1:{port}"),
        )
        .await
    }

    /// A `nats-server` on 127.0.0.1 with JetStream storing in its directory (which a kill
    /// keeps); `extra` are more arguments.
    pub async fn nats_jetstream(extra: &[&str]) -> PrivateBroker {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        PrivateBroker::launch(
            "nats-server",
            |port, dir| {
                let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                args.push("-sd".to_string());
                args.push(dir.join("jetstream").display().to_string());
                args.extend(extra);
                args
            },
            |port| format!("nats://127.0.0.1:{port}"),
        )
        .await
    }

    /// A RabbitMQ node of its own (`rabbit_<port>@localhost`, its database in its directory, no
    /// plugin, no configuration file, a cookie of its own) listening for AMQP on 127.0.0.1,
    /// reached as `guest`/`guest`. Booting takes seconds (an Erlang node), up to
    /// two minutes on a busy machine. Needs epmd, which the node starts if it is not
    /// running.
    pub async fn rabbitmq() -> PrivateBroker {
        // The packaged `rabbitmq-server` is a wrapper that switches to the `rabbitmq` user,
        // which would drop this environment: run the script it wraps when it is there.
        let direct = "/usr/lib/rabbitmq/bin/rabbitmq-server";
        let program = if Path::new(direct).exists() {
            direct
        } else {
            "rabbitmq-server"
        };
        PrivateBroker::launch_with(
            program,
            |port, dir| {
                let file = |name: &str, text: &str| {
                    let path = dir.join(name);
                    std::fs::write(&path, text)
                        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                    path.display().to_string()
                };
                let at = |name: &str| dir.join(name).display().to_string();
                let env = [
                    ("HOME", dir.display().to_string()),
                    // An empty env file: the machine's may name the shared node.
                    ("RABBITMQ_CONF_ENV_FILE", file("rabbitmq-env.conf", "")),
                    (
                        "RABBITMQ_ENABLED_PLUGINS_FILE",
                        file("enabled_plugins", "[]."),
                    ),
                    ("RABBITMQ_CONFIG_FILE", at("rabbitmq")),
                    ("RABBITMQ_ADVANCED_CONFIG_FILE", at("advanced.config")),
                    ("RABBITMQ_NODENAME", format!("rabbit_{port}@localhost")),
                    ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
                    ("RABBITMQ_NODE_PORT", port.to_string()),
                    ("RABBITMQ_DIST_PORT", free_port().to_string()),
                    ("RABBITMQ_MNESIA_BASE", at("mnesia")),
                    ("RABBITMQ_LOG_BASE", at("log")),
                    ("RABBITMQ_PID_FILE", at("rabbitmq.pid")),
                    ("ERL_EPMD_ADDRESS", "127.0.0.1".to_string()),
                ];
                let env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                (Vec::new(), env)
            },
            RABBITMQ_STARTUP,
            |port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .await
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory (storage, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Starts the process (again) and waits until the port accepts connections.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.program);
        let mut command = Command::new(&self.program);
        command.args(&self.args).envs(self.env.iter().cloned());
        let log = self.dir.path().join("broker.log");
        self.child = Some(spawn_logged(command, &log, &self.program));
        let startup = self.startup;
        let deadline = Instant::now() + startup;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("{} exited ({status}): {}", self.program, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {} within {startup:?}: {}",
                self.program,
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to the broker and every process it started: no shutdown, no final save.
    pub fn kill(&mut self) {
        kill_group(&mut self.child);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[async_trait]
impl BrokerControl for PrivateBroker {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn stop(&mut self) {
        self.kill();
    }

    async fn start(&mut self) {
        self.spawn().await;
    }
}

/// `redis-server` arguments that make it write every change to its append-only file before
/// answering, so a kill loses nothing it acknowledged.
pub const REDIS_DURABLE: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

/// The arguments of a `redis-server` on 127.0.0.1:`port` working in `dir` that saves no
/// snapshot.
pub fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.to_string_lossy(),
        "--save",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
