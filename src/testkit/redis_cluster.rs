//! A local Redis Cluster for tests: six `redis-server --cluster-enabled yes` nodes on free
//! ports (three masters, three replicas), joined with `redis-cli --cluster create
//! --cluster-replicas 1`, data in a private temporary directory ([`RedisCluster::start`]); or
//! the cluster named by `ORCHESTRA_TEST_REDIS_CLUSTER_URL` ([`shared_cluster_url`]).
//!
//! A [`RedisCluster`] stops its nodes by PID when dropped. The one a test binary shares
//! ([`shared_cluster_url`], started once) lives in a static, which Rust never drops: each of its
//! nodes is watched by a small shell loop that kills it (by PID) once the test process is gone.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::private_broker::{free_port, PrivateDir};

/// The environment variable naming an existing cluster (`redis+cluster://host:port,...`).
pub const CLUSTER_URL_ENV: &str = "ORCHESTRA_TEST_REDIS_CLUSTER_URL";

/// How long the nodes may take to listen, and the cluster to agree on its slots.
const STARTUP: Duration = Duration::from_secs(60);

/// The cluster's `cluster-node-timeout`: how long a master may be unreachable before its
/// replica is promoted. Small, so that a failover test takes seconds.
pub const NODE_TIMEOUT_MS: u64 = 2_000;

/// One node of a [`RedisCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    /// Its port on 127.0.0.1.
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl ClusterNode {
    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the node again after [`ClusterNode::kill`], with its port, its data and its
    /// `nodes.conf`: it rejoins the cluster (as a replica of whoever took its slots).
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.child = Some(spawn_node(&self.args));
        }
    }

    /// SIGKILL, by PID (a crash: nothing is flushed), and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A six-node Redis Cluster on free local ports, stopped (by PID) when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes, in the order they were started (the first three were made masters).
    pub nodes: Vec<ClusterNode>,
    dir: PrivateDir,
}

impl RedisCluster {
    /// Starts six nodes, joins them with one replica per master, and waits until every node
    /// says `cluster_state:ok`. Panics with the nodes' logs when that does not happen within a
    /// minute.
    pub fn start() -> RedisCluster {
        let dir = PrivateDir::new("redis-cluster");
        let mut nodes = Vec::new();
        let mut taken: Vec<u16> = Vec::new();
        for i in 0..6 {
            let port = cluster_port(&taken);
            taken.push(port);
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", node_dir.display()));
            let args = node_args(port, &node_dir);
            nodes.push(ClusterNode {
                port,
                child: Some(spawn_node(&args)),
                args,
            });
        }
        let cluster = RedisCluster { nodes, dir };
        let deadline = Instant::now() + STARTUP;
        for n in &cluster.nodes {
            while cli(n.port, &["PING"]).as_deref() != Some("PONG") {
                cluster.give_up_after(deadline, "a node did not answer PING");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok(deadline);
        cluster
    }

    /// Waits until every running node says `cluster_state:ok` with all 16384 slots served,
    /// and every running replica's link to its master is up and synchronised (so that a
    /// `WAIT 1` can be answered).
    pub fn wait_until_ok(&self, deadline: Instant) {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let info = cli(n.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                let replication = cli(n.port, &["INFO", "replication"]).unwrap_or_default();
                let synced = !replication.contains("role:slave")
                    || (replication.contains("master_link_status:up")
                        && replication.contains("master_sync_in_progress:0"));
                if info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && synced
                {
                    break;
                }
                self.give_up_after(deadline, "the cluster did not reach cluster_state:ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn give_up_after(&self, deadline: Instant, what: &str) {
        if Instant::now() > deadline {
            let logs: Vec<String> = (0..self.nodes.len())
                .map(|i| {
                    let log = self.dir.path().join(format!("node{i}/redis.log"));
                    format!(
                        "--- node {i}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })
                .collect();
            panic!("{what} within {STARTUP:?}\n{}", logs.join("\n"));
        }
    }

    /// `redis+cluster://127.0.0.1:<port>,...` naming every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The index in [`RedisCluster::nodes`] of the master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        self.serving(key)
            .unwrap_or_else(|| panic!("no live master serves the slot of {key:?}"))
    }

    /// The index of the live master that serves `key`'s slot, if there is one now (there is
    /// none between a master's failure and its replica's promotion).
    pub fn serving(&self, key: &str) -> Option<usize> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node");
        let slot: u16 = cli(live.port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = cli(live.port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| p.parse().ok())
                    .expect("a node address");
                return self.nodes.iter().position(|n| n.port == port);
            }
        }
        None
    }

    /// Whether the node at `index` is a master now (asked of another running node).
    pub fn is_master(&self, index: usize) -> bool {
        let port = self.nodes[index].port;
        let Some(asker) = self
            .nodes
            .iter()
            .find(|n| n.child.is_some() && n.port != port)
        else {
            return false;
        };
        cli(asker.port, &["CLUSTER", "NODES"])
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2
                    && f[1].starts_with(&format!("127.0.0.1:{port}@"))
                    && f[2].contains("master")
                    && !f[2].contains("fail")
            })
    }

    /// Keeps the nodes running after the process ends unless a watchdog stops them: used for
    /// the shared cluster, which lives in a static.
    fn watch_until_process_exits(&self) {
        let me = std::process::id();
        let pids: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.pid())
            .map(|p| p.to_string())
            .collect();
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {} 2>/dev/null; rm -rf '{}'",
            pids.join(" "),
            self.dir.path().display()
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// A free local port whose cluster bus port (port + 10000) is free too, and neither of which
/// is one of `taken`'s or their bus ports.
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let port = free_port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        let clash = taken
            .iter()
            .any(|&t| [t, t + 10_000].contains(&port) || [t, t + 10_000].contains(&bus));
        if !clash && std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

fn spawn_node(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"))
}

/// The arguments of a cluster node on 127.0.0.1:`port` working in `dir` (no snapshot, an
/// append-only file as a cluster in production would have, a short node timeout).
fn node_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.to_string_lossy(),
        "--logfile",
        &dir.join("redis.log").to_string_lossy(),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &dir.join("nodes.conf").to_string_lossy(),
        "--cluster-node-timeout",
        &NODE_TIMEOUT_MS.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `redis-cli -p port args...`, its output trimmed; `None` when it fails.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The URL of the cluster the tests of this process share: `ORCHESTRA_TEST_REDIS_CLUSTER_URL`
/// when set, else a [`RedisCluster`] started on first use (and stopped when the process ends).
pub fn shared_cluster_url() -> String {
    if let Ok(url) = std::env::var(CLUSTER_URL_ENV) {
        if !url.trim().is_empty() {
            return url;
        }
    }
    static SHARED: OnceLock<RedisCluster> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let c = RedisCluster::start();
            c.watch_until_process_exits();
            c
        })
        .url()
}
