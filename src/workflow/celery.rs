//! Celery's canvas on the wire: what a Celery client's `chain(...)`, `link=` and `link_error=`
//! ask to run after a task, read from its protocol v2 body (`[args, kwargs, embed]`, embed
//! `{"callbacks", "errbacks", "chain", "chord"}`), as the tasks to submit. Pure: the worker
//! submits them idempotently (each id is the one the client froze into the signature, or one
//! derived from the finished task's).
//!
//! Supported: `chain` (the next signature receives the result unless immutable, and carries
//! the rest of the chain), `callbacks` (each receives the result) and `errbacks` (each receives
//! the failed task's id, Celery's old-style errback). Not supported: `chord` in the embed (a
//! Celery chord's header and counter live in Celery's result backend).

use serde_json::{Map, Value};

/// A task a finished task's canvas asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub id: String,
    pub task_name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// The queue the signature names, if any.
    pub queue: Option<String>,
    /// The canvas that rides on with it (the rest of a chain).
    pub embed: Option<Value>,
}

/// What runs after `task_id` succeeded with `result`.
pub fn after_success(embed: &Value, task_id: &str, result: &Value) -> Vec<Next> {
    let mut next = Vec::new();
    if let Some(Value::Array(chain)) = embed.get("chain") {
        // Celery keeps a chain's rest reversed: the next signature is the last.
        if let Some((first, rest)) = chain.split_last() {
            let rest = (!rest.is_empty()).then(|| {
                serde_json::json!({"callbacks": null, "errbacks": null, "chain": rest, "chord": null})
            });
            next.extend(signature(
                first,
                &format!("{task_id}-chain"),
                Some(result),
                rest,
            ));
        }
    }
    if let Some(Value::Array(callbacks)) = embed.get("callbacks") {
        for (i, callback) in callbacks.iter().enumerate() {
            next.extend(signature(
                callback,
                &format!("{task_id}-link-{i}"),
                Some(result),
                None,
            ));
        }
    }
    next
}

/// What runs after `task_id` failed for good: its errbacks, given its id.
pub fn after_failure(embed: &Value, task_id: &str) -> Vec<Next> {
    let Some(Value::Array(errbacks)) = embed.get("errbacks") else {
        return Vec::new();
    };
    errbacks
        .iter()
        .enumerate()
        .filter_map(|(i, errback)| {
            let id = Value::from(task_id);
            signature(errback, &format!("{task_id}-error-{i}"), Some(&id), None)
        })
        .collect()
}

/// A signature (`{"task", "args", "kwargs", "options", "immutable"}`) as the task to submit;
/// `given` goes first in its arguments unless it is immutable.
fn signature(
    signature: &Value,
    fallback_id: &str,
    given: Option<&Value>,
    embed: Option<Value>,
) -> Option<Next> {
    let task_name = signature.get("task")?.as_str()?.to_owned();
    let options = signature.get("options");
    let option = |name: &str| {
        options
            .and_then(|o| o.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut args = Vec::new();
    if signature.get("immutable") != Some(&Value::Bool(true)) {
        args.extend(given.cloned());
    }
    if let Some(Value::Array(own)) = signature.get("args") {
        args.extend(own.iter().cloned());
    }
    Some(Next {
        id: option("task_id").unwrap_or_else(|| fallback_id.to_owned()),
        task_name,
        args,
        kwargs: signature
            .get("kwargs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        queue: option("queue"),
        embed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sig(task: &str, args: Value, id: &str) -> Value {
        json!({"task": task, "args": args, "kwargs": {}, "options": {"task_id": id},
               "subtask_type": null, "immutable": false, "chord_size": null})
    }

    #[test]
    fn a_chain_runs_its_next_signature_with_the_result_and_the_rest_rides_on() {
        // chain(add.s(1, 2), add.s(3), add.s(4)): the first message carries [add(4), add(3)].
        let embed = json!({"callbacks": null, "errbacks": null, "chord": null,
                           "chain": [sig("add", json!([4]), "c"), sig("add", json!([3]), "b")]});
        let next = after_success(&embed, "a", &json!(3));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].id, "b");
        assert_eq!(next[0].args, vec![json!(3), json!(3)]);
        let rest = next[0].embed.as_ref().unwrap();
        assert_eq!(rest["chain"][0]["options"]["task_id"], "c");
        // The last link carries no chain on.
        let last = after_success(rest, "b", &json!(6));
        assert_eq!(last[0].args, vec![json!(6), json!(4)]);
        assert_eq!(last[0].embed, None);
    }

    #[test]
    fn callbacks_get_the_result_errbacks_the_failed_id_and_immutable_ones_nothing() {
        let mut immutable = sig("note", json!(["x"]), "n");
        immutable["immutable"] = json!(true);
        let embed = json!({"callbacks": [sig("add", json!([3]), "l"), immutable],
                           "errbacks": [{"task": "alert", "args": [], "options": {}}],
                           "chain": null, "chord": null});
        let next = after_success(&embed, "t", &json!(5));
        assert_eq!(next[0].args, vec![json!(5), json!(3)]);
        assert_eq!(next[1].args, vec![json!("x")]);
        let failed = after_failure(&embed, "t");
        assert_eq!(
            failed[0].id, "t-error-0",
            "no frozen id: one derived from the task's"
        );
        assert_eq!(failed[0].args, vec![json!("t")]);
        assert!(after_failure(&json!({"errbacks": null}), "t").is_empty());
    }
}
