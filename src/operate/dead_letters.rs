//! The dead-letter queue for operators: list, show, replay and purge (`kobe dlq …`).
//!
//! Reading never removes anything: letters are taken unacknowledged and go back to the queue
//! when the reader closes. A replay reopens the task (`FAILURE` → `RETRY`, one more retry, the
//! replay recorded in its `replays`), publishes its next attempt through the submitter, and
//! removes the letter only after the broker confirmed that publish. Interrupted anywhere, nothing
//! is lost: the letter is still in the queue, and the next replay of it finishes the job (a task
//! reopened without a confirmed publish is published again; one that has moved on since only has
//! its stale letter removed).

use std::time::Duration;

use serde::Serialize;

use super::rerun::Rerun;
use super::Operations;
use crate::amqp::dead_letter_queue::{DeadLetter, DeadLetterQueue};
use crate::amqp::AmqpError;
use crate::store::StoreError;
use crate::telemetry::metrics::metrics;

/// Most letters one command looks at: a bound on the time a listing holds them.
pub(crate) const SCAN_LIMIT: usize = 100_000;

/// Dead-letter operations of this process go one at a time, waiting at most this long.
static READER: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
const READER_WAIT: Duration = Duration::from_secs(15);

/// Why a dead-letter operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the dead-letter reader stopped: {0}")]
    Reader(String),
}

/// Which letters an operation is about.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// These task ids only (empty: any).
    pub task_ids: Vec<String>,
    /// Letters of this task name only.
    pub task_name: Option<String>,
    /// Letters whose reason contains this text.
    pub reason: Option<String>,
    /// Letters dead-lettered at least this long ago (letters without a recorded time never match).
    pub older_than: Option<Duration>,
}

impl Selection {
    fn matches(&self, letter: &DeadLetter, now_ms: i64) -> bool {
        let id_fits = self.task_ids.is_empty()
            || letter
                .task_id
                .as_ref()
                .is_some_and(|id| self.task_ids.contains(id));
        let name_fits = self
            .task_name
            .as_ref()
            .is_none_or(|name| letter.task_name.as_ref() == Some(name));
        let reason_fits = self
            .reason
            .as_ref()
            .is_none_or(|text| letter.reason.contains(text.as_str()));
        let age_fits = self.older_than.is_none_or(|age| {
            let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            letter
                .dead_lettered_at
                .is_some_and(|at| at <= now_ms.saturating_sub(age))
        });
        id_fits && name_fits && reason_fits && age_fits
    }
}

/// A dead letter as an operator sees it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct LetterSummary {
    pub task_id: Option<String>,
    pub task_name: Option<String>,
    pub reason: String,
    pub attempts: Option<i64>,
    pub route: Option<String>,
    /// Milliseconds since the epoch.
    pub dead_lettered_at: Option<i64>,
    /// The message body (Celery protocol 2 JSON: `[args, kwargs, embed]`, or whatever JSON an
    /// unreadable message held), for `show`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub body: Option<serde_json::Value>,
}

impl LetterSummary {
    fn of(letter: &DeadLetter, with_body: bool) -> Self {
        Self {
            task_id: letter.task_id.clone(),
            task_name: letter.task_name.clone(),
            reason: letter.reason.clone(),
            attempts: letter.attempts,
            route: letter.route.clone(),
            dead_lettered_at: letter.dead_lettered_at,
            body: with_body.then(|| {
                serde_json::from_slice(&letter.body).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&letter.body).into_owned())
                })
            }),
        }
    }
}

/// What a replay did with one letter.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// Published as a new attempt, confirmed; the letter is removed.
    Replayed { task_id: String, retries: u32 },
    /// `--dry-run`: would be replayed.
    WouldReplay { task_id: String },
    /// The task has moved on since it was dead-lettered; the stale letter is removed.
    Stale { task_id: String, state: String },
    /// Not replayed; the letter stays in the queue.
    Kept {
        task_id: Option<String>,
        why: String,
    },
}

impl ReplayOutcome {
    /// The task the letter was for, when it named one.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Self::Replayed { task_id, .. }
            | Self::WouldReplay { task_id }
            | Self::Stale { task_id, .. } => Some(task_id),
            Self::Kept { task_id, .. } => task_id.as_deref(),
        }
    }
}

