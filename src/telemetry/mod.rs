//! Telemetry: the `tracing` subscriber (pretty for terminals, JSON for machines), the panic hook
//! that routes panics through it, and the Prometheus registry.

pub mod metrics;
pub mod trace;

use std::backtrace::Backtrace;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Logs go to stderr, so a command's own output on stdout (the
/// lines of `kobe healthcheck`, say) stays machine-readable.
///
/// Calling it twice is harmless: the second call keeps the first subscriber, which is what test
/// binaries that start several apps need.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Logs every panic through `tracing`, with its location and a backtrace, so a panic in a task
/// handler shows up in the same JSON stream as everything else instead of a bare stderr line.
pub fn install_panic_hook() {
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
