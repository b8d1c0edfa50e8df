//! Tracking what Python Celery workers run for Kobe: a task declared `kind = "celery"` is
//! recorded and published by Kobe as any other, to a route its Celery workers consume, and its
//! `STARTED`, `RETRY`, `SUCCESS`, `FAILURE` and `REVOKED` come back from Celery's task events.
//!
//! Why the events and not Celery's result backend: they arrive pushed, on the broker Kobe
//! already holds, for every state (a backend holds only the latest, and is read by polling each
//! task), and a durable queue keeps those sent while no `serve` runs. They need the workers to
//! send them (`celery worker -E`, or `worker_send_task_events = True`). A `task-succeeded`
//! event carries only the result's `repr`: with `KOBE_CELERY_RESULTS` naming the Celery
//! workers' result backend, the result is read from there instead, as JSON.
//!
//! Every event is one conditional write (see [`TaskRepository::celery_report`]): forward only,
//! so an event taken twice — redelivered, or by two replicas — or late changes nothing. A step
//! of a workflow is handed on when its outcome is taken.

mod events;
pub mod fleet;

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

pub use events::{value_of_repr, TaskEvent};

use crate::amqp::{Consumer, ConsumerConfig, Delivery, Settlement};
use crate::config::Settings;
use crate::store::attempts::{Reported, Transition};
use crate::store::celery_results::CeleryResults;
use crate::store::payloads::reference_value;
use crate::store::{Cache, PayloadRepository, StoreError, TaskRepository};

/// How long an event that could not be recorded (MongoDB away) waits before it goes back.
const OUTAGE_PAUSE: Duration = Duration::from_secs(1);

/// What taking Celery's task events needs.
pub struct Tracking {
    pub tasks: TaskRepository,
    /// The tasks Celery workers run (`kind = "celery"`); events of others change nothing.
    pub names: Vec<String>,
    pub cache: Cache,
    pub payloads: PayloadRepository,
    /// Results larger than this (JSON bytes) go to `RawPayload`.
    pub inline_limit: usize,
    pub workflows: crate::workflow::Workflows,
    /// The Celery workers' result backend, where a success's result is read as JSON.
    pub results: Option<CeleryResults>,
}

impl Tracking {
    /// Takes the events on the shared events queue until `shutdown` resolves.
    pub async fn run(
        self,
        settings: &Settings,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let topology = crate::commands::topology(settings).with_celery_events();
        let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
        let consumer = Consumer::start(
            ConsumerConfig {
                url: settings.broker.url.clone(),
                queues: vec![topology.celery_events_queue()],
                topology,
                prefetch: 64,
                name: format!("kobe celery events {}", settings.broker.prefix),
            },
            deliveries_tx,
        )?;
        tracing::info!(tasks = ?self.names, "tracking Celery workers' task events");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                delivery = deliveries.recv() => match delivery {
                    Some(delivery) => {
                        let settlement = self.take(&delivery).await;
                        consumer.settle(delivery.tag, settlement);
                    }
                    None => break,
                },
            }
        }
        let _ = tokio::task::spawn_blocking(move || consumer.close()).await;
        Ok(())
    }

    /// Records every event of one delivery; it goes back when MongoDB cannot take them now.
    async fn take(&self, delivery: &Delivery) -> Settlement {
        // Kobe's own workers' events (KOBE_CELERY_EVENTS) are for Celery's tools; their outcomes
        // are recorded already.
        let events = events::parse(&delivery.body)
            .into_iter()
            .filter(|event| !event.hostname.starts_with("kobe-"));
        for event in events {
            if let Err(error) = self.record(&event, delivery.redelivered).await {
                tracing::warn!(error = %error, task_id = %event.uuid, "cannot record a Celery task event now; it goes back to its queue");
                tokio::time::sleep(OUTAGE_PAUSE).await;
                return Settlement::Requeue;
            }
        }
        Settlement::Ack
    }

    async fn record(&self, event: &TaskEvent, redelivered: bool) -> anyhow::Result<()> {
        let Some(mut reported) = event.reported() else {
            return Ok(());
        };
        if let Reported::Outcome(Transition::Success { result }) = &mut reported {
            *result = self.result_of(event).await?;
        }
        let finished = matches!(&reported, Reported::Outcome(t) if t.target().is_final());
        let taken = self
            .tasks
            .celery_report(&event.uuid, &self.names, &reported, event.timestamp)
            .await?;
        let workflow = match taken {
            Some(workflow) => {
                self.cache.invalidate_status(&event.uuid).await.ok();
                tracing::debug!(task_id = %event.uuid, event = %event.kind, "Celery task event recorded");
                workflow
            }
            // Taken before, perhaps with its hand-on cut short: look again.
            None if finished && redelivered => self
                .tasks
                .stored(&event.uuid)
                .await?
                .filter(|task| task.state.is_final() && self.names.contains(&task.task_name))
                .and_then(|task| task.workflow_id),
            None => None,
        };
        if let (Some(workflow), true) = (workflow, finished) {
            self.workflows.advance(&workflow, &event.uuid).await?;
        }
        Ok(())
    }

    /// A success's result: from the Celery workers' result backend when Kobe reads it (as JSON),
    /// else from the event's `repr`; a large one kept in `RawPayload`.
    async fn result_of(&self, event: &TaskEvent) -> Result<Value, StoreError> {
        let mut result = None;
        if let Some(results) = &self.results {
            match results.meta(&event.uuid).await {
                Ok(Some(meta)) if meta["status"] == "SUCCESS" => {
                    result = Some(meta["result"].clone())
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the result from Celery's result backend; keeping the event's repr")
                }
            }
        }
        let result =
            result.unwrap_or_else(|| value_of_repr(event.result.as_deref().unwrap_or("None")));
        let size = serde_json::to_vec(&result).map_or(0, |v| v.len());
        if size > self.inline_limit {
            let reference = self.payloads.put(&event.uuid, "result", &result).await?;
            return Ok(reference_value(&reference));
        }
        Ok(result)
    }
}
