//! What a worker counts, and (feature `metrics`) the engine's metrics in a
//! [`prometheus_client`](https://docs.rs/prometheus-client) registry.
//!
//! [`WorkerMetrics`] are plain atomics that the worker bumps on its hot path, plus a histogram of
//! attempt durations with fixed buckets ([`ATTEMPT_SECONDS_BUCKETS`]): reading them costs the
//! worker nothing. With the `metrics` feature, [`prometheus`] exposes them, and gauges read from
//! the backends (tasks by status, queue sizes), through a `prometheus_client::registry::Registry`
//! that may be the application's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the buckets of the attempt-duration histogram
/// ([`WorkerMetrics::attempt_durations`]); one more bucket, `+Inf`, takes longer attempts.
pub const ATTEMPT_SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of the histogram, `+Inf` included.
const BUCKETS: usize = ATTEMPT_SECONDS_BUCKETS.len() + 1;

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
    /// Attempts stopped at their timeout (the task's own, else the worker's).
    pub timed_out: AtomicU64,
    /// Tasks failed unrun because their deadline had passed when this worker claimed them.
    pub expired_deadline: AtomicU64,
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
    /// Attempts ended because an operator cancelled their task while they ran.
    pub cancelled: AtomicU64,
    /// Temporary backend errors seen.
    pub backend_errors: AtomicU64,
    /// Total handler run time, in microseconds.
    pub handler_micros: AtomicU64,
    /// Fetch loops restarted after a panic (a bug in a backend or in the engine: the loop is
    /// started again so that its queue is still served).
    pub fetch_restarts: AtomicU64,
    /// Time fetch loops waited for a permit of a limited queue (its rate or its concurrency
    /// cap across workers), in microseconds.
    pub limit_wait_micros: AtomicU64,
    /// Attempts per bucket of [`ATTEMPT_SECONDS_BUCKETS`] (not cumulative), `+Inf` last.
    attempt_buckets: [AtomicU64; BUCKETS],
}

impl WorkerMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one attempt's run time (the handler under its lease): adds it to
    /// `handler_micros` and to the attempt-duration histogram.
    pub fn record_attempt(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.handler_micros.fetch_add(micros, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = ATTEMPT_SECONDS_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BUCKETS - 1);
        self.attempt_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The attempt-duration histogram now.
    pub fn attempt_durations(&self) -> AttemptDurations {
        AttemptDurations {
            counts: std::array::from_fn(|i| self.attempt_buckets[i].load(Ordering::Relaxed)),
            sum_seconds: self.handler_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Adds a wait for a limited queue's permit to `limit_wait_micros`.
    pub(crate) fn record_limit_wait(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.limit_wait_micros.fetch_add(micros, Ordering::Relaxed);
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
            timed_out: g(&self.timed_out),
            expired_deadline: g(&self.expired_deadline),
            dead_lettered: g(&self.dead_lettered),
            skipped: g(&self.skipped),
            deferred: g(&self.deferred),
            lease_lost: g(&self.lease_lost),
            handed_back: g(&self.handed_back),
            cancelled: g(&self.cancelled),
            backend_errors: g(&self.backend_errors),
            handler_micros: g(&self.handler_micros),
            fetch_restarts: g(&self.fetch_restarts),
            limit_wait_micros: g(&self.limit_wait_micros),
        }
    }
}

/// A copy of a worker's attempt-duration histogram.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptDurations {
    /// Attempts per bucket of [`ATTEMPT_SECONDS_BUCKETS`] (not cumulative), then those longer
    /// than the last bound.
    pub counts: [u64; ATTEMPT_SECONDS_BUCKETS.len() + 1],
    /// The attempts' total run time, in seconds.
    pub sum_seconds: f64,
}

