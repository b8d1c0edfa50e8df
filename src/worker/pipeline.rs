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
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use mongodb::bson::DateTime;
use serde_json::Value;
use tokio::sync::SemaphorePermit;
use tracing::Instrument;

use super::carry::{self, duplicate};
use super::decision::{self, Disposal, Happened, Verdict, UNKNOWN_TASK_WAIT};
use super::execute::{panic_message, Limits, Running};
use super::job::{AttemptCell, Job, Next};
use super::Worker;
use crate::amqp::{wire, Delivery, Settlement, TaskMessage};
use crate::celery::fleet;
use crate::store::attempts::{Attempt, Origin};
use crate::store::batch::Written;
use crate::store::celery_results::Meta;
use crate::store::task_leases::TakeOver;
use crate::store::StoreError;
use crate::store::TaskDocument;
use crate::tasks::{Invocation, Task};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;

impl Worker {
    /// Handles one delivery to the end, settling it — also when Kobe's own code panics.
    pub(super) async fn handle(self: Arc<Self>, delivery: Delivery) {
        let cell: AttemptCell = Arc::default();
        // The futures of a delivery's steps are boxed where they nest: spawned or awaited
        // inline, a state machine this large is copied whole each time it moves.
        let handled = AssertUnwindSafe(Box::pin(self.deliver(&delivery, &cell)))
            .catch_unwind()
            .await;
        if let Err(payload) = handled {
            let cause = panic_message(payload.as_ref());
            tracing::error!(cause = %cause, "delivery handling panicked; dead-lettering the message");
            Box::pin(self.after_panic(&delivery, &cell, cause)).await;
        }
    }

    async fn deliver(&self, delivery: &Delivery, cell: &AttemptCell) {
        let message = match TaskMessage::decode(&delivery.properties, &delivery.body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(redelivered = delivery.redelivered, root_cause = %error, "malformed message");
                let happened = Happened::Malformed(error.to_string());
                return self.unreadable(delivery, None, 0, happened).await;
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
        Box::pin(self.run_message(delivery, message, cell))
            .instrument(span)
            .await;
    }

    /// A delivery that cannot be handled as a task (its message unreadable, or Kobe's handling of
    /// it panicked): dead-lettered with `happened`, and its task closed when it names one.
    /// `known`: the attempt it was working on, and whether it holds its lease.
    async fn unreadable(
        &self,
        delivery: &Delivery,
        known: Option<(Attempt, bool)>,
        deliveries: u32,
        happened: Happened,
    ) {
        let (attempt, claimed) = known.unwrap_or_else(|| {
            let (id, name) = wire::identity(&delivery.properties);
            let attempt = Attempt::new(
                id.as_deref().unwrap_or(""),
                name.as_deref().unwrap_or("(unreadable)"),
                0,
            );
            (attempt, false)
        });
        let mut job = Job::new(delivery, attempt);
        job.claimed = claimed;
        job.lease_found = claimed;
        job.deliveries = deliveries;
        let mut plan = decision::plan(&happened, 1, &Default::default(), 0.0);
        if job.attempt.task_id.is_empty() {
            // No task to record it on: the dead letter is all there is.
            plan.record = None;
        }
        carry::carry_out(self, job, plan).await;
    }

    /// Kobe's own handling panicked: dead-letter the message with the reason and close the task,
    /// so the delivery is settled and its slot freed.
    async fn after_panic(&self, delivery: &Delivery, cell: &AttemptCell, cause: String) {
        metrics()
            .dead_letters
            .with_label_values(&[decision::reason::INTERNAL])
            .inc();
        let known = cell.lock().ok().and_then(|c| c.clone());
        let again =
            AssertUnwindSafe(self.unreadable(delivery, known, 1, Happened::Internal(cause)))
                .catch_unwind()
                .await;
        if again.is_err() {
            // Even that failed: let the broker dead-letter it, without Kobe's headers.
            self.settler.settle(delivery.tag, Settlement::DeadLetter);
        }
    }

    async fn run_message(&self, delivery: &Delivery, message: TaskMessage, cell: &AttemptCell) {
        if !self.liveness.is_live(delivery.tag) {
            // Its connection is gone and the broker has handed it back: never start it.
            duplicate("lost_connection");
            return;
        }
        let attempt = self.attempt_of(delivery, &message);
        let task = self.registry.get(&message.task);
        let verdict = self.on_arrival(delivery, &message, task.is_some());
        let (Some(task), Verdict::Takeable) = (task, &verdict) else {
            let job = Job::new(delivery, attempt).reading(&message);
            return self.follow(job, verdict).await;
        };
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
        let mut job = Job::new(delivery, attempt).reading(&message);
        loop {
            // No cached status to clear: readers cache only final states (see
            // `http::routes::status`), and what moves a task on from one is an operator's
            // rerun, which clears it. A claim and a success cost Redis nothing.
            // A run slot before the claim: waiting for one is not a start, so a backlog never
            // counts towards the delivery cap nor shows the task STARTED while it waits.
            let Some(slot) = self.slot().await else {
                return carry::dispose(self, &job, Disposal::Return).await;
            };
            *cell.lock().expect("attempt cell") = Some((job.attempt.clone(), false));
            let next =
                Box::pin(self.run_claimed(&mut job, slot, (task.as_ref(), &message), limits)).await;
            *cell.lock().expect("attempt cell") = Some((job.attempt.clone(), job.claimed));
            match next {
                Next::Conclude(happened) => return Box::pin(self.conclude(job, happened)).await,
                Next::Settled => return,
                Next::Retake => continue,
            }
        }
    }

    /// The attempt a message asks for, with what a document its claim creates needs.
    fn attempt_of(&self, delivery: &Delivery, message: &TaskMessage) -> Attempt {
        let attempt = Attempt::new(message.id.as_str(), &message.task, message.retries);
        if crate::amqp::wire::is_recorded(&delivery.properties) {
            return attempt;
        }
        attempt.with_origin(Origin {
            args: message.args.clone(),
            kwargs: message.kwargs.clone(),
            route: self
                .topology
                .route_for_key(&delivery.routing_key)
                .to_owned(),
            priority: message.priority.value(),
        })
    }

    /// What the message says against running it here and now, before anything is looked up.
    fn on_arrival(&self, delivery: &Delivery, message: &TaskMessage, known: bool) -> Verdict {
        if known {
            return decision::on_arrival(message, DateTime::now().timestamp_millis());
        }
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
        }
        decision::on_unknown(&message.task, hops, most)
    }

