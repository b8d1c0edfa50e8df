//! `GET /task/status/{id}` and `GET /task/result/{id}`: where a task is, and what it returned.

use std::time::Instant;

use actix_web::{web, HttpResponse};
use mongodb::bson::DateTime;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{TaskId, TaskState};
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::store::TaskDocument;

/// A time as the API shows it (RFC 3339), or `None`.
pub(crate) fn timestamp(t: Option<DateTime>) -> Option<String> {
    t.and_then(|t| t.try_to_rfc3339_string().ok())
}

/// A failed attempt, as the status shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptError {
    pub attempt: u32,
    pub root_cause: String,
    /// `retry` or `dead_letter`.
    pub decision: String,
    pub retry_delay_ms: Option<u64>,
    pub at: Option<String>,
}

/// One attempt, as the status shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptInfo {
    /// 1-based.
    pub attempt: u32,
    /// The worker (`host:pid`) that ran it.
    pub worker: Option<String>,
    pub started_at: Option<String>,
    /// Absent while it runs.
    pub ended_at: Option<String>,
    /// `RETRY` or `FAILURE` for a failed attempt, `STARTED` while it runs, else the task's state.
    pub outcome: String,
    pub root_cause: Option<String>,
}

/// Progress of a sharded job, on the status of the task that planned it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobProgress {
    pub job_id: String,
    pub shards_total: u32,
    pub shards_done: usize,
    pub shards_failed: usize,
    pub items: u64,
    pub hash: String,
    pub strategy: String,
}

/// Where a task is.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskStatus {
    pub task_id: String,
    pub task_name: String,
    #[schema(value_type = String, example = "SUCCESS")]
    pub state: TaskState,
    /// `SUCCESS`, `FAILURE` or `REVOKED`: it will not change again (but for an operator's retry).
    pub ready: bool,
    /// Failed attempts so far.
    pub retries: u32,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The last error, if any.
    pub root_cause: Option<String>,
    pub parent_id: Option<String>,
    /// The workflow it is a step of (see `GET /workflow/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    pub trace_id: Option<String>,
    /// Every failed attempt, oldest first (present once there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<AttemptError>>,
    /// Every attempt that ran, oldest first: worker, start, end, outcome (failed attempts are
    /// kept 30 days).
    pub attempts: Vec<AttemptInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobProgress>,
}

fn status_of(task: &TaskDocument) -> TaskStatus {
    TaskStatus {
        task_id: task.id.to_string(),
        task_name: task.task_name.clone(),
        state: task.state,
        ready: task.state.is_final(),
        retries: task.retries,
        created_at: timestamp(Some(task.created_at)),
        updated_at: timestamp(Some(task.updated_at)),
        started_at: timestamp(task.started_at),
        finished_at: timestamp(task.finished_at),
        root_cause: task.root_cause.clone(),
        parent_id: task.parent_id.clone(),
        workflow_id: task.workflow_id.clone(),
        trace_id: task.trace_id.clone(),
        errors: None,
        attempts: Vec::new(),
        job: None,
    }
}

/// The status as MongoDB has it, with failures and job progress.
async fn load_status(state: &AppState, id: &TaskId) -> Result<Option<TaskStatus>, ApiError> {
    let Some(task) = state
        .tasks
        .get(id.as_str())
        .await
        .map_err(ApiError::store)?
    else {
        return Ok(None);
    };
    let mut status = status_of(&task);
    // Failures are looked up only for tasks that had some.
    let failed = task.retries > 0 || task.root_cause.is_some();
    let errors = if failed {
        state
            .errors
            .for_task(id.as_str())
            .await
            .map_err(ApiError::store)?
    } else {
        Vec::new()
    };
    status.attempts = crate::store::error_log::history(&task, &errors)
        .into_iter()
        .map(|a| AttemptInfo {
            attempt: a.attempt,
            worker: a.worker,
            started_at: timestamp(a.started_at),
            ended_at: timestamp(a.ended_at),
            outcome: a.outcome.as_str().to_owned(),
            root_cause: a.root_cause,
        })
        .collect();
    if failed {
        if let Some(last) = errors.last() {
            status.root_cause = Some(last.root_cause.clone());
        }
        status.errors = Some(
            errors
                .into_iter()
                .map(|e| AttemptError {
                    attempt: e.attempt,
                    root_cause: e.root_cause,
                    decision: serde_json::to_value(e.decision)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    retry_delay_ms: e.retry_delay_ms,
                    at: timestamp(Some(e.at)),
                })
                .collect(),
        );
    }
    if let Some(plan) = state
        .shards
        .planned_by(id.as_str())
        .await
        .map_err(ApiError::store)?
    {
        let states = state
            .tasks
            .states(&plan.shard_task_ids)
            .await
            .map_err(ApiError::store)?;
        let count = |wanted: TaskState| states.iter().filter(|(_, s)| *s == wanted).count();
        status.job = Some(JobProgress {
            job_id: plan.job_id,
            shards_total: plan.shards,
            shards_done: count(TaskState::Success),
            shards_failed: count(TaskState::Failure),
            items: plan.items,
            hash: plan.hash,
            strategy: plan.strategy,
        });
    }
    Ok(Some(status))
}

