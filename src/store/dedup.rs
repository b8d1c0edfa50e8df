//! `TaskDedup`: fingerprint → the task a submission created. The unique index on
//! `task_fingerprint` decides between concurrent identical submissions: exactly one insert wins,
//! every other one finds the winner's task.
//!
//! A fingerprint is claimed before its task is recorded, so a claim can exist for a moment before
//! its task does, and forever if its submitter died in between (a *ghost*). The submission path
//! (`submit`) waits out the first case and takes a ghost over once it is older than a short grace.

use std::time::Duration;

use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::batch::{Write, WriteOp};
use super::StoreError;
use crate::cause::Cause;

pub const COLLECTION: &str = "TaskDedup";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupEntry {
    pub task_fingerprint: String,
    pub task_id: String,
    pub created_at: DateTime,
    /// TTL: after this a submission with the same fingerprint is new again.
    pub expires_at: DateTime,
}

impl DedupEntry {
    /// A claim of `fingerprint` for `task_id`, valid for `window` from now.
    pub fn new(fingerprint: &str, task_id: &str, window: Duration) -> Self {
        let now = DateTime::now();
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        Self {
            task_fingerprint: fingerprint.to_owned(),
            task_id: task_id.to_owned(),
            created_at: now,
            expires_at: DateTime::from_millis(now.timestamp_millis().saturating_add(window_ms)),
        }
    }
}

/// Who holds a fingerprint that was already claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody (it expired, or was given up): claim it again.
    Free,
    /// An earlier submission, since `claimed_at`.
    Held {
        task_id: String,
        claimed_at: DateTime,
    },
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

    /// The claim as a batched insert: refused when the fingerprint is claimed already.
    pub fn claim_write(&self, entry: &DedupEntry) -> Result<Write, StoreError> {
        let document =
            mongodb::bson::to_document(entry).map_err(|e| StoreError::Rejected(Cause::of(e)))?;
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Insert(document),
            purpose: "dedup_claim",
        })
    }

    /// Who holds a fingerprint whose claim was refused. An entry past its window no longer counts
    /// (MongoDB's TTL monitor runs about once a minute): it is removed, and the fingerprint is
    /// free.
    #[tracing::instrument(name = "store.dedup.holder", skip(self))]
    pub async fn holder(&self, fingerprint: &str) -> Result<Claim, StoreError> {
        let now = DateTime::now();
        self.collection
            .delete_one(doc! {"task_fingerprint": fingerprint, "expires_at": {"$lte": now}})
            .await?;
        Ok(
            match self
                .collection
                .find_one(doc! {"task_fingerprint": fingerprint})
                .await?
            {
                Some(entry) => Claim::Held {
                    task_id: entry.task_id,
                    claimed_at: entry.created_at,
                },
                None => Claim::Free,
            },
        )
    }

    /// Takes over a fingerprint held by `ghost` (a task that never appeared); `false` when
    /// someone else changed it first.
    #[tracing::instrument(name = "store.dedup.take_over", skip(self, entry))]
    pub(crate) async fn take_over(
        &self,
        ghost: &str,
        entry: &DedupEntry,
    ) -> Result<bool, StoreError> {
        let replaced = self
            .collection
            .find_one_and_replace(
                doc! {"task_fingerprint": &entry.task_fingerprint, "task_id": ghost},
                entry,
            )
            .await?;
        Ok(replaced.is_some())
    }

    /// Gives the fingerprint up (the submission it guarded was not accepted).
    pub async fn release(&self, fingerprint: &str, task_id: &str) -> Result<(), StoreError> {
        self.collection
            .delete_one(doc! {"task_fingerprint": fingerprint, "task_id": task_id})
            .await?;
        Ok(())
    }
}
