//! A local NATS cluster for tests (features `testkit` and `nats`): [`NatsCluster`] starts
//! three `nats-server -js` nodes from the installed binary (or [`SERVER_VAR`]'s), on free ports, each with its own
//! store directory under one temporary directory, routed to each other under one cluster
//! name, and stops them by PID when dropped. [`cluster_url`] gives every test of a binary the
//! same cluster (or `ORCHESTRA_TEST_NATS_CLUSTER_URL`).
//!
//! A cluster counts as up when a stream with three replicas can be created on it: the
//! JetStream meta group has a leader and every node has joined.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::private_broker::{free_port, kill_group, spawn_logged, PrivateDir};

/// The variable naming an existing cluster to use instead of starting one.
pub const CLUSTER_URL_VAR: &str = "ORCHESTRA_TEST_NATS_CLUSTER_URL";

/// How long a cluster (or a restarted node) may take until JetStream answers with every node.
const READY: Duration = Duration::from_secs(60);

/// The name every node of a test cluster gives its cluster.
const CLUSTER_NAME: &str = "orch_test";

/// The variable naming the `nats-server` binary the clusters run (`.ci/nats-server` installs a
/// release without the replicated compare-and-set race of 2.9.10, Debian bookworm's); unset,
/// the one on `PATH`.
pub const SERVER_VAR: &str = "ORCHESTRA_TEST_NATS_SERVER";

fn server_binary() -> String {
    std::env::var(SERVER_VAR)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server".into())
}

/// One node: its name (`n0`, `n1`, ...), ports, arguments and process.
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut command = Command::new(server_binary());
        command.args(&self.args);
        self.child = Some(spawn_logged(command, &self.log, "nats-server"));
    }

    fn kill(&mut self) {
        kill_group(&mut self.child);
    }

    async fn wait_listening(&mut self, deadline: Instant) {
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "nats-server {} exited ({status}): {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen on {} within {READY:?}",
                self.name,
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A local cluster of `nats-server` nodes with JetStream; every node is killed, and the
/// directory deleted, when it is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: PrivateDir,
}

impl NatsCluster {
    /// Starts `size` nodes (3 or 5 make sense for JetStream) and waits until a stream with
    /// `size.min(5)` replicas can be created.
    pub async fn start(size: usize) -> NatsCluster {
        assert!(size >= 1, "a cluster needs a node");
        let dir = PrivateDir::new("nats-cluster");
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster_port))| {
                let name = format!("n{i}");
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &(_, cp))| format!("nats://127.0.0.1:{cp}"))
                    .collect();
                let store = dir.path().join(&name);
                let args = vec![
                    "-a".to_string(),
                    "127.0.0.1".to_string(),
                    "-p".to_string(),
                    port.to_string(),
                    "-js".to_string(),
                    "-sd".to_string(),
                    store.display().to_string(),
                    "--server_name".to_string(),
                    name.clone(),
                    "--cluster_name".to_string(),
                    CLUSTER_NAME.to_string(),
                    "--cluster".to_string(),
                    format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes".to_string(),
                    routes.join(","),
                ];
                Node {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    port,
                    args,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { nodes, dir };
        for node in &mut cluster.nodes {
            node.spawn();
        }
        let deadline = Instant::now() + READY;
        for node in &mut cluster.nodes {
            node.wait_listening(deadline).await;
        }
        cluster.wait_ready().await;
        cluster
    }

    /// The URL of every node, `nats://127.0.0.1:p0,127.0.0.1:p1,...`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("nats://{}", hosts.join(","))
    }

    /// The number of nodes.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The index of the node whose `--server_name` is `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// What node `i` has logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The directory holding every node's store and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGKILL to node `i`: no shutdown, no leadership handed over.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (same ports, same store) and waits until it listens.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].spawn();
        self.nodes[i].wait_listening(Instant::now() + READY).await;
    }

    /// The process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// The node (index) leading stream `stream`, asked of any node that answers.
    pub async fn leader_of(&self, stream: &str) -> Option<usize> {
        let client = self.client().await.ok()?;
        let js = jetstream::new(client);
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        self.node_named(&leader)
    }

    /// Waits until a stream with as many replicas as there are nodes (at most 5) can be
    /// created (and deletes it): the meta group has a leader and every node takes part.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + READY;
        let replicas = self.nodes.len().min(5);
        loop {
            let last = match self.probe(replicas).await {
                Ok(()) => return,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "the NATS cluster in {} did not take a stream with {replicas} replicas within {READY:?}: {last}\n{}",
                self.dir.path().display(),
                (0..self.nodes.len()).map(|i| self.log(i)).collect::<Vec<_>>().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A plain client of the cluster (any node that answers).
    async fn client(&self) -> Result<async_nats::Client, String> {
        let servers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(servers)
            .await
            .map_err(|e| e.to_string())
    }

    async fn probe(&self, replicas: usize) -> Result<(), String> {
        let client = self.client().await?;
        let js = jetstream::new(client);
        let name = format!("ORCH_CLUSTER_PROBE_{}", uuid::Uuid::new_v4().simple());
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("orch_probe.{name}")],
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        let _ = js.delete_stream(&name).await;
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// The cluster every test of this binary shares: `ORCHESTRA_TEST_NATS_CLUSTER_URL` when set,
/// else three local nodes started once (kept until the binary exits, then killed by a small
/// reaper process that waits for the binary's end to close its stdin).
pub async fn cluster_url() -> String {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| async {
        if let Ok(url) = std::env::var(CLUSTER_URL_VAR) {
            if !url.trim().is_empty() {
                eprintln!(
                    "test broker: NATS cluster {} from {CLUSTER_URL_VAR}",
                    crate::redact_url(&url)
                );
                return url.trim().to_string();
            }
        }
        let cluster = NatsCluster::start(3).await;
        let url = cluster.url();
        eprintln!(
            "test broker: NATS cluster of 3 local nodes at {url} (in {})",
            cluster.dir().display()
        );
        keep_until_exit(cluster);
        url
    })
    .await
    .clone()
}

/// A static is never dropped: the nodes are killed, and their directory removed, by a child
/// that waits for its stdin to close (the test binary's exit, however it exits).
fn keep_until_exit(cluster: NatsCluster) {
    static KEPT: Mutex<Vec<(NatsCluster, Option<Child>)>> = Mutex::new(Vec::new());
    let pids: Vec<String> = cluster.pids().iter().map(|p| format!("-{p}")).collect();
    let reaper = Command::new("sh")
        .arg("-c")
        // `kill -KILL -PGID ...` (no `--`: dash's builtin refuses it).
        .arg(r#"cat >/dev/null; kill -KILL $1 2>/dev/null; sleep 1; rm -rf "$0""#)
        .arg(cluster.dir().display().to_string())
        .arg(pids.join(" "))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok();
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((cluster, reaper));
}
