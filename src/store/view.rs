//! The one read model of "where is this task": the `Tasks` document (what was submitted, and what
//! operators did since), the latest outcome ([`outcomes`](super::outcomes)) laid over it,
//! and the running attempt's lease over that. Status, search, the page, workflows, Celery's
//! results and `kobe task show` all read through here, so they give one answer.
//!
//! Workers write no `Tasks` document: a claim is an insert into
//! [`TaskLeases`](super::task_leases), an outcome an insert beside it. An open lease of
//! the attempt the task waits for makes it `STARTED`, with the lease's start, worker and
//! deliveries. A task no client recorded (a Celery client's) is known by its lease while it
//! runs and by its outcomes after.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime};

use super::outcomes::Outcome;
use super::tasks::PublishState;

use super::search::{Cursor, Search, MAX_PAGE};
use super::task_leases::AttemptLease;
use super::{StoreError, TaskDocument, TaskRepository};
use crate::domain::{TaskId, TaskState};

/// Lays an open lease over its task's document: `STARTED` while the attempt the document waits
/// for runs. A lease of another attempt, or a finished task, changes nothing.
pub(crate) fn overlay(task: &mut TaskDocument, lease: &AttemptLease) {
    if let Some(cancel) = &lease.cancel {
        task.cancel_requested.get_or_insert_with(|| cancel.clone());
    }
    let waiting = matches!(
        task.state,
        TaskState::Pending | TaskState::Retry | TaskState::Started
    );
    if !waiting || !lease.is_open() || lease.retries != task.retries {
        return;
    }
    task.state = TaskState::Started;
    task.started_at = Some(lease.started_at);
    if lease.started_at > task.updated_at {
        task.updated_at = lease.started_at;
    }
    task.worker = lease.worker.clone();
    task.attempt_token = Some(lease.token.clone());
    task.lease_until = Some(lease.lease_until);
    task.deliveries = lease.deliveries;
}

fn is_waiting(task: &TaskDocument) -> bool {
    matches!(
        task.state,
        TaskState::Pending | TaskState::Retry | TaskState::Started
    )
}

/// `documents` with their latest outcomes laid over them, and the tasks known only by an
/// outcome (a Celery client's).
fn composed(
    documents: Vec<TaskDocument>,
    mut latest: std::collections::HashMap<String, Outcome>,
) -> Vec<TaskDocument> {
    let mut tasks = Vec::with_capacity(documents.len() + latest.len());
    for task in documents {
        let outcome = latest.remove(task.id.as_str());
        tasks.extend(compose_one(Some(task), outcome.as_ref()));
    }
    tasks.extend(latest.values().map(from_outcome));
    tasks
}

/// A task as its document (if any) and its latest outcome (if any) say, the running attempt
/// aside; `None` when neither is recorded.
pub(crate) fn compose_one(
    task: Option<TaskDocument>,
    outcome: Option<&Outcome>,
) -> Option<TaskDocument> {
    match (task, outcome) {
        (Some(mut task), Some(outcome)) => {
            compose(&mut task, outcome);
            Some(task)
        }
        (task, None) => task,
        (None, Some(outcome)) => Some(from_outcome(outcome)),
    }
}

/// Lays `outcome` over `task` when it is the latest word on it: an outcome of the attempt the
/// document waits for or of a later one. A document an operator moved past it (a rerun, a cancel
/// of the next attempt) keeps its own word.
pub(crate) fn compose(task: &mut TaskDocument, outcome: &Outcome) {
    if outcome.retries < task.retries {
        return;
    }
    task.state = outcome.state;
    task.retries = outcome.attempt_after();
    task.updated_at = outcome.at;
    task.worker = outcome.worker.clone();
    task.attempt_token = Some(outcome.token.clone());
    task.deliveries = outcome.deliveries;
    task.lease_until = None;
    if let Some(started) = outcome.started_at {
        task.started_at = Some(started);
    }
    task.root_cause = outcome.root_cause.clone().or(task.root_cause.take());
    task.publish_state = Some(if outcome.owed {
        PublishState::Pending
    } else {
        PublishState::Confirmed
    });
    if outcome.state.is_final() {
        task.finished_at = Some(outcome.at);
        task.result = outcome.result.clone();
        task.dead_letter = outcome.dead_letter;
    } else {
        task.finished_at = None;
    }
}

/// A task known only by its outcome (a Celery client's: no `Tasks` document).
pub(crate) fn from_outcome(outcome: &Outcome) -> TaskDocument {
    let id = TaskId::stored(outcome.task_id.clone());
    let mut task = TaskDocument::pending(&id, &outcome.task_name, "");
    if let Some(sent) = &outcome.sent {
        task.args = sent.args.clone();
        task.kwargs = sent.kwargs.clone();
        task.route = sent.route.clone();
        task.priority = crate::domain::Priority::new(i64::from(sent.priority)).unwrap_or_default();
    }
    task.created_at = outcome.started_at.unwrap_or(outcome.at);
    task.retries = 0;
    compose(&mut task, outcome);
    task
}

