//! Workflows built in Rust: the same JSON `POST /workflow/start` and `kobe workflow start` take,
//! made with types instead of by hand.
//!
//! ```
//! use kobe::{Step, Workflow};
//! use serde_json::json;
//!
//! let crawl = Workflow::chain([
//!     Step::new("fetch").kwargs(json!({"url": "https://example.com"})).into(),
//!     Workflow::group([Step::new("parse").args([json!(1)]), Step::new("parse").args([json!(2)])]),
//!     Step::new("merge").into(),
//! ]);
//! let body = crawl.body(Some(Step::new("alert")));
//! assert_eq!(body["workflow"]["chain"][1]["group"][0]["task_name"], "parse");
//! assert_eq!(body["on_failure"]["task_name"], "alert");
//! ```
//!
//! A schedule starts one with [`Schedule::workflow`](crate::domain::schedule::Schedule) set to
//! such a body; an HTTP client sends it as it is.

use serde_json::{Map, Value};

/// One step: the body `/task/start` takes, plus whether it receives what came before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step(Map<String, Value>);

impl Step {
    /// A step running task `task_name`.
    pub fn new(task_name: &str) -> Self {
        let mut body = Map::new();
        body.insert("task_name".into(), Value::from(task_name));
        Self(body)
    }

    /// Its own positional arguments, after what it receives from the steps before it.
    pub fn args(self, args: impl IntoIterator<Item = Value>) -> Self {
        self.with("args", Value::Array(args.into_iter().collect()))
    }

    /// Its keyword arguments (a JSON object).
    pub fn kwargs(self, kwargs: Value) -> Self {
        self.with("kwargs", kwargs)
    }

    /// It does not receive the previous step's result (Celery's immutable signature).
    pub fn immutable(self) -> Self {
        self.with("immutable", Value::Bool(true))
    }

    /// Any other field `/task/start` takes: `queue`, `priority`, `countdown`, `eta`,
    /// `expires`, `time_limit_s`, …; checked when the workflow starts.
    pub fn with(mut self, field: &str, value: Value) -> Self {
        self.0.insert(field.to_owned(), value);
        self
    }

    fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

/// A workflow's tree: a step, steps in order, or steps side by side. A group followed by a step
/// in a chain is a chord: the step receives the list of the members' results.
#[derive(Debug, Clone, PartialEq)]
pub enum Workflow {
    Step(Step),
    Chain(Vec<Workflow>),
    Group(Vec<Workflow>),
}

impl From<Step> for Workflow {
    fn from(step: Step) -> Self {
        Self::Step(step)
    }
}

impl Workflow {
    /// Runs `nodes` one after the other, each receiving the previous one's result.
    pub fn chain(nodes: impl IntoIterator<Item = Workflow>) -> Self {
        Self::Chain(nodes.into_iter().collect())
    }

    /// Runs `members` side by side.
    pub fn group<N: Into<Workflow>>(members: impl IntoIterator<Item = N>) -> Self {
        Self::Group(members.into_iter().map(Into::into).collect())
    }

    /// The tree as JSON: what goes under `workflow` in a start's body.
    pub fn to_json(&self) -> Value {
        let nodes = |nodes: &[Workflow]| Value::Array(nodes.iter().map(Self::to_json).collect());
        match self {
            Self::Step(step) => step.to_json(),
            Self::Chain(members) => serde_json::json!({ "chain": nodes(members) }),
            Self::Group(members) => serde_json::json!({ "group": nodes(members) }),
        }
    }

    /// The body of a start: `{"workflow": …, "on_failure": …}`.
    pub fn body(&self, on_failure: Option<Step>) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("workflow".into(), self.to_json());
        if let Some(step) = on_failure {
            body.insert("on_failure".into(), step.to_json());
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_builders_make_the_json_the_api_reads() {
        let built = Workflow::chain([
            Step::new("fetch").kwargs(json!({"url": "u"})).into(),
            Workflow::group([Step::new("parse").args([json!(1)]), Step::new("parse")]),
            Step::new("merge")
                .immutable()
                .with("priority", json!(7))
                .into(),
        ]);
        let written = json!({"chain": [
            {"task_name": "fetch", "kwargs": {"url": "u"}},
            {"group": [{"task_name": "parse", "args": [1]}, {"task_name": "parse"}]},
            {"task_name": "merge", "immutable": true, "priority": 7}
        ]});
        assert_eq!(built.to_json(), written);
        let read = super::super::shape::read(&built.to_json(), "workflow").unwrap();
        let steps = super::super::shape::plan(read).unwrap();
        assert_eq!(steps.len(), 4);
        assert!(steps[3].immutable);
        assert!(!built.body(None).contains_key("on_failure"));
    }
}
