//! The worker's [`Effects`]: what carrying a decision out does to MongoDB, Redis and the broker.
//! Every store write goes through the group-commit writer; every publish waits for its confirm.

use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::Value;

use super::carry::{Effects, Publish};
use super::decision::{Done, Plan, Published, Route, Stored};
use super::job::Job;
use super::Worker;
use crate::amqp::{wire, Outgoing, Settlement};
use crate::store::attempts::{Holding, Transition};
use crate::store::batch::Written;
use crate::store::celery_results::{About, CeleryResults, Meta};
use crate::store::payloads::{reference_in, reference_value};
use crate::store::task_leases::AttemptLease;
use crate::store::{Decision, ErrorRecord, StoreError, TaskDocument};

/// How long letting a lease go may take before it is left to lapse.
const RELEASE_BOUND: Duration = Duration::from_secs(2);

impl Effects for Worker {
    async fn record(&self, job: &Job<'_>, plan: &mut Plan) -> Stored {
        let error_record = error_record(job, plan);
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
        if let Some(stored) = self.before_outcome(job, transition).await {
            return stored;
        }
        let write = match self
            .tasks
            .outcomes()
            .write(&job.attempt, transition, holding)
        {
            Ok(write) => write,
            Err(error) => return Stored::Rejected(error.to_string()),
        };
        let had_error = error_record.is_some();
        let written = self.writer.submit(write);
        let logged =
            error_record.map(|record| self.writer.submit(self.errors.record_write(&record)));
        let stored = match written.result().await {
            Ok(Written::Applied) => Stored::Applied,
            // The attempt has an outcome: this one's own, sent again after a lost answer, or
            // another party's, which decided first.
            Ok(Written::Refused) => self.own_outcome(job, transition).await,
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
            if let Transition::Retry { owed: true, .. } = transition {
                // Rare: the outbox sends what `Tasks` says is owed.
                if let Err(error) = self.tasks.owe_next_attempt(&job.attempt).await {
                    tracing::warn!(error = %error, "cannot note the next attempt owed to the outbox");
                    return Stored::Unavailable;
                }
            }
            // A final status may be cached as soon as the outcome is in: one read between the
            // outcome and its TaskErrorLog record would cache it without its last error, so a
            // failure clears it once the record is written. A success is whole in its one write.
            if had_error {
                self.invalidator.invalidate(&job.attempt.task_id).await;
            }
        }
        stored
    }

    async fn publish(&self, job: &Job<'_>, publish: Publish<'_>) -> Published {
        let (outgoing, what) = match publish {
            Publish::Retry { delay } => match self.next_attempt(job, delay) {
                Some(outgoing) => (outgoing, "retry"),
                None => return Published::Failed,
            },
            Publish::DeadLetter { cause } => (self.dead_letter(job, cause), "dead letter"),
            Publish::SendBack { wait, hops } => (self.sent_back(job, wait, hops), "delayed copy"),
        };
        match self.publisher.publish(outgoing).await {
            Ok(()) => Published::Confirmed,
            Err(error) => {
                tracing::warn!(error = %error, "cannot publish the {what}");
                Published::Failed
            }
        }
    }

    fn settle(&self, job: &Job<'_>, settlement: Settlement) {
        self.settler.settle(job.delivery.tag, settlement);
    }

