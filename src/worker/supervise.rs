//! A claimed attempt's handler, watched while the worker's lease keeper renews its lease: stopped
//! at once when another attempt took the lease, and stopped in time when the lease cannot be
//! renewed, so one attempt never runs beside another.

use std::time::Instant;

use super::carry;
use super::decision::{Disposal, Happened, Outcome};
use super::execute::Running;
use super::job::{Job, Next};
use super::Worker;
use crate::telemetry::metrics::metrics;

impl Worker {
    /// Waits for a claimed attempt's handler while the worker's lease keeper renews its lease.
    /// When the lease is lost (another attempt took the task) the handler is stopped at once;
    /// when it cannot be renewed (MongoDB does not answer) the handler is told to stop and then
    /// stopped, before the lease can lapse and another worker take the task over — one must
    /// never run beside the other. The hard time limit holds meanwhile.
    pub(super) async fn supervise(
        &self,
        job: &mut Job<'_>,
        mut running: Running,
        claimed_at: Instant,
    ) -> Next {
        let lease = self.config.lease;
        let margin = lease.mul_f64(LEASE_MARGIN);
        let (registration, mut trust) = self.active.register(
            &job.attempt,
            running.cancel(),
            claimed_at + lease.saturating_sub(margin),
        );
        let outcome = loop {
            let now = *trust.borrow_and_update();
            if now.lost {
                tracing::warn!(
                    ran_ms = running.elapsed().as_millis() as u64,
                    "lease lost to another attempt; stopping this one"
                );
                drop(running);
                drop(registration);
                carry::dispose(self, job, Disposal::Duplicate("lease_lost")).await;
                return Next::Settled;
            }
            tokio::select! {
                outcome = running.outcome() => break outcome,
                changed = trust.changed() => {
                    if changed.is_err() {
                        // Unregistered: cannot happen while we hold the registration.
                        break running.outcome().await;
                    }
                }
                () = tokio::time::sleep_until(now.until.into()) => {
                    if trust.borrow().until > Instant::now() {
                        continue;
                    }
                    tracing::error!(
                        ran_ms = running.elapsed().as_millis() as u64,
                        "cannot renew the execution lease (MongoDB does not answer); stopping the handler before another worker may take the task over"
                    );
                    // Half the margin to stop in; the rest covers clocks and the store's delay.
                    let stop_by = Instant::now() + margin / 2;
                    running.stop_for_lease();
                    let stopped = tokio::time::timeout_at(stop_by.into(), running.outcome()).await;
                    match stopped {
                        // It finished anyway: record it (under the lease, if still ours).
                        Ok(outcome @ Outcome::Success(_)) => break outcome,
                        _ => {
                            drop(running);
                            drop(registration);
                            metrics().lease_abandoned.inc();
                            // Back to the queue after the outage pause; the release is bounded,
                            // and the lease lapses by itself if MongoDB still does not answer.
                            let away = Disposal::Outage("the lease cannot be renewed".into());
                            carry::dispose(self, job, away).await;
                            return Next::Settled;
                        }
                    }
                }
            }
        };
        job.trusted_until = Some(trust.borrow().until);
        drop(registration);
        Next::Conclude(Happened::Ran(outcome))
    }
}

/// The share of the execution lease a worker does not count on: it stops a handler whose lease
/// it could not renew this long before the lease ends (for the 30 s default, 5 s: workers'
/// clocks must agree within about half of it).
pub(crate) const LEASE_MARGIN: f64 = 1.0 / 6.0;