/// The status JSON: from Redis when a fresh copy is there, else from MongoDB (and then cached).
/// Redis being slow or down only costs the cache.
async fn status_json(state: &AppState, id: &TaskId) -> Result<Option<String>, ApiError> {
    match state.cache.status(id.as_str()).await {
        Ok(Some(json)) => return Ok(Some(json)),
        Ok(None) => {}
        Err(error) => tracing::debug!(error = %error, "status cache unavailable; reading MongoDB"),
    }
    let read_started = Instant::now();
    let Some(status) = load_status(state, id).await? else {
        return Ok(None);
    };
    let json = serde_json::to_string(&status).map_err(|e| ApiError::Internal(e.to_string()))?;
    // Only a final state is cached: it changes only by an operator's rerun, which clears the
    // key first, so the workers' claims and outcomes need no Redis call to keep readers right.
    // Job progress moves with other tasks' states, which do not clear this key.
    if status.job.is_none() && status.state.is_final() {
        if let Err(error) = state
            .cache
            .put_status(id.as_str(), &json, read_started)
            .await
        {
            tracing::debug!(error = %error, "cannot cache the status");
        }
    }
    Ok(Some(json))
}

/// One normalized state (`PENDING`, `STARTED`, `RETRY`, `SUCCESS`, `FAILURE`, `REVOKED`) with timestamps,
/// failures so far and, for a sharded job, shard progress. An id never submitted is a 404 — not
/// `PENDING`.
#[utoipa::path(
    get,
    path = "/task/status/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task's status", body = TaskStatus),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.task.status", skip(state))]
pub async fn status(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::no_task(&id);
    let id = ApiError::task_id(&id)?;
    let json = status_json(&state, &id).await?.ok_or_else(not_found)?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(json))
}

/// A finished task's result, from the result backend.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ResultAnswer {
    pub task_id: String,
    #[schema(value_type = String)]
    pub state: TaskState,
    /// The handler's return value (`SUCCESS`).
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// Why it failed (`FAILURE`).
    pub root_cause: Option<String>,
}

/// The result MongoDB recorded for a task that succeeded, while the result TTL has not passed
/// since it finished (a large one read back from `RawPayload`).
async fn recorded_result(state: &AppState, id: &TaskId) -> Result<Option<Value>, ApiError> {
    let Some(ttl) = state.result_ttl else {
        return Ok(None);
    };
    let Some(task) = state
        .tasks
        .get(id.as_str())
        .await
        .map_err(ApiError::store)?
    else {
        return Ok(None);
    };
    let expired = task.finished_at.is_some_and(|at| {
        crate::store::later(at, ttl).timestamp_millis()
            < mongodb::bson::DateTime::now().timestamp_millis()
    });
    if expired || task.state != TaskState::Success {
        return Ok(None);
    }
    let Some(result) = task.result else {
        return Ok(None);
    };
    state
        .payloads
        .resolve(result)
        .await
        .map_err(ApiError::store)
}

/// Never waits: `200` with the result once the task finished, `202` with the state while it
/// has not, `404` for an unknown id, `410` once the result's TTL passed. Needs
/// `KOBE_RESULT_BACKEND=redis`.
#[utoipa::path(
    get,
    path = "/task/result/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Finished: the result (or the failure)", body = ResultAnswer),
        (status = 202, description = "Not finished yet", body = TaskStatus),
        (status = 404, description = "No such task, or the result backend is off", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The result expired", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB or Redis unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.task.result", skip(state))]
pub async fn result(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if state.result_ttl.is_none() {
        return Err(ApiError::ResultBackendOff);
    }
    let not_found = || ApiError::no_task(&id);
    let id = ApiError::task_id(&id)?;
    let json = status_json(&state, &id).await?.ok_or_else(not_found)?;
    let status: Value =
        serde_json::from_str(&json).map_err(|e| ApiError::Internal(e.to_string()))?;
    match status["state"].as_str() {
        Some("SUCCESS") => {
            // Redis is a cache: when it cannot answer, MongoDB can.
            let stored = match state.cache.result(id.as_str()).await {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the result from Redis; reading it from MongoDB");
                    None
                }
            };
            let result: Value = match stored {
                Some(stored) => {
                    serde_json::from_str(&stored).map_err(|e| ApiError::Internal(e.to_string()))?
                }
                // Redis may have missed the write (it is a cache): MongoDB holds the result
                // until the result TTL says it expired.
                None => recorded_result(&state, &id)
                    .await?
                    .ok_or_else(|| ApiError::Gone(format!("the result of `{id}` has expired")))?,
            };
            Ok(HttpResponse::Ok().json(ResultAnswer {
                task_id: id.to_string(),
                state: TaskState::Success,
                result: Some(result),
                root_cause: None,
            }))
        }
        Some(finished @ ("FAILURE" | "REVOKED")) => Ok(HttpResponse::Ok().json(ResultAnswer {
            task_id: id.to_string(),
            state: finished.parse().map_err(ApiError::Internal)?,
            result: None,
            root_cause: status["root_cause"].as_str().map(str::to_owned),
        })),
        _ => Ok(HttpResponse::Accepted()
            .content_type("application/json")
            .body(json)),
    }
}
