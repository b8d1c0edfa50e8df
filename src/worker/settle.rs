//! Settling a delivery: after the handler (or the checks before it) has said what happened,
//! plan the outcome with [`decision`](super::decision), record it, publish the retry or the dead
//! letter it calls for, and ack, requeue or hold the delivery — each step taken once, in the order
//! the plan gives, with pauses while a dependency is down.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use mongodb::bson::DateTime;
use serde_json::Value;

use super::decision::{self, Done, Happened, Plan, Published, Route, Step, Stored};
use super::pipeline::{AttemptCell, Job, UNKNOWN_TASK_WAIT};
use super::Worker;
use crate::amqp::{wire, Delivery, Outgoing, Settlement};
use crate::domain::TaskState;
use crate::store::attempts::{Attempt, Holding, Transition};
use crate::store::batch::Written;
use crate::store::payloads::reference_value;
use crate::store::{Decision, ErrorRecord, StoreError, TaskDocument};
use crate::telemetry::metrics::metrics;

/// How long letting a lease go may take before it is left to lapse.
const RELEASE_BOUND: Duration = Duration::from_secs(2);

/// What looking at a task whose write was refused found.
pub(super) enum Found {
    /// The delivery is settled (a duplicate, or a dead letter owed and now published).
    Settled,
    /// The task can be taken after all (its lease lapsed meanwhile): try again.
    Takeable,
    /// Its current attempt was started too often: close it as poison.
    Poison(u32),
    /// An operator asked it to stop: it must not go on; close it `REVOKED` with this cause.
    Cancelled(String),
}

/// An operator asked the task to stop while an attempt ran: this copy does not go on with it.
fn cancelled_while_running(request: &crate::store::tasks::Replay) -> Found {
    tracing::info!(by = %request.by, "the task was cancelled while an attempt ran; not going on with it");
    Found::Cancelled(format!(
        "cancelled by {} while it ran; not run again",
        request.by
    ))
}

impl Worker {
    /// Plans for what happened and carries the plan out.
    pub(super) async fn conclude(&self, job: Job<'_>, happened: Happened) {
        let policy = match &job.message {
            Some(message) => match self.registry.get(&message.task) {
                Some(task) => self.policy(task.as_ref()),
                None => Default::default(),
            },
            None => Default::default(),
        };
        let attempt = job.retries().saturating_add(1);
        let plan = decision::plan(&happened, attempt, &policy, fastrand::f64());
        self.carry_out(job, plan).await;
    }

    /// Carries a plan out step by step, as [`decision::next`] says.
    pub(super) async fn carry_out(&self, mut job: Job<'_>, mut plan: Plan) {
        let mut done = Done::default();
        let mut pauses = self.pause.sequence();
        loop {
            match decision::next(&plan, &done) {
                Step::Record => done.stored = self.record(&job, &mut plan).await,
                Step::PublishRetry => {
                    let Route::Retry { delay } = plan.route else {
                        unreachable!("a retry step of a retry plan")
                    };
                    done.published = self.publish_retry(&job, delay).await;
                }
                Step::PublishDeadLetter => {
                    done.published = self.publish_dead_letter(&job, &plan).await;
                }
                Step::Ack => {
                    self.acked(&job, &plan, &done).await;
                    return;
                }
                Step::Again => {
                    if !self.may_continue(job.delivery.tag) {
                        if self.owe_retry(&job, &mut plan, &done).await {
                            return;
                        }
                        // The broker took the message back; a redelivery will finish the job.
                        self.release(&job).await;
                        return;
                    }
                    let pause = pauses.next();
                    tracing::warn!(
                        pause_ms = pause.as_millis() as u64,
                        "cannot finish this delivery now; holding it and trying again"
                    );
                    tokio::time::sleep(pause).await;
                    if done.published == Published::Failed {
                        done.published = Published::NotYet;
                    } else {
                        done.stored = Stored::NotYet;
                    }
                }
                Step::Investigate => {
                    match self.investigate(&job).await {
                        // Poison counts starts that reached no outcome; this one has its outcome
                        // in hand, which is recorded rather than lost.
                        Some(Found::Takeable) | Some(Found::Poison(_)) => {
                            // It was not ours, and now nobody holds it: record under the claim's
                            // conditions (the outcome is in hand).
                            job.claimed = false;
                            job.lease_found = true;
                            done = Done {
                                published: done.published,
                                stored: Stored::NotYet,
                            };
                        }
                        Some(Found::Cancelled(cause)) => {
                            plan = decision::plan(
                                &Happened::Cancelled(cause),
                                job.retries().saturating_add(1),
                                &Default::default(),
                                0.0,
                            );
                            done = Done::default();
                        }
                        Some(Found::Settled) | None => return,
                    }
                }
                Step::Replan(happened) => {
                    tracing::warn!(?happened, "replanning");
                    let attempt = job.retries().saturating_add(1);
                    plan = decision::plan(&happened, attempt, &Default::default(), 0.0);
                    done = Done::default();
                }
            }
        }
    }

