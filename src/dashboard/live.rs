//! What the dashboard learns by listening to the bus: task events (forwarded to the pages'
//! event streams, counted into throughput and latency per [`BUCKET_SECS`], kept for the
//! timelines of recent tasks) and worker announcements (the live workers, as
//! [`list_workers`](crate::engine::list_workers) hears them, but continuously).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

use super::DashboardOptions;
use crate::engine::{Dispatcher, WorkerInfo, WORKERS_TOPIC};
use crate::model::{QueueName, TaskId, TaskStatus};
use crate::wire::{TaskEvent, EVENTS_TOPIC};
use crate::Backends;

/// The width of one throughput/latency bucket.
pub(crate) const BUCKET_SECS: i64 = 10;
/// Buckets kept: 15 minutes.
const BUCKETS: usize = 90;
/// Recent events kept for the timelines.
const RECENT_EVENTS: usize = 20_000;
/// Tasks whose start is remembered for latency, at most.
const OPEN_TASKS: usize = 100_000;
/// Events queued for each page's stream before it is told it lagged.
const STREAM_BUFFER: usize = 1_024;

/// Everything the handlers share.
pub(crate) struct Shared {
    pub(crate) backends: Backends,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) options: DashboardOptions,
    pub(crate) live: Mutex<Live>,
    /// Task events as JSON, for the pages' streams.
    pub(crate) stream: broadcast::Sender<Arc<str>>,
    started: OnceLock<()>,
}

/// Throughput and latency of one bucket.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Bucket {
    /// Unix seconds at its start.
    pub(crate) start: i64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) cancelled: u64,
    /// Run time (RUNNING to its end) of the attempts that ended here, when their start was
    /// heard: sum and max in milliseconds, and how many.
    pub(crate) run_ms_sum: f64,
    pub(crate) run_ms_max: f64,
    pub(crate) run_n: u64,
    /// Time from dispatch (PENDING) to the end, when heard.
    pub(crate) total_ms_sum: f64,
    pub(crate) total_ms_max: f64,
    pub(crate) total_n: u64,
}

#[derive(Default)]
struct Open {
    pending_at: Option<DateTime<Utc>>,
    running_at: Option<(u32, DateTime<Utc>)>,
}

/// What was heard.
pub(crate) struct Live {
    pub(crate) queues: BTreeSet<QueueName>,
    buckets: VecDeque<Bucket>,
    open: HashMap<TaskId, Open>,
    recent: VecDeque<TaskEvent>,
    workers: BTreeMap<String, (WorkerInfo, Instant)>,
    pub(crate) listening_since: Instant,
    pub(crate) events_heard: u64,
    pub(crate) bus_error: Option<String>,
    /// True while subscribed to both topics: events published before were not heard.
    pub(crate) listening: bool,
}

impl Shared {
    pub(crate) fn new(backends: Backends, options: DashboardOptions) -> Self {
        let (stream, _) = broadcast::channel(STREAM_BUFFER);
        Shared {
            dispatcher: Dispatcher::new(backends.clone()),
            backends,
            live: Mutex::new(Live {
                queues: options.queues.iter().cloned().collect(),
                buckets: VecDeque::with_capacity(BUCKETS),
                open: HashMap::new(),
                recent: VecDeque::new(),
                workers: BTreeMap::new(),
                listening_since: Instant::now(),
                events_heard: 0,
                bus_error: None,
                listening: false,
            }),
            options,
            stream,
            started: OnceLock::new(),
        }
    }

    /// Starts the listener once, when a runtime is at hand (the handlers call it too, for a
    /// router built outside one).
    pub(crate) fn start(self: &Arc<Self>) {
        if self.started.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.set(()).is_ok() {
            runtime.spawn(listen(Arc::downgrade(self)));
        }
    }
}

