//! API errors: every failure the API reports becomes one `application/problem+json` body
//! (RFC 9457) with the same shape, naming the offending field where there is one.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::amqp::AmqpError;
use crate::store::StoreError;

/// `Retry-After` (seconds) when a dependency is down.
const DEPENDENCY_RETRY_AFTER: u64 = 5;

/// What went wrong, and so which status the client gets.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Input that cannot be accepted: 422, naming the field.
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    /// The body is not JSON at all: 400.
    #[error("malformed JSON body: {0}")]
    MalformedBody(String),
    /// The body is larger than the configured limit: 413.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// No such resource: 404.
    #[error("{0}")]
    NotFound(String),
    /// The task is not in a state the request can act on: 409.
    #[error("{0}")]
    Conflict(String),
    /// The route exists, without this method: 405 with `Allow`.
    #[error("this route answers {allow} only")]
    MethodNotAllowed { allow: &'static str },
    /// Missing or wrong bearer token: 401.
    #[error("a valid bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// Authenticated by the page's session cookie, but not from the page itself (another origin,
    /// or without the session's CSRF token): 403.
    #[error("{0}")]
    Forbidden(String),
    /// A body that is not JSON on a route that takes JSON: 415.
    #[error("this route takes a JSON body (Content-Type: application/json), not `{0}`")]
    UnsupportedMediaType(String),
    /// Over the rate limit: 429 with `Retry-After`.
    #[error("rate limit exceeded; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: std::time::Duration },
    /// The result backend is off (`KOBE_RESULT_BACKEND=none`): 404 with its own type.
    #[error("the result backend is off; set KOBE_RESULT_BACKEND=redis, or read the state at /task/status/{{id}}")]
    ResultBackendOff,
    /// The result existed but its TTL passed: 410.
    #[error("{0}")]
    Gone(String),
    /// A dependency is down or refused: 503 with the reason.
    #[error("{dependency} unavailable: {reason}")]
    Unavailable {
        dependency: &'static str,
        reason: String,
        /// Set when a task document exists for the failed request, so the client can look.
        task_id: Option<String>,
        /// Seconds, for `Retry-After`.
        retry_after: u64,
    },
    /// A bug: 500. The cause is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// 404 for a task id that names no task (or is no task id at all).
    pub(crate) fn no_task(id: &str) -> Self {
        Self::NotFound(format!("no task with id `{id}`"))
    }

    /// The task id in a path, or the 404 a malformed one deserves: no task has that id.
    pub(crate) fn task_id(id: &str) -> Result<crate::domain::TaskId, Self> {
        crate::domain::TaskId::parse(id).map_err(|_| Self::no_task(id))
    }

    pub fn validation(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A store error, naming the dependency that failed: a document that cannot be stored is
    /// the request's fault (422), anything else a dependency's (503).
    pub fn store(error: StoreError) -> Self {
        match error {
            StoreError::Malformed(e) => Self::Internal(e.to_string()),
            StoreError::Rejected(reason) => Self::validation("body", reason.to_string()),
            StoreError::Redis(reason) => Self::Unavailable {
                dependency: "Redis",
                reason: reason.to_string(),
                task_id: None,
                retry_after: DEPENDENCY_RETRY_AFTER,
            },
            other => Self::Unavailable {
                dependency: "MongoDB",
                reason: other.to_string(),
                task_id: None,
                retry_after: DEPENDENCY_RETRY_AFTER,
            },
        }
    }

    /// The broker did not take a message. A full publisher queue is load to shed: come back in a
    /// second; anything else is an outage.
    pub fn broker(error: AmqpError, task_id: Option<String>) -> Self {
        let retry_after = match error {
            AmqpError::Busy(_) => 1,
            _ => DEPENDENCY_RETRY_AFTER,
        };
        Self::Unavailable {
            dependency: "RabbitMQ",
            reason: error.to_string(),
            task_id,
            retry_after,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Validation { .. } => ("validation-error", "The request is invalid"),
            Self::MalformedBody(_) => ("malformed-body", "The body is not valid JSON"),
            Self::PayloadTooLarge { .. } => ("payload-too-large", "The body is too large"),
            Self::NotFound(_) => ("not-found", "Not found"),
            Self::Conflict(_) => ("conflict", "The task is not in a state for this"),
            Self::MethodNotAllowed { .. } => ("method-not-allowed", "Method not allowed"),
            Self::Unauthorized => ("unauthorized", "Unauthorized"),
            Self::Forbidden(_) => ("forbidden", "Forbidden"),
            Self::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            Self::RateLimited { .. } => ("rate-limited", "Too many requests"),
            Self::ResultBackendOff => ("result-backend-off", "The result backend is off"),
            Self::Gone(_) => ("result-expired", "The result has expired"),
            Self::Unavailable { .. } => ("dependency-unavailable", "A dependency is unavailable"),
            Self::Internal(_) => ("internal-error", "Internal error"),
        }
    }
}

/// The one error body shape (`application/problem+json`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:kobe:problem:<kind>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// The offending field, for validation errors (`kwargs.duration_ms`, `Idempotency-Key`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MalformedBody(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) | Self::ResultBackendOff => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Gone(_) => StatusCode::GONE,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let problem = self.problem();
        let mut response = HttpResponse::build(self.status_code());
        match self {
            Self::Unavailable { retry_after, .. } => {
                response.insert_header(("Retry-After", retry_after.to_string()));
            }
            Self::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                response.insert_header(("Retry-After", seconds.max(1).to_string()));
            }
            Self::Unauthorized => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            Self::MethodNotAllowed { allow } => {
                response.insert_header(("Allow", *allow));
            }
            _ => {}
        }
        response
            .content_type("application/problem+json")
            .json(problem)
    }
}

impl ApiError {
    /// The body this error answers with (also one item's answer in a bulk submission).
    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        let (kind, title) = self.kind();
        let detail = match self {
            Self::Internal(cause) => {
                tracing::error!(cause = %cause, "internal error");
                "internal error; see the server log".to_owned()
            }
            other => other.to_string(),
        };
        let (field, task_id) = match self {
            Self::Validation { field, .. } => (Some(field.clone()), None),
            Self::Unavailable { task_id, .. } => (None, task_id.clone()),
            _ => (None, None),
        };
        Problem {
            kind: format!("urn:kobe:problem:{kind}"),
            title,
            status: status.as_u16(),
            detail,
            field,
            task_id,
        }
    }
}
