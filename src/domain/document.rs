//! What a JSON value must be for MongoDB to store it: checked at the edge, so a value that could
//! never be stored is a 422 naming its field, not an error deep in a write.

use serde_json::Value;

/// Deepest nesting accepted in task arguments. A task document nests them a level or two
/// further, and MongoDB refuses documents nested past 100 levels; engines differ below that.
pub(crate) const MAX_DEPTH: usize = 64;

/// Longest accepted key in task arguments (bytes). MongoDB has no such bound of its own, but a
/// field name is repeated in every index and error message that names it: a key of megabytes is
/// a mistake or an attack, never data.
pub(crate) const MAX_KEY_BYTES: usize = 1024;

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
    let mut trail = Vec::new();
    walk(value, 0, &mut trail).map_err(|reason| Unstorable {
        field: render(path, &trail),
        reason,
    })
}

/// Checks a task's arguments for what BSON cannot hold, as one document would be checked.
pub(crate) fn check_arguments(
    args: &[Value],
    kwargs: &serde_json::Map<String, Value>,
) -> Result<(), Unstorable> {
    let mut trail = Vec::new();
    walk_items(args, 0, &mut trail).map_err(|reason| Unstorable {
        field: render("args", &trail),
        reason,
    })?;
    walk_map(kwargs, 0, &mut trail).map_err(|reason| Unstorable {
        field: render("kwargs", &trail),
        reason,
    })
}

/// One step from a value to a part of it; the field's name is written out only for a refusal,
/// so checking costs one pass over the value whatever its shape.
enum Segment<'a> {
    Index(usize),
    Key(&'a str),
}

/// Walks `value`; on a refusal `trail` holds the way from the top to the refused part.
fn walk<'a>(value: &'a Value, depth: usize, trail: &mut Vec<Segment<'a>>) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested deeper than {MAX_DEPTH} levels, which cannot be stored"
        ));
    }
    match value {
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => Err(
            "an integer above 9223372036854775807 (the largest signed 64-bit integer) cannot be stored; send it as a string".to_owned(),
        ),
        Value::Array(items) => walk_items(items, depth, trail),
        Value::Object(map) => walk_map(map, depth, trail),
        _ => Ok(()),
    }
}

fn walk_items<'a>(
    items: &'a [Value],
    depth: usize,
    trail: &mut Vec<Segment<'a>>,
) -> Result<(), String> {
    for (i, item) in items.iter().enumerate() {
        trail.push(Segment::Index(i));
        walk(item, depth + 1, trail)?;
        trail.pop();
    }
    Ok(())
}

fn walk_map<'a>(
    map: &'a serde_json::Map<String, Value>,
    depth: usize,
    trail: &mut Vec<Segment<'a>>,
) -> Result<(), String> {
    for (key, item) in map {
        trail.push(Segment::Key(key));
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "a key longer than {MAX_KEY_BYTES} bytes is refused"
            ));
        }
        if key.contains('\u{0}') {
            return Err("a key with a NUL character cannot be stored".to_owned());
        }
        walk(item, depth + 1, trail)?;
        trail.pop();
    }
    Ok(())
}

