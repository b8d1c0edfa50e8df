//! OpenTelemetry, optional: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported over OTLP
//! (HTTP/protobuf; the standard `OTEL_*` variables configure the exporter). Without it nothing is
//! built, nothing is exported, and nothing slows down.
//!
//! Traces cross the broker in the message's `traceparent` header: the API's span for
//! `POST /task/start` continues the caller's trace (if it sent one), and the worker's span for the
//! task becomes its child, so one trace runs from the request to the task's end.

use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::trace::TraceContext;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The tracer to hand to `tracing-opentelemetry`, when exporting is configured.
pub(super) fn tracer() -> Option<opentelemetry_sdk::trace::Tracer> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    if endpoint.trim().is_empty() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("kobe: OpenTelemetry disabled: cannot build the OTLP exporter: {error}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "kobe".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("kobe");
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// Whether spans are being exported.
pub(crate) fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Flushes and stops the exporter; call once, on the way out.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.shutdown();
    }
}

fn remote(parent: &TraceContext) -> Context {
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        flags,
        true,
        TraceState::default(),
    ))
}

/// Makes `span` a child of `parent` in the exported trace (no-op when not exporting).
pub(crate) fn adopt(span: &tracing::Span, parent: &TraceContext) {
    if enabled() {
        let _ = span.set_parent(remote(parent));
    }
}

/// The trace context to send onward from `span`: the exported span's own ids when exporting,
/// else a child of `parent`, else a new trace.
pub fn outgoing(span: &tracing::Span, parent: Option<&TraceContext>) -> TraceContext {
    if enabled() {
        if let Some(parent) = parent {
            adopt(span, parent);
        }
        let context = span.context();
        let otel_span = context.span();
        let ids = otel_span.span_context();
        if ids.is_valid() {
            return TraceContext {
                trace_id: u128::from_be_bytes(ids.trace_id().to_bytes()),
                span_id: u64::from_be_bytes(ids.span_id().to_bytes()),
                sampled: ids.is_sampled(),
            };
        }
    }
    parent
        .map(TraceContext::child)
        .unwrap_or_else(TraceContext::new_root)
}
