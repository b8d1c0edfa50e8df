//! Cancelling a task: what `POST /task/{id}/cancel` and `kobe task cancel` share; and a
//! workflow, for `POST /workflow/{id}/cancel` and `kobe workflow cancel`.
//!
//! A waiting task (`PENDING`, `RETRY`) becomes `REVOKED` at once and its message is acked unrun
//! when a worker receives it. A running one is marked: the worker running it sees the mark within
//! [`CANCEL_POLL`](crate::worker::CANCEL_POLL) and raises the handler's
//! [`cancel`](crate::tasks::Invocation::cancel) signal; the task ends `REVOKED` if the handler
//! stops, or as it would have if it runs to its end. Asking again changes nothing.

use crate::store::attempts::Cancelled;
use crate::store::{Cache, StoreError, TaskRepository};
use crate::telemetry::metrics::metrics;

/// Cancels task `id` for `by` (who asked, for its history and the log). A task of
/// `python_run` (declared `kind = "celery"`) is left alone: Python workers run it.
pub async fn cancel(
    tasks: &TaskRepository,
    cache: &Cache,
    python_run: &[String],
    id: &str,
    by: &str,
) -> Result<Cancelled, StoreError> {
    let answer = match python_run.is_empty() {
        true => tasks.cancel(id, by).await?,
        false => match tasks.name_of(id).await? {
            Some(name) if python_run.contains(&name) => Cancelled::RunByCelery(name),
            _ => tasks.cancel(id, by).await?,
        },
    };
    let outcome = match &answer {
        Cancelled::Revoked => "revoked",
        Cancelled::Requested => "requested",
        Cancelled::AlreadyRevoked => "already_revoked",
        Cancelled::Finished(_) => "finished",
        Cancelled::RunByCelery(_) => "run_by_celery",
        Cancelled::Missing => "missing",
    };
    if matches!(answer, Cancelled::Revoked) {
        // Best effort: a cached PENDING would hide the cancel until its TTL.
        let _ = cache.invalidate_status(id).await;
    }
    metrics()
        .task_operations
        .with_label_values(&["cancel", outcome])
        .inc();
    tracing::info!(task_id = %id, by = %by, outcome, "task cancel requested");
    Ok(answer)
}

/// Cancels workflow `id` for `by`: it ends `REVOKED` so no later step is submitted, and each of
/// its steps' tasks not finished is cancelled as [`cancel`] would. Its state afterwards and how
/// many tasks were cancelled; `None`: no such workflow.
pub async fn workflow(
    workflows: &crate::workflow::Workflows,
    tasks: &TaskRepository,
    cache: &Cache,
    id: &str,
    by: &str,
) -> Result<Option<(String, usize)>, StoreError> {
    let Some((state, running)) = workflows.revoke(id, by).await? else {
        return Ok(None);
    };
    for task_id in &running {
        cancel(tasks, cache, &[], task_id, by).await?;
    }
    Ok(Some((state.as_str().to_owned(), running.len())))
}