/// `kwargs.a[2].b`, a long key cut short so the name stays readable.
fn render(path: &str, trail: &[Segment<'_>]) -> String {
    let mut field = path.to_owned();
    for segment in trail {
        match segment {
            Segment::Index(i) => field.push_str(&format!("[{i}]")),
            Segment::Key(key) => {
                field.push('.');
                let shown: String = key.chars().take(64).collect();
                field.push_str(&shown.replace('\u{0}', "\\u0000"));
                if shown.len() < key.len() {
                    field.push('…');
                }
            }
        }
    }
    field
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

    /// The check as it was first written (a path string built for every element): slow, but
    /// plainly right, so it is the oracle the linear one is held to.
    fn oracle(value: &Value, path: &str, depth: usize) -> Result<(), Unstorable> {
        let refuse = |field: String, reason: &str| {
            Err(Unstorable {
                field,
                reason: reason.to_owned(),
            })
        };
        if depth > MAX_DEPTH {
            return refuse(path.to_owned(), "deep");
        }
        match value {
            Value::Number(n) if n.is_u64() && n.as_i64().is_none() => {
                refuse(path.to_owned(), "big")
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| oracle(item, &format!("{path}[{i}]"), depth + 1)),
            Value::Object(map) => map.iter().try_for_each(|(key, item)| {
                let field = format!("{path}.{}", key.replace('\u{0}', "\\u0000"));
                if key.len() > MAX_KEY_BYTES || key.contains('\u{0}') {
                    return refuse(field, "key");
                }
                oracle(item, &field, depth + 1)
            }),
            _ => Ok(()),
        }
    }

    /// A random JSON value: mostly storable, now and then a part that is not (a huge integer, a
    /// NUL in a key, a key over the bound, a deep nest).
    fn arbitrary(rng: &mut fastrand::Rng, depth: usize) -> Value {
        let leaf = |rng: &mut fastrand::Rng| match rng.u8(0..20) {
            0 => json!(u64::MAX),
            1..=5 => json!(rng.i64(..)),
            6..=9 => json!(rng.f64()),
            10..=13 => json!("text"),
            14 => Value::Null,
            _ => json!(rng.bool()),
        };
        if depth > MAX_DEPTH + 2 || rng.u8(0..10) < 4 {
            return leaf(rng);
        }
        // Now and then a thin, deep branch, so the depth bound is met too.
        let width = if rng.u8(0..4) == 0 {
            1
        } else {
            rng.usize(0..4)
        };
        if rng.bool() {
            Value::Array((0..width).map(|_| arbitrary(rng, depth + 1)).collect())
        } else {
            let key = |rng: &mut fastrand::Rng| match rng.u8(0..30) {
                0 => "a\u{0}b".to_owned(),
                1 => "k".repeat(MAX_KEY_BYTES + 1),
                2 => "k".repeat(MAX_KEY_BYTES),
                _ => format!("k{}", rng.u8(0..5)),
            };
            Value::Object(
                (0..width)
                    .map(|_| (key(rng), arbitrary(rng, depth + 1)))
                    .collect(),
            )
        }
    }

    #[test]
    fn the_linear_check_refuses_exactly_what_the_oracle_refuses_and_names_the_same_field() {
        let mut refused = 0;
        for seed in 0..3_000 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let value = arbitrary(&mut rng, 0);
            let ours = check_storable(&value, "kwargs").map_err(|e| e.field);
            let theirs = oracle(&value, "kwargs", 0).map_err(|e| e.field);
            // A long key is shown cut short; the rest of the name is the same.
            let short = |field: String| {
                field
                    .split('.')
                    .map(|part| part.chars().take(64).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(".")
            };
            assert_eq!(
                ours.map_err(|f| short(f.replace('…', ""))),
                theirs.map_err(short),
                "seed {seed}: {value}"
            );
            refused += usize::from(check_storable(&value, "kwargs").is_err());
        }
        // The generator reaches both verdicts.
        assert!((300..2_700).contains(&refused), "{refused} refused");
    }

    #[test]
    fn a_long_key_over_a_long_list_is_refused_in_one_pass() {
        // The shape that once cost tens of seconds: every element's name repeated the key.
        let key = "k".repeat(2_000_000);
        let kwargs: serde_json::Map<String, Value> =
            [(key, Value::Array(vec![json!(0); 1_000_000]))]
                .into_iter()
                .collect();
        let refused = check_arguments(&[], &kwargs).unwrap_err();
        assert!(refused.field.starts_with("kwargs.kkkk") && refused.field.len() < 80);
        assert!(refused.reason.contains("longer than 1024 bytes"));
        // At the bound, the whole list is walked and accepted, and a refusal deep in it is
        // named by its place.
        let key = "k".repeat(MAX_KEY_BYTES);
        let mut list = vec![json!(0); 1_000_000];
        let kwargs: serde_json::Map<String, Value> = [(key.clone(), Value::Array(list.clone()))]
            .into_iter()
            .collect();
        assert!(check_arguments(&[json!([1, 2])], &kwargs).is_ok());
        list[999_999] = json!(u64::MAX);
        let kwargs: serde_json::Map<String, Value> =
            [(key, Value::Array(list))].into_iter().collect();
        let refused = check_arguments(&[], &kwargs).unwrap_err();
        assert!(refused.field.ends_with("…[999999]"), "{}", refused.field);
        let refused = check_arguments(&[json!(1), json!([{"x": u64::MAX}])], &Default::default())
            .unwrap_err();
        assert_eq!(refused.field, "args[1][0].x");
    }
}
