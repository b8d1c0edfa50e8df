//! The one read model of "where is this task": the `Tasks` document with the running attempt's
//! lease laid over it. Status, search, the page and `kobe task show` all read through here, so
//! they give one answer.
//!
//! `Tasks` holds `PENDING` or `RETRY` while an attempt runs (the claim writes only
//! [`TaskLeases`](super::task_leases)); an open lease of the attempt the document waits for makes
//! it `STARTED`, with the lease's start, worker and deliveries. A task no client recorded (a
//! Celery client's) is known only by its lease until its outcome is written.

use mongodb::bson::{doc, DateTime};

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
    /// Where task `id` is: its document with its running attempt laid over it.
    #[tracing::instrument(name = "store.tasks.get", skip(self))]
    pub async fn get(&self, id: &str) -> Result<Option<TaskDocument>, StoreError> {
        match self.stored(id).await? {
            Some(mut task) => {
                if matches!(
                    task.state,
                    TaskState::Pending | TaskState::Retry | TaskState::Started
                ) {
                    if let Some(lease) = self.leases.get(id, task.retries).await? {
                        overlay(&mut task, &lease);
                    }
                }
                Ok(Some(task))
            }
            None => Ok(self.leases.latest_open(id).await?.map(|l| from_lease(&l))),
        }
    }

    /// Lays the running attempts over `tasks`: one query for the page.
    pub(crate) async fn overlay_all(&self, tasks: &mut [TaskDocument]) -> Result<(), StoreError> {
        let waiting: Vec<(&str, u32)> = tasks
            .iter()
            .filter(|t| {
                matches!(
                    t.state,
                    TaskState::Pending | TaskState::Retry | TaskState::Started
                )
            })
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
    /// cursor of the next page. `STARTED` is looked for among the open leases; a waiting task that
    /// turns out to run is left out of a search for its stored state.
    #[tracing::instrument(name = "store.tasks.find", skip(self))]
    pub async fn find(
        &self,
        search: &Search,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        if search.state != Some(TaskState::Started) {
            let (mut tasks, next) = self.search(search, None).await?;
            self.overlay_all(&mut tasks).await?;
            if let Some(state) = search.state {
                tasks.retain(|t| t.state == state);
            }
            return Ok((tasks, next));
        }
        let running = self.running_leases().await?;
        let ids: Vec<&str> = running.iter().map(|l| l.task_id.as_str()).collect();
        let (mut tasks, next) = self.search(search, Some(&ids)).await?;
        self.overlay_all(&mut tasks).await?;
        tasks.retain(|t| t.state == TaskState::Started);
        // Running tasks no client recorded, on the first page (one query says which are).
        if search.after.is_none() && search.parent_id.is_none() {
            let ids: Vec<String> = running.iter().map(|l| l.task_id.clone()).collect();
            let recorded = self.states(&ids).await?;
            for lease in &running {
                let known = recorded.iter().any(|(id, _)| *id == lease.task_id);
                let named = search
                    .task_name
                    .as_ref()
                    .is_none_or(|n| *n == lease.task_name);
                if !known && named {
                    tasks.push(from_lease(lease));
                }
            }
        }
        Ok((tasks, next))
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
        let stored = self.states(&ids).await?;
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
}
