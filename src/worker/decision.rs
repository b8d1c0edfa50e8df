//! The one place a delivery's fate is decided.
//!
//! Before a run, [`on_arrival`], [`on_task`] and [`on_lease`] give the [`Verdict`] on a copy of
//! a message: run it, close it unrun, settle it without an outcome ([`Disposal`]), or wait.
//! [`plan`] turns what happened (the handler's outcome, or why the task cannot run) into what must
//! be recorded and where the message goes; [`next`] turns that plan and what has been done so far
//! (what the broker and MongoDB answered) into the next step. The worker only carries verdicts
//! and steps out, so every path — success, retry, dead letter, duplicate, outage — follows the
//! same rules:
//!
//! - the message is settled only after its outcome is recorded (acks late);
//! - a retry's message is confirmed before `RETRY` is recorded, and both before the ack;
//! - a dead letter is owed (`dead_letter: pending` with `FAILURE`) before it is published, so a
//!   crash in between leaves a redelivery that publishes it, never a lost one;
//! - a write MongoDB refuses for good ends the task `FAILURE` instead of being tried forever; one
//!   it cannot take now is tried again while the delivery is held;
//! - a write refused by its filter means another attempt owns the task: look before acting.

use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::Value;

use crate::domain::TaskState;
use crate::store::attempts::Transition;
use crate::store::task_leases::AttemptLease;
use crate::store::tasks::DeadLetterState;
use crate::store::TaskDocument;
use crate::tasks::RetryPolicy;

/// The longest wait a `Retry-After` from a task's other side can impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why a message went to the dead-letter queue: the `reason` label of `kobe_dead_letters_total`.
pub mod reason {
    pub(crate) const MALFORMED: &str = "malformed";
    pub(crate) const UNKNOWN_TASK: &str = "unknown_task";
    pub(crate) const PERMANENT_ERROR: &str = "permanent_error";
    pub(crate) const RETRIES_EXHAUSTED: &str = "retries_exhausted";
    pub(crate) const TIME_LIMIT: &str = "time_limit";
    pub(crate) const PAYLOAD_MISSING: &str = "payload_missing";
    pub(crate) const STORE_REJECTED: &str = "store_rejected";
    pub(crate) const POISON: &str = "poison";
    pub(crate) const INTERNAL: &str = "internal_error";
}

/// How one run of a handler ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success(Value),
    /// A transient failure: try again after a backoff.
    Retryable(String),
    /// A transient failure whose cause said when to try again.
    RetryAfter(Duration, String),
    /// Will fail the same way every time.
    Permanent(String),
    /// The handler panicked: treated as transient, since a panic is often a bad moment.
    Panicked(String),
    /// The hard time limit passed and the handler was abandoned.
    TimedOut(Duration),
    /// An operator cancelled the task and the handler stopped (anything but success after the
    /// cancel): not retried, not dead-lettered.
    Revoked(String),
}

impl Outcome {
    /// What went wrong, for a log line (empty for a success).
    pub fn cause(&self) -> String {
        match self {
            Self::Success(_) => String::new(),
            Self::Retryable(cause)
            | Self::RetryAfter(_, cause)
            | Self::Permanent(cause)
            | Self::Panicked(cause)
            | Self::Revoked(cause) => cause.clone(),
            Self::TimedOut(limit) => format!("time limit exceeded ({limit:?})"),
        }
    }
}

/// What became of a delivery, before anything is recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Happened {
    /// The message cannot be read as a task.
    Malformed(String),
    UnknownTask(String),
    /// Its `expires` passed before it could run.
    Expired(String),
    /// Its arguments should be in `RawPayload` and are not.
    PayloadMissing(String),
    /// The current attempt was started this many times without reaching an outcome.
    Poison(u32),
    /// The handler ran.
    Ran(Outcome),
    /// MongoDB refuses to store what the handler returned (a value BSON cannot hold, a document
    /// over 16 MB): the result is lost, the task fails.
    ResultRejected(String),
    /// Kobe's own delivery handling failed (a bug).
    Internal(String),
    /// An operator cancelled the task while an attempt ran, and this attempt must not go on (a
    /// retry after the cancel, or a redelivery): it ends `REVOKED`.
    Cancelled(String),
    /// Its submission was answered "not accepted" and its lease closed before any worker took
    /// it: it never runs, and ends `FAILURE` as the submitter records it.
    Refused(String),
}