    /// Records what [`decision::when_lost`] says a delivery this worker can no longer settle (its
    /// connection is gone, or it is stopping) still owes; `true` when recorded.
    async fn owe_retry(&self, job: &Job<'_>, plan: &mut Plan, done: &Done) -> bool {
        let Some(owed) = decision::when_lost(plan, done) else {
            return false;
        };
        plan.record = Some(owed);
        if self.record(job, plan).await != Stored::Applied {
            return false;
        }
        tracing::warn!("delivery lost with its retry's publish in doubt; RETRY recorded with the next attempt owed to the outbox");
        metrics()
            .task_retries
            .with_label_values(&[self.task_label(&job.attempt.task_name)])
            .inc();
        true
    }

    /// Writes the plan's record (keeping a large result in `RawPayload` first).
    async fn record(&self, job: &Job<'_>, plan: &mut Plan) -> Stored {
        let Some(transition) = plan.record.as_mut() else {
            return Stored::Applied;
        };
        if let Transition::Success { result } = transition {
            match self.keep_result(&job.attempt.task_id, result).await {
                Ok(()) => {}
                Err(error) if error.is_transient() => return Stored::Unavailable,
                Err(error) => return Stored::Rejected(error.to_string()),
            }
        }
        let holding = if job.claimed {
            Holding::Lease {
                started_at: job.started_at.unwrap_or_else(DateTime::now),
                deliveries: job.deliveries,
            }
        } else {
            Holding::Nothing {
                deliveries: job.deliveries,
            }
        };
        if !job.claimed && !job.lease_found && !job.attempt.task_id.is_empty() {
            // Closed unrun (expired, unknown, its arguments lost): its attempt first, so no copy
            // can start it meanwhile; a copy holding it already has the say.
            let close = self.leases.close_write(&job.attempt, transition.target());
            match self.writer.write(close).await {
                Ok(Written::Applied) => {}
                Ok(Written::Refused) => return Stored::Refused,
                Err(error) if error.is_transient() => return Stored::Unavailable,
                Err(error) => return Stored::Rejected(error.to_string()),
            }
        }
        let write = match self.tasks.outcome_write(&job.attempt, transition, holding) {
            Ok(write) => write,
            Err(error) => return Stored::Rejected(error.to_string()),
        };
        let error_record = self.error_record(job, plan);
        let written = self.writer.submit(write);
        let logged =
            error_record.map(|record| self.writer.submit(self.errors.record_write(&record)));
        let stored = match written.result().await {
            Ok(Written::Applied) => Stored::Applied,
            Ok(Written::Refused) => Stored::Refused,
            Err(error) if error.is_transient() => {
                tracing::warn!(error = %error, "cannot record the outcome now");
                Stored::Unavailable
            }
            Err(error) => {
                tracing::warn!(error = %error, "MongoDB refuses the outcome");
                Stored::Rejected(error.to_string())
            }
        };
        if let Some(logged) = logged {
            if let Err(error) = logged.result().await {
                tracing::error!(error = %error, "cannot write the TaskErrorLog record");
            }
        }
        if stored == Stored::Applied {
            self.pause.recovered();
            self.invalidator.invalidate(&job.attempt.task_id).await;
        }
        stored
    }

