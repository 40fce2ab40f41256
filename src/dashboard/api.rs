//! The routes: the page's files, its JSON API, the event stream and `/metrics`.
//!
//! Actions plug in here: a state-changing route is a `post(...)` under `/api/` (the access
//! layer checks the token or the origin for every one), and [`Actions`] tells the page which
//! buttons to show.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::access;
use super::assets;
use super::live::{Shared, BUCKET_SECS};
use crate::engine::{Control, DeadLetterSelection};
use crate::error::Error;
use crate::model::{QueueName, Task, TaskId, TaskStatus};
use crate::registry::TaskFilter;
use crate::wire::TaskMessage;

/// The most queues shown (and measured on each visit of the queues page).
const MAX_QUEUES: usize = 200;
/// The most tasks read to answer one id-prefix search.
const PREFIX_SCAN: usize = 10_000;
/// The most bytes of a dead letter's payload shown.
const DEAD_PAYLOAD_SHOWN: usize = 4_096;

/// The actions this build offers, so the page shows only buttons that work.
#[derive(Serialize)]
struct Actions {
    cancel: bool,
    retry: bool,
    /// Pausing and resuming a queue ([`Control::pause`]).
    pause_resume: bool,
    /// Requeueing and deleting dead letters ([`Control::requeue_dead_letters`]).
    requeue_dead_letters: bool,
}

const ACTIONS: Actions = Actions {
    cancel: true,
    retry: true,
    pause_resume: true,
    requeue_dead_letters: true,
};

pub(crate) fn routes(shared: Arc<Shared>, valid: Result<(), String>) -> Router {
    let api = Router::new()
        .route("/api/overview", get(overview))
        .route("/api/queues", get(queues))
        .route("/api/workers", get(workers))
        .route("/api/tasks", get(tasks))
        .route("/api/tasks/{id}", get(task))
        .route("/api/tasks/{id}/cancel", post(cancel))
        .route("/api/tasks/{id}/retry", post(retry))
        .route("/api/queues/{queue}/pause", post(pause))
        .route("/api/queues/{queue}/resume", post(resume))
        .route("/api/dead-letters/{queue}/requeue", post(requeue))
        .route("/api/dead-letters/{queue}/delete", post(delete))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/stream", get(stream))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let valid = Arc::new(valid);
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/app.js", get(assets::script))
        .route("/assets/app.css", get(assets::style))
        .route("/assets/icon.svg", get(assets::icon))
        .merge(api)
        .fallback(assets::fallback)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let (shared, valid) = (shared.clone(), valid.clone());
            async move { guard(shared, &valid, req, next).await }
        }))
}

/// Every request: a refused configuration, then the access rules.
async fn guard(
    shared: Arc<Shared>,
    valid: &Result<(), String>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(reason) = valid {
        return ApiError(StatusCode::INTERNAL_SERVER_ERROR, reason.clone()).into_response();
    }
    shared.start();
    if let Err((status, message)) =
        access::check(req.method(), req.headers(), shared.options.token())
    {
        return ApiError(status, message).into_response();
    }
    next.run(req).await
}

/// An error answered as `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidInput { .. } | Error::Config { .. } => StatusCode::BAD_REQUEST,
            Error::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            Error::TaskNotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict { .. } | Error::IllegalTransition { .. } | Error::TaskExists(_) => {
                StatusCode::CONFLICT
            }
            e if e.is_temporary() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The crate's errors carry URLs redacted already.
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Answer = Result<Json<Value>, ApiError>;

fn bad(field: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("invalid {field}: {reason}"),
    )
}

