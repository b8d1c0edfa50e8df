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
    pub at: DateTime,
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
    pub fn record_write(&self, record: &ErrorRecord) -> Write {
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
