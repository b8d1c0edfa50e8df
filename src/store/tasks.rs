//! `Tasks`: one document per task, the authority on its state.
//!
//! Every transition is one conditional update whose filter lists the states it may move from, so
//! a late or duplicate delivery can never move a finished task back.
//!
//! # The execution lease
//!
//! An attempt may run only while it holds the task's lease: `STARTED` records a random
//! `attempt_token` and a `lease_until` that the running attempt renews. Another copy of the task
//! (a redelivery after a lost connection, a duplicate publish) may *take* the task only when it is
//! waiting (`PENDING`, `RETRY`) or its lease has lapsed; an attempt's outcome is recorded only
//! under its own token. `retries` in the filter keeps a stale copy of an earlier attempt from
//! starting again, and `deliveries` (starts of the current attempt) caps a message that kills every
//! worker that runs it.

use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{self, doc, Bson, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{Write, WriteOp};
use super::{is_duplicate_key, StoreError};
use crate::domain::{TaskId, TaskState};

pub const COLLECTION: &str = "Tasks";

/// Whether the broker has confirmed a task's message (`publish_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishState {
    /// Recorded, not confirmed yet: the outbox publishes it if it stays so.
    Pending,
    /// The broker has it.
    Confirmed,
}

impl PublishState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
        }
    }
}

const PUBLISH_PENDING: &str = "pending";
const PUBLISH_CONFIRMED: &str = "confirmed";

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDocument {
    #[serde(rename = "_id")]
    pub id: String,
    pub task_name: String,
    pub state: TaskState,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Set when the arguments live in `RawPayload` (too large for the message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<String>,
    /// The route (queue suffix) it was sent to.
    #[serde(default)]
    pub route: String,
    #[serde(default)]
    pub priority: u8,
    /// Failed attempts so far.
    #[serde(default)]
    pub retries: u32,
    pub created_at: DateTime,
    pub updated_at: DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C trace context the message carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The task that spawned this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_time_limit: Option<f64>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<f64>,
    /// ISO 8601: not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// ISO 8601: not after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// `pending` until the broker confirmed the message, then `confirmed`. The outbox sweeper
    /// publishes what stays `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_state: Option<PublishState>,
    /// An outbox sweeper holds this task until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_claim_until: Option<DateTime>,
    /// The attempt that holds (or last held) the execution lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_token: Option<String>,
    /// Until when that attempt's lease holds; it renews it while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime>,
    /// Times the current attempt was started (a redelivery after a crash starts it again).
    #[serde(default)]
    pub deliveries: u32,
    /// `pending` while a dead letter owed for this task is unconfirmed, then `sent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
}

impl TaskDocument {
    /// A new task, as a submission records it before publishing.
    pub fn pending(id: &TaskId, task_name: &str, route: &str) -> Self {
        let now = DateTime::now();
        Self {
            id: id.to_string(),
            task_name: task_name.to_owned(),
            state: TaskState::Pending,
            args: Vec::new(),
            kwargs: Map::new(),
            payload_ref: None,
            route: route.to_owned(),
            priority: 0,
            retries: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            result: None,
            root_cause: None,
            trace_id: None,
            traceparent: None,
            parent_id: None,
            hard_time_limit: None,
            soft_time_limit: None,
            eta: None,
            expires: None,
            publish_state: Some(PublishState::Pending),
            outbox_claim_until: None,
            attempt_token: None,
            lease_until: None,
            deliveries: 0,
            dead_letter: None,
        }
    }
}

/// One attempt of one task, as the lease knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub task_id: String,
    pub task_name: String,
    /// Failed attempts before this one (the message's `retries`).
    pub retries: u32,
    /// Random, unique to this attempt: the lease is held under it.
    pub token: String,
}

