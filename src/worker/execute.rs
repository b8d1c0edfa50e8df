//! Running one handler: on a task of its own (so a panic is caught and the attempt can be
//! abandoned), under the hard time limit, with the soft limit raised on time and the cancel
//! signal raised when an operator cancels the task.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::decision::Outcome;
use crate::domain::{time_limit, MAX_TIME_LIMIT};
use crate::tasks::{HandlerResult, Invocation, Signal, Task, TaskError};
use crate::telemetry::metrics::metrics;

/// The limits one attempt runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub hard: Duration,
    pub soft: Option<Duration>,
}

impl Limits {
    /// The message's limits, else the task's; a soft limit at or past the hard one is dropped.
    pub fn of(task: &dyn Task, hard: Option<f64>, soft: Option<f64>) -> Self {
        let hard = time_limit(hard).unwrap_or_else(|| task.time_limit().min(MAX_TIME_LIMIT));
        let soft = time_limit(soft)
            .or_else(|| task.soft_time_limit())
            .filter(|soft| *soft < hard);
        Self { hard, soft }
    }
}

/// A handler running on its own task. Dropping it abandons the attempt.
pub struct Running {
    join: JoinHandle<HandlerResult>,
    soft_timer: Option<JoinHandle<()>>,
    deadline: Instant,
    limit: Duration,
    started: std::time::Instant,
    task_name: String,
    finished: bool,
    /// Raises the handler's cancel signal.
    cancel: tokio::sync::watch::Sender<bool>,
    /// The cancel signal was raised because the lease could not be renewed, not by an operator:
    /// the attempt is abandoned, not revoked.
    stopped_for_lease: bool,
}

impl Running {
    /// Starts `task` with `invocation` (whose soft limit is replaced by one raised on time, and
    /// whose cancel signal by [`Running::cancel`]'s).
    pub fn start(task: &dyn Task, mut invocation: Invocation, limits: Limits) -> Self {
        let (trip, soft_limit) = Signal::pair();
        invocation.soft_limit = soft_limit;
        let (cancel, cancelled) = Signal::pair();
        invocation.cancel = cancelled;
        let soft_timer = limits.soft.map(|soft| {
            tokio::spawn(async move {
                tokio::time::sleep(soft).await;
                tracing::warn!(
                    soft_limit_ms = soft.as_millis() as u64,
                    "soft time limit reached; handler told to wrap up"
                );
                let _ = trip.send(true);
            })
        });
        metrics().tasks_in_flight.inc();
        Self {
            join: tokio::spawn(task.run(invocation)),
            soft_timer,
            deadline: Instant::now() + limits.hard,
            limit: limits.hard,
            started: std::time::Instant::now(),
            task_name: task.name().to_owned(),
            finished: false,
            cancel,
            stopped_for_lease: false,
        }
    }

    /// The switch that asks the handler to stop (an operator cancelled the task). Once raised,
    /// any ending but success is [`Outcome::Revoked`].
    pub fn cancel(&self) -> tokio::sync::watch::Sender<bool> {
        self.cancel.clone()
    }

    /// Asks the handler to stop because its lease cannot be kept (the cancel signal, which a
    /// handler already honours); what it then returns is not an operator's revoke.
    pub(crate) fn stop_for_lease(&mut self) {
        self.stopped_for_lease = true;
        self.cancel.send_replace(true);
    }

    /// How long it has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the handler (or its hard limit). Call once.
    pub async fn outcome(&mut self) -> Outcome {
        let outcome = match tokio::time::timeout_at(self.deadline, &mut self.join).await {
            Ok(Ok(Ok(value))) => Outcome::Success(value),
            Ok(Ok(Err(TaskError::Retryable(cause)))) => Outcome::Retryable(cause),
            Ok(Ok(Err(TaskError::Permanent(cause)))) => Outcome::Permanent(cause),
            Ok(Ok(Err(TaskError::RetryAfter { after, cause }))) => {
                Outcome::RetryAfter(after, cause)
            }
            Ok(Err(join_error)) => match join_error.try_into_panic() {
                Ok(payload) => Outcome::Panicked(panic_message(payload.as_ref())),
                Err(e) => Outcome::Panicked(format!("handler was cancelled: {e}")),
            },
            Err(_) => {
                self.join.abort();
                Outcome::TimedOut(self.limit)
            }
        };
        self.finish();
        match outcome {
            Outcome::Success(_) => outcome,
            _ if *self.cancel.borrow() && !self.stopped_for_lease => {
                Outcome::Revoked(match outcome {
                    Outcome::TimedOut(limit) => {
                        format!(
                            "cancelled; the handler did not stop within its time limit ({limit:?})"
                        )
                    }
                    other => format!("cancelled; the handler stopped: {}", other.cause()),
                })
            }
            _ => outcome,
        }
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        metrics().tasks_in_flight.dec();
        metrics()
            .task_duration
            .with_label_values(&[self.task_name.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(timer) = self.soft_timer.take() {
            timer.abort();
        }
    }
}

impl Drop for Running {
    /// An attempt dropped before its outcome (its lease was lost, the worker is stopping) is
    /// abandoned: its handler stops at its next await.
    fn drop(&mut self) {
        self.join.abort();
        self.finish();
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}
