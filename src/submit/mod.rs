//! Submitting a task — the one way in, for the API, the outbox sweeper and tasks that spawn
//! tasks: claim the dedup fingerprint (when there is one), record the task (`PENDING`), publish
//! it, wait for the broker's confirm. All of them keep the same promise: a task the caller is told
//! about is in MongoDB and either confirmed by the broker or closed as `FAILURE` before any worker
//! took it.
//!
//! Records and dedup claims go through a group-commit writer ([`crate::store::batch`]): concurrent
//! submissions share one `insert` command, and each caller still waits for its own document. The
//! "confirmed" marks are batched too, one `update` for hundreds of tasks.

pub mod outbox;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::amqp::wire::PAYLOAD_HEADER;
use crate::amqp::{AmqpError, Outgoing, Publisher, TaskMessage, Topology};
use crate::domain::{Fingerprint, Priority, TaskId};
use crate::store::batch::{BatchWriter, Written};
use crate::store::dedup::{Claim, DedupEntry};
use crate::store::payloads::reference_value;
use crate::store::tasks::{Recorded, Refusal};
use crate::store::{
    Cache, DedupRepository, PayloadRepository, StoreError, TaskDocument, TaskRepository,
};
use crate::telemetry::metrics::metrics;
use crate::telemetry::trace::TraceContext;

/// Confirmed ids are marked in batches of at most this many...
const MARK_BATCH: usize = 500;
/// ...gathered for at most this long once the first one arrives.
const MARK_WINDOW: Duration = Duration::from_millis(20);

/// A fingerprint claimed this long ago whose task was never recorded belongs to a submission
/// that died between the two (or whose insert is very late): it is taken over, after its task id
/// is closed so that the late insert is refused. Longer than a group-commit command may take
/// (10 s), so a live submission is normally not overtaken at all.
const GHOST_GRACE: Duration = Duration::from_secs(15);

/// Tries of [`TaskRepository::refuse`] while the caller waits, before it goes on in the background.
const REFUSE_TRIES: u32 = 3;
/// How long one try may take.
const REFUSE_BOUND: Duration = Duration::from_secs(2);
/// How long the background goes on trying to refuse a submission already answered 503.
const REFUSE_BACKGROUND: Duration = Duration::from_secs(600);

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

/// A submission that was not accepted, and whether it is settled that its task never runs
/// (`false`: MongoDB did not let the submitter close it yet; it goes on trying).
struct NotAccepted {
    error: SubmitError,
    settled: bool,
}

impl NotAccepted {
    fn settled(error: SubmitError) -> Self {
        Self {
            error,
            settled: true,
        }
    }
}