    fn error_record(&self, job: &Job<'_>, plan: &Plan) -> Option<ErrorRecord> {
        let cause = plan.cause.clone()?;
        let (decision, retry_delay_ms) = match plan.route {
            Route::Ack => return None,
            Route::Retry { delay } => (Decision::Retry, Some(delay.as_millis() as u64)),
            Route::DeadLetter { .. } => (Decision::DeadLetter, None),
        };
        Some(ErrorRecord {
            task_id: job.attempt.task_id.clone(),
            task_name: job.attempt.task_name.clone(),
            attempt: job.retries().saturating_add(1),
            root_cause: cause,
            decision,
            retry_delay_ms,
            at: DateTime::now(),
            worker: job
                .started_at
                .map(|_| crate::config::worker_name().to_owned()),
            started_at: job.started_at,
        })
    }

    /// The message is done: settle it, then count and log what happened.
    async fn acked(&self, job: &Job<'_>, plan: &Plan, done: &Done) {
        self.settle(job.delivery, Settlement::Ack);
        let task = self.task_label(&job.attempt.task_name);
        let m = metrics();
        if let (Some(record), Stored::Applied) = (&plan.record, &done.stored) {
            m.task_outcomes
                .with_label_values(&[task, record.target().as_str()])
                .inc();
            if record.target().is_final() {
                if let Some(reference) = wire::payload_reference(&job.delivery.properties) {
                    // Its arguments are needed no more: the TTL index may collect them later.
                    let _ = self.writer.submit(self.payloads.expire_write(&reference));
                }
            }
        }
        let cause = plan.cause.as_deref().unwrap_or_default();
        match plan.route {
            Route::Ack if plan.cause.is_none() => {
                tracing::info!(retry_count = job.retries(), "task succeeded")
            }
            Route::Ack if matches!(plan.record, Some(Transition::Revoked { .. })) => {
                tracing::info!(root_cause = %cause, retry_count = job.retries(), decision = "revoke", "task revoked")
            }
            Route::Ack => {
                tracing::warn!(root_cause = %cause, retry_count = job.retries(), decision = "drop", "task dropped")
            }
            Route::Retry { delay } => {
                m.task_retries.with_label_values(&[task]).inc();
                tracing::warn!(root_cause = %cause, retry_count = job.retries() + 1, retry_in_ms = delay.as_millis() as u64, decision = "retry", "task will be retried");
            }
            Route::DeadLetter { reason } => {
                m.dead_letters.with_label_values(&[reason]).inc();
                tracing::warn!(root_cause = %cause, retry_count = job.retries(), decision = "dead_letter", "task failed");
                if plan.record.is_some() && done.stored == Stored::Applied {
                    // The debt is paid; noting it is a courtesy (a redelivery would find the
                    // task finished and at worst publish a second dead letter).
                    let _ = self
                        .writer
                        .submit(self.tasks.dead_letter_sent_write(&job.attempt.task_id));
                }
            }
        }
    }

