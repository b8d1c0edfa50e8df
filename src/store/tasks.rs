//! `Tasks`: one document per task, the authority on its state.
//!
//! Every transition is one conditional update whose filter lists the states it may move from, so
//! a late or duplicate delivery can never move a finished task back.

use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{self, doc, Bson, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{is_duplicate_key, StoreError};
use crate::domain::{TaskId, TaskState};

pub const COLLECTION: &str = "Tasks";

/// `publish_state` while the broker has not confirmed the task's message.
pub const PUBLISH_PENDING: &str = "pending";
/// `publish_state` once it has.
pub const PUBLISH_CONFIRMED: &str = "confirmed";

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
    pub publish_state: Option<String>,
    /// An outbox sweeper holds this task until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_claim_until: Option<DateTime>,
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
            publish_state: Some(PUBLISH_PENDING.to_owned()),
            outbox_claim_until: None,
        }
    }
}

/// Who may take over a task another attempt already marked `STARTED`.
#[derive(Debug, Clone, Copy)]
pub enum Takeover {
    /// A redelivery: the attempt that marked it died with its delivery unacked.
    Redelivered,
    /// A fresh message for a task marked `STARTED` (a duplicate publish): only once that start
    /// is older than this, so two copies never run side by side.
    StartedBefore(DateTime),
}

/// What a transition asks for.
#[derive(Debug, Clone)]
pub enum Transition {
    /// An attempt begins. Creates the document if it is missing (a message from a Celery client
    /// that never wrote one).
    Started {
        task_name: String,
        retries: u32,
        takeover: Takeover,
    },
    /// An attempt failed and another will follow.
    Retry {
        retries: u32,
        root_cause: String,
    },
    Success {
        result: Value,
    },
    Failure {
        root_cause: String,
    },
}

impl Transition {
    pub fn target(&self) -> TaskState {
        match self {
            Self::Started { .. } => TaskState::Started,
            Self::Retry { .. } => TaskState::Retry,
            Self::Success { .. } => TaskState::Success,
            Self::Failure { .. } => TaskState::Failure,
        }
    }
}

/// Whether a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// The task was not in a state this transition may leave (typically: already finished).
    No,
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

    /// Moves a task forward, if its current state allows it. One command.
    #[tracing::instrument(name = "store.tasks.transition", skip(self, transition), fields(to = %transition.target()))]
    pub async fn transition(
        &self,
        id: &str,
        transition: Transition,
    ) -> Result<Applied, StoreError> {
        let target = transition.target();
        let now = DateTime::now();
        let mut filter = doc! {"_id": id, "state": {"$in": states(target.allowed_predecessors())}};
        let mut set = doc! {"state": target.as_str(), "updated_at": now};
        match transition {
            Transition::Started {
                task_name,
                retries,
                takeover,
            } => {
                let fresh = states(&[TaskState::Pending, TaskState::Retry]);
                let running = match takeover {
                    Takeover::Redelivered => doc! {"state": TaskState::Started.as_str()},
                    Takeover::StartedBefore(before) => {
                        doc! {"state": TaskState::Started.as_str(), "started_at": {"$lt": before}}
                    }
                };
                filter = doc! {"_id": id, "$or": [{"state": {"$in": fresh}}, running]};
                set.insert("started_at", now);
                set.insert("retries", i64::from(retries));
                let update = doc! {"$set": set, "$setOnInsert": on_insert(&task_name, now)};
                // A finished (or running) task fails the filter, and the upsert then collides
                // with its `_id`: that duplicate-key error is the answer "not for you".
                return self.upsert_unless_taken(filter, update).await;
            }
            Transition::Retry {
                retries,
                root_cause,
            } => {
                set.insert("retries", i64::from(retries));
                set.insert("root_cause", root_cause);
            }
            Transition::Success { result } => {
                set.insert("finished_at", now);
                set.insert("result", to_bson(&result)?);
            }
            Transition::Failure { root_cause } => {
                set.insert("finished_at", now);
                set.insert("root_cause", root_cause);
            }
        }
        let outcome = self
            .collection
            .update_one(filter, doc! {"$set": set})
            .await?;
        Ok(if outcome.matched_count == 1 {
            Applied::Yes
        } else {
            Applied::No
        })
    }

    /// Closes a task the worker refuses to run (unknown task name), creating its document if no
    /// client wrote one, so its status says why. A task already finished is left alone.
    #[tracing::instrument(name = "store.tasks.reject", skip(self))]
    pub async fn reject(
        &self,
        id: &str,
        task_name: &str,
        root_cause: &str,
    ) -> Result<Applied, StoreError> {
        let now = DateTime::now();
        let update = doc! {
            "$set": {
                "state": TaskState::Failure.as_str(),
                "updated_at": now,
                "finished_at": now,
                "root_cause": root_cause,
            },
            "$setOnInsert": on_insert(task_name, now),
        };
        let filter =
            doc! {"_id": id, "state": {"$in": states(TaskState::Failure.allowed_predecessors())}};
        self.upsert_unless_taken(filter, update).await
    }

    /// An upsert keyed by `_id` whose filter also demands a state: when the document exists in
    /// another state, the insert collides with its `_id` (11000), which means "not applied".
    async fn upsert_unless_taken(
        &self,
        filter: Document,
        update: Document,
    ) -> Result<Applied, StoreError> {
        match self
            .collection
            .update_one(filter, update)
            .upsert(true)
            .await
        {
            Ok(_) => Ok(Applied::Yes),
            Err(e) if is_duplicate_key(&e) => Ok(Applied::No),
            Err(e) => Err(e.into()),
        }
    }

    /// Records that the broker confirmed these tasks' messages: one command for the batch.
    #[tracing::instrument(name = "store.tasks.mark_published", skip_all, fields(count = ids.len()))]
    pub async fn mark_published(&self, ids: &[String]) -> Result<(), StoreError> {
        self.collection
            .update_many(
                doc! {"_id": {"$in": ids}, "publish_state": PUBLISH_PENDING},
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
    bson::to_bson(value).map_err(|e| StoreError::Malformed(e.to_string()))
}
