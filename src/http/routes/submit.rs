//! `POST /task/start`: parse and check a submission, then hand it to the submitter
//! ([`crate::submit`]) and answer for it.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::Instrument;
use utoipa::ToSchema;

use crate::domain::{Fingerprint, Priority, TaskId};
use crate::http::error::Problem;
use crate::http::{ApiError, AppState};
use crate::submit::{NewTask, SubmitError};
use crate::telemetry::trace::TraceContext;

/// Body of `POST /task/start`. Unknown fields are refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskStart {
    /// A registered task (see `GET /tasks`).
    #[schema(example = "demo_long_io")]
    pub task_name: String,
    /// Positional arguments.
    #[serde(default)]
    #[schema(value_type = Vec<Value>)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    #[schema(value_type = Object, example = json!({"duration_ms": 200}))]
    pub kwargs: Map<String, Value>,
    /// 0 (lowest) to 9 (highest); higher runs first when the queue is backed up.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<i64>,
    /// Route to send it to instead of the configured one (must be a known route).
    #[serde(default)]
    pub queue: Option<String>,
    /// Run no earlier than this many seconds from now. Exclusive with `eta`.
    #[serde(default)]
    pub countdown: Option<f64>,
    /// Run no earlier than this time (RFC 3339). Exclusive with `countdown`.
    #[serde(default)]
    pub eta: Option<String>,
    /// Do not run after this: an RFC 3339 time, or seconds from now.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "2030-01-01T00:00:00Z")]
    pub expires: Option<Value>,
    /// Hard time limit in seconds: the attempt is abandoned and fails.
    #[serde(default)]
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds: the handler is told and may clean up. Below `time_limit`.
    #[serde(default)]
    pub soft_time_limit: Option<f64>,
    /// A client key: submissions with the same key (and task name) create one task.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub dedup_key: Option<String>,
    /// Without a key: submissions with the same task name and arguments create one task.
    #[serde(default)]
    pub dedup: Option<bool>,
}

/// Longest accepted idempotency key.
pub(crate) const MAX_KEY_LEN: usize = 256;
/// Farthest accepted countdown or ETA.
pub(crate) const MAX_HORIZON: Duration = Duration::from_secs(30 * 24 * 3600);

pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    // The plain parser first: tracking every element's path costs more than the parse itself
    // on a large body, and is only needed to name the field of a body that does not fit.
    if let Ok(parsed) = serde_json::from_slice(body) {
        return Ok(parsed);
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(named)
}

/// `parse_body` for a value already parsed (one item of a bulk submission).
pub(crate) fn parse_value<T: for<'de> Deserialize<'de>>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(named)
}

/// A body that does not fit its type, as a 422 naming the field (or a 400 when not JSON).
fn named(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::MalformedBody(inner.to_string());
    }
    let message = inner.to_string();
    // serde names missing and unknown fields only in its message: "missing field `x`".
    let named = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("missing field") || message.starts_with("unknown field"));
    let field = match (path.as_str(), named) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => "body".to_owned(),
        (path, Some(name)) if message.starts_with("missing") => format!("{path}.{name}"),
        (path, _) => path.to_owned(),
    };
    let reason = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    ApiError::validation(field, reason)
}

/// Reads the body, refusing more than `limit` bytes with a 413 before reading it all.
pub(crate) async fn read_body(
    request: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let declared = request
        .headers()
        .get("Content-Length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::MalformedBody(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Bodies larger than this are read and checked on the blocking pool, so an HTTP worker thread
/// (one of a few, each serving many connections) is never held by one request's CPU work.
const INLINE_BYTES: usize = 64 * 1024;

/// Runs `work` (reading and checking a body of `bytes`) where it cannot hold up other requests:
/// inline when small, else on the blocking pool.
pub(crate) async fn off_thread<T: Send + 'static>(
    bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    if bytes <= INLINE_BYTES {
        return Ok(work());
    }
    web::block(work)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking pool: {e}")))
}

/// `202` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub task_id: String,
}

/// `200` answer to a repeated submission.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Deduplicated {
    /// The first submission's task.
    pub task_id: String,
    pub deduplicated: bool,
}

