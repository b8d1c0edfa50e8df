//! Carrying decisions out: a [`Plan`] step by step as [`decision::next`] says, a [`Disposal`]
//! of a delivery that reaches no outcome of its own, and the look at a task whose claim or write
//! was refused. Every settlement of a delivery is made here.
//!
//! What it does to the world — record, publish, settle, release, look — goes through
//! [`Effects`]; the worker is the real one, and the tests below drive the executor with a fake,
//! answer by answer.

use std::time::Duration;

use mongodb::bson::DateTime;

use super::decision::{
    self, Disposal, Done, Happened, Plan, Published, Route, Step, Stored, Verdict,
};
use super::job::Job;
use super::pause::Pauses;
use crate::amqp::Settlement;
use crate::store::attempts::Transition;
use crate::store::task_leases::AttemptLease;
use crate::store::{StoreError, TaskDocument};
use crate::telemetry::metrics::metrics;

/// A message to publish for a delivery.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Publish<'a> {
    /// The next attempt, through the delay queue after `delay`.
    Retry { delay: Duration },
    /// The delivery to the dead-letter exchange, with its cause.
    DeadLetter { cause: &'a str },
    /// The delivery again, through the delay queues after `wait` (with `hops`: one more hand-on
    /// of a task this worker does not know).
    SendBack { wait: Duration, hops: Option<i64> },
}