/// Listens until the dashboard is dropped: checks every second whether it still exists.
async fn listen(shared: Weak<Shared>) {
    let bus = match shared.upgrade() {
        Some(s) => s.backends.bus.clone(),
        None => return,
    };
    let mut events = None;
    let mut workers = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        if events.is_none() || workers.is_none() {
            let opened = async {
                Ok::<_, crate::Error>((
                    bus.subscribe(EVENTS_TOPIC).await?,
                    bus.subscribe(WORKERS_TOPIC).await?,
                ))
            }
            .await;
            let Some(s) = shared.upgrade() else { return };
            match opened {
                Ok((e, w)) => {
                    events = Some(e);
                    workers = Some(w);
                    let mut live = s.live.lock();
                    live.bus_error = None;
                    live.listening = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard: cannot listen to the bus; trying again");
                    {
                        let mut live = s.live.lock();
                        live.bus_error = Some(e.to_string());
                        live.listening = false;
                    }
                    drop(s);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            }
        }
        let (Some(ev), Some(wk)) = (events.as_mut(), workers.as_mut()) else {
            continue;
        };
        tokio::select! {
            got = ev.recv() => {
                let Some(s) = shared.upgrade() else { return };
                match got {
                    Some(bytes) => {
                        if let Some(event) = TaskEvent::decode(&bytes) {
                            s.live.lock().heard_event(&event, Utc::now());
                            if s.stream.receiver_count() > 0 {
                                let json: Arc<str> = String::from_utf8_lossy(&event.encode()).into();
                                let _ = s.stream.send(json);
                            }
                        }
                    }
                    None => {
                        events = None;
                        s.live.lock().listening = false;
                    }
                }
            }
            got = wk.recv() => {
                let Some(s) = shared.upgrade() else { return };
                match got {
                    Some(bytes) => {
                        if let Ok(info) = serde_json::from_slice::<WorkerInfo>(&bytes) {
                            s.live.lock().heard_worker(info, Instant::now());
                        }
                    }
                    None => {
                        workers = None;
                        s.live.lock().listening = false;
                    }
                }
            }
            _ = tick.tick() => {
                if shared.strong_count() == 0 {
                    return;
                }
            }
        }
    }
}

