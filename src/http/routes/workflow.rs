//! `POST /workflow/start`, `GET /workflow/{id}`, `POST /workflow/{id}/cancel`: chains, groups
//! and chords, each step checked as `/task/start` checks a task.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::submit::{incoming_trace, parse_value, prepare, read_body, TaskStart};
use crate::amqp::Topology;
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::store::workflows::StepTask;
use crate::submit::SubmitError;
use crate::tasks::Registry;
use crate::telemetry::trace::TraceContext;
use crate::workflow::shape::{self, Planned};
use crate::workflow::{Checked, WorkflowView};

/// The answer to an accepted workflow.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowAccepted {
    pub workflow_id: String,
}

/// The answer to a cancel.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowCancelled {
    pub workflow_id: String,
    /// The workflow's state now.
    pub state: String,
    /// Steps whose tasks were revoked or asked to stop.
    pub cancelled: usize,
}

/// Starts a workflow: `{"workflow": {"chain": [...]}}` (or `{"group": [...]}`, or one step),
/// with an optional `on_failure` step. A step is the body `/task/start` takes, plus
/// `"immutable": true` when it must not receive what came before it, and its own `on_failure`
/// step (Celery's `link_error`) if it should have one. A step after a step gets
/// that step's result as its first positional argument; a step after a group gets the list of
/// the members' results, in the members' order. Answered once the whole workflow is recorded
/// and its first steps are confirmed by the broker. At most 5,000 steps, nested at most 8 deep.
#[utoipa::path(
    post,
    path = "/workflow/start",
    tag = "workflows",
    params(("Idempotency-Key" = Option<String>, Header, description = "Starts with the same key start one workflow")),
    request_body(content = Object, description = "{\"workflow\": a chain, a group or a step, \"on_failure\": a step}"),
    responses(
        (status = 202, description = "Recorded, first steps confirmed", body = WorkflowAccepted),
        (status = 400, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A step or node is invalid; `field` names its path", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB or RabbitMQ unavailable; start again with the same Idempotency-Key to finish", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.workflow.start", skip_all)]
pub async fn start(
    request: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&request, payload, state.max_body_bytes).await?;
    let trace = incoming_trace(&request).unwrap_or_else(TraceContext::new_root);
    let key = request
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    // Up to 5,000 steps, each checked as a submission: CPU work, beside the HTTP workers.
    let checking = state.clone();
    let checked = super::submit::off_thread(body.len(), move || {
        let body: Map<String, Value> = super::submit::parse_body(&body)?;
        check(
            &checking.registry,
            checking.submitter.topology(),
            &body,
            key.as_deref(),
            &trace,
        )
    })
    .await??;
    let id = checked.id.clone();
    // Whatever did not finish, a start sent again with the same key finishes.
    let new = state
        .workflows
        .start(checked)
        .await
        .map_err(|error| match error {
            SubmitError::Store(e) => ApiError::store(e),
            SubmitError::NotPublished(e) => ApiError::broker(e, None),
            SubmitError::InvalidId(id) => ApiError::Internal(format!("invalid step id `{id}`")),
        })?;
    tracing::info!(workflow_id = %id, new, "workflow accepted");
    Ok(HttpResponse::Accepted().json(WorkflowAccepted { workflow_id: id }))
}

/// Checks a start's body (`workflow`, `on_failure`) and every step in it as `/task/start`
/// would, naming a bad one by its path; `key` (an `Idempotency-Key`) fixes the workflow's id.
/// `kobe workflow start` checks the same way.
pub(crate) fn check(
    registry: &Registry,
    topology: &Topology,
    body: &Map<String, Value>,
    key: Option<&str>,
    trace: &TraceContext,
) -> Result<Checked, ApiError> {
    if let Some(unknown) = body
        .keys()
        .find(|k| !matches!(k.as_str(), "workflow" | "on_failure"))
    {
        return Err(ApiError::validation(
            unknown.clone(),
            "unknown field; expected `workflow` and `on_failure`",
        ));
    }
    let tree = body
        .get("workflow")
        .ok_or_else(|| ApiError::validation("workflow", "missing field `workflow`"))?;
    let canvas =
        shape::read(tree, "workflow").map_err(|e| ApiError::validation(e.path, e.reason))?;
    let on_failure = body.get("on_failure");
    let id = match key {
        Some(key) if key.is_empty() || key.len() > super::submit::MAX_KEY_LEN => {
            return Err(ApiError::validation(
                "Idempotency-Key",
                format!("expected 1 to {} characters", super::submit::MAX_KEY_LEN),
            ))
        }
        // The key makes the id: a start sent again finds the workflow it started.
        Some(key) => crate::workflow::id_for_key(key),
        None => crate::workflow::new_id(),
    };
    let steps = shape::plan(canvas)
        .map_err(|e| ApiError::validation(e.path, e.reason))?
        .into_iter()
        .map(|planned| {
            let task = step_task(registry, topology, &planned.path, &planned.body, trace)?;
            Ok((planned, task))
        })
        .collect::<Result<Vec<(Planned, StepTask)>, ApiError>>()?;
    let mut on_step_failure = std::collections::HashMap::new();
    for (index, (planned, _)) in steps.iter().enumerate() {
        if let Some(body) = &planned.on_failure {
            let path = format!("{}.on_failure", planned.path);
            on_step_failure.insert(index, step_task(registry, topology, &path, body, trace)?);
        }
    }
    let on_failure = match on_failure {
        None | Some(Value::Null) => None,
        Some(Value::Object(body)) => {
            Some(step_task(registry, topology, "on_failure", body, trace)?)
        }
        Some(_) => return Err(ApiError::validation("on_failure", "expected a step")),
    };
    Ok(Checked {
        id,
        steps,
        on_step_failure,
        on_failure,
        trace: *trace,
    })
}

/// One step's task, checked as `/task/start` checks a body; errors name `path.field`.
fn step_task(
    registry: &Registry,
    topology: &Topology,
    path: &str,
    body: &Map<String, Value>,
    trace: &TraceContext,
) -> Result<StepTask, ApiError> {
    let at = |error: ApiError| match error {
        ApiError::Validation { field, reason } => ApiError::Validation {
            field: format!("{path}.{field}"),
            reason,
        },
        other => other,
    };
    let submission: TaskStart = parse_value(Value::Object(body.clone())).map_err(at)?;
    if submission.dedup_key.is_some() || submission.dedup.is_some() {
        return Err(ApiError::validation(
            format!("{path}.dedup_key"),
            "a step is deduplicated with its workflow: send an Idempotency-Key with the start",
        ));
    }
    // Times given relative are kept relative: they count from when the step is submitted.
    let countdown_s = submission.countdown.filter(|c| *c > 0.0);
    let expires_in_s = submission.expires.as_ref().and_then(Value::as_f64);
    let task = prepare(registry, topology, submission, None, *trace)
        .map_err(at)?
        .into_task();
    Ok(StepTask {
        task_name: task.task_name,
        args: task.args,
        kwargs: task.kwargs,
        route: task.route,
        priority: task.priority,
        hard_time_limit: task.hard_time_limit.map(|d| d.as_secs_f64()),
        soft_time_limit: task.soft_time_limit.map(|d| d.as_secs_f64()),
        eta: task.eta.filter(|_| countdown_s.is_none()),
        expires: task.expires.filter(|_| expires_in_s.is_none()),
        countdown_s,
        expires_in_s,
    })
}

/// A workflow's state and each step's path, task id and state.
#[utoipa::path(
    get,
    path = "/workflow/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    responses(
        (status = 200, description = "The workflow", body = WorkflowView),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workflow", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn show(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    match state.workflows.show(&id).await.map_err(ApiError::store)? {
        Some(view) => Ok(HttpResponse::Ok().json(view)),
        None => Err(ApiError::NotFound(format!("no workflow with id `{id}`"))),
    }
}

/// Cancels a workflow: no later step is submitted, steps waiting to run are revoked and running
/// ones asked to stop. Asking again is harmless.
#[utoipa::path(
    post,
    path = "/workflow/{id}/cancel",
    tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    responses(
        (status = 200, description = "Cancelled (or it had ended)", body = WorkflowCancelled),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workflow", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable; ask again", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn cancel(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let by = crate::http::guard::requester(&request);
    let cancelled =
        crate::operate::cancel::workflow(&state.workflows, &state.tasks, &state.cache, &id, &by)
            .await
            .map_err(ApiError::store)?;
    match cancelled {
        Some((state, cancelled)) => Ok(HttpResponse::Ok().json(WorkflowCancelled {
            workflow_id: id.into_inner(),
            state,
            cancelled,
        })),
        None => Err(ApiError::NotFound(format!("no workflow with id `{id}`"))),
    }
}
