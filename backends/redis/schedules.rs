//! Schedules on Redis: one HASH `{prefix}orchestra:schedules`, a field per schedule name
//! holding the schedule as JSON (`drop_namespace` deletes it with the `orchestra:` family).
//! Each call is one command, atomic on its own; one key, so one slot on a Redis Cluster.

use super::conn::Conn;
use crate::error::Result;
use crate::schedule::{Schedule, ScheduleName};

fn schedules_key(conn: &Conn) -> String {
    format!("{}orchestra:schedules", conn.prefix())
}

/// [`Registry::schedules`](crate::Registry::schedules): `HVALS`; a value that is no schedule
/// (written by hand) is skipped with a warning.
pub(crate) async fn schedules(conn: &Conn) -> Result<Vec<Schedule>> {
    let mut c = conn.manager();
    let values: Vec<Vec<u8>> = redis::cmd("HVALS")
        .arg(schedules_key(conn))
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("HVALS the schedules", e))?;
    let mut out: Vec<Schedule> = values
        .iter()
        .filter_map(|v| match serde_json::from_slice::<Schedule>(v) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "a stored schedule is not readable; skipped");
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// [`Registry::put_schedule`](crate::Registry::put_schedule): `HSET`.
pub(crate) async fn put(conn: &Conn, schedule: &Schedule) -> Result<bool> {
    let mut c = conn.manager();
    let value = serde_json::to_vec(schedule).unwrap_or_default();
    let added: i64 = redis::cmd("HSET")
        .arg(schedules_key(conn))
        .arg(schedule.name.as_str())
        .arg(value)
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("HSET a schedule", e))?;
    Ok(added == 1)
}

/// [`Registry::remove_schedule`](crate::Registry::remove_schedule): `HDEL`.
pub(crate) async fn remove(conn: &Conn, name: &ScheduleName) -> Result<bool> {
    let mut c = conn.manager();
    let removed: i64 = redis::cmd("HDEL")
        .arg(schedules_key(conn))
        .arg(name.as_str())
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("HDEL a schedule", e))?;
    Ok(removed == 1)
}
