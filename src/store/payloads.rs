//! `RawPayload`: task arguments and results too large to travel in a message or sit in `Tasks`.
//!
//! Each payload is collected by the TTL index on `expires_at` once its task can no longer need
//! it: a result `RETENTION` after it is stored, arguments `RETENTION` after their task
//! finished (`PayloadRepository::expire_write`) — never while the task may still run.

use mongodb::bson::{doc, DateTime};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;
use crate::cause::Cause;

pub const COLLECTION: &str = "RawPayload";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawPayload {
    /// `{task_id}:args` or `{task_id}:result`.
    #[serde(rename = "_id")]
    pub id: String,
    pub task_id: String,
    pub kind: String,
    /// The JSON, as text: any JSON survives the trip unchanged (BSON has no u64, for one).
    pub json: String,
    pub bytes: u64,
    pub created_at: DateTime,
    /// When the TTL index may collect it; none while its task may still need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime>,
}

/// How long a payload stays once its task is done with it.
pub(crate) const RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

#[derive(Clone)]
pub struct PayloadRepository {
    collection: Collection<RawPayload>,
}

impl PayloadRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// Stores `value` for `task_id` under `kind`; returns the reference. Storing the same
    /// reference again replaces it (a retried attempt's result).
    #[tracing::instrument(name = "store.payloads.put", skip(self, value))]
    pub(crate) async fn put(
        &self,
        task_id: &str,
        kind: &str,
        value: &Value,
    ) -> Result<String, StoreError> {
        self.put_json(task_id, kind, value.to_string()).await
    }

    /// [`PayloadRepository::put`] for a value already written as JSON text.
    #[tracing::instrument(name = "store.payloads.put_json", skip(self, json))]
    pub(crate) async fn put_json(
        &self,
        task_id: &str,
        kind: &str,
        json: String,
    ) -> Result<String, StoreError> {
        let id = format!("{task_id}:{kind}");
        let payload = RawPayload {
            id: id.clone(),
            task_id: task_id.to_owned(),
            kind: kind.to_owned(),
            bytes: json.len() as u64,
            json,
            created_at: DateTime::now(),
            // A result is read after its task finished; arguments are needed until it does.
            expires_at: (kind == "result").then(|| super::from_now(RETENTION)),
        };
        if kind == "args" {
            // A task's arguments are written once, by its submission: an insert, which costs
            // the store a fraction of an upsert. A duplicate is the same task's submission
            // again (a fixed child id), with the same arguments.
            return match self.collection.insert_one(&payload).await {
                Ok(_) => Ok(id),
                Err(error) if super::is_duplicate_key(&error) => Ok(id),
                Err(error) => Err(error.into()),
            };
        }
        self.collection
            .replace_one(doc! {"_id": &id}, &payload)
            .upsert(true)
            .await?;
        Ok(id)
    }

    /// Lets the TTL index collect `reference` [`RETENTION`] from now: its task has finished.
    pub(crate) fn expire_write(&self, reference: &str) -> super::batch::Write {
        super::batch::Write {
            collection: COLLECTION,
            op: super::batch::WriteOp::Upsert {
                filter: doc! {"_id": reference},
                update: doc! {"$set": {"expires_at": super::from_now(RETENTION)}},
            },
            purpose: "payload_expiry",
        }
    }

    /// A stored result as it was returned: read from `RawPayload` when `result` is a reference to
    /// it, else `result` itself; `None` when the referenced payload is gone.
    pub async fn resolve(&self, result: Value) -> Result<Option<Value>, StoreError> {
        match reference_in(&result) {
            Some(reference) => self.get(reference).await,
            None => Ok(Some(result)),
        }
    }

    #[tracing::instrument(name = "store.payloads.get", skip(self))]
    pub async fn get(&self, reference: &str) -> Result<Option<Value>, StoreError> {
        let Some(payload) = self.collection.find_one(doc! {"_id": reference}).await? else {
            return Ok(None);
        };
        serde_json::from_str(&payload.json).map(Some).map_err(|e| {
            StoreError::Malformed(Cause::context(format!("RawPayload {reference}"), e))
        })
    }
}

/// A reference as it is stored in place of a large value: `{"kobe_payload_ref": "<id>"}`.
pub(crate) fn reference_value(reference: &str) -> Value {
    serde_json::json!({ "kobe_payload_ref": reference })
}

/// The reference in a value written by `reference_value`, if it is one.
pub fn reference_in(value: &Value) -> Option<&str> {
    value
        .as_object()
        .filter(|o| o.len() == 1)?
        .get("kobe_payload_ref")?
        .as_str()
}
