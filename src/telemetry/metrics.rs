//! Prometheus metrics: one registry per process, rendered by `/metrics` (on `serve`, and on
//! `worker --metrics-addr`). Names follow Prometheus conventions: `kobe_` prefix, base units
//! (seconds, bytes), `_total` for counters.
//!
//! The registry is process-wide ([`metrics()`]) because what it measures is: the publisher thread,
//! the MongoDB driver's command events and the Redis pool all record into it without being handed
//! a handle through every layer.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets from 0.5 ms to 30 s: broker round trips and database calls sit at the low
/// end, task run times anywhere.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why a message went to the dead-letter queue (the `reason` label).
pub(crate) const DEAD_LETTER_REASONS: [&str; 6] = [
    "malformed",
    "unknown_task",
    "permanent_error",
    "retries_exhausted",
    "time_limit",
    "payload_missing",
];

/// What Kobe measures.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route pattern, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by route pattern and method.
    pub http_request_duration: HistogramVec,
    /// Tasks accepted by `POST /task/start`, by task name.
    pub tasks_submitted: IntCounterVec,
    /// Messages handed to the broker / confirmed / nacked / failed (timeout, connection).
    pub amqp_publishes: IntCounterVec,
    /// From publish to the broker's confirm.
    pub amqp_confirm_duration: HistogramVec,
    /// Finished task attempts by task name and the state they left the task in.
    pub task_outcomes: IntCounterVec,
    /// Handler run time by task name.
    pub task_duration: HistogramVec,
    /// Retries scheduled, by task name.
    pub task_retries: IntCounterVec,
    /// Dead-lettered messages by reason.
    pub dead_letters: IntCounterVec,
    /// Tasks running now in this process.
    pub tasks_in_flight: IntGauge,
    /// Messages ready in each queue (polled).
    pub queue_depth: IntGaugeVec,
    /// Leases on the frontier by outcome (`taken`: free item; `reclaimed`: an expired lease).
    pub leases: IntCounterVec,
    /// MongoDB command latency by command name.
    pub mongodb_duration: HistogramVec,
    /// MongoDB command failures by command name.
    pub mongodb_errors: IntCounterVec,
    /// Redis command latency by command.
    pub redis_duration: HistogramVec,
    /// Redis failures by command.
    pub redis_errors: IntCounterVec,
    /// MongoDB commands sent, by purpose (`<command>:<collection>`, from the driver's events).
    pub mongo_commands: IntCounterVec,
    /// Statements in each group-commit command, by collection.
    pub mongo_batch_size: HistogramVec,
    /// Statements written through group commit, by what they were for.
    pub mongo_statements: IntCounterVec,
    /// Submissions whose confirm did not come: `closed` (not run, the client got 503),
    /// `accepted` (a worker had taken the task already, the client got 202) or `closing` (the
    /// client got 503 and the task is being closed in the background: MongoDB did not answer).
    pub lost_confirms: IntCounterVec,
    /// Deliveries handed back to their queue because no run slot freed up in time.
    pub deliveries_returned: prometheus::IntCounter,
    /// A task's execution lease taken over from an attempt that stopped renewing it.
    pub lease_takeovers: IntCounterVec,
    /// Handlers stopped because their lease could not be renewed (MongoDB did not answer).
    pub lease_abandoned: prometheus::IntCounter,
    /// Lease renewals sent (one command for all of a worker's running attempts) and the
    /// leases they extended.
    pub lease_renewals: prometheus::IntCounter,
    pub leases_renewed: prometheus::IntCounter,
    /// Deliveries settled without running the task again: already finished, held by a live
    /// attempt, a stale attempt, or a lost consumer connection.
    pub duplicate_deliveries: IntCounterVec,
    pub dlq_operations: IntCounterVec,
    /// 1 while this replica fires the periodic tasks.
    pub schedule_leader: IntGauge,
    /// Periodic tasks fired, missed (passed while no replica fired) or failed to submit.
    pub schedule_firings: IntCounterVec,
    /// Operators' requests on tasks (`retry`, `cancel`), and cancels a worker passed on to a
    /// running handler (`cancel`/`signalled`), by outcome.
    pub task_operations: IntCounterVec,
    /// Workflows started, and ended by state (`SUCCESS`, `FAILURE`, `REVOKED`).
    pub workflows: IntCounterVec,
    /// From the last outcome a step waited for to that step's submission confirmed.
    pub workflow_join_duration: HistogramVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

