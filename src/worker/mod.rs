//! The execution core: what a worker does with each delivery.
//!
//! | module | owns |
//! |---|---|
//! | `pipeline` | one delivery's life up to its outcome: checks, the claim, running |
//! | `supervise` | a running handler watched against its lease |
//! | [`decision`] | what a copy meets before running, and what each outcome means: pure, tested alone |
//! | `carry` | carrying decisions out, the only place a delivery is settled; its effects behind a trait |
//! | `effects` | the worker's effects: record, publish, settle, release, look |
//! | `upkeep` | the attempts running here: one lease renewal a tick, cancel requests, old leases |
//! | `job`, `pause` | a delivery being worked on; pauses before trying again |
//! | [`execute`] | running a handler under its time limits, panics caught |
//! | [`spawner`] | child tasks submitted by running tasks |
//!
//! Its promises: a task runs as one live attempt at a time (the execution lease in `TaskLeases`); a
//! message is settled only after its outcome is recorded; every store write goes through the
//! group-commit writer ([`crate::store::batch`]), so concurrent tasks share MongoDB commands; a
//! panic anywhere in handling a delivery still settles it.
//!
//! `commands::worker` builds a [`Worker`] from settings; tests build one the same way.

mod carry;
pub mod decision;
mod effects;
pub mod execute;
mod job;
mod pause;
mod pipeline;
pub(crate) mod spawner;
mod supervise;
mod upkeep;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::amqp::consumer::{Liveness, Settler};
use crate::amqp::{Delivery, Publisher, Topology};
use crate::config::RetryOverrides;
use crate::store::batch::BatchWriter;
use crate::store::cache::Invalidator;
use crate::store::{Cache, ErrorLogRepository, PayloadRepository, TaskRepository};
use crate::tasks::{Registry, RetryPolicy, Task, TaskContext};
use pause::Pause;
use upkeep::Active;

/// How a worker behaves, from settings and the command line.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Handlers running at once.
    pub concurrency: u16,
    /// How long a delivery may wait for a run slot before it goes back to its queue.
    pub slot_wait: Duration,
    /// How long a message of a task this worker does not know keeps being handed on, for a
    /// worker that knows it, before it is closed as unknown.
    pub unknown_task_grace: Duration,
    /// How long an attempt's lease holds without renewal; renewed every third of it.
    pub lease: Duration,
    /// Starts of one attempt after which its message counts as poison.
    pub max_deliveries: u32,
    /// Results larger than this (JSON bytes) go to `RawPayload`.
    pub inline_limit: usize,
    /// Log arguments at start (`KOBE_LOG_PAYLOADS`).
    pub log_payloads: bool,
    /// With the result backend on: how long results stay in Redis.
    pub result_ttl: Option<Duration>,
    /// Overrides of every task's retry policy, then of one task's.
    pub retry: RetryOverrides,
    pub task_retry: BTreeMap<String, RetryOverrides>,
    /// How long a stopping worker lets running tasks finish.
    pub shutdown_grace: Duration,
}

/// What a worker talks to.
pub struct Services {
    pub tasks: TaskRepository,
    pub errors: ErrorLogRepository,
    pub payloads: PayloadRepository,
    /// Batched lookups of the tasks being claimed.
    pub reader: crate::store::lookup::BatchReader,
    pub writer: BatchWriter,
    pub cache: Cache,
    pub publisher: Publisher,
    pub topology: Topology,
    /// Acks and nacks go back to the consumer's thread through it.
    pub settler: Settler,
    /// Which deliveries' connection is still up.
    pub liveness: Liveness,
    /// What tasks may use (leases, checkpoints, child tasks).
    pub context: Arc<TaskContext>,
    /// Hands workflows on as their steps finish.
    pub workflows: crate::workflow::Workflows,
    /// Celery's result backend, written as a Celery worker writes it (`KOBE_CELERY_RESULTS`).
    pub celery_results: Option<crate::store::celery_results::CeleryResults>,
    /// Tells Celery's tools what this worker does (`KOBE_CELERY_EVENTS`).
    pub celery_events: Option<crate::celery::fleet::Announcer>,
}

/// Everything the delivery pipelines share.
pub struct Worker {
    registry: Registry,
    tasks: TaskRepository,
    errors: ErrorLogRepository,
    payloads: PayloadRepository,
    leases: crate::store::task_leases::LeaseRepository,
    reader: crate::store::lookup::BatchReader,
    writer: BatchWriter,
    cache: Cache,
    invalidator: Invalidator,
    publisher: Publisher,
    topology: Topology,
    settler: Settler,
    liveness: Liveness,
    context: Arc<TaskContext>,
    workflows: crate::workflow::Workflows,
    celery_results: Option<crate::store::celery_results::CeleryResults>,
    celery_events: Option<crate::celery::fleet::Announcer>,
    config: WorkerConfig,
    /// One permit per handler that may run at once.
    slots: Semaphore,
    pause: Pause,
    active: Active,
    /// Set once the worker is stopping: held deliveries give up instead of trying again.
    stopping: std::sync::atomic::AtomicBool,
    /// Its name in `Workers`, unique among the workers running (several may share a process).
    id: String,
}

