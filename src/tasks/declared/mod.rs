//! Tasks that need no Rust: declared in a TOML file (`KOBE_TASKS_FILE`) and run by calling an
//! HTTP endpoint ([`http`]) or a program ([`command`]).
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
//! ```

pub mod command;
pub mod http;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{HandlerResult, InvalidInput, Invocation, KwargsSchema, RetryPolicy, Task, TaskFuture};
use crate::domain::{Priority, MAX_TIME_LIMIT};

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

/// One `[[schedule]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleEntry {
    name: String,
    task: String,
    every: Option<u64>,
    cron: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    kwargs: toml::value::Table,
    queue: Option<String>,
    missed: Option<String>,
}

/// What a tasks file declares.
#[derive(Debug, Default)]
pub struct Declared {
    pub tasks: Vec<Arc<DeclaredTask>>,
    pub schedules: Vec<crate::domain::schedule::Schedule>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Http,
    Command,
}

/// One `[[task]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    kind: Kind,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    signing_secret_env: Option<String>,
    follow_redirects: Option<String>,
    #[serde(default)]
    allow_networks: Vec<String>,
    #[serde(default)]
    deny_networks: Vec<String>,
    argv: Option<Vec<String>>,
    #[serde(default)]
    env: Vec<String>,
    cwd: Option<PathBuf>,
    max_output_bytes: Option<usize>,
    route: Option<String>,
    priority: Option<u8>,
    max_retries: Option<u32>,
    retry_base_ms: Option<u64>,
    retry_factor: Option<f64>,
    retry_max_delay_ms: Option<u64>,
    time_limit_s: Option<f64>,
    soft_time_limit_s: Option<f64>,
    kwargs_schema: Option<toml::Value>,
}

/// The knobs every declared task has.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub name: &'static str,
    pub route: Option<String>,
    pub priority: Option<Priority>,
    pub retry: RetryPolicy,
    pub time_limit: Duration,
    pub soft_time_limit: Option<Duration>,
    pub kwargs_schema: Option<KwargsSchema>,
}

/// How a declared task does its work.
#[derive(Debug)]
enum Runner {
    Http(http::HttpCall),
    Command(command::Program),
}

/// A task read from a tasks file.
#[derive(Debug)]
pub struct DeclaredTask {
    knobs: Knobs,
    runner: Arc<Runner>,
}

impl DeclaredTask {
    /// An HTTP call's request times out at `time_limit_s`; the worker's hard limit comes this
    /// much later, so an overrunning request ends as a timeout, which is retried.
    const HTTP_GRACE: Duration = Duration::from_secs(1);
}

impl Task for DeclaredTask {
    fn name(&self) -> &'static str {
        self.knobs.name
    }

    fn kind(&self) -> &'static str {
        match *self.runner {
            Runner::Http(_) => "http",
            Runner::Command(_) => "command",
        }
    }

    fn route(&self) -> Option<&str> {
        self.knobs.route.as_deref()
    }

    fn priority(&self) -> Option<Priority> {
        self.knobs.priority
    }

    fn kwargs_schema(&self) -> Option<&KwargsSchema> {
        self.knobs.kwargs_schema.as_ref()
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.knobs.retry
    }

    fn time_limit(&self) -> Duration {
        match *self.runner {
            Runner::Http(_) => self.knobs.time_limit + Self::HTTP_GRACE,
            Runner::Command(_) => self.knobs.time_limit,
        }
    }

    fn soft_time_limit(&self) -> Option<Duration> {
        self.knobs.soft_time_limit
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        let runner = self.runner.clone();
        let knobs = self.knobs.clone();
        Box::pin(async move {
            let body = serde_json::json!({
                "task_id": invocation.task_id.as_str(),
                "task_name": knobs.name,
                "attempt": invocation.attempt,
                "args": invocation.args,
                "kwargs": invocation.kwargs,
            });
            let result: HandlerResult = match &*runner {
                Runner::Http(call) => call.run(&invocation, &body, knobs.time_limit).await,
                Runner::Command(program) => program.run(invocation, &body).await,
            };
            result
        })
    }

    fn validate(&self, _args: &[Value], _kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        Ok(())
    }
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

/// The longest `every`: a year.
const MAX_EVERY_S: u64 = 366 * 24 * 3600;

fn build_schedule(entry: ScheduleEntry) -> Result<crate::domain::schedule::Schedule, FieldError> {
    use crate::domain::schedule::{parse_offset, Cron, Missed, Schedule, When};
    check_name("name", &entry.name)?;
    if entry.task.is_empty() {
        return Err(field("task", "name the task to run"));
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
    })
}