/// What to record and where the message goes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The state to record; `None` when there is no task to record it on.
    pub record: Option<Transition>,
    pub route: Route,
    /// The cause, for logs, `TaskErrorLog` and the dead letter's `x-kobe-reason`.
    pub cause: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    /// Done with the message.
    Ack,
    /// The next attempt goes to the delay queue after `delay`.
    Retry { delay: Duration },
    /// To the dead-letter queue; `reason` is the metric label.
    DeadLetter { reason: &'static str },
}

/// Decides what `happened` means for attempt number `attempt` (1-based) of a task with `policy`.
/// `jitter` is a uniform sample from [0, 1) for the retry delay.
pub fn plan(happened: &Happened, attempt: u32, policy: &RetryPolicy, jitter: f64) -> Plan {
    let dead = |cause: String, reason: &'static str| Plan {
        record: Some(Transition::Failure {
            root_cause: cause.clone(),
            dead_letter: true,
        }),
        route: Route::DeadLetter { reason },
        cause: Some(cause),
    };
    let retry_or_die_after = |cause: String, after: Duration| {
        if attempt <= policy.max_retries {
            Plan {
                record: Some(Transition::Retry {
                    root_cause: cause.clone(),
                    owed: false,
                }),
                route: Route::Retry {
                    delay: policy
                        .delay_for(attempt, jitter)
                        .max(after.min(MAX_RETRY_AFTER)),
                },
                cause: Some(cause),
            }
        } else {
            dead(
                format!("retries exhausted after {attempt} attempts: {cause}"),
                reason::RETRIES_EXHAUSTED,
            )
        }
    };
    let retry_or_die = |cause: String| retry_or_die_after(cause, Duration::ZERO);
    match happened {
        Happened::Malformed(cause) => dead(format!("malformed message: {cause}"), reason::MALFORMED),
        Happened::UnknownTask(name) => dead(format!("unknown task `{name}`"), reason::UNKNOWN_TASK),
        // An expired task is dropped, as Celery drops it: recorded, not dead-lettered.
        Happened::Expired(at) => {
            let cause = format!("expired at {at} before it could run");
            Plan {
                record: Some(Transition::Failure {
                    root_cause: cause.clone(),
                    dead_letter: false,
                }),
                route: Route::Ack,
                cause: Some(cause),
            }
        }
        Happened::PayloadMissing(reference) => dead(
            format!("payload {reference} is missing from RawPayload"),
            reason::PAYLOAD_MISSING,
        ),
        Happened::Poison(deliveries) => dead(
            format!("delivered {deliveries} times without reaching an outcome (a worker died running it each time)"),
            reason::POISON,
        ),
        Happened::Ran(Outcome::Success(result)) => Plan {
            record: Some(Transition::Success {
                result: result.clone(),
            }),
            route: Route::Ack,
            cause: None,
        },
        Happened::Ran(Outcome::Retryable(cause)) => retry_or_die(cause.clone()),
        Happened::Ran(Outcome::RetryAfter(after, cause)) => {
            retry_or_die_after(cause.clone(), *after)
        }
        Happened::Ran(Outcome::Panicked(cause)) => retry_or_die(format!("handler panicked: {cause}")),
        Happened::Ran(Outcome::Permanent(cause)) => dead(cause.clone(), reason::PERMANENT_ERROR),
        Happened::Ran(Outcome::TimedOut(limit)) => {
            dead(format!("time limit exceeded ({limit:?})"), reason::TIME_LIMIT)
        }
        Happened::Ran(Outcome::Revoked(cause)) => Plan {
            record: Some(Transition::Revoked {
                root_cause: cause.clone(),
            }),
            route: Route::Ack,
            cause: Some(cause.clone()),
        },
        Happened::ResultRejected(cause) => dead(
            format!("the result cannot be stored: {cause}"),
            reason::STORE_REJECTED,
        ),
        Happened::Internal(cause) => dead(format!("worker error: {cause}"), reason::INTERNAL),
        Happened::Cancelled(cause) => Plan {
            record: Some(Transition::Revoked {
                root_cause: cause.clone(),
            }),
            route: Route::Ack,
            cause: Some(cause.clone()),
        },
        Happened::Refused(cause) => Plan {
            record: Some(Transition::Failure {
                root_cause: cause.clone(),
                dead_letter: false,
            }),
            route: Route::Ack,
            cause: Some(cause.clone()),
        },
    }
}

