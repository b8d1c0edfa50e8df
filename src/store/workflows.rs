//! `Workflows` and `WorkflowSteps`: a workflow's state, and each step's task, what it waits for
//! and who has arrived. A step's `_id` is its task's id, so submitting it is idempotent; a
//! member's arrival at the step after it is one conditional write that counts it once.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{is_duplicate_key, StoreError};
use crate::domain::{Priority, TaskId, TaskState};

pub(crate) const WORKFLOWS: &str = "Workflows";
pub(crate) const WORKFLOW_STEPS: &str = "WorkflowSteps";

/// A workflow as stored. `PENDING` until it ends: what runs is read from its steps' tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowDocument {
    #[serde(rename = "_id")]
    pub id: String,
    /// `PENDING` while it runs; `SUCCESS`, `FAILURE` or `REVOKED` once it ended.
    pub state: TaskState,
    pub steps: u32,
    /// The steps that end it: it succeeds once they all did.
    pub ends: Vec<String>,
    /// Those of `ends` that succeeded.
    #[serde(default)]
    pub ended: Vec<String>,
    /// The step whose failure ended it, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Submitted once if it fails, with the failed step's task id and root cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<StepTask>,
    /// The start's W3C trace context: its steps are traced as its children.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// What a step submits, checked when the workflow came in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTask {
    pub task_name: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    pub route: String,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime>,
}

/// One step as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDocument {
    /// Its task's id: `<workflow id>:<index>`.
    #[serde(rename = "_id")]
    pub task_id: String,
    pub workflow_id: String,
    pub index: u32,
    /// Where it sits in the tree (`workflow.chain[1].group[0]`).
    pub path: String,
    pub task: StepTask,
    pub immutable: bool,
    /// What it receives, by step index (see `workflow::shape::Input`).
    pub input: Value,
    /// The steps it waits for, by task id.
    pub waits_for: Vec<String>,
    /// The steps that wait for it, by task id.
    pub next: Vec<String>,
    /// Those of `next` that wait for more than this one: its arrival is counted there.
    #[serde(default)]
    pub joins: Vec<String>,
    /// Those of `waits_for` that succeeded, each counted once.
    #[serde(default)]
    pub arrived: Vec<String>,
    /// Its own `on_failure` step, submitted once if it fails for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<StepTask>,
}

/// A step's task as the workflow reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    pub task_id: String,
    pub state: TaskState,
    pub result: Option<Value>,
    pub root_cause: Option<String>,
}

#[derive(Clone)]
pub struct WorkflowRepository {
    workflows: Collection<WorkflowDocument>,
    steps: Collection<StepDocument>,
    tasks: Collection<Document>,
}

