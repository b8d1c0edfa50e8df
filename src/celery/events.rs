//! Celery's task events as they arrive on the `celeryev` exchange: one JSON object per message
//! (or a list of them, when a worker flushes a buffer), each with its `type`, the task's `uuid`,
//! the worker's `hostname` and the `timestamp` it was sent at.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::store::attempts::{Reported, Transition};

/// One task event, with the fields Kobe reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub timestamp: f64,
    /// `task-succeeded`: the result's `repr`.
    #[serde(default)]
    pub result: Option<String>,
    /// `task-failed`, `task-retried`: the exception's `repr`.
    #[serde(default)]
    pub exception: Option<String>,
    /// `task-revoked`: whether the task was running (and terminated) or had expired.
    #[serde(default)]
    pub terminated: Option<bool>,
    #[serde(default)]
    pub expired: Option<bool>,
}

/// The task events of one message; anything else in it (a worker's heartbeat, a malformed
/// body) is none.
pub(super) fn parse(body: &[u8]) -> Vec<TaskEvent> {
    let events = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(events)) => events,
        Ok(event @ Value::Object(_)) => vec![event],
        _ => Vec::new(),
    };
    events
        .into_iter()
        .filter_map(|event| serde_json::from_value::<TaskEvent>(event).ok())
        .filter(|event| event.kind.starts_with("task-") && !event.uuid.is_empty())
        .collect()
}

impl TaskEvent {
    /// What the event reports; `None` for those that change no state (`task-sent`,
    /// `task-received`, `task-rejected`). A success's result is filled in by the caller.
    pub fn reported(&self) -> Option<Reported> {
        let cause = || self.exception.clone().unwrap_or_else(|| self.kind.clone());
        Some(match self.kind.as_str() {
            "task-started" => Reported::Started {
                worker: self.hostname.clone(),
            },
            "task-retried" => Reported::Outcome(Transition::Retry {
                root_cause: cause(),
                owed: false,
            }),
            "task-succeeded" => Reported::Outcome(Transition::Success {
                result: Value::Null,
            }),
            "task-failed" => Reported::Outcome(Transition::Failure {
                root_cause: cause(),
                dead_letter: false,
            }),
            "task-revoked" => Reported::Outcome(Transition::Revoked {
                root_cause: match (self.expired, self.terminated) {
                    (Some(true), _) => "expired before a Celery worker ran it".into(),
                    (_, Some(true)) => format!("revoked and terminated on {}", self.hostname),
                    _ => format!("revoked on {}", self.hostname),
                },
            }),
            _ => return None,
        })
    }
}

/// Deepest nesting of lists and dicts read from a `repr`; deeper is kept as text. An event comes
/// from whoever can publish on `celeryev`: its nesting must not choose how deep `serve` recurses.
const MAX_REPR_DEPTH: usize = 32;
/// Longest `repr` read as a value (Celery cuts its own at 1,024 characters); longer is text.
const MAX_REPR_BYTES: usize = 64 * 1024;

/// A Python `repr` as JSON where it is one of JSON's values (numbers, strings, `None`, `True`,
/// `False`, and lists and dicts of them, nested at most 32 deep); any other `repr` as its text.
pub fn value_of_repr(repr: &str) -> Value {
    if repr.len() > MAX_REPR_BYTES {
        return Value::String(repr.to_owned());
    }
    Repr::new(repr)
        .value()
        .unwrap_or_else(|| Value::String(repr.to_owned()))
}

/// A small reader of Python literals.
struct Repr<'a> {
    text: &'a [u8],
    at: usize,
    /// Lists and dicts open around the reader now.
    depth: usize,
}

