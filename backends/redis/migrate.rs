//! Moving a namespace written by the layout before 2026-12-07 to today's keys.
//!
//! That layout (one server only: it could not run on a cluster) kept the registry's indexes
//! global: `{prefix}orchestra:status:<STATUS>`, `{prefix}orchestra:leases` and
//! `{prefix}orchestra:dependents:<parent>`. Its task hashes (`task_registry:<id>`) and queue keys
//! (`q:{Q}:…`) are today's, but its index entries would be invisible to today's code: counts,
//! listings, the stale-lease scan and retention would miss those tasks, and a parent finishing
//! would not find its children. So opening a registry on one server looks for those keys (one
//! `EXISTS`) and, when it finds any, moves their entries to the per-queue keys
//! (`migrate_global.lua`, a chunk per call, each task to the index of the status its hash
//! holds), with a warning in the log. docs/backends/redis.md says what to stop first.

use super::conn::Conn;
use super::scripts;
use crate::error::Result;
use crate::model::TaskStatus;

/// Index entries moved per script call (one call stays around a millisecond).
const CHUNK: usize = 1000;

/// The global index keys of the old layout under `prefix`.
fn old_indexes(prefix: &str) -> Vec<String> {
    TaskStatus::ALL
        .iter()
        .map(|s| match s {
            TaskStatus::Running => format!("{prefix}orchestra:leases"),
            s => format!("{prefix}orchestra:status:{}", s.as_str()),
        })
        .collect()
}

/// Moves what the old layout left under the prefix (nothing on a cluster, or when none of its
/// index keys exists: one `EXISTS`). Returns the number of old keys it emptied.
pub(crate) async fn migrate_global_indexes(conn: &Conn) -> Result<usize> {
    if conn.is_cluster() {
        return Ok(0);
    }
    let prefix = conn.prefix().to_string();
    let indexes = old_indexes(&prefix);
    let mut c = conn.manager();
    let found: i64 = redis::cmd("EXISTS")
        .arg(&indexes)
        .query_async(&mut c)
        .await
        .map_err(|e| conn.error("EXISTS the old layout's indexes", e))?;
    if found == 0 {
        return Ok(0);
    }
    tracing::warn!(prefix = %prefix, "this namespace holds the global registry indexes of the layout before 2026-12-07; moving them to the per-queue keys (docs/backends/redis.md, \"Migrating from the layout before 2026-12-07\")");
    let mut emptied = 0;
    for old in &indexes {
        loop {
            let mut inv = scripts::MIGRATE_GLOBAL.prepare();
            inv.arg(&prefix)
                .arg(super::codec::LAB_DEFAULT_QUEUE)
                .arg(CHUNK)
                .arg(old)
                .arg("");
            let left: i64 = conn.eval("migrate the old layout", &inv).await?;
            if left == 0 {
                break;
            }
        }
        emptied += 1;
    }
    // The dependents sets: found by name (they exist only while their parent is unfinished).
    let pattern = format!(
        "{}orchestra:dependents:*",
        super::keys::glob_escape(&prefix)
    );
    let dependents_prefix = format!("{prefix}orchestra:dependents:");
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .map_err(|e| conn.error("SCAN the old layout's dependents sets", e))?;
        for key in found {
            let parent = key[dependents_prefix.len()..].to_string();
            if parent.is_empty() {
                continue;
            }
            let mut inv = scripts::MIGRATE_GLOBAL.prepare();
            inv.arg(&prefix)
                .arg(super::codec::LAB_DEFAULT_QUEUE)
                .arg(CHUNK)
                .arg(&key)
                .arg(&parent);
            let _: i64 = conn.eval("migrate the old layout", &inv).await?;
            emptied += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    tracing::warn!(prefix = %prefix, keys = emptied, "the old layout's registry indexes were moved");
    Ok(emptied)
}