/// A time limit: above 0 and at most the worker's longest (which stays below the broker's
/// `consumer_timeout`, see docker-compose.yml).
fn seconds(field: &str, value: Option<f64>) -> Result<Option<Duration>, ApiError> {
    let most = crate::domain::MAX_TIME_LIMIT;
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s <= most.as_secs_f64() => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(_) => Err(ApiError::validation(
            field,
            format!("seconds, above 0 and at most {}", most.as_secs()),
        )),
    }
}

fn rfc3339(field: &str, value: &str) -> Result<DateTime, ApiError> {
    DateTime::parse_rfc3339_str(value)
        .map_err(|_| ApiError::validation(field, "an RFC 3339 time such as 2030-01-01T00:00:00Z"))
}

/// Timing fields, checked against each other.
struct Timing {
    eta: Option<DateTime>,
    expires: Option<DateTime>,
    hard: Option<Duration>,
    soft: Option<Duration>,
}

fn timing(submission: &TaskStart) -> Result<Timing, ApiError> {
    let now = DateTime::now().timestamp_millis();
    let at = |ms: i64| DateTime::from_millis(ms);
    let eta = match (submission.countdown, &submission.eta) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "eta",
                "give `countdown` or `eta`, not both",
            ))
        }
        (Some(c), None) if c.is_finite() && (0.0..=MAX_HORIZON.as_secs_f64()).contains(&c) => {
            (c > 0.0).then(|| at(now + (c * 1000.0) as i64))
        }
        (Some(_), None) => {
            return Err(ApiError::validation(
                "countdown",
                format!("seconds between 0 and {}", MAX_HORIZON.as_secs()),
            ))
        }
        (None, Some(eta)) => Some(rfc3339("eta", eta)?),
        (None, None) => None,
    };
    let expires = match &submission.expires {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(rfc3339("expires", s)?),
        Some(Value::Number(n)) => {
            let s = n
                .as_f64()
                .filter(|s| *s > 0.0 && *s <= MAX_HORIZON.as_secs_f64())
                .ok_or_else(|| {
                    ApiError::validation("expires", "seconds from now must be above 0")
                })?;
            Some(at(now + (s * 1000.0) as i64))
        }
        Some(_) => {
            return Err(ApiError::validation(
                "expires",
                "an RFC 3339 time or a number of seconds",
            ))
        }
    };
    if let Some(expires) = expires {
        if expires.timestamp_millis() <= now {
            return Err(ApiError::validation("expires", "is already past"));
        }
        if eta.is_some_and(|eta| eta >= expires) {
            return Err(ApiError::validation(
                "expires",
                "is not after the start time",
            ));
        }
    }
    let hard = seconds("time_limit", submission.time_limit)?;
    let soft = seconds("soft_time_limit", submission.soft_time_limit)?;
    if let (Some(hard), Some(soft)) = (hard, soft) {
        if soft >= hard {
            return Err(ApiError::validation(
                "soft_time_limit",
                "must be below time_limit",
            ));
        }
    }
    Ok(Timing {
        eta,
        expires,
        hard,
        soft,
    })
}

