//! Running a failed task again, as its next attempt: what `POST /task/{id}/retry`,
//! `kobe task retry` and a dead-letter replay share.
//!
//! The task is reopened (`FAILURE` or `REVOKED` → `RETRY`, one more retry, who asked recorded in `replays`)
//! and its next attempt published through the submitter. A publish that is not confirmed leaves
//! the task reopened with its publish pending: asking again publishes it then, without
//! reopening it twice.

use super::Operations;
use crate::domain::TaskState;
use crate::store::attempts::Reopened;
use crate::store::{StoreError, TaskDocument};
use crate::submit::SubmitError;
use crate::telemetry::metrics::metrics;

/// What asking for a rerun did.
#[derive(Debug)]
pub enum Rerun {
    /// The next attempt is published and confirmed.
    Published(Box<TaskDocument>),
    /// The task is neither `FAILURE` nor `REVOKED` (nor a rerun waiting for its publish):
    /// nothing was changed.
    NotFailed(TaskState),
    Missing,
    /// Reopened, but the publish was not confirmed: ask again.
    NotPublished(SubmitError),
}

/// Reruns task `id` for `by` (who asked, for its history and the log). A step whose failure
/// ended its workflow reopens the workflow too: if it now succeeds, the workflow goes on.
pub async fn rerun(operations: &Operations, id: &str, by: &str) -> Result<Rerun, StoreError> {
    let Operations {
        submitter,
        tasks,
        cache,
        workflows,
        ..
    } = operations;
    let refused = |outcome: &str| {
        metrics()
            .task_operations
            .with_label_values(&["retry", outcome])
            .inc();
    };
    let task = match tasks.reopen(id, by).await? {
        Reopened::Now(task) | Reopened::Unpublished(task) => task,
        Reopened::MovedOn(state) => {
            refused("not_rerunnable");
            return Ok(Rerun::NotFailed(state));
        }
        Reopened::Missing => {
            refused("missing");
            return Ok(Rerun::Missing);
        }
    };
    if let Some(workflow) = &task.workflow_id {
        match workflows.reopen(workflow, id).await {
            Ok(true) => {
                tracing::info!(workflow_id = %workflow, task_id = %id, "workflow reopened by the rerun of the step that ended it")
            }
            Ok(false) => {}
            Err(SubmitError::Store(error)) => return Err(error),
            Err(error) => {
                tracing::warn!(error = %error, workflow_id = %workflow, "cannot hand the reopened workflow on")
            }
        }
    }
    // Best effort: a cached final state would hide the rerun until its TTL.
    let _ = cache.invalidate_status(id).await;
    tracing::info!(task_id = %id, by = %by, retries = task.retries, "task rerun requested");
    let published = submitter.republish(&task).await;
    metrics()
        .task_operations
        .with_label_values(&[
            "retry",
            if published.is_ok() {
                "published"
            } else {
                "not_published"
            },
        ])
        .inc();
    Ok(match published {
        Ok(()) => Rerun::Published(task),
        Err(error) => Rerun::NotPublished(error),
    })
}
