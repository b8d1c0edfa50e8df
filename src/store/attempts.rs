//! The execution lease on `Tasks`: claims, renewals and the outcomes recorded under them.
//!
//! An attempt may run only while it holds the task's lease: `STARTED` records a random
//! `attempt_token` and a `lease_until` that the running attempt renews. Another copy of the task
//! (a redelivery after a lost connection, a duplicate publish) may *take* the task only when it is
//! waiting (`PENDING`, `RETRY`) or its lease has lapsed; an attempt's outcome is recorded only
//! under its own token. `retries` in the filter keeps a stale copy of an earlier attempt from
//! starting again, and `deliveries` (starts of the current attempt) caps a message that kills every
//! worker that runs it.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use serde_json::{Map, Value};

use super::batch::{Write, WriteOp};
use super::tasks::{states, to_bson, TaskRepository, COLLECTION, PUBLISH_CONFIRMED};
use super::{is_duplicate_key, later, StoreError};
use crate::domain::TaskState;

/// One attempt of one task, as the lease knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub task_id: String,
    pub task_name: String,
    /// Failed attempts before this one (the message's `retries`).
    pub retries: u32,
    /// Random, unique to this attempt: the lease is held under it.
    pub token: String,
    /// What the message says of the task, for a document this attempt's claim creates.
    pub origin: Arc<Origin>,
}

/// What a worker knows of a task from its message, written when its claim (or outcome) creates
/// the task's document — a task no client recorded, sent by a Celery client — so that a rerun
/// (`POST /task/{id}/retry`, a DLQ replay) runs it with its own arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub route: String,
    pub priority: u8,
}

impl Attempt {
    pub fn new(task_id: &str, task_name: &str, retries: u32) -> Self {
        Self {
            task_id: task_id.to_owned(),
            task_name: task_name.to_owned(),
            retries,
            token: uuid::Uuid::new_v4().simple().to_string(),
            origin: Arc::default(),
        }
    }

    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = Arc::new(origin);
        self
    }
}

/// An outcome to record for an attempt.
#[derive(Debug, Clone)]
pub enum Transition {
    /// The attempt failed and another will follow: its message is confirmed, or — `owed` — its
    /// publish is in doubt and the outbox sends it (`publish_state: pending`).
    Retry {
        root_cause: String,
        owed: bool,
    },
    Success {
        result: Value,
    },
    /// `dead_letter`: a dead letter is owed for this task and not yet confirmed; a redelivery that
    /// finds the task finished with one pending publishes it.
    Failure {
        root_cause: String,
        dead_letter: bool,
    },
    /// The attempt stopped because an operator cancelled the task.
    Revoked {
        root_cause: String,
    },
}

impl Transition {
    pub fn target(&self) -> TaskState {
        match self {
            Self::Retry { .. } => TaskState::Retry,
            Self::Success { .. } => TaskState::Success,
            Self::Failure { .. } => TaskState::Failure,
            Self::Revoked { .. } => TaskState::Revoked,
        }
    }
}

/// `dead_letter` while the dead letter is owed.
pub const DEAD_LETTER_PENDING: &str = "pending";
/// `dead_letter` once the broker confirmed it.
pub const DEAD_LETTER_SENT: &str = "sent";

/// What an attempt recording an outcome holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// The task's lease (its claim was applied).
    Lease,
    /// Nothing, and it did not run.
    Nothing,
}

/// The answer to a claim made with one round trip.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// The lease is ours. `taken_over` names the attempt whose lapsed lease was taken.
    Taken { taken_over: Option<String> },
    /// Someone else has the task, or it is not in a state to start: look at it.
    Refused,
}

/// Documents an attempt may take: waiting, or started under a lapsed lease (or under its own
/// token, when a claim is sent again after an ambiguous failure) — and not from a later attempt.
fn takeable(attempt: &Attempt, now: DateTime) -> Document {
    let started = TaskState::Started.as_str();
    doc! {
        "_id": &attempt.task_id,
        "retries": {"$not": {"$gt": i64::from(attempt.retries)}},
        "$or": [
            {"state": {"$in": states(&[TaskState::Pending, TaskState::Retry])}},
            {"state": started, "lease_until": {"$lt": now}},
            {"state": started, "lease_until": null},
            {"state": started, "attempt_token": &attempt.token},
        ],
    }
}

/// `$set` fields of a claim. A worker holding the message knows the broker has it: the claim
/// marks the publish confirmed too, so the submitter's own mark finds nothing to write.
fn claim_fields(attempt: &Attempt, now: DateTime, lease: Duration) -> Document {
    doc! {
        "publish_state": PUBLISH_CONFIRMED,
        "state": TaskState::Started.as_str(),
        "updated_at": now,
        "started_at": now,
        "retries": i64::from(attempt.retries),
        "attempt_token": &attempt.token,
        "lease_until": later(now, lease),
        "worker": crate::config::worker_name(),
    }
}

