//! `kobe worker`: consume task messages, run them, record the outcome, then settle the message.
//!
//! One delivery's life: decode → mark `STARTED` (a task already finished is acked and skipped) →
//! run under the hard time limit, panics caught → write the outcome to MongoDB → only then ack,
//! retry (publish to the delay queue, confirmed, then ack) or dead-letter.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::DateTime;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use super::submit::{NewTask, SubmitError, Submitter, PAYLOAD_HEADER};
use crate::amqp::consumer::Settler;
use crate::amqp::{
    Consumer, ConsumerConfig, Delivery, Outgoing, Publisher, Settlement, TaskMessage, Topology,
};
use crate::cli::WorkerArgs;
use crate::config::{RetryOverrides, Settings};
use crate::store::payloads::reference_value;
use crate::store::tasks::{Applied, Takeover};
use crate::store::{
    Cache, CheckpointRepository, Decision, ErrorLogRepository, ErrorRecord, LeaseRepository,
    PayloadRepository, ShardRepository, StoreError, TaskRepository, Transition,
};
use crate::tasks::{
    ChildTask, Invocation, Registry, RetryPolicy, SoftLimit, Spawner, Task, TaskContext, TaskError,
};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;

/// How long to wait before handing a message back when MongoDB is down, so an outage is not a
/// redelivery storm.
const STORE_OUTAGE_PAUSE: Duration = Duration::from_secs(1);

/// What a worker process runs with.
pub struct WorkerOptions {
    pub concurrency: u16,
    pub prefetch_multiplier: u16,
    /// Routes to consume; empty means every configured route.
    pub routes: Vec<String>,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl From<WorkerArgs> for WorkerOptions {
    fn from(args: WorkerArgs) -> Self {
        Self {
            concurrency: args.concurrency,
            prefetch_multiplier: args.prefetch_multiplier,
            routes: args.queues,
            metrics_addr: args.metrics_addr,
        }
    }
}

/// Everything one delivery needs; shared by the task futures.
pub struct Worker {
    registry: Registry,
    tasks: TaskRepository,
    errors: ErrorLogRepository,
    payloads: PayloadRepository,
    context: Arc<TaskContext>,
    /// Results larger than this (JSON bytes) go to `RawPayload`.
    inline_limit: usize,
    cache: Cache,
    /// Log arguments at start (`KOBE_LOG_PAYLOADS`).
    log_payloads: bool,
    /// With the result backend on: how long results stay in Redis.
    result_ttl: Option<Duration>,
    publisher: Publisher,
    topology: Topology,
    settler: Settler,
    retry: RetryOverrides,
    task_retry: BTreeMap<String, RetryOverrides>,
}

/// The outcome of one attempt, before it is recorded.
enum Outcome {
    Success(Value),
    Retry { cause: String },
    Fail { cause: String, reason: &'static str },
}

impl Worker {
    /// Handles one delivery to the end, settling it.
    pub async fn handle(&self, delivery: Delivery) {
        let in_flight = &metrics().tasks_in_flight;
        in_flight.inc();
        self.handle_delivery(delivery).await;
        in_flight.dec();
    }

    async fn handle_delivery(&self, delivery: Delivery) {
        let message = match TaskMessage::decode(&delivery.properties, &delivery.body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(redelivered = delivery.redelivered, root_cause = %error, decision = "dead_letter", "malformed message");
                self.dead_letter(
                    &delivery,
                    None,
                    &format!("malformed message: {error}"),
                    "malformed",
                )
                .await;
                return;
            }
        };
        let attempt = message.retries + 1;
        let parent = message.traceparent.as_deref().and_then(TraceContext::parse);
        let trace_id = parent.map(|t| t.trace_id_hex()).unwrap_or_default();
        let span = tracing::info_span!(
            "task",
            task_id = %message.id,
            task = %message.task,
            attempt,
            redelivered = delivery.redelivered,
            trace_id = %trace_id,
        );
        if let Some(parent) = &parent {
            crate::telemetry::otel::adopt(&span, parent);
        }
        self.run_message(delivery, message).instrument(span).await;
    }

