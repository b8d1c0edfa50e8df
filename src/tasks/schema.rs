//! A task's JSON Schema for its kwargs, checked at submission so bad input is a 422 naming the
//! field rather than a dead letter later.
//!
//! The common subset of JSON Schema that describes keyword arguments is supported: `type` (one
//! name or a list), `properties`, `required`, `additionalProperties` (`false` or a schema),
//! `enum`, `const`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `minLength`,
//! `maxLength`, `items`, `minItems` and `maxItems`. A keyword outside that subset is refused when
//! the schema is loaded ([`KwargsSchema::new`]), so a schema never looks stricter than it is.

use serde_json::{Map, Value};

use super::InvalidInput;

/// Keywords [`KwargsSchema`] understands; `title`, `description`, `default`, `examples` and
/// `$schema` are accepted and ignored.
const KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "items",
    "minItems",
    "maxItems",
    "title",
    "description",
    "default",
    "examples",
    "$schema",
];

/// A checked schema for a task's kwargs.
#[derive(Debug, Clone, PartialEq)]
pub struct KwargsSchema(Value);

impl KwargsSchema {
    /// Checks that `schema` uses only the supported keywords, with values of the right type.
    pub fn new(schema: Value) -> Result<Self, String> {
        check_schema(&schema, "")?;
        Ok(Self(schema))
    }

    /// The schema as given, for the task catalogue.
    pub(crate) fn as_value(&self) -> &Value {
        &self.0
    }

    /// Checks `kwargs`, naming the first field that does not fit (`kwargs.url`, `kwargs.ids[2]`).
    pub fn check(&self, kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        check(&self.0, &Value::Object(kwargs.clone()), "kwargs")
    }
}

