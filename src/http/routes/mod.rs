//! One file per resource.

pub(crate) mod actions;
pub mod bulk;
pub(crate) mod catalog;
pub mod dlq;
pub mod docs;
pub mod health;
pub(crate) mod html;
pub mod metrics;
pub mod schedules;
pub mod search;
pub mod status;
pub mod submit;
pub mod ui;
pub(crate) mod workflow;
pub(crate) mod workflow_page;

use actix_web::HttpRequest;

use super::ApiError;

/// A query string parsed here rather than by an extractor, so a malformed one (a field given
/// twice, a wrong type) is a 422 like every other bad input.
pub(crate) fn query<T: serde::de::DeserializeOwned>(request: &HttpRequest) -> Result<T, ApiError> {
    actix_web::web::Query::<T>::from_query(request.query_string())
        .map(actix_web::web::Query::into_inner)
        .map_err(|e| ApiError::validation("query", e.to_string()))
}

/// A `limit` query parameter: `default` when absent, else a whole number in 1–`max`.
pub(crate) fn limit(text: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::validation("limit", format!("expected 1–{max}"))),
    }
}

/// Any path no route matches: the same problem shape as every other error.
pub(crate) async fn not_found(request: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    )))
}
