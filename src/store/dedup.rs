//! `TaskDedup`: fingerprint → the task a submission created. The unique index on
//! `task_fingerprint` decides between concurrent identical submissions: exactly one insert wins,
//! every other one finds the winner's task.

use std::time::Duration;

use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::{is_duplicate_key, StoreError};

pub const COLLECTION: &str = "TaskDedup";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub task_fingerprint: String,
    pub task_id: String,
    pub created_at: DateTime,
    /// TTL: after this a submission with the same fingerprint is new again.
    pub expires_at: DateTime,
}

/// The outcome of claiming a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This submission is the first: go on with `task_id`.
    New,
    /// An earlier submission owns the fingerprint.
    Existing { task_id: String },
}

#[derive(Clone)]
pub struct DedupRepository {
    collection: Collection<DedupEntry>,
}

impl DedupRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Claims `fingerprint` for `task_id` for `window`.
    #[tracing::instrument(name = "store.dedup.claim", skip(self))]
    pub async fn claim(
        &self,
        fingerprint: &str,
        task_id: &str,
        window: Duration,
    ) -> Result<Claim, StoreError> {
        let now = DateTime::now();
        let entry = DedupEntry {
            task_fingerprint: fingerprint.to_owned(),
            task_id: task_id.to_owned(),
            created_at: now,
            expires_at: DateTime::from_millis(now.timestamp_millis() + window.as_millis() as i64),
        };
        match self.collection.insert_one(&entry).await {
            Ok(_) => Ok(Claim::New),
            Err(e) if is_duplicate_key(&e) => {
                // MongoDB's TTL monitor runs about once a minute: an entry past its window may
                // still be here. It no longer counts; take it over.
                let taken = self
                    .collection
                    .find_one_and_replace(
                        doc! {"task_fingerprint": fingerprint, "expires_at": {"$lte": now}},
                        &entry,
                    )
                    .await?;
                if taken.is_some() {
                    return Ok(Claim::New);
                }
                match self
                    .collection
                    .find_one(doc! {"task_fingerprint": fingerprint})
                    .await?
                {
                    Some(existing) => Ok(Claim::Existing {
                        task_id: existing.task_id,
                    }),
                    // Expired and collected between our two reads: a new claim is fair.
                    None => Box::pin(self.claim(fingerprint, task_id, window)).await,
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the fingerprint up (the submission it guarded was not accepted).
    pub async fn release(&self, fingerprint: &str, task_id: &str) -> Result<(), StoreError> {
        self.collection
            .delete_one(doc! {"task_fingerprint": fingerprint, "task_id": task_id})
            .await?;
        Ok(())
    }
}