fn check_schema(schema: &Value, at: &str) -> Result<(), String> {
    let Value::Object(keywords) = schema else {
        return Err(format!("schema{at}: expected an object"));
    };
    for (keyword, value) in keywords {
        if !KEYWORDS.contains(&keyword.as_str()) {
            return Err(format!("schema{at}: unsupported keyword `{keyword}`"));
        }
        match keyword.as_str() {
            "properties" => {
                let Value::Object(properties) = value else {
                    return Err(format!("schema{at}.properties: expected an object"));
                };
                for (name, property) in properties {
                    check_schema(property, &format!("{at}.properties.{name}"))?;
                }
            }
            "items" => check_schema(value, &format!("{at}.items"))?,
            "additionalProperties" if !value.is_boolean() => {
                check_schema(value, &format!("{at}.additionalProperties"))?
            }
            "type" => {
                let names: Vec<&Value> = match value {
                    Value::Array(names) => names.iter().collect(),
                    one => vec![one],
                };
                for name in names {
                    let known = matches!(
                        name.as_str(),
                        Some(
                            "object"
                                | "array"
                                | "string"
                                | "integer"
                                | "number"
                                | "boolean"
                                | "null"
                        )
                    );
                    if !known {
                        return Err(format!("schema{at}.type: unknown type {name}"));
                    }
                }
            }
            "required"
                if !value
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string)) =>
            {
                return Err(format!("schema{at}.required: expected a list of names"));
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum"
                if !value.is_number() =>
            {
                return Err(format!("schema{at}.{keyword}: expected a number"));
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" if !value.is_u64() => {
                return Err(format!(
                    "schema{at}.{keyword}: expected a non-negative integer"
                ));
            }
            "enum" if !value.is_array() => {
                return Err(format!("schema{at}.enum: expected a list"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn fail(field: &str, reason: impl Into<String>) -> Result<(), InvalidInput> {
    Err(InvalidInput {
        field: field.to_owned(),
        reason: reason.into(),
    })
}

fn type_fits(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// Checks `value` against one schema: the rules every value has, then those of its kind.
fn check(schema: &Value, value: &Value, field: &str) -> Result<(), InvalidInput> {
    let Value::Object(rules) = schema else {
        return Ok(());
    };
    check_any(rules, value, field)?;
    match value {
        Value::Number(_) => check_number(rules, value.as_f64().unwrap_or_default(), field),
        Value::String(text) => check_text(rules, text, field),
        Value::Array(items) => check_items(rules, items, field),
        Value::Object(object) => check_object(rules, object, field),
        _ => Ok(()),
    }
}

/// `type`, `enum` and `const`: what any value may be held to.
fn check_any(rules: &Map<String, Value>, value: &Value, field: &str) -> Result<(), InvalidInput> {
    if let Some(expected) = rules.get("type") {
        let names: Vec<&str> = match expected {
            Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
            one => one.as_str().into_iter().collect(),
        };
        if !names.iter().any(|name| type_fits(name, value)) {
            return fail(field, format!("expected {}", names.join(" or ")));
        }
    }
    if let Some(Value::Array(allowed)) = rules.get("enum") {
        if !allowed.contains(value) {
            let listed: Vec<String> = allowed.iter().map(Value::to_string).collect();
            return fail(field, format!("expected one of {}", listed.join(", ")));
        }
    }
    if let Some(constant) = rules.get("const") {
        if constant != value {
            return fail(field, format!("expected {constant}"));
        }
    }
    Ok(())
}

fn check_number(rules: &Map<String, Value>, number: f64, field: &str) -> Result<(), InvalidInput> {
    let bound = |keyword: &str| rules.get(keyword).and_then(Value::as_f64);
    if let Some(min) = bound("minimum").filter(|min| number < *min) {
        return fail(field, format!("expected at least {min}"));
    }
    if let Some(max) = bound("maximum").filter(|max| number > *max) {
        return fail(field, format!("expected at most {max}"));
    }
    if let Some(min) = bound("exclusiveMinimum").filter(|min| number <= *min) {
        return fail(field, format!("expected more than {min}"));
    }
    if let Some(max) = bound("exclusiveMaximum").filter(|max| number >= *max) {
        return fail(field, format!("expected less than {max}"));
    }
    Ok(())
}

fn check_text(rules: &Map<String, Value>, text: &str, field: &str) -> Result<(), InvalidInput> {
    let length = text.chars().count() as u64;
    if let Some(min) = rules.get("minLength").and_then(Value::as_u64) {
        if length < min {
            return fail(field, format!("expected at least {min} characters"));
        }
    }
    if let Some(max) = rules.get("maxLength").and_then(Value::as_u64) {
        if length > max {
            return fail(field, format!("expected at most {max} characters"));
        }
    }
    Ok(())
}

fn check_items(
    rules: &Map<String, Value>,
    items: &[Value],
    field: &str,
) -> Result<(), InvalidInput> {
    let count = items.len() as u64;
    if let Some(min) = rules.get("minItems").and_then(Value::as_u64) {
        if count < min {
            return fail(field, format!("expected at least {min} items"));
        }
    }
    if let Some(max) = rules.get("maxItems").and_then(Value::as_u64) {
        if count > max {
            return fail(field, format!("expected at most {max} items"));
        }
    }
    if let Some(item) = rules.get("items") {
        for (i, value) in items.iter().enumerate() {
            check(item, value, &format!("{field}[{i}]"))?;
        }
    }
    Ok(())
}

fn check_object(
    rules: &Map<String, Value>,
    object: &Map<String, Value>,
    field: &str,
) -> Result<(), InvalidInput> {
    if let Some(Value::Array(required)) = rules.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                return fail(&format!("{field}.{name}"), "required");
            }
        }
    }
    let properties = rules.get("properties").and_then(Value::as_object);
    for (name, value) in object {
        let at = format!("{field}.{name}");
        match properties.and_then(|p| p.get(name)) {
            Some(property) => check(property, value, &at)?,
            None => match rules.get("additionalProperties") {
                Some(Value::Bool(false)) => return fail(&at, "not a known argument"),
                Some(extra @ Value::Object(_)) => check(extra, value, &at)?,
                _ => {}
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> KwargsSchema {
        KwargsSchema::new(json!({
            "type": "object",
            "required": ["url"],
            "additionalProperties": false,
            "properties": {
                "url": {"type": "string", "minLength": 8},
                "retries": {"type": "integer", "minimum": 0, "maximum": 5},
                "mode": {"enum": ["fast", "slow"]},
                "ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
            }
        }))
        .unwrap()
    }

    fn field_of(kwargs: Value) -> String {
        schema()
            .check(kwargs.as_object().unwrap())
            .unwrap_err()
            .field
    }

    #[test]
    fn fitting_kwargs_pass() {
        let kwargs =
            json!({"url": "https://example.com", "retries": 2, "mode": "fast", "ids": [1, 2]});
        assert_eq!(schema().check(kwargs.as_object().unwrap()), Ok(()));
    }

    #[test]
    fn the_first_misfit_is_named() {
        assert_eq!(field_of(json!({})), "kwargs.url");
        assert_eq!(field_of(json!({"url": 5})), "kwargs.url");
        assert_eq!(field_of(json!({"url": "short"})), "kwargs.url");
        assert_eq!(
            field_of(json!({"url": "https://x.org", "retries": 9})),
            "kwargs.retries"
        );
        assert_eq!(
            field_of(json!({"url": "https://x.org", "retries": 1.5})),
            "kwargs.retries"
        );
        assert_eq!(
            field_of(json!({"url": "https://x.org", "mode": "warp"})),
            "kwargs.mode"
        );
        assert_eq!(
            field_of(json!({"url": "https://x.org", "ids": [1, "b"]})),
            "kwargs.ids[1]"
        );
        assert_eq!(
            field_of(json!({"url": "https://x.org", "ids": [1, 2, 3, 4]})),
            "kwargs.ids"
        );
        assert_eq!(
            field_of(json!({"url": "https://x.org", "extra": 1})),
            "kwargs.extra"
        );
    }

    #[test]
    fn unsupported_keywords_are_refused_when_loaded() {
        let err = KwargsSchema::new(json!({"properties": {"a": {"pattern": "^x"}}})).unwrap_err();
        assert!(
            err.contains("properties.a") && err.contains("pattern"),
            "{err}"
        );
        assert!(KwargsSchema::new(json!({"type": "text"})).is_err());
        assert!(KwargsSchema::new(json!([1])).is_err());
    }
}