impl WorkflowRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            workflows: db.collection(WORKFLOWS),
            steps: db.collection(WORKFLOW_STEPS),
            tasks: db.collection(super::tasks::COLLECTION),
        }
    }

    /// Records a workflow and its steps; `false` when a workflow of that id was recorded before
    /// (its steps are written again where missing, so a start cut short can be finished).
    #[tracing::instrument(name = "store.workflows.insert", skip_all, fields(workflow_id = %workflow.id))]
    pub async fn insert(
        &self,
        workflow: &WorkflowDocument,
        steps: &[StepDocument],
    ) -> Result<bool, StoreError> {
        let new = match self.workflows.insert_one(workflow).await {
            Ok(_) => true,
            Err(e) if is_duplicate_key(&e) => false,
            Err(e) => return Err(e.into()),
        };
        match self.steps.insert_many(steps).ordered(false).await {
            Ok(_) => Ok(new),
            Err(e) if is_duplicate_key(&e) && !new => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<WorkflowDocument>, StoreError> {
        Ok(self.workflows.find_one(doc! {"_id": id}).await?)
    }

    /// The workflows changed last, newest first.
    pub async fn recent(&self, limit: i64) -> Result<Vec<WorkflowDocument>, StoreError> {
        let cursor = self
            .workflows
            .find(doc! {})
            .sort(doc! {"updated_at": -1})
            .limit(limit)
            .await?;
        Ok(cursor.try_collect().await?)
    }

    pub async fn step(&self, task_id: &str) -> Result<Option<StepDocument>, StoreError> {
        Ok(self.steps.find_one(doc! {"_id": task_id}).await?)
    }

    /// The workflow's steps, in the order of its tree.
    pub async fn steps(&self, workflow_id: &str) -> Result<Vec<StepDocument>, StoreError> {
        let cursor = self
            .steps
            .find(doc! {"workflow_id": workflow_id})
            .sort(doc! {"workflow_id": 1, "index": 1})
            .await?;
        Ok(cursor.try_collect().await?)
    }

    /// Counts `from` as arrived at `step`, once however often it is told; `true` when every
    /// step it waits for has arrived. One round trip (two when `from` had arrived already).
    #[tracing::instrument(name = "store.workflows.arrive", skip(self))]
    pub async fn arrive(&self, step: &str, from: &str) -> Result<bool, StoreError> {
        let counts = doc! {"arrived": 1, "waits_for": 1};
        let steps = self.steps.clone_with_type::<Document>();
        let after = steps
            .find_one_and_update(
                doc! {"_id": step, "arrived": {"$ne": from}},
                doc! {"$push": {"arrived": from}},
            )
            .projection(counts.clone())
            .return_document(ReturnDocument::After)
            .await?;
        let after = match after {
            Some(after) => Some(after),
            // Told before: whether it is complete is what it says now.
            None => {
                steps
                    .find_one(doc! {"_id": step})
                    .projection(counts)
                    .await?
            }
        };
        Ok(after.is_some_and(|a| length(&a, "arrived") >= length(&a, "waits_for")))
    }

    /// Counts an end step as succeeded; `true` when all have. The workflow is then closed
    /// `SUCCESS`, unless it ended otherwise first.
    #[tracing::instrument(name = "store.workflows.end", skip(self))]
    pub async fn end(&self, workflow_id: &str, step: &str) -> Result<bool, StoreError> {
        let after = self
            .workflows
            .clone_with_type::<Document>()
            .find_one_and_update(
                doc! {"_id": workflow_id, "state": TaskState::Pending.as_str()},
                doc! {"$addToSet": {"ended": step}, "$set": {"updated_at": DateTime::now()}},
            )
            .projection(doc! {"ended": 1, "ends": 1})
            .return_document(ReturnDocument::After)
            .await?;
        if after.is_none_or(|a| length(&a, "ended") < length(&a, "ends")) {
            return Ok(false);
        }
        self.close(workflow_id, TaskState::Success, None).await
    }

    /// Ends a running workflow in `state` (with the step, if one did, and the reason that ended
    /// it); `false`
    /// when it had ended already.
    #[tracing::instrument(name = "store.workflows.close", skip(self))]
    pub async fn close(
        &self,
        workflow_id: &str,
        state: TaskState,
        failed: Option<(&str, &str)>,
    ) -> Result<bool, StoreError> {
        let mut set = doc! {"state": state.as_str(), "updated_at": DateTime::now()};
        if let Some((step, reason)) = failed {
            if !step.is_empty() {
                set.insert("failed_step", step);
            }
            set.insert("reason", reason);
        }
        let closed = self
            .workflows
            .update_one(
                doc! {"_id": workflow_id, "state": TaskState::Pending.as_str()},
                doc! {"$set": set},
            )
            .await?;
        Ok(closed.modified_count == 1)
    }

    /// Runs a workflow that step `step` ended `FAILURE` again, for the step's rerun; `false`
    /// when it ended otherwise (by another step, or a cancel) or runs.
    #[tracing::instrument(name = "store.workflows.reopen", skip(self))]
    pub async fn reopen(&self, workflow_id: &str, step: &str) -> Result<bool, StoreError> {
        let reopened = self
            .workflows
            .update_one(
                doc! {
                    "_id": workflow_id,
                    "state": TaskState::Failure.as_str(),
                    "failed_step": step,
                },
                doc! {
                    "$set": {"state": TaskState::Pending.as_str(), "updated_at": DateTime::now()},
                    "$unset": {"failed_step": "", "reason": ""},
                },
            )
            .await?;
        Ok(reopened.modified_count == 1)
    }

    /// The tasks of `ids` as stored now (missing ones left out).
    pub async fn outcomes(&self, ids: &[String]) -> Result<Vec<StepOutcome>, StoreError> {
        let cursor = self
            .tasks
            .find(doc! {"_id": {"$in": ids}})
            .projection(doc! {"state": 1, "result": 1, "root_cause": 1})
            .await?;
        let found: Vec<Document> = cursor.try_collect().await?;
        Ok(found
            .into_iter()
            .filter_map(|task| {
                Some(StepOutcome {
                    task_id: task.get_str("_id").ok()?.to_owned(),
                    state: task.get_str("state").ok()?.parse().ok()?,
                    result: task.get("result").map(|r| r.clone().into_relaxed_extjson()),
                    root_cause: task.get_str("root_cause").ok().map(str::to_owned),
                })
            })
            .collect())
    }
}

/// How many items the array `field` of `document` holds.
fn length(document: &Document, field: &str) -> usize {
    document.get_array(field).map_or(0, Vec::len)
}

/// A step's task id: the workflow's id and the step's place in it.
pub fn step_id(workflow_id: &str, index: usize) -> TaskId {
    TaskId::stored(format!("{workflow_id}:{index}"))
}
