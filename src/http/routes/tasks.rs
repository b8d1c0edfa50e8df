//! `/task/*`: submit a task, read its status.

use actix_web::{web, HttpRequest, HttpResponse};
use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::amqp::{Outgoing, TaskMessage};
use crate::domain::{Priority, TaskId};
use crate::http::{ApiError, AppState};
use crate::store::{TaskDocument, Transition};
use crate::telemetry::trace::TraceContext;

/// Body of `POST /task/start`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStart {
    pub task_name: String,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// 0 (lowest) to 9 (highest).
    #[serde(default)]
    pub priority: Option<i64>,
}

/// Parses JSON into `T`, naming the field that failed.
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::MalformedBody(inner.to_string());
        }
        let message = inner.to_string();
        // serde names missing and unknown fields only in its message: "missing field `x`".
        let named = message.split('`').nth(1).filter(|_| {
            message.starts_with("missing field") || message.starts_with("unknown field")
        });
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
    })
}

#[derive(Debug, Serialize)]
struct Accepted {
    task_id: String,
}

/// `POST /task/start`: record the task (`PENDING`), publish it, wait for the broker's confirm,
/// answer `202 {"task_id"}`.
#[tracing::instrument(name = "http.task.start", skip_all, fields(task = tracing::field::Empty, task_id = tracing::field::Empty, trace_id = tracing::field::Empty))]
pub async fn start(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // Join the caller's trace if it sent one; the task's message continues it.
    let trace = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map(|parent| parent.child())
        .unwrap_or_else(TraceContext::new_root);
    let request: TaskStart = parse_body(&body)?;
    let span = tracing::Span::current();
    span.record("task", request.task_name.as_str());
    span.record("trace_id", trace.trace_id_hex());

    let task = state.registry.get(&request.task_name).ok_or_else(|| {
        ApiError::validation(
            "task_name",
            format!(
                "unknown task `{}`; registered tasks: {}",
                request.task_name,
                state.registry.names().join(", ")
            ),
        )
    })?;
    task.validate(&request.args, &request.kwargs)
        .map_err(|e| ApiError::validation(e.field, e.reason))?;
    let priority = match request.priority {
        Some(p) => Priority::new(p).map_err(|reason| ApiError::validation("priority", reason))?,
        None => Priority::default(),
    };

    let id = TaskId::generate();
    span.record("task_id", id.as_str());
    let route = state.topology.route_of(task.name()).to_owned();
    let mut document = TaskDocument::pending(
        &id,
        task.name(),
        request.args.clone(),
        request.kwargs.clone(),
        &route,
        priority.value(),
    );
    document.trace_id = Some(trace.trace_id_hex());
    state
        .tasks
        .insert(&document)
        .await
        .map_err(ApiError::mongodb)?;

    let mut message = TaskMessage::new(id.clone(), task.name(), request.args, request.kwargs);
    message.priority = priority;
    message.traceparent = Some(trace.to_string());
    let outgoing = Outgoing {
        exchange: state.topology.tasks_exchange(),
        routing_key: route,
        body: message.body(),
        properties: message.properties(),
    };
    if let Err(error) = state.publisher.publish(outgoing).await {
        // The client is told the task was not accepted, so it must never run: close it as
        // FAILURE. (If the message did reach the broker after all, the worker finds the task
        // finished and drops it.)
        let closed = state
            .tasks
            .transition(
                id.as_str(),
                Transition::Failure {
                    root_cause: format!("not published: {error}"),
                },
            )
            .await;
        if let Err(e) = closed {
            tracing::error!(error = %e, "cannot record the publish failure");
        }
        tracing::warn!(error = %error, "task not published");
        return Err(ApiError::broker(error, Some(id.to_string())));
    }

    state
        .metrics
        .tasks_submitted
        .with_label_values(&[task.name()])
        .inc();
    tracing::info!("task accepted");
    Ok(HttpResponse::Accepted().json(Accepted {
        task_id: id.to_string(),
    }))
}

fn timestamp(t: Option<DateTime>) -> Value {
    t.and_then(|t| t.try_to_rfc3339_string().ok())
        .map(Value::String)
        .unwrap_or(Value::Null)
}

/// `GET /task/status/{id}`: the task's state from MongoDB. An id never submitted is a 404.
#[tracing::instrument(name = "http.task.status", skip(state))]
pub async fn status(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let not_found = || ApiError::NotFound(format!("no task with id `{id}`"));
    let id = TaskId::parse(&id).map_err(|_| not_found())?;
    let task = state
        .tasks
        .get(id.as_str())
        .await
        .map_err(ApiError::mongodb)?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(status_body(&task)))
}

fn status_body(task: &TaskDocument) -> Value {
    json!({
        "task_id": task.id,
        "task_name": task.task_name,
        "state": task.state,
        "ready": task.state.is_final(),
        "retries": task.retries,
        "created_at": timestamp(Some(task.created_at)),
        "updated_at": timestamp(Some(task.updated_at)),
        "started_at": timestamp(task.started_at),
        "finished_at": timestamp(task.finished_at),
        "root_cause": task.root_cause,
    })
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