/// `$set` fields of an outcome.
fn outcome_fields(transition: &Transition, now: DateTime) -> Result<Document, StoreError> {
    let mut set = doc! {"state": transition.target().as_str(), "updated_at": now};
    match transition {
        Transition::Retry { root_cause, owed } => {
            set.insert("root_cause", root_cause);
            // The next attempt starts counting its deliveries afresh.
            set.insert("deliveries", 0_i64);
            if *owed {
                set.insert("publish_state", super::tasks::PUBLISH_PENDING);
            }
        }
        Transition::Success { result } => {
            set.insert("finished_at", now);
            set.insert("result", to_bson(result)?);
        }
        Transition::Failure {
            root_cause,
            dead_letter,
        } => {
            set.insert("finished_at", now);
            set.insert("root_cause", root_cause);
            if *dead_letter {
                set.insert("dead_letter", DEAD_LETTER_PENDING);
            }
        }
        Transition::Revoked { root_cause } => {
            set.insert("finished_at", now);
            set.insert("root_cause", root_cause);
        }
    }
    Ok(set)
}

impl TaskRepository {
    /// The claim of `attempt` as a batched write: the lease for `lease`, refused when another
    /// attempt holds a live lease, the task is finished, the message is of an earlier attempt, or
    /// the attempt was started `max_deliveries` times already. Creates the document when no
    /// client recorded the task (a Celery client's message).
    pub fn claim_write(&self, attempt: &Attempt, lease: Duration, max_deliveries: u32) -> Write {
        let now = DateTime::now();
        let mut filter = takeable(attempt, now);
        filter.insert(
            "deliveries",
            doc! {"$not": {"$gte": i64::from(max_deliveries)}},
        );
        // A task an operator asked to stop is not started again (a redelivery of its attempt).
        filter.insert("cancel_requested", mongodb::bson::Bson::Null);
        Write {
            collection: COLLECTION,
            op: WriteOp::Upsert {
                filter,
                update: doc! {
                    "$set": claim_fields(attempt, now, lease),
                    "$inc": {"deliveries": 1_i64},
                    "$setOnInsert": on_insert(attempt, now),
                },
            },
            purpose: "claim",
        }
    }

    /// The same claim in one round trip of its own, returning what it replaced: used for
    /// redeliveries, which may take over a lapsed lease and must say so.
    #[tracing::instrument(name = "store.tasks.claim", skip_all, fields(task_id = %attempt.task_id))]
    pub async fn claim_now(
        &self,
        attempt: &Attempt,
        lease: Duration,
        max_deliveries: u32,
    ) -> Result<Claimed, StoreError> {
        let WriteOp::Upsert { filter, update } =
            self.claim_write(attempt, lease, max_deliveries).op
        else {
            unreachable!("a claim is an upsert");
        };
        let before = self
            .collection
            .clone_with_type::<Document>()
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await;
        match before {
            Ok(Some(before)) => {
                let taken_over = (before.get_str("state") == Ok(TaskState::Started.as_str()))
                    .then(|| before.get_str("attempt_token").ok().map(str::to_owned))
                    .flatten()
                    .filter(|token| *token != attempt.token);
                Ok(Claimed::Taken { taken_over })
            }
            Ok(None) => Ok(Claimed::Taken { taken_over: None }),
            Err(e) if is_duplicate_key(&e) => Ok(Claimed::Refused),
            Err(e) => Err(e.into()),
        }
    }