/// What carrying a decision out does to the world.
pub(super) trait Effects {
    /// Writes the plan's record (a large result kept in `RawPayload` first).
    async fn record(&self, job: &Job<'_>, plan: &mut Plan) -> Stored;
    /// Publishes and waits for the broker's confirm.
    async fn publish(&self, job: &Job<'_>, publish: Publish<'_>) -> Published;
    fn settle(&self, job: &Job<'_>, settlement: Settlement);
    /// Lets the attempt's lease go, if it holds one (bounded in time).
    async fn release(&self, job: &Job<'_>);
    /// The task's document and its attempt's lease, as stored now.
    async fn look(
        &self,
        job: &Job<'_>,
    ) -> Result<(Option<TaskDocument>, Option<AttemptLease>), StoreError>;
    /// After the ack of a plan: what the store may now forget or note (arguments no longer
    /// needed, a dead letter paid).
    fn acked(&self, job: &Job<'_>, plan: &Plan, done: &Done);
    /// Notes that the dead letter a finished task owed is published.
    fn dead_letter_paid(&self, job: &Job<'_>);
    /// Its final outcome stored (`outcome`, or as the store has it when `None`): writes it to
    /// Celery's result backend (when on), hands on the workflow the task is a step of (if it is
    /// one), and submits what its message's Celery canvas asks for (if any);
    /// `false` when that could not be done now: the delivery goes back, and its redelivery,
    /// finding the task finished, hands on again.
    async fn hand_on(&self, job: &Job<'_>, outcome: Option<&Transition>) -> bool;
    /// The delivery may still be worked on: its connection is up, the worker not stopping.
    fn may_continue(&self, job: &Job<'_>) -> bool;
    /// Starts of one attempt after which its message counts as poison.
    fn max_deliveries(&self) -> u32;
    /// The pause before handing a message back during an outage (it grows while one lasts).
    fn outage_pause(&self) -> Duration;
    async fn sleep(&self, pause: Duration);
    /// The task's name as a metric label (bounded: unknown names share one).
    fn task_label<'n>(&self, name: &'n str) -> &'n str;
}

/// Carries a plan out step by step, as [`decision::next`] says.
pub(super) async fn carry_out<E: Effects>(fx: &E, mut job: Job<'_>, mut plan: Plan) {
    let mut done = Done::default();
    let mut pauses = Pauses::default();
    loop {
        match decision::next(&plan, &done) {
            Step::Record => done.stored = fx.record(&job, &mut plan).await,
            Step::PublishRetry => {
                let Route::Retry { delay } = plan.route else {
                    unreachable!("a retry step of a retry plan")
                };
                done.published = fx.publish(&job, Publish::Retry { delay }).await;
            }
            Step::PublishDeadLetter => {
                let cause = plan.cause.as_deref().unwrap_or("dead-lettered");
                done.published = fx.publish(&job, Publish::DeadLetter { cause }).await;
            }
            Step::Ack => {
                let ended = plan.record.as_ref().is_some_and(|r| r.target().is_final())
                    && done.stored == Stored::Applied;
                if ended && !fx.hand_on(&job, plan.record.as_ref()).await {
                    return hand_back(fx, &job).await;
                }
                fx.settle(&job, Settlement::Ack);
                fx.acked(&job, &plan, &done);
                account(fx, &job, &plan, &done);
                return;
            }
            Step::Again => {
                if !fx.may_continue(&job) {
                    if !owe_retry(fx, &job, &mut plan, &done).await {
                        // The broker took the message back; a redelivery will finish the job.
                        fx.release(&job).await;
                    }
                    return;
                }
                let pause = pauses.next();
                tracing::warn!(
                    pause_ms = pause.as_millis() as u64,
                    "cannot finish this delivery now; holding it and trying again"
                );
                fx.sleep(pause).await;
                if done.published == Published::Failed {
                    done.published = Published::NotYet;
                } else {
                    done.stored = Stored::NotYet;
                }
            }
            Step::Investigate => match investigate(fx, &job).await {
                // Poison counts starts that reached no outcome; this one has its outcome in
                // hand, which is recorded rather than lost. It was not ours, and now nobody
                // holds it: record under the claim's conditions.
                Verdict::Takeable | Verdict::Conclude(Happened::Poison(_)) => {
                    job.claimed = false;
                    job.lease_found = true;
                    done.stored = Stored::NotYet;
                }
                Verdict::Conclude(happened) => {
                    plan =
                        decision::plan(&happened, job.attempt_number(), &Default::default(), 0.0);
                    done = Done::default();
                }
                Verdict::Dispose(disposal) => return dispose(fx, &job, disposal).await,
                Verdict::Wait { .. } => unreachable!("investigate waits itself"),
            },
            Step::Replan(happened) => {
                tracing::warn!(?happened, "replanning");
                plan = decision::plan(&happened, job.attempt_number(), &Default::default(), 0.0);
                done = Done::default();
            }
        }
    }
}

/// Records what [`decision::when_lost`] says a delivery this worker can no longer settle (its
/// connection is gone, or it is stopping) still owes; `true` when recorded.
async fn owe_retry<E: Effects>(fx: &E, job: &Job<'_>, plan: &mut Plan, done: &Done) -> bool {
    let Some(owed) = decision::when_lost(plan, done) else {
        return false;
    };
    plan.record = Some(owed);
    if fx.record(job, plan).await != Stored::Applied {
        return false;
    }
    tracing::warn!("delivery lost with its retry's publish in doubt; RETRY recorded with the next attempt owed to the outbox");
    metrics()
        .task_retries
        .with_label_values(&[fx.task_label(&job.attempt.task_name)])
        .inc();
    true
}

/// Counts and logs what became of an acked delivery.
fn account<E: Effects>(fx: &E, job: &Job<'_>, plan: &Plan, done: &Done) {
    let task = fx.task_label(&job.attempt.task_name);
    let m = metrics();
    if let (Some(record), Stored::Applied) = (&plan.record, &done.stored) {
        m.task_outcomes
            .with_label_values(&[task, record.target().as_str()])
            .inc();
    }
    let cause = plan.cause.as_deref().unwrap_or_default();
    let retries = job.retries();
    match plan.route {
        Route::Ack if plan.cause.is_none() => {
            tracing::info!(retry_count = retries, "task succeeded")
        }
        Route::Ack if matches!(plan.record, Some(Transition::Revoked { .. })) => {
            tracing::info!(root_cause = %cause, retry_count = retries, decision = "revoke", "task revoked")
        }
        Route::Ack => {
            tracing::warn!(root_cause = %cause, retry_count = retries, decision = "drop", "task dropped")
        }
        Route::Retry { delay } => {
            m.task_retries.with_label_values(&[task]).inc();
            tracing::warn!(root_cause = %cause, retry_count = retries + 1, retry_in_ms = delay.as_millis() as u64, decision = "retry", "task will be retried");
        }
        Route::DeadLetter { reason } => {
            m.dead_letters.with_label_values(&[reason]).inc();
            tracing::warn!(root_cause = %cause, retry_count = retries, decision = "dead_letter", "task failed");
        }
    }
}

/// Settles a delivery that reaches no outcome of its own, as `disposal` says.
pub(super) async fn dispose<E: Effects>(fx: &E, job: &Job<'_>, disposal: Disposal) {
    match disposal {
        Disposal::Duplicate(why) => {
            match why {
                "revoked" => tracing::info!(
                    "task cancelled by an operator; its message is acked without running"
                ),
                "finished" => {
                    tracing::info!(
                        "task already finished; duplicate delivery acked without running"
                    )
                }
                "stale_attempt" => {
                    tracing::info!("a later attempt exists; stale delivery acked without running")
                }
                _ => {}
            }
            if matches!(why, "finished" | "revoked") && !fx.hand_on(job, None).await {
                return hand_back(fx, job).await;
            }
            fx.settle(job, Settlement::Ack);
            duplicate(why);
        }
        Disposal::PayDeadLetter { cause } => {
            let cause = cause.as_deref().unwrap_or("dead-lettered");
            if persist(fx, job, Publish::DeadLetter { cause }).await {
                tracing::warn!("published the dead letter a finished task still owed");
                fx.settle(job, Settlement::Ack);
                fx.dead_letter_paid(job);
            }
        }
        Disposal::Return => {
            metrics().deliveries_returned.inc();
            // A claim taken for it is let go, so wherever it lands next starts at once.
            fx.release(job).await;
            fx.settle(job, Settlement::Requeue);
        }
        Disposal::Outage(error) => {
            let pause = fx.outage_pause();
            tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "MongoDB cannot take this delivery now; it returns to the queue");
            fx.sleep(pause).await;
            fx.release(job).await;
            fx.settle(job, Settlement::Requeue);
        }
        Disposal::SendBack { wait, hops } => {
            if persist(fx, job, Publish::SendBack { wait, hops }).await {
                tracing::debug!(wait_ms = wait.as_millis() as u64, "delayed again");
                fx.settle(job, Settlement::Ack);
            }
        }
        Disposal::Leave => {}
    }
}

/// Gives a finished step's delivery back after its workflow could not be handed on: after the
/// outage pause, so its redelivery does not spin.
async fn hand_back<E: Effects>(fx: &E, job: &Job<'_>) {
    let pause = fx.outage_pause();
    tracing::warn!(
        pause_ms = pause.as_millis() as u64,
        "cannot hand the workflow on now; the delivery returns to the queue"
    );
    fx.sleep(pause).await;
    fx.settle(job, Settlement::Requeue);
}

/// Publishes until the broker confirms, pausing between tries; `false` when the delivery may not
/// go on meanwhile (the broker hands it back).
async fn persist<E: Effects>(fx: &E, job: &Job<'_>, publish: Publish<'_>) -> bool {
    let mut pauses = Pauses::default();
    loop {
        if fx.publish(job, publish).await == Published::Confirmed {
            return true;
        }
        if !fx.may_continue(job) {
            return false;
        }
        fx.sleep(pauses.next()).await;
    }
}

/// Looks at a task after a claim or a write was refused — its document, then its attempt's
/// lease — until the answer is not to wait: never [`Verdict::Wait`].
pub(super) async fn investigate<E: Effects>(fx: &E, job: &Job<'_>) -> Verdict {
    let mut pauses = Pauses::default();
    let mut held = false;
    loop {
        if !fx.may_continue(job) {
            return Verdict::Dispose(Disposal::Leave);
        }
        let (task, lease) = match fx.look(job).await {
            Ok(found) => found,
            Err(error) => return Verdict::Dispose(Disposal::Outage(error.to_string())),
        };
        if let Some(verdict) = task
            .as_ref()
            .and_then(|t| decision::on_task(t, job.retries()))
        {
            return verdict;
        }
        let verdict = decision::on_lease(
            lease.as_ref(),
            &job.attempt.token,
            DateTime::now(),
            fx.max_deliveries(),
        );
        match verdict {
            Verdict::Wait { after, held: true } => {
                if !held {
                    held = true;
                    tracing::info!("another attempt holds the task; holding this copy until it finishes or its lease lapses");
                    duplicate("held");
                }
                fx.sleep(after).await;
            }
            // Its outcome is on its way to the task's document: look again.
            Verdict::Wait { after, held: false } => fx.sleep(pauses.next().min(after)).await,
            Verdict::Takeable if held => {
                tracing::warn!("the attempt holding the task let its lease lapse; taking over");
                return Verdict::Takeable;
            }
            Verdict::Takeable if lease.is_some_and(|l| l.token != job.attempt.token) => {
                // The refusal raced a change: pause a little so a flapping state cannot spin us.
                fx.sleep(pauses.next().min(Duration::from_millis(200)))
                    .await;
                return Verdict::Takeable;
            }
            verdict => return verdict,
        }
    }
}

/// Counts a delivery that did not run, under `why`.
pub(super) fn duplicate(why: &'static str) {
    metrics()
        .duplicate_deliveries
        .with_label_values(&[why])
        .inc();
}

#[cfg(test)]
mod tests {
    //! The executor against a fake world that answers from a script and notes what was done.

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::amqp::Delivery;
    use crate::domain::{TaskId, TaskState};
    use crate::store::attempts::Attempt;
    use crate::tasks::RetryPolicy;

    type Looked = Result<(Option<TaskDocument>, Option<AttemptLease>), StoreError>;

    /// Answers from a script; every effect is noted in `done`, in order.
    struct Fake {
        stored: Mutex<VecDeque<Stored>>,
        published: Mutex<VecDeque<Published>>,
        looks: Mutex<VecDeque<Looked>>,
        /// The delivery's connection is up until this many `may_continue` calls have said so.
        live_for: Mutex<usize>,
        lost: AtomicBool,
        done: Mutex<Vec<String>>,
        /// The records written, as planned.
        records: Mutex<Vec<Option<Transition>>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                stored: Mutex::default(),
                published: Mutex::default(),
                looks: Mutex::default(),
                live_for: Mutex::new(usize::MAX),
                lost: AtomicBool::new(false),
                done: Mutex::default(),
                records: Mutex::default(),
            }
        }

        fn storing(self, answers: impl IntoIterator<Item = Stored>) -> Self {
            self.stored.lock().unwrap().extend(answers);
            self
        }

        fn publishing(self, answers: impl IntoIterator<Item = Published>) -> Self {
            self.published.lock().unwrap().extend(answers);
            self
        }

        fn finding(self, answers: impl IntoIterator<Item = Looked>) -> Self {
            self.looks.lock().unwrap().extend(answers);
            self
        }

        /// The connection drops after `n` more checks.
        fn live_for(self, n: usize) -> Self {
            *self.live_for.lock().unwrap() = n;
            self
        }

        fn note(&self, what: impl Into<String>) {
            self.done.lock().unwrap().push(what.into());
        }

        fn done(&self) -> Vec<String> {
            self.done.lock().unwrap().clone()
        }
    }

    impl Effects for Fake {
        async fn record(&self, _: &Job<'_>, plan: &mut Plan) -> Stored {
            let target = plan
                .record
                .as_ref()
                .map_or("nothing", |r| r.target().as_str());
            self.note(format!("record {target}"));
            self.records.lock().unwrap().push(plan.record.clone());
            self.stored
                .lock()
                .unwrap()
                .pop_front()
                .expect("a scripted write")
        }

        async fn publish(&self, _: &Job<'_>, publish: Publish<'_>) -> Published {
            self.note(match publish {
                Publish::Retry { .. } => "publish retry",
                Publish::DeadLetter { .. } => "publish dead letter",
                Publish::SendBack { .. } => "publish again",
            });
            self.published
                .lock()
                .unwrap()
                .pop_front()
                .expect("a scripted publish")
        }

        fn settle(&self, _: &Job<'_>, settlement: Settlement) {
            self.note(format!("{settlement:?}"));
        }

        async fn release(&self, job: &Job<'_>) {
            if job.claimed {
                self.note("release");
            }
        }

        async fn look(&self, _: &Job<'_>) -> Looked {
            self.note("look");
            self.looks
                .lock()
                .unwrap()
                .pop_front()
                .expect("a scripted look")
        }

        fn acked(&self, _: &Job<'_>, _: &Plan, _: &Done) {}

        fn dead_letter_paid(&self, _: &Job<'_>) {
            self.note("dead letter paid");
        }

        async fn hand_on(&self, job: &Job<'_>, _outcome: Option<&Transition>) -> bool {
            if job
                .message
                .is_some_and(|m| m.workflow_id.is_some() || m.embed.is_some())
            {
                self.note("hand on");
            }
            true
        }

        fn may_continue(&self, _: &Job<'_>) -> bool {
            let mut left = self.live_for.lock().unwrap();
            if *left == 0 {
                self.lost.store(true, Ordering::Relaxed);
                return false;
            }
            *left -= 1;
            true
        }

        fn max_deliveries(&self) -> u32 {
            3
        }

        fn outage_pause(&self) -> Duration {
            Duration::from_secs(1)
        }

        async fn sleep(&self, pause: Duration) {
            self.note(format!("pause {}ms", pause.as_millis()));
        }

        fn task_label<'n>(&self, name: &'n str) -> &'n str {
            name
        }
    }

    fn delivery() -> Delivery {
        Delivery::for_tests("kobe.default", b"{}")
    }

    /// A claimed job of attempt 1 of task `t1`.
    fn claimed(delivery: &Delivery) -> Job<'_> {
        let mut job = Job::new(delivery, Attempt::new("t1", "demo", 0));
        job.claimed = true;
        job.deliveries = 1;
        job
    }

    fn ran(outcome: Outcome) -> Plan {
        let policy = RetryPolicy {
            max_retries: 3,
            ..RetryPolicy::default()
        };
        decision::plan(&Happened::Ran(outcome), 1, &policy, 0.5)
    }

    fn task(state: TaskState) -> TaskDocument {
        let mut task = TaskDocument::pending(&TaskId::parse("t1").unwrap(), "demo", "default");
        task.state = state;
        task
    }

    fn lease(token: &str, until_ms_from_now: i64) -> AttemptLease {
        let until = DateTime::now().timestamp_millis() + until_ms_from_now;
        AttemptLease::for_tests(token, DateTime::from_millis(until), 1)
    }

    use super::super::decision::Outcome;

    async fn carry(fake: &Fake, job: Job<'_>, plan: Plan) -> Vec<String> {
        carry_out(fake, job, plan).await;
        fake.done()
    }

    #[tokio::test]
    async fn a_success_is_recorded_then_acked() {
        let fake = Fake::new().storing([Stored::Applied]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(done, ["record SUCCESS", "Ack"]);
    }

    #[tokio::test]
    async fn a_retry_is_confirmed_before_it_is_recorded_and_a_failed_publish_is_tried_again() {
        let fake = Fake::new()
            .publishing([Published::Failed, Published::Confirmed])
            .storing([Stored::Applied]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Retryable("io".into()))).await;
        assert_eq!(
            done,
            [
                "publish retry",
                "pause 250ms",
                "publish retry",
                "record RETRY",
                "Ack"
            ]
        );
    }

    #[tokio::test]
    async fn an_outage_holds_the_delivery_and_a_lost_connection_lets_its_lease_go_unsettled() {
        let fake = Fake::new()
            .storing([Stored::Unavailable, Stored::Unavailable])
            .live_for(1);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(
            done,
            ["record SUCCESS", "pause 250ms", "record SUCCESS", "release"]
        );
    }

    #[tokio::test]
    async fn a_retry_whose_publish_is_in_doubt_when_the_delivery_is_lost_is_recorded_owed() {
        let fake = Fake::new()
            .publishing([Published::Failed])
            .storing([Stored::Applied])
            .live_for(0);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Retryable("io".into()))).await;
        assert_eq!(done, ["publish retry", "record RETRY"]);
        let records = fake.records.lock().unwrap();
        assert!(matches!(
            records.last(),
            Some(Some(Transition::Retry { owed: true, .. }))
        ));
    }

    #[tokio::test]
    async fn a_dead_letter_is_owed_before_it_is_published() {
        let fake = Fake::new()
            .storing([Stored::Applied])
            .publishing([Published::Confirmed]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Permanent("bad".into()))).await;
        assert_eq!(done, ["record FAILURE", "publish dead letter", "Ack"]);
    }

    #[tokio::test]
    async fn a_refused_write_of_a_task_finished_meanwhile_acks_the_copy_without_writing_again() {
        let fake = Fake::new()
            .storing([Stored::Refused])
            .finding([Ok((Some(task(TaskState::Success)), None))]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(done, ["record SUCCESS", "look", "Ack"]);
    }

    #[tokio::test]
    async fn a_refused_write_waits_for_the_live_holder_then_records_once_it_lapses() {
        let fake = Fake::new()
            .storing([Stored::Refused, Stored::Applied])
            .finding([
                Ok((Some(task(TaskState::Pending)), Some(lease("other", 300)))),
                Ok((Some(task(TaskState::Pending)), Some(lease("other", -1)))),
            ]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(done.len(), 6, "{done:?}");
        assert_eq!(done[..2], ["record SUCCESS", "look"]);
        assert!(done[2].starts_with("pause "), "{done:?}");
        assert_eq!(done[3..], ["look", "record SUCCESS", "Ack"]);
    }

    #[tokio::test]
    async fn a_task_that_still_owes_its_dead_letter_is_paid_then_acked() {
        let mut owing = task(TaskState::Failure);
        owing.dead_letter = Some(crate::store::tasks::DeadLetterState::Pending);
        let fake = Fake::new()
            .storing([Stored::Refused])
            .publishing([Published::Failed, Published::Confirmed])
            .finding([Ok((Some(owing), None))]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(
            done,
            [
                "record SUCCESS",
                "look",
                "publish dead letter",
                "pause 250ms",
                "publish dead letter",
                "Ack",
                "dead letter paid"
            ]
        );
    }

    #[tokio::test]
    async fn a_look_that_fails_returns_the_delivery_after_the_outage_pause() {
        let fake = Fake::new()
            .storing([Stored::Refused])
            .finding([Err(StoreError::Unavailable("down".into()))]);
        let d = delivery();
        let done = carry(&fake, claimed(&d), ran(Outcome::Success(json!(1)))).await;
        assert_eq!(
            done,
            [
                "record SUCCESS",
                "look",
                "pause 1000ms",
                "release",
                "Requeue"
            ]
        );
    }

    #[tokio::test]
    async fn an_attempt_closed_by_a_cancel_is_recorded_revoked_instead() {
        let mut closed = lease(crate::store::task_leases::CLOSED_TOKEN, 0);
        closed.closed = Some(TaskState::Revoked);
        let fake = Fake::new()
            .storing([Stored::Refused, Stored::Applied])
            .finding([Ok((Some(task(TaskState::Pending)), Some(closed)))]);
        let d = delivery();
        let mut job = Job::new(&d, Attempt::new("t1", "demo", 0));
        job.lease_found = true;
        let done = carry(&fake, job, ran(Outcome::Success(json!(1)))).await;
        assert_eq!(done, ["record SUCCESS", "look", "record REVOKED", "Ack"]);
    }

    #[tokio::test]
    async fn investigating_a_copy_whose_connection_is_gone_leaves_it_to_the_broker() {
        let fake = Fake::new().live_for(0);
        let d = delivery();
        let verdict = investigate(&fake, &claimed(&d)).await;
        assert_eq!(verdict, Verdict::Dispose(Disposal::Leave));
        assert!(fake.done().is_empty());
    }

    #[tokio::test]
    async fn a_stale_copy_is_acked_as_a_duplicate() {
        let mut later = task(TaskState::Retry);
        later.retries = 1;
        let fake = Fake::new().finding([Ok((Some(later), None))]);
        let d = delivery();
        let job = claimed(&d);
        let verdict = investigate(&fake, &job).await;
        assert_eq!(
            verdict,
            Verdict::Dispose(Disposal::Duplicate("stale_attempt"))
        );
        dispose(&fake, &job, verdict_disposal(verdict)).await;
        assert_eq!(fake.done(), ["look", "Ack"]);
    }

    fn verdict_disposal(verdict: Verdict) -> Disposal {
        match verdict {
            Verdict::Dispose(disposal) => disposal,
            other => panic!("not a disposal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_delivery_sent_back_is_acked_only_once_its_copy_is_confirmed() {
        let fake = Fake::new().publishing([Published::Failed, Published::Confirmed]);
        let d = delivery();
        let job = Job::new(&d, Attempt::new("t1", "demo", 0));
        let wait = Duration::from_secs(30);
        dispose(
            &fake,
            &job,
            Disposal::SendBack {
                wait,
                hops: Some(1),
            },
        )
        .await;
        assert_eq!(
            fake.done(),
            ["publish again", "pause 250ms", "publish again", "Ack"]
        );
    }
}
