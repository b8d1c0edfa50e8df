//! `Tasks`: one document per task, the authority on its state.
//!
//! Every transition is one conditional update whose filter lists the states it may move from, so
//! a late or duplicate delivery can never move a finished task back.

use mongodb::bson::{self, doc, Bson, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{is_duplicate_key, StoreError};
use crate::domain::{TaskId, TaskState};

pub const COLLECTION: &str = "Tasks";

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
}

impl TaskDocument {
    /// A new task, as `POST /task/start` records it before publishing.
    pub fn pending(
        id: &TaskId,
        task_name: &str,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
        route: &str,
        priority: u8,
    ) -> Self {
        let now = DateTime::now();
        Self {
            id: id.to_string(),
            task_name: task_name.to_owned(),
            state: TaskState::Pending,
            args,
            kwargs,
            route: route.to_owned(),
            priority,
            retries: 0,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            result: None,
            root_cause: None,
            trace_id: None,
        }
    }
}

/// What a transition asks for.
#[derive(Debug, Clone)]
pub enum Transition {
    /// An attempt begins. Creates the document if it is missing (a message from a Celery client
    /// that never wrote one).
    Started {
        task_name: String,
        retries: u32,
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

    /// Moves a task forward, if its current state allows it. One command.
    #[tracing::instrument(name = "store.tasks.transition", skip(self, transition), fields(to = %transition.target()))]
    pub async fn transition(
        &self,
        id: &str,
        transition: Transition,
    ) -> Result<Applied, StoreError> {
        let target = transition.target();
        let now = DateTime::now();
        let from: Vec<&str> = target
            .allowed_predecessors()
            .iter()
            .map(|s| s.as_str())
            .collect();
        let filter = doc! {"_id": id, "state": {"$in": from}};
        let mut set = doc! {"state": target.as_str(), "updated_at": now};
        match transition {
            Transition::Started { task_name, retries } => {
                set.insert("started_at", now);
                set.insert("retries", i64::from(retries));
                let update = doc! {
                    "$set": set,
                    "$setOnInsert": {
                        "task_name": task_name,
                        "created_at": now,
                        "args": [],
                        "kwargs": {},
                        "route": "",
                        "priority": 0,
                    },
                };
                // A finished task fails the filter, and the upsert then collides with its `_id`:
                // that duplicate-key error is the answer "already finished".
                return match self
                    .collection
                    .update_one(filter, update)
                    .upsert(true)
                    .await
                {
                    Ok(_) => Ok(Applied::Yes),
                    Err(e) if is_duplicate_key(&e) => Ok(Applied::No),
                    Err(e) => Err(e.into()),
                };
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
        let from: Vec<&str> = TaskState::Failure
            .allowed_predecessors()
            .iter()
            .map(|s| s.as_str())
            .collect();
        let update = doc! {
            "$set": {
                "state": TaskState::Failure.as_str(),
                "updated_at": now,
                "finished_at": now,
                "root_cause": root_cause,
            },
            "$setOnInsert": {
                "task_name": task_name,
                "created_at": now,
                "args": [],
                "kwargs": {},
                "route": "",
                "priority": 0,
                "retries": 0,
            },
        };
        match self
            .collection
            .update_one(doc! {"_id": id, "state": {"$in": from}}, update)
            .upsert(true)
            .await
        {
            Ok(_) => Ok(Applied::Yes),
            Err(e) if is_duplicate_key(&e) => Ok(Applied::No),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the collection (tests only).
    pub async fn drop_all(&self) -> Result<(), StoreError> {
        self.collection.drop().await?;
        Ok(())
    }
}

fn to_bson(value: &Value) -> Result<Bson, StoreError> {
    bson::to_bson(value).map_err(|e| StoreError::Malformed(e.to_string()))
}
