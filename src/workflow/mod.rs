//! Workflows: chains, groups and chords of tasks, each step a task of its own.
//!
//! A workflow is recorded whole before anything runs (`Workflows`, one `WorkflowSteps` document
//! per step, its `_id` the step's task id). Its first steps are submitted at once; every other
//! step is submitted by whoever records the last outcome it waits for: the worker, after the
//! outcome is stored and before the delivery is acked. That hand-on is idempotent at each
//! stage — an arrival is counted once per member ([`WorkflowRepository::arrive`]), a step's task
//! id is fixed, so its submission is [`Submitter::submit_child`]'s — and it is redone by a
//! redelivery of the finished step, so a worker killed between the outcome and the submission
//! costs a delay, never a step. A chord's join is one write per member: no polling, no unlock
//! task.
//!
//! A step that fails for good ends the workflow `FAILURE`: no later step is submitted (they read
//! `REVOKED`, with the reason), running siblings finish, and the `on_failure` step is submitted
//! once with the failed step's task id and root cause.

pub mod build;
pub mod celery;
pub mod shape;

use std::collections::HashMap;

use mongodb::bson::DateTime;
use serde::Serialize;
use serde_json::Value;

use crate::domain::{TaskId, TaskState};
use crate::store::workflows::{
    step_id, StepDocument, StepOutcome, StepTask, WorkflowDocument, WorkflowRepository,
};
use crate::store::{PayloadRepository, StoreError, TaskRepository};
use crate::submit::{NewTask, SubmitError, Submitter};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;
use shape::{Input, Planned};

/// Records workflows, starts them and hands each on as its steps finish.
#[derive(Clone)]
pub struct Workflows {
    repository: WorkflowRepository,
    payloads: PayloadRepository,
    submitter: Submitter,
    /// To rerun a first step the broker did not take, when the start is sent again.
    tasks: TaskRepository,
    /// To close the steps not submitted yet when the workflow is cancelled.
    leases: crate::store::task_leases::LeaseRepository,
}

/// A workflow checked step by step, ready to start.
#[derive(Clone)]
pub struct Checked {
    pub id: String,
    /// Each step of the plan with the task it submits.
    pub steps: Vec<(Planned, StepTask)>,
    /// The steps' own `on_failure` tasks, by step index.
    pub on_step_failure: HashMap<usize, StepTask>,
    pub on_failure: Option<StepTask>,
    /// The start's trace: every step's task is traced as its child.
    pub trace: TraceContext,
}

/// A workflow as a client sees it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct WorkflowView {
    pub workflow_id: String,
    /// `PENDING`, `STARTED`, `SUCCESS`, `FAILURE` or `REVOKED`.
    pub state: String,
    /// The step whose failure (or cancel) ended it, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub steps: Vec<StepView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct StepView {
    pub path: String,
    pub task_id: String,
    pub task_name: String,
    /// The task's state; a step not submitted yet is `PENDING`, or `REVOKED` once the workflow
    /// ended without it.
    pub state: String,
    /// Whether its task was submitted.
    pub submitted: bool,
    /// The steps it waits for, by task id.
    pub waits_for: Vec<String>,
}

/// The prefix of every workflow id.
pub const ID_PREFIX: &str = "wf-";

/// The id of the workflow a start with idempotency key `key` makes: the same key, the same
/// workflow (a start sent again, a schedule's slot fired twice).
pub(crate) fn id_for_key(key: &str) -> String {
    let digest = crate::domain::fingerprint::Fingerprint::of_key("workflow", key);
    let hex = digest.as_str().rsplit(':').next().unwrap_or_default();
    format!("{ID_PREFIX}{}", &hex[..32])
}

/// A new workflow id, for a start without a key.
pub(crate) fn new_id() -> String {
    format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple())
}

impl Workflows {
    pub fn new(db: &mongodb::Database, payloads: PayloadRepository, submitter: Submitter) -> Self {
        Self {
            repository: WorkflowRepository::new(db),
            payloads,
            submitter,
            tasks: TaskRepository::new(db),
            leases: crate::store::task_leases::LeaseRepository::new(db),
        }
    }