type FieldError = (String, String);

fn field(name: &str, reason: impl Into<String>) -> FieldError {
    (name.to_owned(), reason.into())
}

/// Names become metric labels, queue names and routing keys: keep them to a safe alphabet.
fn check_name(field_name: &str, value: &str) -> Result<(), FieldError> {
    crate::domain::check_safe_name(value).map_err(|reason| field(field_name, reason))
}

fn seconds(field_name: &str, value: f64) -> Result<Duration, FieldError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_TIME_LIMIT)
        .ok_or_else(|| {
            field(
                field_name,
                format!(
                    "expected seconds above 0 and at most {}",
                    MAX_TIME_LIMIT.as_secs()
                ),
            )
        })
}

fn build(
    entry: Entry,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<DeclaredTask, FieldError> {
    check_name("name", &entry.name)?;
    if let Some(route) = &entry.route {
        check_name("route", route)?;
    }
    let priority = entry
        .priority
        .map(|p| Priority::new(i64::from(p)).map_err(|reason| field("priority", reason)))
        .transpose()?;
    let defaults = RetryPolicy::default();
    let retry = RetryPolicy {
        max_retries: entry.max_retries.unwrap_or(defaults.max_retries),
        base_delay: entry
            .retry_base_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.base_delay),
        factor: match entry.retry_factor {
            Some(f) if f.is_finite() && f >= 1.0 => f,
            Some(_) => return Err(field("retry_factor", "expected a number of at least 1")),
            None => defaults.factor,
        },
        max_delay: entry
            .retry_max_delay_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.max_delay),
    };
    let time_limit = seconds("time_limit_s", entry.time_limit_s.unwrap_or(300.0))?;
    let soft_time_limit = entry
        .soft_time_limit_s
        .map(|s| seconds("soft_time_limit_s", s))
        .transpose()?;
    if soft_time_limit.is_some_and(|soft| soft >= time_limit) {
        return Err(field("soft_time_limit_s", "must be below time_limit_s"));
    }
    let kwargs_schema = entry
        .kwargs_schema
        .map(|schema| {
            let json =
                serde_json::to_value(schema).map_err(|e| field("kwargs_schema", e.to_string()))?;
            KwargsSchema::new(json).map_err(|reason| field("kwargs_schema", reason))
        })
        .transpose()?;
    let name: &'static str = Box::leak(entry.name.into_boxed_str());
    let knobs = Knobs {
        name,
        route: entry.route,
        priority,
        retry,
        time_limit,
        soft_time_limit,
        kwargs_schema,
    };
    let only = |present: bool, name: &str, kind: &str| {
        if present {
            Err(field(name, format!("only for kind = \"{kind}\"")))
        } else {
            Ok(())
        }
    };
    let runner = match entry.kind {
        Kind::Http => {
            only(entry.argv.is_some(), "argv", "command")?;
            only(!entry.env.is_empty(), "env", "command")?;
            only(entry.cwd.is_some(), "cwd", "command")?;
            only(
                entry.max_output_bytes.is_some(),
                "max_output_bytes",
                "command",
            )?;
            let url = entry
                .url
                .ok_or_else(|| field("url", "required for kind = \"http\""))?;
            Runner::Http(http::HttpCall::new(
                &url,
                &entry.headers,
                entry.signing_secret_env.as_deref(),
                entry.follow_redirects.as_deref(),
                (&entry.allow_networks, &entry.deny_networks),
                lookup,
            )?)
        }
        Kind::Command => {
            only(entry.url.is_some(), "url", "http")?;
            only(!entry.headers.is_empty(), "headers", "http")?;
            only(entry.follow_redirects.is_some(), "follow_redirects", "http")?;
            only(!entry.allow_networks.is_empty(), "allow_networks", "http")?;
            only(!entry.deny_networks.is_empty(), "deny_networks", "http")?;
            only(
                entry.signing_secret_env.is_some(),
                "signing_secret_env",
                "http",
            )?;
            let argv = entry
                .argv
                .ok_or_else(|| field("argv", "required for kind = \"command\""))?;
            Runner::Command(command::Program::new(
                argv,
                &entry.env,
                entry.cwd,
                entry.max_output_bytes,
                lookup,
            )?)
        }
    };
    Ok(DeclaredTask {
        knobs,
        runner: Arc::new(runner),
    })
}

/// The first `limit` characters of `text`, marked when cut.
pub(crate) fn excerpt(text: &str, limit: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(limit).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
