//! `Tasks`: one document per task, the authority on its state.
//!
//! Every transition is one conditional update whose filter lists the states it may move from, so
//! a late or duplicate delivery can never move a finished task back.

use std::time::Duration;

use mongodb::bson::{self, doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{Write, WriteOp};
pub use super::outcomes::DeadLetterState;
pub(crate) use super::shape::to_bson;
pub use super::task_leases::OperatorRequest;
use super::StoreError;
use crate::cause::Cause;
use crate::domain::{Priority, TaskId, TaskState};

pub const COLLECTION: &str = "Tasks";

/// The root cause a worker records for a task whose refused submission it met first (the
/// submitter's own refusal marks the task `refused_at`).
pub(crate) const REFUSED: &str = "not published: its submission was not accepted";

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

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDocument {
    #[serde(rename = "_id")]
    pub id: TaskId,
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
    pub priority: Priority,
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
    /// The workflow it is a step of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Celery's canvas its message carries (what runs after it), for a republish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<Value>,
    /// Stored as seconds, as Celery gives it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::shape::seconds"
    )]
    pub hard_time_limit: Option<Duration>,
    /// Stored as seconds, as Celery gives it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::shape::seconds"
    )]
    pub soft_time_limit: Option<Duration>,
    /// Not before.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::shape::time"
    )]
    pub eta: Option<DateTime>,
    /// Not after.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::shape::time"
    )]
    pub expires: Option<DateTime>,
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
    /// The worker (`host:pid`) that holds (or last held) the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Times the current attempt was started (a redelivery after a crash starts it again).
    #[serde(default)]
    pub deliveries: u32,
    /// Whether a dead letter owed for this task is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterState>,
    /// Each rerun by an operator (`kobe task retry`, `kobe dlq replay`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<OperatorRequest>,
    /// An operator asked a running task to stop (`kobe task cancel`); its worker tells the
    /// handler. Cleared when the task is run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<OperatorRequest>,
    /// Its submission was answered "not accepted" ([`TaskRepository::refuse`]): recorded only
    /// so that it never runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_at: Option<DateTime>,
}

impl TaskDocument {
    /// A new task, as a submission records it before publishing.
    pub fn pending(id: &TaskId, task_name: &str, route: &str) -> Self {
        let now = DateTime::now();
        Self {
            id: id.clone(),
            task_name: task_name.to_owned(),
            state: TaskState::Pending,
            args: Vec::new(),
            kwargs: Map::new(),
            payload_ref: None,
            route: route.to_owned(),
            priority: Priority::default(),
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
            workflow_id: None,
            embed: None,
            hard_time_limit: None,
            soft_time_limit: None,
            eta: None,
            expires: None,
            publish_state: Some(PublishState::Pending),
            outbox_claim_until: None,
            attempt_token: None,
            lease_until: None,
            worker: None,
            deliveries: 0,
            dead_letter: None,
            replays: Vec::new(),
            cancel_requested: None,
            refused_at: None,
        }
    }
}

/// How a recorded task stands, for a dedup key pointing at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A task that was accepted (or may still be): the key is its.
    Live,
    /// Recorded closed so that it never runs: its submission was not accepted.
    Refused,
}

/// What [`TaskRepository::refuse`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The task will never run.
    NotRun,
    /// A worker has taken it: it runs.
    Taken,
}

/// Repository of `Tasks`.
#[derive(Clone)]
pub struct TaskRepository {
    pub(super) collection: Collection<TaskDocument>,
    /// Where the running attempts are (read model, cancels, refusals).
    pub(super) leases: super::task_leases::LeaseRepository,
    /// What each attempt came to (the read model lays the latest over the document).
    pub(super) outcomes: super::outcomes::OutcomeRepository,
    /// Which attempts run now, by the workers' own word (the read model's `STARTED`).
    pub(super) workers: super::workers::WorkerRepository,
}