    /// Records the workflow and submits its first steps, each confirmed by the broker; `false`
    /// when it was recorded before (same id: its start is finished now, nothing doubled).
    #[tracing::instrument(name = "workflow.start", skip_all, fields(workflow_id = %checked.id))]
    pub async fn start(&self, checked: Checked) -> Result<bool, SubmitError> {
        let now = DateTime::now();
        let id = checked.id;
        let task_id = |i: usize| step_id(&id, i).to_string();
        let mut joins = shape::joins(checked.steps.iter().map(|(planned, _)| planned));
        let steps: Vec<StepDocument> = checked
            .steps
            .iter()
            .enumerate()
            .map(|(index, (planned, task))| StepDocument {
                task_id: task_id(index),
                workflow_id: id.clone(),
                index: index as u32,
                path: planned.path.clone(),
                task: task.clone(),
                immutable: planned.immutable,
                input: serde_json::to_value(&planned.input).unwrap_or_default(),
                waits_for: planned.waits_for().into_iter().map(task_id).collect(),
                next: planned.next.iter().copied().map(task_id).collect(),
                joins: joins[index]
                    .iter()
                    .map(|&(join, _)| task_id(join))
                    .collect(),
                join_slots: std::mem::take(&mut joins[index])
                    .into_iter()
                    .map(|(_, slot)| slot)
                    .collect(),
                on_failure: checked.on_step_failure.get(&index).cloned(),
            })
            .collect();
        let workflow = WorkflowDocument {
            id: id.clone(),
            state: TaskState::Pending,
            steps: steps.len() as u32,
            ends: shape::ends(checked.steps.iter().map(|(planned, _)| planned))
                .into_iter()
                .map(task_id)
                .collect(),
            ended: Vec::new(),
            failed_step: None,
            reason: None,
            on_failure: checked.on_failure,
            traceparent: Some(checked.trace.to_string()),
            reopens: 0,
            created_at: now,
            updated_at: now,
        };
        let new = self.repository.insert(&workflow, &steps).await?;
        let first = steps.iter().filter(|s| s.waits_for.is_empty());
        if !new {
            // A start sent again: finish what the first one may have left, one idempotent
            // submission at a time, and run again a first step the broker did not take then.
            let ids: Vec<String> = first.clone().map(|s| s.task_id.clone()).collect();
            let outcomes = self.outcomes_by_id(&ids).await?;
            for step in first {
                match outcomes.get(&step.task_id) {
                    Some(refused) if refused.state == TaskState::Failure && refused.refused => {
                        self.rerun_refused(&step.task_id).await?
                    }
                    _ => self.submit(&id, step, Vec::new(), checked.trace).await?,
                }
            }
            return Ok(false);
        }
        metrics().workflows.with_label_values(&["STARTED"]).inc();
        // A new workflow's first steps share insert commands and pipelined confirms (a group of
        // a thousand is one batch, not a thousand round trips).
        let tasks: Vec<NewTask> = first
            .clone()
            .map(|step| self.step_task(&id, step, Vec::new(), checked.trace))
            .collect();
        let answers = self.submitter.submit_many(tasks).await;
        // A first step the broker did not take is closed as never run. The workflow does not
        // fail for it (nothing of it is run for a start answered 503, `on_failure` included):
        // it waits, and the start sent again with its key runs that step.
        match answers.into_iter().find_map(Result::err) {
            Some(error) => Err(error),
            None => Ok(true),
        }
    }

    /// Runs again a step closed unrun when the broker did not take it, as its next attempt.
    async fn rerun_refused(&self, task_id: &str) -> Result<(), SubmitError> {
        use crate::store::attempts::Reopened;
        let task = match self
            .tasks
            .reopen(task_id, "workflow start sent again")
            .await?
        {
            Reopened::Now(task) | Reopened::Unpublished(task) => task,
            Reopened::MovedOn(_) | Reopened::Missing => return Ok(()),
        };
        self.submitter.republish(&task).await
    }

