//! Outcomes: what each attempt came to, one document per attempt, written once.
//!
//! An outcome lives beside its attempt's lease in `TaskLeases`, `_id` = `<task id>:<retries>/outcome`
//! (the lease's key and a suffix). An outcome is an insert, and the first insert for an attempt
//! decides it: a duplicate key means another party (the same worker after a lost answer, a
//! cancel) decided first. Nothing here is rewritten on the hot path — an insert into a narrow
//! collection costs the store a fraction of an update of a wide document — and an attempt with an
//! outcome is over: its lease needs no release. Claims and outcomes share the collection so that
//! the group-commit writer sends both in one insert command: the store's cost of a command is
//! most of its cost of a small batch. Only outcomes carry `state`, so the partial `state_at`
//! index leaves the claims as cheap as an `_id`-only insert.
//!
//! `Tasks` keeps what was submitted and what operators did (a rerun, a cancel of a waiting task, a
//! refused submission); the read model (`store/view.rs`) lays the latest outcome over it, and every reader goes through
//! that (see [`TaskRepository::get`](super::TaskRepository)).

use std::collections::HashMap;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batch::{Write, WriteOp};
use super::shape::to_bson;
use super::task_leases::{lease_id, Attempt};
use super::StoreError;
use crate::domain::TaskState;

pub const COLLECTION: &str = super::task_leases::COLLECTION;

/// The `_id` of attempt `retries`'s outcome.
pub fn outcome_id(task_id: &str, retries: u32) -> String {
    format!("{}/outcome", lease_id(task_id, retries))
}

/// Whether a dead letter owed for a failed task has been published (`dead_letter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterState {
    /// Owed and not yet confirmed: a redelivery that finds the task finished publishes it.
    Pending,
    /// The broker confirmed it.
    Sent,
}

impl DeadLetterState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
        }
    }
}

/// An outcome to record for an attempt.
#[derive(Debug, Clone)]
pub enum Transition {
    /// The attempt failed and another will follow: its message is confirmed, or — `owed` — its
    /// publish is in doubt and the outbox sends it (`publish_state: pending`).
    Retry {
        root_cause: String,
        owed: bool,
    },
    Success {
        result: Value,
    },
    /// `dead_letter`: a dead letter is owed for this task and not yet confirmed; a redelivery that
    /// finds the task finished with one pending publishes it.
    Failure {
        root_cause: String,
        dead_letter: bool,
    },
    /// The attempt stopped because an operator cancelled the task.
    Revoked {
        root_cause: String,
    },
}

impl Transition {
    pub fn target(&self) -> TaskState {
        match self {
            Self::Retry { .. } => TaskState::Retry,
            Self::Success { .. } => TaskState::Success,
            Self::Failure { .. } => TaskState::Failure,
            Self::Revoked { .. } => TaskState::Revoked,
        }
    }
}

/// What an attempt recording an outcome holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// The attempt's lease: it ran, from `started_at`, started `deliveries` times.
    Lease {
        started_at: DateTime,
        deliveries: u32,
    },
    /// Nothing, and it did not run here; `deliveries`: starts of the attempt seen on its lease
    /// (a poison message's), 0 when none.
    Nothing { deliveries: u32 },
}

/// What a task no `Tasks` document records (a Celery client's) was sent with, kept on its
/// outcomes: its status shows its arguments, and a rerun runs it with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    #[serde(default)]
    pub route: String,
    #[serde(default)]
    pub priority: i32,
}

/// One attempt's outcome, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(rename = "_id")]
    pub id: String,
    pub task_id: String,
    pub task_name: String,
    /// Failed attempts before this one.
    pub retries: u32,
    pub state: TaskState,
    /// When it was recorded.
    pub at: DateTime,
    /// The attempt's token (`closed` for an attempt no worker took).
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime>,
    #[serde(default)]
    pub deliveries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterState>,
    /// A retry whose next attempt's publish was in doubt: the outbox sends it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<Sent>,
    /// The outcome of a holder whose lease lapsed and was taken over before it recorded: kept
    /// as history (`_id` = `<task id>:<retries>/superseded/<token>`), never the task's word.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

impl Outcome {
    /// The attempt the task is at after this outcome: the next one after a retry.
    pub(crate) fn attempt_after(&self) -> u32 {
        match self.state {
            TaskState::Retry => self.retries.saturating_add(1),
            _ => self.retries,
        }
    }
}