impl Worker {
    pub fn new(registry: Registry, services: Services, config: WorkerConfig) -> Arc<Self> {
        Arc::new(Self {
            registry,
            leases: services.tasks.leases().clone(),
            tasks: services.tasks,
            reader: services.reader,
            errors: services.errors,
            payloads: services.payloads,
            writer: services.writer,
            invalidator: Invalidator::start(services.cache.clone()),
            cache: services.cache,
            publisher: services.publisher,
            topology: services.topology,
            settler: services.settler,
            liveness: services.liveness,
            context: services.context,
            workflows: services.workflows,
            celery_results: services.celery_results,
            celery_events: services.celery_events,
            slots: Semaphore::new(usize::from(config.concurrency.max(1))),
            config,
            pause: Pause::default(),
            active: Active::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                format!("{}/{n}", crate::config::celery_hostname())
            },
        })
    }

    /// Handles deliveries until `shutdown` resolves or they stop coming, then waits up to the
    /// grace period for the ones in hand. What does not finish in time is abandoned: its lease
    /// is let go so its redelivery starts at once, and the message returns to its queue when the
    /// caller closes the consumer.
    pub async fn run(
        self: Arc<Self>,
        mut deliveries: mpsc::UnboundedReceiver<Delivery>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut in_hand = JoinSet::new();
        let cancels = tokio::spawn(self.clone().watch_cancels());
        let _keep_leases = AbortOnDrop(tokio::spawn(self.clone().keep_leases()));
        let _collect = AbortOnDrop(tokio::spawn(self.clone().collect_leases()));
        let beat = AbortOnDrop(tokio::spawn(self.clone().beat()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                delivery = deliveries.recv() => match delivery {
                    Some(delivery) => {
                        let worker = self.clone();
                        in_hand.spawn(worker.handle(delivery));
                    }
                    None => break,
                },
                Some(_) = in_hand.join_next(), if !in_hand.is_empty() => {}
            }
        }
        self.stopping.store(true, Ordering::Release);
        let _stop_watching = AbortOnDrop(cancels);
        tracing::info!(
            in_hand = in_hand.len(),
            grace_s = self.config.shutdown_grace.as_secs_f64(),
            "stopping: no new tasks; waiting for the ones in hand"
        );
        let drained = tokio::time::timeout(self.config.shutdown_grace, async {
            while in_hand.join_next().await.is_some() {}
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("every task in hand finished"),
            Err(_) => {
                let abandoned = self.active.all();
                tracing::warn!(
                    unfinished = in_hand.len(),
                    "grace period over; unfinished tasks are not acked and return to the queue"
                );
                in_hand.abort_all();
                // All at once and bounded: a MongoDB that does not answer must not hold up the stop.
                let releases = abandoned.iter().map(|attempt| self.leases.release(attempt));
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    futures_util::future::join_all(releases),
                )
                .await
                {
                    Ok(answers) => {
                        for error in answers.into_iter().filter_map(Result::err) {
                            tracing::debug!(error = %error, "cannot release a lease; it lapses on its own");
                        }
                    }
                    Err(_) => {
                        tracing::debug!("no answer to the lease releases; they lapse on their own")
                    }
                }
            }
        }
        // Nothing runs here any more: said at once, not left to the beat's lapse.
        drop(beat);
        let gone = self.tasks.workers().gone(&self.id);
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), gone).await {
            tracing::debug!(error = %error, "cannot remove this worker's document; it lapses on its own");
        }
    }

    /// Whether a delivery may still be worked on: its connection is up and the worker is not
    /// stopping. One that may not is left unsettled: the broker hands it back.
    fn may_continue(&self, tag: crate::amqp::DeliveryTag) -> bool {
        self.liveness.is_live(tag) && !self.stopping.load(Ordering::Acquire)
    }

    /// A task name as a metric label: a name this worker does not know (anyone who can publish
    /// to the broker chooses it) is counted under one label, so labels stay bounded.
    fn task_label<'a>(&self, name: &'a str) -> &'a str {
        if self.registry.knows(name) {
            name
        } else {
            UNKNOWN_TASK_LABEL
        }
    }

    /// The task's own policy, under the deployment-wide overrides, under the task's overrides.
    fn policy(&self, task: &dyn Task) -> RetryPolicy {
        let mut policy = task.retry_policy();
        for o in [
            Some(&self.config.retry),
            self.config.task_retry.get(task.name()),
        ]
        .into_iter()
        .flatten()
        {
            policy.max_retries = o.max_retries.unwrap_or(policy.max_retries);
            policy.base_delay = o.base_delay.unwrap_or(policy.base_delay);
            policy.factor = o.factor.unwrap_or(policy.factor);
            policy.max_delay = o.max_delay.unwrap_or(policy.max_delay);
        }
        policy
    }
}

/// The metric label of every task name the registry does not know.
pub(crate) const UNKNOWN_TASK_LABEL: &str = "(unknown)";

/// How often a worker running tasks looks for cancel requests.
pub(crate) const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