/// What the broker said about the publish the plan needs (a retry or a dead letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Published {
    #[default]
    NotYet,
    Confirmed,
    Failed,
}

/// What MongoDB said about the plan's record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stored {
    #[default]
    NotYet,
    Applied,
    /// The filter did not match: another attempt owns the task, or it is finished.
    Refused,
    /// Not now (MongoDB down, a timeout): nothing is known about the write.
    Unavailable,
    /// Never, as it is.
    Rejected(String),
}

/// Progress on a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    pub published: Published,
    pub stored: Stored,
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Write the plan's record.
    Record,
    /// Publish the next attempt to the delay queue.
    PublishRetry,
    /// Publish the message to the dead-letter exchange.
    PublishDeadLetter,
    /// Settle the message: it is done.
    Ack,
    /// The last step failed for now: pause, then do it again (the delivery is held).
    Again,
    /// Someone else owns the task: look at it before settling.
    Investigate,
    /// What happened changes: the result cannot be stored, so the task fails instead.
    Replan(Happened),
}

/// The step after `done` for `plan`.
pub fn next(plan: &Plan, done: &Done) -> Step {
    match plan.route {
        Route::Ack => match (&plan.record, &done.stored) {
            (None, _) => Step::Ack,
            (Some(_), Stored::NotYet) => Step::Record,
            (Some(_), Stored::Applied) => Step::Ack,
            (Some(_), Stored::Refused) => Step::Investigate,
            (Some(_), Stored::Unavailable) => Step::Again,
            (Some(Transition::Success { .. }), Stored::Rejected(cause)) => {
                Step::Replan(Happened::ResultRejected(cause.clone()))
            }
            // A failure that cannot be recorded either: nothing more can be done for it.
            (Some(_), Stored::Rejected(_)) => Step::Ack,
        },
        // The retry's message first: RETRY is recorded only once it is confirmed.
        Route::Retry { .. } => match (done.published, &done.stored) {
            (Published::NotYet, _) => Step::PublishRetry,
            (Published::Failed, _) => Step::Again,
            (Published::Confirmed, Stored::NotYet) => Step::Record,
            (Published::Confirmed, Stored::Applied) => Step::Ack,
            (Published::Confirmed, Stored::Refused) => Step::Investigate,
            (Published::Confirmed, Stored::Unavailable) => Step::Again,
            // The retry is on its way; this attempt's record is lost, not its successor.
            (Published::Confirmed, Stored::Rejected(_)) => Step::Ack,
        },
        // The debt first (FAILURE with a dead letter pending), then the dead letter.
        Route::DeadLetter { .. } => match (&plan.record, &done.stored, done.published) {
            (Some(_), Stored::NotYet, _) => Step::Record,
            (Some(_), Stored::Refused, _) => Step::Investigate,
            (Some(_), Stored::Unavailable, _) => Step::Again,
            (_, _, Published::NotYet) => Step::PublishDeadLetter,
            (_, _, Published::Failed) => Step::Again,
            (_, _, Published::Confirmed) => Step::Ack,
        },
    }
}

/// What to record when the delivery is lost (its connection gone, the worker stopping) before
/// `plan` is done. A retry whose publish failed — perhaps only its confirm was lost, so the next
/// attempt's message may be queued — is recorded `RETRY` with that publish owed to the outbox:
/// the redelivered copy then finds its attempt counted instead of running it again. `None`: the
/// task goes back as it is, for the redelivery to finish.
pub(crate) fn when_lost(plan: &Plan, done: &Done) -> Option<Transition> {
    match (&plan.record, done.published, &done.stored) {
        (Some(Transition::Retry { root_cause, .. }), Published::Failed, Stored::NotYet) => {
            Some(Transition::Retry {
                root_cause: root_cause.clone(),
                owed: true,
            })
        }
        _ => None,
    }
}

/// What a copy of a task's message meets before (or instead of) running: its message's own
/// times, the task's stored document, the attempt's lease. [`on_arrival`], [`on_task`] and
/// [`on_lease`] decide it; the executor carries it out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Nothing against running it (again): claim it, or write its outcome again.
    Takeable,
    /// It must not run: close it with this (a cancel, poison, expired, unknown).
    Conclude(Happened),
    /// Settle it without an outcome of its own.
    Dispose(Disposal),
    /// Another copy holds the attempt, or its outcome is on its way: look again after `after`.
    /// `held`: a live lease holds it (this copy is a duplicate being held).
    Wait { after: Duration, held: bool },
}

