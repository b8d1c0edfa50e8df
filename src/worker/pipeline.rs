//! One delivery's life: read it, check it can run, wait for a run slot, take the task's execution
//! lease, run the handler while the lease is kept, then carry out what
//! [`decision`](super::decision) says until the message is settled.
//!
//! The slot comes before the claim, so a delivery that waits (and perhaps goes back to its queue
//! for a worker with room) has not started anything: no delivery counted, no `STARTED` shown. The
//! lease is renewed on its own clock, each renewal bounded; a handler whose lease cannot be kept
//! is stopped before another worker may take its task over.
//!
//! No handler starts before its claim is durable: a duplicate publish of a running task (an outbox
//! re-send after a lost confirm, a client re-sending an id) finds the lease held and never runs
//! beside it. A fresh delivery's claim joins the group-commit batch; a redelivery — the case where
//! another copy may still be running — claims in a round trip of its own that says whose lease it
//! replaced.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use mongodb::bson::DateTime;
use tokio::sync::SemaphorePermit;
use tracing::Instrument;

use super::decision::{self, Happened, Outcome};
use super::execute::{panic_message, Limits, Running};
use super::settle::Found;
use super::Worker;
use crate::amqp::{wire, Delivery, Settlement, TaskMessage};
use crate::store::attempts::{Attempt, Origin};
use crate::store::batch::Written;
use crate::store::task_leases::TakeOver;
use crate::store::StoreError;
use crate::store::TaskDocument;
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
    /// When its claim was taken (it ran from then on).
    pub(super) started_at: Option<DateTime>,
    /// Starts of this attempt, this one included (once claimed).
    pub(super) deliveries: u32,
    /// Another copy's lease of this attempt was found: closing it unrun is not this copy's call.
    pub(super) lease_found: bool,
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
                    started_at: None,
                    deliveries: 0,
                    lease_found: false,
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
        let attempt = Attempt::new(message.id.as_str(), &message.task, message.retries)
            .with_origin(Origin {
                args: message.args.clone(),
                kwargs: message.kwargs.clone(),
                route: self
                    .topology
                    .route_for_key(&delivery.routing_key)
                    .to_owned(),
                priority: message.priority.value(),
            });
        let mut job = Job {
            delivery,
            message: Some(message),
            attempt,
            claimed: false,
            started_at: None,
            deliveries: 0,
            lease_found: false,
        };
        let message = job.message.as_ref().expect("set above");
        let Some(task) = self.registry.get(&message.task) else {
            // Perhaps only this worker does not know it (an older version beside newer ones): it
            // goes back for a while before it counts as unknown everywhere.
            let hops = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| wire::integer(h, wire::UNKNOWN_HOPS_HEADER))
                .unwrap_or(0);
            let most =
                (self.config.unknown_task_grace.as_millis() / UNKNOWN_TASK_WAIT.as_millis()) as i64;
            if hops < most {
                tracing::warn!(
                    hops,
                    "a task this worker does not know; handing it on for a worker that does"
                );
                return self.hand_on_unknown(delivery, hops + 1).await;
            }
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
        loop {
            // Readers stop being served a cached status before the claim can land (the marker
            // keeps them from caching the old one again), so none is told PENDING once MongoDB
            // says STARTED; the invalidation after the claim covers a claim slower than the
            // marker. Done before the slot is held, so it costs no run time.
            self.invalidator.invalidate(&job.attempt.task_id).await;
            // A run slot before the claim: waiting for one is not a start, so a backlog never
            // counts towards the delivery cap nor shows the task STARTED while it waits.
            let Some(slot) = self.slot(&job).await else {
                return;
            };
            *cell.lock().expect("attempt cell") = Some((job.attempt.clone(), false));
            let happened = self
                .run_claimed(&mut job, slot, task.as_ref(), limits)
                .await;
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

    /// Claims first, then runs. The claim is an insert of the attempt's lease (batched), sent
    /// together with a lookup of the task (batched too) where the lease alone cannot tell: a
    /// task finished, revoked or moved on to a later attempt is not run. A lease held already is
    /// taken over when it lapsed, or waited for while it holds, and the task looked up afresh.
    async fn run_claimed(
        &self,
        job: &mut Job<'_>,
        slot: SemaphorePermit<'_>,
        task: &dyn Task,
        limits: Limits,
    ) -> Option<Result<Happened, Retake>> {
        // The lease the claim asks for is counted from before it is sent.
        let claimed_at = Instant::now();
        let now = DateTime::now();
        let claim = self.writer.submit(self.leases.claim_write(
            &job.attempt,
            self.config.lease,
            now,
        ));
        // The task's document is looked up beside the claim unless this is the first delivery
        // of a first attempt: then an insert that lands is the task's first holder, and what
        // could have moved the task on without running it (a cancel, a refused submission, a
        // verdict reached unrun) closed this lease first. A redelivery's attempt may have
        // reached an outcome its lease never saw, and a later attempt's message may have been
        // published by one whose outcome was then refused (a cancel that came meanwhile).
        let looked_up = async {
            if job.delivery.redelivered || job.attempt.retries > 0 {
                self.reader
                    .get(crate::store::tasks::COLLECTION, &job.attempt.task_id)
                    .await
            } else {
                Ok(None)
            }
        };
        let (claimed, stored) = tokio::join!(claim.result(), looked_up);
        let claimed = match claimed {
            Ok(Written::Applied) => stored.map(|stored| Some((None, 1, now, stored))),
            Ok(Written::Refused) => {
                job.lease_found = true;
                self.take_over(job).await
            }
            Err(error) => Err(error),
        };
        let (taken_over, deliveries, started_at, stored) = match claimed {
            Ok(Some(claimed)) => claimed,
            // Held by another copy, or not to be run: looked at, settled or retaken.
            Ok(None) => {
                drop(slot);
                return self.refused_claim(job).await;
            }
            Err(error) => {
                drop(slot);
                return self.claim_failed(job, error).await;
            }
        };
        job.claimed = true;
        job.deliveries = deliveries;
        if let Some(found) = self.not_to_run(job, stored).await {
            // Ours, but the task says it must not run: let the lease go as done.
            drop(slot);
            let _ = self.writer.submit(self.leases.done_write(&job.attempt));
            job.claimed = false;
            return found;
        }
        job.started_at = Some(started_at);
        self.pause.recovered();
        if let Some(previous) = taken_over {
            tracing::warn!(previous_attempt = %previous, "took over a task whose attempt stopped renewing its lease");
            metrics()
                .lease_takeovers
                .with_label_values(&[self.task_label(&job.attempt.task_name)])
                .inc();
        }
        self.invalidate_if_slow(&job.attempt.task_id, claimed_at);
        let running = Running::start(task, self.invocation(job), limits);
        let happened = self.supervise(job, running, claimed_at).await;
        drop(slot);
        happened.map(Ok)
    }

    /// After a refused claim: takes the attempt's lease over when it lapsed, then looks the task
    /// up afresh (the lapsed holder may have recorded an outcome). `None` when it is not ours.
    async fn take_over(&self, job: &Job<'_>) -> Result<Option<Claimed>, StoreError> {
        match self
            .leases
            .take_over(&job.attempt, self.config.lease, self.config.max_deliveries)
            .await?
        {
            TakeOver::Taken {
                previous,
                deliveries,
                started_at,
            } => {
                let stored = self
                    .reader
                    .get(crate::store::tasks::COLLECTION, &job.attempt.task_id)
                    .await?;
                Ok(Some((previous, deliveries, started_at, stored)))
            }
            TakeOver::Held(_) => Ok(None),
        }
    }

    /// What the task's document says against running this attempt, settled where that is the
    /// answer; `None`: run it.
    async fn not_to_run(
        &self,
        job: &Job<'_>,
        stored: Option<mongodb::bson::Document>,
    ) -> Option<Option<Result<Happened, Retake>>> {
        let task: TaskDocument = match stored.map(mongodb::bson::from_document) {
            None => return None,
            Some(Ok(task)) => task,
            Some(Err(error)) => {
                return Some(Some(Ok(Happened::Internal(format!(
                    "the task's document cannot be read: {error}"
                )))))
            }
        };
        match self.verdict_on(job, &task).await? {
            Found::Cancelled(cause) => Some(Some(Ok(Happened::Cancelled(cause)))),
            Found::Poison(n) => Some(Some(Ok(Happened::Poison(n)))),
            Found::Takeable => None,
            Found::Settled => Some(None),
        }
    }

    /// Invalidates the cached status again after a claim that took so long (with the slot wait
    /// before it) that the marker set before it may have expired; a claim answered in time needs
    /// no second round trip.
    fn invalidate_if_slow(&self, task_id: &str, claimed_at: Instant) {
        if self.config.slot_wait + claimed_at.elapsed() >= self.cache.status_ttl() {
            self.invalidate_soon(task_id);
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
    /// start it (so prefetching more than `concurrency` only helps while tasks are short). The
    /// slot comes before the claim, so going back costs the task nothing: no delivery counted, no
    /// state written.
    async fn slot(&self, job: &Job<'_>) -> Option<SemaphorePermit<'_>> {
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

    async fn refused_claim(&self, job: &mut Job<'_>) -> Option<Result<Happened, Retake>> {
        match self.investigate(job).await {
            Some(Found::Takeable) => Some(Err(Retake)),
            Some(Found::Poison(n)) => {
                job.deliveries = n;
                Some(Ok(Happened::Poison(n)))
            }
            Some(Found::Cancelled(cause)) => Some(Ok(Happened::Cancelled(cause))),
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

    /// Waits for a claimed attempt's handler while the worker's lease keeper renews its lease.
    /// When the lease is lost (another attempt took the task) the handler is stopped at once;
    /// when it cannot be renewed (MongoDB does not answer) the handler is told to stop and then
    /// stopped, before the lease can lapse and another worker take the task over — one must
    /// never run beside the other. The hard time limit holds meanwhile.
    async fn supervise(
        &self,
        job: &Job<'_>,
        mut running: Running,
        claimed_at: Instant,
    ) -> Option<Happened> {
        let lease = self.config.lease;
        let margin = lease.mul_f64(LEASE_MARGIN);
        let (registration, mut trust) = self.active.register(
            &job.attempt,
            running.cancel(),
            claimed_at + lease.saturating_sub(margin),
        );
        let outcome = loop {
            let now = *trust.borrow_and_update();
            if now.lost {
                tracing::warn!(
                    ran_ms = running.elapsed().as_millis() as u64,
                    "lease lost to another attempt; stopping this one"
                );
                drop(running);
                drop(registration);
                self.settle(job.delivery, Settlement::Ack);
                self.duplicate("lease_lost");
                return None;
            }
            tokio::select! {
                outcome = running.outcome() => break outcome,
                changed = trust.changed() => {
                    if changed.is_err() {
                        // Unregistered: cannot happen while we hold the registration.
                        break running.outcome().await;
                    }
                }
                () = tokio::time::sleep_until(now.until.into()) => {
                    if trust.borrow().until > Instant::now() {
                        continue;
                    }
                    tracing::error!(
                        ran_ms = running.elapsed().as_millis() as u64,
                        "cannot renew the execution lease (MongoDB does not answer); stopping the handler before another worker may take the task over"
                    );
                    // Half the margin to stop in; the rest covers clocks and the store's delay.
                    let stop_by = Instant::now() + margin / 2;
                    running.stop_for_lease();
                    let stopped = tokio::time::timeout_at(stop_by.into(), running.outcome()).await;
                    match stopped {
                        // It finished anyway: record it (under the lease, if still ours).
                        Ok(outcome @ Outcome::Success(_)) => break outcome,
                        _ => {
                            drop(running);
                            drop(registration);
                            metrics().lease_abandoned.inc();
                            // Back to the queue after the outage pause; the release is bounded,
                            // and the lease lapses by itself if MongoDB still does not answer.
                            let away = StoreError::Unavailable("the lease cannot be renewed".into());
                            self.requeue(job, &away).await;
                            return None;
                        }
                    }
                }
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

/// A claim taken: whose lapsed lease it replaced, the attempt's starts, when it started, and the
/// task's document as it was looked up.
type Claimed = (
    Option<String>,
    u32,
    DateTime,
    Option<mongodb::bson::Document>,
);

/// The task became takeable while it was being looked at.
struct Retake;

/// The wait between two hands-on of a message whose task this worker does not know (as many as
/// fit in `KOBE_UNKNOWN_TASK_GRACE_MS`).
pub const UNKNOWN_TASK_WAIT: Duration = Duration::from_secs(30);

/// The share of the execution lease a worker does not count on: it stops a handler whose lease
/// it could not renew this long before the lease ends (for the 30 s default, 5 s: workers'
/// clocks must agree within about half of it).
pub const LEASE_MARGIN: f64 = 1.0 / 6.0;

/// Milliseconds since the epoch of an RFC 3339 time. A time without a zone (Celery sends one
/// when its app is not timezone-aware) is UTC, as Celery's default `timezone` says.
fn millis_of(rfc3339: &str) -> Option<i64> {
    DateTime::parse_rfc3339_str(rfc3339)
        .or_else(|_| DateTime::parse_rfc3339_str(format!("{rfc3339}Z")))
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::millis_of;

    #[test]
    fn a_time_without_a_zone_is_utc() {
        let zoned = millis_of("2030-01-02T03:04:05.678+00:00").unwrap();
        assert_eq!(millis_of("2030-01-02T03:04:05.678").unwrap(), zoned);
        assert_eq!(millis_of("2030-01-02T03:04:05.678Z").unwrap(), zoned);
        assert_eq!(millis_of("2030-01-02T04:04:05.678+01:00").unwrap(), zoned);
        assert!(millis_of("tomorrow").is_none());
    }
}
