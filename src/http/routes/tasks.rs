//! `/task/*`: submit a task, read its status.

use actix_web::{web, HttpRequest, HttpResponse};
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::commands::submit::{NewTask, SubmitError};
use crate::domain::{Fingerprint, Priority, TaskId, TaskState};
use crate::http::{ApiError, AppState};
use crate::store::{Claim, TaskDocument};
use crate::telemetry::trace::TraceContext;

/// Body of `POST /task/start`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStart {
    pub task_name: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// 0 (lowest) to 9 (highest).
    #[serde(default)]
    pub priority: Option<i64>,
    /// A client key: submissions with the same key (and task name) create one task.
    #[serde(default)]
    pub dedup_key: Option<String>,
    /// Without a key: submissions with the same task name and arguments create one task.
    #[serde(default)]
    pub dedup: Option<bool>,
}

/// Longest accepted idempotency key.
const MAX_KEY_LEN: usize = 256;

/// Parses JSON into `T`, naming the field that failed.
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::MalformedBody(inner.to_string());
        }
        let message = inner.to_string();
        // serde names missing and unknown fields only in its message: "missing field `x`".
        let named = message.split('`').nth(1).filter(|_| {
            message.starts_with("missing field") || message.starts_with("unknown field")
        });
        let field = match (path.as_str(), named) {
            (".", Some(name)) => name.to_owned(),
            (".", None) => "body".to_owned(),
            (path, Some(name)) if message.starts_with("missing") => format!("{path}.{name}"),
            (path, _) => path.to_owned(),
        };
        let reason = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        ApiError::validation(field, reason)
    })
}

#[derive(Debug, Serialize)]
struct Accepted {
    task_id: String,
}

#[derive(Debug, Serialize)]
struct Deduplicated {
    task_id: String,
    deduplicated: bool,
}

/// `POST /task/start`: record the task (`PENDING`), publish it, wait for the broker's confirm,
/// answer `202 {"task_id"}`. A repeated submission (same `Idempotency-Key`, `dedup_key`, or with
/// `"dedup": true` the same arguments) answers `200` with the first task's id and enqueues nothing.
#[tracing::instrument(name = "http.task.start", skip_all, fields(task = tracing::field::Empty, task_id = tracing::field::Empty, trace_id = tracing::field::Empty))]
pub async fn start(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // Join the caller's trace if it sent one; the task's message continues it.
    let trace = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|parent| parent.child())
        .unwrap_or_else(TraceContext::new_root);
    let submission: TaskStart = parse_body(&body)?;
    let span = tracing::Span::current();
    span.record("task", submission.task_name.as_str());
    span.record("trace_id", trace.trace_id_hex());

    let task = state.registry.get(&submission.task_name).ok_or_else(|| {
        ApiError::validation(
            "task_name",
            format!(
                "unknown task `{}`; registered tasks: {}",
                submission.task_name,
                state.registry.names().join(", ")
            ),
        )
    })?;
    task.validate(&submission.args, &submission.kwargs)
        .map_err(|e| ApiError::validation(e.field, e.reason))?;
    let priority = match submission.priority {
        Some(p) => Priority::new(p).map_err(|reason| ApiError::validation("priority", reason))?,
        None => Priority::default(),
    };
    let fingerprint = fingerprint(&request, &submission)?;

    let id = TaskId::generate();
    span.record("task_id", id.as_str());
    if let Some(fingerprint) = &fingerprint {
        let claim = state
            .dedup
            .claim(fingerprint.as_str(), id.as_str(), state.dedup_window)
            .await
            .map_err(ApiError::mongodb)?;
        if let Claim::Existing { task_id } = claim {
            tracing::info!(first_task_id = %task_id, "duplicate submission answered with the first task");
            return Ok(HttpResponse::Ok().json(Deduplicated {
                task_id,
                deduplicated: true,
            }));
        }
    }

    let route = state.submitter.topology().route_of(task.name()).to_owned();
    let mut new = NewTask::new(id.clone(), task.name(), &route);
    new.args = submission.args;
    new.kwargs = submission.kwargs;
    new.priority = priority;
    new.trace = trace;
    if let Err(error) = state.submitter.submit(new).await {
        if let Some(fingerprint) = &fingerprint {
            // Not accepted, so the next identical submission must be free to try again.
            if let Err(e) = state.dedup.release(fingerprint.as_str(), id.as_str()).await {
                tracing::warn!(error = %e, "cannot release the dedup fingerprint");
            }
        }
        tracing::warn!(error = %error, "task not accepted");
        return Err(match error {
            SubmitError::Store(e) => ApiError::mongodb(e),
            SubmitError::NotPublished(e) => ApiError::broker(e, Some(id.to_string())),
        });
    }

    state
        .metrics
        .tasks_submitted
        .with_label_values(&[task.name()])
        .inc();
    tracing::info!("task accepted");
    Ok(HttpResponse::Accepted().json(Accepted {
        task_id: id.to_string(),
    }))
}

