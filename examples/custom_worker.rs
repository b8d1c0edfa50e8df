//! A Kobe of your own: the `kobe` command line with a task of yours beside the built-in ones.
//!
//! ```sh
//! scripts/services.sh                                   # RabbitMQ, Redis, MongoDB; prints MONGODB_URI
//! cargo run --example custom_worker -- init-db
//! cargo run --example custom_worker -- worker &         # runs url_size (and the demos)
//! cargo run --example custom_worker -- serve &          # accepts url_size submissions
//! curl -s localhost:8000/task/start -H 'content-type: application/json' \
//!      -d '{"task_name": "url_size", "kwargs": {"url": "https://www.rust-lang.org"}}'
//! curl -s localhost:8000/task/status/<task_id>
//! ```

use std::process::ExitCode;
use std::time::Duration;

use kobe::tasks::{Invocation, KwargsSchema, RetryPolicy, Task, TaskError, TaskFuture};
use serde_json::json;

/// Fetches a URL and records its size.
struct UrlSize {
    client: reqwest::Client,
    schema: KwargsSchema,
}

impl UrlSize {
    fn new() -> Self {
        let schema = KwargsSchema::new(json!({
            "type": "object",
            "required": ["url"],
            "additionalProperties": false,
            "properties": {"url": {"type": "string", "minLength": 8}}
        }))
        .expect("a schema within the supported subset");
        Self {
            client: reqwest::Client::new(),
            schema,
        }
    }
}

impl Task for UrlSize {
    fn name(&self) -> &'static str {
        "url_size"
    }

    /// Submissions with a missing or non-string `url` get a 422 naming `kwargs.url`.
    fn kwargs_schema(&self) -> Option<&KwargsSchema> {
        Some(&self.schema)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: 5,
            ..RetryPolicy::default()
        }
    }

    fn time_limit(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        let client = self.client.clone();
        Box::pin(async move {
            let url = invocation.kwargs["url"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            // A network error may pass: retry. A 4xx will not: fail for good.
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| TaskError::Retryable(format!("cannot fetch {url}: {e}")))?;
            let status = response.status();
            if status.is_client_error() {
                return Err(TaskError::Permanent(format!("{url} answered {status}")));
            }
            if !status.is_success() {
                return Err(TaskError::Retryable(format!("{url} answered {status}")));
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| TaskError::Retryable(format!("{url} broke off: {e}")))?;
            Ok(json!({"url": url, "status": status.as_u16(), "bytes": body.len()}))
        })
    }
}

fn main() -> ExitCode {
    kobe::App::new()
        .with_builtin_tasks()
        .task(UrlSize::new())
        .run()
}
