//! Tasks that need no Rust: declared in a TOML file (`KOBE_TASKS_FILE`) and run by calling an
//! HTTP endpoint ([`http`]) or a program ([`command`]), or run by Python Celery workers
//! (`kind = "celery"`: Kobe accepts, records and publishes it on its `route`, which Kobe's own
//! workers then leave alone, and tracks its outcome from Celery's task events).
//!
//! ```toml
//! [[task]]
//! name = "notify"
//! kind = "http"
//! url = "http://127.0.0.1:9000/hooks/notify"
//! headers = { Authorization = "Bearer ${NOTIFY_TOKEN}" }
//! route = "io"
//!
//! [[task]]
//! name = "wordcount"
//! kind = "command"
//! argv = ["python3", "scripts/wordcount.py"]
//!
//! [[task]]
//! name = "crawl"
//! kind = "celery"                # Python workers run it: celery worker -E -Q kobe.py
//! route = "py"                   # required, and not `default`
//! ```
//!
//! Every declared task has a built-in task's knobs (`route`, `priority`, `max_retries`,
//! `retry_base_ms`, `retry_factor`, `retry_max_delay_ms`, `time_limit_s`, `soft_time_limit_s`,
//! `kwargs_schema`). The file is read once, at start: anything wrong stops start-up with the
//! file, the line of the task and the field. `${VAR}` in a header value is replaced by the
//! variable's value when the file is read; such values are never logged.
//!
//! Periodic tasks are `[[schedule]]` tables (see [`crate::domain::schedule`] and `kobe::beat`):
//!
//! ```toml
//! [[schedule]]
//! name = "nightly-report"       # unique; part of each firing's task id
//! task = "wordcount"            # a declared or built-in task
//! cron = "0 2 * * *"            # or: every = 300 (seconds)
//! timezone = "+01:00"           # required with cron: "UTC" or a fixed offset
//! kwargs = { text = "..." }
//! queue = "io"                  # optional: a route other than the task's
//! missed = "catch_up_one"       # or "skip": slots missed while no scheduler ran
//!
//! [[schedule]]
//! name = "nightly-crawl"        # each slot starts one workflow instead of one task
//! every = 86400
//! workflow = '{"chain": [{"task_name": "fetch"}, {"task_name": "merge"}]}'  # or a TOML table
//! on_failure = { task_name = "notify", kwargs = { to = "ops" } }           # optional
//! ```

pub mod command;
mod destinations;
mod entry;
pub(crate) mod fields;
pub mod http;
mod schedule;
mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use entry::{build, Entry};
use schedule::{build_schedule, ScheduleEntry};
pub use task::{DeclaredTask, Knobs};

/// What is wrong with a tasks file, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}: {}{field}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), task.as_ref().map(|t| format!("task `{t}`: ")).unwrap_or_default())]
pub struct DeclarationError {
    pub file: PathBuf,
    /// 1-based line of the task's `[[task]]` header (or of the syntax error).
    pub line: Option<usize>,
    pub task: Option<String>,
    pub field: String,
    pub reason: String,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    task: Vec<Entry>,
    #[serde(default)]
    schedule: Vec<ScheduleEntry>,
}

/// What a tasks file declares.
#[derive(Debug, Default)]
pub struct Declared {
    pub tasks: Vec<Arc<DeclaredTask>>,
    pub schedules: Vec<crate::domain::schedule::Schedule>,
}