/// How a delivery that reaches no outcome of its own is settled.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Disposal {
    /// A copy that must not run (the task is finished, revoked, on a later attempt, or its lease
    /// went to another attempt): acked, counted as a duplicate under `why`.
    Duplicate(&'static str),
    /// Its task failed and still owes the dead letter (its attempt died before publishing it):
    /// publish it with the task's `cause`, then ack.
    PayDeadLetter { cause: Option<String> },
    /// Back to its queue for a worker with room (no run slot freed in time); its claim let go.
    Return,
    /// MongoDB cannot take it now: back to its queue after the outage pause, its claim let go
    /// so the redelivery starts at once.
    Outage(String),
    /// Through the delay queues after `wait`, then acked: not due yet, or (with `hops`, the
    /// hands-on so far) a task this worker does not know, for a worker that does.
    SendBack { wait: Duration, hops: Option<i64> },
    /// Its connection is gone or the worker is stopping: left unsettled for the broker to hand
    /// back.
    Leave,
}

/// What becomes of a message whose task this worker does not know, handed on `hops` times so
/// far, of the `most_hops` the grace allows: perhaps only this worker does not know it (an older
/// version beside newer ones), so it goes on for a while before it counts as unknown everywhere.
pub(crate) fn on_unknown(task: &str, hops: i64, most_hops: i64) -> Verdict {
    if hops < most_hops {
        Verdict::Dispose(Disposal::SendBack {
            wait: UNKNOWN_TASK_WAIT,
            hops: Some(hops + 1),
        })
    } else {
        Verdict::Conclude(Happened::UnknownTask(task.to_owned()))
    }
}

/// What a message's own times say against running it at `now` (milliseconds since the epoch):
/// not due yet, or expired. [`Verdict::Takeable`]: nothing.
pub(crate) fn on_arrival(message: &crate::amqp::TaskMessage, now: i64) -> Verdict {
    if let Some(eta) = message.eta.as_deref().and_then(millis_of) {
        // Never before its time ("run no earlier than"): the delay levels bring it close, and
        // what is left, however little, is one more short hop.
        if eta > now {
            let wait = Duration::from_millis(u64::try_from(eta - now).unwrap_or(u64::MAX));
            return Verdict::Dispose(Disposal::SendBack { wait, hops: None });
        }
    }
    match message.expires.as_deref() {
        Some(expires) if millis_of(expires).is_some_and(|at| at < now) => {
            Verdict::Conclude(Happened::Expired(expires.to_owned()))
        }
        _ => Verdict::Takeable,
    }
}

/// What the task's stored document says against attempt `retries` going on: finished (perhaps
/// owing its dead letter), moved on to a later attempt, or cancelled. `None`: nothing.
pub(crate) fn on_task(task: &TaskDocument, retries: u32) -> Option<Verdict> {
    if task.state.is_final() {
        if task.dead_letter == Some(DeadLetterState::Pending) {
            return Some(Verdict::Dispose(Disposal::PayDeadLetter {
                cause: task.root_cause.clone(),
            }));
        }
        let why = if task.state == TaskState::Revoked {
            "revoked"
        } else {
            "finished"
        };
        return Some(Verdict::Dispose(Disposal::Duplicate(why)));
    }
    if task.retries > retries {
        return Some(Verdict::Dispose(Disposal::Duplicate("stale_attempt")));
    }
    task.cancel_requested
        .as_ref()
        .map(|request| cancelled_while_running(&request.by))
}

use crate::store::tasks::REFUSED;

/// What the attempt's lease says to a copy holding attempt token `token`, at `now`.
pub(crate) fn on_lease(
    lease: Option<&AttemptLease>,
    token: &str,
    now: DateTime,
    max_deliveries: u32,
) -> Verdict {
    // None: nobody holds it; our own: a write sent again after an ambiguous failure.
    let Some(lease) = lease.filter(|lease| lease.token != token) else {
        return Verdict::Takeable;
    };
    if let Some(state) = lease.closed {
        let by = lease
            .cancel
            .as_ref()
            .map_or("an operator", |c| c.by.as_str());
        return Verdict::Conclude(match state {
            TaskState::Revoked => Happened::Cancelled(format!("cancelled by {by} before it ran")),
            _ => Happened::Refused(REFUSED.to_owned()),
        });
    }
    if lease.done_at.is_some() {
        return Verdict::Wait {
            after: Duration::from_millis(200),
            held: false,
        };
    }
    if lease.lease_until > now {
        let left = lease.lease_until.timestamp_millis() - now.timestamp_millis();
        return Verdict::Wait {
            after: Duration::from_millis(left.clamp(50, 1000) as u64),
            held: true,
        };
    }
    if let Some(request) = &lease.cancel {
        return cancelled_while_running(&request.by);
    }
    if lease.deliveries >= max_deliveries {
        return Verdict::Conclude(Happened::Poison(lease.deliveries));
    }
    Verdict::Takeable
}

