//! The OpenAPI 3 document, generated from the handlers' annotations and the types they use.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::routes::{
    actions, bulk, catalog, dlq, health, schedules, search, status, submit, workflow,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kobe",
        description = "Submit tasks, follow their state, read their results. Errors are application/problem+json.",
    ),
    paths(
        submit::start,
        workflow::start,
        workflow::show,
        workflow::cancel,
        bulk::start_many,
        status::status,
        status::result,
        search::search,
        dlq::list,
        dlq::replay,
        dlq::show,
        dlq::purge,
        actions::retry,
        actions::cancel,
        catalog::list,
        schedules::list,
        health::health,
        health::ready,
        super::routes::metrics::metrics,
    ),
    components(schemas(
        workflow::WorkflowAccepted,
        workflow::WorkflowCancelled,
        crate::workflow::WorkflowView,
        crate::workflow::StepView,
        submit::TaskStart,
        submit::Accepted,
        submit::Deduplicated,
        bulk::TaskStartMany,
        bulk::BulkResults,
        bulk::ItemResult,
        status::TaskStatus,
        status::ResultAnswer,
        catalog::TaskInfo,
        schedules::Schedules,
        schedules::ScheduleInfo,
        actions::Retried,
        actions::CancelAnswer,
        search::TaskPage,
        dlq::Letters,
        dlq::ReplayRequest,
        dlq::Replayed,
        dlq::PurgeRequest,
        dlq::Purged,
        crate::operate::dead_letters::LetterSummary,
        crate::operate::dead_letters::ReplayOutcome,
        search::TaskSummary,
        status::AttemptError,
        status::AttemptInfo,
        status::JobProgress,
        Problem,
    )),
    modifiers(&BearerAuth, &HeaderConstraints),
    tags(
        (name = "tasks", description = "Submitting tasks and following them"),
        (name = "workflows", description = "Chains, groups and chords of tasks"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
)]
pub(crate) struct ApiDoc;

/// Declares the optional bearer-token scheme (`KOBE_API_TOKENS`).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Constraints on headers the handlers check, which the path annotations cannot state.
struct HeaderConstraints;

impl Modify for HeaderConstraints {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::RefOr;
        let Some(start) = openapi
            .paths
            .paths
            .get_mut("/task/start")
            .and_then(|item| item.post.as_mut())
        else {
            return;
        };
        for parameter in start.parameters.iter_mut().flatten() {
            if parameter.name == "Idempotency-Key" {
                parameter.schema = Some(RefOr::T(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(super::routes::submit::MAX_KEY_LEN))
                        .pattern(Some("^[\\x20-\\x7e]+$"))
                        .into(),
                ));
            }
        }
    }
}

/// The document `/openapi.json` serves: the derived one, with the constraints the handlers
/// enforce that the derived schemas cannot state (bounds of limits, the states a search takes,
/// "one of these fields"), so a request the document calls valid is one the server accepts as to
/// its shape.
/// `bulk_max` is this server's `KOBE_BULK_MAX`.
pub fn document(bulk_max: usize) -> serde_json::Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    constrain(&mut document, bulk_max);
    document
}

fn constrain(document: &mut serde_json::Value, bulk_max: usize) {
    use serde_json::json;
    let most = crate::domain::MAX_TIME_LIMIT.as_secs();
    let schemas = &mut document["components"]["schemas"];
    let tasks = &mut schemas["TaskStartMany"]["properties"]["tasks"];
    if tasks.is_object() {
        tasks["maxItems"] = json!(bulk_max);
    }
    for limit in ["time_limit", "soft_time_limit"] {
        let field = &mut schemas["TaskStart"]["properties"][limit];
        if field.is_object() {
            field["exclusiveMinimum"] = json!(0);
            field["maximum"] = json!(most);
        }
    }
    let countdown = &mut schemas["TaskStart"]["properties"]["countdown"];
    if countdown.is_object() {
        countdown["minimum"] = json!(0);
        countdown["maximum"] = json!(super::routes::submit::MAX_HORIZON.as_secs());
    }
    if schemas["ReplayRequest"].is_object() {
        schemas["ReplayRequest"]["anyOf"] = json!([
            {"required": ["task_ids"], "properties": {"task_ids": {"type": "array", "minItems": 1}}},
            {"required": ["task_name"], "properties": {"task_name": {"type": "string"}}},
            {"required": ["all"], "properties": {"all": {"const": true}}},
        ]);
    }
    if schemas["PurgeRequest"].is_object() {
        schemas["PurgeRequest"]["anyOf"] = json!([
            {"required": ["confirm"], "properties": {"confirm": {"const": true}}},
            {"required": ["dry_run"], "properties": {"dry_run": {"const": true}}},
        ]);
    }
    // What the guard answers before any handler, on every route that changes something.
    let problem = |description: &str| {
        json!({
            "description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        })
    };
    if let Some(paths) = document["paths"].as_object_mut() {
        for operations in paths.values_mut() {
            let Some(post) = operations.get_mut("post") else {
                continue;
            };
            let responses = &mut post["responses"];
            if responses.get("403").is_none() {
                responses["403"] = problem("Authenticated by the operator page's session cookie, but not from the page itself (another origin, or without its X-Kobe-CSRF token)");
            }
            if responses.get("415").is_none() {
                responses["415"] = problem("A body declared as something other than JSON");
            }
        }
    }
    let states: Vec<&str> = crate::domain::TaskState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    if let Some(parameters) = document["paths"]["/task"]["get"]["parameters"].as_array_mut() {
        for parameter in parameters.iter_mut() {
            match parameter["name"].as_str() {
                Some("state") => parameter["schema"] = json!({"type": "string", "enum": states}),
                // A task id.
                Some("parent_id") => {
                    parameter["schema"] =
                        json!({"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"})
                }
                // Searched as a literal text, which MongoDB cannot hold a NUL in.
                Some("root_cause") => {
                    parameter["schema"] =
                        json!({"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"})
                }
                // `next_cursor` of a page: `<updated_at ms>.<task id>` (empty: the first page).
                Some("cursor") => {
                    parameter["schema"] = json!({"type": "string", "pattern": "^(|-?[0-9]{1,18}[.][A-Za-z0-9._:-]{1,128})$"})
                }
                Some("since" | "until" | "created_since" | "created_until") => {
                    parameter["schema"] = json!({"type": "string", "format": "date-time"})
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_states_what_the_server_enforces() {
        let document = document(250);
        let schemas = &document["components"]["schemas"];
        assert_eq!(
            schemas["TaskStartMany"]["properties"]["tasks"]["maxItems"],
            250
        );
        assert_eq!(
            schemas["TaskStart"]["properties"]["time_limit"]["maximum"],
            86_400
        );
        assert!(schemas["ReplayRequest"]["anyOf"].is_array());
        assert!(schemas["PurgeRequest"]["anyOf"].is_array());
        let state = document["paths"]["/task"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "state")
            .unwrap();
        assert_eq!(state["schema"]["enum"].as_array().unwrap().len(), 6);
    }
}
