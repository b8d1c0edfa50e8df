//! Submitting at most once per dedup fingerprint: the first submission creates the task, later
//! ones are pointed at it.

use std::time::Duration;

use mongodb::bson::DateTime;

use super::{NewTask, NotAccepted, SubmitError, Submitter};
use crate::domain::Fingerprint;
use crate::store::batch::Written;
use crate::store::dedup::{Claim, DedupEntry};
use crate::store::tasks::Recorded;

/// A fingerprint claimed this long ago whose task was never recorded belongs to a submission
/// that died between the two (or whose insert is very late): it is taken over, after its task id
/// is closed so that the late insert is refused. Longer than a group-commit command may take
/// (10 s), so a live submission is normally not overtaken at all.
const GHOST_GRACE: Duration = Duration::from_secs(15);

/// What became of a submission with a dedup fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Recorded and confirmed: a new task.
    Accepted,
    /// An earlier submission with the same fingerprint created this task (it exists).
    Duplicate { task_id: String },
}

impl Submitter {
    /// Submits a task at most once per `fingerprint` within `window`: the first submission
    /// creates it, later ones are pointed at it — only once it exists, so nobody is pointed at a
    /// task that 404s. A claim whose task never appeared (its submitter died) is taken over after
    /// a short grace.
    #[tracing::instrument(name = "submit.dedup", skip_all, fields(task_id = %task.id, task = %task.task_name))]
    pub async fn submit_once(
        &self,
        task: NewTask,
        fingerprint: &Fingerprint,
        window: Duration,
    ) -> Result<Submitted, SubmitError> {
        let entry = DedupEntry::new(fingerprint.as_str(), task.id.as_str(), window);
        let mut pause = Duration::from_millis(10);
        loop {
            match self.writer.write(self.dedup.claim_write(&entry)?).await? {
                Written::Applied => break,
                Written::Refused => {}
            }
            match self.dedup.holder(fingerprint.as_str()).await? {
                Claim::Free => continue,
                Claim::Held {
                    task_id,
                    claimed_at,
                } => {
                    match self.tasks.recorded(&task_id).await? {
                        Some(Recorded::Live) => return Ok(Submitted::Duplicate { task_id }),
                        // Its submission was not accepted and it never runs: the key is free.
                        Some(Recorded::Refused) => {
                            if self.dedup.take_over(&task_id, &entry).await? {
                                break;
                            }
                            continue;
                        }
                        None => {}
                    }
                    let age = DateTime::now().timestamp_millis() - claimed_at.timestamp_millis();
                    if age > GHOST_GRACE.as_millis() as i64 {
                        // Its insert may still be on its way: close the id first, so that it
                        // can never land beside the task that takes the key over.
                        let tombstone = self.tasks.tombstone_write(
                            &task_id,
                            &task.task_name,
                            "not accepted: its submission never recorded it, and an identical one took its dedup key",
                        );
                        if self.writer.write(tombstone).await? == Written::Refused {
                            continue; // recorded after all: look again
                        }
                        if self.dedup.take_over(&task_id, &entry).await? {
                            tracing::warn!(ghost_task_id = %task_id, "took over a dedup claim whose task was never recorded");
                            break;
                        }
                        continue;
                    }
                    // The first submission is between its claim and its record: wait for it.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        }
        match self.submit_settled(task).await {
            Ok(()) => Ok(Submitted::Accepted),
            // Not accepted, but it may still run (MongoDB did not let us close it): the key stays
            // its, so a retry is pointed at it and learns how it ends.
            Err(NotAccepted {
                error,
                settled: false,
            }) => Err(error),
            Err(NotAccepted { error, .. }) => {
                // Not accepted, so the next identical submission must be free to try again.
                if let Err(e) = self
                    .dedup
                    .release(fingerprint.as_str(), &entry.task_id)
                    .await
                {
                    tracing::warn!(error = %e, "cannot release the dedup fingerprint");
                }
                Err(error)
            }
        }
    }
}
