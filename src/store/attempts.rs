//! Attempts and the outcomes recorded for them in `Tasks`, and the operator's transitions out of
//! the normal flow (rerun, cancel).
//!
//! An attempt runs only while it holds its lease in
//! [`TaskLeases`](super::task_leases); its outcome is one conditional write to `Tasks` whose
//! filter lists the states it may move from, and `retries` in the filter keeps a stale copy of an
//! earlier attempt from recording anything.

use mongodb::bson::{doc, DateTime, Document};
use serde_json::Value;

pub use super::outcomes::{Holding, Transition};
pub use super::task_leases::{Attempt, Origin};
use super::tasks::{states, to_bson, DeadLetterState, PublishState, TaskRepository};
use super::StoreError;
use crate::domain::TaskState;

/// `$set` fields of an outcome reported by a Celery worker's event (tasks Python runs are
/// recorded on their `Tasks` document).
fn outcome_fields(transition: &Transition, now: DateTime) -> Result<Document, StoreError> {
    let mut set = doc! {
        "state": transition.target().as_str(),
        "updated_at": now,
        "publish_state": PublishState::Confirmed.as_str(),
    };
    match transition {
        Transition::Retry { root_cause, .. } => {
            set.insert("root_cause", root_cause);
        }
        Transition::Success { result } => {
            set.insert("finished_at", now);
            set.insert("result", to_bson(result)?);
        }
        Transition::Failure { root_cause, .. } | Transition::Revoked { root_cause } => {
            set.insert("finished_at", now);
            set.insert("root_cause", root_cause);
        }
    }
    Ok(set)
}

impl TaskRepository {
    /// Notes that the dead letter owed for attempt `retries` of task `id` was confirmed: on its
    /// outcome, or on the task's document where an earlier version recorded the failure.
    pub(crate) async fn dead_letter_sent(&self, id: &str, retries: u32) -> Result<(), StoreError> {
        let pending = DeadLetterState::Pending.as_str();
        let sent = doc! {"$set": {"dead_letter": DeadLetterState::Sent.as_str()}};
        let on_outcome = self.outcomes.dead_letter_sent(id, retries);
        let on_document = async {
            self.collection
                .update_one(doc! {"_id": id, "dead_letter": pending}, sent.clone())
                .await?;
            Ok::<_, StoreError>(())
        };
        tokio::try_join!(on_outcome, on_document)?;
        Ok(())
    }

