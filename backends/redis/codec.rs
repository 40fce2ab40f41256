//! A [`Task`] as the fields of its Redis HASH, readable by the lab's Python `TaskRegistry`.
//!
//! The lab's fields keep the lab's names and encodings: `task_id`, `status` (`PENDING`...),
//! `payload` (a JSON string), `priority` (decimal), `result` (a string: the text itself for a
//! JSON string, else its JSON), `worker_id`, `created_at` and `updated_at` (ISO-8601 in UTC with
//! `+00:00`, like Python's `datetime.isoformat()`). Our own fields: `queue`, `attempt`,
//! `max_attempts`, `depends_on` (JSON array of ids), `error`, `lease_until`, `heartbeat_at`,
//! `started_at`, `finished_at`, `ready_at`, `deadline` (ISO-8601), `timeout_ms` (decimal
//! milliseconds), `traceparent` (W3C), `progress_json` (the last progress report) and
//! `result_json` (the exact JSON of `result`, so a
//! non-string result round-trips while the lab still reads a string). A field whose value is
//! `None` is absent.
//!
//! Reading is lenient with what the lab writes: `TaskStatus.PENDING` (the lab's `str()` of its
//! enum) reads as `PENDING`, `"None"` reads as absent, missing fields of ours take defaults
//! (queue `default`, attempt 0, max_attempts 1, no dependencies).

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use serde_json::Value;

use super::conn::BACKEND;
use crate::error::{Error, Result};
use crate::model::{Priority, QueueName, Task, TaskId, TaskState, TaskStatus};

/// The queue given to a task the lab registered (the lab stores none).
pub(crate) const LAB_DEFAULT_QUEUE: &str = "default";

/// Formats a UTC time like Python's `isoformat()` (`2024-05-01T12:00:00.123456+00:00`; no
/// fraction when it is zero), with nanoseconds when the time has sub-microsecond precision so
/// that it round-trips exactly (Python 3.11+ reads that too).
pub(crate) fn format_time(t: DateTime<Utc>) -> String {
    use std::fmt::Write;
    let nanos = t.nanosecond() % 1_000_000_000;
    let mut s = String::with_capacity(38);
    // Written field by field: chrono's strftime re-parses its pattern on every call.
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if nanos != 0 && nanos.is_multiple_of(1000) {
        let _ = write!(s, ".{:06}", nanos / 1000);
    } else if nanos != 0 {
        let _ = write!(s, ".{nanos:09}");
    }
    s.push_str("+00:00");
    s
}

/// Parses ISO-8601 as written by us or by Python (`+00:00` or `Z`, any fraction); a time
/// without offset is taken as UTC.
pub(crate) fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%:z") {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(t.and_utc());
        }
    }
    Err(corrupt(field, format!("{s:?} is not an ISO-8601 time")))
}

/// Microseconds since the epoch: the score of a task in the status and lease indexes.
pub(crate) use crate::clock::micros;

/// The lab's `result` string for a JSON value.
pub(crate) fn lab_result_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn corrupt(field: &str, reason: String) -> Error {
    Error::permanent(
        BACKEND,
        format!("stored task field `{field}`: {reason}"),
        None,
    )
}

/// Every field of a new task, as (name, value) pairs.
pub(crate) fn task_fields(task: &Task) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = vec![
        ("task_id", task.task_id.to_string()),
        ("queue", task.queue.to_string()),
        ("payload", task.payload.to_string()),
        ("priority", task.priority.get().to_string()),
        ("max_attempts", task.max_attempts.to_string()),
        ("created_at", format_time(task.created_at)),
    ];
    if let Some(t) = task.timeout {
        out.push(("timeout_ms", t.as_millis().to_string()));
    }
    if let Some(d) = task.deadline {
        out.push(("deadline", format_time(d)));
    }
    if let Some(tp) = &task.traceparent {
        out.push(("traceparent", tp.clone()));
    }
    if !task.depends_on.is_empty() {
        let ids: Vec<&str> = task.depends_on.iter().map(TaskId::as_str).collect();
        out.push((
            "depends_on",
            serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()),
        ));
    }
    let (set, _) = state_fields(&task.state);
    out.extend(set);
    out
}