/// What became of a submission with a dedup fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Recorded and confirmed: a new task.
    Accepted,
    /// An earlier submission with the same fingerprint created this task (it exists).
    Duplicate { task_id: String },
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
    pub async fn submit_many(&self, tasks: Vec<NewTask>) -> Vec<Result<(), SubmitError>> {
        // Every record is built first and then handed to the writer in one go, so the batch
        // fills its insert commands instead of trickling out in the writer's linger.
        let mut staged = Vec::with_capacity(tasks.len());
        for task in tasks {
            let root_id = task.root_id.clone();
            staged.push(match self.prepare(task).await {
                Ok(document) => match self.tasks.insert_write(&document) {
                    Ok(write) => Ok((document, root_id, write)),
                    Err(error) => Err(SubmitError::Store(error)),
                },
                Err(error) => Err(error),
            });
        }
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
    async fn submit_settled(&self, task: NewTask) -> Result<(), NotAccepted> {
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

    /// Settles that a submission about to be answered "not accepted" never runs; `Some(Taken)`
    /// when a worker has it already (the submission is accepted after all). When MongoDB does not
    /// answer within a few tries the caller is answered at once and the tries go on in the
    /// background (`None`), well before the outbox would look at the task.
    async fn refuse(&self, document: &TaskDocument, cause: String) -> Option<Refusal> {
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

    /// A new task's document (`PENDING`, publish pending), its large arguments put in
    /// `RawPayload` already.
    async fn prepare(&self, task: NewTask) -> Result<TaskDocument, SubmitError> {
        let mut document = TaskDocument::pending(&task.id, &task.task_name, &task.route);
        document.priority = task.priority.value();
        document.trace_id = Some(task.trace.trace_id_hex());
        document.traceparent = Some(task.trace.to_string());
        document.parent_id = task.parent_id.clone();
        // The document and the message keep Celery's forms: seconds, and RFC 3339 text.
        document.hard_time_limit = task.hard_time_limit.map(|d| d.as_secs_f64());
        document.soft_time_limit = task.soft_time_limit.map(|d| d.as_secs_f64());
        document.eta = task.eta.map(rfc3339);
        document.expires = task.expires.map(rfc3339);

        let size = serde_json::to_vec(&task.args).map_or(0, |v| v.len())
            + serde_json::to_vec(&task.kwargs).map_or(0, |v| v.len());
        if size > self.inline_limit {
            let value = serde_json::json!({"args": task.args, "kwargs": task.kwargs});
            let reference = self.payloads.put(task.id.as_str(), "args", &value).await?;
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
                let _ = self.confirmed.send(document.id.clone());
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
                let _ = self.confirmed.send(document.id.clone());
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
    pub async fn republish(&self, document: &TaskDocument) -> Result<(), SubmitError> {
        let outgoing = self.message(document, None)?;
        self.publisher
            .publish(outgoing)
            .await
            .map_err(SubmitError::NotPublished)?;
        if let Err(e) = self
            .tasks
            .mark_published(std::slice::from_ref(&document.id))
            .await
        {
            tracing::warn!(error = %e, "cannot mark the republished task confirmed");
        }
        Ok(())
    }

    fn message(
        &self,
        document: &TaskDocument,
        root_id: Option<String>,
    ) -> Result<Outgoing, SubmitError> {
        let id =
            TaskId::parse(&document.id).map_err(|_| SubmitError::InvalidId(document.id.clone()))?;
        let (args, kwargs) = match &document.payload_ref {
            Some(_) => (Vec::new(), Map::new()),
            None => (document.args.clone(), document.kwargs.clone()),
        };
        let mut message = TaskMessage::new(id, &document.task_name, args, kwargs);
        message.priority = Priority::new(i64::from(document.priority)).unwrap_or_default();
        message.traceparent = document.traceparent.clone();
        message.parent_id = document.parent_id.clone();
        if root_id.is_some() {
            message.root_id = root_id;
        }
        message.hard_time_limit = document.hard_time_limit;
        message.soft_time_limit = document.soft_time_limit;
        message.eta = document.eta.clone();
        message.expires = document.expires.clone();
        // A replayed task's next attempt (0 for a task never run).
        message.retries = document.retries;
        let mut headers = message.headers();
        if let Some(reference) = &document.payload_ref {
            headers.insert(
                PAYLOAD_HEADER.into(),
                amiquip::AmqpValue::LongString(reference.clone()),
            );
        }
        let outgoing = Outgoing {
            exchange: self.topology.tasks_exchange(),
            // A task first recorded by a worker (a Celery client's) has no route of its own.
            routing_key: match document.route.as_str() {
                "" => self.topology.route_of(&document.task_name).to_owned(),
                route => route.to_owned(),
            },
            body: message.body(),
            properties: message.properties().with_headers(headers),
        };
        // A countdown or ETA: wait in the delay queues, not in the task queue.
        let eta = document
            .eta
            .as_deref()
            .and_then(|eta| DateTime::parse_rfc3339_str(eta).ok());
        let wait = eta.map(|eta| eta.timestamp_millis() - DateTime::now().timestamp_millis());
        Ok(match wait {
            Some(wait) if wait > 0 => self
                .topology
                .delayed(outgoing, Duration::from_millis(wait as u64)),
            _ => outgoing,
        })
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

/// A time as the message carries it (millisecond precision, UTC).
fn rfc3339(time: DateTime) -> String {
    time.try_to_rfc3339_string()
        .unwrap_or_else(|_| time.timestamp_millis().to_string())
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
