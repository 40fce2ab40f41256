//! Cleanup of everything a test created under its prefix, one function per broker, shared by
//! the backend test files. Nothing here calls FLUSHALL, FLUSHDB or deletes another prefix.
#![allow(dead_code)]

use agent_orchestra::testkit::harness::{broker_url, BrokerKind};

/// Deletes every key starting with `prefix` on the shared test Redis.
#[cfg(feature = "redis")]
pub async fn redis(prefix: &str) {
    redis_at(&broker_url(BrokerKind::Redis).await, prefix).await;
}

/// Deletes every Redis key starting with `prefix` on the server at `url` (SCAN + UNLINK).
#[cfg(feature = "redis")]
pub async fn redis_at(url: &str, prefix: &str) {
    assert!(!prefix.is_empty(), "cleanup needs a prefix");
    let mut con = redis::Client::open(url)
        .expect("test Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connection to the test Redis");
    let escaped: String = prefix
        .chars()
        .flat_map(|c| match c {
            '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    let pattern = format!("{escaped}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut con)
                .await
                .expect("UNLINK");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Deletes the JetStream streams (work queues, KV buckets) the prefix created on the shared
/// test server.
#[cfg(feature = "nats")]
pub async fn nats(prefix: &str) {
    nats_at(&broker_url(BrokerKind::Nats).await, prefix).await;
}

/// Deletes the JetStream streams whose names start with the prefix on the server at `url`.
#[cfg(feature = "nats")]
pub async fn nats_at(url: &str, prefix: &str) {
    use futures::StreamExt;
    let client = async_nats::connect(url.trim_start_matches("nats://"))
        .await
        .expect("connect for cleanup");
    let js = async_nats::jetstream::new(client);
    // The backend maps anything outside [A-Za-z0-9_-] to '_' in stream names.
    let p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    assert!(!p.is_empty(), "refusing to clean up an empty prefix");
    let kv = format!("KV_{p}");
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for name in names {
        if name.starts_with(&p) || name.starts_with(&kv) {
            js.delete_stream(&name)
                .await
                .unwrap_or_else(|e| panic!("cannot delete stream {name}: {e}"));
        }
    }
}

/// Deletes every RabbitMQ queue starting with `prefix` (listed with `rabbitmqctl`), and the
/// prefix's events exchange.
#[cfg(feature = "rabbitmq")]
pub async fn rabbitmq(prefix: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    use lapin::{Connection, ConnectionProperties};
    assert!(!prefix.is_empty(), "cleanup needs a prefix");
    let listed = tokio::task::spawn_blocking(|| {
        std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "--no-table-headers", "name"])
            .output()
    })
    .await
    .expect("rabbitmqctl task");
    let mut names: Vec<String> = match listed {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|n| n.starts_with(prefix))
            .collect(),
        _ => Vec::new(),
    };
    names.push(format!("{prefix}registry"));
    names.push(format!("{prefix}locks"));
    names.push(format!("{prefix}registry.snapshots"));
    let url = broker_url(BrokerKind::Amqp).await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("cleanup connection");
    for name in &names {
        // One channel per delete: a refused delete closes its channel.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(
                format!("{prefix}events").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "cleaned up".into()).await;
}
