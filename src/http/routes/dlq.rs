//! `GET /dlq`, `GET /dlq/{task_id}`, `POST /dlq/replay` and `POST /dlq/purge`: the dead-letter
//! queue for the operator page and scripts, the same operations as `kobe dlq list/show/replay/purge`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::operate::dead_letters::{DeadLetterError, LetterSummary, ReplayOutcome, Selection};

/// Which letters to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LetterQuery {
    /// Only letters of this task name.
    pub task_name: Option<String>,
    /// Only letters whose reason contains this text.
    pub reason: Option<String>,
    /// At most this many, 1–500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
}

/// Dead letters, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Letters {
    pub letters: Vec<LetterSummary>,
}

/// Which letters to replay: task ids, a task name, or all of them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayRequest {
    #[serde(default)]
    pub task_ids: Vec<String>,
    pub task_name: Option<String>,
    /// Every letter (with `task_name`: every letter of that task).
    #[serde(default)]
    pub all: bool,
    /// Say what would be replayed; change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a replay did, letter by letter; `missing` names requested ids with no letter.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Replayed {
    pub outcomes: Vec<ReplayOutcome>,
    pub missing: Vec<String>,
}

fn unavailable(error: DeadLetterError) -> ApiError {
    match error {
        DeadLetterError::Store(e) => ApiError::store(e),
        other => ApiError::Unavailable {
            dependency: "RabbitMQ",
            reason: other.to_string(),
            task_id: None,
            retry_after: 1,
        },
    }
}

/// The letters in the dead-letter queue, oldest first; nothing is removed.
#[utoipa::path(
    get,
    path = "/dlq",
    tag = "operations",
    params(LetterQuery),
    responses(
        (status = 200, description = "Dead letters", body = Letters),
        (status = 422, description = "A filter is malformed (the field is named)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.dlq.list", skip(state, request))]
pub async fn list(
    state: web::Data<AppState>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: LetterQuery = super::query(&request)?;
    let limit = super::limit(query.limit.as_deref(), 50, 500)? as usize;
    let selection = Selection {
        task_name: query.task_name.clone(),
        reason: query.reason.clone(),
        ..Selection::default()
    };
    let letters = state
        .operations
        .dead_letters(selection, limit)
        .await
        .map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(Letters { letters }))
}

/// Replays dead letters as their tasks' next attempts; a letter is removed only once its new
/// attempt is confirmed (see `kobe dlq replay`).
#[utoipa::path(
    post,
    path = "/dlq/replay",
    tag = "operations",
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "What was done with each letter", body = Replayed),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No letters selected, or a malformed field (named)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ or MongoDB unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.dlq.replay", skip(state, request, body))]
pub async fn replay(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let asked: ReplayRequest = json_body(&body)?;
    if asked.task_ids.is_empty() && asked.task_name.is_none() && !asked.all {
        return Err(ApiError::validation(
            "task_ids",
            "say which letters: task_ids, task_name, or all",
        ));
    }
    let by = crate::http::guard::requester(&request);
    let wanted = asked.task_ids.clone();
    let outcomes = state
        .operations
        .replay(
            Selection {
                task_ids: asked.task_ids,
                task_name: asked.task_name,
                ..Selection::default()
            },
            asked.dry_run,
            &by,
        )
        .await
        .map_err(unavailable)?;
    let missing = wanted
        .into_iter()
        .filter(|id| !outcomes.iter().any(|o| o.task_id() == Some(id.as_str())))
        .collect();
    Ok(HttpResponse::Ok().json(Replayed { outcomes, missing }))
}

/// The dead letter of one task, with its message body; nothing is removed.
#[utoipa::path(
    get,
    path = "/dlq/{task_id}",
    tag = "operations",
    params(("task_id" = String, Path, description = "The dead-lettered task's id")),
    responses(
        (status = 200, description = "The letter, with its body", body = LetterSummary),
        (status = 404, description = "No letter for that task", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.dlq.show", skip(state))]
pub async fn show(
    state: web::Data<AppState>,
    task_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let letter = state
        .operations
        .dead_letter(&task_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter for task `{task_id}`")))?;
    Ok(HttpResponse::Ok().json(letter))
}

/// Which letters to purge. Without `dry_run`, `confirm: true` is required: purged letters are gone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PurgeRequest {
    pub task_name: Option<String>,
    /// Only letters whose reason contains this text.
    pub reason: Option<String>,
    /// Only letters dead-lettered at least this many seconds ago (at most ten years).
    #[schema(minimum = 0, maximum = 315_360_000)]
    pub older_than_s: Option<f64>,
    #[serde(default)]
    pub confirm: bool,
    /// Count what would be removed; remove nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The oldest `older_than_s` a purge takes: ten years.
const MAX_AGE_S: f64 = 315_360_000.0;

/// How many letters a purge removed (or, with `dry_run`, would remove).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Purged {
    pub removed: usize,
    pub dry_run: bool,
}

/// Removes dead letters for good (see `kobe dlq purge`).
#[utoipa::path(
    post,
    path = "/dlq/purge",
    tag = "operations",
    request_body = PurgeRequest,
    responses(
        (status = 200, description = "How many letters were removed", body = Purged),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`confirm` missing, or a malformed field (named)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.dlq.purge", skip(state, request, body))]
pub async fn purge(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let asked: PurgeRequest = json_body(&body)?;
    if !asked.confirm && !asked.dry_run {
        return Err(ApiError::validation(
            "confirm",
            "purged letters are gone for good: send \"confirm\": true (or \"dry_run\": true to count them)",
        ));
    }
    let older_than = match asked.older_than_s {
        None => None,
        Some(s) if s.is_finite() && (0.0..=MAX_AGE_S).contains(&s) => {
            Some(std::time::Duration::from_secs_f64(s))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "older_than_s",
                format!("seconds, from 0 to {MAX_AGE_S}"),
            ))
        }
    };
    let by = crate::http::guard::requester(&request);
    let removed = state
        .operations
        .purge(
            Selection {
                task_name: asked.task_name,
                reason: asked.reason,
                older_than,
                ..Selection::default()
            },
            asked.dry_run,
        )
        .await
        .map_err(unavailable)?;
    tracing::info!(by = %by, removed, dry_run = asked.dry_run, "dead letters purged");
    Ok(HttpResponse::Ok().json(Purged {
        removed,
        dry_run: asked.dry_run,
    }))
}

/// A JSON body: 400 when it is not JSON, 422 naming what does not fit.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::MalformedBody(e.to_string())
        } else {
            ApiError::validation("body", e.to_string())
        }
    })
}
