//! `POST /task/start_many`: many submissions in one request, each answered on its own exactly as
//! `POST /task/start` would answer it.
//!
//! The items go to the submitter together: their records share the group-commit writer's
//! `insert` commands (hundreds of documents a command) and their publishes are confirmed
//! pipelined on the publisher's channel, so a batch costs a few round trips, not two per task.
//! One item's problem (a bad field, a broker that refused it) never affects another's.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument;
use utoipa::ToSchema;

use std::time::Duration;

use super::submit::{self, off_thread, parse_body, read_body, Submitted, TaskStart};
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::submit::Submitter;
use crate::tasks::Registry;
use crate::telemetry::trace::TraceContext;

/// A bulk body may be this many times `KOBE_MAX_BODY_BYTES`.
pub(crate) const BODY_FACTOR: usize = 16;

/// Body of `POST /task/start_many`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskStartMany {
    /// Each one the body of `POST /task/start` (at most `KOBE_MAX_BODY_BYTES` as sent, as that
    /// route allows); a per-item idempotency key is its `dedup_key`. Kept as sent until its
    /// size is known, so an item over the bound costs nothing more than reading it.
    #[schema(value_type = Vec<TaskStart>, min_items = 1)]
    pub tasks: Vec<Box<RawValue>>,
}

/// What became of one item.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ItemResult {
    /// The item's position in `tasks`, from 0.
    pub index: usize,
    /// What `POST /task/start` would have answered: 202 recorded and confirmed, 200 a repeat of
    /// an earlier submission, 422 a bad field, 503 not run (see `problem`).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduplicated: Option<bool>,
    /// Why it was not accepted, as `POST /task/start` would say it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// `200` answer: one result per item, in order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkResults {
    pub results: Vec<ItemResult>,
}

impl ItemResult {
    pub fn of(index: usize, answer: Result<Submitted, ApiError>) -> Self {
        match answer {
            Ok(Submitted::Accepted { task_id }) => Self {
                index,
                status: 202,
                task_id: Some(task_id),
                deduplicated: None,
                problem: None,
            },
            Ok(Submitted::Duplicate { task_id }) => Self {
                index,
                status: 200,
                task_id: Some(task_id),
                deduplicated: Some(true),
                problem: None,
            },
            Err(error) => {
                let problem = error.problem();
                Self {
                    index,
                    status: problem.status,
                    task_id: problem.task_id.clone(),
                    deduplicated: None,
                    problem: Some(problem),
                }
            }
        }
    }
}

