//! `/ui/workflow/{id}`: a workflow drawn as a graph (inline SVG, no external assets), each step
//! coloured by its state and linked to its task's page; and the workflows panel of `/ui`.

use std::collections::HashMap;
use std::fmt::Write;

use actix_web::{web, HttpRequest, HttpResponse};

use super::html::{csrf_of, escape, page, when};
use crate::http::{ApiError, AppState};
use crate::operate::overview::Overview;
use crate::workflow::{StepView, WorkflowView};

/// Width and height of a step's box, and the room between columns and rows.
const BOX: (usize, usize) = (170, 40);
const GAP: (usize, usize) = (50, 16);

/// A step's fill, by state.
fn fill(state: &str) -> &'static str {
    match state {
        "SUCCESS" => "#cdeccd",
        "FAILURE" => "#f4c7c7",
        "REVOKED" => "#e2e2e2",
        "STARTED" => "#cfe0f7",
        "RETRY" => "#f7e3c0",
        _ => "#ffffff",
    }
}

/// Each step's column (the longest way to it from a first step) and row within the column.
fn layout(steps: &[StepView]) -> Vec<(usize, usize)> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.task_id.as_str(), i))
        .collect();
    // Steps come in the order of the tree: whatever a step waits for comes before it.
    let mut column = vec![0usize; steps.len()];
    for (i, step) in steps.iter().enumerate() {
        column[i] = step
            .waits_for
            .iter()
            .filter_map(|w| index.get(w.as_str()))
            .map(|&w| column[w] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut rows: HashMap<usize, usize> = HashMap::new();
    column
        .iter()
        .map(|&c| {
            let row = rows.entry(c).or_default();
            *row += 1;
            (c, *row - 1)
        })
        .collect()
}

/// The workflow as an SVG graph: a box per step, an arrow from each step to those waiting for it.
fn graph(view: &WorkflowView) -> String {
    let places = layout(&view.steps);
    let at = |(c, r): (usize, usize)| (10 + c * (BOX.0 + GAP.0), 10 + r * (BOX.1 + GAP.1));
    let width = places
        .iter()
        .map(|p| at(*p).0 + BOX.0 + 10)
        .max()
        .unwrap_or(0);
    let height = places
        .iter()
        .map(|p| at(*p).1 + BOX.1 + 10)
        .max()
        .unwrap_or(0);
    let index: HashMap<&str, usize> = view
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.task_id.as_str(), i))
        .collect();
    let mut svg = format!(
        "<svg id=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-size=\"12\"><defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0L10,5L0,10z\" fill=\"#888\"/></marker></defs>"
    );
    for (i, step) in view.steps.iter().enumerate() {
        let (x, y) = at(places[i]);
        for before in step.waits_for.iter().filter_map(|w| index.get(w.as_str())) {
            let (bx, by) = at(places[*before]);
            let _ = write!(
                svg,
                "<line x1=\"{}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#888\" marker-end=\"url(#arrow)\"/>",
                bx + BOX.0,
                by + BOX.1 / 2,
                y + BOX.1 / 2
            );
        }
    }
    for (i, step) in view.steps.iter().enumerate() {
        let (x, y) = at(places[i]);
        let id = escape(&step.task_id);
        let _ = write!(
            svg,
            "<a href=\"/ui/task/{id}\" data-step=\"{id}\" data-state=\"{state}\"><title>{path} · {id}</title><rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" rx=\"6\" fill=\"{fill}\" stroke=\"#666\"/><text x=\"{tx}\" y=\"{ty}\">{name}</text><text x=\"{tx}\" y=\"{sy}\" fill=\"#555\">{state}</text></a>",
            state = escape(&step.state),
            path = escape(&step.path),
            w = BOX.0,
            h = BOX.1,
            fill = fill(&step.state),
            tx = x + 8,
            ty = y + 16,
            sy = y + 32,
            name = escape(&step.task_name),
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One workflow: its state, its graph, its steps.
pub async fn show(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let view = state
        .workflows
        .show(&id)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| ApiError::NotFound(format!("no workflow with id `{id}`")))?;
    let mut body = format!(
        "<p><a href=\"/ui\">← Kobe</a></p><h1><code>{}</code></h1><p>state <span class=\"{s}\" id=\"state\">{s}</span></p>",
        escape(&view.workflow_id),
        s = escape(&view.state),
    );
    if let Some(reason) = &view.reason {
        let _ = write!(body, "<p id=\"reason\">{}</p>", escape(reason));
    }
    body.push_str(&graph(&view));
    body.push_str(
        "<table id=\"steps\"><tr><th>step</th><th>task</th><th>name</th><th>state</th></tr>",
    );
    for step in &view.steps {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td><a href=\"/ui/task/{id}\"><code>{id}</code></a></td><td>{}</td><td class=\"{s}\">{s}</td></tr>",
            escape(&step.path),
            escape(&step.task_name),
            id = escape(&step.task_id),
            s = escape(&step.state),
        );
    }
    body.push_str("</table>");
    let running = !matches!(view.state.as_str(), "SUCCESS" | "FAILURE" | "REVOKED");
    Ok(page(
        &format!("Kobe · {}", view.workflow_id),
        running,
        &body,
        csrf_of(&request).as_deref(),
    ))
}

/// The workflows changed last, each linked to its graph.
pub(super) fn workflows_panel(body: &mut String, overview: &Overview) {
    body.push_str("<h2>Workflows</h2><table id=\"workflows\"><tr><th>workflow</th><th>state</th><th>steps</th><th>updated</th></tr>");
    for workflow in &overview.workflows {
        let id = escape(&workflow.id);
        let _ = write!(
            body,
            "<tr data-workflow=\"{id}\"><td><a href=\"/ui/workflow/{id}\"><code>{id}</code></a></td><td class=\"{s}\">{s}</td><td>{}</td><td>{}</td></tr>",
            workflow.steps,
            when(Some(workflow.updated_at)),
            s = workflow.state,
        );
    }
    body.push_str("</table>");
}
