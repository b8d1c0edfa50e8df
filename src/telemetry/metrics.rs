//! Prometheus metrics: one registry per process, rendered by `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The metrics Kobe records. Cloning is cheap (the collectors are reference-counted), so every
/// component holds its own handle.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route pattern, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by route pattern and method.
    pub http_request_duration: HistogramVec,
    /// Tasks accepted by `POST /task/start`, by task name.
    pub tasks_submitted: IntCounterVec,
    /// Finished task attempts by task name and outcome state.
    pub task_outcomes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("kobe_http_requests_total", "HTTP requests answered."),
            &["route", "method", "status"],
        )
        .expect("static metric definition");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "kobe_http_request_duration_seconds",
                "HTTP request latency.",
            ),
            &["route", "method"],
        )
        .expect("static metric definition");
        let tasks_submitted = IntCounterVec::new(
            Opts::new("kobe_tasks_submitted_total", "Tasks accepted by the API."),
            &["task"],
        )
        .expect("static metric definition");
        let task_outcomes = IntCounterVec::new(
            Opts::new(
                "kobe_task_outcomes_total",
                "Finished task attempts by final state.",
            ),
            &["task", "state"],
        )
        .expect("static metric definition");
        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_request_duration.clone()),
            Box::new(tasks_submitted.clone()),
            Box::new(task_outcomes.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            http_requests,
            http_request_duration,
            tasks_submitted,
            task_outcomes,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