impl<'a> Repr<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            at: 0,
            depth: 0,
        }
    }

    /// The whole text as one literal, or `None`.
    fn value(mut self) -> Option<Value> {
        let value = self.literal()?;
        self.blank();
        (self.at == self.text.len()).then_some(value)
    }

    fn blank(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.blank();
        let found = self.text.get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn literal(&mut self) -> Option<Value> {
        self.blank();
        match *self.text.get(self.at)? {
            b'[' | b'(' | b'{' if self.depth >= MAX_REPR_DEPTH => None,
            b'[' | b'(' => {
                self.depth += 1;
                let value = self.sequence();
                self.depth -= 1;
                value
            }
            b'{' => {
                self.depth += 1;
                let value = self.dict();
                self.depth -= 1;
                value
            }
            b'\'' | b'"' => self.string().map(Value::String),
            _ => self.word(),
        }
    }

    /// A list or tuple, as a JSON array.
    fn sequence(&mut self) -> Option<Value> {
        let close = if self.text[self.at] == b'[' {
            b']'
        } else {
            b')'
        };
        self.at += 1;
        let mut items = Vec::new();
        loop {
            if self.eat(close) {
                return Some(Value::Array(items));
            }
            items.push(self.literal()?);
            if !self.eat(b',') {
                return self.eat(close).then_some(Value::Array(items));
            }
        }
    }

    /// A dict with string keys, as a JSON object.
    fn dict(&mut self) -> Option<Value> {
        self.at += 1;
        let mut object = Map::new();
        loop {
            if self.eat(b'}') {
                return Some(Value::Object(object));
            }
            self.blank();
            let key = match self.text.get(self.at)? {
                b'\'' | b'"' => self.string()?,
                _ => return None,
            };
            if !self.eat(b':') {
                return None;
            }
            object.insert(key, self.literal()?);
            if !self.eat(b',') {
                return self.eat(b'}').then_some(Value::Object(object));
            }
        }
    }

    /// A quoted string with Python's common escapes.
    fn string(&mut self) -> Option<String> {
        let quote = self.text[self.at];
        self.at += 1;
        let mut bytes = Vec::new();
        loop {
            let byte = *self.text.get(self.at)?;
            self.at += 1;
            match byte {
                b if b == quote => return String::from_utf8(bytes).ok(),
                b'\\' => {
                    let escaped = *self.text.get(self.at)?;
                    self.at += 1;
                    bytes.push(match escaped {
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'\\' | b'\'' | b'"' => escaped,
                        _ => return None,
                    });
                }
                b => bytes.push(b),
            }
        }
    }

    /// A number, `None`, `True` or `False`.
    fn word(&mut self) -> Option<Value> {
        let start = self.at;
        while self
            .text
            .get(self.at)
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        {
            self.at += 1;
        }
        let word = std::str::from_utf8(&self.text[start..self.at]).ok()?;
        match word {
            "None" => Some(Value::Null),
            "True" => Some(Value::Bool(true)),
            "False" => Some(Value::Bool(false)),
            _ => serde_json::from_str::<serde_json::Number>(word)
                .ok()
                .map(Value::Number),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_literals_read_as_json_and_anything_else_as_its_text() {
        assert_eq!(value_of_repr("42"), json!(42));
        assert_eq!(value_of_repr("-1.5"), json!(-1.5));
        assert_eq!(value_of_repr("None"), Value::Null);
        assert_eq!(value_of_repr("'it\\'s'"), json!("it's"));
        assert_eq!(
            value_of_repr("{'a': [1, 2, (3, True)], \"b\": None}"),
            json!({"a": [1, 2, [3, true]], "b": null})
        );
        assert_eq!(value_of_repr("[]"), json!([]));
        assert_eq!(value_of_repr("<object at 0x7f>"), json!("<object at 0x7f>"));
        assert_eq!(value_of_repr("{1: 2}"), json!("{1: 2}"));
        assert_eq!(value_of_repr("[1, 2"), json!("[1, 2"));
    }

    #[test]
    fn a_repr_nested_or_long_past_its_bounds_is_kept_as_text_without_recursing_into_it() {
        // The crafted event that overflowed serve's stack: 200,000 open brackets.
        let crafted = "[".repeat(200_000);
        assert_eq!(value_of_repr(&crafted), Value::String(crafted.clone()));
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let mut deepest = json!(1);
        for _ in 0..MAX_REPR_DEPTH {
            deepest = json!([deepest]);
        }
        assert_eq!(value_of_repr(&nested(MAX_REPR_DEPTH)), deepest);
        let deeper = nested(MAX_REPR_DEPTH + 1);
        assert_eq!(value_of_repr(&deeper), Value::String(deeper.clone()));
        let long = format!("[{}]", "1, ".repeat(MAX_REPR_BYTES / 3));
        assert!(value_of_repr(&long).is_string());
    }

    #[test]
    fn a_message_holds_one_event_or_a_list_and_only_task_events_count() {
        let one = br#"{"type": "task-started", "uuid": "t1", "hostname": "celery@h", "timestamp": 1.5, "pid": 7}"#;
        let events = parse(one);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].hostname, "celery@h");
        assert!(matches!(
            events[0].reported(),
            Some(Reported::Started { ref worker }) if worker == "celery@h"
        ));
        let list = br#"[{"type": "task-received", "uuid": "t1", "name": "add"},
                        {"type": "task-failed", "uuid": "t1", "exception": "ValueError('boom')"},
                        {"type": "worker-heartbeat", "hostname": "celery@h"}]"#;
        let events = parse(list);
        assert_eq!(events.len(), 2, "the heartbeat is no task event");
        assert!(events[0].reported().is_none(), "received changes no state");
        assert!(matches!(
            events[1].reported(),
            Some(Reported::Outcome(Transition::Failure { ref root_cause, .. })) if root_cause == "ValueError('boom')"
        ));
        assert!(parse(b"not json").is_empty());
    }
}
