//! What a JSON value must be for MongoDB to store it: checked at the edge, so a value that could
//! never be stored is a 422 naming its field, not an error deep in a write.

use serde_json::Value;

/// Deepest nesting accepted in task arguments. A task document nests them a level or two
/// further, and MongoDB refuses documents nested past 100 levels; engines differ below that.
pub(crate) const MAX_DEPTH: usize = 64;

/// Why a value cannot be stored, and where (`kwargs.a.b`, `args[2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unstorable {
    pub field: String,
    pub reason: String,
}

/// Checks `value`, found at `path`, for what BSON cannot hold: integers past the signed 64-bit
/// range, keys with a NUL byte, nesting deeper than [`MAX_DEPTH`].
#[cfg(test)]
pub(crate) fn check_storable(value: &Value, path: &str) -> Result<(), Unstorable> {
    check(value, path, 0)
}

/// Checks a task's arguments for what BSON cannot hold, as one document would be checked.
pub(crate) fn check_arguments(
    args: &[Value],
    kwargs: &serde_json::Map<String, Value>,
) -> Result<(), Unstorable> {
    args.iter()
        .enumerate()
        .try_for_each(|(i, arg)| check(arg, &format!("args[{i}]"), 1))?;
    if kwargs.keys().any(|key| key.contains('\u{0}')) {
        return check(&Value::Object(kwargs.clone()), "kwargs", 0);
    }
    kwargs
        .iter()
        .try_for_each(|(key, value)| check(value, &format!("kwargs.{key}"), 1))
}

fn check(value: &Value, path: &str, depth: usize) -> Result<(), Unstorable> {
    let refuse = |field: &str, reason: &str| {
        Err(Unstorable {
            field: field.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if depth > MAX_DEPTH {
        return refuse(
            path,
            &format!("nested deeper than {MAX_DEPTH} levels, which cannot be stored"),
        );
    }
    match value {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => refuse(
            path,
            "an integer above 9223372036854775807 (the largest signed 64-bit integer) cannot be stored; send it as a string",
        ),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check(item, &format!("{path}[{i}]"), depth + 1)),
        Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            let field = format!("{path}.{key}");
            if key.contains('\u{0}') {
                return refuse(
                    &format!("{path}.{}", key.replace('\u{0}', "\\u0000")),
                    "a key with a NUL character cannot be stored",
                );
            }
            check(item, &field, depth + 1)
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_bson_cannot_hold_is_named() {
        let field = |v: Value| check_storable(&v, "kwargs").unwrap_err().field;
        assert_eq!(field(json!({"n": u64::MAX})), "kwargs.n");
        assert_eq!(field(json!({"a": [1, {"b": u64::MAX}]})), "kwargs.a[1].b");
        assert_eq!(field(json!({"x\u{0}y": 1})), "kwargs.x\\u0000y");
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH + 1 {
            deep = json!({ "d": deep });
        }
        assert!(field(deep).starts_with("kwargs.d.d"));
        assert!(check_storable(&json!({"n": i64::MAX, "m": -5, "f": 1.5}), "kwargs").is_ok());
    }
}
