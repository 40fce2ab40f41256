//! Counters a worker keeps, readable at any time and printable in Prometheus' text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A worker's counters (monotonic since start).
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    /// Messages fetched from the bus.
    pub fetched: AtomicU64,
    /// Tasks claimed (PENDING → RUNNING, or a stale RUNNING taken over).
    pub claimed: AtomicU64,
    /// Tasks this worker COMPLETED.
    pub completed: AtomicU64,
    /// Attempts that failed and were scheduled for another attempt.
    pub retried: AtomicU64,
    /// Tasks this worker marked FAILED.
    pub failed: AtomicU64,
    /// Handler panics caught.
    pub panics: AtomicU64,
    /// Messages dead-lettered (malformed, unknown task).
    pub dead_lettered: AtomicU64,
    /// Deliveries dropped because the task was not claimable (duplicate, already finished).
    pub skipped: AtomicU64,
    /// Redeliveries of a task still RUNNING under another attempt's lease, given back until the
    /// lease ends (that attempt's worker may have died).
    pub deferred: AtomicU64,
    /// Attempts whose lease was lost to another attempt (their result was discarded).
    pub lease_lost: AtomicU64,
    /// Tasks handed back on shutdown.
    pub handed_back: AtomicU64,
    /// Temporary backend errors seen.
    pub backend_errors: AtomicU64,
    /// Total handler run time, in microseconds.
    pub handler_micros: AtomicU64,
    /// Fetch loops restarted after a panic (a bug in a backend or in the engine: the loop is
    /// started again so that its queue is still served).
    pub fetch_restarts: AtomicU64,
}

impl WorkerMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            fetched: g(&self.fetched),
            claimed: g(&self.claimed),
            completed: g(&self.completed),
            retried: g(&self.retried),
            failed: g(&self.failed),
            panics: g(&self.panics),
            dead_lettered: g(&self.dead_lettered),
            skipped: g(&self.skipped),
            deferred: g(&self.deferred),
            lease_lost: g(&self.lease_lost),
            handed_back: g(&self.handed_back),
            backend_errors: g(&self.backend_errors),
            handler_micros: g(&self.handler_micros),
            fetch_restarts: g(&self.fetch_restarts),
        }
    }
}

/// Plain copy of [`WorkerMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub struct MetricsSnapshot {
    pub fetched: u64,
    pub claimed: u64,
    pub completed: u64,
    pub retried: u64,
    pub failed: u64,
    pub panics: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    pub deferred: u64,
    pub lease_lost: u64,
    pub handed_back: u64,
    pub backend_errors: u64,
    pub handler_micros: u64,
    pub fetch_restarts: u64,
}

impl MetricsSnapshot {
    /// The counters in Prometheus' text exposition format, labelled with `worker`.
    pub fn to_prometheus(&self, worker: &str) -> String {
        let mut out = String::new();
        let worker = worker.replace(['\\', '"'], "_");
        for (name, v) in [
            ("fetched", self.fetched),
            ("claimed", self.claimed),
            ("completed", self.completed),
            ("retried", self.retried),
            ("failed", self.failed),
            ("panics", self.panics),
            ("dead_lettered", self.dead_lettered),
            ("skipped", self.skipped),
            ("deferred", self.deferred),
            ("lease_lost", self.lease_lost),
            ("handed_back", self.handed_back),
            ("fetch_restarts", self.fetch_restarts),
            ("backend_errors", self.backend_errors),
        ] {
            let _ = writeln!(out, "# TYPE orchestra_worker_{name}_total counter");
            let _ = writeln!(
                out,
                "orchestra_worker_{name}_total{{worker=\"{worker}\"}} {v}"
            );
        }
        let _ = writeln!(out, "# TYPE orchestra_worker_handler_seconds_total counter");
        let _ = writeln!(
            out,
            "orchestra_worker_handler_seconds_total{{worker=\"{worker}\"}} {}",
            self.handler_micros as f64 / 1e6
        );
        out
    }
}

/// Gauges read from the backends now, in Prometheus' text exposition format, for an exporter
/// (the CLI's `--metrics`, or an embedding service's own HTTP endpoint next to
/// [`MetricsSnapshot::to_prometheus`]):
///
/// - `orchestra_tasks{status}`: tasks by status, from the registry's counts;
/// - `orchestra_queue_messages{queue, state}` (`state`: `waiting`, `in_flight`, `dead`): the
///   sizes of each of `queues`;
/// - `orchestra_registry_up` and `orchestra_bus_up`: 1, or 0 when that backend could not be read
///   (the error follows as a comment, and its gauges are left out rather than reported as 0).
///
/// Every call asks the backends (one count query, one stats query per queue): scrape it at
/// the pace of a metrics scraper, not in a loop.
pub async fn backend_gauges(backends: &crate::Backends, queues: &[crate::QueueName]) -> String {
    let mut out = String::new();
    match backends.registry.counts().await {
        Ok(counts) => {
            let _ = writeln!(out, "# TYPE orchestra_tasks gauge");
            for s in crate::TaskStatus::ALL {
                let _ = writeln!(
                    out,
                    "orchestra_tasks{{status=\"{}\"}} {}",
                    s.as_str(),
                    counts.get(s)
                );
            }
            let _ = writeln!(out, "# TYPE orchestra_registry_up gauge");
            let _ = writeln!(out, "orchestra_registry_up 1");
        }
        Err(e) => {
            let _ = writeln!(out, "# TYPE orchestra_registry_up gauge");
            let _ = writeln!(out, "orchestra_registry_up 0");
            let _ = writeln!(out, "# {}", comment(&e.to_string()));
        }
    }
    if queues.is_empty() {
        return out;
    }
    let mut sizes = Vec::with_capacity(queues.len());
    let mut failure = None;
    for q in queues {
        match backends.bus.stats(q).await {
            Ok(s) => sizes.push((q, s)),
            Err(e) => {
                failure = Some(format!("queue {q}: {e}"));
                break;
            }
        }
    }
    let _ = writeln!(out, "# TYPE orchestra_bus_up gauge");
    match failure {
        None => {
            let _ = writeln!(out, "orchestra_bus_up 1");
            let _ = writeln!(out, "# TYPE orchestra_queue_messages gauge");
            for (q, s) in sizes {
                for (state, v) in [
                    ("waiting", s.waiting),
                    ("in_flight", s.in_flight),
                    ("dead", s.dead),
                ] {
                    let _ = writeln!(
                        out,
                        "orchestra_queue_messages{{queue=\"{q}\",state=\"{state}\"}} {v}"
                    );
                }
            }
        }
        Some(e) => {
            let _ = writeln!(out, "orchestra_bus_up 0");
            let _ = writeln!(out, "# {}", comment(&e));
        }
    }
    out
}

/// `s` on one line, fit for a `#` comment.
fn comment(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