pub(super) fn states(states: &[TaskState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

impl TaskRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
            leases: super::task_leases::LeaseRepository::new(db),
            outcomes: super::outcomes::OutcomeRepository::new(db),
            workers: super::workers::WorkerRepository::new(db),
        }
    }

    #[tracing::instrument(name = "store.tasks.insert", skip_all, fields(task_id = %task.id))]
    pub async fn insert(&self, task: &TaskDocument) -> Result<(), StoreError> {
        self.collection.insert_one(task).await?;
        Ok(())
    }

    /// A new task as a batched insert: refused when its id is taken.
    pub(crate) fn insert_write(&self, task: &TaskDocument) -> Result<Write, StoreError> {
        let document = bson::to_document(task).map_err(|e| StoreError::Rejected(Cause::of(e)))?;
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Insert(document),
            purpose: "submit",
        })
    }

    /// Tasks of `names` not finished and unchanged since `before`, oldest first, at most
    /// `limit`: their ids and workflows.
    #[tracing::instrument(name = "store.tasks.unfinished_of", skip(self, names))]
    pub async fn unfinished_of(
        &self,
        names: &[String],
        before: DateTime,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        use futures_util::TryStreamExt;
        let unfinished = [TaskState::Pending, TaskState::Started, TaskState::Retry];
        let cursor = self
            .collection
            .clone_with_type::<Document>()
            .find(doc! {
                "state": {"$in": unfinished.iter().map(|s| s.as_str()).collect::<Vec<_>>()},
                "updated_at": {"$lt": before},
                "task_name": {"$in": names},
            })
            .projection(doc! {"_id": 1, "workflow_id": 1})
            .sort(doc! {"updated_at": 1})
            .limit(limit)
            .await?;
        let found: Vec<Document> = cursor.try_collect().await?;
        Ok(found
            .into_iter()
            .filter_map(|task| {
                let id = task.get_str("_id").ok()?.to_owned();
                Some((id, task.get_str("workflow_id").ok().map(str::to_owned)))
            })
            .collect())
    }

    /// The name of task `id`, if it is recorded.
    #[tracing::instrument(name = "store.tasks.name_of", skip(self))]
    pub async fn name_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .collection
            .clone_with_type::<Document>()
            .find_one(doc! {"_id": id})
            .projection(doc! {"task_name": 1})
            .await?
            .and_then(|task| task.get_str("task_name").ok().map(str::to_owned)))
    }

    /// Whether a task is recorded, and if so whether it was refused ([`TaskRepository::refuse`]:
    /// recorded only so that it never runs).
    #[tracing::instrument(name = "store.tasks.recorded", skip(self))]
    pub async fn recorded(&self, id: &str) -> Result<Option<Recorded>, StoreError> {
        Ok(self
            .collection
            .clone_with_type::<Document>()
            .find_one(doc! {"_id": id})
            .projection(doc! {"refused_at": 1})
            .await?
            .map(|task| {
                if task.contains_key("refused_at") {
                    Recorded::Refused
                } else {
                    Recorded::Live
                }
            }))
    }

    /// The execution leases of these tasks' attempts.
    pub fn leases(&self) -> &super::task_leases::LeaseRepository {
        &self.leases
    }

    /// The workers' own lists of what runs on them.
    pub fn workers(&self) -> &super::workers::WorkerRepository {
        &self.workers
    }

    /// The `Tasks` document as stored, without its outcomes (readers use
    /// [`TaskRepository::get`]).
    pub(crate) async fn document(&self, id: &str) -> Result<Option<TaskDocument>, StoreError> {
        Ok(self.collection.find_one(doc! {"_id": id}).await?)
    }

    /// The attempts' outcomes.
    pub fn outcomes(&self) -> &super::outcomes::OutcomeRepository {
        &self.outcomes
    }

    /// States of many tasks at once (shards of a job), as the read model has them but for the
    /// running attempts.
    pub async fn states(&self, ids: &[String]) -> Result<Vec<(String, TaskState)>, StoreError> {
        Ok(self
            .current_of(ids)
            .await?
            .into_iter()
            .map(|t| (t.id.to_string(), t.state))
            .collect())
    }

    /// Makes sure task `id` never runs, for a submission about to be answered "not accepted":
    /// closes it `FAILURE` if it is still waiting, and — when it is not recorded (an insert whose
    /// answer was lost may still land, or never happened) — records it closed, so a late insert
    /// is refused. Asking again after an answer was lost gives the same answer (the closed
    /// document says it was refused). [`Refusal::Taken`]: a worker has it, so it runs and the
    /// submission was accepted after all.
    #[tracing::instrument(name = "store.tasks.refuse", skip(self, root_cause))]
    pub async fn refuse(
        &self,
        id: &str,
        task_name: &str,
        root_cause: &str,
    ) -> Result<Refusal, StoreError> {
        // First the first attempt's lease, the arbiter between this refusal and a worker's claim.
        let closed = self
            .leases
            .close(id, task_name, 0, TaskState::Failure, None)
            .await?;
        if !closed {
            let lease = self.leases.get(id, 0).await?;
            if lease.is_none_or(|l| l.closed.is_none()) {
                return Ok(Refusal::Taken);
            }
        }
        let now = DateTime::now();
        let refused = self
            .collection
            .update_one(
                doc! {"_id": id, "state": TaskState::Pending.as_str()},
                doc! {
                    "$set": {
                        "state": TaskState::Failure.as_str(),
                        "updated_at": now,
                        "finished_at": now,
                        "root_cause": root_cause,
                        "refused_at": now,
                    },
                    "$setOnInsert": {
                        "task_name": task_name,
                        "created_at": now,
                        "args": [],
                        "kwargs": {},
                        "route": "",
                        "priority": 0,
                    },
                },
            )
            .upsert(true)
            .await;
        // The lease is closed: no worker runs attempt 0 now, whatever the task's document says.
        // A worker that met the closed lease first may have closed the document already (the
        // upsert's insert then collides): it is refused all the same.
        match refused {
            Ok(_) => Ok(Refusal::NotRun),
            Err(e) if super::is_duplicate_key(&e) => Ok(Refusal::NotRun),
            Err(e) => Err(e.into()),
        }
    }

    /// A closed record of task `id`, inserted only if none exists: once it is in, an insert of
    /// that id still on its way is refused. For a dedup key taken over from a submission that
    /// never recorded its task.
    pub(crate) fn tombstone_write(&self, id: &str, task_name: &str, root_cause: &str) -> Write {
        let now = DateTime::now();
        Write {
            collection: COLLECTION,
            op: WriteOp::Insert(doc! {
                "_id": id,
                "task_name": task_name,
                "state": TaskState::Failure.as_str(),
                "args": [],
                "kwargs": {},
                "route": "",
                "priority": 0,
                "created_at": now,
                "updated_at": now,
                "finished_at": now,
                "root_cause": root_cause,
                "refused_at": now,
            }),
            purpose: "tombstone",
        }
    }

    /// Records that the broker confirmed these tasks' messages: one command for the batch. A task
    /// a worker has claimed already needs no mark (its claim set it; the outbox only looks at
    /// `PENDING` tasks), so at load most of the batch is matched and not written.
    #[tracing::instrument(name = "store.tasks.mark_published", skip_all, fields(count = ids.len()))]
    pub(crate) async fn mark_published(&self, ids: &[String]) -> Result<(), StoreError> {
        self.collection
            .update_many(
                doc! {
                    "_id": {"$in": ids},
                    "publish_state": PublishState::Pending.as_str(),
                    "state": {"$in": [TaskState::Pending.as_str(), TaskState::Retry.as_str()]},
                },
                doc! {"$set": {"publish_state": PublishState::Confirmed.as_str()}, "$unset": {"outbox_claim_until": ""}},
            )
            .await?;
        Ok(())
    }

    /// Claims one task whose message was never confirmed and which is older than `age`, for
    /// `hold`; other sweepers skip it until then.
    #[tracing::instrument(name = "store.tasks.claim_unpublished", skip(self))]
    pub(crate) async fn claim_unpublished(
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
                    "publish_state": PublishState::Pending.as_str(),
                    "$and": [
                        // A new task, or a retry whose next attempt a worker could not confirm.
                        {"$or": [
                            {"state": TaskState::Pending.as_str(), "created_at": {"$lt": older_than}},
                            {"state": TaskState::Retry.as_str(), "updated_at": {"$lt": older_than}},
                        ]},
                        {"$or": [{"outbox_claim_until": null}, {"outbox_claim_until": {"$lt": now}}]},
                    ],
                },
                doc! {"$set": {"outbox_claim_until": until}},
            )
            .sort(doc! {"created_at": 1})
            .return_document(ReturnDocument::After)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::Bson;

    #[test]
    fn states_are_stored_as_the_filters_write_them() {
        for state in [PublishState::Pending, PublishState::Confirmed] {
            assert_eq!(
                bson::to_bson(&state).unwrap(),
                Bson::String(state.as_str().to_owned())
            );
        }
        for state in [DeadLetterState::Pending, DeadLetterState::Sent] {
            assert_eq!(
                bson::to_bson(&state).unwrap(),
                Bson::String(state.as_str().to_owned())
            );
        }
    }

    #[test]
    fn a_document_an_earlier_version_wrote_still_reads() {
        let written = bson::doc! {
            "_id": "t1", "task_name": "demo", "state": "PENDING",
            "created_at": DateTime::now(), "updated_at": DateTime::now(),
            "priority": 3, "hard_time_limit": 2.5,
            "eta": "2030-01-02T03:04:05.678Z", "expires": "2030-01-02T03:04:05.678",
            "dead_letter": "pending",
        };
        let task: TaskDocument = bson::from_document(written).unwrap();
        assert_eq!(task.id, "t1");
        assert_eq!(task.priority.value(), 3);
        assert_eq!(task.hard_time_limit, Some(Duration::from_millis(2500)));
        let at = DateTime::parse_rfc3339_str("2030-01-02T03:04:05.678Z").unwrap();
        assert_eq!((task.eta, task.expires), (Some(at), Some(at)));
        assert_eq!(task.dead_letter, Some(DeadLetterState::Pending));
        let again: TaskDocument = bson::from_document(bson::to_document(&task).unwrap()).unwrap();
        assert_eq!(again, task);
        assert_eq!(
            bson::to_document(&task).unwrap().get("eta"),
            Some(&Bson::DateTime(at))
        );
    }
}
