//! The wire format: Celery's message protocol v2, so Python Celery clients and workers can talk to
//! Kobe, plus a W3C `traceparent` header.
//!
//! Headers carry the routing metadata (`task`, `id`, `retries`, `timelimit` …); the body is the JSON
//! array `[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]`.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};
use serde_json::{json, Map, Value};

use crate::domain::{Priority, TaskId};

/// Longest `argsrepr`/`kwargsrepr` we send; Celery truncates them too.
const REPR_LIMIT: usize = 1024;

/// One task invocation as it travels through the broker.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskMessage {
    pub id: TaskId,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Attempts already made and failed; 0 on the first delivery.
    pub retries: u32,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// ISO 8601: run no earlier than this.
    pub eta: Option<String>,
    /// ISO 8601: do not run after this.
    pub expires: Option<String>,
    /// Hard time limit, in seconds.
    pub hard_time_limit: Option<f64>,
    /// Soft time limit, in seconds.
    pub soft_time_limit: Option<f64>,
    pub priority: Priority,
    /// W3C trace context of the request that submitted the task.
    pub traceparent: Option<String>,
    /// Who published it (`kobe@hostname`).
    pub origin: String,
    /// The workflow it is a step of (header `kobe_workflow`; Celery workers ignore it).
    pub workflow_id: Option<String>,
    /// Celery's canvas riding on the body (`callbacks`, `errbacks`, `chain`, `chord`), kept
    /// when any of them is set: what runs after this task.
    pub embed: Option<Value>,
}

/// The header naming the workflow a task is a step of.
pub const WORKFLOW_HEADER: &str = "kobe_workflow";

/// Why a delivery could not be read as a task message. Such a message is dead-lettered.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MessageError {
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    #[error("header `{0}` has the wrong type")]
    BadHeader(&'static str),
    #[error("unsupported content type `{0}` (only application/json)")]
    ContentType(String),
    #[error("body is not [args, kwargs, embed]: {0}")]
    Body(String),
}

impl TaskMessage {
    /// A first attempt of `task` with the given arguments; other fields take their defaults.
    pub fn new(id: TaskId, task: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Self {
            root_id: Some(id.to_string()),
            id,
            task: task.to_owned(),
            args,
            kwargs,
            retries: 0,
            parent_id: None,
            group: None,
            eta: None,
            expires: None,
            hard_time_limit: None,
            soft_time_limit: None,
            priority: Priority::default(),
            traceparent: None,
            origin: origin(),
            workflow_id: None,
            embed: None,
        }
    }

    /// The JSON body Celery expects.
    pub fn body(&self) -> Vec<u8> {
        let none = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
        let body = json!([self.args, self.kwargs, self.embed.as_ref().unwrap_or(&none)]);
        serde_json::to_vec(&body).unwrap_or_default()
    }

    pub fn headers(&self) -> FieldTable {
        let text = |s: &str| AmqpValue::LongString(s.to_owned());
        let optional = |s: &Option<String>| s.as_deref().map(text).unwrap_or(AmqpValue::Void);
        let seconds = |s: Option<f64>| s.map(AmqpValue::Double).unwrap_or(AmqpValue::Void);
        let mut h = FieldTable::new();
        h.insert("lang".into(), text("py"));
        h.insert("task".into(), text(&self.task));
        h.insert("id".into(), text(self.id.as_str()));
        h.insert("root_id".into(), optional(&self.root_id));
        h.insert("parent_id".into(), optional(&self.parent_id));
        h.insert("group".into(), optional(&self.group));
        h.insert(
            "retries".into(),
            AmqpValue::LongLongInt(i64::from(self.retries)),
        );
        h.insert("eta".into(), optional(&self.eta));
        h.insert("expires".into(), optional(&self.expires));
        // Celery sends [hard, soft], in that order.
        h.insert(
            "timelimit".into(),
            AmqpValue::FieldArray(vec![
                seconds(self.hard_time_limit),
                seconds(self.soft_time_limit),
            ]),
        );
        h.insert(
            "argsrepr".into(),
            text(&repr(&Value::from(self.args.clone()))),
        );
        h.insert(
            "kwargsrepr".into(),
            text(&repr(&Value::Object(self.kwargs.clone()))),
        );
        h.insert("origin".into(), text(&self.origin));
        if let Some(traceparent) = &self.traceparent {
            h.insert("traceparent".into(), text(traceparent));
        }
        if let Some(workflow) = &self.workflow_id {
            h.insert(WORKFLOW_HEADER.into(), text(workflow));
        }
        h
    }