impl Attempt {
    pub fn new(task_id: &str, task_name: &str, retries: u32) -> Self {
        Self {
            task_id: task_id.to_owned(),
            task_name: task_name.to_owned(),
            retries,
            token: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// An outcome to record for an attempt.
#[derive(Debug, Clone)]
pub enum Transition {
    /// The attempt failed and another will follow (its message is already confirmed).
    Retry {
        root_cause: String,
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
}

impl Transition {
    pub fn target(&self) -> TaskState {
        match self {
            Self::Retry { .. } => TaskState::Retry,
            Self::Success { .. } => TaskState::Success,
            Self::Failure { .. } => TaskState::Failure,
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
    /// Nothing, but it ran: its claim never left (see [`TaskRepository::outcome_write`]).
    Ran,
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

/// Whether a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// The task was not in a state this transition may leave (typically: already finished).
    No,
}

fn after(now: DateTime, d: Duration) -> DateTime {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_add(ms))
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
        "lease_until": after(now, lease),
    }
}

/// `$set` fields of an outcome.
fn outcome_fields(transition: &Transition, now: DateTime) -> Result<Document, StoreError> {
    let mut set = doc! {"state": transition.target().as_str(), "updated_at": now};
    match transition {
        Transition::Retry { root_cause } => {
            set.insert("root_cause", root_cause);
            // The next attempt starts counting its deliveries afresh.
            set.insert("deliveries", 0_i64);
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
    }
    Ok(set)
}

/// Repository of `Tasks`.
#[derive(Clone)]
pub struct TaskRepository {
    collection: Collection<TaskDocument>,
}

fn states(states: &[TaskState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

impl TaskRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    #[tracing::instrument(name = "store.tasks.insert", skip_all, fields(task_id = %task.id))]
    pub async fn insert(&self, task: &TaskDocument) -> Result<(), StoreError> {
        self.collection.insert_one(task).await?;
        Ok(())
    }

    /// A new task as a batched insert: refused when its id is taken.
    pub fn insert_write(&self, task: &TaskDocument) -> Result<Write, StoreError> {
        let document = bson::to_document(task).map_err(|e| StoreError::Rejected(e.to_string()))?;
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Insert(document),
            purpose: "submit",
        })
    }

    /// Whether a task is recorded.
    #[tracing::instrument(name = "store.tasks.exists", skip(self))]
    pub async fn exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .collection
            .clone_with_type::<Document>()
            .find_one(doc! {"_id": id})
            .projection(doc! {"_id": 1})
            .await?
            .is_some())
    }

    #[tracing::instrument(name = "store.tasks.get", skip(self))]
    pub async fn get(&self, id: &str) -> Result<Option<TaskDocument>, StoreError> {
        Ok(self.collection.find_one(doc! {"_id": id}).await?)
    }

    /// States of many tasks at once (shards of a job).
    pub async fn states(&self, ids: &[String]) -> Result<Vec<(String, TaskState)>, StoreError> {
        let cursor = self
            .collection
            .clone_with_type::<Document>()
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"state": 1})
            .await?;
        let docs: Vec<Document> = cursor.try_collect().await?;
        docs.into_iter()
            .map(|d| {
                let id = d
                    .get_str("_id")
                    .map_err(|e| StoreError::Malformed(e.to_string()))?;
                let state = d
                    .get_str("state")
                    .map_err(|e| StoreError::Malformed(e.to_string()))?
                    .parse::<TaskState>()
                    .map_err(StoreError::Malformed)?;
                Ok((id.to_owned(), state))
            })
            .collect()
    }

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
        Write {
            collection: COLLECTION,
            op: WriteOp::Upsert {
                filter,
                update: doc! {
                    "$set": claim_fields(attempt, now, lease),
                    "$inc": {"deliveries": 1_i64},
                    "$setOnInsert": on_insert(&attempt.task_name, now),
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
    /// unless the attempt still holds the task's lease; otherwise it carries the claim's
    /// conditions itself: a short task whose claim was never sent ([`Holding::Ran`]), or a task
    /// closed without running ([`Holding::Nothing`]: expired, unknown, poison).
    pub fn outcome_write(
        &self,
        attempt: &Attempt,
        transition: &Transition,
        holding: Holding,
    ) -> Result<Write, StoreError> {
        let now = DateTime::now();
        let mut set = outcome_fields(transition, now)?;
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
            Holding::Ran => {
                set.insert("started_at", now);
                set.insert("retries", i64::from(attempt.retries));
                set.insert("attempt_token", &attempt.token);
                let update = doc! {
                    "$set": set,
                    "$inc": {"deliveries": 1_i64},
                    "$setOnInsert": on_insert(&attempt.task_name, now),
                };
                (takeable(attempt, now), update)
            }
            Holding::Nothing => {
                set.insert("attempt_token", &attempt.token);
                let update = doc! {
                    "$set": set,
                    "$setOnInsert": on_insert(&attempt.task_name, now),
                };
                (takeable(attempt, now), update)
            }
        };
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Upsert { filter, update },
            purpose: match transition {
                Transition::Retry { .. } => "retry",
                Transition::Success { .. } => "success",
                Transition::Failure { .. } => "failure",
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
                doc! {"$set": {"lease_until": after(DateTime::now(), lease)}},
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

    /// Closes a task its submitter was told was not accepted, if no worker has taken it yet.
    /// `Applied::No` means a worker has: the task runs, and the submitter must be told so.
    #[tracing::instrument(name = "store.tasks.close_unpublished", skip(self, root_cause))]
    pub async fn close_unpublished(
        &self,
        id: &str,
        root_cause: &str,
    ) -> Result<Applied, StoreError> {
        let now = DateTime::now();
        let outcome = self
            .collection
            .update_one(
                doc! {"_id": id, "state": TaskState::Pending.as_str()},
                doc! {"$set": {
                    "state": TaskState::Failure.as_str(),
                    "updated_at": now,
                    "finished_at": now,
                    "root_cause": root_cause,
                }},
            )
            .await?;
        Ok(if outcome.matched_count == 1 {
            Applied::Yes
        } else {
            Applied::No
        })
    }

    /// Records that the broker confirmed these tasks' messages: one command for the batch. A task
    /// a worker has claimed already needs no mark (its claim set it; the outbox only looks at
    /// `PENDING` tasks), so at load most of the batch is matched and not written.
    #[tracing::instrument(name = "store.tasks.mark_published", skip_all, fields(count = ids.len()))]
    pub async fn mark_published(&self, ids: &[String]) -> Result<(), StoreError> {
        self.collection
            .update_many(
                doc! {"_id": {"$in": ids}, "publish_state": PUBLISH_PENDING, "state": TaskState::Pending.as_str()},
                doc! {"$set": {"publish_state": PUBLISH_CONFIRMED}, "$unset": {"outbox_claim_until": ""}},
            )
            .await?;
        Ok(())
    }

    /// Claims one task whose message was never confirmed and which is older than `age`, for
    /// `hold`; other sweepers skip it until then.
    #[tracing::instrument(name = "store.tasks.claim_unpublished", skip(self))]
    pub async fn claim_unpublished(
        &self,
        age: Duration,
        hold: Duration,
    ) -> Result<Option<TaskDocument>, StoreError> {
        let now = DateTime::now();
        let older_than = DateTime::from_millis(now.timestamp_millis() - age.as_millis() as i64);
        let until = DateTime::from_millis(now.timestamp_millis() + hold.as_millis() as i64);
        Ok(self
            .collection
            .find_one_and_update(
                doc! {
                    "publish_state": PUBLISH_PENDING,
                    "state": TaskState::Pending.as_str(),
                    "created_at": {"$lt": older_than},
                    "$or": [{"outbox_claim_until": null}, {"outbox_claim_until": {"$lt": now}}],
                },
                doc! {"$set": {"outbox_claim_until": until}},
            )
            .sort(doc! {"created_at": 1})
            .return_document(ReturnDocument::After)
            .await?)
    }
}

/// Fields of a document created by a worker for a task no client recorded (a Celery client's).
fn on_insert(task_name: &str, now: DateTime) -> Document {
    doc! {
        "task_name": task_name,
        "created_at": now,
        "args": [],
        "kwargs": {},
        "route": "",
        "priority": 0,
    }
}

fn to_bson(value: &Value) -> Result<Bson, StoreError> {
    bson::to_bson(value)
        .map_err(|e| StoreError::Rejected(format!("the value cannot be stored in BSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_states_are_stored_as_the_filters_write_them() {
        for state in [PublishState::Pending, PublishState::Confirmed] {
            assert_eq!(
                bson::to_bson(&state).unwrap(),
                Bson::String(state.as_str().to_owned())
            );
        }
        assert_eq!(PublishState::Pending.as_str(), PUBLISH_PENDING);
        assert_eq!(PublishState::Confirmed.as_str(), PUBLISH_CONFIRMED);
    }
}
