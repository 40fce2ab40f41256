//! Registry snapshots: the live view, cut at a log offset, written in parts to the stream
//! `{prefix}registry.snapshots`, so that a new process loads the latest complete snapshot and
//! replays only the registry log after it instead of the whole log.
//!
//! A snapshot is a sequence of records `{id, through, part, parts, tasks}` appended in order by
//! one writer; it is complete when all `parts` arrived. `through` is the registry log offset of
//! the last message the snapshot includes. Snapshots are an optimisation: the registry log stays
//! the source of truth (it has no retention of its own), and a missing or partial snapshot just
//! means a longer replay.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::log::Machine;
use super::view::TaskView;
use crate::model::Task;

/// Bytes of task JSON per snapshot part (a part is one stream message).
const PART_BYTES: usize = 256 * 1024;

/// One part of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotPart {
    pub(crate) id: String,
    pub(crate) through: u64,
    pub(crate) part: u32,
    pub(crate) parts: u32,
    pub(crate) tasks: Vec<serde_json::Value>,
}

/// Reassembles snapshots while the snapshot stream is replayed; keeps the latest complete one.
#[derive(Default)]
pub(crate) struct Catalog {
    building: HashMap<String, (u64, u32, Vec<serde_json::Value>)>,
    latest: Option<(u64, Vec<serde_json::Value>)>,
    /// Parts read (diagnostic: what loading cost).
    pub(crate) parts_read: u64,
}

impl Catalog {
    /// True once a complete snapshot was read.
    pub(crate) fn has_latest(&self) -> bool {
        self.latest.is_some()
    }

    /// The latest complete snapshot: the offset it runs through and its tasks.
    pub(crate) fn take_latest(&mut self) -> Option<(u64, Vec<serde_json::Value>)> {
        self.building.clear();
        self.latest.take()
    }
}

impl Machine for Catalog {
    type Op = SnapshotPart;
    type Outcome = ();

    fn apply(&mut self, _position: u64, part: SnapshotPart) {
        self.parts_read += 1;
        let expected = self.building.get(&part.id).map_or(0, |(_, next, _)| *next);
        if part.part != expected {
            // A part out of sequence (a writer that died and a retry that reused nothing can
            // only produce gaps): this snapshot can never complete.
            self.building.remove(&part.id);
            return;
        }
        let entry = self
            .building
            .entry(part.id.clone())
            .or_insert_with(|| (part.through, 0, Vec::new()));
        entry.1 += 1;
        entry.2.extend(part.tasks);
        if entry.1 == part.parts {
            if let Some((through, _, tasks)) = self.building.remove(&part.id) {
                if self.latest.as_ref().is_none_or(|(t, _)| through >= *t) {
                    self.latest = Some((through, tasks));
                }
            }
        }
    }
}

/// Cuts `view` (as of log offset `through`) into encoded snapshot parts (each task encoded
/// once; parts are assembled around the encoded bytes).
pub(crate) fn encode(view: &TaskView, through: u64) -> serde_json::Result<Vec<Vec<u8>>> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut chunks: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
    let mut bytes = 0;
    for task in view.table.rows() {
        let encoded = serde_json::to_vec(task)?;
        if bytes + encoded.len() > PART_BYTES && !chunks.last().is_some_and(Vec::is_empty) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += encoded.len();
        if let Some(last) = chunks.last_mut() {
            last.push(encoded);
        }
    }
    let parts = chunks.len();
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(n, tasks)| {
            let mut out = format!(
                "{{\"id\":\"{id}\",\"through\":{through},\"part\":{n},\"parts\":{parts},\"tasks\":["
            )
            .into_bytes();
            for (i, t) in tasks.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(t);
            }
            out.extend_from_slice(b"]}");
            out
        })
        .collect())
}

/// Rebuilds a view from a snapshot's tasks (undecodable tasks are skipped with a warning).
pub(crate) fn restore(tasks: Vec<serde_json::Value>) -> TaskView {
    let mut view = TaskView::default();
    for v in tasks {
        match serde_json::from_value::<Task>(v) {
            Ok(task) => view.insert_snapshot_task(task),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a task that does not decode in a registry snapshot")
            }
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::rabbitmq::view::RegistryOp;
    use crate::model::{Limits, Priority, QueueName, TaskId};

    #[test]
    fn snapshot_parts_reassemble_into_the_same_view() {
        let mut view = TaskView::default();
        for i in 0..300 {
            let mut t = Task::new(
                QueueName::parse("q").expect("queue"),
                serde_json::json!({"blob": "x".repeat(2000), "i": i}),
                Priority::DEFAULT,
                3,
                vec![],
                &Limits::default(),
            )
            .expect("task");
            t.task_id = TaskId::parse(&format!("snap_{i}")).expect("id");
            view.apply(0, RegistryOp::Create { task: t });
        }
        let parts = encode(&view, 41).expect("encode");
        assert!(parts.len() > 1, "300 × 2 kB must take several parts");
        let mut catalog = Catalog::default();
        // An abandoned partial snapshot first: ignored.
        let mut first: SnapshotPart = serde_json::from_slice(&parts[0]).expect("part");
        first.id = "abandoned".into();
        catalog.apply(0, first);
        for p in &parts {
            catalog.apply(0, serde_json::from_slice(p).expect("part"));
        }
        let (through, tasks) = catalog.take_latest().expect("complete snapshot");
        assert_eq!(through, 41);
        let restored = restore(tasks);
        assert_eq!(restored.table.len(), 300);
        assert_eq!(restored.table, view.table, "the same tasks and indexes");
    }
}