    /// Puts arguments kept in `RawPayload` (too large for the message) into the invocation,
    /// moved out of the stored value, not copied; the verdict when they cannot be had.
    async fn load_arguments(
        &self,
        delivery: &Delivery,
        invocation: &mut Invocation,
    ) -> Result<(), Verdict> {
        let Some(reference) = wire::payload_reference(&delivery.properties) else {
            return Ok(());
        };
        match self.payloads.get(&reference).await {
            Ok(Some(Value::Object(mut value))) => {
                invocation.args = match value.remove("args") {
                    Some(Value::Array(args)) => args,
                    _ => Vec::new(),
                };
                invocation.kwargs = match value.remove("kwargs") {
                    Some(Value::Object(kwargs)) => kwargs,
                    _ => Default::default(),
                };
                Ok(())
            }
            Ok(Some(_)) => Err(Verdict::Conclude(Happened::PayloadMissing(reference))),
            Ok(None) => Err(Verdict::Conclude(Happened::PayloadMissing(reference))),
            Err(error) => Err(Verdict::Dispose(Disposal::Outage(error.to_string()))),
        }
    }

    /// Carries a verdict reached before a claim out: close the task unrun, or settle the
    /// delivery. (Nothing against it: it was to run, and is left for the caller.)
    async fn follow(&self, job: Job<'_>, verdict: Verdict) {
        match verdict {
            Verdict::Conclude(happened) => self.conclude(job, happened).await,
            Verdict::Dispose(disposal) => carry::dispose(self, &job, disposal).await,
            Verdict::Takeable | Verdict::Wait { .. } => {}
        }
    }

    /// Plans for what happened and carries the plan out.
    async fn conclude(&self, job: Job<'_>, happened: Happened) {
        let policy = match self.registry.get(&job.attempt.task_name) {
            Some(task) if job.message.is_some() => self.policy(task.as_ref()),
            _ => Default::default(),
        };
        let plan = decision::plan(&happened, job.attempt_number(), &policy, fastrand::f64());
        carry::carry_out(self, job, plan).await;
    }