/// One line about what a role's backend guarantees (docs/design.md, "Guarantees").
fn guarantees(role: &str, backend: &str) -> &'static str {
    match (role, backend) {
        ("bus", "memory") => "in this process only (gone when it exits); at-least-once, strict priority; events at-most-once",
        ("bus", "redis") => "at-least-once, strict priority; kept as far as Redis persists (AOF/RDB); events at-most-once",
        ("bus", "nats") => "JetStream file streams: at-least-once, strict priority, survive a restart (a crash may lose the latest writes); events at-most-once",
        ("bus", "rabbitmq") => "durable queues, persistent messages confirmed once on disk: at-least-once, priority; events at-most-once",
        ("registry", "memory") => "in this process only; every change a compare-and-set",
        ("registry", "redis") => "every change a compare-and-set in one script; kept as far as Redis persists",
        ("registry", "nats") => "KV bucket on file storage; every change a compare-and-set on its revision",
        ("registry", "rabbitmq") => "a stream as an append-only log replayed into a view; survives a restart",
        ("locks", "memory") => "in this process only; fencing tokens",
        ("locks", "redis") => "SET PX by script with a fencing counter (reset if Redis loses it without persistence)",
        ("locks", "nats") => "KV with expiry; revisions as fencing tokens, never repeated",
        ("locks", "rabbitmq") => "exclusive queues that vanish with their connection; the lock log survives",
        _ => "a third-party backend: see its documentation",
    }
}

