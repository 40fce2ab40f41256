//! A local 3-node RabbitMQ cluster for tests ([`RabbitCluster`]), booted from the installed
//! binaries, or the cluster named by `ORCHESTRA_TEST_AMQP_CLUSTER_URL` ([`cluster_url`]).
//!
//! Each node runs `rabbitmq-server` (the script the packaged wrapper calls, so that it keeps this
//! environment) with a name, ports, a data directory and a log directory of its own:
//! `orch<i>_<port>@localhost`, its AMQP port and its Erlang distribution port free local ports,
//! an empty configuration file, an empty environment file (the machine's
//! `/etc/rabbitmq/rabbitmq-env.conf` may name the machine's own node), no plugin, and `HOME`
//! holding an `.erlang.cookie` (mode 400) that only the three nodes share. Nodes 2 and 3 join
//! node 1 (`rabbitmqctl -n orch2_… stop_app; join_cluster orch1_…; start_app`): the cluster
//! never includes the machine's own node, which has another cookie.
//!
//! One cluster per test binary ([`RabbitCluster::shared`]): RabbitMQ boots slowly (about 20 s
//! for three nodes on two cores). The cluster lives in a static, which Rust never drops, so a
//! reaper process (`sh`, waiting for its stdin to close, which happens when the test binary
//! exits however it exits) kills every node's process group by PID and deletes the cluster's
//! directory. A node-loss test boots a cluster of its own ([`RabbitCluster::boot`], stopped by
//! PID when dropped) and kills one of its nodes ([`RabbitCluster::kill_node`]).

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::brokers::free_port;
use super::private_broker::{kill_group, spawn_logged};

/// The variable naming an external cluster (a URL with every node:
/// `amqp://user:pass@h1:5672,h2:5672,h3:5672/vhost`); `queue_type=quorum` is added when the URL
/// does not name a queue type.
pub const CLUSTER_URL_VAR: &str = "ORCHESTRA_TEST_AMQP_CLUSTER_URL";

/// Nodes in the cluster.
pub const NODES: usize = 3;

/// How long one node may take to accept AMQP connections after it was started.
const NODE_STARTUP: Duration = Duration::from_secs(120);

/// How long one `rabbitmqctl` command may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(90);

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// The URL of the cluster the cluster tests use: [`CLUSTER_URL_VAR`] when set, else the
/// [`shared`](RabbitCluster::shared) local cluster's. Either way with `queue_type=quorum` unless
/// the URL names a queue type.
pub fn cluster_url() -> String {
    static ANNOUNCED: std::sync::Once = std::sync::Once::new();
    let (url, from) = match std::env::var(CLUSTER_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => (url.trim().to_string(), CLUSTER_URL_VAR),
        _ => (RabbitCluster::shared().url(), "the harness (3 local nodes)"),
    };
    let url = with_quorum(&url);
    ANNOUNCED.call_once(|| {
        eprintln!(
            "test broker: RabbitMQ cluster {} from {from}",
            crate::redact::redact_url(&url)
        )
    });
    url
}

/// `url` with `queue_type=quorum` added, unless it names a queue type already.
pub fn with_quorum(url: &str) -> String {
    if url.contains("queue_type=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&queue_type=quorum")
    } else {
        format!("{url}?queue_type=quorum")
    }
}

