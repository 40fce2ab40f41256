//! The spans of a dispatch and of each attempt, named and described after OpenTelemetry's
//! messaging conventions ("publish {queue}" of kind producer, "process {queue}" of kind
//! consumer; `messaging.system`, `messaging.destination.name`, `messaging.message.id`). With
//! the feature `otel`, the dispatch span's W3C context is stored with the task
//! ([`Task::traceparent`]) and each attempt's span is made its child, so a pipeline's tasks
//! form one trace whichever processes ran them. Without the feature the spans are plain
//! `tracing` spans and the stored traceparent is only carried.

use tracing::Span;

use crate::model::Task;

/// The span of a dispatch of `task` on a bus of backend `system`.
pub(crate) fn publish_span(system: &'static str, task: &Task) -> Span {
    let name = format!("publish {}", task.queue);
    tracing::info_span!(
        "publish",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.destination.name = task.queue.as_str(),
        messaging.message.id = task.task_id.as_str(),
    )
}

/// The span of one attempt at `task` (status, when it fails, recorded by [`failed`]).
pub(crate) fn process_span(system: &'static str, task: &Task) -> Span {
    let name = format!("process {}", task.queue);
    let span = tracing::info_span!(
        "process",
        otel.name = name.as_str(),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.destination.name = task.queue.as_str(),
        messaging.message.id = task.task_id.as_str(),
        orchestra.attempt = task.state.attempt,
    );
    if let Some(tp) = &task.traceparent {
        set_remote_parent(&span, tp);
    }
    span
}

/// Marks an attempt's span as failed.
pub(crate) fn failed(span: &Span) {
    span.record("otel.status_code", "ERROR");
}

/// The W3C traceparent of `span`'s OpenTelemetry context; `None` without the feature `otel`,
/// or when no OpenTelemetry layer records spans.
#[cfg(feature = "otel")]
pub(crate) fn traceparent_of(span: &Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Without the feature `otel` a span has no trace context to pass on.
#[cfg(not(feature = "otel"))]
pub(crate) fn traceparent_of(_span: &Span) -> Option<String> {
    None
}

/// The remote span context a W3C `traceparent` names; `None` when malformed.
#[cfg(feature = "otel")]
fn span_context(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    crate::model::validate_traceparent(traceparent).ok()?;
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (Ok(trace_id), Ok(span_id), Ok(flags)) = (
        TraceId::from_hex(parts[1]),
        SpanId::from_hex(parts[2]),
        u8::from_str_radix(parts[3], 16),
    ) else {
        return None;
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    ))
}

/// Makes `span` a child of the remote span `traceparent` names (ignored when malformed).
#[cfg(feature = "otel")]
pub(crate) fn set_remote_parent(span: &Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(remote) = span_context(traceparent) {
        let cx = opentelemetry::Context::new().with_remote_span_context(remote);
        let _ = span.set_parent(cx);
    }
}

/// Links `span` (a dependent's dispatch) to the dispatch spans of the tasks it depends on,
/// from their stored traceparents: the dependent points at what it waits for, also when it is
/// dispatched in another trace. A parent that cannot be read is not linked (the dispatch
/// itself then says whether it exists).
#[cfg(feature = "otel")]
pub(crate) async fn link_parents(
    span: &Span,
    registry: &dyn crate::registry::Registry,
    parents: &[crate::model::TaskId],
) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    for parent in parents {
        if let Ok(Some(t)) = registry.get(parent).await {
            if let Some(cx) = t.traceparent.as_deref().and_then(span_context) {
                span.add_link(cx);
            }
        }
    }
}

/// Without the feature `otel` there is nothing to link.
#[cfg(not(feature = "otel"))]
pub(crate) async fn link_parents(
    _span: &Span,
    _registry: &dyn crate::registry::Registry,
    _parents: &[crate::model::TaskId],
) {
}

/// Without the feature `otel` there is no trace to join.
#[cfg(not(feature = "otel"))]
pub(crate) fn set_remote_parent(_span: &Span, _traceparent: &str) {}
