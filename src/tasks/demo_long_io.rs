//! `demo_long_io`: stands in for an I/O-bound job. It waits `duration_ms` without blocking a
//! thread, and fails its first `fail_attempts` attempts with a retryable error so retries can be
//! exercised end to end.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{optional_u64, InvalidInput, Invocation, Task, TaskError, TaskFuture, WrapUp};

/// Longest simulated wait: an hour is already beyond any sensible demo.
const MAX_DURATION_MS: u64 = 3_600_000;

pub struct DemoLongIo;

struct Params {
    duration_ms: u64,
    fail_attempts: u64,
}

fn params(kwargs: &Map<String, Value>) -> Result<Params, InvalidInput> {
    let duration_ms = optional_u64(kwargs, "duration_ms", 1000)?;
    if duration_ms > MAX_DURATION_MS {
        return Err(InvalidInput {
            field: "kwargs.duration_ms".into(),
            reason: format!("must be at most {MAX_DURATION_MS}"),
        });
    }
    let fail_attempts = optional_u64(kwargs, "fail_attempts", 0)?;
    Ok(Params {
        duration_ms,
        fail_attempts,
    })
}

impl Task for DemoLongIo {
    fn name(&self) -> &'static str {
        "demo_long_io"
    }

    fn validate(&self, _args: &[Value], kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        params(kwargs).map(drop)
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        Box::pin(async move {
            let params =
                params(&invocation.kwargs).map_err(|e| TaskError::Permanent(e.to_string()))?;
            // No wait at all for 0 (a timer would still wait for its next tick, about 1 ms).
            let wait = async {
                if params.duration_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(params.duration_ms)).await;
                }
            };
            tokio::select! {
                () = wait => {}
                why = invocation.wrap_up() => {
                    // A real handler would close files or roll back here.
                    let what = match why {
                        WrapUp::SoftLimit => "soft time limit exceeded",
                        WrapUp::Cancelled => "cancelled",
                    };
                    tracing::info!("{what}; stopping early");
                    return Err(TaskError::Permanent(format!("{what}; stopped early")));
                }
            }
            if u64::from(invocation.attempt) <= params.fail_attempts {
                return Err(TaskError::Retryable(format!(
                    "simulated I/O failure on attempt {} of {} planned failures",
                    invocation.attempt, params.fail_attempts
                )));
            }
            Ok(json!({"slept_ms": params.duration_ms, "attempt": invocation.attempt}))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskId;

    fn invocation(attempt: u32, kwargs: Value) -> Invocation {
        Invocation {
            attempt,
            ..Invocation::new(
                TaskId::generate(),
                vec![],
                kwargs.as_object().cloned().unwrap(),
            )
        }
    }

    #[tokio::test]
    async fn fails_the_planned_attempts_then_succeeds() {
        let kwargs = json!({"duration_ms": 1, "fail_attempts": 2});
        for attempt in 1..=2 {
            let result = DemoLongIo.run(invocation(attempt, kwargs.clone())).await;
            assert!(matches!(result, Err(TaskError::Retryable(_))), "{result:?}");
        }
        let result = DemoLongIo.run(invocation(3, kwargs)).await.unwrap();
        assert_eq!(result["attempt"], 3);
    }

    #[tokio::test]
    async fn stops_early_at_the_soft_limit() {
        let (trip, soft_limit) = crate::tasks::Signal::pair();
        let mut call = invocation(1, json!({"duration_ms": 60_000}));
        call.soft_limit = soft_limit;
        let running = tokio::spawn(DemoLongIo.run(call));
        trip.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(result, Err(TaskError::Permanent(ref m)) if m.contains("soft time limit"))
        );
    }

    #[tokio::test]
    async fn stops_early_when_cancelled() {
        let (cancel, cancelled) = crate::tasks::Signal::pair();
        let mut call = invocation(1, json!({"duration_ms": 60_000}));
        call.cancel = cancelled;
        let running = tokio::spawn(DemoLongIo.run(call));
        cancel.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(result, Err(TaskError::Permanent(ref m)) if m.contains("cancelled")));
    }

    #[test]
    fn bad_kwargs_name_the_field() {
        let err = DemoLongIo
            .validate(&[], json!({"duration_ms": "soon"}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(err.field, "kwargs.duration_ms");
        let err = DemoLongIo
            .validate(&[], json!({"fail_attempts": -1}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(err.field, "kwargs.fail_attempts");
    }
}