/// The state as fields to set, and the names of the fields to delete (the `None`s).
pub(crate) fn state_fields(s: &TaskState) -> (Vec<(&'static str, String)>, Vec<&'static str>) {
    let mut set: Vec<(&'static str, String)> = vec![
        ("status", s.status.as_str().to_string()),
        ("attempt", s.attempt.to_string()),
        ("updated_at", format_time(s.updated_at)),
    ];
    let mut del = Vec::new();
    if s.handed_back > 0 {
        set.push(("handed_back", s.handed_back.to_string()));
    } else {
        del.push("handed_back");
    }
    let mut opt = |name: &'static str, v: Option<String>| match v {
        Some(v) => set.push((name, v)),
        None => del.push(name),
    };
    opt("worker_id", s.worker_id.clone());
    opt("result", s.result.as_ref().map(lab_result_text));
    opt("result_json", s.result.as_ref().map(Value::to_string));
    opt("error", s.error.clone());
    opt("lease_until", s.lease_until.map(format_time));
    opt("heartbeat_at", s.heartbeat_at.map(format_time));
    opt("started_at", s.started_at.map(format_time));
    opt("finished_at", s.finished_at.map(format_time));
    opt("ready_at", s.ready_at.map(format_time));
    opt("progress_json", s.progress.as_ref().map(Value::to_string));
    (set, del)
}

/// Normalizes a stored status (`TaskStatus.PENDING` → `PENDING`).
pub(crate) fn parse_status(s: &str) -> Result<TaskStatus> {
    s.strip_prefix("TaskStatus.")
        .unwrap_or(s)
        .parse()
        .map_err(|e: Error| corrupt("status", e.to_string()))
}

/// Decodes a task from its HASH fields. `id` is the id the key was built from (used when the
/// hash has no `task_id` field).
pub(crate) fn decode(id: &TaskId, fields: &HashMap<String, String>) -> Result<Task> {
    let get = |name: &str| -> Option<&str> { fields.get(name).map(String::as_str) };
    // The lab stores str(None) == "None" for its optional fields.
    let lab = |name: &str| -> Option<&str> { get(name).filter(|v| *v != "None") };
    let need = |name: &str| -> Result<&str> {
        get(name).ok_or_else(|| corrupt(name, "missing".to_string()))
    };
    let time = |name: &str| -> Result<Option<DateTime<Utc>>> {
        get(name).map(|v| parse_time(name, v)).transpose()
    };
    let int = |name: &str, default: i64| -> Result<i64> {
        match get(name) {
            None => Ok(default),
            // ASCII whitespace only, as task_check.lua reads it.
            Some(v) => v
                .trim_ascii()
                .parse::<i64>()
                .map_err(|_| corrupt(name, format!("{v:?} is not an integer"))),
        }
    };
    let u32_field = |name: &str, default: i64| -> Result<u32> {
        let v = int(name, default)?;
        u32::try_from(v).map_err(|_| corrupt(name, format!("{v} is out of range")))
    };

    // A hash naming another task than its key is not that task (task_check.lua agrees).
    let task_id = match get("task_id") {
        Some(v) if v != id.as_str() => {
            return Err(corrupt(
                "task_id",
                format!("{v:?} is not the id {:?} of its key", id.as_str()),
            ))
        }
        _ => id.clone(),
    };
    let queue = QueueName::parse(get("queue").unwrap_or(LAB_DEFAULT_QUEUE))
        .map_err(|e| corrupt("queue", e.to_string()))?;
    let payload: Value = serde_json::from_str(need("payload")?)
        .map_err(|e| corrupt("payload", format!("not JSON: {e}")))?;
    let priority =
        Priority::new(int("priority", 5)?).map_err(|e| corrupt("priority", e.to_string()))?;
    let depends_on = match get("depends_on") {
        None => Vec::new(),
        Some(v) => serde_json::from_str::<Vec<TaskId>>(v)
            .map_err(|e| corrupt("depends_on", format!("not a JSON array of ids: {e}")))?,
    };
    let created_at = match time("created_at")? {
        Some(t) => t,
        None => return Err(corrupt("created_at", "missing".into())),
    };
    let updated_at = time("updated_at")?.unwrap_or(created_at);
    let result = match (get("result_json"), get("result")) {
        // A result_json that no longer matches `result` means the lab rewrote `result`.
        (Some(json), Some(text)) => match serde_json::from_str::<Value>(json) {
            Ok(v) if lab_result_text(&v) == text => Some(v),
            _ => lab("result").map(|t| Value::String(t.to_string())),
        },
        (Some(json), None) => serde_json::from_str(json).ok(),
        (None, _) => lab("result").map(|t| Value::String(t.to_string())),
    };
    let timeout = match get("timeout_ms") {
        None => None,
        Some(_) => Some(std::time::Duration::from_millis(
            u64::try_from(int("timeout_ms", 0)?)
                .map_err(|_| corrupt("timeout_ms", "is negative".into()))?,
        )),
    };
    Ok(Task {
        task_id,
        queue,
        payload,
        priority,
        max_attempts: u32_field("max_attempts", 1)?,
        depends_on,
        created_at,
        timeout,
        deadline: time("deadline")?,
        traceparent: get("traceparent").map(str::to_string),
        state: TaskState {
            status: parse_status(need("status")?)?,
            attempt: u32_field("attempt", 0)?,
            handed_back: u32_field("handed_back", 0)?,
            worker_id: lab("worker_id").map(str::to_string),
            result,
            error: get("error").map(str::to_string),
            lease_until: time("lease_until")?,
            heartbeat_at: time("heartbeat_at")?,
            started_at: time("started_at")?,
            finished_at: time("finished_at")?,
            ready_at: time("ready_at")?,
            progress: get("progress_json").and_then(|j| serde_json::from_str(j).ok()),
            updated_at,
        },
    })
}

