//! Settling that a submission answered "not accepted" never runs: its task is closed before any
//! worker takes it, or found taken (then it runs, and was accepted after all).

use std::time::Duration;

use super::Submitter;
use crate::store::tasks::Refusal;
use crate::store::{StoreError, TaskDocument, TaskRepository};

/// Tries of [`TaskRepository::refuse`] while the caller waits, before it goes on in the background.
const REFUSE_TRIES: u32 = 3;
/// How long one try may take.
const REFUSE_BOUND: Duration = Duration::from_secs(2);
/// How long the background goes on trying to refuse a submission already answered 503.
const REFUSE_BACKGROUND: Duration = Duration::from_secs(600);

impl Submitter {
    /// Settles that a submission about to be answered "not accepted" never runs; `Some(Taken)`
    /// when a worker has it already (the submission is accepted after all). When MongoDB does not
    /// answer within a few tries the caller is answered at once and the tries go on in the
    /// background (`None`), well before the outbox would look at the task.
    pub(super) async fn refuse(&self, document: &TaskDocument, cause: String) -> Option<Refusal> {
        let mut pause = Duration::from_millis(100);
        for _ in 0..REFUSE_TRIES {
            match refuse_within(&self.tasks, &document.id, &document.task_name, &cause).await {
                Ok(refusal) => return Some(refusal),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot close the refused submission yet")
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 3;
        }
        let tasks = self.tasks.clone();
        let (id, name) = (document.id.clone(), document.task_name.clone());
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + REFUSE_BACKGROUND;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match refuse_within(&tasks, &id, &name, &cause).await {
                    Ok(Refusal::NotRun) => {
                        tracing::info!(task_id = %id, "the refused submission is closed");
                        return;
                    }
                    Ok(Refusal::Taken) => {
                        tracing::error!(task_id = %id, "a submission answered 503 was taken by a worker before it could be closed; it runs");
                        return;
                    }
                    Err(_) => {}
                }
            }
            tracing::error!(task_id = %id, "cannot close a refused submission; the outbox may still publish it");
        });
        None
    }
}

/// [`TaskRepository::refuse`], bounded in time: a MongoDB that does not answer must not hold up
/// the caller's answer.
async fn refuse_within(
    tasks: &TaskRepository,
    id: &str,
    task_name: &str,
    cause: &str,
) -> Result<Refusal, StoreError> {
    tokio::time::timeout(REFUSE_BOUND, tasks.refuse(id, task_name, cause))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                format!("no answer within {REFUSE_BOUND:?}").into(),
            ))
        })
}