    /// The tasks of these steps as stored now, by task id (steps not submitted are missing).
    async fn outcomes_by_id(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, StepOutcome>, StoreError> {
        Ok(self
            .repository
            .outcomes(ids)
            .await?
            .into_iter()
            .map(|o| (o.task_id.clone(), o))
            .collect())
    }

    /// The workflows changed last, newest first (for the page).
    pub async fn recent(&self, limit: i64) -> Result<Vec<WorkflowDocument>, StoreError> {
        self.repository.recent(limit).await
    }

    /// The workflow and each step's state.
    pub async fn show(&self, id: &str) -> Result<Option<WorkflowView>, StoreError> {
        let Some(workflow) = self.repository.get(id).await? else {
            return Ok(None);
        };
        let steps = self.repository.steps(id).await?;
        let ids: Vec<String> = steps.iter().map(|s| s.task_id.clone()).collect();
        let outcomes = self.outcomes_by_id(&ids).await?;
        let ended = workflow.state != TaskState::Pending;
        let state = if ended {
            workflow.state
        } else if outcomes.values().any(|o| o.state != TaskState::Pending) {
            TaskState::Started
        } else {
            TaskState::Pending
        };
        Ok(Some(WorkflowView {
            workflow_id: workflow.id,
            state: state.as_str().to_owned(),
            failed_step: workflow.failed_step,
            reason: workflow.reason,
            steps: steps
                .into_iter()
                .map(|step| {
                    let outcome = outcomes.get(&step.task_id);
                    let state = match outcome {
                        Some(outcome) => outcome.state,
                        None if ended => TaskState::Revoked,
                        None => TaskState::Pending,
                    };
                    StepView {
                        path: step.path,
                        task_id: step.task_id,
                        task_name: step.task.task_name,
                        state: state.as_str().to_owned(),
                        submitted: outcome.is_some(),
                        waits_for: step.waits_for,
                    }
                })
                .collect(),
        }))
    }

    /// Ends a running workflow `REVOKED`, so no later step is submitted; returns its state now
    /// and the task ids of its steps whose tasks exist and have not finished, for the caller to
    /// cancel. `None`: no such workflow.
    pub async fn revoke(
        &self,
        id: &str,
        by: &str,
    ) -> Result<Option<(TaskState, Vec<String>)>, StoreError> {
        let Some(workflow) = self.repository.get(id).await? else {
            return Ok(None);
        };
        let mut state = workflow.state;
        if state == TaskState::Pending {
            let reason = format!("cancelled by {by}");
            if self
                .repository
                .close(id, TaskState::Revoked, Some(("", &reason)))
                .await?
            {
                metrics().workflows.with_label_values(&["REVOKED"]).inc();
                tracing::info!(workflow_id = id, by, "workflow cancelled");
                state = TaskState::Revoked;
            } else if let Some(ended) = self.repository.get(id).await? {
                // It ended otherwise meanwhile.
                state = ended.state;
            }
        }
        let steps = self.repository.steps(id).await?;
        let ids: Vec<String> = steps.iter().map(|s| s.task_id.clone()).collect();
        let outcomes = self.repository.outcomes(&ids).await?;
        let submitted: std::collections::HashSet<&str> =
            outcomes.iter().map(|o| o.task_id.as_str()).collect();
        let mut running: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.state.is_final())
            .map(|o| o.task_id.clone())
            .collect();
        if state == TaskState::Revoked {
            // A step being handed on right now checked the workflow before it was closed, and
            // its task may be recorded after the list above: close its first attempt as
            // cancelled first, so whatever submits it later never runs it. A close refused
            // means its task was recorded meanwhile: cancelled as the others are.
            let request = crate::store::tasks::OperatorRequest {
                at: DateTime::now(),
                by: by.to_owned(),
            };
            let unsubmitted: Vec<(&str, &str)> = steps
                .iter()
                .filter(|s| !submitted.contains(s.task_id.as_str()))
                .map(|s| (s.task_id.as_str(), s.task.task_name.as_str()))
                .collect();
            running.extend(
                self.leases
                    .close_first(&unsubmitted, TaskState::Revoked, &request)
                    .await?,
            );
        }
        Ok(Some((state, running)))
    }