    /// Records an outcome as a batched write. With [`Holding::Lease`] the write is refused
    /// unless the attempt still holds the task's lease; otherwise ([`Holding::Nothing`]: a task
    /// closed without running — expired, unknown, poison) it carries the claim's conditions
    /// itself.
    pub fn outcome_write(
        &self,
        attempt: &Attempt,
        transition: &Transition,
        holding: Holding,
    ) -> Result<Write, StoreError> {
        let now = DateTime::now();
        let mut set = outcome_fields(transition, now)?;
        // A retry counts its failure at once: a stale copy of this attempt (redelivered after a
        // lost ack) then finds a later attempt due and is acked without running.
        let retries = match transition {
            Transition::Retry { .. } => attempt.retries.saturating_add(1),
            _ => attempt.retries,
        };
        if matches!(transition, Transition::Retry { .. }) {
            set.insert("retries", i64::from(retries));
        }
        let (filter, update) = match holding {
            Holding::Lease => {
                let filter = doc! {
                    "_id": &attempt.task_id,
                    "attempt_token": &attempt.token,
                    // Its own outcome again (sent twice after an ambiguous failure) is not a
                    // refusal.
                    "state": {"$in": states(&[TaskState::Started, transition.target()])},
                };
                (filter, doc! {"$set": set})
            }
            Holding::Nothing => {
                set.insert("attempt_token", &attempt.token);
                let update = doc! {
                    "$set": set,
                    "$setOnInsert": on_insert(attempt, now),
                };
                (takeable(attempt, now), update)
            }
        };
        let mut filter = filter;
        if matches!(transition, Transition::Retry { .. }) {
            // No next attempt (nor a start) after an operator asked the task to stop: the write
            // is refused, and looking at the task finds the cancel.
            filter.insert("cancel_requested", mongodb::bson::Bson::Null);
        }
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Upsert { filter, update },
            purpose: match transition {
                Transition::Retry { .. } => "retry",
                Transition::Success { .. } => "success",
                Transition::Failure { .. } => "failure",
                Transition::Revoked { .. } => "revoked",
            },
        })
    }

    /// Extends the attempt's lease; `false` when it no longer holds it (taken over, or finished).
    #[tracing::instrument(name = "store.tasks.renew", skip_all, fields(task_id = %attempt.task_id))]
    pub async fn renew(&self, attempt: &Attempt, lease: Duration) -> Result<bool, StoreError> {
        let outcome = self
            .collection
            .update_one(
                doc! {"_id": &attempt.task_id, "attempt_token": &attempt.token, "state": TaskState::Started.as_str()},
                doc! {"$set": {"lease_until": super::from_now(lease)}},
            )
            .await?;
        Ok(outcome.matched_count == 1)
    }

    /// Lets the lease lapse now, so a redelivered copy can start at once (the attempt is handing
    /// its message back without an outcome).
    #[tracing::instrument(name = "store.tasks.release", skip_all, fields(task_id = %attempt.task_id))]
    pub async fn release(&self, attempt: &Attempt) -> Result<bool, StoreError> {
        let outcome = self
            .collection
            .update_one(
                doc! {"_id": &attempt.task_id, "attempt_token": &attempt.token, "state": TaskState::Started.as_str()},
                doc! {"$set": {"lease_until": DateTime::now()}},
            )
            .await?;
        Ok(outcome.matched_count == 1)
    }

    /// Notes that the dead letter owed for a finished task was confirmed.
    pub fn dead_letter_sent_write(&self, task_id: &str) -> Write {
        Write {
            collection: COLLECTION,
            op: WriteOp::Upsert {
                filter: doc! {"_id": task_id, "dead_letter": DEAD_LETTER_PENDING},
                update: doc! {"$set": {"dead_letter": DEAD_LETTER_SENT}},
            },
            purpose: "dead_letter_sent",
        }
    }
}

/// Fields of a document created by a worker for a task no client recorded (a Celery client's).
fn on_insert(attempt: &Attempt, now: DateTime) -> Document {
    let origin = &attempt.origin;
    let json = |value: Value| to_bson(&value).unwrap_or(mongodb::bson::Bson::Null);
    doc! {
        "task_name": &attempt.task_name,
        "created_at": now,
        "args": json(Value::Array(origin.args.clone())),
        "kwargs": json(Value::Object(origin.kwargs.clone())),
        "route": &origin.route,
        "priority": i32::from(origin.priority),
    }
}

/// What reopening a task for a rerun found.
#[derive(Debug, Clone)]
pub enum Reopened {
    /// It was `FAILURE` or `REVOKED` and is now `RETRY`, awaiting the rerun's publish.
    Now(Box<crate::store::TaskDocument>),
    /// An earlier replay reopened it and did not see its publish confirmed: publish it again.
    Unpublished(Box<crate::store::TaskDocument>),
    /// It has moved on (an earlier replay ran it, or it never failed): nothing to replay.
    MovedOn(TaskState),
    /// No such task.
    Missing,
}