/// The outcome document of `transition` for `attempt`.
pub(crate) fn outcome_document(
    attempt: &Attempt,
    transition: &Transition,
    holding: Holding,
) -> Result<Document, StoreError> {
    let now = DateTime::now();
    let mut outcome = doc! {
        "_id": outcome_id(&attempt.task_id, attempt.retries),
        "task_id": &attempt.task_id,
        "task_name": &attempt.task_name,
        "retries": i64::from(attempt.retries),
        "state": transition.target().as_str(),
        "at": now,
        "token": &attempt.token,
    };
    match holding {
        Holding::Lease {
            started_at,
            deliveries,
        } => {
            outcome.insert("worker", crate::config::worker_name());
            outcome.insert("started_at", started_at);
            outcome.insert("deliveries", i64::from(deliveries));
        }
        Holding::Nothing { deliveries } => {
            outcome.insert("deliveries", i64::from(deliveries));
        }
    }
    match transition {
        Transition::Retry { root_cause, owed } => {
            outcome.insert("root_cause", root_cause);
            if *owed {
                outcome.insert("owed", true);
            }
        }
        Transition::Success { result } => {
            outcome.insert("result", to_bson(result)?);
        }
        Transition::Failure {
            root_cause,
            dead_letter,
        } => {
            outcome.insert("root_cause", root_cause);
            if *dead_letter {
                outcome.insert("dead_letter", DeadLetterState::Pending.as_str());
            }
        }
        Transition::Revoked { root_cause } => {
            outcome.insert("root_cause", root_cause);
        }
    }
    // A task no `Tasks` document records (a Celery client's) keeps what it was sent with.
    if *attempt.origin != super::task_leases::Origin::default() {
        let origin = &attempt.origin;
        let sent = Sent {
            args: origin.args.clone(),
            kwargs: origin.kwargs.clone(),
            route: origin.route.clone(),
            priority: i32::from(origin.priority),
        };
        outcome.insert(
            "sent",
            mongodb::bson::to_bson(&sent)
                .map_err(|e| StoreError::Rejected(crate::cause::Cause::of(e)))?,
        );
    }
    Ok(outcome)
}

/// Repository of the attempts' outcomes (in `TaskLeases`).
#[derive(Clone)]
pub struct OutcomeRepository {
    collection: Collection<Outcome>,
}

