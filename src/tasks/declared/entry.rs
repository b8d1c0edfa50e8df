//! One `[[task]]` table: as written, and checked into a [`DeclaredTask`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::fields::{check_name, field, seconds, FieldError};
use super::task::{DeclaredTask, Knobs, Runner};
use super::{command, http};
use crate::domain::Priority;
use crate::tasks::{KwargsSchema, RetryPolicy};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Http,
    Command,
    /// Run by Python Celery workers: Kobe records and publishes it, and tracks its outcome.
    Celery,
}

/// One `[[task]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Entry {
    pub(super) name: String,
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

/// Checks a `[[task]]` table; `lookup` resolves `${VAR}` references and secrets.
pub(super) fn build(
    entry: Entry,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<DeclaredTask, FieldError> {
    let knobs = knobs(&entry)?;
    let runner = runner(entry, lookup)?;
    Ok(DeclaredTask {
        knobs,
        runner: Arc::new(runner),
    })
}

/// The knobs every declared task has, checked.
fn knobs(entry: &Entry) -> Result<Knobs, FieldError> {
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
        .clone()
        .map(|schema| {
            let json =
                serde_json::to_value(schema).map_err(|e| field("kwargs_schema", e.to_string()))?;
            KwargsSchema::new(json).map_err(|reason| field("kwargs_schema", reason))
        })
        .transpose()?;
    let name: &'static str = Box::leak(entry.name.clone().into_boxed_str());
    Ok(Knobs {
        name,
        route: entry.route.clone(),
        priority,
        retry,
        time_limit,
        soft_time_limit,
        kwargs_schema,
    })
}

/// What does the work: the fields of the task's kind, and none of the other kind's.
fn runner(entry: Entry, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Runner, FieldError> {
    let only = |present: bool, name: &str, kind: &str| {
        if present {
            Err(field(name, format!("only for kind = \"{kind}\"")))
        } else {
            Ok(())
        }
    };
    Ok(match entry.kind {
        Kind::Celery => {
            for (present, name) in [
                (entry.url.is_some(), "url"),
                (!entry.headers.is_empty(), "headers"),
                (entry.follow_redirects.is_some(), "follow_redirects"),
                (!entry.allow_networks.is_empty(), "allow_networks"),
                (!entry.deny_networks.is_empty(), "deny_networks"),
                (entry.signing_secret_env.is_some(), "signing_secret_env"),
                (entry.argv.is_some(), "argv"),
                (!entry.env.is_empty(), "env"),
                (entry.cwd.is_some(), "cwd"),
                (entry.max_output_bytes.is_some(), "max_output_bytes"),
            ] {
                if present {
                    return Err(field(
                        name,
                        "not for kind = \"celery\" (Python workers do its work)",
                    ));
                }
            }
            match entry.route.as_deref() {
                None => {
                    return Err(field(
                        "route",
                        "required for kind = \"celery\": the queue its Celery workers consume",
                    ))
                }
                Some(crate::amqp::topology::DEFAULT_ROUTE) => {
                    return Err(field(
                        "route",
                        "a route of its own, not `default`, which Kobe's workers consume",
                    ))
                }
                Some(_) => Runner::Celery,
            }
        }
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
    })
}