    /// Hands the workflow on after step `task_id`'s outcome was stored: the steps waiting for
    /// it when it succeeded, the workflow's end when it was the last, its failure (and
    /// `on_failure`) when it failed for good. Safe to call again for the same outcome, from any
    /// worker, at any time after it.
    #[tracing::instrument(name = "workflow.advance", skip(self))]
    pub async fn advance(&self, workflow_id: &str, task_id: &str) -> Result<(), SubmitError> {
        // Both asked at once: a member of a large group waits one round trip, not two.
        let ids = [task_id.to_owned()];
        let (outcome, step) = tokio::join!(
            self.repository.outcomes(&ids),
            self.repository.step(task_id)
        );
        let Some(outcome) = outcome?.pop() else {
            return Ok(());
        };
        let step = step?;
        match outcome.state {
            TaskState::Success => {
                let Some(step) = step else {
                    return Ok(());
                };
                if step.next.is_empty() && self.repository.end(workflow_id, task_id).await? {
                    metrics().workflows.with_label_values(&["SUCCESS"]).inc();
                    tracing::info!(workflow_id, "workflow succeeded");
                }
                for next in &step.next {
                    // A step that waits for this one alone needs no count: its fixed id makes
                    // its submission once.
                    let ready = match step.joins.iter().position(|j| j == next) {
                        None => true,
                        Some(i) => {
                            let slot = step.join_slots.get(i).copied().unwrap_or_default();
                            self.repository.arrive(next, slot).await?
                        }
                    };
                    if ready {
                        let joined = std::time::Instant::now();
                        if let Err(error) = self.submit_next(workflow_id, next, &outcome).await {
                            if !error.is_permanent() {
                                return Err(error);
                            }
                            // It can never be submitted (an id or arguments no store takes):
                            // the workflow fails with it, rather than its hand-on being tried
                            // for ever.
                            let failed = StepOutcome {
                                task_id: next.clone(),
                                state: TaskState::Failure,
                                result: None,
                                root_cause: Some(format!("cannot be submitted: {error}")),
                                refused: false,
                            };
                            return self.fail(workflow_id, &failed, None).await;
                        }
                        metrics()
                            .workflow_join_duration
                            .with_label_values::<&str>(&[])
                            .observe(joined.elapsed().as_secs_f64());
                    }
                }
                Ok(())
            }
            // A step whose submission was refused has not failed: the workflow waits for its
            // start to be sent again.
            TaskState::Failure if outcome.refused => Ok(()),
            TaskState::Failure | TaskState::Revoked => {
                self.fail(workflow_id, &outcome, step.as_ref()).await
            }
            _ => Ok(()),
        }
    }

    /// Submits what a Celery client's canvas (`embed`, on task `task_id`'s message) asks to
    /// run after the task's final outcome: the chain's next task and the callbacks after a
    /// success, the errbacks after a failure. Idempotent, as [`Workflows::advance`] is.
    #[tracing::instrument(name = "workflow.celery_canvas", skip(self, embed))]
    pub async fn celery_canvas(&self, task_id: &str, embed: &Value) -> Result<(), SubmitError> {
        let Some(outcome) = self.repository.outcomes(&[task_id.to_owned()]).await?.pop() else {
            return Ok(());
        };
        let next = match outcome.state {
            TaskState::Success => {
                let result = self.result_of(outcome).await?;
                celery::after_success(embed, task_id, &result)
            }
            TaskState::Failure => celery::after_failure(embed, task_id),
            _ => Vec::new(),
        };
        for next in next {
            let id =
                TaskId::parse(&next.id).map_err(|_| SubmitError::InvalidId(next.id.clone()))?;
            // The signature's own queue, as Celery would send it, where it is one of Kobe's
            // routes (named as the route or as its queue); else the task's configured route.
            let topology = self.submitter.topology();
            let route = match next.queue.as_deref().map(|q| topology.route_for_key(q)) {
                Some(route) if topology.routes().iter().any(|r| r == route) => route.to_owned(),
                Some(unknown) => {
                    tracing::warn!(queue = unknown, task = %next.task_name, "a Celery signature names a queue Kobe has no route for; sent on the task's own route");
                    topology.route_of(&next.task_name).to_owned()
                }
                None => topology.route_of(&next.task_name).to_owned(),
            };
            let mut task = NewTask::new(id, &next.task_name, &route);
            task.args = next.args;
            task.kwargs = next.kwargs;
            task.parent_id = Some(task_id.to_owned());
            task.embed = next.embed;
            self.submitter.submit_child(task).await?;
        }
        Ok(())
    }

