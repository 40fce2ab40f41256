//! The Redis backend (feature `redis`): [`RedisBus`], [`RedisRegistry`] and
//! [`RedisLockManager`] over one self-reconnecting multiplexed connection, plus a dedicated
//! pub/sub connection for subscriptions.
//!
//! URLs: `redis://[user][:password]@host[:port][/db]` and `rediss://...` (TLS), with optional
//! query parameters `tls_ca_file` (PEM of the CAs to trust instead of the system's, e.g. for a
//! self-signed server), `tls_cert_file` + `tls_key_file` (mutual TLS) and `protocol`
//! (`resp2`/`resp3`); for a Redis Cluster, `redis+cluster://[user][:password]@host:port[,host:port...]`
//! and `rediss+cluster://...`, naming seed nodes (the same query parameters apply). The key layout, the Lua scripts, what is atomic, the round trips per
//! operation and how keys map to Redis Cluster slots are in docs/backends/redis.md.
//!
//! ```no_run
//! # async fn demo() -> agent_orchestra::Result<()> {
//! use agent_orchestra::{connect, BackendUrls, ConnectOptions};
//! let b = connect(&BackendUrls::all("redis://127.0.0.1:6379/0"), &ConnectOptions::default()).await?;
//! assert_eq!(b.registry.backend(), "redis");
//! # Ok(()) }
//! ```

mod bus;
mod codec;
mod conn;
mod control;
mod keys;
mod lock;
mod migrate;
mod pubsub;
mod records;
mod registry;
mod schedules;
mod scripts;
mod tasks;

use std::sync::Arc;

pub use bus::RedisBus;
pub use lock::RedisLockManager;
pub use registry::RedisRegistry;
pub use tasks::RedisTaskQueue;

use crate::bundle::{ConnectOptions, Parts, Roles};
use crate::error::Result;

/// Opens the requested roles on one shared connection to the Redis server named by `url`.
///
/// Fails fast with the real cause: a temporary error when the server does not answer or
/// refuses the connection, a permanent one for a wrong password or a bad URL (the password is
/// never shown). Every script is loaded once here.
pub async fn open(url: &url::Url, roles: &Roles, opts: &ConnectOptions) -> Result<Parts> {
    let target = conn::Target::parse(url)?;
    let conn = conn::Conn::open(target, opts).await?;
    if roles.registry {
        // A namespace of the global-index layout (before 2026-12-07) is moved first.
        migrate::migrate_global_indexes(&conn).await?;
    }
    let bus = roles
        .bus
        .then(|| Arc::new(RedisBus::new(conn.clone(), opts.max_deliveries)));
    let registry = roles
        .registry
        .then(|| Arc::new(RedisRegistry::new(conn.clone())));
    let tasks = match (&bus, &registry) {
        (Some(b), Some(r)) => {
            Some(Arc::new(RedisTaskQueue::new(conn.clone(), b.clone(), r.clone())) as _)
        }
        _ => None,
    };
    Ok(Parts {
        bus: bus.map(|b| b as _),
        registry: registry.map(|r| r as _),
        locks: roles
            .locks
            .then(|| Arc::new(RedisLockManager::new(conn.clone())) as _),
        tasks,
    })
}

/// [`crate::connect::drop_namespace`] on Redis: every key of the four families this backend
/// writes under the prefix (`q:{…}`, `task_registry:`, `orchestra:`, `lock:{…}`), found with
/// `SCAN MATCH` (incremental, but it walks the whole keyspace of the server once per family)
/// and deleted with `UNLINK`. On a Redis Cluster, on every master (`CLUSTER NODES`), each key
/// unlinked through its own slot.
pub async fn drop_namespace(url: &url::Url, opts: &ConnectOptions) -> Result<()> {
    let conn = conn::Conn::open(conn::Target::parse(url)?, opts).await?;
    let mut con = conn.manager();
    let nodes: Vec<Option<(String, u16)>> = match &con {
        conn::Link::Single(_) => vec![None],
        conn::Link::Cluster(_) => {
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut con)
                .await
                .map_err(|e| conn.error("CLUSTER NODES", e))?;
            masters(&text).into_iter().map(Some).collect()
        }
    };
    for node in nodes {
        for pattern in keys::families(&keys::glob_escape(&opts.prefix)) {
            let mut cursor: u64 = 0;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let reply: redis::Value = match (&mut con, &node) {
                    (conn::Link::Cluster(c), Some((host, port))) => {
                        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                        c.route_command(
                            scan,
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                host: host.clone(),
                                port: *port,
                            }),
                        )
                        .await
                    }
                    (c, _) => scan.query_async(c).await,
                }
                .map_err(|e| conn.error("SCAN the prefix's keys", e))?;
                let (next, found): (u64, Vec<String>) = redis::from_redis_value(reply)
                    .map_err(|e| conn.error("SCAN the prefix's keys", e.into()))?;
                if !found.is_empty() {
                    let mut pipe = redis::pipe();
                    if conn.is_cluster() {
                        // Keys of several slots: one UNLINK each.
                        for k in &found {
                            pipe.cmd("UNLINK").arg(k);
                        }
                    } else {
                        pipe.cmd("UNLINK").arg(&found);
                    }
                    let _: Vec<i64> = pipe
                        .query_async(&mut con)
                        .await
                        .map_err(|e| conn.error("UNLINK the prefix's keys", e))?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
    }
    Ok(())
}

/// The `host:port` of every master that is not failing, from `CLUSTER NODES`.
fn masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_id, addr, flags) = (f.next()?, f.next()?, f.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let addr = addr.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let text = "07c3 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
                    67ed 127.0.0.1:30002@40002 master - 0 0 2 connected 5461-10922\n\
                    292f 127.0.0.1:30003@40003 master,fail - 0 0 3 connected\n\
                    6ec2 127.0.0.1:30004@40004 slave 07c3 0 0 1 connected\n";
        assert_eq!(
            super::masters(text),
            vec![
                ("127.0.0.1".to_string(), 30001),
                ("127.0.0.1".to_string(), 30002)
            ]
        );
    }
}