async fn overview(State(s): State<Arc<Shared>>) -> Answer {
    let b = &s.backends;
    let urls = s.options.urls.as_ref().map(super::redacted_urls);
    let roles: Vec<Value> = [
        ("bus", b.bus.backend(), urls.as_ref().map(|u| u.bus.clone())),
        ("registry", b.registry.backend(), urls.as_ref().map(|u| u.registry.clone())),
        ("locks", b.locks.backend(), urls.as_ref().map(|u| u.locks.clone())),
    ]
    .into_iter()
    .map(|(role, backend, url)| {
        json!({ "role": role, "backend": backend, "url": url, "guarantees": guarantees(role, backend) })
    })
    .collect();
    let (counts, counts_error) = match b.registry.counts().await {
        Ok(c) => {
            let by: serde_json::Map<String, Value> = TaskStatus::ALL
                .iter()
                .map(|st| (st.as_str().to_string(), json!(c.get(*st))))
                .collect();
            (Some(by), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let live = s.live.lock();
    Ok(Json(json!({
        "counts": counts,
        "counts_error": counts_error,
        "roles": roles,
        "history": { "bucket_secs": BUCKET_SECS, "buckets": live.history(Utc::now()) },
        "listening_secs": live.listening_since.elapsed().as_secs(),
        "events_heard": live.events_heard,
        "bus_error": live.bus_error,
        "listening": live.listening,
        "token_required": s.options.token().is_some(),
        "actions": ACTIONS,
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

fn known_queues(s: &Shared) -> Vec<QueueName> {
    s.live
        .lock()
        .queues
        .iter()
        .take(MAX_QUEUES)
        .cloned()
        .collect()
}

/// Every queue of the namespace ([`Control::queues`]: those with tasks, the paused ones, and
/// those heard of), with sizes, pause state and task counts by status.
async fn queues(State(s): State<Arc<Shared>>) -> Answer {
    let listed = Control::new(s.backends.clone())
        .queues(&known_queues(&s))
        .await?;
    let out: Vec<Value> = listed
        .into_iter()
        .take(MAX_QUEUES)
        .map(|q| {
            let tasks: serde_json::Map<String, Value> = TaskStatus::ALL
                .into_iter()
                .map(|st| (st.as_str().to_string(), json!(q.tasks.get(st))))
                .collect();
            json!({
                "queue": q.queue, "paused": q.paused, "waiting": q.waiting, "delayed": q.delayed,
                "in_flight": q.in_flight, "dead": q.dead, "tasks": tasks,
            })
        })
        .collect();
    Ok(Json(json!({ "queues": out, "actions": ACTIONS })))
}

async fn pause(State(s): State<Arc<Shared>>, Path(queue): Path<String>) -> Answer {
    set_paused(&s, &queue, true).await
}

async fn resume(State(s): State<Arc<Shared>>, Path(queue): Path<String>) -> Answer {
    set_paused(&s, &queue, false).await
}

async fn set_paused(s: &Shared, queue: &str, paused: bool) -> Answer {
    let queue = QueueName::parse(queue)?;
    let control = Control::new(s.backends.clone());
    let changed = match paused {
        true => control.pause(&queue).await?,
        false => control.resume(&queue).await?,
    };
    Ok(Json(
        json!({ "queue": queue, "paused": paused, "changed": changed }),
    ))
}

/// Which dead letters a requeue or delete takes: `?id=MESSAGE_ID` or `?all=true`.
#[derive(Deserialize)]
struct DeadSelection {
    id: Option<String>,
    all: Option<bool>,
}

impl DeadSelection {
    fn selection(&self) -> Result<DeadLetterSelection, ApiError> {
        match (blank(&self.id), self.all.unwrap_or(false)) {
            (Some(id), false) => Ok(DeadLetterSelection::Ids(vec![id.to_string()])),
            (None, true) => Ok(DeadLetterSelection::All),
            _ => Err(bad(
                "dead letters",
                "name one dead letter (?id=MESSAGE_ID) or all of them (?all=true)",
            )),
        }
    }
}

async fn requeue(
    State(s): State<Arc<Shared>>,
    Path(queue): Path<String>,
    Query(q): Query<DeadSelection>,
) -> Answer {
    let (queue, which) = (QueueName::parse(&queue)?, q.selection()?);
    let outcomes = Control::new(s.backends.clone())
        .requeue_dead_letters(&queue, &which)
        .await?;
    Ok(Json(json!({ "queue": queue, "outcomes": outcomes })))
}

async fn delete(
    State(s): State<Arc<Shared>>,
    Path(queue): Path<String>,
    Query(q): Query<DeadSelection>,
) -> Answer {
    let (queue, which) = (QueueName::parse(&queue)?, q.selection()?);
    let outcomes = Control::new(s.backends.clone())
        .delete_dead_letters(&queue, &which)
        .await?;
    Ok(Json(json!({ "queue": queue, "outcomes": outcomes })))
}

async fn workers(State(s): State<Arc<Shared>>) -> Answer {
    let mut live = s.live.lock();
    let workers = live.workers(Instant::now());
    Ok(Json(json!({
        "workers": workers,
        "listening_secs": live.listening_since.elapsed().as_secs(),
    })))
}

#[derive(Deserialize)]
struct TasksQuery {
    status: Option<String>,
    queue: Option<String>,
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn blank(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

async fn tasks(State(s): State<Arc<Shared>>, Query(q): Query<TasksQuery>) -> Answer {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let status = match blank(&q.status) {
        None => None,
        Some(st) => Some(
            serde_json::from_value::<TaskStatus>(json!(st.to_ascii_uppercase()))
                .map_err(|_| bad("status", format!("{st:?} is not a status")))?,
        ),
    };
    let queue = blank(&q.queue).map(QueueName::parse).transpose()?;
    let prefix = blank(&q.prefix);
    if let Some(p) = prefix {
        // The characters of a task id (TaskId::parse) and nothing else.
        if !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        {
            return Err(bad(
                "prefix",
                format!("{p:?} holds a character no task id has"),
            ));
        }
    }
    let filter = TaskFilter { status, queue };
    let registry = &s.backends.registry;
    let Some(prefix) = prefix else {
        let page = registry.list(&filter, blank(&q.cursor), limit).await?;
        return Ok(Json(
            json!({ "tasks": page.tasks.iter().map(summary).collect::<Vec<_>>(), "next_cursor": page.next_cursor }),
        ));
    };
    // An id prefix: read pages until `limit` match or PREFIX_SCAN were read.
    let mut found = Vec::new();
    let mut cursor = blank(&q.cursor).map(str::to_string);
    let mut scanned = 0;
    loop {
        let page = registry.list(&filter, cursor.as_deref(), 500).await?;
        scanned += page.tasks.len();
        found.extend(
            page.tasks
                .iter()
                .filter(|t| t.task_id.as_str().starts_with(prefix))
                .map(summary),
        );
        cursor = page.next_cursor;
        if found.len() >= limit || cursor.is_none() || scanned >= PREFIX_SCAN {
            break;
        }
    }
    Ok(Json(
        json!({ "tasks": found, "next_cursor": cursor, "scanned": scanned }),
    ))
}

/// A task in a list: no payload or result (they may be large).
fn summary(t: &Task) -> Value {
    json!({
        "task_id": t.task_id,
        "queue": t.queue,
        "status": t.state.status,
        "attempt": t.state.attempt,
        "max_attempts": t.max_attempts,
        "priority": t.priority,
        "worker_id": t.state.worker_id,
        "created_at": t.created_at,
        "updated_at": t.state.updated_at,
        "error": t.state.error,
    })
}

fn task_id(id: &str) -> Result<TaskId, ApiError> {
    Ok(TaskId::parse(id)?)
}

async fn task(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    let id = task_id(&id)?;
    let task = s.dispatcher.get(&id).await?;
    let dependents = s.backends.registry.dependents(&id).await?;
    let mut parents = Vec::new();
    for p in task.depends_on.iter().take(100) {
        let status = s.backends.registry.get(p).await?.map(|t| t.state.status);
        parents.push(json!({ "task_id": p, "status": status }));
    }
    let mut timeline = vec![json!({ "at": task.created_at, "what": "created" })];
    let st = &task.state;
    for (at, what) in [
        (st.ready_at, "ready (after its delay)".to_string()),
        (st.started_at, format!("attempt {} started", st.attempt)),
        (st.heartbeat_at, "last heartbeat".into()),
        (st.finished_at, format!("finished {}", st.status)),
    ] {
        if let Some(at) = at {
            timeline.push(json!({ "at": at, "what": what }));
        }
    }
    for e in s.live.lock().events_of(&id) {
        let by = e.worker_id.map(|w| format!(" by {w}")).unwrap_or_default();
        timeline.push(json!({
            "at": e.at,
            "what": format!("{} (attempt {}){by}", e.status, e.attempt),
            "event": true,
        }));
    }
    timeline.sort_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
    Ok(Json(json!({
        "task": task,
        "dependents": dependents,
        "parents": parents,
        "timeline": timeline,
    })))
}

async fn cancel(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    let task = s.dispatcher.cancel(&task_id(&id)?).await?;
    Ok(Json(summary(&task)))
}

async fn retry(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Answer {
    let task = s.dispatcher.retry(&task_id(&id)?).await?;
    Ok(Json(summary(&task)))
}

#[derive(Deserialize)]
struct DeadQuery {
    queue: Option<String>,
    limit: Option<usize>,
}

async fn dead_letters(State(s): State<Arc<Shared>>, Query(q): Query<DeadQuery>) -> Answer {
    let Some(queue) = blank(&q.queue) else {
        return Err(bad("queue", "name the queue whose dead letters to show"));
    };
    let queue = QueueName::parse(queue)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let letters = s.backends.bus.dead_letters(&queue, limit).await?;
    let shown: Vec<Value> = letters
        .iter()
        .map(|d| {
            let text =
                String::from_utf8_lossy(&d.payload[..d.payload.len().min(DEAD_PAYLOAD_SHOWN)]);
            json!({
                "message_id": d.message_id,
                "reason": d.reason,
                "delivery_count": d.delivery_count,
                "dead_at": d.dead_at,
                "payload": text,
                "payload_bytes": d.payload.len(),
                "task_id": TaskMessage::decode(&d.payload).ok().map(|m| m.task_id),
            })
        })
        .collect();
    Ok(Json(
        json!({ "queue": queue, "dead_letters": shown, "actions": ACTIONS }),
    ))
}

/// The bus's task events as server-sent events (`task`, its data a
/// [`TaskEvent`](crate::wire::TaskEvent)); `lagged` when this page fell behind and missed
/// some (it reloads what it shows).
async fn stream(
    State(s): State<Arc<Shared>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use futures::StreamExt as _;
    let rx = s.stream.subscribe();
    let hello = futures::stream::once(async { Ok(Event::default().event("hello").data("{}")) });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(json) => Event::default().event("task").data(&*json),
            Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(hello.chain(events)).keep_alive(KeepAlive::default())
}

/// The backend gauges of the known queues (engine::metrics::prometheus::BackendGauges).
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let queues = known_queues(&s);
    let text = crate::engine::backend_gauges(&s.backends, &queues).await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}
