//! Submitting a task — the one way in, for the API, the outbox sweeper and tasks that spawn
//! tasks: claim the dedup fingerprint (when there is one), record the task (`PENDING`), publish
//! it, wait for the broker's confirm. All of them keep the same promise: a task the caller is told
//! about is in MongoDB and either confirmed by the broker or closed as `FAILURE` before any worker
//! took it.
//!
//! Records and dedup claims go through a group-commit writer ([`crate::store::batch`]): concurrent
//! submissions share one `insert` command, and each caller still waits for its own document. The
//! "confirmed" marks are batched too, one `update` for hundreds of tasks.

mod message;
mod once;
pub mod outbox;
mod refuse;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::amqp::{AmqpError, Publisher, Topology};
use crate::domain::{Priority, TaskId};
use crate::store::batch::{BatchWriter, Written};
use crate::store::payloads::reference_value;
use crate::store::tasks::Refusal;
use crate::store::{
    Cache, DedupRepository, PayloadRepository, StoreError, TaskDocument, TaskRepository,
};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;

/// Confirmed ids are marked in batches of at most this many...
const MARK_BATCH: usize = 500;
/// ...gathered for at most this long once the first one arrives.
const MARK_WINDOW: Duration = Duration::from_millis(20);

pub use once::Submitted;

/// A task to submit.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub task_name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub route: String,
    pub priority: Priority,
    pub trace: TraceContext,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    pub hard_time_limit: Option<Duration>,
    pub soft_time_limit: Option<Duration>,
    /// Run no earlier than this.
    pub eta: Option<DateTime>,
    /// Do not run after this.
    pub expires: Option<DateTime>,
    /// The workflow it is a step of: its outcome hands the workflow on.
    pub workflow_id: Option<String>,
    /// Celery's canvas that runs after it (the rest of a Celery client's chain).
    pub embed: Option<Value>,
    /// `args` and `kwargs` as the JSON text `{"args": …, "kwargs": …}` once
    /// `Submitter::pack` found them too large to keep inline: a large submission then waits
    /// for its record as text, not as a tree of values many times its size.
    pub packed_arguments: Option<String>,
}

impl NewTask {
    pub fn new(id: TaskId, task_name: &str, route: &str) -> Self {
        Self {
            id,
            task_name: task_name.to_owned(),
            args: Vec::new(),
            kwargs: Map::new(),
            route: route.to_owned(),
            priority: Priority::default(),
            trace: TraceContext::new_root(),
            parent_id: None,
            root_id: None,
            hard_time_limit: None,
            soft_time_limit: None,
            eta: None,
            expires: None,
            workflow_id: None,
            embed: None,
            packed_arguments: None,
        }
    }
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Nothing was written (MongoDB is down, or refuses the document).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task was recorded, then closed as `FAILURE` because the broker did not take it.
    #[error(transparent)]
    NotPublished(AmqpError),
    /// A task id that is not a valid id: refused, never replaced by another.
    #[error("invalid task id `{0}`")]
    InvalidId(String),
}

impl SubmitError {
    /// Whether submitting the same again can never succeed (an id or a document the store
    /// refuses), as against an outage that may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::InvalidId(_) => true,
            Self::Store(error) => {
                matches!(error, StoreError::Rejected(_) | StoreError::Malformed(_))
            }
            Self::NotPublished(_) => false,
        }
    }
}

/// A submission that was not accepted, and whether it is settled that its task never runs
/// (`false`: MongoDB did not let the submitter close it yet; it goes on trying).
pub(super) struct NotAccepted {
    pub(super) error: SubmitError,
    pub(super) settled: bool,
}

impl NotAccepted {
    pub(super) fn settled(error: SubmitError) -> Self {
        Self {
            error,
            settled: true,
        }
    }
}

