//! `TaskErrorLog`: one record per failed attempt, with what was decided about it.

use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::batch::{Write, WriteOp};
use super::StoreError;

pub const COLLECTION: &str = "TaskErrorLog";

/// What the worker did about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Retry,
    DeadLetter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub task_id: String,
    pub task_name: String,
    /// 1-based attempt that failed.
    pub attempt: u32,
    pub root_cause: String,
    pub decision: Decision,
    /// For a retry: how long the next attempt waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay_ms: Option<u64>,
    /// When the attempt ended.
    pub at: DateTime,
    /// The worker (`host:pid`) that ran it, if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When its claim was taken, if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime>,
}

#[derive(Clone)]
pub struct ErrorLogRepository {
    collection: Collection<ErrorRecord>,
}

impl ErrorLogRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    #[tracing::instrument(name = "store.error_log.record", skip_all, fields(task_id = %record.task_id))]
    pub async fn record(&self, record: &ErrorRecord) -> Result<(), StoreError> {
        self.collection.insert_one(record).await?;
        Ok(())
    }

    /// The same record as a batched write (see [`super::batch`]), with its own `_id` so that
    /// sending it twice stores it once (the second is refused as a duplicate).
    pub(crate) fn record_write(&self, record: &ErrorRecord) -> Write {
        let mut document = mongodb::bson::to_document(record).unwrap_or_default();
        document.insert("_id", mongodb::bson::oid::ObjectId::new());
        Write {
            collection: COLLECTION,
            op: WriteOp::Insert(document),
            purpose: "error_log",
        }
    }

    /// A task's failures, oldest first.
    #[tracing::instrument(name = "store.error_log.for_task", skip(self))]
    pub async fn for_task(&self, task_id: &str) -> Result<Vec<ErrorRecord>, StoreError> {
        use futures_util::TryStreamExt;
        let cursor = self
            .collection
            .find(doc! {"task_id": task_id})
            .sort(doc! {"at": 1})
            .await?;
        Ok(cursor.try_collect().await?)
    }
}

/// One attempt of a task, as its history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptEntry {
    /// 1-based.
    pub attempt: u32,
    /// The worker (`host:pid`) that ran it, where known.
    pub worker: Option<String>,
    pub started_at: Option<DateTime>,
    /// `None` while it runs.
    pub ended_at: Option<DateTime>,
    /// `RETRY` or `FAILURE` for a failed attempt, `STARTED` while it runs, else the task's state.
    pub outcome: crate::domain::TaskState,
    pub root_cause: Option<String>,
}

/// Every attempt of `task`, oldest first: its failed ones (from `TaskErrorLog`, kept 30 days)
/// and, once it has started, the current or last one (from the task itself). The one home of
/// "which attempts ran, where, when, how they ended" for the API, the page and the CLI.
pub fn history(task: &super::TaskDocument, failures: &[ErrorRecord]) -> Vec<AttemptEntry> {
    use crate::domain::TaskState;
    let mut entries: Vec<AttemptEntry> = failures
        .iter()
        .map(|e| AttemptEntry {
            attempt: e.attempt,
            worker: e.worker.clone(),
            started_at: e.started_at,
            ended_at: Some(e.at),
            outcome: match e.decision {
                Decision::Retry => TaskState::Retry,
                Decision::DeadLetter => TaskState::Failure,
            },
            root_cause: Some(e.root_cause.clone()),
        })
        .collect();
    let current = task.retries.saturating_add(1);
    let shown = entries.iter().any(|e| e.attempt == current);
    let ran = task.started_at.is_some()
        && matches!(
            task.state,
            TaskState::Started | TaskState::Success | TaskState::Revoked | TaskState::Failure
        );
    if ran && !shown {
        entries.push(AttemptEntry {
            attempt: current,
            worker: task.worker.clone(),
            started_at: task.started_at,
            ended_at: task.state.is_final().then_some(task.updated_at),
            outcome: task.state,
            root_cause: task
                .state
                .is_final()
                .then(|| task.root_cause.clone())
                .flatten(),
        });
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TaskId, TaskState};

    fn failure(attempt: u32, decision: Decision) -> ErrorRecord {
        ErrorRecord {
            task_id: "t".into(),
            task_name: "n".into(),
            attempt,
            root_cause: format!("boom {attempt}"),
            decision,
            retry_delay_ms: None,
            at: DateTime::from_millis(1_000 * i64::from(attempt)),
            worker: Some(format!("w{attempt}")),
            started_at: Some(DateTime::from_millis(900 * i64::from(attempt))),
        }
    }

    #[test]
    fn history_lists_failed_attempts_then_the_current_one_once() {
        let mut task = super::super::TaskDocument::pending(&TaskId::generate(), "n", "default");
        assert!(
            history(&task, &[]).is_empty(),
            "a waiting task ran no attempt"
        );
        task.state = TaskState::Success;
        task.retries = 1;
        task.started_at = Some(DateTime::from_millis(5_000));
        task.worker = Some("w2".into());
        let entries = history(&task, &[failure(1, Decision::Retry)]);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].outcome, TaskState::Retry);
        assert_eq!(entries[0].worker.as_deref(), Some("w1"));
        assert_eq!(entries[1].attempt, 2);
        assert_eq!(entries[1].outcome, TaskState::Success);
        assert_eq!(entries[1].worker.as_deref(), Some("w2"));
        // A dead-lettered last attempt is in the log already: not shown twice.
        task.state = TaskState::Failure;
        let entries = history(
            &task,
            &[
                failure(1, Decision::Retry),
                failure(2, Decision::DeadLetter),
            ],
        );
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].outcome, TaskState::Failure);
    }
}
