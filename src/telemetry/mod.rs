//! Telemetry: the `tracing` subscriber (pretty for terminals, JSON for machines), the panic hook
//! that routes panics through it, and the Prometheus registry.

pub mod metrics;
pub mod otel;
pub mod trace;

use std::backtrace::Backtrace;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Installs the global subscriber. Logs go to stderr, so a command's own output on stdout (the
/// lines of `kobe healthcheck`, say) stays machine-readable.
///
/// Calling it twice is harmless: the second call keeps the first subscriber, which is what test
/// binaries that start several apps need.
pub fn init(filter: &str, format: LogFormat) {
    // `log` records (amiquip logs through `log`) reach tracing through this bridge. amiquip's
    // handshake logs the SASL PLAIN response — the broker password — at debug level: those
    // records never enter, whatever the log filter says.
    let _ = tracing_log::LogTracer::builder()
        .ignore_crate("amiquip::io_loop::handshake_state")
        .init();
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let otel_layer =
        otel::tracer().map(|tracer| tracing_opentelemetry::layer().with_tracer(tracer));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer);
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Logs every panic through `tracing`, with its location and a backtrace, so a panic in a task
/// handler shows up in the same JSON stream as everything else instead of a bare stderr line.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown".to_owned());
        let backtrace = Backtrace::force_capture();
        tracing::error!(
            panic.payload = %payload,
            panic.location = %location,
            panic.backtrace = %backtrace,
            "panic"
        );
    }));
}

/// One JSON object per line with the fields of every enclosing span merged in at the top level,
/// so `task_id`, `task`, `attempt` and `trace_id` can be searched directly on every line a task
/// writes (`{"timestamp", "level", "target", "message", "task_id", …}`).
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(now_rfc3339()));
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        line.insert(
            "target".into(),
            Value::String(event.metadata().target().to_owned()),
        );
        // Outer spans first, so inner spans and then the event's own fields win.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields) {
                        line.extend(map);
                    }
                }
            }
            if let Some(span) = ctx.event_scope().and_then(|mut s| s.next()) {
                line.insert("span".into(), Value::String(span.name().to_owned()));
            }
        }
        let mut visitor = JsonVisitor(&mut line);
        event.record(&mut visitor);
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
}

fn now_rfc3339() -> String {
    mongodb::bson::DateTime::now()
        .try_to_rfc3339_string()
        .unwrap_or_default()
}