    /// AMQP properties: persistent, JSON, `message_id` = `correlation_id` = task id.
    pub fn properties(&self) -> AmqpProperties {
        AmqpProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(self.id.to_string())
            .with_message_id(self.id.to_string())
            .with_delivery_mode(2)
            .with_priority(self.priority.value())
            .with_headers(self.headers())
    }

    /// Reads a delivery's properties and body.
    pub(crate) fn decode(properties: &AmqpProperties, body: &[u8]) -> Result<Self, MessageError> {
        if let Some(content_type) = properties.content_type() {
            if content_type != "application/json" {
                return Err(MessageError::ContentType(content_type.clone()));
            }
        }
        let empty = FieldTable::new();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let task = required_text(headers, "task")?;
        let id = TaskId::parse(&required_text(headers, "id")?)
            .map_err(|_| MessageError::BadHeader("id"))?;
        let retries = match headers.get("retries") {
            None | Some(AmqpValue::Void) => 0,
            Some(value) => integer(value)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(MessageError::BadHeader("retries"))?,
        };
        let (hard_time_limit, soft_time_limit) = match headers.get("timelimit") {
            None | Some(AmqpValue::Void) => (None, None),
            Some(AmqpValue::FieldArray(limits)) => {
                let at = |i: usize| limits.get(i).and_then(float);
                (at(0), at(1))
            }
            Some(_) => return Err(MessageError::BadHeader("timelimit")),
        };
        let priority = properties
            .priority()
            .map(|p| Priority::new(i64::from(p.min(Priority::MAX))))
            .transpose()
            .map_err(|_| MessageError::BadHeader("priority"))?
            .unwrap_or_default();

        let (args, kwargs, embed) = parse_body(body)?;
        Ok(Self {
            id,
            task,
            args,
            kwargs,
            retries,
            root_id: optional_text(headers, "root_id"),
            parent_id: optional_text(headers, "parent_id"),
            group: optional_text(headers, "group"),
            eta: optional_text(headers, "eta"),
            expires: optional_text(headers, "expires"),
            hard_time_limit,
            soft_time_limit,
            priority,
            traceparent: optional_text(headers, "traceparent"),
            origin: optional_text(headers, "origin").unwrap_or_default(),
            workflow_id: optional_text(headers, WORKFLOW_HEADER),
            embed,
        })
    }
}

/// The body's arguments, and its canvas when any part of it is set.
type Body = (Vec<Value>, Map<String, Value>, Option<Value>);

fn parse_body(body: &[u8]) -> Result<Body, MessageError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| MessageError::Body(e.to_string()))?;
    let Value::Array(mut parts) = value else {
        return Err(MessageError::Body("not a JSON array".into()));
    };
    if parts.len() < 2 {
        return Err(MessageError::Body("fewer than two elements".into()));
    }
    let embed = parts.get(2).filter(|embed| {
        ["callbacks", "errbacks", "chain", "chord"]
            .iter()
            .any(|part| embed.get(part).is_some_and(|v| !v.is_null()))
    });
    let embed = embed.cloned();
    let kwargs = match parts.swap_remove(1) {
        Value::Object(map) => map,
        Value::Null => Map::new(),
        _ => return Err(MessageError::Body("kwargs is not an object".into())),
    };
    let args = match parts.swap_remove(0) {
        Value::Array(args) => args,
        Value::Null => Vec::new(),
        _ => return Err(MessageError::Body("args is not an array".into())),
    };
    Ok((args, kwargs, embed))
}

fn required_text(headers: &FieldTable, name: &'static str) -> Result<String, MessageError> {
    match headers.get(name) {
        None | Some(AmqpValue::Void) => Err(MessageError::MissingHeader(name)),
        Some(_) => super::wire::text(headers, name).ok_or(MessageError::BadHeader(name)),
    }
}

fn optional_text(headers: &FieldTable, name: &str) -> Option<String> {
    super::wire::text(headers, name)
}

