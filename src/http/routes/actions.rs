//! `POST /task/{id}/retry` and `POST /task/{id}/cancel`: an operator runs a failed or cancelled
//! task again as its next attempt, or cancels one that should not run (or stop running).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::TaskState;
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::operate::rerun::Rerun;
use crate::store::attempts::Cancelled;

/// The answer to a retry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Retried {
    pub task_id: String,
    /// The attempt now on its way (1 is the first).
    pub attempt: u32,
}

/// The answer to a cancel.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CancelAnswer {
    pub task_id: String,
    /// `REVOKED` (it will not run, or it stopped), or `STARTED` (running; its handler is being
    /// asked to stop — watch `GET /task/status/{id}`).
    #[schema(value_type = String, example = "REVOKED")]
    pub state: TaskState,
}

/// Cancels a task. A `PENDING` or `RETRY` task becomes `REVOKED` (200) and its message is acked
/// without running when it arrives; a `STARTED` task's handler is asked to stop (202) and the task
/// ends `REVOKED` if it stops, or with its own outcome if it does not. Asking again is harmless;
/// a finished task (`SUCCESS`, `FAILURE`), or one Python Celery workers run, is a 409 and is not touched.
#[utoipa::path(
    post,
    path = "/task/{id}/cancel",
    tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task is REVOKED (now, or already)", body = CancelAnswer),
        (status = 202, description = "The task is running; its handler is asked to stop", body = CancelAnswer),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The task finished (SUCCESS or FAILURE), or Python Celery workers run it (kind = \"celery\"; revoke it with Celery's control)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable; nothing was changed, or ask again to be sure", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.task.cancel", skip(state, request))]
pub async fn cancel(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::no_task(&id);
    let task_id = ApiError::task_id(&id)?;
    let by = crate::http::guard::requester(&request);
    let answer = |state| CancelAnswer {
        task_id: task_id.to_string(),
        state,
    };
    match state
        .operations
        .cancel(task_id.as_str(), &by)
        .await
        .map_err(ApiError::store)?
    {
        Cancelled::Revoked | Cancelled::AlreadyRevoked => {
            Ok(HttpResponse::Ok().json(answer(TaskState::Revoked)))
        }
        Cancelled::Requested => Ok(HttpResponse::Accepted().json(answer(TaskState::Started))),
        Cancelled::Finished(task_state) => Err(ApiError::Conflict(format!(
            "task `{id}` is {task_state}; a finished task cannot be cancelled"
        ))),
        Cancelled::RunByCelery(name) => Err(ApiError::Conflict(format!(
            "task `{id}` ({name}) runs on Python Celery workers, which Kobe cannot stop; revoke it with Celery's own control (celery control revoke {id})"
        ))),
        Cancelled::Missing => Err(not_found()),
    }
}

/// Runs a `FAILURE` or `REVOKED` task again as its next attempt (same task id, `retries` goes
/// on, the retry recorded in its history). A task in any other state is a 409 and is not touched.
#[utoipa::path(
    post,
    path = "/task/{id}/retry",
    tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 202, description = "The next attempt is published and confirmed", body = Retried),
        (status = 404, description = "No such task", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The task is neither FAILURE nor REVOKED", body = Problem, content_type = "application/problem+json"),
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
    let not_found = || ApiError::no_task(&id);
    let task_id = ApiError::task_id(&id)?;
    let by = crate::http::guard::requester(&request);
    match state
        .operations
        .rerun(task_id.as_str(), &by)
        .await
        .map_err(ApiError::store)?
    {
        Rerun::Published(task) => Ok(HttpResponse::Accepted().json(Retried {
            task_id: task.id.to_string(),
            attempt: task.retries.saturating_add(1),
        })),
        Rerun::NotFailed(task_state) => Err(ApiError::Conflict(format!(
            "task `{id}` is {task_state}; only a FAILURE or REVOKED task can be retried"
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
