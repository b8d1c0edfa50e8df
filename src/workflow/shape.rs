//! A workflow's shape and its plan: the tree a client sends (`chain`, `group`, steps) read with
//! the path of every node, then flattened into steps that each know what they wait for and what
//! they receive. Pure: no I/O, unit-tested below.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Deepest nesting of `chain` and `group` accepted.
pub const MAX_DEPTH: usize = 8;
/// Most steps in one workflow (the `on_failure` step included).
pub const MAX_STEPS: usize = 5_000;
/// Most edges in one workflow: the sum over its steps of how many steps each waits for. A group
/// followed by a group makes every member of the second wait for every member of the first, so
/// a bound on steps alone lets 150 KB ask for millions of joins.
pub const MAX_EDGES: usize = 20_000;

/// A node of the tree as sent: a step's body is kept as JSON, for the caller to check as
/// `/task/start` would.
#[derive(Debug, Clone, PartialEq)]
pub enum Canvas {
    Step {
        path: String,
        body: Map<String, Value>,
        /// `true`: the step does not receive what came before it.
        immutable: bool,
        /// Its own `on_failure` step (Celery's `link_error`), as sent.
        on_failure: Option<Map<String, Value>>,
    },
    Chain(Vec<Canvas>),
    Group(Vec<Canvas>),
}

/// A node that cannot be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misshapen {
    pub path: String,
    pub reason: String,
}