/// One node: how to start it, and its process while it runs.
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    fn new(index: usize, root: &Path, cookie: &str) -> Node {
        let port = free_port();
        let name = format!("orch{index}_{port}@localhost");
        let dir = root.join(format!("node{index}"));
        let home = dir.join("home");
        std::fs::create_dir_all(&home)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", home.display()));
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            path.display().to_string()
        };
        let cookie_path = home.join(".erlang.cookie");
        std::fs::write(&cookie_path, cookie)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", cookie_path.display()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o400))
                .unwrap_or_else(|e| panic!("cannot protect {}: {e}", cookie_path.display()));
        }
        let at = |name: &str| dir.join(name).display().to_string();
        let env = [
            ("HOME", home.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE", file("rabbitmq-env.conf", "")),
            ("RABBITMQ_CONFIG_FILE", file("rabbitmq.conf", "")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", at("advanced.config")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                file("enabled_plugins", "[]."),
            ),
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", free_port().to_string()),
            ("RABBITMQ_MNESIA_BASE", at("mnesia")),
            ("RABBITMQ_LOG_BASE", at("log")),
            ("RABBITMQ_PID_FILE", at("rabbitmq.pid")),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_string()),
            ("ERL_CRASH_DUMP", "/dev/null".to_string()),
        ];
        let env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Node {
            name,
            port,
            dir,
            env,
            child: None,
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Starts the node's process in a process group of its own and records the group's id in
    /// `pid` (for the reaper). Does not wait.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut command = Command::new(SERVER);
        // Its own directory as working directory: Mnesia writes its core dumps there.
        command
            .envs(self.env.iter().cloned())
            .current_dir(&self.dir);
        let child = spawn_logged(command, &self.dir.join("server.log"), SERVER);
        std::fs::write(self.dir.join("pid"), child.id().to_string())
            .unwrap_or_else(|e| panic!("cannot record the node's pid: {e}"));
        self.child = Some(child);
    }

    /// Waits until the node accepts AMQP connections (panics if it exits or takes too long).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + NODE_STARTUP;
        loop {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "RabbitMQ node {} exited ({status}):\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not listen on {} within {NODE_STARTUP:?}:\n{}",
                self.name,
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `rabbitmqctl -n <this node> args...`, panicking with its output when it fails.
    fn ctl(&self, args: &[&str]) -> String {
        let mut command = Command::new(CTL);
        command
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .envs(
                self.env
                    .iter()
                    .filter(|(k, _)| {
                        k == "HOME" || k == "RABBITMQ_CONF_ENV_FILE" || k == "ERL_EPMD_ADDRESS"
                    })
                    .cloned(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {CTL}: {e}"));
        let deadline = Instant::now() + CTL_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "rabbitmqctl -n {} {args:?} took more than {CTL_TIMEOUT:?}",
                        self.name
                    );
                }
            }
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("rabbitmqctl output: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed ({}):\n{text}\nnode log:\n{}",
            self.name,
            out.status,
            self.log()
        );
        text
    }

    /// SIGKILL to the node's process group: no shutdown, nothing flushed.
    fn kill(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Three RabbitMQ nodes clustered together, started by this process. See the module
/// documentation.
#[derive(Debug)]
pub struct RabbitCluster {
    nodes: Mutex<Vec<Node>>,
    ports: Vec<u16>,
    root: PathBuf,
    /// Kills the nodes and deletes `root` when the test binary exits (its stdin closes).
    _reaper: Option<ChildStdin>,
}

impl RabbitCluster {
    /// The cluster of this test binary, booted on first use (about 20–60 s).
    pub fn shared() -> &'static RabbitCluster {
        static SHARED: OnceLock<RabbitCluster> = OnceLock::new();
        SHARED.get_or_init(RabbitCluster::boot)
    }

    /// Boots [`NODES`] nodes at once, then joins nodes 2.. to node 1, one at a time.
    pub fn boot() -> RabbitCluster {
        assert!(
            Path::new(SERVER).exists() && Path::new(CTL).exists(),
            "the RabbitMQ cluster tests need RabbitMQ installed ({SERVER} and {CTL}), or a cluster in {CLUSTER_URL_VAR}"
        );
        let started = Instant::now();
        let root = std::env::temp_dir().join(format!(
            "orchestra-rabbit-cluster-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        ));
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let cookie = format!(
            "ORCHESTRATEST{}",
            uuid::Uuid::new_v4().simple().to_string().to_uppercase()
        );
        let mut nodes: Vec<Node> = (1..=NODES).map(|i| Node::new(i, &root, &cookie)).collect();
        let reaper = spawn_reaper(&root);
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_listening();
        }
        let seed = nodes[0].name.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &seed]);
            node.ctl(&["start_app"]);
        }
        nodes[0].ctl(&[
            "await_online_nodes",
            &NODES.to_string(),
            "--timeout",
            "60000",
        ]);
        let ports = nodes.iter().map(|n| n.port).collect();
        eprintln!(
            "test broker: booted a {NODES}-node RabbitMQ cluster ({}) in {:.1?}",
            nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed()
        );
        RabbitCluster {
            nodes: Mutex::new(nodes),
            ports,
            root,
            _reaper: reaper,
        }
    }

    /// `amqp://guest:guest@127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>/%2f` (no queue type).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("amqp://guest:guest@{}/%2f", hosts.join(","))
    }

    /// The AMQP port of each node, node 1 first.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The Erlang node names, node 1 first.
    pub fn node_names(&self) -> Vec<String> {
        self.lock().iter().map(|n| n.name.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGKILL to node `index` (0-based): the node vanishes without a shutdown.
    pub fn kill_node(&self, index: usize) {
        self.lock()[index].kill();
    }

    /// Starts node `index` again after [`kill_node`](RabbitCluster::kill_node) (it rejoins the
    /// cluster from its own data) and waits until it runs and every node is online. Blocking:
    /// call it from `spawn_blocking` in async code.
    pub fn restart_node(&self, index: usize) {
        let mut nodes = self.lock();
        nodes[index].spawn();
        nodes[index].wait_listening();
        nodes[index].ctl(&["await_startup", "--timeout", "60"]);
        nodes[index].ctl(&[
            "await_online_nodes",
            &NODES.to_string(),
            "--timeout",
            "60000",
        ]);
    }

    /// `rabbitmqctl` run against node `index` (0-based); panics when it fails.
    pub fn ctl(&self, index: usize, args: &[&str]) -> String {
        self.lock()[index].ctl(args)
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in self.lock().iter_mut() {
            if node.child.is_some() {
                // A clean stop first (bounded); the kill below covers a node that ignores it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    node.ctl(&["stop"]);
                }));
            }
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A process that waits for its stdin to close (this process exited, however it exited), then
/// kills the process group recorded in each node's `pid` file and deletes `root`. Without it, a
/// static cluster would outlive the test binary.
fn spawn_reaper(root: &Path) -> Option<ChildStdin> {
    // `env kill`: the external kill (dash's builtin takes neither `--` nor a negative pid).
    let script = r#"cat >/dev/null
for f in "$0"/node*/pid; do
  [ -f "$f" ] && env kill -s KILL -- "-$(cat "$f")" 2>/dev/null
done
sleep 1
rm -rf "$0""#;
    match Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(mut child) => child.stdin.take(),
        Err(e) => {
            eprintln!(
                "no reaper for the RabbitMQ cluster (its nodes may outlive this test binary): {e}"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_is_added_unless_a_queue_type_is_named() {
        assert_eq!(
            with_quorum("amqp://h1:1,h2:2/%2f"),
            "amqp://h1:1,h2:2/%2f?queue_type=quorum"
        );
        assert_eq!(
            with_quorum("amqp://h/v?heartbeat=5"),
            "amqp://h/v?heartbeat=5&queue_type=quorum"
        );
        assert_eq!(
            with_quorum("amqp://h/v?queue_type=classic"),
            "amqp://h/v?queue_type=classic"
        );
    }
}