/// Turns a flat `[field, value, field, value, ...]` reply (HGETALL in RESP2, or a script's
/// table) or a RESP3 map into a map of strings.
pub(crate) fn field_map(values: Vec<redis::Value>) -> Result<HashMap<String, String>> {
    let mut out = HashMap::with_capacity(values.len() / 2);
    let mut it = values.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.insert(text(k)?, text(v)?);
    }
    Ok(out)
}

/// A reply value as UTF-8 text.
pub(crate) fn text(v: redis::Value) -> Result<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b)
            .map_err(|_| Error::permanent(BACKEND, "stored text is not UTF-8", None)),
        redis::Value::SimpleString(s) => Ok(s),
        redis::Value::Int(i) => Ok(i.to_string()),
        redis::Value::VerbatimString { text, .. } => Ok(text),
        other => Err(Error::permanent(
            BACKEND,
            format!("unexpected reply {other:?} where text was expected"),
            None,
        )),
    }
}

/// Flattens a HGETALL reply (RESP2 array or RESP3 map) into a field map.
pub(crate) fn hash_reply(v: redis::Value) -> Result<HashMap<String, String>> {
    match v {
        redis::Value::Array(items) => field_map(items),
        redis::Value::Map(pairs) => {
            let mut out = HashMap::with_capacity(pairs.len());
            for (k, v) in pairs {
                out.insert(text(k)?, text(v)?);
            }
            Ok(out)
        }
        redis::Value::Nil => Ok(HashMap::new()),
        other => Err(Error::permanent(
            BACKEND,
            format!("unexpected reply {other:?} to HGETALL"),
            None,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Limits;
    use serde_json::json;

    fn sample() -> Task {
        let mut t = Task::new(
            QueueName::parse("research").unwrap(),
            json!({"topic": "양자 컴퓨팅", "n": [1, 2.5, null]}),
            Priority::new(3).unwrap(),
            4,
            vec![TaskId::parse("task_parent").unwrap()],
            &Limits::default(),
        )
        .unwrap();
        t.state.result = Some(json!({"answer": 42}));
        t.state.worker_id = Some("w1".into());
        t.state.lease_until = Some(Utc::now());
        t.timeout = Some(std::time::Duration::from_millis(2_500));
        t.deadline = Some(Utc::now());
        t.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        t
    }

    fn to_map(fields: Vec<(&'static str, String)>) -> HashMap<String, String> {
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn task_round_trips_exactly_through_its_fields() {
        let t = sample();
        let back = decode(&t.task_id, &to_map(task_fields(&t))).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn string_and_scalar_results_round_trip_and_read_as_text_for_the_lab() {
        for v in [
            json!("plain text"),
            json!(7),
            json!(null),
            json!("42"),
            json!([1, "a"]),
        ] {
            let mut t = sample();
            t.state.result = Some(v.clone());
            let map = to_map(task_fields(&t));
            assert_eq!(map["result"], lab_result_text(&v));
            assert_eq!(decode(&t.task_id, &map).unwrap().state.result, Some(v));
        }
    }

    #[test]
    fn a_result_rewritten_by_the_lab_wins_over_our_stale_json() {
        let t = sample();
        let mut map = to_map(task_fields(&t));
        map.insert("result".into(), "written by python".into());
        let back = decode(&t.task_id, &map).unwrap();
        assert_eq!(back.state.result, Some(json!("written by python")));
    }

    #[test]
    fn times_look_like_python_isoformat() {
        let t = DateTime::parse_from_rfc3339("2024-05-01T12:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_time(t), "2024-05-01T12:00:00.123456+00:00");
        let whole = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_time(whole), "2024-05-01T12:00:00+00:00");
        for s in [
            "2024-05-01T12:00:00.123456+00:00",
            "2024-05-01T12:00:00+00:00",
            "2024-05-01T12:00:00.123456",
            "2024-05-01T12:00:00.123456789Z",
        ] {
            assert!(parse_time("t", s).is_ok(), "{s}");
        }
        assert!(parse_time("t", "yesterday").is_err());
    }

    #[test]
    fn what_the_lab_writes_is_read_with_defaults() {
        // Exactly what the lab's register_task stores: str() of every model_dump() value.
        let map: HashMap<String, String> = [
            ("task_id", "task_1a2b3c4d"),
            ("status", "TaskStatus.PENDING"),
            (
                "payload",
                r#"{"topic": "LangGraph", "user_id": "user_123"}"#,
            ),
            ("priority", "3"),
            ("result", "None"),
            ("worker_id", "None"),
            ("created_at", "2026-11-24T20:04:27.395533+00:00"),
            ("updated_at", "2026-11-24T20:04:27.395540+00:00"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = decode(&TaskId::parse("task_1a2b3c4d").unwrap(), &map).unwrap();
        assert_eq!(t.status(), TaskStatus::Pending);
        assert_eq!(t.priority.get(), 3);
        assert_eq!(t.payload["user_id"], "user_123");
        assert_eq!(t.state.result, None);
        assert_eq!(t.state.worker_id, None);
        assert_eq!(t.queue.as_str(), LAB_DEFAULT_QUEUE);
        assert_eq!((t.state.attempt, t.max_attempts), (0, 1));
    }

    #[test]
    fn a_hash_naming_another_task_is_corrupt() {
        let t = sample();
        let other = TaskId::parse("someone_else").unwrap();
        let e = decode(&other, &to_map(task_fields(&t))).unwrap_err();
        assert!(e.to_string().contains("task_id"), "{e}");
    }

    #[test]
    fn corrupt_fields_are_permanent_errors_naming_the_field() {
        let t = sample();
        let mut map = to_map(task_fields(&t));
        map.insert("priority".into(), "11".into());
        let e = decode(&t.task_id, &map).unwrap_err();
        assert!(!e.is_temporary());
        assert!(e.to_string().contains("priority"), "{e}");
    }
}