fn misshapen(path: &str, reason: impl Into<String>) -> Misshapen {
    Misshapen {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads the tree under `path` (`workflow` for the top).
pub fn read(value: &Value, path: &str) -> Result<Canvas, Misshapen> {
    let mut steps = 0;
    read_node(value, path, 0, &mut steps)
}

fn read_node(
    value: &Value,
    path: &str,
    depth: usize,
    steps: &mut usize,
) -> Result<Canvas, Misshapen> {
    let Value::Object(object) = value else {
        return Err(misshapen(
            path,
            "expected an object: a step, {\"chain\": […]} or {\"group\": […]}",
        ));
    };
    for kind in ["chain", "group"] {
        let Some(members) = object.get(kind) else {
            continue;
        };
        if object.len() > 1 {
            return Err(misshapen(path, format!("a `{kind}` has no other fields")));
        }
        if depth >= MAX_DEPTH {
            return Err(misshapen(
                path,
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let Value::Array(members) = members else {
            return Err(misshapen(&format!("{path}.{kind}"), "expected an array"));
        };
        if members.is_empty() {
            return Err(misshapen(
                &format!("{path}.{kind}"),
                "expected at least one step",
            ));
        }
        let nodes = members
            .iter()
            .enumerate()
            .map(|(i, member)| read_node(member, &format!("{path}.{kind}[{i}]"), depth + 1, steps))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(if kind == "chain" {
            Canvas::Chain(nodes)
        } else {
            Canvas::Group(nodes)
        });
    }
    *steps += 1;
    if *steps > MAX_STEPS {
        return Err(misshapen(path, format!("more than {MAX_STEPS} steps")));
    }
    let mut body = object.clone();
    let immutable = match body.remove("immutable") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(immutable)) => immutable,
        Some(_) => {
            return Err(misshapen(
                &format!("{path}.immutable"),
                "expected a boolean",
            ))
        }
    };
    let on_failure = match body.remove("on_failure") {
        None | Some(Value::Null) => None,
        Some(Value::Object(step)) => {
            // It is a task of its own: it counts as a step.
            *steps += 1;
            if *steps > MAX_STEPS {
                return Err(misshapen(path, format!("more than {MAX_STEPS} steps")));
            }
            Some(step)
        }
        Some(_) => {
            return Err(misshapen(
                &format!("{path}.on_failure"),
                "expected a step: {\"task_name\": …}",
            ))
        }
    };
    Ok(Canvas::Step {
        path: path.to_owned(),
        body,
        immutable,
        on_failure,
    })
}

/// What a step receives from the steps before it, in their order: nothing, one result, or the
/// list a group makes (a member's own result, or a nested group's list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    Nothing,
    One(usize),
    List(Vec<Input>),
}

impl Input {
    /// The steps whose results it is made of: they must all succeed first.
    pub fn steps(&self) -> Vec<usize> {
        match self {
            Self::Nothing => Vec::new(),
            Self::One(step) => vec![*step],
            Self::List(items) => items.iter().flat_map(Self::steps).collect(),
        }
    }

    /// How many steps it is made of, without listing them.
    pub fn width(&self) -> usize {
        match self {
            Self::Nothing => 0,
            Self::One(_) => 1,
            Self::List(items) => items.iter().map(Self::width).sum(),
        }
    }

    /// The value it makes, `result` giving each step's result.
    pub fn value(&self, result: &impl Fn(usize) -> Value) -> Value {
        match self {
            Self::Nothing => Value::Null,
            Self::One(step) => result(*step),
            Self::List(items) => Value::Array(items.iter().map(|i| i.value(result)).collect()),
        }
    }
}

/// One step of the flattened plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub path: String,
    pub body: Map<String, Value>,
    pub immutable: bool,
    /// Its own `on_failure` step's body, run if it fails for good.
    pub on_failure: Option<Map<String, Value>>,
    /// What it receives; its steps are what it waits for.
    pub input: Input,
    /// The steps that wait for it (empty: it ends the workflow).
    pub next: Vec<usize>,
}

impl Planned {
    /// The steps it waits for.
    pub fn waits_for(&self) -> Vec<usize> {
        self.input.steps()
    }
}

/// Flattens the tree: steps in the order of the tree, each with what it receives and who waits
/// for it. Refused, naming the step that crosses it, past [`MAX_EDGES`]: the work is linear in
/// the edges, and stops at the bound.
pub fn plan(canvas: Canvas) -> Result<Vec<Planned>, Misshapen> {
    let mut steps = Vec::new();
    let mut edges = 0;
    place(canvas, Input::Nothing, &mut steps, &mut edges)?;
    for index in 0..steps.len() {
        for before in steps[index].waits_for() {
            steps[before].next.push(index);
        }
    }
    Ok(steps)
}

/// Places `canvas` after what made `input`; returns what it makes. `edges` counts what the
/// steps placed so far wait for. Each copy of an input is followed by a step that counts it, so
/// the copies cost no more than the bound.
fn place(
    canvas: Canvas,
    input: Input,
    steps: &mut Vec<Planned>,
    edges: &mut usize,
) -> Result<Input, Misshapen> {
    Ok(match canvas {
        Canvas::Step {
            path,
            body,
            immutable,
            on_failure,
        } => {
            *edges += input.width();
            if *edges > MAX_EDGES {
                return Err(misshapen(
                    &path,
                    format!(
                        "more than {MAX_EDGES} edges (the steps each step waits for, summed): a group after a group makes every member of the second wait for every member of the first; put a step between them"
                    ),
                ));
            }
            steps.push(Planned {
                path,
                body,
                immutable,
                on_failure,
                input,
                next: Vec::new(),
            });
            Input::One(steps.len() - 1)
        }
        Canvas::Chain(nodes) => {
            let mut before = input;
            for node in nodes {
                before = place(node, before, steps, edges)?;
            }
            before
        }
        Canvas::Group(members) => Input::List(
            members
                .into_iter()
                .map(|member| place(member, input.clone(), steps, edges))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// For every step, the steps after it that wait for more than it, each with its place among
/// what that step waits for: where the step's success is counted. One pass over the edges.
pub fn joins<'a>(steps: impl IntoIterator<Item = &'a Planned>) -> Vec<Vec<(usize, u32)>> {
    let mut joins = Vec::new();
    for (index, step) in steps.into_iter().enumerate() {
        joins.push(Vec::new());
        let waits = step.waits_for();
        if waits.len() < 2 {
            continue;
        }
        for (slot, before) in waits.into_iter().enumerate() {
            // What a step waits for comes before it.
            joins[before].push((index, slot as u32));
        }
    }
    joins
}

/// The steps that end the workflow: its result is theirs, and it succeeds when they all did.
pub fn ends<'a>(steps: impl IntoIterator<Item = &'a Planned>) -> Vec<usize> {
    steps
        .into_iter()
        .enumerate()
        .filter(|(_, step)| step.next.is_empty())
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn planned(value: Value) -> Vec<Planned> {
        plan(read(&value, "workflow").unwrap()).unwrap()
    }

    fn group(n: usize) -> Value {
        json!({"group": (0..n).map(|_| json!({"task_name": "a"})).collect::<Vec<_>>()})
    }

    #[test]
    fn a_group_after_a_group_is_bounded_by_its_edges_and_costs_no_more_than_the_bound() {
        // 2,500 × 2,500 members: 6.25 M edges, within every other bound. Refused at the first
        // step over the bound, long before the copies grow.
        let wide = json!({"chain": [group(2_500), group(2_500)]});
        let refused = plan(read(&wide, "workflow").unwrap()).unwrap_err();
        assert_eq!(refused.path, "workflow.chain[1].group[8]");
        assert!(refused.reason.contains("more than 20000 edges"));
        // At the bound: 141 × 141 = 19,881 edges, planned, and each member of the second group
        // counts its arrival at its own slot of every join.
        let steps = planned(json!({"chain": [group(141), group(141)]}));
        let edges: usize = steps.iter().map(|s| s.waits_for().len()).sum();
        assert_eq!(edges, 141 * 141);
        let joined = joins(&steps);
        assert_eq!(joined[5].len(), 141);
        assert_eq!(joined[5][0], (141, 5));
        assert!(joined[141].is_empty());
        // The largest group with a callback: every step but two in the group.
        let steps = planned(
            json!({"chain": [{"task_name": "a"}, group(MAX_STEPS - 2), {"task_name": "b"}]}),
        );
        assert_eq!(steps.len(), MAX_STEPS);
        assert_eq!(joins(&steps)[1], vec![(MAX_STEPS - 1, 0)]);
        // A step waiting for one step alone needs no join.
        assert!(joins(&steps)[0].is_empty());
    }

    fn paths_and_inputs(steps: &[Planned]) -> Vec<(&str, Input)> {
        steps
            .iter()
            .map(|s| (s.path.as_str(), s.input.clone()))
            .collect()
    }

    #[test]
    fn a_chain_passes_each_result_on_and_a_group_then_a_step_is_a_chord() {
        let steps = planned(json!({"chain": [
            {"task_name": "fetch"},
            {"group": [{"task_name": "parse", "args": [1]}, {"task_name": "parse"}]},
            {"task_name": "merge"},
        ]}));
        assert_eq!(
            paths_and_inputs(&steps),
            vec![
                ("workflow.chain[0]", Input::Nothing),
                ("workflow.chain[1].group[0]", Input::One(0)),
                ("workflow.chain[1].group[1]", Input::One(0)),
                (
                    "workflow.chain[2]",
                    Input::List(vec![Input::One(1), Input::One(2)])
                ),
            ]
        );
        assert_eq!(steps[0].next, vec![1, 2]);
        assert_eq!(steps[1].next, vec![3]);
        assert_eq!(steps[3].waits_for(), vec![1, 2]);
        assert_eq!(ends(&steps), vec![3]);
        assert_eq!(steps[1].body["args"], json!([1]));
    }

    #[test]
    fn a_chain_inside_a_group_gives_its_last_result_to_the_callback() {
        let steps = planned(json!({"chain": [
            {"group": [
                {"chain": [{"task_name": "a"}, {"task_name": "b", "immutable": true}]},
                {"task_name": "c"},
            ]},
            {"task_name": "d"},
        ]}));
        assert_eq!(steps[1].input, Input::One(0));
        assert!(steps[1].immutable);
        assert!(!steps[1].body.contains_key("immutable"));
        assert_eq!(steps[1].on_failure, None);
        assert_eq!(
            steps[3].input,
            Input::List(vec![Input::One(1), Input::One(2)])
        );
        let value = steps[3].input.value(&|i| json!(format!("r{i}")));
        assert_eq!(value, json!(["r1", "r2"]));
        // A group with nothing after it ends the workflow with all its members.
        let steps = planned(json!({"group": [
            {"task_name": "a", "on_failure": {"task_name": "alert"}},
            {"task_name": "b"},
        ]}));
        assert_eq!(ends(&steps), vec![0, 1]);
        // A step's own on_failure is kept apart from its body.
        assert_eq!(steps[0].on_failure.as_ref().unwrap()["task_name"], "alert");
        assert!(!steps[0].body.contains_key("on_failure"));
        assert_eq!(steps[0].input, Input::Nothing);
    }

    #[test]
    fn a_bad_node_is_named_by_its_path() {
        let bad = |value: Value| read(&value, "workflow").unwrap_err();
        assert_eq!(
            bad(json!({"chain": [{"task_name": "a"}, {"group": [3]}]})).path,
            "workflow.chain[1].group[0]"
        );
        assert_eq!(bad(json!({"chain": []})).path, "workflow.chain");
        assert_eq!(bad(json!({"group": {}})).path, "workflow.group");
        assert_eq!(
            bad(json!({"chain": [{"task_name": "a", "immutable": 1}]})).path,
            "workflow.chain[0].immutable"
        );
        assert_eq!(
            bad(json!({"chain": [{"task_name": "a", "on_failure": "b"}]})).path,
            "workflow.chain[0].on_failure"
        );
        let mut deep = json!({"task_name": "a"});
        for _ in 0..=MAX_DEPTH {
            deep = json!({"chain": [deep]});
        }
        assert!(bad(deep).reason.contains("deeper"));
        let many: Vec<Value> = (0..=MAX_STEPS).map(|_| json!({"task_name": "a"})).collect();
        assert_eq!(
            bad(json!({"group": many})).path,
            format!("workflow.group[{MAX_STEPS}]")
        );
    }
}