/// Records the task (`PENDING`), publishes it, waits for the broker's confirm. A repeated
/// submission (same `Idempotency-Key`, `dedup_key`, or with `"dedup": true` the same arguments)
/// answers `200` with the first task's id and enqueues nothing.
#[utoipa::path(
    post,
    path = "/task/start",
    tag = "tasks",
    request_body = TaskStart,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Submissions with the same key create one task"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context to continue"),
    ),
    responses(
        (status = 202, description = "Recorded and confirmed by the broker", body = Accepted),
        (status = 200, description = "A repeated submission: the first task", body = Deduplicated),
        (status = 400, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong bearer token (with KOBE_API_TOKENS set)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field (named in `field`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the rate limit (with KOBE_RATE_LIMIT set); see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "RabbitMQ or MongoDB unavailable, or the publisher is full; see Retry-After. The task did not and will not run", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("bearer" = [])),
)]
pub async fn start(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // Join the caller's trace if it sent one; the task's message continues it. The span's parent
    // is set before the span is entered, as the exporter requires.
    let incoming = incoming_trace(&request);
    let span = tracing::info_span!(
        "http.task.start",
        task = tracing::field::Empty,
        task_id = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    let trace = crate::telemetry::otel::outgoing(&span, incoming.as_ref());
    start_traced(state, request, payload, trace)
        .instrument(span)
        .await
}

/// The trace context the caller sent (`traceparent`), if it is one.
pub(crate) fn incoming_trace(request: &HttpRequest) -> Option<TraceContext> {
    request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
}

async fn start_traced(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
    trace: TraceContext,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&request, payload, state.max_body_bytes).await?;
    let span = tracing::Span::current();
    span.record("trace_id", trace.trace_id_hex());
    let key = request.headers().get("Idempotency-Key").cloned();
    let checking = state.clone();
    let prepared = off_thread(body.len(), move || {
        let submission: TaskStart = parse_body(&body)?;
        prepare(
            &checking.registry,
            checking.submitter.topology(),
            submission,
            key.as_ref(),
            trace,
        )
        .map(|prepared| prepared.pack(&checking.submitter))
    })
    .await??;
    span.record("task", prepared.task.task_name.as_str());
    span.record("task_id", prepared.task.id.as_str());
    Ok(
        match submit_prepared(&state.submitter, state.dedup_window, prepared).await? {
            Submitted::Accepted { task_id } => HttpResponse::Accepted().json(Accepted { task_id }),
            Submitted::Duplicate { task_id } => HttpResponse::Ok().json(Deduplicated {
                task_id,
                deduplicated: true,
            }),
        },
    )
}

/// A submission checked field by field, ready for the submitter.
pub(crate) struct Prepared {
    task: NewTask,
    fingerprint: Option<Fingerprint>,
}

/// What became of a submission the API answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Accepted { task_id: String },
    Duplicate { task_id: String },
}

/// Checks a submission (the task, its arguments, priority, route, timing, key) and builds its
/// task; `header_key` is the request's `Idempotency-Key`, when it applies.
pub(crate) fn prepare(
    registry: &crate::tasks::Registry,
    topology: &crate::amqp::Topology,
    submission: TaskStart,
    header_key: Option<&actix_web::http::header::HeaderValue>,
    trace: TraceContext,
) -> Result<Prepared, ApiError> {
    let task = registry.get(&submission.task_name).ok_or_else(|| {
        ApiError::validation(
            "task_name",
            format!(
                "unknown task `{}`; registered tasks: {}",
                submission.task_name,
                registry.names().join(", ")
            ),
        )
    })?;
    crate::domain::document::check_arguments(&submission.args, &submission.kwargs)
        .map_err(|e| ApiError::validation(e.field, e.reason))?;
    crate::tasks::check_input(task.as_ref(), &submission.args, &submission.kwargs)
        .map_err(|e| ApiError::validation(e.field, e.reason))?;
    let priority = match submission.priority {
        Some(p) => Priority::new(p).map_err(|reason| ApiError::validation("priority", reason))?,
        None => task.priority().unwrap_or_default(),
    };
    let route = match &submission.queue {
        Some(queue) if topology.routes().contains(queue) => queue.clone(),
        Some(queue) => {
            return Err(ApiError::validation(
                "queue",
                format!(
                    "unknown route `{queue}`; routes: {}",
                    topology.routes().join(", ")
                ),
            ))
        }
        None => topology.route_of(task.name()).to_owned(),
    };
    let timing = timing(&submission)?;
    let fingerprint = fingerprint(header_key, &submission)?;
    let mut new = NewTask::new(TaskId::generate(), task.name(), &route);
    new.args = submission.args;
    new.kwargs = submission.kwargs;
    new.priority = priority;
    new.trace = trace;
    new.eta = timing.eta;
    new.expires = timing.expires;
    new.hard_time_limit = timing.hard;
    new.soft_time_limit = timing.soft;
    Ok(Prepared {
        task: new,
        fingerprint,
    })
}

/// Hands a checked submission to the submitter and says what became of it, as `/task/start`
/// answers it.
pub(crate) async fn submit_prepared(
    submitter: &crate::submit::Submitter,
    dedup_window: Duration,
    prepared: Prepared,
) -> Result<Submitted, ApiError> {
    let Prepared { task, fingerprint } = prepared;
    let id = task.id.to_string();
    let name = task.task_name.clone();
    let submitted = match &fingerprint {
        Some(fingerprint) => submitter.submit_once(task, fingerprint, dedup_window).await,
        None => submitter
            .submit(task)
            .await
            .map(|()| crate::submit::Submitted::Accepted),
    };
    answered(&id, &name, submitted)
}

