//! The execution core: what a worker does with each delivery.
//!
//! | module | owns |
//! |---|---|
//! | `pipeline` | one delivery's life up to its outcome: checks, the execution lease, running |
//! | `settle` | from the outcome to the settled message: record, publish the retry or dead letter, ack |
//! | [`decision`] | the one function that decides what each outcome means (record, retry, dead-letter) |
//! | [`execute`] | running a handler under its time limits, panics caught |
//! | [`spawner`] | child tasks submitted by running tasks |
//!
//! Its promises: a task runs as one live attempt at a time (the execution lease in `TaskLeases`); a
//! message is settled only after its outcome is recorded; every store write goes through the
//! group-commit writer ([`crate::store::batch`]), so concurrent tasks share MongoDB commands; a
//! panic anywhere in handling a delivery still settles it.
//!
//! `commands::worker` builds a [`Worker`] from settings; tests build one the same way.

pub mod decision;
pub mod execute;
mod pipeline;
mod settle;
pub mod spawner;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::amqp::consumer::{Liveness, Settler};
use crate::amqp::{Delivery, Publisher, Topology};
use crate::config::RetryOverrides;
use crate::store::attempts::Attempt;
use crate::store::batch::BatchWriter;
use crate::store::cache::Invalidator;
use crate::store::task_leases::lease_id;
use crate::store::{Cache, ErrorLogRepository, PayloadRepository, TaskRepository};
use crate::tasks::{Registry, RetryPolicy, Task, TaskContext};

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
    config: WorkerConfig,
    /// One permit per handler that may run at once.
    slots: Semaphore,
    pause: Pause,
    active: Active,
    /// Set once the worker is stopping: held deliveries give up instead of trying again.
    stopping: std::sync::atomic::AtomicBool,
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
            slots: Semaphore::new(usize::from(config.concurrency.max(1))),
            config,
            pause: Pause::default(),
            active: Active::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
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
    }

    /// Tells running handlers whose task an operator cancelled: one query every
    /// [`CANCEL_POLL`] for all of this worker's running attempts, none while nothing runs.
    async fn watch_cancels(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CANCEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let running = self.active.running();
            if running.is_empty() {
                continue;
            }
            match self.leases.cancel_requests(&running).await {
                Ok(tokens) => tokens.iter().for_each(|token| self.active.cancel(token)),
                Err(error) => tracing::debug!(error = %error, "cannot look for cancel requests"),
            }
        }
    }

    /// Renews the leases of every attempt running here, in one command a tick (every third of
    /// the lease; sooner after a failed renewal). Each attempt trusts its lease until
    /// [`pipeline::LEASE_MARGIN`] of it is left from the last renewal *sent* that held it; an
    /// attempt whose lease another took is told at once.
    async fn keep_leases(self: Arc<Self>) {
        let lease = self.config.lease;
        let every = lease / 3;
        let margin = lease.mul_f64(pipeline::LEASE_MARGIN);
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            wait = every;
            let held = self.active.held();
            if held.is_empty() {
                continue;
            }
            let sent = std::time::Instant::now();
            match tokio::time::timeout(every, self.leases.renew(&held, lease)).await {
                Ok(Ok(tokens)) => {
                    let m = crate::telemetry::metrics::metrics();
                    m.lease_renewals.inc();
                    m.leases_renewed.inc_by(tokens.len() as u64);
                    self.active
                        .renewed(&held, &tokens, sent + lease.saturating_sub(margin));
                    self.pause.recovered();
                }
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, running = held.len(), "cannot renew the leases; trying again");
                    wait = every / 4;
                }
                Err(_) => {
                    tracing::warn!(
                        bound_ms = every.as_millis() as u64,
                        running = held.len(),
                        "the lease renewal got no answer in time; trying again"
                    );
                    wait = every / 4;
                }
            }
        }
    }

    /// Removes leases no late copy can need any more (every worker does, about hourly: a scan of
    /// a narrow collection).
    async fn collect_leases(self: Arc<Self>) {
        let every = Duration::from_secs(3600);
        loop {
            tokio::time::sleep(every.mul_f64(0.5 + fastrand::f64())).await;
            match self.leases.collect().await {
                Ok(n) => tracing::debug!(removed = n, "collected old leases"),
                Err(error) => tracing::debug!(error = %error, "cannot collect old leases"),
            }
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

/// Pauses before trying again: per delivery a growing sequence, and across deliveries a pause
/// that grows while MongoDB keeps failing, so an outage is not a redelivery storm.
#[derive(Default)]
struct Pause {
    /// Consecutive outage pauses handed out; reset by [`Pause::recovered`].
    outages: AtomicU32,
}

impl Pause {
    const FIRST: Duration = Duration::from_millis(250);
    const MOST: Duration = Duration::from_secs(15);

    fn sequence(&self) -> Pauses {
        Pauses(Self::FIRST)
    }

    /// The pause before handing a message back during an outage: 1 s, doubling while the
    /// outage lasts, up to 15 s.
    fn after_outage(&self) -> Duration {
        let n = self.outages.fetch_add(1, Ordering::Relaxed).min(4);
        (Duration::from_secs(1) * 2u32.pow(n)).min(Self::MOST)
    }

    /// MongoDB answered again: the next outage starts from the shortest pause.
    fn recovered(&self) {
        if self.outages.load(Ordering::Relaxed) != 0 {
            self.outages.store(0, Ordering::Relaxed);
        }
    }
}

/// Growing pauses: 250 ms, 500 ms, 1 s … up to 15 s.
struct Pauses(Duration);

impl Pauses {
    fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Pause::MOST);
        pause
    }
}