impl Live {
    fn bucket(&mut self, now: DateTime<Utc>) -> &mut Bucket {
        let start = now.timestamp().div_euclid(BUCKET_SECS) * BUCKET_SECS;
        if self.buckets.back().is_none_or(|b| b.start < start) {
            if self.buckets.len() == BUCKETS {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket {
                start,
                ..Bucket::default()
            });
        }
        // Non-empty: pushed above when it was.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    pub(crate) fn heard_event(&mut self, event: &TaskEvent, now: DateTime<Utc>) {
        self.events_heard += 1;
        if !self.queues.contains(&event.queue) {
            self.queues.insert(event.queue.clone());
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
        if self.open.len() >= OPEN_TASKS && !self.open.contains_key(&event.task_id) {
            // Tasks whose end was never heard (events are at-most-once): forget them all
            // rather than grow without bound.
            self.open.clear();
        }
        let ms = |from: DateTime<Utc>| {
            ((event.at - from).num_microseconds().unwrap_or(0) as f64 / 1e3).max(0.0)
        };
        match event.status {
            TaskStatus::Pending => {
                self.open
                    .entry(event.task_id.clone())
                    .or_default()
                    .pending_at = Some(event.at);
            }
            TaskStatus::Running => {
                self.open
                    .entry(event.task_id.clone())
                    .or_default()
                    .running_at = Some((event.attempt, event.at));
            }
            TaskStatus::Waiting => {}
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled => {
                let open = self.open.remove(&event.task_id).unwrap_or_default();
                let run = open
                    .running_at
                    .filter(|(attempt, _)| *attempt == event.attempt)
                    .map(|(_, at)| ms(at));
                let total = open.pending_at.map(ms);
                let b = self.bucket(now);
                match event.status {
                    TaskStatus::Completed => b.completed += 1,
                    TaskStatus::Failed => b.failed += 1,
                    _ => b.cancelled += 1,
                }
                if let Some(run) = run {
                    b.run_ms_sum += run;
                    b.run_ms_max = b.run_ms_max.max(run);
                    b.run_n += 1;
                }
                if let Some(total) = total {
                    b.total_ms_sum += total;
                    b.total_ms_max = b.total_ms_max.max(total);
                    b.total_n += 1;
                }
            }
        }
    }

    fn heard_worker(&mut self, info: WorkerInfo, now: Instant) {
        for q in &info.queues {
            if !self.queues.contains(q) {
                self.queues.insert(q.clone());
            }
        }
        match self.workers.get(&info.worker_id) {
            Some((known, _)) if known.seen_at > info.seen_at => {}
            _ => {
                self.workers.insert(info.worker_id.clone(), (info, now));
            }
        }
    }

    /// The live workers: heard within twice their interval (plus a margin), not stopping.
    pub(crate) fn workers(&mut self, now: Instant) -> Vec<WorkerInfo> {
        self.workers.retain(|_, (info, heard)| {
            let every = Duration::from_millis(info.every_ms.max(1));
            !info.stopping && now.duration_since(*heard) <= every * 2 + Duration::from_secs(2)
        });
        self.workers.values().map(|(w, _)| w.clone()).collect()
    }

    /// The buckets of the last 15 minutes up to `now`, empty ones included, oldest first.
    pub(crate) fn history(&self, now: DateTime<Utc>) -> Vec<Bucket> {
        let last = now.timestamp().div_euclid(BUCKET_SECS) * BUCKET_SECS;
        let first = last - BUCKET_SECS * (BUCKETS as i64 - 1);
        let mut heard = self.buckets.iter().filter(|b| b.start >= first).peekable();
        let mut out = Vec::with_capacity(BUCKETS);
        let mut start = first;
        while start <= last {
            match heard.peek() {
                Some(b) if b.start == start => {
                    out.push((*b).clone());
                    heard.next();
                }
                _ => out.push(Bucket {
                    start,
                    ..Bucket::default()
                }),
            }
            start += BUCKET_SECS;
        }
        out
    }

    /// The events heard for `id`, oldest first.
    pub(crate) fn events_of(&self, id: &TaskId) -> Vec<TaskEvent> {
        self.recent
            .iter()
            .filter(|e| e.task_id == *id)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, status: TaskStatus, attempt: u32, at: DateTime<Utc>) -> TaskEvent {
        TaskEvent {
            task_id: TaskId::parse(id).unwrap(),
            queue: QueueName::parse("q").unwrap(),
            status,
            attempt,
            worker_id: None,
            at,
        }
    }

    #[test]
    fn a_finished_task_counts_with_its_run_and_total_time() {
        let shared = Shared::new(Backends::memory(), DashboardOptions::default());
        let mut live = shared.live.lock();
        let t0 = Utc::now();
        let ms = chrono::Duration::milliseconds;
        live.heard_event(&event("a", TaskStatus::Pending, 0, t0), t0);
        live.heard_event(&event("a", TaskStatus::Running, 1, t0 + ms(100)), t0);
        live.heard_event(&event("a", TaskStatus::Completed, 1, t0 + ms(350)), t0);
        // A failure whose start was not heard counts, without a latency.
        live.heard_event(&event("b", TaskStatus::Failed, 1, t0 + ms(10)), t0);
        let history = live.history(t0);
        assert_eq!(history.len(), BUCKETS);
        let b = history.last().unwrap();
        assert_eq!((b.completed, b.failed, b.run_n, b.total_n), (1, 1, 1, 1));
        assert_eq!(b.run_ms_max, 250.0);
        assert_eq!(b.total_ms_max, 350.0);
        assert!(history[..BUCKETS - 1].iter().all(|b| b.completed == 0));
        assert_eq!(live.events_of(&TaskId::parse("a").unwrap()).len(), 3);
        assert!(live.queues.contains(&QueueName::parse("q").unwrap()));
        // Fifteen minutes later the bucket is gone from the history.
        let later = live.history(t0 + chrono::Duration::minutes(16));
        assert!(later.iter().all(|b| b.completed == 0), "{later:?}");
    }
}