    /// Claims first, then runs. The claim is an insert of the attempt's lease (batched), sent
    /// together with a lookup of the task (batched too) where the lease alone cannot tell: a
    /// task finished, revoked or moved on to a later attempt is not run. A lease held already is
    /// taken over when it lapsed, or waited for while it holds, and the task looked up afresh.
    async fn run_claimed(
        &self,
        job: &mut Job<'_>,
        slot: SemaphorePermit<'_>,
        (task, message): (&dyn Task, &TaskMessage),
        limits: Limits,
    ) -> Next {
        // The lease the claim asks for is counted from before it is sent.
        let claimed_at = Instant::now();
        let (taken_over, deliveries, started_at, looked) = match self.claim(job).await {
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
        if let Some(next) = self.not_to_run(job, looked).await {
            // Ours, but the task says it must not run. The lease is this copy's own, so there
            // is no other to close before the outcome (closing it again would be refused by
            // itself, over and over: a cancel mark met by a retry's attempt livelocked so).
            drop(slot);
            job.claimed = false;
            job.lease_found = true;
            return next;
        }
        // Arguments kept in RawPayload are loaded only now, in a run slot and under a claim
        // that counted this start: a worker holds at most one attempt's arguments per slot
        // (never its whole prefetch's), and one killed while loading them has counted a
        // delivery, so the poison cut-off ends a task that kills every worker it reaches.
        let mut invocation = self.invocation(message);
        if let Err(verdict) = self.load_arguments(job.delivery, &mut invocation).await {
            drop(slot);
            return match verdict {
                Verdict::Conclude(happened) => Next::Conclude(happened),
                Verdict::Dispose(disposal) => {
                    carry::dispose(self, job, disposal).await;
                    Next::Settled
                }
                Verdict::Takeable | Verdict::Wait { .. } => Next::Settled,
            };
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
        if let Some(results) = &self.celery_results {
            results.put_soon(super::effects::celery_about(job), Meta::Started);
        }
        if let Some(events) = &self.celery_events {
            events.started(fleet::Started {
                about: super::effects::celery_about(job),
                root_id: message.root_id.clone(),
                parent_id: message.parent_id.clone(),
            });
        }
        let running = Running::start(task, invocation, limits);
        let next = self.supervise(job, running, claimed_at).await;
        drop(slot);
        next
    }

    /// Inserts the attempt's lease (taking a lapsed one over) and looks the task up beside it.
    /// `None`: another copy holds the attempt.
    async fn claim(&self, job: &mut Job<'_>) -> Result<Option<Claimed>, StoreError> {
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
                self.look_up(job).await
            } else {
                Ok(Looked::default())
            }
        };
        let (claimed, looked) = tokio::join!(claim.result(), looked_up);
        match claimed? {
            Written::Applied => match looked {
                Ok(looked) => Ok(Some((None, 1, now, looked))),
                // The claim is ours but what it was looked up beside is not known: it is taken
                // back, so the copy that comes back after the pause claims afresh — without
                // waiting for the lease to lapse, and without a start counted against it.
                Err(error) => {
                    let forgotten = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        self.leases.forget(&job.attempt),
                    )
                    .await;
                    if !matches!(forgotten, Ok(Ok(()))) {
                        tracing::debug!("cannot take the claim back; its lease lapses on its own");
                    }
                    Err(error)
                }
            },
            Written::Refused => {
                job.lease_found = true;
                self.take_over(job).await
            }
        }
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
                let looked = self.look_up(job).await?;
                Ok(Some((previous, deliveries, started_at, looked)))
            }
            TakeOver::Held => Ok(None),
        }
    }

    /// The task's document, this attempt's outcome and the one before it (a retry's, or what
    /// ended the task meanwhile), each read in a batch with other workers' lookups.
    async fn look_up(&self, job: &Job<'_>) -> Result<Looked, StoreError> {
        use crate::store::outcomes::{self, outcome_id};
        let id = &job.attempt.task_id;
        let retries = job.attempt.retries;
        let previous = async {
            match retries.checked_sub(1) {
                Some(before) => {
                    self.reader
                        .get(outcomes::COLLECTION, &outcome_id(id, before))
                        .await
                }
                None => Ok(None),
            }
        };
        let this = outcome_id(id, retries);
        let (task, outcome, previous) = tokio::try_join!(
            self.reader.get(crate::store::tasks::COLLECTION, id),
            self.reader.get(outcomes::COLLECTION, &this),
            previous,
        )?;
        Ok(Looked {
            task,
            outcome: outcome.or(previous),
        })
    }

    /// What the task's document and this attempt's outcome say against running this attempt,
    /// carried out where that settles it; `None`: run it.
    async fn not_to_run(&self, job: &Job<'_>, looked: Looked) -> Option<Next> {
        let task = match looked.read() {
            Ok(None) => return None,
            Ok(Some(task)) => task,
            // Unreadable: trying again reads the same bytes. It ends here, said, with the
            // delivery dead-lettered by the plan for an internal error.
            Err(error) => {
                return Some(Next::Conclude(Happened::Internal(format!(
                    "the task's stored record cannot be read: {error}"
                ))))
            }
        };
        match decision::on_task(&task, job.retries())? {
            Verdict::Conclude(happened) => Some(Next::Conclude(happened)),
            Verdict::Dispose(disposal) => {
                carry::dispose(self, job, disposal).await;
                Some(Next::Settled)
            }
            Verdict::Takeable | Verdict::Wait { .. } => None,
        }
    }

    /// A run slot, or `None` when none frees up within the slot wait: then the message goes back
    /// to its queue for a worker that has room — a delivery never waits long in a worker that
    /// cannot start it (so prefetching more than `concurrency` only helps while tasks are short).
    /// The slot comes before the claim, so going back costs the task nothing: no delivery
    /// counted, no state written.
    async fn slot(&self) -> Option<SemaphorePermit<'_>> {
        match tokio::time::timeout(self.config.slot_wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(
                    slot_wait_ms = self.config.slot_wait.as_millis() as u64,
                    "no run slot free in time; the message goes back to its queue"
                );
                None
            }
        }
    }

    async fn refused_claim(&self, job: &mut Job<'_>) -> Next {
        match carry::investigate(self, job).await {
            Verdict::Takeable => Next::Retake,
            Verdict::Conclude(Happened::Poison(n)) => {
                job.deliveries = n;
                Next::Conclude(Happened::Poison(n))
            }
            Verdict::Conclude(happened) => Next::Conclude(happened),
            Verdict::Dispose(disposal) => {
                carry::dispose(self, job, disposal).await;
                Next::Settled
            }
            Verdict::Wait { .. } => unreachable!("investigate waits itself"),
        }
    }

    async fn claim_failed(&self, job: &Job<'_>, error: StoreError) -> Next {
        if error.is_transient() {
            carry::dispose(self, job, Disposal::Outage(error.to_string())).await;
            Next::Settled
        } else {
            Next::Conclude(Happened::Internal(format!(
                "cannot record the start: {error}"
            )))
        }
    }

    fn invocation(&self, message: &TaskMessage) -> Invocation {
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

/// A claim taken: whose lapsed lease it replaced, the attempt's starts, when it started, and
/// what was looked up beside it.
type Claimed = (Option<String>, u32, DateTime, Looked);

/// The task's `Tasks` document and the latest of this attempt's outcome and the one before, as
/// looked up beside a claim (raw: read only when a verdict needs them).
#[derive(Debug, Default)]
struct Looked {
    task: Option<mongodb::bson::Document>,
    outcome: Option<mongodb::bson::Document>,
}

impl Looked {
    /// The task as the read model has it, the running attempt aside; `None` when neither is
    /// recorded.
    fn read(self) -> Result<Option<TaskDocument>, mongodb::bson::de::Error> {
        let task: Option<TaskDocument> = self.task.map(mongodb::bson::from_document).transpose()?;
        let outcome: Option<crate::store::outcomes::Outcome> =
            self.outcome.map(mongodb::bson::from_document).transpose()?;
        Ok(crate::store::view::compose_one(task, outcome.as_ref()))
    }
}