impl Operations {
    /// Runs `work` over a reader of the queue, on a blocking thread; the reader is closed after,
    /// returning every letter not removed.
    async fn with_queue<T, F>(&self, work: F) -> Result<T, DeadLetterError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DeadLetterQueue) -> Result<T, DeadLetterError> + Send + 'static,
    {
        // One reader at a time in this process: each holds the letters it read unacknowledged
        // until it closes, so readers side by side would hide letters from each other and open a
        // connection each. A reader waits its turn, for a while.
        let _turn = tokio::time::timeout(READER_WAIT, READER.acquire())
            .await
            .map_err(|_| {
                DeadLetterError::Reader(format!(
                    "another dead-letter operation has been running for {READER_WAIT:?}; try again shortly"
                ))
            })?
            .map_err(|e| DeadLetterError::Reader(e.to_string()))?;
        let url = self.url.clone();
        let topology = self.topology.clone();
        tokio::task::spawn_blocking(move || {
            let mut queue = DeadLetterQueue::open(&url, &topology)?;
            let result = work(&mut queue);
            queue.close();
            result
        })
        .await
        .map_err(|e| DeadLetterError::Reader(e.to_string()))?
    }

    /// The letters `selection` picks, oldest first, at most `limit`; nothing is removed.
    pub async fn dead_letters(
        &self,
        selection: Selection,
        limit: usize,
    ) -> Result<Vec<LetterSummary>, DeadLetterError> {
        self.with_queue(move |queue| {
            let now = crate::domain::epoch_millis();
            let mut found = Vec::new();
            for _ in 0..SCAN_LIMIT {
                let Some(letter) = queue.take()? else { break };
                if selection.matches(&letter, now) {
                    found.push(LetterSummary::of(&letter, false));
                    if found.len() >= limit {
                        break;
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    /// The letter of task `task_id`, with its body; nothing is removed.
    pub async fn dead_letter(
        &self,
        task_id: &str,
    ) -> Result<Option<LetterSummary>, DeadLetterError> {
        let selection = Selection {
            task_ids: vec![task_id.to_owned()],
            ..Selection::default()
        };
        self.with_queue(move |queue| {
            let now = crate::domain::epoch_millis();
            for _ in 0..SCAN_LIMIT {
                let Some(letter) = queue.take()? else { break };
                if selection.matches(&letter, now) {
                    return Ok(Some(LetterSummary::of(&letter, true)));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Replays the letters `selection` picks (see the module's description); with `dry_run`,
    /// says what it would do and changes nothing. `by` names who asked, for the task's history.
    pub async fn replay(
        &self,
        selection: Selection,
        dry_run: bool,
        by: &str,
    ) -> Result<Vec<ReplayOutcome>, DeadLetterError> {
        let this = self.clone();
        let by = by.to_owned();
        let runtime = tokio::runtime::Handle::current();
        self.with_queue(move |queue| {
            let now = crate::domain::epoch_millis();
            let mut outcomes = Vec::new();
            for _ in 0..SCAN_LIMIT {
                let Some(letter) = queue.take()? else { break };
                if !selection.matches(&letter, now) {
                    continue;
                }
                let outcome = match (&letter.task_id, dry_run) {
                    (None, _) => ReplayOutcome::Kept {
                        task_id: None,
                        why: "the letter carries no usable task id".into(),
                    },
                    (Some(id), true) => ReplayOutcome::WouldReplay {
                        task_id: id.clone(),
                    },
                    (Some(id), false) => {
                        let id = id.clone();
                        let outcome = runtime.block_on(this.replay_one(&id, &by));
                        if matches!(
                            outcome,
                            ReplayOutcome::Replayed { .. } | ReplayOutcome::Stale { .. }
                        ) {
                            queue.remove(letter)?;
                        }
                        outcome
                    }
                };
                let label = match &outcome {
                    ReplayOutcome::Replayed { .. } => "replayed",
                    ReplayOutcome::WouldReplay { .. } => "dry_run",
                    ReplayOutcome::Stale { .. } => "stale",
                    ReplayOutcome::Kept { .. } => "kept",
                };
                metrics()
                    .dlq_operations
                    .with_label_values(&["replay", label])
                    .inc();
                tracing::info!(by = %by, outcome = ?outcome, "dead letter replay");
                outcomes.push(outcome);
            }
            Ok(outcomes)
        })
        .await
    }

    async fn replay_one(&self, task_id: &str, by: &str) -> ReplayOutcome {
        let kept = |why: String| ReplayOutcome::Kept {
            task_id: Some(task_id.to_owned()),
            why,
        };
        match self.rerun(task_id, by).await {
            Ok(Rerun::Published(task)) => ReplayOutcome::Replayed {
                task_id: task_id.to_owned(),
                retries: task.retries,
            },
            // Finished since (an earlier replay ran it): the letter is stale.
            Ok(Rerun::NotFailed(state)) if state.is_final() => ReplayOutcome::Stale {
                task_id: task_id.to_owned(),
                state: state.as_str().to_owned(),
            },
            // Still on its way (rerun by other means): the letter may be all that is left of its
            // failure if this run fails too, so it stays.
            Ok(Rerun::NotFailed(state)) => kept(format!(
                "the task is {state} now; the letter stays until it finishes"
            )),
            Ok(Rerun::Missing) => kept("no such task in MongoDB".into()),
            Ok(Rerun::NotPublished(e)) => kept(format!(
                "the new attempt was not confirmed ({e}); replay it again"
            )),
            Err(e) => kept(format!("cannot reopen the task: {e}")),
        }
    }

    /// Removes the letters `selection` picks (with `dry_run`, only counts them); returns how many.
    pub async fn purge(
        &self,
        selection: Selection,
        dry_run: bool,
    ) -> Result<usize, DeadLetterError> {
        let removed = self
            .with_queue(move |queue| {
                let now = crate::domain::epoch_millis();
                let mut removed = 0;
                for _ in 0..SCAN_LIMIT {
                    let Some(letter) = queue.take()? else { break };
                    if selection.matches(&letter, now) {
                        if !dry_run {
                            queue.remove(letter)?;
                        }
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await?;
        if !dry_run {
            metrics()
                .dlq_operations
                .with_label_values(&["purge", "removed"])
                .inc_by(removed as u64);
        }
        Ok(removed)
    }
}