impl OutcomeRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            collection: db.collection(COLLECTION),
        }
    }

    /// `transition` of `attempt` as a batched insert: refused when the attempt has an outcome.
    pub fn write(
        &self,
        attempt: &Attempt,
        transition: &Transition,
        holding: Holding,
    ) -> Result<Write, StoreError> {
        Ok(Write {
            collection: COLLECTION,
            op: WriteOp::Insert(outcome_document(attempt, transition, holding)?),
            purpose: match transition {
                Transition::Retry { .. } => "retry",
                Transition::Success { .. } => "success",
                Transition::Failure { .. } => "failure",
                Transition::Revoked { .. } => "revoked",
            },
        })
    }

    /// Keeps the outcome of a holder that lost its lease to a takeover, as history beside the
    /// attempt's own.
    pub(crate) async fn superseded(
        &self,
        attempt: &Attempt,
        transition: &Transition,
    ) -> Result<(), StoreError> {
        let mut outcome =
            outcome_document(attempt, transition, Holding::Nothing { deliveries: 0 })?;
        let id = format!(
            "{}/superseded/{}",
            lease_id(&attempt.task_id, attempt.retries),
            attempt.token
        );
        outcome.insert("_id", id);
        outcome.insert("superseded", true);
        outcome.insert("worker", crate::config::worker_name());
        match self
            .collection
            .clone_with_type::<Document>()
            .insert_one(outcome)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if super::is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The outcome of attempt `retries` of task `task_id`.
    pub async fn get(&self, task_id: &str, retries: u32) -> Result<Option<Outcome>, StoreError> {
        Ok(self
            .collection
            .find_one(doc! {"_id": outcome_id(task_id, retries)})
            .await?)
    }

    /// The latest outcome of task `id`: one query, a range of `_id` (for one task; lists use
    /// [`OutcomeRepository::latest_from`]).
    pub async fn latest(&self, id: &str) -> Result<Option<Outcome>, StoreError> {
        let found: Vec<Outcome> = self
            .collection
            .find(doc! {
                "_id": {"$gt": format!("{id}:"), "$lt": format!("{id};")},
                "state": {"$exists": true},
            })
            .await?
            .try_collect()
            .await?;
        // The range of `a:` also holds the outcomes of task `a:b`.
        Ok(found
            .into_iter()
            .filter(|o| !o.superseded && o.task_id == id)
            .max_by_key(|o| o.retries))
    }

    /// The latest outcome of each task of `from` (task id, the attempt its document waits for,
    /// 0 when it has none) that has one: point reads by `_id`, one query a round — the
    /// outcomes of those attempts, then of the attempts after each `RETRY` found, and so on.
    /// (A rerun moves the document's attempt past a final outcome, so nothing can follow one.)
    pub(crate) async fn latest_from(
        &self,
        from: &[(&str, u32)],
    ) -> Result<HashMap<String, Outcome>, StoreError> {
        let mut latest: HashMap<String, Outcome> = HashMap::new();
        let mut next: Vec<String> = from.iter().map(|(id, r)| outcome_id(id, *r)).collect();
        // A task retries at most a few dozen times; the rounds are bounded all the same.
        for _ in 0..64 {
            if next.is_empty() {
                break;
            }
            let mut found: Vec<Outcome> = Vec::new();
            for chunk in next.chunks(500) {
                let page: Vec<Outcome> = self
                    .collection
                    .find(doc! {"_id": {"$in": chunk}})
                    .await?
                    .try_collect()
                    .await?;
                found.extend(page);
            }
            next = found
                .iter()
                .filter(|o| o.state == TaskState::Retry)
                .map(|o| outcome_id(&o.task_id, o.attempt_after()))
                .collect();
            for outcome in found {
                latest.insert(outcome.task_id.clone(), outcome);
            }
        }
        Ok(latest)
    }

    /// Outcomes in `state`, latest first, narrowed by `filter` (fields of the outcome), after the
    /// cursor `(at, id)` when given: a range of the `state_at` index.
    pub(crate) async fn in_state(
        &self,
        state: TaskState,
        mut filter: Document,
        after: Option<(DateTime, &str)>,
        limit: i64,
    ) -> Result<Vec<Outcome>, StoreError> {
        filter.insert("state", state.as_str());
        filter.insert("superseded", mongodb::bson::Bson::Null);
        if let Some((at, id)) = after {
            let before = doc! {"$or": [
                {"at": {"$lt": at}},
                {"at": at, "_id": {"$lt": id}},
            ]};
            filter = doc! {"$and": [filter, before]};
        }
        Ok(self
            .collection
            .find(filter)
            .sort(doc! {"at": -1, "_id": -1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// How many outcomes each state has since `since`, and how many of them are of a first
    /// attempt.
    pub(crate) async fn counts_since(
        &self,
        since: DateTime,
    ) -> Result<(Vec<(TaskState, u64)>, u64), StoreError> {
        let mut counts = Vec::new();
        for state in [
            TaskState::Retry,
            TaskState::Success,
            TaskState::Failure,
            TaskState::Revoked,
        ] {
            let n = self
                .collection
                .count_documents(doc! {"state": state.as_str(), "at": {"$gte": since}})
                .await?;
            counts.push((state, n));
        }
        let states = [
            TaskState::Retry.as_str(),
            TaskState::Success.as_str(),
            TaskState::Failure.as_str(),
            TaskState::Revoked.as_str(),
        ];
        let first = self
            .collection
            .count_documents(
                doc! {"state": {"$in": states.to_vec()}, "at": {"$gte": since}, "retries": 0_i64},
            )
            .await?;
        Ok((counts, first))
    }

    /// Notes that the dead letter owed for attempt `retries` of a task was confirmed: a rare
    /// rewrite (a failure that dead-letters).
    pub(crate) async fn dead_letter_sent(
        &self,
        task_id: &str,
        retries: u32,
    ) -> Result<(), StoreError> {
        self.collection
            .update_one(
                doc! {
                    "_id": outcome_id(task_id, retries),
                    "dead_letter": DeadLetterState::Pending.as_str(),
                },
                doc! {"$set": {"dead_letter": DeadLetterState::Sent.as_str()}},
            )
            .await?;
        Ok(())
    }
}
