//! `ShardMeta`: how a sharded job was split, written before any shard runs, so every shard (and
//! every retry of the job) agrees on which item belongs where.

use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::{is_duplicate_key, StoreError};

pub const COLLECTION: &str = "ShardMeta";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub job_id: String,
    /// `hash_mod`: shard = hash(key) % shards.
    pub strategy: String,
    /// The hash function's name (`fnv1a64`).
    pub hash: String,
    pub shards: u32,
    pub items: u64,
    /// The task id of each shard, by shard number.
    pub shard_task_ids: Vec<String>,
    /// The task that planned the job.
    pub planned_by: String,
    pub created_at: DateTime,
}

#[derive(Clone)]
pub struct ShardRepository {
    collection: Collection<ShardMeta>,
}

impl ShardRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Records the plan, or returns the one already recorded for this job: a job is split once,
    /// and a retried planner reuses the first split.
    #[tracing::instrument(name = "store.shards.plan", skip_all, fields(job_id = %meta.job_id))]
    pub async fn plan(&self, meta: &ShardMeta) -> Result<ShardMeta, StoreError> {
        match self.collection.insert_one(meta).await {
            Ok(_) => Ok(meta.clone()),
            Err(e) if is_duplicate_key(&e) => self.get(&meta.job_id).await?.ok_or_else(|| {
                StoreError::Malformed(format!("ShardMeta {} vanished", meta.job_id).into())
            }),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<ShardMeta>, StoreError> {
        Ok(self.collection.find_one(doc! {"job_id": job_id}).await?)
    }

    /// The plan a task made, if it planned a job.
    pub(crate) async fn planned_by(&self, task_id: &str) -> Result<Option<ShardMeta>, StoreError> {
        Ok(self
            .collection
            .find_one(doc! {"planned_by": task_id})
            .await?)
    }
}