    /// Ends the workflow with `failed`'s failure and submits `on_failure` once (again, after a
    /// crash, for the step that ended it: the submission is idempotent); a step that failed for
    /// good has its own `on_failure` submitted once too, whether or not it ended the workflow.
    async fn fail(
        &self,
        workflow_id: &str,
        failed: &StepOutcome,
        step: Option<&StepDocument>,
    ) -> Result<(), SubmitError> {
        let cause = failed
            .root_cause
            .clone()
            .unwrap_or_else(|| format!("step ended {}", failed.state));
        let errback = |id: String, on_failure: &StepTask, trace| {
            let mut task = new_task(TaskId::stored(id), workflow_id, on_failure, trace);
            task.args = vec![
                Value::from(failed.task_id.clone()),
                Value::from(cause.clone()),
            ];
            task.args.extend(on_failure.args.iter().cloned());
            task.parent_id = Some(failed.task_id.clone());
            task
        };
        let reason = format!("step {} ended {}: {cause}", failed.task_id, failed.state);
        if self
            .repository
            .close(
                workflow_id,
                TaskState::Failure,
                Some((&failed.task_id, &reason)),
            )
            .await?
        {
            metrics().workflows.with_label_values(&["FAILURE"]).inc();
            tracing::warn!(workflow_id, failed_step = %failed.task_id, root_cause = %cause, "workflow failed");
        }
        let Some(workflow) = self.repository.get(workflow_id).await? else {
            return Ok(());
        };
        if let Some(on_failure) = step
            .filter(|_| failed.state == TaskState::Failure && workflow.state != TaskState::Revoked)
            .and_then(|s| s.on_failure.as_ref())
        {
            let id = format!("{}:on_failure", failed.task_id);
            self.submitter
                .submit_child(errback(id, on_failure, trace_of(&workflow)))
                .await?;
        }
        if workflow.failed_step.as_deref() != Some(failed.task_id.as_str()) {
            return Ok(());
        }
        let Some(on_failure) = workflow.on_failure.clone() else {
            return Ok(());
        };
        // Once per failure of the workflow: a failure after a rerun reopened it submits its own.
        let id = match workflow.reopens {
            0 => format!("{workflow_id}:on_failure"),
            n => format!("{workflow_id}:on_failure:{n}"),
        };
        self.submitter
            .submit_child(errback(id, &on_failure, trace_of(&workflow)))
            .await
    }

    /// Runs the workflow again for the rerun of step `task_id`, when that step's failure ended
    /// it; `false` when it ended otherwise (another step, a cancel) or runs. A step that failed
    /// (or was cancelled) while it was ended fails it again at once, rather than leaving it to
    /// wait for a step that will not come.
    pub async fn reopen(&self, workflow_id: &str, task_id: &str) -> Result<bool, SubmitError> {
        if !self.repository.reopen(workflow_id, task_id).await? {
            return Ok(false);
        }
        self.reopened(workflow_id, task_id).await?;
        Ok(true)
    }

    async fn reopened(&self, workflow_id: &str, task_id: &str) -> Result<(), SubmitError> {
        let steps = self.repository.steps(workflow_id).await?;
        let ids: Vec<String> = steps
            .iter()
            .map(|s| s.task_id.clone())
            .filter(|id| id != task_id)
            .collect();
        let failed = self
            .repository
            .outcomes(&ids)
            .await?
            .into_iter()
            .find(|o| matches!(o.state, TaskState::Failure | TaskState::Revoked));
        match failed {
            Some(failed) => {
                let step = steps.iter().find(|s| s.task_id == failed.task_id);
                self.fail(workflow_id, &failed, step).await
            }
            None => Ok(()),
        }
    }

