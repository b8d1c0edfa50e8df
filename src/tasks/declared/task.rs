//! A declared task: its knobs, and the runner (an HTTP call or a program) that does its work.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{command, http};
use crate::domain::Priority;
use crate::tasks::{
    HandlerResult, InvalidInput, Invocation, KwargsSchema, RetryPolicy, Task, TaskError, TaskFuture,
};

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
pub(super) enum Runner {
    Http(http::HttpCall),
    Command(command::Program),
    /// Python Celery workers do its work; Kobe's never take it.
    Celery,
}

/// A task read from a tasks file.
#[derive(Debug)]
pub struct DeclaredTask {
    pub(super) knobs: Knobs,
    pub(super) runner: Arc<Runner>,
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
            Runner::Celery => "celery",
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
            Runner::Command(_) | Runner::Celery => self.knobs.time_limit,
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
                Runner::Celery => Err(TaskError::Permanent(format!(
                    "`{}` is run by Celery workers (kind = \"celery\"), not by Kobe's",
                    knobs.name
                ))),
            };
            result
        })
    }

    fn validate(&self, _args: &[Value], _kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        Ok(())
    }
}
