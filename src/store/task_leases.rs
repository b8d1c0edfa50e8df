//! `TaskLeases`: the execution lease of each attempt, and beside it the attempt's outcome
//! ([`outcomes`](super::outcomes)).
//!
//! One lease per attempt, `_id` = `<task id>:<retries>`. Whoever inserts it first holds that
//! attempt: a worker's claim is that insert (batched through the group-commit writer), and a
//! duplicate key means another copy holds or held the attempt. The other writes are to the same
//! narrow document: takeover of a lapsed lease, renewal (one command per worker for all its
//! running attempts), release, an operator's request to stop. An operator or a refused
//! submission closes an attempt no worker has taken by inserting it first
//! ([`LeaseRepository::close`]), so no claim can follow. An attempt with an outcome is over: its
//! lease is never marked so.
//!
//! While an attempt runs, `STARTED`, its start and its worker come from here (see
//! [`TaskRepository::get`](super::TaskRepository)). A lease stays after its attempt ran, so a
//! copy of the message that comes late still finds it taken; [`LeaseRepository::collect`]
//! removes leases not held for `RETENTION`, but never a closed one (nor an outcome).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{Write, WriteOp};
use super::{is_duplicate_key, later, StoreError};
use crate::domain::TaskState;

pub const COLLECTION: &str = "TaskLeases";

/// How long a lease stays after its attempt last held it (or was closed): a copy of the message
/// arriving within it (an outbox re-send, a duplicate publish, a backlog) finds the attempt taken.
/// A redelivered copy also looks at the task's document, whatever its age.
pub(crate) const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The token of an attempt closed before any worker took it.
pub(crate) const CLOSED_TOKEN: &str = "closed";

/// The `_id` of attempt `retries` of task `task_id`.
pub fn lease_id(task_id: &str, retries: u32) -> String {
    format!("{task_id}:{retries}")
}

/// One attempt of one task, as the lease knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub task_id: String,
    pub task_name: String,
    /// Failed attempts before this one (the message's `retries`).
    pub retries: u32,
    /// Random, unique to this attempt: the lease is held under it.
    pub token: String,
    /// What the message says of the task, for a document this attempt's claim creates.
    pub origin: Arc<Origin>,
}

/// What a worker knows of a task from its message, written when its claim (or outcome) creates
/// the task's document — a task no client recorded, sent by a Celery client — so that a rerun
/// (`POST /task/{id}/retry`, a DLQ replay) runs it with its own arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub route: String,
    pub priority: u8,
}

impl Attempt {
    pub fn new(task_id: &str, task_name: &str, retries: u32) -> Self {
        Self {
            task_id: task_id.to_owned(),
            task_name: task_name.to_owned(),
            retries,
            token: uuid::Uuid::new_v4().simple().to_string(),
            origin: Arc::default(),
        }
    }

    pub(crate) fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = Arc::new(origin);
        self
    }
}

/// An operator's request about a task, and who made it: a rerun (in the task's `replays`), or a
/// cancel (on the task and on its running attempt's lease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorRequest {
    pub at: DateTime,
    /// Who asked: `api:token-<fingerprint>` or `cli:<user>`, never a token.
    pub by: String,
}

/// One attempt's lease, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptLease {
    #[serde(rename = "_id")]
    pub id: String,
    pub task_id: String,
    pub task_name: String,
    pub retries: u32,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub started_at: DateTime,
    pub lease_until: DateTime,
    /// Times this attempt was started (a takeover after a crash starts it again).
    #[serde(default)]
    pub deliveries: u32,
    /// Set once the attempt's outcome is recorded (or it was closed unrun).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at: Option<DateTime>,
    /// An operator asked it to stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<OperatorRequest>,
    /// Closed before any worker took it: the state the task was closed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<TaskState>,
}

impl AttemptLease {
    /// Running (or its worker died running it): not done and not closed.
    pub(crate) fn is_open(&self) -> bool {
        self.done_at.is_none() && self.closed.is_none()
    }