    /// Notes in `Tasks` that the attempt after `attempt` is owed to the outbox: its `RETRY` is
    /// recorded, and its publish was in doubt when the delivery was lost. A rare rewrite; the
    /// outbox sends what a document says is pending, and the read model takes the document's
    /// word for an attempt later than the latest outcome.
    pub(crate) async fn owe_next_attempt(&self, attempt: &Attempt) -> Result<(), StoreError> {
        let now = DateTime::now();
        let next = i64::from(attempt.retries.saturating_add(1));
        let written = self
            .collection
            .update_one(
                doc! {"_id": &attempt.task_id, "retries": {"$not": {"$gte": next}}},
                doc! {
                    "$set": {
                        "state": TaskState::Retry.as_str(),
                        "retries": next,
                        "publish_state": PublishState::Pending.as_str(),
                        "updated_at": now,
                    },
                    "$setOnInsert": on_insert(attempt, now),
                },
            )
            .upsert(true)
            .await;
        match written {
            Ok(_) => Ok(()),
            // A later attempt is recorded already: nothing is owed.
            Err(e) if super::is_duplicate_key(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Fields of a document created by a worker for a task no client recorded (a Celery client's).
fn on_insert(attempt: &Attempt, now: DateTime) -> Document {
    let origin = &attempt.origin;
    let json = |value: Value| to_bson(&value).unwrap_or(mongodb::bson::Bson::Null);
    doc! {
        "task_name": &attempt.task_name,
        "created_at": now,
        "args": json(Value::Array(origin.args.clone())),
        "kwargs": json(Value::Object(origin.kwargs.clone())),
        "route": &origin.route,
        "priority": i32::from(origin.priority),
    }
}

/// What reopening a task for a rerun found.
#[derive(Debug, Clone)]
pub enum Reopened {
    /// It was `FAILURE` or `REVOKED` and is now `RETRY`, awaiting the rerun's publish.
    Now(Box<crate::store::TaskDocument>),
    /// An earlier replay reopened it and did not see its publish confirmed: publish it again.
    Unpublished(Box<crate::store::TaskDocument>),
    /// It has moved on (an earlier replay ran it, or it never failed): nothing to replay.
    MovedOn(TaskState),
    /// No such task.
    Missing,
}

impl TaskRepository {
    /// Reopens a `FAILURE` or `REVOKED` task as `RETRY` with one more retry, for an operator's
    /// rerun: the one transition out of a finished state, made only on request. The publish
    /// is marked pending until `TaskRepository::mark_published` sees it confirmed, so a replay
    /// interrupted in between is finished by the next one.
    #[tracing::instrument(name = "store.tasks.reopen", skip(self))]
    pub async fn reopen(&self, id: &str, replayed_by: &str) -> Result<Reopened, StoreError> {
        let Some(task) = self.stored(id).await? else {
            return Ok(Reopened::Missing);
        };
        if !TaskState::RERUNNABLE.contains(&task.state) {
            return Ok(
                if task.state == TaskState::Retry
                    && task.publish_state == Some(PublishState::Pending)
                {
                    Reopened::Unpublished(Box::new(task))
                } else {
                    Reopened::MovedOn(task.state)
                },
            );
        }
        // The document waits for the next attempt from now on; the latest outcome is of an
        // earlier one, so the read model takes the document's word. A rerun that raced this
        // one moved `retries` past the filter first.
        let now = DateTime::now();
        let reopened = self
            .collection
            .update_one(
                doc! {"_id": id, "retries": {"$not": {"$gt": i64::from(task.retries)}}},
                doc! {
                    "$set": {
                        "state": TaskState::Retry.as_str(),
                        "retries": i64::from(task.retries.saturating_add(1)),
                        "publish_state": PublishState::Pending.as_str(),
                        "updated_at": now,
                        "deliveries": 0_i64,
                    },
                    "$setOnInsert": {
                        "task_name": &task.task_name,
                        "created_at": task.created_at,
                        "args": to_bson(&serde_json::Value::Array(task.args.clone()))?,
                        "kwargs": to_bson(&serde_json::Value::Object(task.kwargs.clone()))?,
                        "route": &task.route,
                        "priority": i32::from(task.priority.value()),
                    },
                    "$unset": {"finished_at": "", "dead_letter": "", "attempt_token": "", "lease_until": "", "cancel_requested": ""},
                    "$push": {"replays": {"at": now, "by": replayed_by}},
                },
            )
            .upsert(true)
            .await;
        match reopened {
            Ok(_) => {}
            Err(e) if super::is_duplicate_key(&e) => {
                return Ok(Reopened::MovedOn(TaskState::Retry));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(match self.stored(id).await? {
            Some(task) => Reopened::Now(Box::new(task)),
            None => Reopened::Missing,
        })
    }
}

/// What a Celery worker's task event reports of a task it runs.
#[derive(Debug, Clone)]
pub enum Reported {
    /// `task-started`, by the worker (`name@host`).
    Started { worker: String },
    /// `task-retried`, `task-succeeded`, `task-failed`, `task-revoked`.
    Outcome(Transition),
}

impl TaskRepository {
    /// Records what a Celery worker's event (sent at `at`, seconds since the epoch) reports of a
    /// task Kobe published for Celery workers — one of `names`, which keeps Kobe's own tasks out
    /// of it. Forward only: an outcome never moves a finished task, and a passing state
    /// (`STARTED`, `RETRY`) is taken only from an event later than the last one taken, so an
    /// event sent twice, or arriving late, changes nothing. `Some(workflow id)` when the
    /// report was taken; `None` when it changed nothing.
    pub async fn celery_report(
        &self,
        id: &str,
        names: &[String],
        reported: &Reported,
        at: f64,
    ) -> Result<Option<Option<String>>, StoreError> {
        let now = DateTime::now();
        let later = doc! {"$or": [{"celery_at": {"$exists": false}}, {"celery_at": {"$lt": at}}]};
        let (from, mut set, passing): (&[TaskState], Document, bool) = match reported {
            Reported::Started { worker } => (
                &[TaskState::Pending, TaskState::Retry],
                doc! {"state": TaskState::Started.as_str(), "started_at": now, "updated_at": now, "worker": worker},
                true,
            ),
            Reported::Outcome(transition @ Transition::Retry { .. }) => (
                &[TaskState::Pending, TaskState::Started],
                outcome_fields(transition, now)?,
                true,
            ),
            Reported::Outcome(transition) => (
                &[TaskState::Pending, TaskState::Started, TaskState::Retry],
                outcome_fields(transition, now)?,
                false,
            ),
        };
        set.insert("celery_at", at);
        let mut filter =
            doc! {"_id": id, "task_name": {"$in": names}, "state": {"$in": states(from)}};
        if passing {
            filter.extend(later);
        }
        let mut update = doc! {"$set": set};
        if matches!(reported, Reported::Outcome(Transition::Retry { .. })) {
            update.insert("$inc", doc! {"retries": 1_i64});
        }
        let taken = self
            .collection
            .clone_with_type::<Document>()
            .find_one_and_update(filter, update)
            .projection(doc! {"workflow_id": 1})
            .await?;
        Ok(taken.map(|task| task.get_str("workflow_id").ok().map(str::to_owned)))
    }
}

/// What asking to cancel a task did.
#[derive(Debug, Clone)]
pub enum Cancelled {
    /// It was waiting (`PENDING`, `RETRY`) and is `REVOKED` now: its message is acked unrun when
    /// it arrives.
    Revoked,
    /// It is running: its worker tells the handler, and the task ends `REVOKED` if the handler
    /// stops (or runs to its outcome if it does not). Asked now or before.
    Requested,
    /// It was revoked already (asking again changes nothing).
    AlreadyRevoked,
    /// It finished (`SUCCESS`, `FAILURE`): nothing to cancel.
    Finished(TaskState),
    /// Python Celery workers run it (`kind = "celery"`): Kobe cannot stop it, and changes
    /// nothing rather than answer `REVOKED` for a task that runs.
    RunByCelery(String),
    Missing,
}

impl TaskRepository {
    /// Cancels task `id` for `by`. The attempt the task waits for is the arbiter: a cancel that
    /// closes it first ([`LeaseRepository::close`](super::task_leases::LeaseRepository::close))
    /// revokes the waiting task, and a worker's claim is then refused; one that finds it running
    /// asks the attempt to stop. Idempotent.
    #[tracing::instrument(name = "store.tasks.cancel", skip(self))]
    pub async fn cancel(&self, id: &str, by: &str) -> Result<Cancelled, StoreError> {
        // A task moves on at most a few times while we look (STARTED -> RETRY, say).
        for _ in 0..4 {
            let now = DateTime::now();
            let request = super::tasks::OperatorRequest {
                at: now,
                by: by.to_owned(),
            };
            let Some(task) = self.stored(id).await? else {
                // A Celery client's task is recorded by its outcome; until then only its lease
                // knows it.
                return Ok(match self.leases.latest_open(id).await? {
                    Some(lease) if self.leases.ask_to_stop(id, lease.retries, &request).await? => {
                        Cancelled::Requested
                    }
                    _ => Cancelled::Missing,
                });
            };
            match task.state {
                TaskState::Revoked => return Ok(Cancelled::AlreadyRevoked),
                TaskState::Success | TaskState::Failure => {
                    return Ok(Cancelled::Finished(task.state))
                }
                TaskState::Pending | TaskState::Retry | TaskState::Started => {}
            }
            let retries = task.retries;
            let closed = self
                .leases
                .close(
                    id,
                    &task.task_name,
                    retries,
                    TaskState::Revoked,
                    Some(&request),
                )
                .await?;
            let lease = if closed {
                None
            } else {
                self.leases.get(id, retries).await?
            };
            match lease {
                // Nobody holds the attempt, and now nobody can (or an earlier cancel closed it
                // and stopped before revoking the task).
                None if closed => {}
                Some(lease) if lease.closed == Some(TaskState::Revoked) => {}
                Some(lease) if lease.is_open() => {
                    self.ask_running_to_stop(id, retries, &request).await?;
                    return Ok(Cancelled::Requested);
                }
                // Done: its outcome is being recorded; look again.
                _ => continue,
            }
            if self.revoke_unrun(id, retries, &request).await? {
                return Ok(Cancelled::Revoked);
            }
        }
        Err(StoreError::Unavailable(crate::cause::Cause::new(
            "the task kept changing state while being cancelled; ask again",
        )))
    }

    /// Asks the running attempt `retries` of task `id` to stop, on its lease and on the task
    /// (so no retry is recorded after it).
    async fn ask_running_to_stop(
        &self,
        id: &str,
        retries: u32,
        request: &super::tasks::OperatorRequest,
    ) -> Result<(), StoreError> {
        self.leases.ask_to_stop(id, retries, request).await?;
        self.collection
            .update_one(
                doc! {"_id": id, "cancel_requested": null},
                doc! {"$set": {"cancel_requested": {"at": request.at, "by": &request.by}}},
            )
            .await?;
        Ok(())
    }

    /// Revokes task `id` while attempt `retries` has not run; `false` when it moved on.
    async fn revoke_unrun(
        &self,
        id: &str,
        retries: u32,
        request: &super::tasks::OperatorRequest,
    ) -> Result<bool, StoreError> {
        let (now, by) = (request.at, &request.by);
        let revoked = self
            .collection
            .update_one(
                doc! {
                    "_id": id,
                    "retries": {"$not": {"$gt": i64::from(retries)}},
                    "state": {"$in": states(&[TaskState::Pending, TaskState::Retry, TaskState::Started])},
                },
                doc! {"$set": {
                    "state": TaskState::Revoked.as_str(),
                    "retries": i64::from(retries),
                    "updated_at": now,
                    "finished_at": now,
                    "root_cause": format!("cancelled by {by} before it ran"),
                    "cancel_requested": {"at": now, "by": by},
                }},
            )
            .await?;
        Ok(revoked.matched_count == 1)
    }
}
