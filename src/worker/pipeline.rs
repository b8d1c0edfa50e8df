//! One delivery's life: read it, check it can run, take the task's execution lease, run the
//! handler, then carry out what [`decision`](super::decision) says until the message is settled.
//!
//! A fresh delivery (not redelivered) starts its handler at once while its `STARTED` claim waits
//! in the group-commit batch: a handler that finishes before the claim leaves takes the claim back
//! and records its outcome with the claim's conditions in one statement, so a short task costs one
//! statement; any longer task shows `STARTED` within a batch's linger. Should the claim be refused
//! (another attempt holds the lease), the handler is stopped. A redelivery — the case where
//! another copy may still be running — claims in a round trip of its own before anything starts.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use mongodb::bson::DateTime;
use tracing::Instrument;

use super::decision::{self, Happened, Outcome};
use super::execute::{panic_message, Limits, Running};
use super::settle::Found;
use super::Worker;
use crate::amqp::{wire, Delivery, Settlement, TaskMessage};
use crate::store::attempts::{Attempt, Claimed};
use crate::store::batch::Written;
use crate::store::StoreError;
use crate::tasks::{Invocation, Task};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;

/// The attempt a delivery is working on, kept where a panic handler can find it.
pub(super) type AttemptCell = Arc<Mutex<Option<(Attempt, bool)>>>;

/// A delivery being worked on.
pub(super) struct Job<'a> {
    pub(super) delivery: &'a Delivery,
    /// `None` when the message could not be read.
    pub(super) message: Option<TaskMessage>,
    pub(super) attempt: Attempt,
    /// The attempt holds the task's lease (its claim was applied).
    pub(super) claimed: bool,
    /// The handler ran (so recording the outcome also records the start).
    pub(super) ran: bool,
}

impl Job<'_> {
    pub(super) fn retries(&self) -> u32 {
        self.attempt.retries
    }
}

impl Worker {
    /// Handles one delivery to the end, settling it — also when Kobe's own code panics.
    pub(super) async fn handle(self: Arc<Self>, delivery: Delivery) {
        let cell: AttemptCell = Arc::new(Mutex::new(None));
        let handled = AssertUnwindSafe(self.deliver(&delivery, &cell))
            .catch_unwind()
            .await;
        if let Err(payload) = handled {
            let cause = panic_message(payload.as_ref());
            tracing::error!(cause = %cause, "delivery handling panicked; dead-lettering the message");
            self.after_panic(&delivery, &cell, cause).await;
        }
    }