    /// Looks at a task after a claim or a write was refused — its document, then its attempt's
    /// lease — and settles the delivery when that is the answer. `None` when the delivery was
    /// settled (or given up) on the way.
    pub(super) async fn investigate(&self, job: &Job<'_>) -> Option<Found> {
        let mut pauses = self.pause.sequence();
        let mut held = false;
        loop {
            if !self.may_continue(job.delivery.tag) {
                return None;
            }
            let looked = async {
                let task = self.tasks.stored(&job.attempt.task_id).await?;
                let lease = self
                    .leases
                    .get(&job.attempt.task_id, job.attempt.retries)
                    .await?;
                Ok::<_, StoreError>((task, lease))
            };
            let (task, lease) = match looked.await {
                Ok(found) => found,
                Err(error) => {
                    self.requeue(job, &error).await;
                    return None;
                }
            };
            if let Some(task) = &task {
                if let Some(found) = self.verdict_on(job, task).await {
                    return Some(found);
                }
            }
            let now = DateTime::now();
            let Some(lease) = lease else {
                return Some(Found::Takeable);
            };
            if lease.token == job.attempt.token {
                // Ours (a write sent again after an ambiguous failure).
                return Some(Found::Takeable);
            }
            if let Some(state) = lease.closed {
                let by = lease
                    .cancel
                    .as_ref()
                    .map_or("an operator", |c| c.by.as_str());
                return Some(Found::Cancelled(match state {
                    TaskState::Revoked => format!("cancelled by {by} before it ran"),
                    _ => "its submission was not accepted".to_owned(),
                }));
            }
            if lease.done_at.is_some() {
                // Its outcome is on its way to the task's document: look again.
                tokio::time::sleep(pauses.next().min(Duration::from_millis(200))).await;
                continue;
            }
            if lease.lease_until > now {
                if !held {
                    held = true;
                    tracing::info!(lease_until = ?lease.lease_until, "another attempt holds the task; holding this copy until it finishes or its lease lapses");
                    self.duplicate("held");
                }
                let until = lease.lease_until.timestamp_millis() - now.timestamp_millis();
                tokio::time::sleep(Duration::from_millis(until.clamp(50, 1000) as u64)).await;
                continue;
            }
            if let Some(request) = &lease.cancel {
                return Some(cancelled_while_running(request));
            }
            if lease.deliveries >= self.config.max_deliveries {
                return Some(Found::Poison(lease.deliveries));
            }
            if held {
                tracing::warn!("the attempt holding the task let its lease lapse; taking over");
            } else {
                // Takeable: the refusal raced a change. Pause a little so a flapping state
                // cannot spin us.
                tokio::time::sleep(pauses.next().min(Duration::from_millis(200))).await;
            }
            return Some(Found::Takeable);
        }
    }

    /// What the task's document says against this attempt going on, settling the delivery when
    /// that is the answer: finished (a dead letter it still owes is paid), moved on to a later
    /// attempt, or cancelled. `None`: nothing against it.
    pub(super) async fn verdict_on(&self, job: &Job<'_>, task: &TaskDocument) -> Option<Found> {
        if task.state.is_final() {
            if task.dead_letter.as_deref() == Some(crate::store::attempts::DEAD_LETTER_PENDING) {
                // A dead letter owed by an attempt that died before publishing it.
                self.pay_dead_letter(job, task).await;
                return Some(Found::Settled);
            }
            self.settle(job.delivery, Settlement::Ack);
            if task.state == TaskState::Revoked {
                tracing::info!(
                    "task cancelled by an operator; its message is acked without running"
                );
                self.duplicate("revoked");
            } else {
                tracing::info!(state = %task.state, "task already finished; duplicate delivery acked without running");
                self.duplicate("finished");
            }
            return Some(Found::Settled);
        }
        if task.retries > job.retries() {
            tracing::info!(
                task_retries = task.retries,
                "a later attempt exists; stale delivery acked without running"
            );
            self.settle(job.delivery, Settlement::Ack);
            self.duplicate("stale_attempt");
            return Some(Found::Settled);
        }
        if let Some(request) = &task.cancel_requested {
            return Some(cancelled_while_running(request));
        }
        None
    }