/// The submission's dedup fingerprint, if it asks for dedup: the `Idempotency-Key` header wins
/// over `dedup_key`, which wins over `"dedup": true`.
fn fingerprint(
    request: &HttpRequest,
    submission: &TaskStart,
) -> Result<Option<Fingerprint>, ApiError> {
    let key = |field: &str, value: &str| -> Result<Fingerprint, ApiError> {
        if value.is_empty() || value.len() > MAX_KEY_LEN {
            return Err(ApiError::validation(
                field,
                format!("must be 1–{MAX_KEY_LEN} characters"),
            ));
        }
        Ok(Fingerprint::of_key(&submission.task_name, value))
    };
    if let Some(header) = request.headers().get("Idempotency-Key") {
        let value = header
            .to_str()
            .map_err(|_| ApiError::validation("Idempotency-Key", "must be visible ASCII"))?;
        return key("Idempotency-Key", value).map(Some);
    }
    if let Some(value) = &submission.dedup_key {
        return key("dedup_key", value).map(Some);
    }
    Ok(submission.dedup.unwrap_or(false).then(|| {
        Fingerprint::of_arguments(&submission.task_name, &submission.args, &submission.kwargs)
    }))
}

fn timestamp(t: Option<DateTime>) -> Value {
    t.and_then(|t| t.try_to_rfc3339_string().ok())
        .map(Value::String)
        .unwrap_or(Value::Null)
}

/// `GET /task/status/{id}`: the task's state from MongoDB, with its failures so far and, for a
/// sharded job, how many shards are done. An id never submitted is a 404.
#[tracing::instrument(name = "http.task.status", skip(state))]
pub async fn status(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("no task with id `{id}`"));
    let id = TaskId::parse(&id).map_err(|_| not_found())?;
    let task = state
        .tasks
        .get(id.as_str())
        .await
        .map_err(ApiError::mongodb)?
        .ok_or_else(not_found)?;
    let mut body = status_body(&task);

    // Failures are looked up only for tasks that had some.
    if task.retries > 0 || task.root_cause.is_some() {
        let errors = state
            .errors
            .for_task(id.as_str())
            .await
            .map_err(ApiError::mongodb)?;
        if let Some(last) = errors.last() {
            body["root_cause"] = json!(last.root_cause);
        }
        body["errors"] = errors
            .iter()
            .map(|e| {
                json!({
                    "attempt": e.attempt,
                    "root_cause": e.root_cause,
                    "decision": e.decision,
                    "retry_delay_ms": e.retry_delay_ms,
                    "at": timestamp(Some(e.at)),
                })
            })
            .collect();
    }
    if let Some(plan) = state
        .shards
        .planned_by(id.as_str())
        .await
        .map_err(ApiError::mongodb)?
    {
        let states = state
            .tasks
            .states(&plan.shard_task_ids)
            .await
            .map_err(ApiError::mongodb)?;
        let count = |wanted: TaskState| states.iter().filter(|(_, s)| *s == wanted).count();
        body["job"] = json!({
            "job_id": plan.job_id,
            "shards_total": plan.shards,
            "shards_done": count(TaskState::Success),
            "shards_failed": count(TaskState::Failure),
            "items": plan.items,
            "hash": plan.hash,
            "strategy": plan.strategy,
        });
    }
    Ok(HttpResponse::Ok().json(body))
}

fn status_body(task: &TaskDocument) -> Value {
    json!({
        "task_id": task.id,
        "task_name": task.task_name,
        "state": task.state,
        "ready": task.state.is_final(),
        "retries": task.retries,
        "created_at": timestamp(Some(task.created_at)),
        "updated_at": timestamp(Some(task.updated_at)),
        "started_at": timestamp(task.started_at),
        "finished_at": timestamp(task.finished_at),
        "root_cause": task.root_cause,
        "parent_id": task.parent_id,
        "trace_id": task.trace_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match parse_body::<TaskStart>(body.as_bytes()).unwrap_err() {
            ApiError::Validation { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"args": []}"#), "task_name");
        assert_eq!(field_of(r#"{"task_name": 3}"#), "task_name");
        assert_eq!(field_of(r#"{"task_name": "x", "args": {}}"#), "args");
        assert_eq!(field_of(r#"{"task_name": "x", "kwargs": []}"#), "kwargs");
        assert_eq!(field_of(r#"{"task_name": "x", "colour": "red"}"#), "colour");
        assert_eq!(
            field_of(r#"{"task_name": "x", "priority": "high"}"#),
            "priority"
        );
    }

    #[test]
    fn broken_json_is_a_malformed_body() {
        assert!(matches!(
            parse_body::<TaskStart>(b"{"),
            Err(ApiError::MalformedBody(_))
        ));
    }
}