impl TaskRepository {
    /// Reopens a `FAILURE` or `REVOKED` task as `RETRY` with one more retry, for an operator's
    /// rerun: the one transition out of a finished state, made only on request. The publish
    /// is marked pending until [`TaskRepository::mark_published`] sees it confirmed, so a replay
    /// interrupted in between is finished by the next one.
    #[tracing::instrument(name = "store.tasks.reopen", skip(self))]
    pub async fn reopen(&self, id: &str, replayed_by: &str) -> Result<Reopened, StoreError> {
        let now = DateTime::now();
        let reopened = self
            .collection
            .find_one_and_update(
                doc! {"_id": id, "state": {"$in": states(&TaskState::RERUNNABLE)}},
                doc! {
                    "$set": {
                        "state": TaskState::Retry.as_str(),
                        "publish_state": super::tasks::PUBLISH_PENDING,
                        "updated_at": now,
                        "deliveries": 0_i64,
                    },
                    "$inc": {"retries": 1_i64},
                    "$unset": {"finished_at": "", "dead_letter": "", "attempt_token": "", "lease_until": "", "cancel_requested": ""},
                    "$push": {"replays": {"at": now, "by": replayed_by}},
                },
            )
            .return_document(ReturnDocument::After)
            .await?;
        if let Some(task) = reopened {
            return Ok(Reopened::Now(Box::new(task)));
        }
        Ok(match self.collection.find_one(doc! {"_id": id}).await? {
            None => Reopened::Missing,
            Some(task)
                if task.state == TaskState::Retry
                    && task.publish_state == Some(super::tasks::PublishState::Pending) =>
            {
                Reopened::Unpublished(Box::new(task))
            }
            Some(task) => Reopened::MovedOn(task.state),
        })
    }
}

/// What asking to cancel a task did.
#[derive(Debug, Clone)]
pub enum Cancelled {
    /// It was waiting (`PENDING`, `RETRY`) and is `REVOKED` now: its message is acked unrun when
    /// it arrives.
    Revoked,
    /// It is running: its worker tells the handler, and the task ends `REVOKED` if the handler
    /// stops (or runs to its outcome if it does not). Asked now or before.
    Requested,
    /// It was revoked already (asking again changes nothing).
    AlreadyRevoked,
    /// It finished (`SUCCESS`, `FAILURE`): nothing to cancel.
    Finished(TaskState),
    Missing,
}

impl TaskRepository {
    /// Cancels task `id` for `by`: one conditional update per state it may be in, so a cancel
    /// racing a worker's claim either revokes the waiting task (and the claim is refused) or finds
    /// it started (and asks its attempt to stop). Idempotent.
    #[tracing::instrument(name = "store.tasks.cancel", skip(self))]
    pub async fn cancel(&self, id: &str, by: &str) -> Result<Cancelled, StoreError> {
        // A task moves on at most a few times while we look (STARTED -> RETRY, say).
        for _ in 0..4 {
            let now = DateTime::now();
            let request = doc! {"at": now, "by": by};
            let revoked = self
                .collection
                .update_one(
                    doc! {"_id": id, "state": {"$in": states(&[TaskState::Pending, TaskState::Retry])}},
                    doc! {"$set": {
                        "state": TaskState::Revoked.as_str(),
                        "updated_at": now,
                        "finished_at": now,
                        "root_cause": format!("cancelled by {by} before it ran"),
                        "cancel_requested": request.clone(),
                    }},
                )
                .await?;
            if revoked.matched_count == 1 {
                return Ok(Cancelled::Revoked);
            }
            let asked = self
                .collection
                .update_one(
                    doc! {"_id": id, "state": TaskState::Started.as_str(), "cancel_requested": null},
                    doc! {"$set": {"cancel_requested": request}},
                )
                .await?;
            if asked.matched_count == 1 {
                return Ok(Cancelled::Requested);
            }
            match self.collection.find_one(doc! {"_id": id}).await? {
                None => return Ok(Cancelled::Missing),
                Some(task) => match task.state {
                    TaskState::Revoked => return Ok(Cancelled::AlreadyRevoked),
                    TaskState::Success | TaskState::Failure => {
                        return Ok(Cancelled::Finished(task.state))
                    }
                    TaskState::Started if task.cancel_requested.is_some() => {
                        return Ok(Cancelled::Requested)
                    }
                    // It moved between the updates and the read: look again.
                    _ => continue,
                },
            }
        }
        Err(StoreError::Unavailable(crate::cause::Cause::new(
            "the task kept changing state while being cancelled; ask again",
        )))
    }

    /// Of the running attempts `tokens` (task id, attempt token), those whose task an operator
    /// asked to stop: one query for all of a worker's running tasks.
    #[tracing::instrument(name = "store.tasks.cancel_requests", skip_all, fields(running = running.len()))]
    pub async fn cancel_requests(
        &self,
        running: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        use futures_util::TryStreamExt;
        let ids: Vec<&str> = running.iter().map(|(id, _)| id.as_str()).collect();
        let tokens: Vec<&str> = running.iter().map(|(_, token)| token.as_str()).collect();
        let found: Vec<Document> = self
            .collection
            .clone_with_type::<Document>()
            .find(doc! {
                "_id": {"$in": ids},
                "attempt_token": {"$in": tokens},
                "cancel_requested": {"$ne": null},
            })
            .projection(doc! {"attempt_token": 1})
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|d| d.get_str("attempt_token").ok().map(str::to_owned))
            .collect())
    }
}