    /// Publishes the dead letter a finished task still owes, then acks.
    async fn pay_dead_letter(&self, job: &Job<'_>, task: &TaskDocument) {
        let plan = Plan {
            record: None,
            route: Route::DeadLetter {
                reason: decision::reason::PERMANENT_ERROR,
            },
            cause: task.root_cause.clone(),
        };
        let mut pauses = self.pause.sequence();
        loop {
            match self.publish_dead_letter(job, &plan).await {
                Published::Confirmed => break,
                _ if !self.may_continue(job.delivery.tag) => return,
                _ => tokio::time::sleep(pauses.next()).await,
            }
        }
        tracing::warn!("published the dead letter a finished task still owed");
        self.settle(job.delivery, Settlement::Ack);
        let _ = self
            .writer
            .submit(self.tasks.dead_letter_sent_write(&job.attempt.task_id));
    }

    /// Puts the result in the result backend (when on) and keeps a large one in `RawPayload`,
    /// leaving a reference in its place. The backend copy is written first, so a client who sees
    /// `SUCCESS` finds the result.
    async fn keep_result(&self, task_id: &str, result: &mut Value) -> Result<(), StoreError> {
        if let Some(ttl) = self.config.result_ttl {
            if let Err(error) = self
                .cache
                .put_result(task_id, &result.to_string(), ttl)
                .await
            {
                tracing::warn!(error = %error, "cannot store the result in Redis");
            }
        }
        let size = serde_json::to_vec(&*result).map_or(0, |v| v.len());
        if size > self.config.inline_limit {
            let reference = self.payloads.put(task_id, "result", result).await?;
            *result = reference_value(&reference);
        }
        Ok(())
    }

