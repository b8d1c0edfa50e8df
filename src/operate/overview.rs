//! The overview of the whole service that the operator page shows: each queue's depth and
//! consumers, what happened in the last hour, the latest failures, dead letters and workflows.

use std::time::Duration;

use mongodb::bson::DateTime;

use super::dead_letters::{LetterSummary, Selection};
use super::Operations;
use crate::amqp::QueueReport;
use crate::domain::TaskState;
use crate::store::search::Search;
use crate::store::{StoreError, TaskDocument};

/// How many of the latest failures and dead letters the overview lists.
pub(crate) const LATEST: u32 = 20;

/// The service at a glance.
#[derive(Debug)]
pub(crate) struct Overview {
    /// Each task queue, then the dead-letter queue, as the broker reports them; why not, when it
    /// does not answer in time.
    pub queues: Result<Vec<QueueReport>, String>,
    /// Tasks per state among those updated in the last hour (running ones as `STARTED`).
    pub last_hour: Vec<(TaskState, u64)>,
    /// The latest failed tasks, newest first.
    pub failures: Vec<TaskDocument>,
    /// The oldest letters in the dead-letter queue; why not, when it cannot be read.
    pub dead_letters: Result<Vec<LetterSummary>, String>,
    /// The workflows changed last, newest first.
    pub workflows: Vec<crate::store::workflows::WorkflowDocument>,
}

impl Overview {
    /// Tasks in `state` in the last hour.
    pub fn count(&self, state: TaskState) -> u64 {
        self.last_hour
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    }

    /// Tasks finished (succeeded or failed) per minute over the last hour.
    pub(crate) fn finished_per_minute(&self) -> f64 {
        (self.count(TaskState::Success) + self.count(TaskState::Failure)) as f64 / 60.0
    }

    /// The share of finished tasks that failed in the last hour, in percent; `None` when none
    /// finished.
    pub(crate) fn failure_rate(&self) -> Option<f64> {
        let (done, failed) = (
            self.count(TaskState::Success),
            self.count(TaskState::Failure),
        );
        (done + failed > 0).then(|| 100.0 * failed as f64 / (done + failed) as f64)
    }
}

impl Operations {
    /// Reads the overview: the broker and the dead-letter queue are asked with bounds, and a
    /// broker that does not answer costs its own line only; MongoDB must answer.
    pub(crate) async fn overview(&self) -> Result<Overview, StoreError> {
        let queues = self.queue_depths();
        let hour_ago = DateTime::from_millis(DateTime::now().timestamp_millis() - 3_600_000);
        let failures = Search {
            state: Some(TaskState::Failure),
            limit: LATEST,
            ..Search::default()
        };
        let (queues, last_hour, failures, dead_letters, workflows) = tokio::join!(
            queues,
            self.tasks.state_counts(hour_ago),
            self.tasks.find(&failures),
            self.dead_letters(Selection::default(), LATEST as usize),
            self.workflows.recent(i64::from(LATEST)),
        );
        Ok(Overview {
            queues,
            last_hour: last_hour?,
            failures: failures?.0,
            dead_letters: dead_letters.map_err(|e| e.to_string()),
            workflows: workflows?,
        })
    }

    async fn queue_depths(&self) -> Result<Vec<QueueReport>, String> {
        let topology = &self.topology;
        let mut queues: Vec<String> = topology
            .routes()
            .iter()
            .map(|r| topology.queue(r))
            .collect();
        queues.push(topology.dead_letter_queue());
        let url = self.url.clone();
        let timeout = self.broker_timeout.max(Duration::from_secs(1));
        tokio::task::spawn_blocking(move || crate::amqp::queue_depths(&url, &queues, timeout))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