    async fn deliver(&self, delivery: &Delivery, cell: &AttemptCell) {
        let message = match TaskMessage::decode(&delivery.properties, &delivery.body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(redelivered = delivery.redelivered, root_cause = %error, "malformed message");
                let (id, name) = wire::identity(&delivery.properties);
                let attempt = Attempt::new(
                    id.as_deref().unwrap_or(""),
                    name.as_deref().unwrap_or("(unreadable)"),
                    0,
                );
                let job = Job {
                    delivery,
                    message: None,
                    attempt,
                    claimed: false,
                    ran: false,
                };
                let mut plan = decision::plan(
                    &Happened::Malformed(error.to_string()),
                    1,
                    &Default::default(),
                    0.0,
                );
                if id.is_none() {
                    // No task to record it on: the dead letter is all there is.
                    plan.record = None;
                }
                self.carry_out(job, plan).await;
                return;
            }
        };
        let parent = message.traceparent.as_deref().and_then(TraceContext::parse);
        let span = tracing::info_span!(
            "task",
            task_id = %message.id,
            task = %message.task,
            attempt = message.retries.saturating_add(1),
            redelivered = delivery.redelivered,
            trace_id = %parent.map(|t| t.trace_id_hex()).unwrap_or_default(),
        );
        if let Some(parent) = &parent {
            crate::telemetry::otel::adopt(&span, parent);
        }
        self.run_message(delivery, message, cell)
            .instrument(span)
            .await;
    }

    async fn run_message(&self, delivery: &Delivery, message: TaskMessage, cell: &AttemptCell) {
        if !self.liveness.is_live(delivery.tag) {
            // Its connection is gone and the broker has handed it back: never start it.
            self.duplicate("lost_connection");
            return;
        }
        let attempt = Attempt::new(message.id.as_str(), &message.task, message.retries);
        let mut job = Job {
            delivery,
            message: Some(message),
            attempt,
            claimed: false,
            ran: false,
        };
        let message = job.message.as_ref().expect("set above");
        let Some(task) = self.registry.get(&message.task) else {
            let happened = Happened::UnknownTask(message.task.clone());
            return self.conclude(job, happened).await;
        };
        let now = DateTime::now().timestamp_millis();
        if let Some(eta) = message.eta.as_deref().and_then(millis_of) {
            if eta - now > 100 {
                let wait = Duration::from_millis(u64::try_from(eta - now).unwrap_or(u64::MAX));
                return self.delay_again(delivery, wait).await;
            }
        }
        if let Some(expires) = message.expires.as_deref() {
            if millis_of(expires).is_some_and(|at| at < now) {
                let happened = Happened::Expired(expires.to_owned());
                return self.conclude(job, happened).await;
            }
        }
        // The arguments come before the claim: a task is never started without them.
        if let Some(reference) = wire::payload_reference(&delivery.properties) {
            match self.payloads.get(&reference).await {
                Ok(Some(value)) => {
                    let message = job.message.as_mut().expect("set above");
                    message.args = value["args"].as_array().cloned().unwrap_or_default();
                    message.kwargs = value["kwargs"].as_object().cloned().unwrap_or_default();
                }
                Ok(None) => {
                    return self
                        .conclude(job, Happened::PayloadMissing(reference))
                        .await
                }
                Err(error) => return self.requeue(&job, &error).await,
            }
        }
        let message = job.message.as_ref().expect("set above");
        if self.config.log_payloads {
            tracing::info!(args = ?message.args, kwargs = ?message.kwargs, "task starting");
        } else {
            tracing::debug!("task starting");
        }
        let limits = Limits::of(
            task.as_ref(),
            message.hard_time_limit,
            message.soft_time_limit,
        );
        // Redeliveries and tasks with a result backend claim before they start; fresh ones start
        // while their claim is on its way (see the module docs).
        let speculate =
            self.config.fast_start && !delivery.redelivered && self.config.result_ttl.is_none();
        loop {
            *cell.lock().expect("attempt cell") = Some((job.attempt.clone(), false));
            let happened = if speculate {
                self.run_speculatively(&mut job, task.as_ref(), limits)
                    .await
            } else {
                self.run_claimed_first(&mut job, task.as_ref(), limits)
                    .await
            };
            *cell.lock().expect("attempt cell") = Some((job.attempt.clone(), job.claimed));
            match happened {
                Some(Ok(happened)) => return self.conclude(job, happened).await,
                // Settled already (a duplicate, an outage).
                None => return,
                // The task became takeable while we looked: claim again.
                Some(Err(Retake)) => continue,
            }
        }
    }

    /// Claims first, then runs. A redelivery — which may find another attempt's lease, lapsed
    /// or not — claims in a round trip of its own that says whose lease it replaced; a fresh
    /// delivery's claim joins the group-commit batch.
    async fn run_claimed_first(
        &self,
        job: &mut Job<'_>,
        task: &dyn Task,
        limits: Limits,
    ) -> Option<Result<Happened, Retake>> {
        let claimed = if job.delivery.redelivered {
            self.tasks
                .claim_now(&job.attempt, self.config.lease, self.config.max_deliveries)
                .await
        } else {
            let claim =
                self.tasks
                    .claim_write(&job.attempt, self.config.lease, self.config.max_deliveries);
            self.writer.write(claim).await.map(|written| match written {
                Written::Applied => Claimed::Taken { taken_over: None },
                Written::Refused => Claimed::Refused,
            })
        };
        match claimed {
            Ok(Claimed::Taken { taken_over }) => {
                job.claimed = true;
                self.pause.recovered();
                if let Some(previous) = taken_over {
                    tracing::warn!(previous_attempt = %previous, "took over a task whose attempt stopped renewing its lease");
                    metrics()
                        .lease_takeovers
                        .with_label_values(&[job.attempt.task_name.as_str()])
                        .inc();
                }
                self.invalidate_soon(&job.attempt.task_id);
                let slot = self.slot(job).await?;
                let running = Running::start(task, self.invocation(job), limits);
                job.ran = true;
                let happened = self.supervise(job, running).await;
                drop(slot);
                happened.map(Ok)
            }
            Ok(Claimed::Refused) => self.refused_claim(job).await,
            Err(error) => self.claim_failed(job, error).await,
        }
    }

    /// Invalidates the cached status without waiting: used when a task starts, where a reader
    /// served `PENDING` for another moment is harmless (outcomes wait for theirs).
    fn invalidate_soon(&self, task_id: &str) {
        let invalidator = self.invalidator.clone();
        let task_id = task_id.to_owned();
        tokio::spawn(async move { invalidator.invalidate(&task_id).await });
    }

    /// A run slot, or — when none frees up within the slot wait — the message goes back to its
    /// queue for a worker that has room: a delivery never waits long in a worker that cannot
    /// start it (so prefetching more than `concurrency` only helps while tasks are short).
    async fn slot(&self, job: &Job<'_>) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match tokio::time::timeout(self.config.slot_wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(
                    slot_wait_ms = self.config.slot_wait.as_millis() as u64,
                    "no run slot free in time; the message goes back to its queue"
                );
                metrics().deliveries_returned.inc();
                // A claim taken for it is let go, so wherever it lands next starts at once.
                self.release(job).await;
                self.settle(job.delivery, Settlement::Requeue);
                None
            }
        }
    }

    /// Starts the handler while the claim waits in the batch (see the module docs).
    async fn run_speculatively(
        &self,
        job: &mut Job<'_>,
        task: &dyn Task,
        limits: Limits,
    ) -> Option<Result<Happened, Retake>> {
        let slot = self.slot(job).await?;
        let mut claim = self.writer.submit(self.tasks.claim_write(
            &job.attempt,
            self.config.lease,
            self.config.max_deliveries,
        ));
        let mut running = Running::start(task, self.invocation(job), limits);
        job.ran = true;
        let claim_answer = tokio::select! {
            biased;
            answer = claim.wait() => answer,
            outcome = running.outcome() => {
                drop(slot);
                if matches!(outcome, Outcome::Success(_)) && claim.withdraw() {
                    // Finished before its claim left: the outcome carries the claim's
                    // conditions itself (one statement for the whole task).
                    return Some(Ok(Happened::Ran(outcome)));
                }
                // The claim is out: its answer decides whether this outcome counts.
                return match claim.wait().await {
                    Ok(Written::Applied) => {
                        job.claimed = true;
                        self.invalidate_soon(&job.attempt.task_id);
                        Some(Ok(Happened::Ran(outcome)))
                    }
                    Ok(Written::Refused) => self.refused_claim(job).await,
                    Err(error) => self.claim_failed(job, error).await,
                };
            }
        };
        match claim_answer {
            Ok(Written::Applied) => {
                job.claimed = true;
                self.invalidate_soon(&job.attempt.task_id);
                let happened = self.supervise(job, running).await;
                drop(slot);
                happened.map(Ok)
            }
            Ok(Written::Refused) => {
                // Another attempt holds the task: this one must not run beside it.
                drop(running);
                drop(slot);
                self.refused_claim(job).await
            }
            Err(error) => {
                drop(running);
                drop(slot);
                self.claim_failed(job, error).await
            }
        }
    }

    async fn refused_claim(&self, job: &mut Job<'_>) -> Option<Result<Happened, Retake>> {
        match self.investigate(job).await {
            Some(Found::Takeable) => Some(Err(Retake)),
            Some(Found::Poison(n)) => Some(Ok(Happened::Poison(n))),
            Some(Found::Settled) | None => None,
        }
    }

    async fn claim_failed(
        &self,
        job: &mut Job<'_>,
        error: StoreError,
    ) -> Option<Result<Happened, Retake>> {
        if error.is_transient() {
            self.requeue(job, &error).await;
            None
        } else {
            Some(Ok(Happened::Internal(format!(
                "cannot record the start: {error}"
            ))))
        }
    }

    /// Waits for a claimed attempt's handler, renewing its lease; stops the handler if the lease
    /// is lost (another attempt took the task: one must not run beside it).
    async fn supervise(&self, job: &Job<'_>, mut running: Running) -> Option<Happened> {
        let lease = self.config.lease;
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + lease / 3, lease / 3);
        let registration = self.active.register(&job.attempt, running.cancel());
        let outcome = loop {
            tokio::select! {
                outcome = running.outcome() => break outcome,
                _ = renew.tick() => match self.tasks.renew(&job.attempt, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(ran_ms = running.elapsed().as_millis() as u64, "lease lost to another attempt; stopping this one");
                        drop(running);
                        drop(registration);
                        self.settle(job.delivery, Settlement::Ack);
                        self.duplicate("lease_lost");
                        return None;
                    }
                    // MongoDB is away: keep running; the outcome write will tell.
                    Err(error) => tracing::warn!(error = %error, "cannot renew the lease"),
                },
            }
        };
        drop(registration);
        Some(Happened::Ran(outcome))
    }

    fn invocation(&self, job: &Job<'_>) -> Invocation {
        let message = job.message.as_ref().expect("a running job has a message");
        Invocation {
            task_id: message.id.clone(),
            attempt: message.retries.saturating_add(1),
            args: message.args.clone(),
            kwargs: message.kwargs.clone(),
            soft_limit: crate::tasks::Signal::never(),
            cancel: crate::tasks::Signal::never(),
            context: Some(self.context.clone()),
            traceparent: message.traceparent.clone(),
        }
    }
}

/// The task became takeable while it was being looked at.
struct Retake;

/// Milliseconds since the epoch of an RFC 3339 time.
fn millis_of(rfc3339: &str) -> Option<i64> {
    DateTime::parse_rfc3339_str(rfc3339)
        .ok()
        .map(|t| t.timestamp_millis())
}