/// A task known only by its running attempt's lease.
fn from_lease(lease: &AttemptLease) -> TaskDocument {
    let id = TaskId::stored(lease.task_id.clone());
    let mut task = TaskDocument::pending(&id, &lease.task_name, "");
    task.retries = lease.retries;
    task.created_at = lease.started_at;
    task.updated_at = lease.started_at;
    task.publish_state = None;
    overlay(&mut task, lease);
    task
}

impl TaskRepository {
    /// Where task `id` is: its document with its latest outcome and its running attempt laid
    /// over it.
    #[tracing::instrument(name = "store.tasks.get", skip(self))]
    pub async fn get(&self, id: &str) -> Result<Option<TaskDocument>, StoreError> {
        match self.stored(id).await? {
            Some(mut task) => {
                if is_waiting(&task) {
                    if let Some(lease) = self.leases.get(id, task.retries).await? {
                        overlay(&mut task, &lease);
                    }
                }
                Ok(Some(task))
            }
            None => Ok(self.leases.latest_open(id).await?.map(|l| from_lease(&l))),
        }
    }

    /// Task `id` as its document and its latest outcome say (the running attempt aside; readers
    /// use [`TaskRepository::get`]).
    #[tracing::instrument(name = "store.tasks.stored", skip(self))]
    pub async fn stored(&self, id: &str) -> Result<Option<TaskDocument>, StoreError> {
        let (task, latest) = tokio::try_join!(self.document(id), self.outcomes.latest(id))?;
        Ok(compose_one(task, latest.as_ref()))
    }

