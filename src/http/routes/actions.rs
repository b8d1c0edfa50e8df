//! `POST /task/{id}/retry`: an operator runs a failed task again, as its next attempt.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use sha2::Digest;
use utoipa::ToSchema;

use crate::domain::TaskId;
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::submit::rerun::{rerun, Rerun};

/// The answer to a retry.
#[derive(Debug, Serialize, ToSchema)]
pub struct Retried {
    pub task_id: String,
    /// The attempt now on its way (1 is the first).
    pub attempt: u32,
}

/// Who asked, for the task's history and the log: the token's fingerprint, never the token.
pub(crate) fn requester(request: &HttpRequest) -> String {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(token) => {
            let digest = sha2::Sha256::digest(token.as_bytes());
            format!("api:token-{}", hex::encode(&digest[..4]))
        }
        None => "api:anonymous".into(),
    }
}

/// Runs a `FAILURE` task again as its next attempt (same task id, `retries` goes on, the retry
/// recorded in its history). A task in any other state is a 409 and is not touched.
#[utoipa::path(
    post,
    path = "/task/{id}/retry",
    tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 202, description = "The next attempt is published and confirmed", body = Retried),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The task is not FAILURE", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB or RabbitMQ unavailable; ask again to finish the retry", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.task.retry", skip(state, request))]
pub async fn retry(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("no task with id `{id}`"));
    let task_id = TaskId::parse(&id).map_err(|_| not_found())?;
    let by = requester(&request);
    match rerun(
        &state.submitter,
        &state.tasks,
        &state.cache,
        task_id.as_str(),
        &by,
    )
    .await
    .map_err(ApiError::store)?
    {
        Rerun::Published(task) => Ok(HttpResponse::Accepted().json(Retried {
            task_id: task.id.clone(),
            attempt: task.retries.saturating_add(1),
        })),
        Rerun::NotFailed(task_state) => Err(ApiError::Conflict(format!(
            "task `{id}` is {task_state}; only a FAILURE task can be retried"
        ))),
        Rerun::Missing => Err(not_found()),
        Rerun::NotPublished(error) => Err(ApiError::Unavailable {
            dependency: "RabbitMQ",
            reason: format!("the retry was recorded but not confirmed ({error}); ask again"),
            task_id: Some(task_id.to_string()),
            retry_after: 1,
        }),
    }
}
