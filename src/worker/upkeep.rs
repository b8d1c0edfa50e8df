//! The attempts running in this worker, and the upkeep they need while they run: one renewal
//! command a tick for all their leases, one query a second for operators' cancel requests, and
//! an hourly collection of leases no late copy can need any more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Worker, CANCEL_POLL};
use crate::store::attempts::Attempt;
use crate::store::task_leases::lease_id;

impl Worker {
    /// Tells running handlers whose task an operator cancelled: one query every
    /// [`CANCEL_POLL`] for all of this worker's running attempts, none while nothing runs.
    pub(super) async fn watch_cancels(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CANCEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let running = self.active.running();
            if running.is_empty() {
                continue;
            }
            let sent = std::time::Instant::now();
            let asked = self.leases.cancel_requests(&running).await;
            // The worker counts its own commands (see `store::Monitoring::Own`).
            note_command("find", sent, asked.is_err());
            match asked {
                Ok(tokens) => tokens.iter().for_each(|token| self.active.cancel(token)),
                Err(error) => tracing::debug!(error = %error, "cannot look for cancel requests"),
            }
        }
    }

    /// Renews the leases of every attempt running here, in one command a tick (every third of
    /// the lease; sooner after a failed renewal). Each attempt trusts its lease until
    /// [`LEASE_MARGIN`](super::supervise::LEASE_MARGIN) of it is left from the last renewal *sent* that held it; an
    /// attempt whose lease another took is told at once.
    pub(super) async fn keep_leases(self: Arc<Self>) {
        let lease = self.config.lease;
        let every = lease / 3;
        let margin = lease.mul_f64(super::supervise::LEASE_MARGIN);
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            wait = every;
            let held = self.active.held();
            if held.is_empty() {
                continue;
            }
            let sent = std::time::Instant::now();
            let renewed = tokio::time::timeout(every, self.leases.renew(&held, lease)).await;
            note_command("update", sent, !matches!(renewed, Ok(Ok(_))));
            match renewed {
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

    /// Says what runs here, every [`BEAT`](crate::store::workers::BEAT) and soon after a change:
    /// one small write, so
    /// "what is running now" is read from the workers' own lists, exactly and without a scan.
    pub(super) async fn beat(self: Arc<Self>) {
        use crate::store::workers::{WorkerBeat, BEAT};
        let started_at = mongodb::bson::DateTime::now();
        let host = crate::config::host_name().unwrap_or_else(|| "unknown".into());
        loop {
            // Every BEAT, and soon after an attempt starts or ends — at most every
            // BEAT_SPACING, so a busy worker writes a few times a second, not once per task.
            let _ = tokio::time::timeout(BEAT, self.active.1.notified()).await;
            let beat = WorkerBeat {
                id: self.id.clone(),
                host: host.clone(),
                pid: std::process::id(),
                concurrency: self.config.concurrency,
                running: self
                    .active
                    .held()
                    .into_iter()
                    .map(|(lease, _)| lease)
                    .collect(),
            };
            let sent = std::time::Instant::now();
            let beaten = self.tasks.workers().beat(&beat, started_at).await;
            crate::store::note_command(
                "update",
                crate::store::workers::COLLECTION,
                sent.elapsed(),
                beaten.is_err(),
            );
            if let Err(error) = beaten {
                tracing::debug!(error = %error, "cannot say what runs here; trying at the next beat");
            }
            tokio::time::sleep(crate::store::workers::BEAT_SPACING).await;
        }
    }

    /// Removes leases no late copy can need any more (every worker does, about hourly: a scan of
    /// a narrow collection).
    pub(super) async fn collect_leases(self: Arc<Self>) {
        let every = Duration::from_secs(3600);
        loop {
            tokio::time::sleep(every.mul_f64(0.5 + fastrand::f64())).await;
            match self.leases.collect().await {
                Ok(n) => tracing::debug!(removed = n, "collected old leases"),
                Err(error) => tracing::debug!(error = %error, "cannot collect old leases"),
            }
        }
    }
}

/// How far a running attempt may trust its lease.
#[derive(Debug, Clone, Copy)]
pub(super) struct Trust {
    /// The handler must be stopped by then unless a renewal extends it.
    pub(super) until: std::time::Instant,
    /// Another attempt holds the lease now.
    pub(super) lost: bool,
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
pub(super) struct Active(
    Mutex<HashMap<String, RunningAttempt>>,
    /// Told when an attempt starts or ends, so the worker's beat says so soon.
    tokio::sync::Notify,
);

impl Active {
    pub(super) fn register(
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
        self.1.notify_one();
        let registration = Registration {
            active: self,
            token: attempt.token.clone(),
        };
        (registration, trusted)
    }

    pub(super) fn all(&self) -> Vec<Attempt> {
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
    pub(super) fn held(&self) -> Vec<(String, String)> {
        self.pairs(|_| true)
    }

    /// (lease id, attempt token) of each running attempt not yet told to stop.
    pub(super) fn running(&self) -> Vec<(String, String)> {
        self.pairs(|r| !*r.cancel.borrow())
    }

    /// After a renewal of `sent` (lease id, token): those in `kept` trust their lease until
    /// `until`, the others lost it.
    pub(super) fn renewed(
        &self,
        sent: &[(String, String)],
        kept: &[String],
        until: std::time::Instant,
    ) {
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
    pub(super) fn cancel(&self, token: &str) {
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
pub(super) struct Registration<'a> {
    active: &'a Active,
    token: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if let Ok(mut active) = self.active.0.lock() {
            active.remove(&self.token);
        }
        self.active.1.notify_one();
    }
}

/// Counts a command of the lease keeper or the cancel watch on `TaskLeases`.
fn note_command(command: &str, sent: std::time::Instant, failed: bool) {
    crate::store::note_command(
        command,
        crate::store::task_leases::COLLECTION,
        sent.elapsed(),
        failed,
    );
}
