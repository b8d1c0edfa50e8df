//! One file per resource.

pub mod actions;
pub mod catalog;
pub mod dlq;
pub mod docs;
pub mod health;
pub mod metrics;
pub mod search;
pub mod status;
pub mod submit;
pub mod ui;

use actix_web::HttpRequest;

use super::ApiError;

/// Any path no route matches: the same problem shape as every other error.
pub async fn not_found(request: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    )))
}
