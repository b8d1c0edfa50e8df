//! `GET /task`: finding tasks by state, most recently changed first, a page at a time.

use actix_web::{web, HttpResponse};
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::domain::TaskState;
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::store::search::{Cursor, Search, MAX_PAGE};
use crate::store::TaskDocument;

/// The filters of a search.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SearchQuery {
    /// `PENDING`, `STARTED`, `RETRY`, `SUCCESS`, `FAILURE` or `REVOKED` (default `FAILURE`, or
    /// any state with `parent_id` or `workflow_id`).
    pub state: Option<String>,
    /// Only tasks of this name.
    pub task_name: Option<String>,
    /// Only tasks sent to this route (queue suffix).
    pub route: Option<String>,
    /// Only children of this task (a sharded job's shards).
    pub parent_id: Option<String>,
    /// Only the steps of this workflow (any state unless `state` is given).
    #[param(pattern = "^wf-[0-9a-f]{32}$")]
    pub workflow_id: Option<String>,
    /// Only tasks whose root cause contains this text (case-insensitive, at most 200 characters).
    pub root_cause: Option<String>,
    /// Changed at or after this time (RFC 3339); for a finished state, finished at or after.
    pub since: Option<String>,
    /// Changed before this time (RFC 3339); for a finished state, finished before.
    pub until: Option<String>,
    /// Created at or after this time (RFC 3339).
    pub created_since: Option<String>,
    /// Created before this time (RFC 3339).
    pub created_until: Option<String>,
    /// Tasks per page, 1–500 (default 50). Read as text so a bad value is a 422 naming it.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A task in a list.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskSummary {
    pub task_id: String,
    pub task_name: String,
    #[schema(value_type = String, example = "FAILURE")]
    pub state: TaskState,
    pub retries: u32,
    pub updated_at: Option<String>,
    pub root_cause: Option<String>,
}

impl TaskSummary {
    pub fn of(task: &TaskDocument) -> Self {
        Self {
            task_id: task.id.to_string(),
            task_name: task.task_name.clone(),
            state: task.state,
            retries: task.retries,
            updated_at: super::status::timestamp(Some(task.updated_at)),
            root_cause: task.root_cause.clone(),
        }
    }
}

/// A page of tasks.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskPage {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

fn time(field: &str, value: Option<&str>) -> Result<Option<DateTime>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_rfc3339_str(v)
                .map_err(|_| ApiError::validation(field, "expected an RFC 3339 time"))
        })
        .transpose()
}

/// Tasks in one state, or a job's children, most recently changed first (index-backed; cursor
/// pagination).
#[utoipa::path(
    get,
    path = "/task",
    tag = "tasks",
    params(SearchQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 422, description = "A filter is malformed (the field is named)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "MongoDB unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
#[tracing::instrument(name = "http.task.search", skip(state, request))]
pub async fn search(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: SearchQuery = super::query(&request)?;
    let task_state = query
        .state
        .as_deref()
        .map(|s| {
            s.parse::<TaskState>()
                .map_err(|reason| ApiError::validation("state", reason))
        })
        .transpose()?;
    let limit = super::limit(query.limit.as_deref(), 50, MAX_PAGE)?;
    let after = query
        .cursor
        .as_deref()
        // An empty cursor is no cursor: the first page.
        .filter(|c| !c.is_empty())
        .map(|c| {
            Cursor::parse(c)
                .ok_or_else(|| ApiError::validation("cursor", "not a cursor this API gave"))
        })
        .transpose()?;
    if query
        .root_cause
        .as_ref()
        .is_some_and(|t| t.chars().count() > 200 || t.contains('\0'))
    {
        return Err(ApiError::validation(
            "root_cause",
            "at most 200 characters, none of them NUL",
        ));
    }
    let parent_id = query
        .parent_id
        .as_deref()
        .map(|p| {
            crate::domain::TaskId::parse(p)
                .map(|id| id.to_string())
                .map_err(|reason| ApiError::validation("parent_id", reason))
        })
        .transpose()?;
    let workflow_id = query
        .workflow_id
        .as_deref()
        .map(|w| match crate::domain::TaskId::parse(w) {
            Ok(_) if w.starts_with(crate::workflow::ID_PREFIX) => Ok(w.to_owned()),
            _ => Err(ApiError::validation(
                "workflow_id",
                "a workflow id: wf- and 32 hex digits",
            )),
        })
        .transpose()?;
    let search = Search {
        state: task_state,
        task_name: query.task_name.clone(),
        route: query.route.clone(),
        parent_id,
        workflow_id,
        root_cause: query.root_cause.clone().filter(|t| !t.is_empty()),
        since: time("since", query.since.as_deref())?,
        until: time("until", query.until.as_deref())?,
        created_since: time("created_since", query.created_since.as_deref())?,
        created_until: time("created_until", query.created_until.as_deref())?,
        after,
        limit,
    };
    let (tasks, next) = state.tasks.find(&search).await.map_err(ApiError::store)?;
    Ok(HttpResponse::Ok().json(TaskPage {
        tasks: tasks.iter().map(TaskSummary::of).collect(),
        next_cursor: next.map(|c| c.encode()),
    }))
}
