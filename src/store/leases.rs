//! `PendingTasks`: the lease frontier. Work items wait here until a holder takes a time-bounded
//! lease with one `findOneAndUpdate`; a holder that stops renewing loses the item to the next
//! `lease` call once `lease_until` passes. Only the holder (`taken_by` in the filter) can renew,
//! complete or release. TTL collects completed items only (`gc_at` is set on completion): an
//! expired lease is reclaimed by a query, never deleted.

use std::time::Duration;

use mongodb::bson::{doc, DateTime};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::{from_now, is_duplicate_key, StoreError};

pub const COLLECTION: &str = "PendingTasks";

/// How long a completed item stays visible before TTL removes it.
const COMPLETED_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A work item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseItem {
    /// Unique key of the item.
    pub task_key: String,
    /// Which frontier it belongs to (a shard, a job, a crawl).
    pub queue: String,
    /// What the item is, as the producer gave it.
    pub payload: serde_json::Value,
    #[serde(default)]
    pub done: bool,
    #[serde(default)]
    pub taken_by: Option<String>,
    #[serde(default)]
    pub lease_until: Option<DateTime>,
    /// Leases taken on this item so far.
    #[serde(default)]
    pub leases: u32,
    pub created_at: DateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_at: Option<DateTime>,
}

/// A lease just taken.
#[derive(Debug, Clone)]
pub struct Lease {
    pub item: LeaseItem,
    /// Someone held it before and let the lease lapse.
    pub reclaimed: bool,
}

#[derive(Clone)]
pub struct LeaseRepository {
    collection: Collection<LeaseItem>,
}

impl LeaseRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Adds an item; `false` when an item with that key already exists (enqueueing is
    /// idempotent, so a retried producer does not duplicate work).
    #[tracing::instrument(name = "store.leases.enqueue", skip(self, payload))]
    pub async fn enqueue(
        &self,
        queue: &str,
        task_key: &str,
        payload: serde_json::Value,
    ) -> Result<bool, StoreError> {
        let item = LeaseItem {
            task_key: task_key.to_owned(),
            queue: queue.to_owned(),
            payload,
            done: false,
            taken_by: None,
            lease_until: None,
            leases: 0,
            created_at: DateTime::now(),
            completed_at: None,
            gc_at: None,
        };
        match self.collection.insert_one(&item).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes one item of `queue` that nobody holds or whose lease has passed.
    #[tracing::instrument(name = "store.leases.lease", skip(self))]
    pub async fn lease(
        &self,
        queue: &str,
        worker_id: &str,
        duration: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.lease_for(queue, None, worker_id, duration).await
    }

    /// Like [`LeaseRepository::lease`], for a holder acting for `owner` (a task, whose attempts
    /// are the holders): it also takes back items an earlier holder of the same owner still
    /// holds — an attempt that died, or gave up, does not keep its items from its retry.
    #[tracing::instrument(name = "store.leases.lease_for", skip(self))]
    pub async fn lease_for(
        &self,
        queue: &str,
        owner: Option<&str>,
        worker_id: &str,
        duration: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let now = DateTime::now();
        let mut takeable = vec![
            doc! {"lease_until": null},
            doc! {"lease_until": {"$lt": now}},
        ];
        if let Some(owner) = owner {
            takeable.push(doc! {"owner": owner, "taken_by": {"$ne": worker_id}});
        }
        let filter = doc! {"queue": queue, "done": false, "$or": takeable};
        let mut set = doc! {"taken_by": worker_id, "lease_until": from_now(duration)};
        if let Some(owner) = owner {
            set.insert("owner", owner);
        }
        let update = doc! {"$set": set, "$inc": {"leases": 1}};
        let before = self
            .collection
            .find_one_and_update(filter, update)
            .sort(doc! {"created_at": 1})
            .return_document(ReturnDocument::Before)
            .await?;
        Ok(before.map(|mut item| {
            let reclaimed = item.taken_by.is_some();
            crate::telemetry::metrics::metrics()
                .leases
                .with_label_values(&[if reclaimed { "reclaimed" } else { "taken" }])
                .inc();
            item.taken_by = Some(worker_id.to_owned());
            item.lease_until = Some(from_now(duration));
            item.leases += 1;
            Lease { item, reclaimed }
        }))
    }

    /// Extends the holder's lease; `false` if it is no longer the holder.
    #[tracing::instrument(name = "store.leases.renew", skip(self))]
    pub async fn renew(
        &self,
        task_key: &str,
        worker_id: &str,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .collection
            .update_one(
                doc! {"task_key": task_key, "taken_by": worker_id, "done": false},
                doc! {"$set": {"lease_until": from_now(duration)}},
            )
            .await?;
        Ok(outcome.matched_count == 1)
    }

    /// Marks the item done; `false` if the caller is not the holder (its lease was reclaimed).
    #[tracing::instrument(name = "store.leases.complete", skip(self))]
    pub async fn complete(&self, task_key: &str, worker_id: &str) -> Result<bool, StoreError> {
        let now = DateTime::now();
        let outcome = self
            .collection
            .update_one(
                doc! {"task_key": task_key, "taken_by": worker_id, "done": false},
                doc! {
                    "$set": {"done": true, "completed_at": now, "gc_at": from_now(COMPLETED_RETENTION)},
                    "$unset": {"lease_until": ""},
                },
            )
            .await?;
        Ok(outcome.matched_count == 1)
    }

    /// Gives the item back before its lease ends, for someone else to take now.
    #[tracing::instrument(name = "store.leases.release", skip(self))]
    pub async fn release(&self, task_key: &str, worker_id: &str) -> Result<bool, StoreError> {
        let outcome = self
            .collection
            .update_one(
                doc! {"task_key": task_key, "taken_by": worker_id, "done": false},
                doc! {"$set": {"taken_by": null, "lease_until": null}},
            )
            .await?;
        Ok(outcome.matched_count == 1)
    }

    /// Items of `queue` not done yet.
    pub async fn remaining(&self, queue: &str) -> Result<u64, StoreError> {
        Ok(self
            .collection
            .count_documents(doc! {"queue": queue, "done": false})
            .await?)
    }
}