/// Reads and checks a tasks file; `lookup` resolves `${VAR}` references and secrets.
pub fn load(
    file: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Declared, DeclarationError> {
    let text = std::fs::read_to_string(file).map_err(|e| DeclarationError {
        file: file.to_owned(),
        line: None,
        task: None,
        field: "file".into(),
        reason: format!("cannot read it: {e}"),
    })?;
    parse(&text, file, lookup)
}

/// Checks the text of a tasks file (named `file` in errors).
pub fn parse(
    text: &str,
    file: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Declared, DeclarationError> {
    let parsed: File = toml::from_str(text).map_err(|e| DeclarationError {
        file: file.to_owned(),
        line: e.line_col().map(|(line, _)| line + 1),
        task: None,
        field: "syntax".into(),
        reason: e.to_string(),
    })?;
    let lines = header_lines(text, "[[task]]");
    let mut seen = BTreeMap::new();
    let mut tasks = Vec::new();
    for (i, entry) in parsed.task.into_iter().enumerate() {
        let line = lines.get(i).copied();
        let name = entry.name.clone();
        let error = |field: &str, reason: String| DeclarationError {
            file: file.to_owned(),
            line,
            task: Some(name.clone()),
            field: field.to_owned(),
            reason,
        };
        if let Some(first) = seen.insert(name.clone(), line) {
            let at = first.map(|l| format!(" on line {l}")).unwrap_or_default();
            return Err(error("name", format!("declared twice (first{at})")));
        }
        tasks.push(Arc::new(
            build(entry, lookup).map_err(|(f, r)| error(&f, r))?,
        ));
    }
    let lines = header_lines(text, "[[schedule]]");
    let mut schedules: Vec<crate::domain::schedule::Schedule> = Vec::new();
    for (i, entry) in parsed.schedule.into_iter().enumerate() {
        let name = entry.name.clone();
        let error = |field: &str, reason: String| DeclarationError {
            file: file.to_owned(),
            line: lines.get(i).copied(),
            task: Some(format!("schedule {name}")),
            field: field.to_owned(),
            reason,
        };
        if schedules.iter().any(|s| s.name == name) {
            return Err(error("name", "declared twice".into()));
        }
        schedules.push(build_schedule(entry).map_err(|(f, r)| error(&f, r))?);
    }
    Ok(Declared { tasks, schedules })
}

/// The 1-based line of each `header` (`[[task]]`, `[[schedule]]`), in order.
fn header_lines(text: &str, header: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.trim().starts_with(header))
        .map(|(i, _)| i + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use serde_json::Map;

    use crate::domain::Priority;
    use crate::tasks::Task;

    fn env(name: &str) -> Option<String> {
        match name {
            "KOBE_TASK_SIGNING_SECRET" => Some("a-signing-secret-of-some-length".into()),
            "NOTIFY_TOKEN" => Some("t0ken".into()),
            _ => None,
        }
    }

    fn parse_text(text: &str) -> Result<Vec<Arc<DeclaredTask>>, DeclarationError> {
        parse(text, Path::new("tasks.toml"), &env).map(|declared| declared.tasks)
    }

    #[test]
    fn schedules_are_declared_with_every_or_cron_and_an_explicit_timezone() {
        use crate::domain::schedule::{Missed, When};
        let declared = parse(
            r#"
[[schedule]]
name = "tick"
task = "demo_long_io"
every = 60
kwargs = { duration_ms = 1 }

[[schedule]]
name = "nightly"
task = "demo_long_io"
cron = "0 2 * * *"
timezone = "+01:00"
queue = "io"
missed = "skip"
"#,
            Path::new("tasks.toml"),
            &env,
        )
        .unwrap();
        let [tick, nightly] = declared.schedules.as_slice() else {
            panic!("{:?}", declared.schedules)
        };
        assert_eq!(tick.when, When::Every(60));
        assert_eq!(tick.kwargs["duration_ms"], 1);
        assert_eq!(tick.missed, Missed::CatchUpOne);
        assert!(matches!(nightly.when, When::Cron { offset_s: 3600, .. }));
        assert_eq!(
            (nightly.route.as_deref(), nightly.missed),
            (Some("io"), Missed::Skip)
        );

        let error = |text: &str| parse(text, Path::new("tasks.toml"), &env).unwrap_err();
        let base = "[[schedule]]\nname = \"s\"\ntask = \"t\"\n";
        for (extra, field) in [
            ("", "every"),
            ("every = 1\ncron = \"* * * * *\"\n", "every"),
            ("every = 0\n", "every"),
            ("cron = \"* * * * *\"\n", "timezone"),
            (
                "cron = \"* * * * *\"\ntimezone = \"Europe/Paris\"\n",
                "timezone",
            ),
            ("cron = \"61 * * * *\"\ntimezone = \"UTC\"\n", "cron"),
            ("every = 5\ntimezone = \"UTC\"\n", "timezone"),
            ("every = 5\nmissed = \"all\"\n", "missed"),
        ] {
            let err = error(&format!("{base}{extra}"));
            assert_eq!(
                (err.line, err.field.as_str()),
                (Some(1), field),
                "{extra}: {err}"
            );
        }
        let err = error(&format!("{base}every = 5\n\n{base}every = 6\n"));
        assert_eq!((err.line, err.field.as_str()), (Some(6), "name"), "{err}");
    }

    #[test]
    fn a_schedule_may_start_a_workflow_written_as_json_or_as_tables() {
        let declared = parse(
            r#"
[[schedule]]
name = "nightly-crawl"
every = 3600
workflow = '{"chain": [{"task_name": "fetch"}, {"task_name": "merge"}]}'
on_failure = { task_name = "alert" }

[[schedule]]
name = "fan-out"
every = 60
workflow = { group = [{ task_name = "parse", args = [1] }, { task_name = "parse", args = [2] }] }
"#,
            Path::new("tasks.toml"),
            &env,
        )
        .unwrap();
        let [crawl, fan_out] = declared.schedules.as_slice() else {
            panic!("{:?}", declared.schedules)
        };
        let crawl = crawl.workflow.as_ref().unwrap();
        assert_eq!(crawl["workflow"]["chain"][1]["task_name"], "merge");
        assert_eq!(crawl["on_failure"]["task_name"], "alert");
        let fan_out = fan_out.workflow.as_ref().unwrap();
        assert_eq!(fan_out["workflow"]["group"][1]["args"][0], 2);
        assert!(!fan_out.contains_key("on_failure"));

        let error = |extra: &str| {
            let text = format!("[[schedule]]\nname = \"s\"\nevery = 5\n{extra}");
            let err = parse(&text, Path::new("tasks.toml"), &env).unwrap_err();
            (err.field, err.reason)
        };
        let (field, reason) = error("task = \"t\"\nworkflow = '{\"task_name\": \"t\"}'\n");
        assert_eq!(field, "workflow", "{reason}");
        let (field, reason) = error("workflow = '{not json'\n");
        assert_eq!(field, "workflow", "{reason}");
        assert!(reason.contains("JSON"), "{reason}");
        let (field, _) = error("task = \"t\"\non_failure = { task_name = \"a\" }\n");
        assert_eq!(field, "on_failure");
        let (field, _) = error("");
        assert_eq!(field, "task");
    }

    #[test]
    fn a_file_declares_http_and_command_tasks_with_their_knobs() {
        let tasks = parse_text(
            r#"
[[task]]
name = "notify"
kind = "http"
url = "http://127.0.0.1:9000/hooks/notify"
headers = { Authorization = "Bearer ${NOTIFY_TOKEN}" }
route = "io"
priority = 5
max_retries = 7
time_limit_s = 30
kwargs_schema = { type = "object", required = ["to"] }

[[task]]
name = "wordcount"
kind = "command"
argv = ["python3", "scripts/wordcount.py"]
"#,
        )
        .unwrap();
        assert_eq!(tasks.len(), 2);
        let notify = &tasks[0];
        assert_eq!((notify.name(), notify.kind()), ("notify", "http"));
        assert_eq!(notify.route(), Some("io"));
        assert_eq!(notify.priority(), Some(Priority::new(5).unwrap()));
        assert_eq!(notify.retry_policy().max_retries, 7);
        assert_eq!(notify.time_limit(), Duration::from_secs(31));
        let missing = notify
            .kwargs_schema()
            .unwrap()
            .check(&Map::new())
            .unwrap_err();
        assert_eq!(missing.field, "kwargs.to");
        assert_eq!(tasks[1].kind(), "command");
        assert!(!format!("{:?}", tasks[0]).contains("t0ken"));
    }

    #[test]
    fn a_celery_task_names_its_own_route_and_kobes_workers_leave_it_alone() {
        let declared =
            parse_text("[[task]]\nname = \"py_crawl\"\nkind = \"celery\"\nroute = \"py\"\n")
                .unwrap();
        let mut registry = crate::tasks::Registry::with_builtin_tasks();
        for task in declared {
            assert_eq!(task.kind(), "celery");
            registry.register_shared(task).unwrap();
        }
        assert_eq!(registry.celery_tasks(), vec!["py_crawl".to_owned()]);
        assert_eq!(registry.celery_only_routes(), vec!["py".to_owned()]);
        assert!(registry.knows("py_crawl"), "the API accepts it");
        assert!(
            !registry.run_here().knows("py_crawl"),
            "a Kobe worker never runs it"
        );
        assert!(registry.run_here().knows("demo_long_io"));

        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"celery\"\n").unwrap_err();
        assert_eq!(err.field, "route");
        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"celery\"\nroute = \"default\"\n")
            .unwrap_err();
        assert_eq!(err.field, "route");
        let err = parse_text(
            "[[task]]\nname = \"a\"\nkind = \"celery\"\nroute = \"py\"\nurl = \"https://x\"\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "url");
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_field() {
        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"http\"\n\n[[task]]\nname = \"b\"\nkind = \"http\"\nurl = \"ftp://x\"\n").unwrap_err();
        assert_eq!(err.line, Some(1));
        assert_eq!(err.field, "url");
        assert!(
            err.to_string().starts_with("tasks.toml:1: task `a`: url:"),
            "{err}"
        );

        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"command\"\nargv = [\"true\"]\n\n[[task]]\nname = \"b\"\nkind = \"command\"\nargv = []\n").unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(6), "argv"));

        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"command\"\nargvv = [\"true\"]\n")
            .unwrap_err();
        assert_eq!(err.field, "syntax");
        assert!(err.reason.contains("argvv"), "{err}");

        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://x\"\nheaders = { X = \"${MISSING}\" }\n").unwrap_err();
        assert_eq!(err.field, "headers.X");
        assert!(err.reason.contains("MISSING"), "{err}");

        let err = parse_text(
            "[[task]]\nname = \"a\"\nkind = \"command\"\nargv = [\"true\"]\nurl = \"http://x\"\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "url");

        let err = parse_text("[[task]]\nname = \"a b\"\nkind = \"command\"\nargv = [\"true\"]\n")
            .unwrap_err();
        assert_eq!(err.field, "name");

        let twice = "[[task]]\nname = \"a\"\nkind = \"command\"\nargv = [\"true\"]\n";
        let err = parse_text(&format!("{twice}\n{twice}")).unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(6), "name"));

        let err = parse_text("[[task]]\nname = \"a\"\nkind = \"command\"\nargv = [\"true\"]\ntime_limit_s = 5\nsoft_time_limit_s = 9\n").unwrap_err();
        assert_eq!(err.field, "soft_time_limit_s");
    }

    #[test]
    fn networks_are_checked_where_the_file_names_them() {
        let denied = "[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/x\"\ndeny_networks = [\"127.0.0.0/8\"]\n";
        assert_eq!(parse_text(denied).unwrap_err().field, "url");
        let outside = "[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://192.0.2.1/x\"\nallow_networks = [\"10.0.0.0/8\"]\n";
        assert_eq!(parse_text(outside).unwrap_err().field, "url");
        let bad = "[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://x/\"\nallow_networks = [\"ten\"]\n";
        assert_eq!(parse_text(bad).unwrap_err().field, "allow_networks");
        let fine = "[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://10.1.2.3/x\"\nallow_networks = [\"10.0.0.0/8\"]\n";
        assert!(parse_text(fine).is_ok());
    }

    #[test]
    fn an_http_task_needs_a_signing_secret() {
        let text = "[[task]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://x\"\nsigning_secret_env = \"NOT_SET\"\n";
        let err = parse_text(text).unwrap_err();
        assert_eq!(err.field, "signing_secret_env");
        assert!(err.reason.contains("NOT_SET"), "{err}");
    }
}