    async fn run_message(&self, delivery: Delivery, message: TaskMessage) {
        let attempt = message.retries + 1;
        let Some(task) = self.registry.get(&message.task) else {
            let cause = format!("unknown task `{}`", message.task);
            self.record_failure(&message, &cause, Decision::DeadLetter, None)
                .await;
            if let Err(error) = self
                .tasks
                .reject(message.id.as_str(), &message.task, &cause)
                .await
            {
                tracing::warn!(error = %error, "cannot record the rejected task");
            }
            tracing::warn!(root_cause = %cause, retry_count = message.retries, decision = "dead_letter", "task failed");
            self.dead_letter(&delivery, Some(&message), &cause, "unknown_task")
                .await;
            return;
        };

        let now_ms = DateTime::now().timestamp_millis();
        if let Some(eta) = message.eta.as_deref().and_then(millis_of) {
            // Not yet: back to the delay queues for the time that is left (the longest delay
            // level is shorter than a far ETA, so this may happen more than once).
            if eta - now_ms > 100 {
                let wait = Duration::from_millis((eta - now_ms) as u64);
                let again = self.topology.delayed(
                    Outgoing {
                        exchange: self.topology.tasks_exchange(),
                        routing_key: delivery.routing_key.clone(),
                        body: delivery.body.clone(),
                        properties: delivery.properties.clone(),
                    },
                    wait,
                );
                let settlement = match self.publisher.publish(again).await {
                    Ok(()) => Settlement::Ack,
                    Err(_) => Settlement::Requeue,
                };
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    "task not due yet; delayed again"
                );
                self.settler.settle(delivery.tag, settlement);
                return;
            }
        }
        if let Some(expires) = message.expires.as_deref().and_then(millis_of) {
            if expires < now_ms {
                let cause = format!(
                    "expired at {} before it could run",
                    message.expires.as_deref().unwrap_or_default()
                );
                if self
                    .tasks
                    .reject(message.id.as_str(), &message.task, &cause)
                    .await
                    .is_ok()
                {
                    self.changed(message.id.as_str()).await;
                }
                tracing::warn!(root_cause = %cause, retry_count = message.retries, decision = "drop", "task expired");
                self.settler.settle(delivery.tag, Settlement::Ack);
                return;
            }
        }
        let limit = hard_limit(task.as_ref(), &message);
        let takeover = if delivery.redelivered {
            Takeover::Redelivered
        } else {
            // A fresh copy of a task another attempt started (a duplicate publish) waits until
            // that attempt must be over: never two copies side by side.
            let grace = limit + Duration::from_secs(30);
            Takeover::StartedBefore(DateTime::from_millis(
                DateTime::now().timestamp_millis() - grace.as_millis() as i64,
            ))
        };
        let started = self
            .tasks
            .transition(
                message.id.as_str(),
                Transition::Started {
                    task_name: message.task.clone(),
                    retries: message.retries,
                    takeover,
                },
            )
            .await;
        match started {
            Ok(Applied::Yes) => self.changed(message.id.as_str()).await,
            Ok(Applied::No) => {
                tracing::info!(
                    retry_count = message.retries,
                    "task already finished; duplicate delivery acked without running"
                );
                self.settler.settle(delivery.tag, Settlement::Ack);
                return;
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot mark task STARTED; message returns to the queue");
                tokio::time::sleep(STORE_OUTAGE_PAUSE).await;
                self.settler.settle(delivery.tag, Settlement::Requeue);
                return;
            }
        }

