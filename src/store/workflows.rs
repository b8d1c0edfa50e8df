//! `Workflows`, `WorkflowSteps` and `WorkflowJoins`: a workflow's state, each step's task and
//! what it waits for, and for each step that waits for several, who has arrived. A step's `_id`
//! is its task's id, so submitting it is idempotent; a member's arrival at the step after it is
//! one conditional write to a small document of its own (a bit per member and a count), which
//! counts it once.

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
pub(crate) const WORKFLOW_JOINS: &str = "WorkflowJoins";

/// Members one word of a join's bitmap holds (an `i64`, its sign bit and a few more unused).
const SLOTS_PER_WORD: u32 = 60;

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
    /// How many times a rerun of the step that failed it ran it again: each failure after one
    /// submits `on_failure` anew.
    #[serde(default)]
    pub reopens: u32,
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
    /// A countdown (seconds), counted from when the step is submitted, as Celery counts a
    /// signature's: a later step's countdown does not run out while the steps before it run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub countdown_s: Option<f64>,
    /// `expires` given in seconds, counted from when the step is submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<f64>,
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
    /// Its place among what each of `joins` waits for (same order as `joins`).
    #[serde(default)]
    pub join_slots: Vec<u32>,
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
    /// Its submission was refused (the broker did not take it): closed so that it never runs,
    /// and the start sent again runs it.
    pub refused: bool,
}

#[derive(Clone)]
pub struct WorkflowRepository {
    workflows: Collection<WorkflowDocument>,
    steps: Collection<StepDocument>,
    joins: Collection<Document>,
    tasks: super::TaskRepository,
}

impl WorkflowRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            workflows: db.collection(WORKFLOWS),
            steps: db.collection(WORKFLOW_STEPS),
            joins: db.collection(WORKFLOW_JOINS),
            tasks: super::TaskRepository::new(db),
        }
    }

    /// Records a workflow, its steps and a join for each step that waits for several; `false`
    /// when a workflow of that id was recorded before (its steps and joins are written again
    /// where missing, so a start cut short can be finished).
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
        let joins: Vec<Document> = steps
            .iter()
            .filter(|s| s.waits_for.len() > 1)
            .map(|s| {
                let mut join = doc! {
                    "_id": &s.task_id,
                    "workflow_id": &s.workflow_id,
                    "needs": s.waits_for.len() as i64,
                    "count": 0i64,
                };
                for word in 0..(s.waits_for.len() as u32).div_ceil(SLOTS_PER_WORD) {
                    join.insert(format!("b{word}"), 0i64);
                }
                join
            })
            .collect();
        let (steps, joins) = tokio::join!(
            async { self.steps.insert_many(steps).ordered(false).await },
            async {
                if joins.is_empty() {
                    return Ok(None);
                }
                self.joins.insert_many(joins).ordered(false).await.map(Some)
            }
        );
        for written in [steps.map(drop), joins.map(drop)] {
            match written {
                Ok(()) => {}
                Err(e) if is_duplicate_key(&e) && !new => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(new)
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

    /// Counts the member in `slot` as arrived at join `step`, once however often it is told;
    /// `true` when every member has arrived. One round trip on a document of a few words (two
    /// when it had arrived already), so the members of a large group do not queue behind the
    /// rewrite of a growing list.
    #[tracing::instrument(name = "store.workflows.arrive", skip(self))]
    pub async fn arrive(&self, step: &str, slot: u32) -> Result<bool, StoreError> {
        let word = format!("b{}", slot / SLOTS_PER_WORD);
        let bit = slot % SLOTS_PER_WORD;
        let counts = doc! {"count": 1, "needs": 1};
        let after = self
            .joins
            .find_one_and_update(
                doc! {"_id": step, &word: {"$bitsAllClear": [bit]}},
                doc! {"$bit": {&word: {"or": 1i64 << bit}}, "$inc": {"count": 1i64}},
            )
            .projection(counts.clone())
            .return_document(ReturnDocument::After)
            .await?;
        let after = match after {
            Some(after) => Some(after),
            // Told before: whether it is complete is what it says now.
            None => {
                self.joins
                    .find_one(doc! {"_id": step})
                    .projection(counts)
                    .await?
            }
        };
        let number = |d: &Document, field: &str| {
            d.get_i64(field)
                .or_else(|_| d.get_i32(field).map(i64::from))
                .unwrap_or(0)
        };
        Ok(after.is_some_and(|a| number(&a, "count") >= number(&a, "needs")))
    }

    /// Counts an end step as succeeded, whatever the workflow's state (one that failed meanwhile
    /// may be reopened by a rerun, and must not wait for this step again); `true` when all have.
    /// The workflow is then closed `SUCCESS`, unless it ended otherwise first.
    #[tracing::instrument(name = "store.workflows.end", skip(self))]
    pub async fn end(&self, workflow_id: &str, step: &str) -> Result<bool, StoreError> {
        let documents = self.workflows.clone_with_type::<Document>();
        // Pushed only where it is not counted yet (an `$addToSet` that finds its value already
        // there corrupts the document on some engines); counted before, it is read as it is,
        // so a hand-on done again still closes a workflow a crash left open.
        let counted = documents
            .find_one_and_update(
                doc! {"_id": workflow_id, "ended": {"$ne": step}},
                doc! {"$push": {"ended": step}, "$set": {"updated_at": DateTime::now()}},
            )
            .projection(doc! {"ended": 1, "ends": 1})
            .return_document(ReturnDocument::After)
            .await?;
        let after = match counted {
            Some(after) => Some(after),
            None => {
                documents
                    .find_one(doc! {"_id": workflow_id})
                    .projection(doc! {"ended": 1, "ends": 1})
                    .await?
            }
        };
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
                    "$inc": {"reopens": 1},
                },
            )
            .await?;
        Ok(reopened.modified_count == 1)
    }

    /// The tasks of `ids` as the read model has them now, the running attempts aside (missing
    /// ones left out).
    pub async fn outcomes(&self, ids: &[String]) -> Result<Vec<StepOutcome>, StoreError> {
        Ok(self
            .tasks
            .current_of(ids)
            .await?
            .into_iter()
            .map(|task| StepOutcome {
                task_id: task.id.to_string(),
                state: task.state,
                // Closed by the submitter, or by a worker that met its closed lease first.
                refused: task.refused_at.is_some()
                    || task.root_cause.as_deref() == Some(super::tasks::REFUSED),
                result: task.result,
                root_cause: task.root_cause,
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
