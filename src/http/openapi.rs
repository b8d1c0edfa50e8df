//! The OpenAPI 3 document, generated from the handlers' annotations and the types they use.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::Problem;
use super::routes::{actions, catalog, dlq, health, schedules, search, status, submit};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kobe",
        description = "Submit tasks, follow their state, read their results. Errors are application/problem+json.",
    ),
    paths(
        submit::start,
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
        submit::TaskStart,
        submit::Accepted,
        submit::Deduplicated,
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
        crate::submit::dead_letters::LetterSummary,
        crate::submit::dead_letters::ReplayOutcome,
        search::TaskSummary,
        status::AttemptError,
        status::JobProgress,
        Problem,
    )),
    modifiers(&BearerAuth, &HeaderConstraints),
    tags(
        (name = "tasks", description = "Submitting tasks and following them"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
)]
pub struct ApiDoc;

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