    async fn release(&self, job: &Job<'_>) {
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

    async fn hand_on(&self, job: &Job<'_>, outcome: Option<&Transition>) -> bool {
        if let Some(results) = &self.celery_results {
            // Boxed, as the rare branches below: a task's common path never moves their states.
            if let Err(error) = Box::pin(self.celery_outcome(results, job, outcome)).await {
                tracing::warn!(error = %error, "cannot write the outcome to Celery's result backend");
                return false;
            }
        }
        let Some(message) = job.message else {
            return true;
        };
        let task_id = &job.attempt.task_id;
        // An error that trying again cannot mend (an id over the bound, arguments no store
        // takes) is said and the delivery acked: handing it back would cycle it for ever.
        if let Some(workflow) = &message.workflow_id {
            match Box::pin(self.workflows.advance(workflow, task_id)).await {
                Ok(()) => {}
                Err(error) if error.is_permanent() => {
                    tracing::error!(error = %error, workflow_id = %workflow, "the workflow cannot be handed on, now or later");
                }
                Err(error) => {
                    tracing::warn!(error = %error, workflow_id = %workflow, "cannot hand the workflow on");
                    return false;
                }
            }
        }
        if let Some(embed) = &message.embed {
            match Box::pin(self.workflows.celery_canvas(task_id, embed)).await {
                Ok(()) => {}
                Err(error) if error.is_permanent() => {
                    tracing::error!(error = %error, "what the message's Celery canvas asks for can never be submitted; it is dropped");
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot submit what the message's Celery canvas asks for");
                    return false;
                }
            }
        }
        true
    }

    async fn look(
        &self,
        job: &Job<'_>,
    ) -> Result<(Option<TaskDocument>, Option<AttemptLease>), StoreError> {
        let task = self.tasks.stored(&job.attempt.task_id).await?;
        let lease = self
            .leases
            .get(&job.attempt.task_id, job.attempt.retries)
            .await?;
        Ok((task, lease))
    }

    fn acked(&self, job: &Job<'_>, plan: &Plan, done: &Done) {
        let Some(record) = plan
            .record
            .as_ref()
            .filter(|_| done.stored == Stored::Applied)
        else {
            return;
        };
        if record.target().is_final() {
            if let Some(reference) = wire::payload_reference(&job.delivery.properties) {
                // Its arguments are needed no more: the TTL index may collect them later.
                let _ = self.writer.submit(self.payloads.expire_write(&reference));
            }
        }
        if let Some(events) = &self.celery_events {
            events.ended(&job.attempt.task_id, Meta::of_transition(record));
        }
        if let (Some(results), Transition::Retry { .. }) = (&self.celery_results, record) {
            results.put_soon(celery_about(job), Meta::of_transition(record));
        }
        if matches!(plan.route, Route::DeadLetter { .. }) {
            // The debt is paid; noting it is a courtesy (a redelivery would find the task
            // finished and at worst publish a second dead letter).
            self.dead_letter_paid(job);
        }
    }

    fn dead_letter_paid(&self, job: &Job<'_>) {
        // Rare (a failure that dead-letters): plain updates, not upserts, since the debt may be
        // on the attempt's outcome or on a document an earlier version wrote.
        let tasks = self.tasks.clone();
        let (id, retries) = (job.attempt.task_id.clone(), job.attempt.retries);
        tokio::spawn(async move {
            if let Err(error) = tasks.dead_letter_sent(&id, retries).await {
                tracing::debug!(error = %error, "cannot note the dead letter as sent");
            }
        });
    }

    fn may_continue(&self, job: &Job<'_>) -> bool {
        self.may_continue(job.delivery.tag)
    }

    fn max_deliveries(&self) -> u32 {
        self.config.max_deliveries
    }

    fn outage_pause(&self) -> Duration {
        self.pause.after_outage()
    }

    async fn sleep(&self, pause: Duration) {
        tokio::time::sleep(pause).await
    }

    fn task_label<'n>(&self, name: &'n str) -> &'n str {
        self.task_label(name)
    }
}

impl Worker {
    /// Writes a finished task's outcome to Celery's result backend: `outcome` as recorded, or
    /// (a redelivery of a finished task) as the store has it. A result kept in `RawPayload` is
    /// read back, for Python gets the value.
    async fn celery_outcome(
        &self,
        results: &CeleryResults,
        job: &Job<'_>,
        outcome: Option<&Transition>,
    ) -> Result<(), StoreError> {
        if job.attempt.task_id.is_empty() {
            return Ok(());
        }
        let meta = match outcome {
            // A retry's meta was put as it was recorded; it is not final.
            Some(transition) => Some(Meta::of_transition(transition)),
            None => self
                .tasks
                .stored(&job.attempt.task_id)
                .await?
                .and_then(|task| Meta::of_state(task.state, task.result, task.root_cause)),
        };
        let Some(mut meta) = meta.filter(Meta::is_final) else {
            return Ok(());
        };
        if let Meta::Success { result } = &mut meta {
            if reference_in(result).is_some() {
                *result = self
                    .payloads
                    .resolve(result.clone())
                    .await?
                    .unwrap_or(Value::Null);
            }
        }
        results.put(&celery_about(job), &meta).await
    }

    /// Puts the result in the result backend (when on) and keeps a large one in `RawPayload`,
    /// leaving a reference in its place. The backend copy is written first, so a client who sees
    /// `SUCCESS` finds the result.
    async fn keep_result(&self, task_id: &str, result: &mut Value) -> Result<(), StoreError> {
        if reference_in(result).is_some() {
            // Kept already, by a first try of this record: the backend has the value, and the
            // reference must not replace it there.
            return Ok(());
        }
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

    /// The next attempt's message for the delay queue, keeping headers a plain message does not
    /// know (a payload reference, say). `None` for a delivery that was never read.
    fn next_attempt(&self, job: &Job<'_>, delay: Duration) -> Option<Outgoing> {
        let mut next = job.message?.clone();
        next.retries = next.retries.saturating_add(1);
        // Its due time rides with it: the delay levels take it there in exact hops, however
        // long the delay (a retry without one ran after the longest level at most).
        let due = mongodb::bson::DateTime::from_millis(
            mongodb::bson::DateTime::now()
                .timestamp_millis()
                .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        next.eta = due.try_to_rfc3339_string().ok();
        let mut properties = next.properties();
        if let Some(original) = job.delivery.properties.headers() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            for (k, v) in original {
                headers.entry(k.clone()).or_insert_with(|| v.clone());
            }
            properties = properties.with_headers(headers);
        }
        let outgoing = Outgoing {
            exchange: self.topology.tasks_exchange(),
            routing_key: self.route_of(job),
            body: next.body(),
            properties,
        };
        Some(self.topology.delayed(outgoing, delay))
    }

    fn dead_letter(&self, job: &Job<'_>, cause: &str) -> Outgoing {
        let delivery = job.delivery;
        let properties = wire::dead_letter_properties(
            &delivery.properties,
            cause,
            &delivery.routing_key,
            job.message.map(|m| m.retries.saturating_add(1)),
        );
        Outgoing {
            exchange: self.topology.dead_letter_exchange(),
            routing_key: delivery.routing_key.clone(),
            body: delivery.body.clone(),
            properties,
        }
    }

    /// The delivery as it came, through the delay queues after `wait`; with `hops`, counted as
    /// handed on for a worker that knows its task.
    fn sent_back(&self, job: &Job<'_>, wait: Duration, hops: Option<i64>) -> Outgoing {
        let mut properties = job.delivery.properties.clone();
        if let Some(hops) = hops {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                wire::UNKNOWN_HOPS_HEADER.into(),
                amiquip::AmqpValue::LongLongInt(hops),
            );
            properties = properties.with_headers(headers);
        }
        let outgoing = Outgoing {
            exchange: self.topology.tasks_exchange(),
            routing_key: self.route_of(job),
            body: job.delivery.body.clone(),
            properties,
        };
        self.topology.delayed(outgoing, wait)
    }