/// Records and publishes tasks.
#[derive(Clone)]
pub struct Submitter {
    tasks: TaskRepository,
    payloads: PayloadRepository,
    dedup: DedupRepository,
    cache: Cache,
    publisher: Publisher,
    topology: Topology,
    writer: BatchWriter,
    /// Arguments larger than this (serialized) go to `RawPayload`.
    inline_limit: usize,
    confirmed: mpsc::UnboundedSender<String>,
    /// The task marking confirmed tasks, for [`Submitter::finish`].
    marker: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// What a [`Submitter`] writes to and publishes through.
pub struct SubmitterParts {
    pub tasks: TaskRepository,
    pub payloads: PayloadRepository,
    pub dedup: DedupRepository,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topology: Topology,
    pub writer: BatchWriter,
    pub inline_limit: usize,
}

impl Submitter {
    /// Also starts the task that marks confirmed tasks in batches; it ends when the last
    /// `Submitter` clone is dropped, after a final flush.
    pub fn new(parts: SubmitterParts) -> Self {
        let (confirmed, ids) = mpsc::unbounded_channel();
        let marker = tokio::spawn(mark_confirmed(parts.tasks.clone(), ids));
        Self {
            tasks: parts.tasks,
            payloads: parts.payloads,
            dedup: parts.dedup,
            cache: parts.cache,
            publisher: parts.publisher,
            topology: parts.topology,
            writer: parts.writer,
            inline_limit: parts.inline_limit,
            confirmed,
            marker: Arc::new(Mutex::new(Some(marker))),
        }
    }

