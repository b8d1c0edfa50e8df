//! Submitting a task: record it (`PENDING`), publish it, wait for the confirm. Shared by the API,
//! the outbox sweeper and tasks that spawn tasks, so all three keep the same promise: a task the
//! caller is told about is in MongoDB and either confirmed by the broker or closed as `FAILURE`.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::amqp::{AmqpError, Outgoing, Publisher, TaskMessage, Topology};
use crate::domain::{Priority, TaskId};
use crate::store::payloads::reference_value;
use crate::store::{
    Cache, PayloadRepository, StoreError, TaskDocument, TaskRepository, Transition,
};
use crate::telemetry::trace::TraceContext;

/// Header naming the `RawPayload` that holds a message's arguments.
pub const PAYLOAD_HEADER: &str = "kobe-payload-ref";

/// Confirmed ids are marked in batches of at most this many...
const MARK_BATCH: usize = 500;
/// ...gathered for at most this long once the first one arrives.
const MARK_WINDOW: Duration = Duration::from_millis(20);

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
    pub hard_time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub eta: Option<String>,
    pub expires: Option<String>,
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
    /// Nothing was written: MongoDB is down.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task was recorded, then closed as `FAILURE` because the broker did not confirm it.
    #[error(transparent)]
    NotPublished(AmqpError),
}

/// Records and publishes tasks.
#[derive(Clone)]
pub struct Submitter {
    tasks: TaskRepository,
    payloads: PayloadRepository,
    cache: Cache,
    publisher: Publisher,
    topology: Topology,
    /// Arguments larger than this (serialized) go to `RawPayload`.
    inline_limit: usize,
    confirmed: mpsc::UnboundedSender<String>,
}

impl Submitter {
    /// Also starts the task that marks confirmed tasks in batches; it ends when the last
    /// `Submitter` clone is dropped, after a final flush.
    pub fn new(
        tasks: TaskRepository,
        payloads: PayloadRepository,
        cache: Cache,
        publisher: Publisher,
        topology: Topology,
        inline_limit: usize,
    ) -> Self {
        let (confirmed, ids) = mpsc::unbounded_channel();
        tokio::spawn(mark_confirmed(tasks.clone(), ids));
        Self {
            tasks,
            payloads,
            cache,
            publisher,
            topology,
            inline_limit,
            confirmed,
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
        let mut document = TaskDocument::pending(&task.id, &task.task_name, &task.route);
        document.priority = task.priority.value();
        document.trace_id = Some(task.trace.trace_id_hex());
        document.traceparent = Some(task.trace.to_string());
        document.parent_id = task.parent_id.clone();
        document.hard_time_limit = task.hard_time_limit;
        document.soft_time_limit = task.soft_time_limit;
        document.eta = task.eta.clone();
        document.expires = task.expires.clone();

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
            document.args = task.args.clone();
            document.kwargs = task.kwargs.clone();
        }
        self.tasks.insert(&document).await?;
        self.publish_document(&document, task.root_id)
            .await
            .map_err(SubmitError::NotPublished)
    }

    /// Publishes a just-recorded task; on failure closes it as `FAILURE`, since its submitter
    /// is about to be told "not accepted".
    async fn publish_document(
        &self,
        document: &TaskDocument,
        root_id: Option<String>,
    ) -> Result<(), AmqpError> {
        let outgoing = self.message(document, root_id);
        match self.publisher.publish(outgoing).await {
            Ok(()) => {
                let _ = self.confirmed.send(document.id.clone());
                Ok(())
            }
            Err(error) => {
                // The caller is told the task was not accepted, so it must never run: close it
                // as FAILURE. (Should the message reach the broker after all, the worker finds
                // the task finished and drops it.)
                let closed = self
                    .tasks
                    .transition(
                        &document.id,
                        Transition::Failure {
                            root_cause: format!("not published: {error}"),
                        },
                    )
                    .await;
                match closed {
                    // A reader may have cached PENDING in between.
                    Ok(_) => {
                        if let Err(e) = self.cache.invalidate_status(&document.id).await {
                            tracing::warn!(error = %e, "cannot invalidate the cached status");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot record the publish failure"),
                }
                Err(error)
            }
        }
    }

    /// Publishes a task the outbox found unconfirmed. Leaves it `PENDING` on failure: the next
    /// sweep tries again.
    pub async fn republish(&self, document: &TaskDocument) -> Result<(), AmqpError> {
        let outgoing = self.message(document, None);
        self.publisher.publish(outgoing).await?;
        if let Err(e) = self
            .tasks
            .mark_published(std::slice::from_ref(&document.id))
            .await
        {
            tracing::warn!(error = %e, "cannot mark the republished task confirmed");
        }
        Ok(())
    }

    fn message(&self, document: &TaskDocument, root_id: Option<String>) -> Outgoing {
        let id = TaskId::parse(&document.id).unwrap_or_else(|_| TaskId::generate());
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
        let mut headers = message.headers();
        if let Some(reference) = &document.payload_ref {
            headers.insert(
                PAYLOAD_HEADER.into(),
                amiquip::AmqpValue::LongString(reference.clone()),
            );
        }
        let outgoing = Outgoing {
            exchange: self.topology.tasks_exchange(),
            routing_key: document.route.clone(),
            body: message.body(),
            properties: message.properties().with_headers(headers),
        };
        // A countdown or ETA: wait in the delay queues, not in the task queue.
        let eta = document
            .eta
            .as_deref()
            .and_then(|eta| mongodb::bson::DateTime::parse_rfc3339_str(eta).ok());
        match eta {
            Some(eta) => {
                let wait =
                    eta.timestamp_millis() - mongodb::bson::DateTime::now().timestamp_millis();
                if wait > 0 {
                    self.topology
                        .delayed(outgoing, Duration::from_millis(wait as u64))
                } else {
                    outgoing
                }
            }
            None => outgoing,
        }
    }
}

/// Marks confirmed tasks in batches: under load one `updateMany` covers hundreds of tasks.
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