        let mut message = message;
        if let Some(reference) = payload_reference(&delivery) {
            match self.payloads.get(&reference).await {
                Ok(Some(value)) => {
                    message.args = value["args"].as_array().cloned().unwrap_or_default();
                    message.kwargs = value["kwargs"].as_object().cloned().unwrap_or_default();
                }
                Ok(None) => {
                    let cause = format!("payload {reference} is missing from RawPayload");
                    let _ = self
                        .tasks
                        .transition(
                            message.id.as_str(),
                            Transition::Failure {
                                root_cause: cause.clone(),
                            },
                        )
                        .await;
                    self.changed(message.id.as_str()).await;
                    self.record_failure(&message, &cause, Decision::DeadLetter, None)
                        .await;
                    tracing::warn!(root_cause = %cause, retry_count = message.retries, decision = "dead_letter", "task failed");
                    self.dead_letter(&delivery, Some(&message), &cause, "payload_missing")
                        .await;
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot load the task's payload; message returns to the queue");
                    tokio::time::sleep(STORE_OUTAGE_PAUSE).await;
                    self.settler.settle(delivery.tag, Settlement::Requeue);
                    return;
                }
            }
        }
        if self.log_payloads {
            tracing::info!(args = ?message.args, kwargs = ?message.kwargs, "task starting");
        } else {
            tracing::debug!("task starting");
        }
        let outcome = self.execute(task.as_ref(), &message, attempt, limit).await;
        let policy = self.policy(task.as_ref());
        let (transition, settlement) = match outcome {
            Outcome::Success(result) => match self.keep_result(message.id.as_str(), result).await {
                Ok(result) => (Transition::Success { result }, Settled::Ack),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot store the large result; message returns to the queue");
                    tokio::time::sleep(STORE_OUTAGE_PAUSE).await;
                    self.settler.settle(delivery.tag, Settlement::Requeue);
                    return;
                }
            },
            Outcome::Retry { cause } if message.retries < policy.max_retries => {
                let delay = policy.delay_for(attempt, fastrand::f64());
                (
                    Transition::Retry {
                        retries: attempt,
                        root_cause: cause.clone(),
                    },
                    Settled::Retry { cause, delay },
                )
            }
            Outcome::Retry { cause } => {
                let cause = format!("retries exhausted after {attempt} attempts: {cause}");
                (
                    Transition::Failure {
                        root_cause: cause.clone(),
                    },
                    Settled::DeadLetter {
                        cause,
                        reason: "retries_exhausted",
                    },
                )
            }
            Outcome::Fail { cause, reason } => (
                Transition::Failure {
                    root_cause: cause.clone(),
                },
                Settled::DeadLetter { cause, reason },
            ),
        };
        let state = transition.target();
        if let Err(error) = self.tasks.transition(message.id.as_str(), transition).await {
            // The outcome is not recorded, so the message must not be settled as done.
            tracing::warn!(error = %error, "cannot record the outcome; message returns to the queue");
            tokio::time::sleep(STORE_OUTAGE_PAUSE).await;
            self.settler.settle(delivery.tag, Settlement::Requeue);
            return;
        }
        self.changed(message.id.as_str()).await;
        metrics()
            .task_outcomes
            .with_label_values(&[message.task.as_str(), state.as_str()])
            .inc();