/// Submits up to `KOBE_BULK_MAX` tasks; each item is answered on its own as `POST /task/start`
/// would answer it (the request itself is `200` once its body is read). Records share a few
/// `insert` commands and publishes are confirmed pipelined.
#[utoipa::path(
    post,
    path = "/task/start_many",
    tag = "tasks",
    request_body = TaskStartMany,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context every task continues"),
    ),
    responses(
        (status = 200, description = "One result per item, in order", body = BulkResults),
        (status = 400, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A page session's request from another origin or without its CSRF token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over 16 × KOBE_MAX_BODY_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No `tasks`, none, or more than KOBE_BULK_MAX", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn start_many(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let incoming = submit::incoming_trace(&request);
    let span = tracing::info_span!("http.task.start_many", tasks = tracing::field::Empty);
    let trace = crate::telemetry::otel::outgoing(&span, incoming.as_ref());
    async move {
        let limit = state.max_body_bytes.saturating_mul(BODY_FACTOR);
        let body = read_body(&request, payload, limit).await?;
        // Reading and checking up to 16 MiB is CPU work: it runs beside the HTTP workers, which
        // keep answering other requests meanwhile.
        let checking = state.clone();
        let (bulk_max, item_max) = (state.bulk_max, state.max_body_bytes);
        let items = off_thread(body.len(), move || {
            let many: TaskStartMany = parse_body(&body)?;
            drop(body);
            if many.tasks.is_empty() || many.tasks.len() > bulk_max {
                return Err(ApiError::validation(
                    "tasks",
                    format!("between 1 and {bulk_max} tasks (KOBE_BULK_MAX)"),
                ));
            }
            Ok(many
                .tasks
                .into_iter()
                .map(|item| {
                    let item = item_of(&item, item_max);
                    prepare_item(&checking.registry, &checking.submitter, item, trace)
                })
                .collect::<Vec<_>>())
        })
        .await??;
        tracing::Span::current().record("tasks", items.len());
        // The guard counted the request once; each further item counts too.
        crate::http::guard::count_more(&request, &state, items.len() - 1).await?;
        let results = submit_prepared_items(&state.submitter, state.dedup_window, items)
            .await
            .into_iter()
            .enumerate()
            .map(|(index, answer)| ItemResult::of(index, answer))
            .collect();
        Ok(HttpResponse::Ok().json(BulkResults { results }))
    }
    .instrument(span)
    .await
}

/// Submits parsed items together, each answered as `POST /task/start` would answer it, in order:
/// items without a key go to [`Submitter::submit_many`] as one batch; keyed ones (which may wait
/// for an earlier submission of their key) go one by one beside it.
pub(crate) async fn submit_items(
    registry: &Registry,
    submitter: &Submitter,
    dedup_window: Duration,
    items: Vec<Result<TaskStart, ApiError>>,
    trace: TraceContext,
) -> Vec<Result<Submitted, ApiError>> {
    let prepared = items
        .into_iter()
        .map(|item| prepare_item(registry, submitter, item, trace))
        .collect();
    submit_prepared_items(submitter, dedup_window, prepared).await
}

/// One bulk item checked as `/task/start` checks a body, its large arguments kept as text.
fn prepare_item(
    registry: &Registry,
    submitter: &Submitter,
    item: Result<TaskStart, ApiError>,
    trace: TraceContext,
) -> Result<submit::Prepared, ApiError> {
    item.and_then(|submission| {
        submit::prepare(registry, submitter.topology(), submission, None, trace)
    })
    .map(|prepared| prepared.pack(submitter))
}

/// One item of a bulk body: at most `max_bytes` as sent (413 for that item alone, as
/// `/task/start` would answer it), then read as `/task/start` reads its body.
fn item_of(item: &RawValue, max_bytes: usize) -> Result<TaskStart, ApiError> {
    if item.get().len() > max_bytes {
        return Err(ApiError::PayloadTooLarge { limit: max_bytes });
    }
    parse_body(item.get().as_bytes())
}

/// [`submit_items`] for items already checked.
pub(crate) async fn submit_prepared_items(
    submitter: &Submitter,
    dedup_window: Duration,
    items: Vec<Result<submit::Prepared, ApiError>>,
) -> Vec<Result<Submitted, ApiError>> {
    let mut answers: Vec<Option<Result<Submitted, ApiError>>> = Vec::with_capacity(items.len());
    let mut batch = Vec::new();
    let mut keyed = Vec::new();
    for (index, prepared) in items.into_iter().enumerate() {
        match prepared {
            Ok(prepared) if prepared.keyed() => keyed.push((index, prepared)),
            Ok(prepared) => batch.push((index, prepared.into_task())),
            Err(error) => {
                answers.push(Some(Err(error)));
                continue;
            }
        }
        answers.push(None);
    }
    let (names, tasks): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|(index, task)| ((index, task.id.to_string(), task.task_name.clone()), task))
        .unzip();
    let keyed_answers =
        futures_util::future::join_all(keyed.into_iter().map(|(index, prepared)| async move {
            (
                index,
                submit::submit_prepared(submitter, dedup_window, prepared).await,
            )
        }));
    let (batched, keyed_answers) =
        futures_util::future::join(submitter.submit_many(tasks), keyed_answers).await;
    for ((index, id, name), result) in names.into_iter().zip(batched) {
        let result = result.map(|()| crate::submit::Submitted::Accepted);
        answers[index] = Some(submit::answered(&id, &name, result));
    }
    for (index, answer) in keyed_answers {
        answers[index] = Some(answer);
    }
    answers
        .into_iter()
        .map(|answer| answer.expect("every item answered"))
        .collect()
}