    /// Publishes the next attempt to the delay queue, keeping headers a plain message does not
    /// know (a payload reference, say).
    async fn publish_retry(&self, job: &Job<'_>, delay: Duration) -> Published {
        let Some(message) = &job.message else {
            return Published::Failed;
        };
        let mut next = message.clone();
        next.retries = next.retries.saturating_add(1);
        let mut properties = next.properties();
        if let Some(original) = job.delivery.properties.headers() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            for (k, v) in original {
                headers.entry(k.clone()).or_insert_with(|| v.clone());
            }
            properties = properties.with_headers(headers);
        }
        let outgoing = self.topology.delayed(
            Outgoing {
                exchange: self.topology.tasks_exchange(),
                routing_key: self
                    .topology
                    .route_for_key(&job.delivery.routing_key)
                    .to_owned(),
                body: next.body(),
                properties,
            },
            delay,
        );
        self.publish(outgoing, "retry").await
    }

    async fn publish_dead_letter(&self, job: &Job<'_>, plan: &Plan) -> Published {
        let cause = plan.cause.as_deref().unwrap_or("dead-lettered");
        let properties = wire::dead_letter_properties(
            &job.delivery.properties,
            cause,
            &job.delivery.routing_key,
            job.message.as_ref().map(|m| m.retries.saturating_add(1)),
        );
        let outgoing = Outgoing {
            exchange: self.topology.dead_letter_exchange(),
            routing_key: job.delivery.routing_key.clone(),
            body: job.delivery.body.clone(),
            properties,
        };
        self.publish(outgoing, "dead letter").await
    }

    async fn publish(&self, outgoing: Outgoing, what: &str) -> Published {
        match self.publisher.publish(outgoing).await {
            Ok(()) => Published::Confirmed,
            Err(error) => {
                tracing::warn!(error = %error, "cannot publish the {what}");
                Published::Failed
            }
        }
    }

    /// A task not due yet goes back to the delay queues for the time that is left (the longest
    /// delay level is shorter than a far ETA, so this may happen more than once).
    pub(super) async fn delay_again(&self, delivery: &Delivery, wait: Duration) {
        self.send_back(delivery, delivery.properties.clone(), wait)
            .await
    }

    /// A task this worker does not know goes back after [`UNKNOWN_TASK_WAIT`], counted in its
    /// headers, for a worker that knows it.
    pub(super) async fn hand_on_unknown(&self, delivery: &Delivery, hops: i64) {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            wire::UNKNOWN_HOPS_HEADER.into(),
            amiquip::AmqpValue::LongLongInt(hops),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        self.send_back(delivery, properties, UNKNOWN_TASK_WAIT)
            .await
    }

    /// Publishes the delivery again through the delay queues after `wait`, then acks it.
    async fn send_back(
        &self,
        delivery: &Delivery,
        properties: amiquip::AmqpProperties,
        wait: Duration,
    ) {
        let again = self.topology.delayed(
            Outgoing {
                exchange: self.topology.tasks_exchange(),
                routing_key: self
                    .topology
                    .route_for_key(&delivery.routing_key)
                    .to_owned(),
                body: delivery.body.clone(),
                properties,
            },
            wait,
        );
        let mut pauses = self.pause.sequence();
        loop {
            match self.publisher.publish(again.clone()).await {
                Ok(()) => {
                    tracing::debug!(
                        wait_ms = wait.as_millis() as u64,
                        "task not due yet; delayed again"
                    );
                    self.settle(delivery, Settlement::Ack);
                    return;
                }
                Err(error) if self.may_continue(delivery.tag) => {
                    let pause = pauses.next();
                    tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "cannot delay the task again yet");
                    tokio::time::sleep(pause).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Hands the message back after a pause (so an outage is not a redelivery storm), letting
    /// the attempt's lease lapse so its redelivery can start at once.
    pub(super) async fn requeue(&self, job: &Job<'_>, error: &StoreError) {
        let pause = self.pause.after_outage();
        tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "MongoDB cannot take this delivery now; it returns to the queue");
        tokio::time::sleep(pause).await;
        self.release(job).await;
        self.settle(job.delivery, Settlement::Requeue);
    }

    /// Lets the attempt's lease go, if it holds one. Bounded in time: when MongoDB does not
    /// answer, the lease lapses on its own.
    pub(super) async fn release(&self, job: &Job<'_>) {
        if job.claimed {
            match tokio::time::timeout(RELEASE_BOUND, self.leases.release(&job.attempt)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(error = %error, "cannot release the lease; it lapses on its own")
                }
                Err(_) => tracing::debug!("no answer to the lease release; it lapses on its own"),
            }
        }
    }

    /// Kobe's own handling panicked: dead-letter the message with the reason and close the task,
    /// so the delivery is settled and its slot freed.
    pub(super) async fn after_panic(&self, delivery: &Delivery, cell: &AttemptCell, cause: String) {
        metrics()
            .dead_letters
            .with_label_values(&[decision::reason::INTERNAL])
            .inc();
        let known = cell.lock().ok().and_then(|c| c.clone());
        let (attempt, claimed) = match known {
            Some(known) => known,
            None => {
                let (id, name) = wire::identity(&delivery.properties);
                (
                    Attempt::new(
                        id.as_deref().unwrap_or(""),
                        name.as_deref().unwrap_or("(unreadable)"),
                        0,
                    ),
                    false,
                )
            }
        };
        let job = Job {
            delivery,
            message: None,
            attempt,
            claimed,
            started_at: None,
            deliveries: 1,
            lease_found: claimed,
        };
        let mut plan = decision::plan(&Happened::Internal(cause), 1, &Default::default(), 0.0);
        if job.attempt.task_id.is_empty() {
            plan.record = None;
        }
        let again = AssertUnwindSafe(self.carry_out(job, plan))
            .catch_unwind()
            .await;
        if again.is_err() {
            // Even that failed: let the broker dead-letter it, without Kobe's headers.
            self.settle(delivery, Settlement::DeadLetter);
        }
    }

    pub(super) fn settle(&self, delivery: &Delivery, settlement: Settlement) {
        self.settler.settle(delivery.tag, settlement);
    }

    pub(super) fn duplicate(&self, why: &'static str) {
        metrics()
            .duplicate_deliveries
            .with_label_values(&[why])
            .inc();
    }
}