        match settlement {
            Settled::Ack => {
                tracing::info!(retry_count = message.retries, state = %state, "task succeeded");
                self.settler.settle(delivery.tag, Settlement::Ack);
            }
            Settled::Retry { cause, delay } => {
                metrics()
                    .task_retries
                    .with_label_values(&[message.task.as_str()])
                    .inc();
                self.record_failure(&message, &cause, Decision::Retry, Some(delay))
                    .await;
                tracing::warn!(root_cause = %cause, retry_count = attempt, retry_in_ms = delay.as_millis() as u64, decision = "retry", "task will be retried");
                self.retry(&delivery, message, delay).await;
            }
            Settled::DeadLetter { cause, reason } => {
                self.record_failure(&message, &cause, Decision::DeadLetter, None)
                    .await;
                tracing::warn!(root_cause = %cause, retry_count = message.retries, decision = "dead_letter", "task failed");
                self.dead_letter(&delivery, Some(&message), &cause, reason)
                    .await;
            }
        }
    }

    /// Runs the handler on its own task, so a panic is caught, under the hard time limit.
    async fn execute(
        &self,
        task: &dyn Task,
        message: &TaskMessage,
        attempt: u32,
        limit: Duration,
    ) -> Outcome {
        let soft = message
            .soft_time_limit
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .or_else(|| task.soft_time_limit())
            .filter(|soft| *soft < limit);
        let (trip, soft_limit) = SoftLimit::pair();
        let invocation = Invocation {
            task_id: message.id.clone(),
            attempt,
            args: message.args.clone(),
            kwargs: message.kwargs.clone(),
            soft_limit,
            context: Some(self.context.clone()),
        };
        let handle = tokio::spawn(task.run(invocation));
        let abort = handle.abort_handle();
        let soft_timer = soft.map(|soft| {
            tokio::spawn(async move {
                tokio::time::sleep(soft).await;
                tracing::warn!(
                    soft_limit_ms = soft.as_millis() as u64,
                    "soft time limit reached; handler told to wrap up"
                );
                let _ = trip.send(true);
            })
        });
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(limit, handle).await;
        metrics()
            .task_duration
            .with_label_values(&[message.task.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if let Some(timer) = soft_timer {
            timer.abort();
        }
        match outcome {
            Ok(Ok(Ok(value))) => Outcome::Success(value),
            Ok(Ok(Err(TaskError::Retryable(cause)))) => Outcome::Retry { cause },
            Ok(Ok(Err(TaskError::Permanent(cause)))) => Outcome::Fail {
                cause,
                reason: "permanent_error",
            },
            Ok(Err(join_error)) => {
                let cause = match join_error.try_into_panic() {
                    Ok(payload) => format!(
                        "handler panicked: {}",
                        payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "non-string payload".into())
                    ),
                    Err(e) => format!("handler was cancelled: {e}"),
                };
                Outcome::Retry { cause }
            }
            Err(_) => {
                abort.abort();
                Outcome::Fail {
                    cause: format!("time limit exceeded ({limit:?})"),
                    reason: "time_limit",
                }
            }
        }
    }

    /// MongoDB has a new state for the task: drop the cached status.
    async fn changed(&self, task_id: &str) {
        if let Err(error) = self.cache.invalidate_status(task_id).await {
            // The cached copy expires within its short TTL anyway.
            tracing::warn!(error = %error, "cannot invalidate the cached status");
        }
    }

    /// Puts the result in the result backend (when on) and returns what `Tasks` keeps: the
    /// result, or a `RawPayload` reference when it is large. The backend copy is written first so
    /// that a client who sees `SUCCESS` finds the result.
    async fn keep_result(
        &self,
        task_id: &str,
        result: Value,
    ) -> Result<Value, crate::store::StoreError> {
        if let Some(ttl) = self.result_ttl {
            if let Err(error) = self
                .cache
                .put_result(task_id, &result.to_string(), ttl)
                .await
            {
                tracing::warn!(error = %error, "cannot store the result in Redis");
            }
        }
        self.offload(task_id, result).await
    }

    /// Keeps a large result in `RawPayload`, leaving a reference in its place.
    async fn offload(
        &self,
        task_id: &str,
        result: Value,
    ) -> Result<Value, crate::store::StoreError> {
        let size = serde_json::to_vec(&result).map_or(0, |v| v.len());
        if size <= self.inline_limit {
            return Ok(result);
        }
        let reference = self.payloads.put(task_id, "result", &result).await?;
        Ok(reference_value(&reference))
    }

    /// The task's own policy, under the deployment-wide overrides, under the task's overrides.
    fn policy(&self, task: &dyn Task) -> RetryPolicy {
        let mut policy = task.retry_policy();
        for o in [Some(&self.retry), self.task_retry.get(task.name())]
            .into_iter()
            .flatten()
        {
            policy.max_retries = o.max_retries.unwrap_or(policy.max_retries);
            policy.base_delay = o.base_delay.unwrap_or(policy.base_delay);
            policy.factor = o.factor.unwrap_or(policy.factor);
            policy.max_delay = o.max_delay.unwrap_or(policy.max_delay);
        }
        policy
    }

    async fn record_failure(
        &self,
        message: &TaskMessage,
        cause: &str,
        decision: Decision,
        delay: Option<Duration>,
    ) {
        let record = ErrorRecord {
            task_id: message.id.to_string(),
            task_name: message.task.clone(),
            attempt: message.retries + 1,
            root_cause: cause.to_owned(),
            decision,
            retry_delay_ms: delay.map(|d| d.as_millis() as u64),
            at: DateTime::now(),
        };
        if let Err(error) = self.errors.record(&record).await {
            tracing::error!(error = %error, "cannot write TaskErrorLog record");
        }
    }

    /// Publishes the next attempt to the delay queue and acks this one once the broker confirmed
    /// it; if the publish fails the message goes back to its queue and this attempt runs again.
    async fn retry(&self, delivery: &Delivery, mut message: TaskMessage, delay: Duration) {
        message.retries += 1;
        let mut properties = message.properties();
        // Keep headers a plain TaskMessage does not know (a payload reference, say).
        if let Some(original) = delivery.properties.headers() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            for (k, v) in original {
                headers.entry(k.clone()).or_insert_with(|| v.clone());
            }
            properties = properties.with_headers(headers);
        }
        let outgoing = self.topology.delayed(
            Outgoing {
                exchange: self.topology.tasks_exchange(),
                routing_key: delivery.routing_key.clone(),
                body: message.body(),
                properties,
            },
            delay,
        );
        match self.publisher.publish(outgoing).await {
            Ok(()) => self.settler.settle(delivery.tag, Settlement::Ack),
            Err(error) => {
                tracing::warn!(error = %error, "cannot publish the retry; message returns to the queue");
                self.settler.settle(delivery.tag, Settlement::Requeue);
            }
        }
    }

    /// Sends the message to the dead-letter exchange with the reason in its headers, then acks it.
    /// If that publish fails, `basic.nack(requeue=false)` lets the broker dead-letter it instead
    /// (without Kobe's reason headers, which the error log still has).
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        message: Option<&TaskMessage>,
        reason: &str,
        kind: &'static str,
    ) {
        metrics().dead_letters.with_label_values(&[kind]).inc();
        let mut properties = delivery.properties.clone();
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-kobe-reason".into(),
            amiquip::AmqpValue::LongString(reason.to_owned()),
        );
        headers.insert(
            "x-kobe-original-routing-key".into(),
            amiquip::AmqpValue::LongString(delivery.routing_key.clone()),
        );
        if let Some(message) = message {
            headers.insert(
                "x-kobe-attempts".into(),
                amiquip::AmqpValue::LongLongInt(i64::from(message.retries + 1)),
            );
        }
        properties = properties.with_headers(headers);
        let outgoing = Outgoing {
            exchange: self.topology.dead_letter_exchange(),
            routing_key: delivery.routing_key.clone(),
            body: delivery.body.clone(),
            properties,
        };
        match self.publisher.publish(outgoing).await {
            Ok(()) => self.settler.settle(delivery.tag, Settlement::Ack),
            Err(error) => {
                tracing::warn!(error = %error, "cannot publish to the dead-letter exchange; nacking instead");
                self.settler.settle(delivery.tag, Settlement::DeadLetter);
            }
        }
    }
}

