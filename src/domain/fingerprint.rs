//! Dedup fingerprints: what makes two submissions "the same task".

use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A stable identity of a submission, stored in `TaskDedup.task_fingerprint`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// From the task name and its arguments. Object keys are sorted at every depth before
    /// hashing, so `{"a":1,"b":2}` and `{"b":2,"a":1}` are the same submission.
    pub fn of_arguments(task_name: &str, args: &[Value], kwargs: &Map<String, Value>) -> Self {
        let mut canonical = String::new();
        canonical.push_str(task_name);
        canonical.push('\0');
        write_canonical(&Value::Array(args.to_vec()), &mut canonical);
        canonical.push('\0');
        write_canonical(&Value::Object(kwargs.clone()), &mut canonical);
        Self::hash("args", &canonical)
    }

    /// From a client's idempotency key, scoped to the task name.
    pub fn of_key(task_name: &str, key: &str) -> Self {
        Self::hash("key", &format!("{task_name}\0{key}"))
    }

    fn hash(kind: &str, canonical: &str) -> Self {
        let digest = Sha256::digest(canonical.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("{kind}:sha256:{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// JSON with object keys sorted, whatever order the map keeps them in.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(task: &str, args: Value, kwargs: Value) -> Fingerprint {
        Fingerprint::of_arguments(task, args.as_array().unwrap(), kwargs.as_object().unwrap())
    }

    #[test]
    fn key_order_does_not_matter_at_any_depth() {
        let a: Value =
            serde_json::from_str(r#"{"x": 1, "y": {"p": [1, {"m": 1, "n": 2}], "q": null}}"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"y": {"q": null, "p": [1, {"n": 2, "m": 1}]}, "x": 1}"#)
                .unwrap();
        assert_eq!(of("t", json!([]), a), of("t", json!([]), b));
    }

    #[test]
    fn any_difference_changes_it() {
        let base = of("t", json!([1, "a"]), json!({"k": 1}));
        for other in [
            of("u", json!([1, "a"]), json!({"k": 1})),
            of("t", json!(["a", 1]), json!({"k": 1})),
            of("t", json!([1, "a"]), json!({"k": 2})),
            of("t", json!([1, "a"]), json!({"k": "1"})),
            of("t", json!([1, "a"]), json!({"k": 1, "extra": null})),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(
            Fingerprint::of_key("t", "k1"),
            Fingerprint::of_key("t", "k2")
        );
        assert_ne!(
            Fingerprint::of_key("t", "k1"),
            Fingerprint::of_key("u", "k1")
        );
    }

    #[test]
    fn is_stable_across_runs() {
        // Golden: a change here silently breaks dedup of every submission in its window.
        assert_eq!(
            of("demo_long_io", json!([]), json!({"duration_ms": 200})).as_str(),
            "args:sha256:".to_owned()
                + &{
                    let d = Sha256::digest("demo_long_io\0[]\0{\"duration_ms\":200}".as_bytes());
                    d.iter().map(|b| format!("{b:02x}")).collect::<String>()
                }
        );
    }
}
