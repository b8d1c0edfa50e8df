//! What operators do to tasks, for the API, the page and the command line alike: cancel a task,
//! run a failed one again, list, replay and purge dead letters, and read the
//! [`overview`](Operations::overview) of the whole service. Submitting stays in
//! [`crate::submit`]; reading one task goes through the read model
//! ([`crate::store::TaskRepository::get`]).

pub mod cancel;
pub mod dead_letters;
pub(crate) mod overview;
pub mod rerun;

use std::time::Duration;

use crate::amqp::Topology;
use crate::config::ServiceUrl;
use crate::store::attempts::Cancelled;
use crate::store::{Cache, StoreError, TaskRepository};
use crate::submit::Submitter;

/// The operator services of one deployment, over its submitter.
#[derive(Clone)]
pub struct Operations {
    /// The broker, for the dead-letter queue and the queue depths.
    pub url: ServiceUrl,
    pub topology: Topology,
    pub tasks: TaskRepository,
    /// A rerun step's workflow goes on again.
    pub workflows: crate::workflow::Workflows,
    pub submitter: Submitter,
    pub cache: Cache,
    /// How long the broker may take to report the queues for the overview.
    pub broker_timeout: Duration,
    /// The tasks Python Celery workers run (`kind = "celery"`): a cancel leaves them alone.
    pub celery_tasks: Vec<String>,
}

impl Operations {
    /// Cancels task `id` for `by` (who asked, for its history and the log).
    pub async fn cancel(&self, id: &str, by: &str) -> Result<Cancelled, StoreError> {
        cancel::cancel(&self.tasks, &self.cache, &self.celery_tasks, id, by).await
    }

    /// Runs failed task `id` again as its next attempt, for `by`.
    pub async fn rerun(&self, id: &str, by: &str) -> Result<rerun::Rerun, StoreError> {
        rerun::rerun(self, id, by).await
    }
}