/// The hard time limit: the message's, else the task's.
fn hard_limit(task: &dyn Task, message: &TaskMessage) -> Duration {
    message
        .hard_time_limit
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or_else(|| task.time_limit())
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn millis_of(rfc3339: &str) -> Option<i64> {
    DateTime::parse_rfc3339_str(rfc3339)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn payload_reference(delivery: &Delivery) -> Option<String> {
    match delivery
        .properties
        .headers()
        .as_ref()?
        .get(PAYLOAD_HEADER)?
    {
        amiquip::AmqpValue::LongString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Lets tasks submit child tasks through the worker's own publisher.
struct WorkerSpawner {
    submitter: Submitter,
}

impl Spawner for WorkerSpawner {
    fn spawn(
        &self,
        child: ChildTask,
    ) -> Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + '_>> {
        Box::pin(async move {
            let route = self
                .submitter
                .topology()
                .route_of(&child.task_name)
                .to_owned();
            let mut task = NewTask::new(child.id, &child.task_name, &route);
            task.kwargs = child.kwargs;
            task.parent_id = Some(child.parent_id.to_string());
            match self.submitter.submit(task).await {
                Ok(()) => Ok(()),
                // Spawned by an earlier attempt of the parent.
                Err(SubmitError::Store(StoreError::Duplicate(_))) => Ok(()),
                Err(e) => Err(TaskError::Retryable(format!(
                    "cannot submit a child task: {e}"
                ))),
            }
        })
    }
}

enum Settled {
    Ack,
    Retry {
        cause: String,
        delay: Duration,
    },
    /// `reason` is the metric label: one of `DEAD_LETTER_REASONS`.
    DeadLetter {
        cause: String,
        reason: &'static str,
    },
}

/// Runs a worker until `shutdown` resolves, then stops consuming, lets in-flight tasks finish
/// within the grace period and closes the connection (unfinished messages return to the queue).
pub async fn run(
    settings: Settings,
    options: WorkerOptions,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let db = super::database(&settings).await?;
    let topology = super::topology(&settings);
    let routes = if options.routes.is_empty() {
        topology.routes()
    } else {
        options.routes.clone()
    };
    let queues: Vec<String> = routes.iter().map(|r| topology.queue(r)).collect();
    let prefetch = options
        .concurrency
        .saturating_mul(options.prefetch_multiplier);
    let publisher = Publisher::start(
        &settings.rabbitmq_url,
        topology.clone(),
        settings.publish_timeout,
    )
    .context("failed to start the publisher")?;
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let consumer = Consumer::start(
        ConsumerConfig {
            url: settings.rabbitmq_url.clone(),
            topology: topology.clone(),
            queues: queues.clone(),
            prefetch,
        },
        deliveries_tx,
    )
    .context("failed to start the consumer")?;
    let cache = super::cache(&settings)?;
    let submitter = Submitter::new(
        TaskRepository::new(&db),
        PayloadRepository::new(&db),
        cache.clone(),
        publisher.clone(),
        topology.clone(),
        settings.payload_inline_limit,
    );
    let context = Arc::new(TaskContext {
        leases: LeaseRepository::new(&db),
        checkpoints: CheckpointRepository::new(&db),
        shards: ShardRepository::new(&db),
        spawner: Arc::new(WorkerSpawner { submitter }),
    });
    let worker = Arc::new(Worker {
        registry,
        tasks: TaskRepository::new(&db),
        errors: ErrorLogRepository::new(&db),
        payloads: PayloadRepository::new(&db),
        context,
        inline_limit: settings.payload_inline_limit,
        cache: cache.clone(),
        log_payloads: settings.log_payloads,
        result_ttl: settings.result_ttl,
        publisher,
        topology,
        settler: consumer.settler(),
        retry: settings.retry.clone(),
        task_retry: settings.task_retry.clone(),
    });
    tracing::info!(concurrency = options.concurrency, prefetch, queues = ?queues, "worker started");

    let metrics_server = match options.metrics_addr {
        Some(addr) => {
            let server = crate::http::Application::metrics_only(addr)
                .with_context(|| format!("failed to listen on {addr} for metrics"))?;
            tracing::info!(addr = %addr, port = server.port(), "serving worker metrics");
            let handle = server.handle();
            tokio::spawn(server.run_until_stopped());
            Some(handle)
        }
        None => None,
    };
    let mut watched = queues.clone();
    watched.push(worker.topology.dead_letter_queue());
    let depths_stop = super::spawn_queue_depth_watch(&settings, watched);

    let slots = Arc::new(Semaphore::new(usize::from(options.concurrency)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.context("semaphore closed")?,
        };
        let delivery = tokio::select! {
            () = &mut shutdown => break,
            delivery = deliveries.recv() => match delivery {
                Some(delivery) => delivery,
                None => break,
            },
        };
        let worker = worker.clone();
        tokio::spawn(async move {
            worker.handle(delivery).await;
            drop(slot);
        });
    }

    tracing::info!(
        grace_s = settings.shutdown_grace.as_secs_f64(),
        "stopping: no new tasks; waiting for in-flight ones"
    );
    consumer.stop_consuming();
    let all = u32::from(options.concurrency);
    match tokio::time::timeout(settings.shutdown_grace, slots.acquire_many(all)).await {
        Ok(_) => tracing::info!("all in-flight tasks finished"),
        Err(_) => tracing::warn!(
            unfinished = all as usize - slots.available_permits(),
            "grace period over; unfinished tasks are not acked and return to the queue"
        ),
    }
    // Let the settlements just sent reach the consumer thread before it closes.
    tokio::task::spawn_blocking(move || consumer.close())
        .await
        .context("consumer thread panicked")?;
    let _ = depths_stop.send(());
    if let Some(handle) = metrics_server {
        handle.stop(true).await;
    }
    tracing::info!("worker stopped");
    Ok(())
}