impl Prepared {
    /// Keeps large arguments as JSON text from here on (see [`crate::submit::Submitter::pack`]).
    pub(crate) fn pack(mut self, submitter: &crate::submit::Submitter) -> Self {
        submitter.pack(&mut self.task);
        self
    }

    /// With a dedup fingerprint: it must go through [`submit_prepared`] on its own.
    pub fn keyed(&self) -> bool {
        self.fingerprint.is_some()
    }

    pub(crate) fn into_task(self) -> NewTask {
        self.task
    }
}

/// The submitter's answer for task `id` of `name`, as the API says it (counted and logged).
pub fn answered(
    id: &str,
    name: &str,
    submitted: Result<crate::submit::Submitted, SubmitError>,
) -> Result<Submitted, ApiError> {
    match submitted {
        Ok(crate::submit::Submitted::Accepted) => {
            crate::telemetry::metrics::metrics()
                .tasks_submitted
                .with_label_values(&[name])
                .inc();
            tracing::info!(task_id = %id, "task accepted");
            Ok(Submitted::Accepted {
                task_id: id.to_owned(),
            })
        }
        Ok(crate::submit::Submitted::Duplicate { task_id }) => {
            tracing::info!(first_task_id = %task_id, "duplicate submission answered with the first task");
            Ok(Submitted::Duplicate { task_id })
        }
        Err(error) => {
            tracing::warn!(task_id = %id, error = %error, "task not accepted");
            Err(match error {
                SubmitError::Store(e) => ApiError::store(e),
                SubmitError::NotPublished(e) => ApiError::broker(e, Some(id.to_owned())),
                SubmitError::InvalidId(id) => ApiError::Internal(format!("invalid task id {id}")),
            })
        }
    }
}

fn fingerprint(
    header_key: Option<&actix_web::http::header::HeaderValue>,
    submission: &TaskStart,
) -> Result<Option<Fingerprint>, ApiError> {
    let key = |field: &str, value: &str| -> Result<Fingerprint, ApiError> {
        if value.is_empty() || value.len() > MAX_KEY_LEN {
            return Err(ApiError::validation(
                field,
                format!("must be 1–{MAX_KEY_LEN} characters"),
            ));
        }
        Ok(Fingerprint::of_key(&submission.task_name, value))
    };
    // Both are checked when both are given; the header wins.
    let from_body = submission
        .dedup_key
        .as_deref()
        .map(|value| key("dedup_key", value))
        .transpose()?;
    if let Some(header) = header_key {
        // `to_str` lets a tab through; the documented alphabet is printable ASCII and space.
        let value = header
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..=0x7e).contains(&b)))
            .ok_or_else(|| ApiError::validation("Idempotency-Key", "must be visible ASCII"))?;
        return key("Idempotency-Key", value).map(Some);
    }
    if from_body.is_some() {
        return Ok(from_body);
    }
    Ok(submission.dedup.unwrap_or(false).then(|| {
        Fingerprint::of_arguments(&submission.task_name, &submission.args, &submission.kwargs)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> String {
        match parse_body::<TaskStart>(body.as_bytes()).unwrap_err() {
            ApiError::Validation { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of(r#"{"args": []}"#), "task_name");
        assert_eq!(field_of(r#"{"task_name": 3}"#), "task_name");
        assert_eq!(field_of(r#"{"task_name": "x", "args": {}}"#), "args");
        assert_eq!(field_of(r#"{"task_name": "x", "kwargs": []}"#), "kwargs");
        assert_eq!(field_of(r#"{"task_name": "x", "colour": "red"}"#), "colour");
        assert_eq!(
            field_of(r#"{"task_name": "x", "priority": "high"}"#),
            "priority"
        );
    }

    #[test]
    fn broken_json_is_a_malformed_body() {
        assert!(matches!(
            parse_body::<TaskStart>(b"{"),
            Err(ApiError::MalformedBody(_))
        ));
    }
}