/// An operator asked the task to stop while an attempt ran: this copy does not go on with it.
fn cancelled_while_running(by: &str) -> Verdict {
    Verdict::Conclude(Happened::Cancelled(format!(
        "cancelled by {by} while it ran; not run again"
    )))
}

/// The wait between two hands-on of a message whose task this worker does not know (as many as
/// fit in `KOBE_UNKNOWN_TASK_GRACE_MS`).
pub(crate) const UNKNOWN_TASK_WAIT: Duration = Duration::from_secs(30);

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
    use super::*;
    use serde_json::json;

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            ..RetryPolicy::default()
        }
    }

    /// Runs `plan` to its end with the answers given, returning the steps taken.
    fn walk(plan: &Plan, stored: &[Stored], published: &[Published]) -> Vec<Step> {
        let (mut stored, mut published) = (stored.iter(), published.iter());
        let mut done = Done::default();
        let mut steps = Vec::new();
        for _ in 0..10 {
            let step = next(plan, &done);
            steps.push(step.clone());
            match step {
                Step::Record => done.stored = stored.next().cloned().unwrap(),
                Step::PublishRetry | Step::PublishDeadLetter => {
                    done.published = *published.next().unwrap()
                }
                Step::Again => {
                    if done.published == Published::Failed {
                        done.published = Published::NotYet;
                    } else {
                        done.stored = Stored::NotYet;
                    }
                }
                Step::Ack | Step::Investigate | Step::Replan(_) => break,
            }
        }
        steps
    }

    #[test]
    fn success_is_recorded_then_acked() {
        let p = plan(
            &Happened::Ran(Outcome::Success(json!(1))),
            1,
            &policy(3),
            0.5,
        );
        assert_eq!(walk(&p, &[Stored::Applied], &[]), [Step::Record, Step::Ack]);
    }

    #[test]
    fn an_outage_holds_the_delivery_and_writes_again() {
        let p = plan(
            &Happened::Ran(Outcome::Success(json!(1))),
            1,
            &policy(3),
            0.5,
        );
        assert_eq!(
            walk(&p, &[Stored::Unavailable, Stored::Applied], &[]),
            [Step::Record, Step::Again, Step::Record, Step::Ack]
        );
    }

    #[test]
    fn a_result_mongodb_refuses_fails_the_task_instead() {
        let p = plan(
            &Happened::Ran(Outcome::Success(json!(1))),
            1,
            &policy(3),
            0.5,
        );
        let steps = walk(&p, &[Stored::Rejected("too big".into())], &[]);
        let Some(Step::Replan(happened)) = steps.last() else {
            panic!("{steps:?}")
        };
        let failed = plan(happened, 1, &policy(3), 0.5);
        assert_eq!(
            failed.route,
            Route::DeadLetter {
                reason: reason::STORE_REJECTED
            }
        );
        assert!(failed.cause.unwrap().contains("too big"));
    }

    #[test]
    fn a_retry_is_confirmed_before_retry_is_recorded() {
        let p = plan(
            &Happened::Ran(Outcome::Retryable("io".into())),
            1,
            &policy(3),
            0.5,
        );
        assert!(matches!(p.route, Route::Retry { .. }));
        assert_eq!(
            walk(
                &p,
                &[Stored::Applied],
                &[Published::Failed, Published::Confirmed]
            ),
            [
                Step::PublishRetry,
                Step::Again,
                Step::PublishRetry,
                Step::Record,
                Step::Ack
            ]
        );
    }

    #[test]
    fn the_dead_letter_is_owed_before_it_is_published() {
        let p = plan(
            &Happened::Ran(Outcome::Permanent("bad".into())),
            1,
            &policy(3),
            0.5,
        );
        assert!(matches!(
            p.record,
            Some(Transition::Failure {
                dead_letter: true,
                ..
            })
        ));
        assert_eq!(
            walk(&p, &[Stored::Applied], &[Published::Confirmed]),
            [Step::Record, Step::PublishDeadLetter, Step::Ack]
        );
    }

    #[test]
    fn a_cancelled_attempt_is_recorded_revoked_and_acked_without_retry_or_dead_letter() {
        let p = plan(
            &Happened::Ran(Outcome::Revoked("cancelled; the handler stopped".into())),
            1,
            &policy(3),
            0.5,
        );
        assert!(matches!(p.record, Some(Transition::Revoked { .. })));
        assert_eq!(p.route, Route::Ack);
        assert_eq!(walk(&p, &[Stored::Applied], &[]), [Step::Record, Step::Ack]);
    }

    #[test]
    fn a_lost_delivery_owes_only_a_retry_whose_publish_is_in_doubt() {
        let retry = plan(
            &Happened::Ran(Outcome::Retryable("io".into())),
            1,
            &policy(3),
            0.5,
        );
        let failed = Done {
            published: Published::Failed,
            stored: Stored::NotYet,
        };
        assert!(matches!(
            when_lost(&retry, &failed),
            Some(Transition::Retry { owed: true, .. })
        ));
        let not_yet = Done::default();
        assert!(when_lost(&retry, &not_yet).is_none());
        let success = plan(
            &Happened::Ran(Outcome::Success(json!(1))),
            1,
            &policy(3),
            0.5,
        );
        assert!(when_lost(&success, &failed).is_none());
    }

    #[test]
    fn spent_retries_dead_letter() {
        let p = plan(
            &Happened::Ran(Outcome::Retryable("io".into())),
            4,
            &policy(3),
            0.5,
        );
        assert_eq!(
            p.route,
            Route::DeadLetter {
                reason: reason::RETRIES_EXHAUSTED
            }
        );
        assert!(p.cause.unwrap().contains("after 4 attempts"));
    }

    #[test]
    fn a_refused_write_means_someone_else_owns_the_task() {
        for happened in [
            Happened::Ran(Outcome::Success(json!(1))),
            Happened::Expired("2020-01-01T00:00:00Z".into()),
            Happened::Ran(Outcome::Permanent("bad".into())),
        ] {
            let p = plan(&happened, 1, &policy(3), 0.5);
            assert_eq!(
                walk(&p, &[Stored::Refused], &[]).last(),
                Some(&Step::Investigate)
            );
        }
    }

    #[test]
    fn a_message_without_a_task_is_only_dead_lettered() {
        let mut p = plan(&Happened::Malformed("no id".into()), 1, &policy(3), 0.5);
        p.record = None;
        assert_eq!(
            walk(&p, &[], &[Published::Confirmed]),
            [Step::PublishDeadLetter, Step::Ack]
        );
    }

    #[test]
    fn a_retry_after_is_honoured_when_longer_than_the_backoff_and_capped() {
        let policy = RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_secs(1),
        };
        let delay = |after: Duration| {
            let happened = Happened::Ran(Outcome::RetryAfter(after, "429".into()));
            match plan(&happened, 1, &policy, 0.0).route {
                Route::Retry { delay } => delay,
                other => panic!("expected a retry, got {other:?}"),
            }
        };
        assert_eq!(delay(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(delay(Duration::ZERO), policy.delay_for(1, 0.0));
        assert_eq!(delay(Duration::from_secs(86_400)), MAX_RETRY_AFTER);
    }

    #[test]
    fn a_time_without_a_zone_is_utc() {
        let zoned = millis_of("2030-01-02T03:04:05.678+00:00").unwrap();
        assert_eq!(millis_of("2030-01-02T03:04:05.678").unwrap(), zoned);
        assert_eq!(millis_of("2030-01-02T03:04:05.678Z").unwrap(), zoned);
        assert_eq!(millis_of("2030-01-02T04:04:05.678+01:00").unwrap(), zoned);
        assert!(millis_of("tomorrow").is_none());
    }

    #[test]
    fn an_unknown_task_is_handed_on_for_its_grace_then_closed_unknown() {
        assert_eq!(
            on_unknown("nope", 0, 2),
            Verdict::Dispose(Disposal::SendBack {
                wait: UNKNOWN_TASK_WAIT,
                hops: Some(1)
            })
        );
        assert_eq!(
            on_unknown("nope", 2, 2),
            Verdict::Conclude(Happened::UnknownTask("nope".into()))
        );
    }

    #[test]
    fn a_message_not_due_goes_back_and_an_expired_one_is_closed() {
        let at = |t: &str| millis_of(t).unwrap();
        let mut message = crate::amqp::TaskMessage::new(
            crate::domain::TaskId::parse("t1").unwrap(),
            "demo",
            vec![],
            Default::default(),
        );
        assert_eq!(on_arrival(&message, 0), Verdict::Takeable);
        message.eta = Some("2030-01-01T00:01:00Z".into());
        assert_eq!(
            on_arrival(&message, at("2030-01-01T00:00:00Z")),
            Verdict::Dispose(Disposal::SendBack {
                wait: Duration::from_secs(60),
                hops: None
            })
        );
        message.eta = None;
        message.expires = Some("2030-01-01T00:00:00Z".into());
        assert_eq!(
            on_arrival(&message, at("2030-01-01T00:00:01Z")),
            Verdict::Conclude(Happened::Expired("2030-01-01T00:00:00Z".into()))
        );
        assert_eq!(
            on_arrival(&message, at("2029-12-31T23:59:59Z")),
            Verdict::Takeable
        );
    }

    fn stored(state: TaskState, retries: u32) -> TaskDocument {
        let mut task = TaskDocument::pending(
            &crate::domain::TaskId::parse("t1").unwrap(),
            "demo",
            "default",
        );
        task.state = state;
        task.retries = retries;
        task
    }

    #[test]
    fn the_stored_task_refuses_finished_revoked_stale_and_cancelled_copies() {
        let duplicate = |why| Some(Verdict::Dispose(Disposal::Duplicate(why)));
        assert_eq!(
            on_task(&stored(TaskState::Success, 0), 0),
            duplicate("finished")
        );
        assert_eq!(
            on_task(&stored(TaskState::Revoked, 0), 0),
            duplicate("revoked")
        );
        assert_eq!(
            on_task(&stored(TaskState::Retry, 2), 1),
            duplicate("stale_attempt")
        );
        assert_eq!(on_task(&stored(TaskState::Retry, 1), 1), None);
        let mut owing = stored(TaskState::Failure, 0);
        owing.dead_letter = Some(DeadLetterState::Pending);
        owing.root_cause = Some("bad".into());
        assert_eq!(
            on_task(&owing, 0),
            Some(Verdict::Dispose(Disposal::PayDeadLetter {
                cause: Some("bad".into())
            }))
        );
        let mut cancelled = stored(TaskState::Started, 0);
        cancelled.cancel_requested = Some(crate::store::tasks::OperatorRequest {
            at: DateTime::now(),
            by: "cli:ops".into(),
        });
        assert!(matches!(
            on_task(&cancelled, 0),
            Some(Verdict::Conclude(Happened::Cancelled(cause))) if cause.contains("cli:ops")
        ));
    }

    #[test]
    fn the_lease_says_wait_while_held_take_once_lapsed_and_poison_past_the_cap() {
        let now = DateTime::now();
        let lease = |token: &str, until_ms: i64, deliveries| {
            let until = DateTime::from_millis(now.timestamp_millis() + until_ms);
            AttemptLease::for_tests(token, until, deliveries)
        };
        assert_eq!(on_lease(None, "mine", now, 3), Verdict::Takeable);
        assert_eq!(
            on_lease(Some(&lease("mine", 5000, 1)), "mine", now, 3),
            Verdict::Takeable
        );
        assert_eq!(
            on_lease(Some(&lease("other", 5000, 1)), "mine", now, 3),
            Verdict::Wait {
                after: Duration::from_secs(1),
                held: true
            }
        );
        assert_eq!(
            on_lease(Some(&lease("other", -1, 1)), "mine", now, 3),
            Verdict::Takeable
        );
        assert_eq!(
            on_lease(Some(&lease("other", -1, 3)), "mine", now, 3),
            Verdict::Conclude(Happened::Poison(3))
        );
        let mut done = lease("other", 5000, 1);
        done.done_at = Some(now);
        assert!(matches!(
            on_lease(Some(&done), "mine", now, 3),
            Verdict::Wait { held: false, .. }
        ));
        let mut closed = lease("closed", 0, 0);
        closed.closed = Some(TaskState::Failure);
        assert_eq!(
            on_lease(Some(&closed), "mine", now, 3),
            Verdict::Conclude(Happened::Refused(REFUSED.into()))
        );
    }
}