    fn route_of(&self, job: &Job<'_>) -> String {
        self.topology
            .route_for_key(&job.delivery.routing_key)
            .to_owned()
    }
}

/// What Celery's meta says of the task besides its state.
pub(super) fn celery_about(job: &Job<'_>) -> About {
    let message = job.message;
    About {
        task_id: job.attempt.task_id.clone(),
        name: job.attempt.task_name.clone(),
        args: message.map(|m| m.args.clone()).unwrap_or_default(),
        kwargs: message.map(|m| m.kwargs.clone()).unwrap_or_default(),
        retries: job.attempt.retries,
        queue: job.delivery.routing_key.clone(),
    }
}

/// The `TaskErrorLog` record of a plan that retries or dead-letters.
fn error_record(job: &Job<'_>, plan: &Plan) -> Option<ErrorRecord> {
    let cause = plan.cause.clone()?;
    let (decision, retry_delay_ms) = match plan.route {
        Route::Ack => return None,
        Route::Retry { delay } => (Decision::Retry, Some(delay.as_millis() as u64)),
        Route::DeadLetter { .. } => (Decision::DeadLetter, None),
    };
    Some(ErrorRecord {
        task_id: job.attempt.task_id.clone(),
        task_name: job.attempt.task_name.clone(),
        attempt: job.attempt_number(),
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

impl Worker {
    /// What must be checked before an outcome is written, where the insert alone cannot say:
    /// a handler whose lease may have lapsed while it ran (a paused or starved worker) records
    /// only while the lease is still its own — another attempt took it over otherwise, and this
    /// one's outcome is kept as history beside it; and no retry follows a cancel.
    async fn before_outcome(&self, job: &Job<'_>, transition: &Transition) -> Option<Stored> {
        let lapsed = job.claimed
            && job
                .trusted_until
                .is_some_and(|until| std::time::Instant::now() > until);
        if lapsed {
            let lease = self
                .leases
                .get(&job.attempt.task_id, job.attempt.retries)
                .await;
            match lease {
                Ok(Some(lease)) if lease.token == job.attempt.token => {}
                Ok(_) => {
                    tracing::warn!(
                        "the lease lapsed while the handler ran and another attempt took it over: this outcome is kept as history only"
                    );
                    if let Err(error) = self
                        .tasks
                        .outcomes()
                        .superseded(&job.attempt, transition)
                        .await
                    {
                        tracing::debug!(error = %error, "cannot keep the superseded outcome");
                    }
                    return Some(Stored::Refused);
                }
                Err(error) if error.is_transient() => return Some(Stored::Unavailable),
                Err(error) => return Some(Stored::Rejected(error.to_string())),
            }
        }
        if matches!(transition, Transition::Retry { .. }) {
            // Retries are rare: one read of the document says whether an operator asked the
            // task to stop (then the refusal is looked into, and the task revoked).
            match self.tasks.document(&job.attempt.task_id).await {
                Ok(Some(task)) if task.cancel_requested.is_some() => return Some(Stored::Refused),
                Ok(_) => {}
                Err(error) if error.is_transient() => return Some(Stored::Unavailable),
                Err(error) => return Some(Stored::Rejected(error.to_string())),
            }
        }
        None
    }

    /// After a refused outcome insert: `Applied` when the attempt's outcome is this one's own
    /// (sent again after an answer was lost), `Refused` when another party decided first.
    async fn own_outcome(&self, job: &Job<'_>, transition: &Transition) -> Stored {
        match self
            .tasks
            .outcomes()
            .get(&job.attempt.task_id, job.attempt.retries)
            .await
        {
            Ok(Some(outcome))
                if outcome.token == job.attempt.token && outcome.state == transition.target() =>
            {
                Stored::Applied
            }
            Ok(_) => Stored::Refused,
            Err(error) if error.is_transient() => Stored::Unavailable,
            Err(error) => Stored::Rejected(error.to_string()),
        }
    }
}