fn single_counter(registry: &Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let metric = prometheus::IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(
                prometheus::process_collector::ProcessCollector::new(
                    std::process::id() as i32,
                    "kobe",
                ),
            ));
        }
        let tasks_in_flight =
            IntGauge::new("kobe_tasks_in_flight", "Tasks running now in this process.")
                .expect("valid metric");
        r.register(Box::new(tasks_in_flight.clone()))
            .expect("unique metric name");
        let schedule_leader = IntGauge::new(
            "kobe_schedule_leader",
            "1 while this replica fires the periodic tasks.",
        )
        .expect("valid metric");
        r.register(Box::new(schedule_leader.clone()))
            .expect("unique metric name");
        let queue_depth = IntGaugeVec::new(
            Opts::new("kobe_queue_depth", "Messages ready in each queue (polled)."),
            &["queue"],
        )
        .expect("valid metric");
        r.register(Box::new(queue_depth.clone()))
            .expect("unique metric name");

        let metrics = Self {
            http_requests: counter(
                &r,
                "kobe_http_requests_total",
                "HTTP requests answered.",
                &["route", "method", "status"],
            ),
            http_request_duration: histogram(
                &r,
                "kobe_http_request_duration_seconds",
                "HTTP request latency.",
                &["route", "method"],
            ),
            tasks_submitted: counter(
                &r,
                "kobe_tasks_submitted_total",
                "Tasks accepted by the API.",
                &["task"],
            ),
            amqp_publishes: counter(
                &r,
                "kobe_amqp_publishes_total",
                "Messages by publish outcome: published, confirmed, nacked, returned (unroutable), failed, refused_busy.",
                &["outcome"],
            ),
            amqp_confirm_duration: histogram(
                &r,
                "kobe_amqp_confirm_duration_seconds",
                "Time from publish to the broker's confirm.",
                &["outcome"],
            ),
            task_outcomes: counter(
                &r,
                "kobe_task_outcomes_total",
                "Finished task attempts by the state they left the task in.",
                &["task", "state"],
            ),
            task_duration: histogram(
                &r,
                "kobe_task_duration_seconds",
                "Handler run time.",
                &["task"],
            ),
            task_retries: counter(
                &r,
                "kobe_task_retries_total",
                "Retries scheduled.",
                &["task"],
            ),
            dead_letters: counter(
                &r,
                "kobe_dead_letters_total",
                "Messages sent to the dead-letter queue.",
                &["reason"],
            ),
            tasks_in_flight,
            schedule_leader,
            schedule_firings: counter(
                &r,
                "kobe_schedule_firings_total",
                "Periodic tasks by schedule and outcome: fired, missed (passed while no replica fired them), failed (not submitted; tried again).",
                &["schedule", "outcome"],
            ),
            queue_depth,
            leases: counter(
                &r,
                "kobe_leases_total",
                "Leases taken on the frontier.",
                &["outcome"],
            ),
            mongodb_duration: histogram(
                &r,
                "kobe_mongodb_command_duration_seconds",
                "MongoDB command latency.",
                &["command"],
            ),
            mongodb_errors: counter(
                &r,
                "kobe_mongodb_command_errors_total",
                "MongoDB command failures.",
                &["command"],
            ),
            redis_duration: histogram(
                &r,
                "kobe_redis_command_duration_seconds",
                "Redis command latency.",
                &["command"],
            ),
            redis_errors: counter(
                &r,
                "kobe_redis_command_errors_total",
                "Redis command failures.",
                &["command"],
            ),
            mongo_commands: counter(
                &r,
                "kobe_mongo_commands_total",
                "MongoDB commands sent, by purpose (command:collection).",
                &["purpose"],
            ),
            mongo_batch_size: {
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "kobe_mongo_batch_size",
                        "Statements per group-commit command.",
                    )
                    .buckets(vec![
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                    ]),
                    &["collection"],
                )
                .expect("valid metric");
                r.register(Box::new(metric.clone()))
                    .expect("unique metric name");
                metric
            },
            mongo_statements: counter(
                &r,
                "kobe_mongo_statements_total",
                "Statements written through group commit, by purpose.",
                &["purpose"],
            ),
            lost_confirms: counter(
                &r,
                "kobe_lost_confirms_total",
                "Submissions whose confirm did not come: closed (503), accepted (a worker had the task) or closing (503; closed once MongoDB answers).",
                &["outcome"],
            ),
            deliveries_returned: single_counter(&r, "kobe_deliveries_returned_total", "Deliveries handed back to their queue because no run slot freed up in time."),
            lease_abandoned: single_counter(&r, "kobe_task_leases_abandoned_total", "Handlers stopped before their execution lease could lapse, because MongoDB did not answer its renewals."),
            lease_renewals: single_counter(&r, "kobe_lease_renewals_total", "Lease renewals sent: one command for all of a worker's running attempts."),
            leases_renewed: single_counter(&r, "kobe_leases_renewed_total", "Execution leases extended by those renewals."),
            lease_takeovers: counter(
                &r,
                "kobe_task_lease_takeovers_total",
                "Execution leases taken over from an attempt that stopped renewing them.",
                &["task"],
            ),
            duplicate_deliveries: counter(
                &r,
                "kobe_duplicate_deliveries_total",
                "Deliveries settled without running the task, by why.",
                &["reason"],
            ),
            dlq_operations: counter(
                &r,
                "kobe_dlq_operations_total",
                "Dead letters acted on by an operator, by operation (replay, purge) and outcome.",
                &["operation", "outcome"],
            ),
            task_operations: counter(
                &r,
                "kobe_task_operations_total",
                "Operators' requests on tasks (retry, cancel) by outcome, and cancels passed on to running handlers (cancel/signalled).",
                &["operation", "outcome"],
            ),
            workflows: counter(
                &r,
                "kobe_workflows_total",
                "Workflows started (state STARTED) and ended, by state.",
                &["state"],
            ),
            workflow_join_duration: histogram(
                &r,
                "kobe_workflow_join_duration_seconds",
                "From the last outcome a step waited for to that step's submission confirmed.",
                &[],
            ),
            registry: r,
        };
        // Fixed label values are exported from the start, so dashboards and alerts see zeros
        // instead of missing series.
        for outcome in [
            "published",
            "confirmed",
            "nacked",
            "returned",
            "failed",
            "refused_busy",
        ] {
            metrics.amqp_publishes.with_label_values(&[outcome]);
        }
        for reason in DEAD_LETTER_REASONS {
            metrics.dead_letters.with_label_values(&[reason]);
        }
        for outcome in ["taken", "reclaimed"] {
            metrics.leases.with_label_values(&[outcome]);
        }
        for command in [
            "insert",
            "find",
            "update",
            "findAndModify",
            "delete",
            "ping",
        ] {
            metrics.mongodb_errors.with_label_values(&[command]);
        }
        for command in ["GET", "SET", "EVAL", "PING"] {
            metrics.redis_errors.with_label_values(&[command]);
        }
        metrics
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
