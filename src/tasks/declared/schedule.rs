//! One `[[schedule]]` table: as written, and checked into a [`Schedule`].

use serde::Deserialize;
use serde_json::{Map, Value};

use super::fields::{check_name, field, FieldError};
use crate::domain::schedule::Schedule;

/// One `[[schedule]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScheduleEntry {
    pub(super) name: String,
    #[serde(default)]
    task: String,
    every: Option<u64>,
    cron: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    kwargs: toml::value::Table,
    queue: Option<String>,
    missed: Option<String>,
    /// A workflow to start instead of a task: the tree `POST /workflow/start` takes under
    /// `workflow`, as a TOML table or as JSON text.
    workflow: Option<toml::Value>,
    /// With `workflow`: its `on_failure` step, likewise.
    on_failure: Option<toml::Value>,
}

/// The longest `every`: a year.
const MAX_EVERY_S: u64 = 366 * 24 * 3600;

/// Checks a `[[schedule]]` table.
pub(super) fn build_schedule(entry: ScheduleEntry) -> Result<Schedule, FieldError> {
    use crate::domain::schedule::{parse_offset, Cron, Missed, When};
    check_name("name", &entry.name)?;
    let workflow = workflow_body(&entry)?;
    if workflow.is_some() {
        if !entry.task.is_empty() || !entry.kwargs.is_empty() || entry.queue.is_some() {
            return Err(field(
                "workflow",
                "give `task` (with its `kwargs` and `queue`) or `workflow`, not both: a workflow's steps carry their own",
            ));
        }
    } else if entry.on_failure.is_some() {
        return Err(field("on_failure", "only with `workflow`"));
    } else if entry.task.is_empty() {
        return Err(field("task", "name the task to run (or give a `workflow`)"));
    }
    if let Some(queue) = &entry.queue {
        check_name("queue", queue)?;
    }
    let when = match (entry.every, entry.cron) {
        (Some(_), Some(_)) => return Err(field("every", "give `every` or `cron`, not both")),
        (None, None) => return Err(field("every", "give `every` (seconds) or `cron`")),
        (Some(every), None) => {
            if entry.timezone.is_some() {
                return Err(field(
                    "timezone",
                    "only with `cron`: `every` slots are multiples of the period since the epoch",
                ));
            }
            if every == 0 || every > MAX_EVERY_S {
                return Err(field(
                    "every",
                    format!("expected seconds from 1 to {MAX_EVERY_S}"),
                ));
            }
            When::Every(every)
        }
        (None, Some(cron)) => {
            let expression = Cron::parse(&cron).map_err(|reason| field("cron", reason))?;
            let timezone = entry.timezone.ok_or_else(|| {
                field(
                    "timezone",
                    "required with `cron`: \"UTC\" or a fixed offset such as \"+02:00\"",
                )
            })?;
            let offset_s = parse_offset(&timezone).map_err(|reason| field("timezone", reason))?;
            When::Cron {
                expression,
                offset_s,
            }
        }
    };
    let missed = entry
        .missed
        .as_deref()
        .map(str::parse::<Missed>)
        .transpose()
        .map_err(|reason| field("missed", reason))?
        .unwrap_or(Missed::CatchUpOne);
    let kwargs =
        match serde_json::to_value(entry.kwargs).map_err(|e| field("kwargs", e.to_string()))? {
            Value::Object(map) => map,
            _ => return Err(field("kwargs", "expected a table")),
        };
    Ok(Schedule {
        name: entry.name,
        task: entry.task,
        when,
        kwargs,
        route: entry.queue,
        missed,
        workflow,
    })
}

/// The body `POST /workflow/start` would take, from `workflow` and `on_failure` (each a TOML
/// table or JSON text); its steps are checked when the schedules start firing.
fn workflow_body(entry: &ScheduleEntry) -> Result<Option<Map<String, Value>>, FieldError> {
    let as_json = |name: &str, value: &toml::Value| -> Result<Value, FieldError> {
        match value {
            toml::Value::String(text) => serde_json::from_str(text)
                .map_err(|e| field(name, format!("expected a table or JSON text: {e}"))),
            toml::Value::Table(_) => {
                serde_json::to_value(value).map_err(|e| field(name, e.to_string()))
            }
            _ => Err(field(name, "expected a table or JSON text")),
        }
    };
    let Some(tree) = &entry.workflow else {
        return Ok(None);
    };
    let mut body = Map::new();
    body.insert("workflow".into(), as_json("workflow", tree)?);
    if let Some(step) = &entry.on_failure {
        body.insert("on_failure".into(), as_json("on_failure", step)?);
    }
    Ok(Some(body))
}
