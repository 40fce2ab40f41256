//! The lab's pub/sub, kept for events: every subscriber gets every event, and an event published
//! while nobody listens is simply gone (which is why work travels on queues, not here).
//!
//! `cargo run --example pubsub` (memory), or with `ORCHESTRA_URL=redis://127.0.0.1:6379`.

use std::time::Duration;

use agent_orchestra::config::Config;
use agent_orchestra::connect::drop_namespace;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = Config::load(None)?.or_url("memory://");
    // On a shared broker, a namespace of our own, deleted at the end.
    let scratch = !config.is_memory() && config.prefix.is_empty();
    if scratch {
        config.prefix = format!("example_{:08x}_", rand::random::<u32>());
    }
    let bus = config.connect().await?.bus;

    // Nobody listens yet: this event reaches no one.
    bus.publish("task_requests", br#"{"task_id": "task_000"}"#)
        .await?;

    let mut subscribers = [
        bus.subscribe("task_requests").await?,
        bus.subscribe("task_requests").await?,
    ];
    for id in ["task_001", "task_002", "task_003"] {
        let event = serde_json::json!({"task_id": id, "payload": "research quantum computing"});
        bus.publish("task_requests", event.to_string().as_bytes())
            .await?;
    }

    for (name, sub) in ["A", "B"].into_iter().zip(subscribers.iter_mut()) {
        for _ in 0..3 {
            let bytes = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await?
                .ok_or("subscription closed")?;
            println!("subscriber {name} got {}", String::from_utf8_lossy(&bytes));
        }
    }
    println!("both subscribers got all three events; task_000, published earlier, reached no one");
    drop(subscribers);
    if scratch {
        drop_namespace(&config.backend_urls(), &config.connect_options(), &[]).await?;
    }
    Ok(())
}
