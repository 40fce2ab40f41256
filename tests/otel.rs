//! OpenTelemetry traces across the dispatcher and the worker (feature `otel`): a Researcher →
//! Writer pipeline dispatched under one span is one trace, each attempt's span the child of its
//! dispatch's span, named and described after the messaging conventions; a dependent dispatched
//! in another trace links to its parent's dispatch. Spans are collected
//! with the SDK's in-memory exporter; the backends are memory, Redis, NATS and RabbitMQ (the
//! traceparent then travels through each registry), on the test brokers of `testkit::harness`.

use std::time::Duration;

use agent_orchestra::engine::{handler_fn, TaskContext, TaskError, Worker, WorkerConfig};
use agent_orchestra::{connect, BackendUrls, Backends, ConnectOptions, Dispatcher, TaskStatus};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Runs the pipeline on `b` under a root span and checks the trace it leaves.
async fn pipeline_is_one_trace(b: Backends, tag: &str) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel-test")));
    // Thread-local: the test runs on a current-thread runtime, so every task of the worker
    // and the dispatcher records into it.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (research_q, writing_q) = (format!("{tag}_research"), format!("{tag}_writing"));
    let researcher = handler_fn(|_ctx: TaskContext| async {
        Ok::<_, TaskError>(json!({"summary": "findings"}))
    });
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let a = attempts.clone();
    let writer = handler_fn(move |_ctx: TaskContext| {
        // The first attempt fails: the retry is in the same trace.
        let first = a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        async move {
            match first {
                true => Err(TaskError::retryable("first draft lost")),
                false => Ok(json!({"report": "done"})),
            }
        }
    });
    let config = WorkerConfig {
        worker_id: format!("{tag}-worker"),
        fetch_wait: Duration::from_millis(100),
        retry: agent_orchestra::engine::Backoff {
            base: Duration::from_millis(20),
            factor: 1.0,
            max: Duration::from_millis(20),
            jitter: 0.0,
        },
        ..WorkerConfig::default()
    };
    let d = Dispatcher::new(b.clone());
    let root = tracing::info_span!("pipeline");
    let (r, wr) = async {
        let r = d.task(&research_q).send().await.unwrap();
        let wr = d.task(&writing_q).after([r.clone()]).send().await.unwrap();
        (r, wr)
    }
    .instrument(root)
    .await;
    // A dependent dispatched later, outside that trace: its dispatch links to the parent's.
    let review_q = format!("{tag}_review");
    let rv = d
        .task(&review_q)
        .after([r.clone()])
        .send()
        .instrument(tracing::info_span!("review"))
        .await
        .unwrap();
    // Started after the dispatch span closed: nothing but the stored traceparent links the
    // attempts to it.
    let w = Worker::new(b.clone(), config)
        .handle(&research_q, researcher)
        .unwrap()
        .handle(&writing_q, writer)
        .unwrap()
        .handle(
            &review_q,
            handler_fn(|_ctx: TaskContext| async { Ok::<_, TaskError>(json!("ok")) }),
        )
        .unwrap()
        .start()
        .unwrap();
    let reviewed = d.wait(&rv, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reviewed.status(), TaskStatus::Completed, "{reviewed:?}");
    let done = d.wait(&wr, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.status(), TaskStatus::Completed, "{done:?}");
    assert!(
        done.traceparent.is_some(),
        "the task carries its traceparent"
    );
    w.shutdown().await;
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let root = named(&spans, "pipeline");
    assert_eq!(root.len(), 1, "{spans:#?}");
    let trace = root[0].span_context.trace_id();
    let publish_r = named(&spans, &format!("publish {research_q}"));
    let publish_w = named(&spans, &format!("publish {writing_q}"));
    let process_r = named(&spans, &format!("process {research_q}"));
    let process_w = named(&spans, &format!("process {writing_q}"));
    assert_eq!(
        (
            publish_r.len(),
            publish_w.len(),
            process_r.len(),
            process_w.len()
        ),
        (1, 1, 1, 2),
        "one publish each, one research attempt, two writing attempts: {spans:#?}"
    );
    // The later dependent: its own trace, its dispatch linked to the parent's dispatch.
    let review = named(&spans, "review");
    let publish_v = named(&spans, &format!("publish {review_q}"));
    assert_eq!((review.len(), publish_v.len()), (1, 1), "{spans:#?}");
    assert_ne!(publish_v[0].span_context.trace_id(), trace);
    assert!(
        publish_v[0].links.iter().any(|l| l.span_context.span_id()
            == publish_r[0].span_context.span_id()
            && l.span_context.trace_id() == trace),
        "the dependent's dispatch links to its parent's: {:?}",
        publish_v[0].links
    );
    let in_review_trace =
        |s: &&SpanData| s.span_context.trace_id() == review[0].span_context.trace_id();
    for s in spans
        .iter()
        .filter(|s| s.name != "pipeline" && !in_review_trace(s))
    {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} is in another trace",
            s.name
        );
    }
    for (publish, process, id) in [
        (publish_r[0], &process_r, &r),
        (publish_w[0], &process_w, &wr),
    ] {
        assert_eq!(publish.span_kind, SpanKind::Producer);
        assert_eq!(publish.parent_span_id, root[0].span_context.span_id());
        assert_eq!(
            attribute(publish, "messaging.message.id"),
            Some(Value::from(id.to_string()))
        );
        for p in process.iter() {
            assert_eq!(p.span_kind, SpanKind::Consumer);
            assert_eq!(
                p.parent_span_id,
                publish.span_context.span_id(),
                "an attempt's span is the child of its dispatch's"
            );
            assert_eq!(
                attribute(p, "messaging.destination.name"),
                attribute(publish, "messaging.destination.name")
            );
            assert_eq!(
                attribute(p, "messaging.system"),
                Some(Value::from(b.bus.backend()))
            );
        }
    }
    assert_eq!(
        process_w[0].status,
        opentelemetry::trace::Status::error(""),
        "the failed attempt's span is an error"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_pipeline_is_one_trace_on_memory() {
    pipeline_is_one_trace(Backends::memory(), "otel_mem").await;
}

/// The pipeline on a real broker (the test brokers of `testkit::harness`, like every other
/// suite): the traceparent travels through that backend's registry.
#[allow(dead_code)]
async fn on_broker(kind: agent_orchestra::testkit::harness::BrokerKind, tag: &str) {
    use agent_orchestra::testkit::harness::{broker_url, unique_prefix};
    let url = broker_url(kind).await;
    let prefix = unique_prefix(tag);
    let opts = ConnectOptions {
        prefix: prefix.clone(),
        ..ConnectOptions::default()
    };
    let b = connect(&BackendUrls::all(&url), &opts).await.unwrap();
    pipeline_is_one_trace(b, tag).await;
    let queues = [
        format!("{tag}_research"),
        format!("{tag}_writing"),
        format!("{tag}_review"),
    ]
    .map(|q| agent_orchestra::QueueName::parse(&q).unwrap());
    agent_orchestra::connect::drop_namespace(&BackendUrls::all(&url), &opts, &queues)
        .await
        .unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "current_thread")]
async fn a_pipeline_is_one_trace_on_redis() {
    on_broker(
        agent_orchestra::testkit::harness::BrokerKind::Redis,
        "otel_redis",
    )
    .await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "current_thread")]
async fn a_pipeline_is_one_trace_on_nats() {
    on_broker(
        agent_orchestra::testkit::harness::BrokerKind::Nats,
        "otel_nats",
    )
    .await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "current_thread")]
async fn a_pipeline_is_one_trace_on_rabbitmq() {
    on_broker(
        agent_orchestra::testkit::harness::BrokerKind::Amqp,
        "otel_amqp",
    )
    .await;
}
