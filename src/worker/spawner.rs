//! Child tasks: a running task submits more tasks through the worker's own submitter.

use std::future::Future;
use std::pin::Pin;

use crate::submit::{NewTask, Submitter};
use crate::tasks::{ChildTask, Spawner, TaskError};

/// Lets tasks submit child tasks (see [`Submitter::submit_child`]: idempotent, and a child whose
/// publish failed is published again by the parent's next attempt).
pub(crate) struct WorkerSpawner {
    pub submitter: Submitter,
}

impl Spawner for WorkerSpawner {
    fn spawn(
        &self,
        child: ChildTask,
    ) -> Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + '_>> {
        Box::pin(async move {
            let route = self
                .submitter
                .topology()
                .route_of(&child.task_name)
                .to_owned();
            let mut task = NewTask::new(child.id, &child.task_name, &route);
            task.kwargs = child.kwargs;
            task.parent_id = Some(child.parent_id.to_string());
            self.submitter
                .submit_child(task)
                .await
                .map_err(|e| TaskError::Retryable(format!("cannot submit a child task: {e}")))
        })
    }
}