/// The metric label of every task name the registry does not know.
pub const UNKNOWN_TASK_LABEL: &str = "(unknown)";

/// How often a worker running tasks looks for cancel requests.
pub const CANCEL_POLL: Duration = Duration::from_secs(1);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How far a running attempt may trust its lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trust {
    /// The handler must be stopped by then unless a renewal extends it.
    pub until: std::time::Instant,
    /// Another attempt holds the lease now.
    pub lost: bool,
}

struct RunningAttempt {
    attempt: Attempt,
    cancel: tokio::sync::watch::Sender<bool>,
    trust: tokio::sync::watch::Sender<Trust>,
}

/// Attempts running now (by attempt token), with the switch that asks each handler to stop and
/// the trust in its lease: the lease keeper renews them together, a stopping worker lets them
/// go, and the cancel watch tells them of a cancel.
#[derive(Default)]
struct Active(Mutex<HashMap<String, RunningAttempt>>);

impl Active {
    fn register(
        &self,
        attempt: &Attempt,
        cancel: tokio::sync::watch::Sender<bool>,
        trusted_until: std::time::Instant,
    ) -> (Registration<'_>, tokio::sync::watch::Receiver<Trust>) {
        let (trust, trusted) = tokio::sync::watch::channel(Trust {
            until: trusted_until,
            lost: false,
        });
        if let Ok(mut active) = self.0.lock() {
            active.insert(
                attempt.token.clone(),
                RunningAttempt {
                    attempt: attempt.clone(),
                    cancel,
                    trust,
                },
            );
        }
        let registration = Registration {
            active: self,
            token: attempt.token.clone(),
        };
        (registration, trusted)
    }

    fn all(&self) -> Vec<Attempt> {
        self.0
            .lock()
            .map(|active| active.values().map(|r| r.attempt.clone()).collect())
            .unwrap_or_default()
    }

    fn pairs(&self, keep: impl Fn(&RunningAttempt) -> bool) -> Vec<(String, String)> {
        self.0
            .lock()
            .map(|active| {
                active
                    .values()
                    .filter(|r| keep(r))
                    .map(|r| {
                        let a = &r.attempt;
                        (lease_id(&a.task_id, a.retries), a.token.clone())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (lease id, attempt token) of each running attempt.
    fn held(&self) -> Vec<(String, String)> {
        self.pairs(|_| true)
    }

    /// (lease id, attempt token) of each running attempt not yet told to stop.
    fn running(&self) -> Vec<(String, String)> {
        self.pairs(|r| !*r.cancel.borrow())
    }

    /// After a renewal of `sent` (lease id, token): those in `kept` trust their lease until
    /// `until`, the others lost it.
    fn renewed(&self, sent: &[(String, String)], kept: &[String], until: std::time::Instant) {
        let Ok(active) = self.0.lock() else { return };
        for (_, token) in sent {
            let Some(running) = active.get(token) else {
                continue;
            };
            let lost = !kept.contains(token);
            running.trust.send_modify(|trust| {
                if lost {
                    trust.lost = true;
                } else if until > trust.until {
                    trust.until = until;
                }
            });
        }
    }

    /// Asks the attempt holding `token` to stop.
    fn cancel(&self, token: &str) {
        let Ok(active) = self.0.lock() else { return };
        if let Some(running) = active.get(token) {
            if !running.cancel.send_replace(true) {
                tracing::info!(task_id = %running.attempt.task_id, task = %running.attempt.task_name, "task cancelled by an operator; its handler is told to stop");
                crate::telemetry::metrics::metrics()
                    .task_operations
                    .with_label_values(&["cancel", "signalled"])
                    .inc();
            }
        }
    }
}

/// Removes its attempt from [`Active`] when dropped.
struct Registration<'a> {
    active: &'a Active,
    token: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut active) = self.active.0.lock() {
            active.remove(&self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_are_capped() {
        let pause = Pause::default();
        let mut sequence = pause.sequence();
        let taken: Vec<Duration> = (0..8).map(|_| sequence.next()).collect();
        assert_eq!(taken[0], Duration::from_millis(250));
        assert!(taken.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*taken.last().unwrap(), Pause::MOST);
        let outages: Vec<Duration> = (0..8).map(|_| pause.after_outage()).collect();
        assert_eq!(outages[0], Duration::from_secs(1));
        assert_eq!(*outages.last().unwrap(), Pause::MOST);
    }
}