    /// For a process about to exit (a CLI command): waits, a few seconds at most, until the
    /// confirmed marks of what it submitted are written, so the outbox does not publish those
    /// tasks again. Call it on the last clone: while others live the marks go on, and this
    /// waits out its bound.
    pub async fn finish(self) {
        let marker = self.marker.lock().expect("marker").take();
        drop(self);
        if let Some(marker) = marker {
            let _ = tokio::time::timeout(Duration::from_secs(5), marker).await;
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Records the task, publishes it and waits for the confirm.
    #[tracing::instrument(name = "submit", skip_all, fields(task_id = %task.id, task = %task.task_name))]
    pub async fn submit(&self, task: NewTask) -> Result<(), SubmitError> {
        self.submit_settled(task)
            .await
            .map_err(|refused| refused.error)
    }

    /// Submits many tasks together, each with [`Submitter::submit`]'s promise and its own
    /// answer (in order): their records share the group-commit writer's `insert` commands and
    /// their publishes are confirmed pipelined, so a batch costs a few round trips in all.
    pub(crate) async fn submit_many(&self, tasks: Vec<NewTask>) -> Vec<Result<(), SubmitError>> {
        // Every record is built first and then handed to the writer in one go, so the batch
        // fills its insert commands instead of trickling out in the writer's linger.
        // Large arguments go to RawPayload first, all at once rather than one round trip each.
        let prepared = futures_util::future::join_all(tasks.into_iter().map(|task| async move {
            let root_id = task.root_id.clone();
            (root_id, self.prepare(task).await)
        }))
        .await;
        let staged: Vec<_> = prepared
            .into_iter()
            .map(|(root_id, prepared)| {
                let document = prepared?;
                match self.tasks.insert_write(&document) {
                    Ok(write) => Ok((document, root_id, write)),
                    Err(error) => Err(SubmitError::Store(error)),
                }
            })
            .collect();
        let pending: Vec<_> = staged
            .into_iter()
            .map(|staged| {
                staged.map(|(document, root_id, write)| {
                    (document, root_id, self.writer.submit(write))
                })
            })
            .collect();
        let answers = pending.into_iter().map(|staged| async move {
            let (document, root_id, pending) = staged?;
            let inserted = inserted(pending.result().await, &document);
            self.after_insert(document, root_id, inserted)
                .await
                .map_err(|refused| refused.error)
        });
        futures_util::future::join_all(answers).await
    }

    /// [`Submitter::submit`], saying on refusal whether the task is known never to run.
    pub(super) async fn submit_settled(&self, task: NewTask) -> Result<(), NotAccepted> {
        let root_id = task.root_id.clone();
        let document = self.prepare(task).await.map_err(NotAccepted::settled)?;
        let inserted = self.insert(&document).await;
        self.after_insert(document, root_id, inserted).await
    }

    /// Goes on from a record's insert: publishes it, or settles that a submission whose insert
    /// went unanswered never runs.
    async fn after_insert(
        &self,
        document: TaskDocument,
        root_id: Option<String>,
        inserted: Result<(), SubmitError>,
    ) -> Result<(), NotAccepted> {
        match inserted {
            Ok(()) => {}
            // The insert may have landed with its answer lost: the outbox would then publish a
            // task its client was told was not accepted. Close its id first.
            Err(SubmitError::Store(error)) if error.is_transient() => {
                let cause = format!("not accepted: MongoDB did not answer the insert ({error})");
                let refusal = self.refuse(&document, cause).await;
                if refusal == Some(Refusal::Taken) {
                    return Ok(());
                }
                return Err(NotAccepted {
                    error: SubmitError::Store(error),
                    settled: refusal.is_some(),
                });
            }
            Err(error) => return Err(NotAccepted::settled(error)),
        }
        self.publish_document(&document, root_id).await
    }

    /// Submits a task spawned by a running task. Spawning is idempotent: a retried parent spawns
    /// the same ids again, and a child recorded by an earlier attempt whose publish failed is
    /// published now rather than counted as spawned. A publish that fails leaves the child
    /// `PENDING` for the parent's next attempt (or the outbox), never closed.
    #[tracing::instrument(name = "submit.child", skip_all, fields(task_id = %task.id, task = %task.task_name))]
    pub async fn submit_child(&self, task: NewTask) -> Result<(), SubmitError> {
        let id = task.id.clone();
        let document = self.prepare(task).await?;
        let document = match self.insert(&document).await {
            Ok(()) => document,
            Err(SubmitError::Store(StoreError::Duplicate(_))) => {
                match self.tasks.get(id.as_str()).await? {
                    Some(existing)
                        if existing.state == crate::domain::TaskState::Pending
                            && existing.publish_state
                                == Some(crate::store::tasks::PublishState::Pending) =>
                    {
                        existing
                    }
                    // Recorded and published by an earlier attempt of the parent.
                    Some(_) => return Ok(()),
                    None => {
                        return Err(SubmitError::Store(StoreError::Unavailable(
                            format!("child task {id} was recorded but cannot be read back").into(),
                        )))
                    }
                }
            }
            Err(error) => return Err(error),
        };
        self.republish(&document).await
    }

    /// Turns `task`'s arguments into their JSON text when they are larger than the inline limit
    /// (they will be kept in `RawPayload`), dropping the values; small ones stay as they are.
    /// Idempotent.
    pub(crate) fn pack(&self, task: &mut NewTask) {
        #[derive(serde::Serialize)]
        struct Arguments<'a> {
            args: &'a [Value],
            kwargs: &'a Map<String, Value>,
        }
        /// What the text adds around the arguments themselves: `{"args":,"kwargs":}`.
        const WRAPPING: usize = 19;
        if task.packed_arguments.is_some() {
            return;
        }
        // One pass: the text that measures them is the text kept when they are large.
        let text = serde_json::to_string(&Arguments {
            args: &task.args,
            kwargs: &task.kwargs,
        })
        .unwrap_or_default();
        if text.len().saturating_sub(WRAPPING) > self.inline_limit {
            task.args = Vec::new();
            task.kwargs = Map::new();
            task.packed_arguments = Some(text);
        }
    }

    /// A new task's document (`PENDING`, publish pending), its large arguments put in
    /// `RawPayload` already.
    async fn prepare(&self, task: NewTask) -> Result<TaskDocument, SubmitError> {
        let mut document = TaskDocument::pending(&task.id, &task.task_name, &task.route);
        document.priority = task.priority;
        document.trace_id = Some(task.trace.trace_id_hex());
        document.traceparent = Some(task.trace.to_string());
        document.parent_id = task.parent_id.clone();
        document.workflow_id = task.workflow_id.clone();
        document.embed = task.embed.clone();
        document.hard_time_limit = task.hard_time_limit;
        document.soft_time_limit = task.soft_time_limit;
        document.eta = task.eta;
        document.expires = task.expires;

        let mut task = task;
        self.pack(&mut task);
        if let Some(json) = task.packed_arguments {
            let reference = self
                .payloads
                .put_json(task.id.as_str(), "args", json)
                .await?;
            document.kwargs = reference_value(&reference)
                .as_object()
                .cloned()
                .unwrap_or_default();
            document.payload_ref = Some(reference);
        } else {
            document.args = task.args;
            document.kwargs = task.kwargs;
        }
        Ok(document)
    }

    /// Records a prepared task.
    async fn insert(&self, document: &TaskDocument) -> Result<(), SubmitError> {
        let written = self.writer.write(self.tasks.insert_write(document)?).await;
        inserted(written, document)
    }

    /// Publishes a just-recorded task. When the broker does not take it, the task is closed as
    /// `FAILURE` — but only if no worker has taken it meanwhile (a confirm can be lost after the
    /// broker stored the message): then it runs, and the submission was accepted after all.
    async fn publish_document(
        &self,
        document: &TaskDocument,
        root_id: Option<String>,
    ) -> Result<(), NotAccepted> {
        let outgoing = self
            .message(document, root_id)
            .map_err(NotAccepted::settled)?;
        let error = match self.publisher.publish(outgoing).await {
            Ok(()) => {
                let _ = self.confirmed.send(document.id.to_string());
                return Ok(());
            }
            Err(error) => error,
        };
        let cause = format!("not published: {error}");
        match self.refuse(document, cause).await {
            Some(Refusal::NotRun) => {
                metrics().lost_confirms.with_label_values(&["closed"]).inc();
                // A reader may have cached PENDING in between.
                if let Err(e) = self.cache.invalidate_status(&document.id).await {
                    tracing::warn!(error = %e, "cannot invalidate the cached status");
                }
                Err(NotAccepted::settled(SubmitError::NotPublished(error)))
            }
            Some(Refusal::Taken) => {
                metrics()
                    .lost_confirms
                    .with_label_values(&["accepted"])
                    .inc();
                tracing::info!(task_id = %document.id, error = %error, "the confirm was lost, but a worker has taken the task: accepted");
                let _ = self.confirmed.send(document.id.to_string());
                Ok(())
            }
            None => {
                metrics()
                    .lost_confirms
                    .with_label_values(&["closing"])
                    .inc();
                Err(NotAccepted {
                    error: SubmitError::NotPublished(error),
                    settled: false,
                })
            }
        }
    }

    /// Publishes a task found unconfirmed (by the outbox, or a parent spawning it again). Leaves
    /// it `PENDING` on failure: the next sweep tries again.
    pub(crate) async fn republish(&self, document: &TaskDocument) -> Result<(), SubmitError> {
        let outgoing = self.message(document, None)?;
        self.publisher
            .publish(outgoing)
            .await
            .map_err(SubmitError::NotPublished)?;
        if let Err(e) = self.tasks.mark_published(&[document.id.to_string()]).await {
            tracing::warn!(error = %e, "cannot mark the republished task confirmed");
        }
        Ok(())
    }
}

/// Marks confirmed tasks in batches: under load one `updateMany` covers hundreds of tasks.
/// A record's insert, as its writer answered it.
fn inserted(
    written: Result<Written, StoreError>,
    document: &TaskDocument,
) -> Result<(), SubmitError> {
    match written? {
        Written::Applied => Ok(()),
        Written::Refused => Err(SubmitError::Store(StoreError::Duplicate(
            format!("task {} exists already", document.id).into(),
        ))),
    }
}

async fn mark_confirmed(tasks: TaskRepository, mut ids: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = ids.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + MARK_WINDOW;
        while batch.len() < MARK_BATCH {
            match tokio::time::timeout_at(deadline, ids.recv()).await {
                Ok(Some(id)) => batch.push(id),
                Ok(None) | Err(_) => break,
            }
        }
        if let Err(e) = tasks.mark_published(&batch).await {
            // Not fatal: the outbox may publish these again, and workers drop duplicates.
            tracing::warn!(error = %e, count = batch.len(), "cannot mark tasks confirmed");
        }
    }
}