    /// Submits the step `step_id`, every step it waits for having succeeded, with their results.
    /// `known`: the outcome that made it ready, not read again.
    async fn submit_next(
        &self,
        workflow_id: &str,
        step_id: &str,
        known: &StepOutcome,
    ) -> Result<(), SubmitError> {
        let (workflow, step) = tokio::join!(
            self.repository.get(workflow_id),
            self.repository.step(step_id)
        );
        let Some(workflow) = workflow?.filter(|w| w.state == TaskState::Pending) else {
            // Ended (failed or cancelled) meanwhile: later steps never run.
            return Ok(());
        };
        let Some(step) = step? else {
            return Ok(());
        };
        let others: Vec<String> = step
            .waits_for
            .iter()
            .filter(|w| **w != known.task_id)
            .cloned()
            .collect();
        let mut outcomes = vec![known.clone()];
        if !others.is_empty() {
            outcomes.extend(self.repository.outcomes(&others).await?);
        }
        let mut results: HashMap<String, Value> = HashMap::new();
        for outcome in outcomes {
            let id = outcome.task_id.clone();
            results.insert(id, self.result_of(outcome).await?);
        }
        let input: Input = serde_json::from_value(step.input.clone()).unwrap_or(Input::Nothing);
        let given = input.value(&|index| {
            results
                .get(crate::store::workflows::step_id(workflow_id, index).as_str())
                .cloned()
                .unwrap_or(Value::Null)
        });
        let received = if step.immutable || input == Input::Nothing {
            Vec::new()
        } else {
            vec![given]
        };
        self.submit(workflow_id, &step, received, trace_of(&workflow))
            .await
    }

    /// What a finished step returned, read from `RawPayload` when it was kept there.
    async fn result_of(&self, outcome: StepOutcome) -> Result<Value, StoreError> {
        let result = outcome.result.unwrap_or(Value::Null);
        Ok(self.payloads.resolve(result).await?.unwrap_or(Value::Null))
    }

    /// Submits a step's task, `received` before its own arguments.
    async fn submit(
        &self,
        workflow_id: &str,
        step: &StepDocument,
        received: Vec<Value>,
        trace: TraceContext,
    ) -> Result<(), SubmitError> {
        let task = self.step_task(workflow_id, step, received, trace);
        self.submitter.submit_child(task).await
    }

    /// A step's task, `received` before its own arguments.
    fn step_task(
        &self,
        workflow_id: &str,
        step: &StepDocument,
        received: Vec<Value>,
        trace: TraceContext,
    ) -> NewTask {
        let mut task = new_task(
            TaskId::stored(step.task_id.clone()),
            workflow_id,
            &step.task,
            trace,
        );
        task.args = received;
        task.args.extend(step.task.args.iter().cloned());
        task.parent_id = step.waits_for.last().cloned();
        task
    }
}

/// The trace a workflow's steps are children of (a new one for a workflow recorded without).
fn trace_of(workflow: &WorkflowDocument) -> TraceContext {
    workflow
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse)
        .unwrap_or_else(TraceContext::new_root)
}

/// A step's task, marked as the workflow's and traced under its start.
fn new_task(id: TaskId, workflow_id: &str, step: &StepTask, trace: TraceContext) -> NewTask {
    let mut task = NewTask::new(id, &step.task_name, &step.route);
    task.trace = trace.child();
    task.kwargs = step.kwargs.clone();
    task.priority = step.priority;
    task.root_id = Some(workflow_id.to_owned());
    task.workflow_id = Some(workflow_id.to_owned());
    task.hard_time_limit = step.hard_time_limit.map(std::time::Duration::from_secs_f64);
    task.soft_time_limit = step.soft_time_limit.map(std::time::Duration::from_secs_f64);
    let from_now = |seconds: f64| {
        DateTime::from_millis(DateTime::now().timestamp_millis() + (seconds * 1000.0) as i64)
    };
    task.eta = step.eta.or(step.countdown_s.map(from_now));
    task.expires = step.expires.or(step.expires_in_s.map(from_now));
    task
}
