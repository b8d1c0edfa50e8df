//! `GET /tasks`: the tasks this deployment can run.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::error::Problem;
use crate::http::AppState;

/// A task this deployment can run.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskInfo {
    pub name: String,
    /// `rust` (compiled in), `http` or `command` (declared in `KOBE_TASKS_FILE`).
    pub kind: String,
    /// Where it is sent unless a submission names a `queue`.
    pub route: String,
    pub max_retries: u32,
    pub time_limit_s: f64,
    /// The JSON Schema its kwargs must fit, when it declares one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub kwargs_schema: Option<serde_json::Value>,
}

/// The registered tasks.
#[utoipa::path(
    get,
    path = "/tasks",
    tag = "tasks",
    responses(
        (status = 200, description = "Registered tasks", body = Vec<TaskInfo>),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let topology = state.submitter.topology();
    let tasks: Vec<TaskInfo> = state
        .registry
        .names()
        .into_iter()
        .filter_map(|name| state.registry.get(name))
        .map(|task| TaskInfo {
            name: task.name().to_owned(),
            kind: task.kind().to_owned(),
            route: topology.route_of(task.name()).to_owned(),
            max_retries: task.retry_policy().max_retries,
            time_limit_s: task.time_limit().as_secs_f64(),
            kwargs_schema: task.kwargs_schema().map(|s| s.as_value().clone()),
        })
        .collect();
    HttpResponse::Ok().json(tasks)
}