impl AttemptDurations {
    /// Attempts recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
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
    pub timed_out: u64,
    pub expired_deadline: u64,
    pub dead_lettered: u64,
    pub skipped: u64,
    pub deferred: u64,
    pub lease_lost: u64,
    pub handed_back: u64,
    pub cancelled: u64,
    pub backend_errors: u64,
    pub handler_micros: u64,
    pub fetch_restarts: u64,
    pub limit_wait_micros: u64,
}

/// The engine's metrics in a `prometheus_client` registry (feature `metrics`).
///
/// - [`WorkerCollector`](prometheus::WorkerCollector): each added worker's counters
///   (`orchestra_worker_<name>_total{worker}`), its handler time
///   (`orchestra_worker_handler_seconds_total{worker}`) and its attempt-duration histogram
///   (`orchestra_worker_attempt_duration_seconds{worker}`), read at each scrape;
/// - [`BackendGauges`](prometheus::BackendGauges): `orchestra_tasks{status}`,
///   `orchestra_queue_messages{queue, state}`, `orchestra_registry_up`, `orchestra_bus_up`, as
///   read by the last [`refresh`](prometheus::BackendGauges::refresh) (the backends are asked
///   asynchronously, so a scrape handler refreshes before it encodes).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agent_orchestra::Result<()> {
/// use std::sync::Arc;
/// use agent_orchestra::engine::metrics::prometheus::{BackendGauges, WorkerCollector};
/// use agent_orchestra::engine::WorkerMetrics;
/// use agent_orchestra::{Backends, QueueName};
/// use prometheus_client::registry::Registry;
///
/// let backends = Backends::memory();
/// // The application's registry, with its own metrics beside.
/// let mut registry = Registry::default();
/// let workers = WorkerCollector::register(&mut registry);
/// // `workers.add(&handle)` for a started worker; here, counters of our own.
/// workers.add_metrics("worker-1", Arc::new(WorkerMetrics::default()));
/// let gauges = BackendGauges::register(&mut registry);
///
/// // In the scrape handler:
/// gauges.refresh(&backends, &[QueueName::parse("emails")?]).await;
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains("orchestra_tasks{status=\"PENDING\"} 0"));
/// assert!(text.contains("orchestra_worker_completed_total{worker=\"worker-1\"} 0"));
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "metrics")]
pub mod prometheus {
    use std::fmt;
    use std::sync::Arc;

    use parking_lot::Mutex;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::registry::{Registry, Unit};

    use super::{AttemptDurations, MetricsSnapshot, WorkerMetrics, ATTEMPT_SECONDS_BUCKETS};
    use crate::bus::QueueStats;
    use crate::engine::WorkerHandle;
    use crate::registry::StatusCounts;
    use crate::{Backends, QueueName, TaskStatus};

    /// Each counter's name (without `_total`), help and value.
    type CounterRow = (&'static str, &'static str, fn(&MetricsSnapshot) -> u64);

    const COUNTERS: [CounterRow; 16] = [
        (
            "orchestra_worker_fetched",
            "Messages fetched from the bus.",
            |s| s.fetched,
        ),
        (
            "orchestra_worker_claimed",
            "Tasks claimed (PENDING to RUNNING, or a stale RUNNING taken over).",
            |s| s.claimed,
        ),
        (
            "orchestra_worker_completed",
            "Tasks this worker completed.",
            |s| s.completed,
        ),
        (
            "orchestra_worker_retried",
            "Attempts that failed and were scheduled for another attempt.",
            |s| s.retried,
        ),
        (
            "orchestra_worker_failed",
            "Tasks this worker marked FAILED.",
            |s| s.failed,
        ),
        (
            "orchestra_worker_panics",
            "Handler panics caught.",
            |s| s.panics,
        ),
        (
            "orchestra_worker_timed_out",
            "Attempts stopped at their timeout.",
            |s| s.timed_out,
        ),
        (
            "orchestra_worker_expired_deadline",
            "Tasks failed unrun because their deadline had passed when claimed.",
            |s| s.expired_deadline,
        ),
        (
            "orchestra_worker_dead_lettered",
            "Messages dead-lettered (malformed, unknown task).",
            |s| s.dead_lettered,
        ),
        (
            "orchestra_worker_skipped",
            "Deliveries dropped because the task was not claimable (duplicate, already finished).",
            |s| s.skipped,
        ),
        (
            "orchestra_worker_deferred",
            "Redeliveries of a task still running under another attempt's lease, given back until the lease ends.",
            |s| s.deferred,
        ),
        (
            "orchestra_worker_lease_lost",
            "Attempts whose lease was lost to another attempt (their result was discarded).",
            |s| s.lease_lost,
        ),
        (
            "orchestra_worker_handed_back",
            "Tasks handed back on shutdown.",
            |s| s.handed_back,
        ),
        (
            "orchestra_worker_cancelled",
            "Attempts ended because an operator cancelled their task while they ran.",
            |s| s.cancelled,
        ),
        (
            "orchestra_worker_fetch_restarts",
            "Fetch loops restarted after a panic.",
            |s| s.fetch_restarts,
        ),
        (
            "orchestra_worker_backend_errors",
            "Temporary backend errors seen.",
            |s| s.backend_errors,
        ),
    ];

