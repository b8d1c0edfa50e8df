//! The outbox sweeper, run by `serve`: publishes tasks whose document exists but whose message was
//! never confirmed (the API crashed between the two, or a confirm was lost). Safe with several
//! `serve` processes: each task is claimed (`outbox_claim_until`) before it is published.

use std::time::Duration;

use super::Submitter;
use crate::store::{StoreError, TaskRepository};

/// How long a claim keeps other sweepers off a task.
const CLAIM_HOLD: Duration = Duration::from_secs(60);

pub struct Outbox {
    pub tasks: TaskRepository,
    pub submitter: Submitter,
    /// Only tasks older than this are swept: younger ones may still be waiting for their confirm.
    pub age: Duration,
}

impl Outbox {
    /// Publishes every claimable task once; returns how many went out. Stops at the first
    /// publish failure (the broker is down: the next sweep will retry).
    pub async fn sweep_once(&self) -> Result<usize, StoreError> {
        let mut published = 0;
        while let Some(task) = self.tasks.claim_unpublished(self.age, CLAIM_HOLD).await? {
            match self.submitter.republish(&task).await {
                Ok(()) => {
                    tracing::info!(task_id = %task.id, task = %task.task_name, "outbox published an unconfirmed task");
                    published += 1;
                }
                Err(error) => {
                    tracing::warn!(task_id = %task.id, error = %error, "outbox cannot publish yet");
                    break;
                }
            }
        }
        Ok(published)
    }

    /// Sweeps every `interval` until `shutdown` resolves.
    pub async fn run(self, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(error = %error, "outbox sweep failed");
            }
        }
    }
}
