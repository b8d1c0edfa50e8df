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
    /// With `results`: how long a task may stay unfinished before its outcome is looked for
    /// there (its events may be lost).
    pub reconcile_after: Duration,
}

/// Tasks looked for in the result backend per round, at most.
const RECONCILE_BATCH: i64 = 200;

impl Tracking {
    /// Takes the events on the shared events queue (declared in `topology`) until `shutdown`
    /// resolves.
    pub async fn run(
        self,
        settings: &Settings,
        topology: crate::amqp::Topology,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let topology = topology.with_celery_events();
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
        let every =
            (self.reconcile_after / 2).clamp(Duration::from_millis(200), Duration::from_secs(60));
        let mut reconcile = tokio::time::interval(every);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = reconcile.tick(), if self.results.is_some() => {
                    if let Err(error) = self.reconcile().await {
                        tracing::warn!(error = %error, "cannot reconcile Celery tasks with their result backend now");
                    }
                }
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
            // The whole Celery fleet's events come here: a result is read (and perhaps kept)
            // only for a task of ours.
            let ours = self.tasks.name_of(&event.uuid).await?;
            if !ours.is_some_and(|name| self.names.contains(&name)) {
                return Ok(());
            }
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
            self.hand_on(&workflow, &event.uuid).await?;
        }
        Ok(())
    }

    /// Hands a workflow on after its step's outcome; an error trying again cannot mend is said,
    /// and the event taken, rather than sent back for ever.
    async fn hand_on(&self, workflow: &str, task_id: &str) -> anyhow::Result<()> {
        match self.workflows.advance(workflow, task_id).await {
            Ok(()) => Ok(()),
            Err(error) if error.is_permanent() => {
                tracing::error!(error = %error, workflow_id = %workflow, "the workflow cannot be handed on, now or later");
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Records the outcome the result backend holds for each of our tasks unfinished for
    /// `reconcile_after`: an event lost (sent transient during a broker restart, dropped from a
    /// full queue, a worker without `-E`) must not leave a task, and its workflow, unfinished.
    /// Returns how many it recorded.
    pub async fn reconcile(&self) -> anyhow::Result<usize> {
        let Some(results) = &self.results else {
            return Ok(0);
        };
        let after = i64::try_from(self.reconcile_after.as_millis()).unwrap_or(i64::MAX);
        let before = mongodb::bson::DateTime::now()
            .timestamp_millis()
            .saturating_sub(after);
        let stale = self
            .tasks
            .unfinished_of(
                &self.names,
                mongodb::bson::DateTime::from_millis(before),
                RECONCILE_BATCH,
            )
            .await?;
        let mut recorded = 0;
        for (id, workflow) in stale {
            let Some(meta) = results.meta(&id).await? else {
                continue;
            };
            let Some(outcome) = self.outcome_in(&id, &meta).await? else {
                continue;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let reported = Reported::Outcome(outcome);
            if self
                .tasks
                .celery_report(&id, &self.names, &reported, now)
                .await?
                .is_some()
            {
                recorded += 1;
                self.cache.invalidate_status(&id).await.ok();
                tracing::warn!(task_id = %id, "a Celery task's outcome was read from its result backend: its event never came");
                if let Some(workflow) = workflow {
                    self.hand_on(&workflow, &id).await?;
                }
            }
        }
        Ok(recorded)
    }

    /// The final outcome a Celery meta says, if it says one.
    async fn outcome_in(&self, id: &str, meta: &Value) -> Result<Option<Transition>, StoreError> {
        Ok(match meta["status"].as_str() {
            Some("SUCCESS") => Some(Transition::Success {
                result: self.kept(id, meta["result"].clone()).await?,
            }),
            Some("FAILURE") => {
                let result = &meta["result"];
                let cause = match (
                    result["exc_type"].as_str(),
                    result["exc_message"].as_array(),
                ) {
                    (Some(kind), Some(message)) => format!(
                        "{kind}({})",
                        message
                            .iter()
                            .map(|m| m
                                .as_str()
                                .map_or_else(|| m.to_string(), |s| format!("'{s}'")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => result.to_string(),
                };
                Some(Transition::Failure {
                    root_cause: cause,
                    dead_letter: false,
                })
            }
            Some("REVOKED") => Some(Transition::Revoked {
                root_cause: "revoked (read from Celery's result backend)".into(),
            }),
            _ => None,
        })
    }

    /// A result as it is recorded: in `RawPayload` when large.
    async fn kept(&self, id: &str, result: Value) -> Result<Value, StoreError> {
        let size = serde_json::to_vec(&result).map_or(0, |v| v.len());
        if size > self.inline_limit {
            let reference = self.payloads.put(id, "result", &result).await?;
            return Ok(reference_value(&reference));
        }
        Ok(result)
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
        self.kept(&event.uuid, result).await
    }
}