    /// A worker's id and its live counters.
    type Labelled = (String, Arc<WorkerMetrics>);

    /// Workers' counters and attempt-duration histograms, labelled `worker`, read from their
    /// [`WorkerMetrics`] at each scrape. Clones share the same list of workers.
    #[derive(Clone, Debug, Default)]
    pub struct WorkerCollector {
        workers: Arc<Mutex<Vec<Labelled>>>,
    }

    impl WorkerCollector {
        /// Registers a collector, with no worker yet, into `registry`.
        pub fn register(registry: &mut Registry) -> WorkerCollector {
            let collector = WorkerCollector::default();
            registry.register_collector(Box::new(collector.clone()));
            collector
        }

        /// Adds a started worker (labelled with its id); it stays after the worker stops,
        /// with its last values.
        pub fn add(&self, worker: &WorkerHandle) {
            self.add_metrics(worker.worker_id(), worker.live_metrics());
        }

        /// Adds the counters of the worker `worker_id` (see [`WorkerHandle::live_metrics`]).
        pub fn add_metrics(&self, worker_id: &str, metrics: Arc<WorkerMetrics>) {
            self.workers.lock().push((worker_id.to_string(), metrics));
        }
    }

    impl Collector for WorkerCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
            let workers: Vec<(String, MetricsSnapshot, AttemptDurations)> = self
                .workers
                .lock()
                .iter()
                .map(|(id, m)| (id.clone(), m.snapshot(), m.attempt_durations()))
                .collect();
            if workers.is_empty() {
                return Ok(());
            }
            for (name, help, value) in COUNTERS {
                let mut metric =
                    encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for (id, snapshot, _) in &workers {
                    let labels = [("worker", id.as_str())];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&value(snapshot), None)?;
                }
            }
            let mut metric = encoder.encode_descriptor(
                "orchestra_worker_handler",
                "Total time handlers ran.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (id, snapshot, _) in &workers {
                let labels = [("worker", id.as_str())];
                let seconds = snapshot.handler_micros as f64 / 1e6;
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&seconds, None)?;
            }
            let mut metric = encoder.encode_descriptor(
                "orchestra_worker_limit_wait",
                "Total time fetch loops waited for a permit of a limited queue.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (id, snapshot, _) in &workers {
                let labels = [("worker", id.as_str())];
                let seconds = snapshot.limit_wait_micros as f64 / 1e6;
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&seconds, None)?;
            }
            let mut metric = encoder.encode_descriptor(
                "orchestra_worker_attempt_duration",
                "How long each attempt ran (its handler, under the task's lease).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (id, _, durations) in &workers {
                let labels = [("worker", id.as_str())];
                let buckets: Vec<(f64, u64)> = ATTEMPT_SECONDS_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(durations.counts)
                    .collect();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        durations.sum_seconds,
                        durations.count(),
                        &buckets,
                        None,
                    )?;
            }
            Ok(())
        }
    }

    /// What the backends answered at the last refresh.
    #[derive(Debug, Default)]
    struct Reading {
        /// The registry's counts, or `None` when it could not be read.
        tasks: Option<StatusCounts>,
        /// Each queue's sizes, or `Err` when the bus could not be read; `None` when no queue
        /// was asked about.
        queues: Option<Result<Vec<(QueueName, QueueStats)>, ()>>,
    }

    /// Gauges read from the backends by [`refresh`](Self::refresh), encoded at each scrape:
    ///
    /// - `orchestra_tasks{status}`: tasks by status, from the registry's counts;
    /// - `orchestra_queue_messages{queue, state}` (`state`: `waiting`, `in_flight`, `dead`): the
    ///   sizes of each queue asked about;
    /// - `orchestra_registry_up` and `orchestra_bus_up`: 1, or 0 when that backend could not be
    ///   read (its gauges are then left out rather than reported as 0, and the error is logged).
    ///
    /// Nothing is encoded before the first refresh. Clones share the same reading.
    #[derive(Clone, Debug, Default)]
    pub struct BackendGauges {
        reading: Arc<Mutex<Option<Reading>>>,
    }

    impl BackendGauges {
        /// Registers the gauges, unread yet, into `registry`.
        pub fn register(registry: &mut Registry) -> BackendGauges {
            let gauges = BackendGauges::default();
            registry.register_collector(Box::new(gauges.clone()));
            gauges
        }

        /// Reads the registry's counts and the sizes of `queues` (one count query, one stats
        /// query per queue): call it from a scrape handler, at the pace of a scraper, not in a
        /// loop.
        pub async fn refresh(&self, backends: &Backends, queues: &[QueueName]) {
            let tasks = match backends.registry.counts().await {
                Ok(counts) => Some(counts),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: the registry could not be read");
                    None
                }
            };
            let queues = if queues.is_empty() {
                None
            } else {
                let mut sizes = Vec::with_capacity(queues.len());
                let mut read = Ok(());
                for q in queues {
                    match backends.bus.stats(q).await {
                        Ok(s) => sizes.push((q.clone(), s)),
                        Err(e) => {
                            tracing::warn!(queue = %q, error = %e, "metrics: the bus could not be read");
                            read = Err(());
                            break;
                        }
                    }
                }
                Some(read.map(|()| sizes))
            };
            *self.reading.lock() = Some(Reading { tasks, queues });
        }
    }

    impl Collector for BackendGauges {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
            let guard = self.reading.lock();
            let Some(reading) = guard.as_ref() else {
                return Ok(());
            };
            if let Some(counts) = &reading.tasks {
                let mut metric = encoder.encode_descriptor(
                    "orchestra_tasks",
                    "Tasks by status, from the registry's counts.",
                    None,
                    MetricType::Gauge,
                )?;
                for status in TaskStatus::ALL {
                    let labels = [("status", status.as_str())];
                    metric
                        .encode_family(&labels)?
                        .encode_gauge(&counts.get(status))?;
                }
            }
            encoder
                .encode_descriptor(
                    "orchestra_registry_up",
                    "1 when the registry answered the last scrape, else 0.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&u64::from(reading.tasks.is_some()))?;
            let Some(queues) = &reading.queues else {
                return Ok(());
            };
            encoder
                .encode_descriptor(
                    "orchestra_bus_up",
                    "1 when the bus answered the last scrape, else 0.",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&u64::from(queues.is_ok()))?;
            if let Ok(sizes) = queues {
                let mut metric = encoder.encode_descriptor(
                    "orchestra_queue_messages",
                    "Messages of a queue by state: waiting (ready or delayed), in_flight (leased), dead (dead letters).",
                    None,
                    MetricType::Gauge,
                )?;
                for (queue, stats) in sizes {
                    for (state, value) in [
                        ("waiting", stats.waiting),
                        ("in_flight", stats.in_flight),
                        ("dead", stats.dead),
                    ] {
                        let labels = [("queue", queue.as_str()), ("state", state)];
                        metric.encode_family(&labels)?.encode_gauge(&value)?;
                    }
                }
            }
            Ok(())
        }
    }

    /// The backend gauges alone, read now, as OpenMetrics text (a one-off: a service with a
    /// registry of its own registers [`BackendGauges`] in it instead).
    pub async fn backend_gauges(backends: &Backends, queues: &[QueueName]) -> String {
        let mut registry = Registry::default();
        let gauges = BackendGauges::register(&mut registry);
        gauges.refresh(backends, queues).await;
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::time::Duration;

        fn encode(registry: &Registry) -> String {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text
        }

        #[test]
        fn workers_are_encoded_with_help_type_and_histogram() {
            let mut registry = Registry::default();
            let workers = WorkerCollector::register(&mut registry);
            assert_eq!(
                encode(&registry),
                "# EOF\n",
                "nothing before a worker is added"
            );
            let m = Arc::new(WorkerMetrics::default());
            WorkerMetrics::inc(&m.completed);
            WorkerMetrics::inc(&m.completed);
            m.record_attempt(Duration::from_millis(3));
            m.record_attempt(Duration::from_millis(700));
            m.record_attempt(Duration::from_secs(3600));
            workers.add_metrics("w\"1", m.clone());
            let text = encode(&registry);
            for line in [
                "# HELP orchestra_worker_completed Tasks this worker completed.",
                "# TYPE orchestra_worker_completed counter",
                "orchestra_worker_completed_total{worker=\"w\\\"1\"} 2",
                "orchestra_worker_failed_total{worker=\"w\\\"1\"} 0",
                "# TYPE orchestra_worker_handler_seconds counter",
                "orchestra_worker_handler_seconds_total{worker=\"w\\\"1\"} 3600.703",
                "# TYPE orchestra_worker_attempt_duration_seconds histogram",
                "orchestra_worker_attempt_duration_seconds_count{worker=\"w\\\"1\"} 3",
                "orchestra_worker_attempt_duration_seconds_bucket{le=\"0.0025\",worker=\"w\\\"1\"} 0",
                "orchestra_worker_attempt_duration_seconds_bucket{le=\"0.005\",worker=\"w\\\"1\"} 1",
                "orchestra_worker_attempt_duration_seconds_bucket{le=\"1.0\",worker=\"w\\\"1\"} 2",
                "orchestra_worker_attempt_duration_seconds_bucket{le=\"300.0\",worker=\"w\\\"1\"} 2",
                "orchestra_worker_attempt_duration_seconds_bucket{le=\"+Inf\",worker=\"w\\\"1\"} 3",
            ] {
                assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
            }
            assert_eq!(m.attempt_durations().count(), 3);
        }

        #[tokio::test]
        async fn backend_gauges_show_counts_and_sizes_after_a_refresh() {
            let backends = Backends::memory();
            let q = QueueName::parse("mq").unwrap();
            let mut registry = Registry::default();
            let gauges = BackendGauges::register(&mut registry);
            assert_eq!(encode(&registry), "# EOF\n", "nothing before a refresh");
            gauges.refresh(&backends, std::slice::from_ref(&q)).await;
            let text = encode(&registry);
            for line in [
                "# TYPE orchestra_tasks gauge",
                "orchestra_tasks{status=\"PENDING\"} 0",
                "orchestra_registry_up 1",
                "orchestra_bus_up 1",
                "orchestra_queue_messages{queue=\"mq\",state=\"waiting\"} 0",
            ] {
                assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
            }
            let alone = backend_gauges(&backends, &[]).await;
            assert!(alone.contains("orchestra_registry_up 1"), "{alone}");
            assert!(
                !alone.contains("orchestra_bus_up"),
                "no queue asked: {alone}"
            );
        }
    }
}
