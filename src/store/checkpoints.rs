//! `TaskCheckpoint`: what a shard has finished, one document per `(shard_key, sub_key)`, so a
//! retried or redelivered shard skips it. The unique index makes recording idempotent.

use std::collections::HashSet;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::{is_duplicate_key, StoreError};

pub const COLLECTION: &str = "TaskCheckpoint";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub job_id: String,
    pub shard_key: String,
    pub sub_key: String,
    /// The attempt of the shard task that finished this item.
    pub attempt: u32,
    pub completed_at: DateTime,
}

#[derive(Clone)]
pub struct CheckpointRepository {
    collection: Collection<Checkpoint>,
}

impl CheckpointRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Records an item as done; `false` if it already was.
    #[tracing::instrument(name = "store.checkpoints.record", skip(self))]
    pub async fn record(
        &self,
        job_id: &str,
        shard_key: &str,
        sub_key: &str,
        attempt: u32,
    ) -> Result<bool, StoreError> {
        let checkpoint = Checkpoint {
            job_id: job_id.to_owned(),
            shard_key: shard_key.to_owned(),
            sub_key: sub_key.to_owned(),
            attempt,
            completed_at: DateTime::now(),
        };
        match self.collection.insert_one(&checkpoint).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sub-keys of a shard already done.
    #[tracing::instrument(name = "store.checkpoints.done", skip(self))]
    pub async fn done(&self, shard_key: &str) -> Result<HashSet<String>, StoreError> {
        let cursor = self.collection.find(doc! {"shard_key": shard_key}).await?;
        let checkpoints: Vec<Checkpoint> = cursor.try_collect().await?;
        Ok(checkpoints.into_iter().map(|c| c.sub_key).collect())
    }

    /// Every checkpoint of a job.
    pub async fn for_job(&self, job_id: &str) -> Result<Vec<Checkpoint>, StoreError> {
        let cursor = self.collection.find(doc! {"job_id": job_id}).await?;
        Ok(cursor.try_collect().await?)
    }
}