    /// Task `t1`'s first attempt (`demo`), held under `token` until `lease_until`, started a minute
    /// before it: the lease the worker's unit tests decide on.
    #[cfg(test)]
    pub(crate) fn for_tests(token: &str, lease_until: DateTime, deliveries: u32) -> Self {
        Self {
            id: "t1:0".into(),
            task_id: "t1".into(),
            task_name: "demo".into(),
            retries: 0,
            token: token.into(),
            worker: None,
            started_at: DateTime::from_millis(lease_until.timestamp_millis() - 60_000),
            lease_until,
            deliveries,
            done_at: None,
            cancel: None,
            closed: None,
        }
    }
}

/// What a takeover of a held lease found.
#[derive(Debug, Clone)]
pub(crate) enum TakeOver {
    /// Ours now; `previous` is the token of the attempt whose lapsed lease was taken (none when
    /// it was our own, sent again).
    Taken {
        previous: Option<String>,
        deliveries: u32,
        started_at: DateTime,
    },
    /// Not takeable: held by a live holder, finished, or gone. The caller reads the lease afresh
    /// when it needs to know which.
    Held,
}

/// Repository of `TaskLeases`.
#[derive(Clone)]
pub struct LeaseRepository {
    collection: Collection<AttemptLease>,
}

impl LeaseRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    fn documents(&self) -> Collection<Document> {
        self.collection.clone_with_type()
    }

    /// The claim of `attempt` as a batched insert: applied means the attempt is ours for `lease`.
    pub fn claim_write(&self, attempt: &Attempt, lease: Duration, now: DateTime) -> Write {
        let mut claim = fresh(
            &attempt.task_id,
            &attempt.task_name,
            attempt.retries,
            &attempt.token,
            now,
        );
        claim.insert("worker", crate::config::worker_name());
        claim.insert("lease_until", later(now, lease));
        claim.insert("deliveries", 1_i64);
        Write {
            collection: COLLECTION,
            op: WriteOp::Insert(claim),
            purpose: "claim",
        }
    }

    /// Takes the attempt's lease when it lapsed (or is our own, after a claim whose answer was
    /// lost), counting one more start; refused when it is done, closed, asked to stop or was
    /// started `max_deliveries` times.
    #[tracing::instrument(name = "store.leases.take_over", skip_all, fields(task_id = %attempt.task_id))]
    pub(crate) async fn take_over(
        &self,
        attempt: &Attempt,
        lease: Duration,
        max_deliveries: u32,
    ) -> Result<TakeOver, StoreError> {
        let now = DateTime::now();
        let id = lease_id(&attempt.task_id, attempt.retries);
        let before = self
            .collection
            .find_one_and_update(
                doc! {
                    "_id": &id,
                    "closed": null,
                    "cancel": null,
                    "deliveries": {"$lt": i64::from(max_deliveries)},
                    "$or": [{"lease_until": {"$lt": now}}, {"token": &attempt.token}],
                },
                doc! {
                    "$set": {
                        "token": &attempt.token,
                        "worker": crate::config::worker_name(),
                        "started_at": now,
                        "lease_until": later(now, lease),
                    },
                    "$inc": {"deliveries": 1_i64},
                },
            )
            .return_document(ReturnDocument::Before)
            .await?;
        Ok(match before {
            Some(before) => TakeOver::Taken {
                started_at: now,
                deliveries: before.deliveries.saturating_add(1),
                previous: (before.token != attempt.token).then_some(before.token),
            },
            None => TakeOver::Held,
        })
    }

    /// Extends the leases of all `running` attempts (lease id, token) in one command; the tokens
    /// still held. A second command, to find which, only when some were lost.
    #[tracing::instrument(name = "store.leases.renew", skip_all, fields(running = running.len()))]
    pub async fn renew(
        &self,
        running: &[(String, String)],
        lease: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let (ids, tokens) = split(running);
        let filter = doc! {"_id": {"$in": &ids}, "token": {"$in": &tokens}};
        let renewed = self
            .collection
            .update_many(
                filter.clone(),
                doc! {"$set": {"lease_until": super::from_now(lease)}},
            )
            .await?;
        if renewed.matched_count as usize == running.len() {
            return Ok(tokens);
        }
        self.tokens(filter).await
    }

    /// Lets the lease lapse now, so a redelivered copy can start at once.
    #[tracing::instrument(name = "store.leases.release", skip_all, fields(task_id = %attempt.task_id))]
    pub async fn release(&self, attempt: &Attempt) -> Result<bool, StoreError> {
        let released = self
            .collection
            .update_one(
                doc! {
                    "_id": lease_id(&attempt.task_id, attempt.retries),
                    "token": &attempt.token,
                    "done_at": null,
                },
                doc! {"$set": {"lease_until": DateTime::now()}},
            )
            .await?;
        Ok(released.matched_count == 1)
    }

    /// Takes back a claim whose attempt never started (what it was looked up beside could not be
    /// read): the lease is removed, so the next copy claims afresh.
    #[tracing::instrument(name = "store.leases.forget", skip_all, fields(task_id = %attempt.task_id))]
    pub(crate) async fn forget(&self, attempt: &Attempt) -> Result<(), StoreError> {
        self.collection
            .delete_one(doc! {
                "_id": lease_id(&attempt.task_id, attempt.retries),
                "token": &attempt.token,
                "deliveries": 1_i64,
            })
            .await?;
        Ok(())
    }

    /// Of the `running` attempts (lease id, token), the tokens of those an operator asked to stop.
    #[tracing::instrument(name = "store.leases.cancel_requests", skip_all, fields(running = running.len()))]
    pub(crate) async fn cancel_requests(
        &self,
        running: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        let (ids, tokens) = split(running);
        self.tokens(doc! {"_id": {"$in": ids}, "token": {"$in": tokens}, "cancel": {"$ne": null}})
            .await
    }

    async fn tokens(&self, filter: Document) -> Result<Vec<String>, StoreError> {
        let found: Vec<Document> = self
            .documents()
            .find(filter)
            .projection(doc! {"token": 1})
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|d| d.get_str("token").ok().map(str::to_owned))
            .collect())
    }

    /// Closes `attempt` unrun, as a batched insert, before its task is closed in `state`
    /// without running (expired, unknown, its arguments lost): refused when a copy holds it.
    pub(crate) fn close_write(&self, attempt: &Attempt, state: TaskState) -> Write {
        let closed = closed_lease(
            &attempt.task_id,
            &attempt.task_name,
            attempt.retries,
            &attempt.token,
            state,
        );
        Write {
            collection: COLLECTION,
            op: WriteOp::Insert(closed),
            purpose: "lease_close",
        }
    }

    /// Closes attempt `retries` of a task before any worker takes it, in `state`: `true` when
    /// no attempt held it (no claim can follow now), `false` when one does or did.
    #[tracing::instrument(name = "store.leases.close", skip(self, request))]
    pub async fn close(
        &self,
        task_id: &str,
        task_name: &str,
        retries: u32,
        state: TaskState,
        request: Option<&OperatorRequest>,
    ) -> Result<bool, StoreError> {
        let mut closed = closed_lease(task_id, task_name, retries, CLOSED_TOKEN, state);
        if let Some(request) = request {
            closed.insert("cancel", doc! {"at": request.at, "by": &request.by});
        }
        match self.documents().insert_one(closed).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// [`LeaseRepository::close`] for the first attempts of many tasks (`(task id, task name)`)
    /// in one command; the ids whose attempt was held already (no close).
    #[tracing::instrument(name = "store.leases.close_first", skip_all, fields(count = tasks.len()))]
    pub async fn close_first(
        &self,
        tasks: &[(&str, &str)],
        state: TaskState,
        request: &OperatorRequest,
    ) -> Result<Vec<String>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let leases: Vec<Document> = tasks
            .iter()
            .map(|(id, name)| {
                let mut closed = closed_lease(id, name, 0, CLOSED_TOKEN, state);
                closed.insert("cancel", doc! {"at": request.at, "by": &request.by});
                closed
            })
            .collect();
        match self.documents().insert_many(leases).ordered(false).await {
            Ok(_) => Ok(Vec::new()),
            Err(error) => {
                let mongodb::error::ErrorKind::InsertMany(ref failed) = *error.kind else {
                    return Err(error.into());
                };
                let held = failed.write_errors.iter().flatten();
                if held.clone().any(|e| e.code != 11000) || failed.write_concern_error.is_some() {
                    return Err(error.into());
                }
                Ok(held.map(|e| tasks[e.index].0.to_owned()).collect())
            }
        }
    }

    /// Asks the running attempt `retries` of a task to stop; `true` when it is running (asked now
    /// or before).
    #[tracing::instrument(name = "store.leases.ask_to_stop", skip(self, request))]
    pub(crate) async fn ask_to_stop(
        &self,
        task_id: &str,
        retries: u32,
        request: &OperatorRequest,
    ) -> Result<bool, StoreError> {
        let asked = self
            .collection
            .update_one(
                doc! {"_id": lease_id(task_id, retries), "done_at": null, "closed": null},
                doc! {"$set": {"cancel": {"at": request.at, "by": &request.by}}},
            )
            .await?;
        Ok(asked.matched_count == 1)
    }

    pub async fn get(
        &self,
        task_id: &str,
        retries: u32,
    ) -> Result<Option<AttemptLease>, StoreError> {
        Ok(self
            .collection
            .find_one(doc! {"_id": lease_id(task_id, retries)})
            .await?)
    }

    /// The open leases of these attempts (task id, retries), by task id: one query.
    pub(crate) async fn open_for(
        &self,
        attempts: &[(&str, u32)],
    ) -> Result<HashMap<String, AttemptLease>, StoreError> {
        if attempts.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = attempts.iter().map(|(t, r)| lease_id(t, *r)).collect();
        let found: Vec<AttemptLease> = self
            .collection
            .find(doc! {"_id": {"$in": ids}, "done_at": null, "closed": null})
            .await?
            .try_collect()
            .await?;
        Ok(found.into_iter().map(|l| (l.task_id.clone(), l)).collect())
    }

    /// The latest open lease of a task no `Tasks` document records yet (a Celery client's task
    /// that is running): a range of `_id`, on its index.
    pub(crate) async fn latest_open(
        &self,
        task_id: &str,
    ) -> Result<Option<AttemptLease>, StoreError> {
        let found: Vec<AttemptLease> = self
            .collection
            .find(doc! {
                "_id": {"$gt": format!("{task_id}:"), "$lt": format!("{task_id};")},
                "lease_until": {"$exists": true},
                "done_at": null,
                "closed": null,
            })
            .await?
            .try_collect()
            .await?;
        Ok(found.into_iter().max_by_key(|l| l.retries))
    }

    /// The leases of `ids` (lease ids) still held: not done, not closed. One query by `_id`.
    pub async fn held_of(&self, ids: &[String]) -> Result<Vec<AttemptLease>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .collection
            .find(doc! {"_id": {"$in": ids}, "done_at": null, "closed": null})
            .await?
            .try_collect()
            .await?)
    }

    /// Removes leases not held for `RETENTION`; how many. A lease closed before any worker took
    /// its attempt (a cancel, a refused submission, a task closed unrun) stays: the task's
    /// original message may still be waiting (a far eta, a queue without consumers), and
    /// finding its attempt closed is what keeps it from running. Those are few.
    #[tracing::instrument(name = "store.leases.collect", skip(self))]
    pub async fn collect(&self) -> Result<u64, StoreError> {
        let cutoff = DateTime::now().timestamp_millis() - RETENTION.as_millis() as i64;
        let collected = self
            .collection
            .delete_many(doc! {
                "lease_until": {"$lt": DateTime::from_millis(cutoff)},
                "closed": null,
            })
            .await?;
        Ok(collected.deleted_count)
    }
}

/// A lease of attempt `retries` taken under `token` at `now`, held until `now` (a claim extends
/// it), started by no one yet.
fn fresh(task_id: &str, task_name: &str, retries: u32, token: &str, now: DateTime) -> Document {
    doc! {
        "_id": lease_id(task_id, retries),
        "task_id": task_id,
        "task_name": task_name,
        "retries": i64::from(retries),
        "token": token,
        "started_at": now,
        "lease_until": now,
        "deliveries": 0_i64,
    }
}

/// A lease of attempt `retries` closed unrun now, in `state`.
fn closed_lease(
    task_id: &str,
    task_name: &str,
    retries: u32,
    token: &str,
    state: TaskState,
) -> Document {
    let now = DateTime::now();
    let mut lease = fresh(task_id, task_name, retries, token, now);
    lease.insert("done_at", now);
    lease.insert("closed", state.as_str());
    lease
}

fn split(running: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    running.iter().cloned().unzip()
}