    /// [`TaskRepository::stored`] of many tasks: two queries (missing ones left out).
    pub(crate) async fn current_of(&self, ids: &[String]) -> Result<Vec<TaskDocument>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let documents: Vec<TaskDocument> = self
            .collection
            .find(doc! {"_id": {"$in": ids}})
            .await?
            .try_collect()
            .await?;
        // Outcomes by `_id` from the attempt each document waits for (0 for a task known only
        // by its outcomes): point reads, not ranges.
        let waiting: std::collections::HashMap<&str, u32> = documents
            .iter()
            .map(|d| (d.id.as_str(), d.retries))
            .collect();
        let from: Vec<(&str, u32)> = ids
            .iter()
            .map(|id| (id.as_str(), waiting.get(id.as_str()).copied().unwrap_or(0)))
            .collect();
        let latest = self.outcomes.latest_from(&from).await?;
        Ok(composed(documents, latest))
    }

    /// [`TaskRepository::get`] of many tasks: their documents and latest outcomes, and the
    /// running attempts laid over them.
    pub(crate) async fn read_model_of(
        &self,
        ids: &[String],
    ) -> Result<Vec<TaskDocument>, StoreError> {
        let mut tasks = self.current_of(ids).await?;
        self.overlay_leases(&mut tasks).await?;
        Ok(tasks)
    }

    /// Lays the latest outcomes and the running attempts over `tasks` (documents as stored).
    pub(crate) async fn overlay_all(&self, tasks: &mut [TaskDocument]) -> Result<(), StoreError> {
        let from: Vec<(&str, u32)> = tasks.iter().map(|t| (t.id.as_str(), t.retries)).collect();
        let latest = self.outcomes.latest_from(&from).await?;
        for task in tasks.iter_mut() {
            if let Some(outcome) = latest.get(task.id.as_str()) {
                compose(task, outcome);
            }
        }
        self.overlay_leases(tasks).await
    }

    /// Lays the running attempts over `tasks`: one query for the page.
    async fn overlay_leases(&self, tasks: &mut [TaskDocument]) -> Result<(), StoreError> {
        let waiting: Vec<(&str, u32)> = tasks
            .iter()
            .filter(|t| is_waiting(t))
            .map(|t| (t.id.as_str(), t.retries))
            .collect();
        let open = self.leases.open_for(&waiting).await?;
        for task in tasks.iter_mut() {
            if let Some(lease) = open.get(task.id.as_str()) {
                overlay(task, lease);
            }
        }
        Ok(())
    }

    /// Tasks matching `search` as the read model has them, most recently changed first, and the
    /// cursor of the next page. `STARTED` is looked for in the live workers' lists of what they
    /// run.
    #[tracing::instrument(name = "store.tasks.find", skip(self))]
    pub async fn find(
        &self,
        search: &Search,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        if search.state != Some(TaskState::Started) {
            return self.search(search).await;
        }
        // Every running attempt is on the first page: the workers' lists are bounded.
        if search.after.is_some() {
            return Ok((Vec::new(), None));
        }
        let running = self.running_leases().await?;
        let ids: Vec<String> = running.iter().map(|l| l.task_id.clone()).collect();
        let mut tasks = self.current_of(&ids).await?;
        for lease in &running {
            match tasks.iter_mut().find(|t| t.id.as_str() == lease.task_id) {
                Some(task) => overlay(task, lease),
                // Running tasks no client recorded.
                None => tasks.push(from_lease(lease)),
            }
        }
        tasks.retain(|t| search.matches(t));
        tasks.sort_by(|a, b| (b.updated_at, b.id.as_str()).cmp(&(a.updated_at, a.id.as_str())));
        tasks.truncate(search.limit.clamp(1, MAX_PAGE) as usize);
        Ok((tasks, None))
    }

    /// The leases of the attempts running now: those the live workers list (each writes its
    /// list every couple of seconds), still held. No scan: one read of the few worker documents,
    /// one of these leases by `_id`.
    async fn running_leases(&self) -> Result<Vec<AttemptLease>, StoreError> {
        let mut ids = self.workers.running().await?;
        ids.truncate(MAX_PAGE as usize * 20);
        self.leases.held_of(&ids).await
    }

    /// How many tasks each state has that changed since `since`, as the read model counts them:
    /// the running attempts move their tasks from waiting to `STARTED`.
    pub(crate) async fn state_counts(
        &self,
        since: DateTime,
    ) -> Result<Vec<(TaskState, u64)>, StoreError> {
        let mut counts = self.counts_since(since).await?;
        let running = self.running_leases().await?;
        let ids: Vec<String> = running.iter().map(|l| l.task_id.clone()).collect();
        let stored: Vec<(String, TaskState)> = self
            .current_of(&ids)
            .await?
            .into_iter()
            .map(|t| (t.id.to_string(), t.state))
            .collect();
        let mut add = |state: TaskState, n: i64| {
            if let Some((_, count)) = counts.iter_mut().find(|(s, _)| *s == state) {
                *count = count.saturating_add_signed(n);
            }
        };
        for lease in &running {
            match stored.iter().find(|(id, _)| *id == lease.task_id) {
                Some((_, state @ (TaskState::Pending | TaskState::Retry))) => {
                    add(*state, -1);
                    add(TaskState::Started, 1);
                }
                Some(_) => {}
                None if lease.started_at >= since => add(TaskState::Started, 1),
                None => {}
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(retries: u32) -> AttemptLease {
        AttemptLease {
            id: format!("t:{retries}"),
            task_id: "t".into(),
            task_name: "n".into(),
            retries,
            token: "tok".into(),
            worker: Some("host:1".into()),
            started_at: DateTime::now(),
            lease_until: DateTime::now(),
            deliveries: 2,
            done_at: None,
            cancel: None,
            closed: None,
        }
    }

    #[test]
    fn an_open_lease_of_the_awaited_attempt_makes_a_waiting_task_started() {
        let mut task = TaskDocument::pending(&TaskId::generate(), "n", "default");
        overlay(&mut task, &lease(0));
        assert_eq!(task.state, TaskState::Started);
        assert_eq!(task.worker.as_deref(), Some("host:1"));
        assert_eq!(task.deliveries, 2);
    }

    #[test]
    fn other_attempts_done_leases_and_finished_tasks_are_left_alone() {
        let mut task = TaskDocument::pending(&TaskId::generate(), "n", "default");
        overlay(&mut task, &lease(1));
        assert_eq!(task.state, TaskState::Pending);
        let mut done = lease(0);
        done.done_at = Some(DateTime::now());
        overlay(&mut task, &done);
        assert_eq!(task.state, TaskState::Pending);
        task.state = TaskState::Success;
        overlay(&mut task, &lease(0));
        assert_eq!(task.state, TaskState::Success);
    }

    fn outcome(retries: u32, state: TaskState) -> Outcome {
        Outcome {
            id: format!("t:{retries}"),
            task_id: "t".into(),
            task_name: "n".into(),
            retries,
            state,
            at: DateTime::now(),
            token: "tok".into(),
            worker: Some("host:1".into()),
            started_at: Some(DateTime::now()),
            deliveries: 1,
            result: Some(serde_json::json!(3)),
            root_cause: None,
            dead_letter: None,
            owed: false,
            sent: None,
            superseded: false,
        }
    }

    #[test]
    fn the_outcome_of_the_awaited_attempt_decides_and_a_retry_moves_to_the_next() {
        let mut task = TaskDocument::pending(&TaskId::generate(), "n", "default");
        compose(&mut task, &outcome(0, TaskState::Success));
        assert_eq!(task.state, TaskState::Success);
        assert_eq!(task.result, Some(serde_json::json!(3)));
        assert!(task.finished_at.is_some());

        let mut task = TaskDocument::pending(&TaskId::generate(), "n", "default");
        compose(&mut task, &outcome(0, TaskState::Retry));
        assert_eq!((task.state, task.retries), (TaskState::Retry, 1));
        assert_eq!(task.finished_at, None);
    }

    #[test]
    fn an_operator_who_moved_the_task_past_an_outcome_keeps_the_word() {
        // Rerun after a failure of attempt 0: the document waits for attempt 1.
        let mut task = TaskDocument::pending(&TaskId::generate(), "n", "default");
        task.state = TaskState::Retry;
        task.retries = 1;
        compose(&mut task, &outcome(0, TaskState::Failure));
        assert_eq!((task.state, task.retries), (TaskState::Retry, 1));
        // Its outcome decides again.
        compose(&mut task, &outcome(1, TaskState::Success));
        assert_eq!((task.state, task.retries), (TaskState::Success, 1));
    }
}