pub(crate) fn integer(value: &AmqpValue) -> Option<i64> {
    match *value {
        AmqpValue::ShortShortInt(n) => Some(n.into()),
        AmqpValue::ShortShortUInt(n) => Some(n.into()),
        AmqpValue::ShortInt(n) => Some(n.into()),
        AmqpValue::ShortUInt(n) => Some(n.into()),
        AmqpValue::LongInt(n) => Some(n.into()),
        AmqpValue::LongUInt(n) => Some(n.into()),
        AmqpValue::LongLongInt(n) => Some(n),
        AmqpValue::LongString(ref s) => s.parse().ok(),
        _ => None,
    }
}

fn float(value: &AmqpValue) -> Option<f64> {
    match *value {
        AmqpValue::Float(f) => Some(f.into()),
        AmqpValue::Double(f) => Some(f),
        _ => integer(value).map(|n| n as f64),
    }
}

fn repr(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > REPR_LIMIT {
        let mut cut = REPR_LIMIT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn origin() -> String {
    let host = crate::config::host_name().unwrap_or_else(|| "unknown".to_owned());
    format!("kobe@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> TaskMessage {
        let mut kwargs = Map::new();
        kwargs.insert("duration_ms".into(), json!(200));
        let mut m = TaskMessage::new(TaskId::generate(), "demo_long_io", vec![json!(1)], kwargs);
        m.retries = 2;
        m.hard_time_limit = Some(30.0);
        m.soft_time_limit = Some(25.0);
        m.priority = Priority::new(7).unwrap();
        m.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        m
    }

    #[test]
    fn round_trips_through_properties_and_body() {
        let m = message();
        let decoded = TaskMessage::decode(&m.properties(), &m.body()).unwrap();
        assert_eq!(decoded, m);
    }

    #[test]
    fn follows_celery_protocol_v2() {
        let m = message();
        let props = m.properties();
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.correlation_id().as_deref(), Some(m.id.as_str()));
        assert_eq!(props.message_id().as_deref(), Some(m.id.as_str()));
        assert_eq!(props.priority(), &Some(7));
        let headers = props.headers().clone().unwrap();
        assert_eq!(
            headers.get("timelimit"),
            Some(&AmqpValue::FieldArray(vec![
                AmqpValue::Double(30.0),
                AmqpValue::Double(25.0)
            ]))
        );
        for name in [
            "lang",
            "task",
            "id",
            "root_id",
            "parent_id",
            "group",
            "retries",
            "eta",
            "expires",
            "argsrepr",
            "kwargsrepr",
            "origin",
        ] {
            assert!(headers.contains_key(name), "{name}");
        }
        let body: Value = serde_json::from_slice(&m.body()).unwrap();
        assert_eq!(body[2]["chord"], Value::Null);
        assert_eq!(body[1]["duration_ms"], 200);
    }

    #[test]
    fn reads_a_message_a_python_client_would_send() {
        // Celery sends a null time limit pair and integer retries.
        let mut headers = FieldTable::new();
        headers.insert("task".into(), AmqpValue::LongString("demo_long_io".into()));
        headers.insert("id".into(), AmqpValue::LongString("abc-123".into()));
        headers.insert("retries".into(), AmqpValue::LongInt(0));
        headers.insert(
            "timelimit".into(),
            AmqpValue::FieldArray(vec![AmqpValue::Void, AmqpValue::Void]),
        );
        let props = AmqpProperties::default().with_headers(headers);
        let m = TaskMessage::decode(&props, br#"[[], {}, {"callbacks": null}]"#).unwrap();
        assert_eq!(m.task, "demo_long_io");
        assert_eq!(m.hard_time_limit, None);
    }

    #[test]
    fn malformed_messages_say_why() {
        let m = message();
        let props = m.properties();
        assert!(matches!(
            TaskMessage::decode(&props, b"not json"),
            Err(MessageError::Body(_))
        ));
        assert!(matches!(
            TaskMessage::decode(&props, b"[1, {}]"),
            Err(MessageError::Body(_))
        ));
        assert_eq!(
            TaskMessage::decode(&AmqpProperties::default(), &m.body()),
            Err(MessageError::MissingHeader("task"))
        );
        let xml = props.clone().with_content_type("application/xml".into());
        assert!(matches!(
            TaskMessage::decode(&xml, &m.body()),
            Err(MessageError::ContentType(_))
        ));
    }
}
