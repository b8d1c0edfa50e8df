//! Periodic tasks: one replica at a time fires the schedules.
//!
//! Every `kobe serve` (and `kobe beat`) with schedules runs a [`Beat`]. The replica holding the
//! `beat` lease in MongoDB ([`LeaderRepository`]) fires; the others keep trying to take the lease,
//! and one does once the leader stops renewing it (a stopping leader lets it go at once). A firing
//! is an ordinary submission whose task id is the slot's (`schedule:<name>:<ms>`), through
//! [`Submitter::submit_child`]: a slot submitted twice — by two leaders for a moment, or again
//! after a failed publish — is one task, published once. Where each schedule got to is kept in
//! `ScheduleState`, so a new leader goes on from there: slots missed meanwhile follow the
//! schedule's policy ([`Missed`]). A schedule may start a workflow instead of a task: the slot
//! fixes the workflow's id, so a slot fired twice is one workflow.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use crate::domain::schedule::{Missed, Schedule};
use crate::domain::{epoch_millis, TaskId};
use crate::store::LeaderRepository;
use crate::submit::{NewTask, Submitter};
use crate::telemetry::metrics::metrics;

/// The role the schedules' leader holds.
pub(crate) const ROLE: &str = "beat";

/// How often the leader looks for due slots.
const TICK: Duration = Duration::from_millis(250);

/// A slot no older than this is on time (for [`Missed::Skip`]).
const ON_TIME: Duration = Duration::from_secs(2);

/// Slots looked at past the last one fired (a minutely cron after a long downtime).
const SLOT_SCAN: usize = 100_000;

/// The schedules and what firing them needs.
pub struct Beat {
    pub schedules: Vec<Schedule>,
    pub submitter: Submitter,
    pub leaders: LeaderRepository,
    /// This replica's name in the lease (host, process, a random part).
    pub holder: String,
    /// How long the lease holds without renewal; renewed every fifth of it.
    pub lease: Duration,
    /// What the schedules that start workflows need; `None` when none does.
    pub workflows: Option<ScheduledWorkflows>,
}

/// The workflows schedules start: the service, and each schedule's workflow as checked at
/// start-up; a firing starts a copy of it under the slot's id.
pub struct ScheduledWorkflows {
    pub service: crate::workflow::Workflows,
    /// Checks schedule `name`'s workflow for one firing, keyed by the firing's id: checked anew
    /// each time, so its steps' countdowns and expiries count from the firing, not from
    /// start-up (they were checked once then too, so a bad one stops start-up).
    #[allow(clippy::type_complexity)]
    pub check: Box<dyn Fn(&str, &str) -> Result<crate::workflow::Checked, String> + Send + Sync>,
}

/// A name for this replica in the lease.
pub(crate) fn holder_name() -> String {
    let host = crate::config::host_name().unwrap_or_else(|| "host".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}

/// Where `schedule`'s firings go: its own `queue`, else its task's route (a workflow's steps
/// each go to their own).
pub fn route(schedule: &Schedule, topology: &crate::amqp::Topology) -> String {
    if schedule.workflow.is_some() {
        return "(each step's)".into();
    }
    schedule
        .route
        .clone()
        .unwrap_or_else(|| topology.route_of(&schedule.task).to_owned())
}

impl Beat {
    /// Runs until `shutdown` resolves; lets the lease go if it holds it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let renew_every = self.lease / 5;
        // Until when this replica may fire: the lease as of the last successful renewal, minus
        // a margin for clocks and the time the renewal took.
        let mut held_until: Option<tokio::time::Instant> = None;
        let mut next_renewal = tokio::time::Instant::now();
        let mut reached: HashMap<String, i64> = HashMap::new();
        tracing::info!(holder = %self.holder, schedules = self.schedules.len(), "schedules loaded; competing for the lead");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(TICK) => {}
            }
            if tokio::time::Instant::now() >= next_renewal {
                let asked = tokio::time::Instant::now();
                next_renewal = asked + renew_every;
                match self.leaders.hold(ROLE, &self.holder, self.lease).await {
                    Ok(true) => {
                        if held_until.is_none() {
                            tracing::info!(holder = %self.holder, "this replica now fires the schedules");
                            // Another leader may have moved on meanwhile: read where from.
                            reached.clear();
                        }
                        held_until = Some(asked + self.lease - self.lease / 5);
                    }
                    Ok(false) => {
                        if held_until.take().is_some() {
                            tracing::warn!("another replica took the schedules' lead");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "cannot renew the schedules' lead");
                    }
                }
                metrics()
                    .schedule_leader
                    .set(i64::from(held_until.is_some()));
            }
            match held_until {
                Some(until) if tokio::time::Instant::now() < until => {}
                Some(_) => {
                    tracing::warn!(
                        "the schedules' lease ran out before it could be renewed; not firing"
                    );
                    held_until = None;
                    metrics().schedule_leader.set(0);
                    continue;
                }
                None => continue,
            }
            for schedule in &self.schedules {
                self.fire_due(schedule, &mut reached).await;
            }
        }
        if held_until.is_some() {
            let _ = self.leaders.release(ROLE, &self.holder).await;
            metrics().schedule_leader.set(0);
            tracing::info!("stopping: the schedules' lead is let go");
        }
    }

    /// Submits the firing at `slot`: its task, or its workflow (started under an id the slot
    /// fixes); returns that id.
    async fn submit_slot(&self, schedule: &Schedule, slot: i64) -> Result<String, String> {
        let id = schedule.task_id(slot);
        if schedule.workflow.is_some() {
            let workflows = self
                .workflows
                .as_ref()
                .ok_or("its workflow was not checked at start-up")?;
            // The slot's id is the start's key: a slot fired twice is one workflow.
            let checked = (workflows.check)(&schedule.name, &id)?;
            let service = &workflows.service;
            let workflow_id = checked.id.clone();
            service.start(checked).await.map_err(|e| e.to_string())?;
            return Ok(workflow_id);
        }
        let parsed = TaskId::parse(&id).map_err(|_| format!("`{id}` is not a valid task id"))?;
        let route = route(schedule, self.submitter.topology());
        let mut task = NewTask::new(parsed, &schedule.task, &route);
        task.kwargs = schedule.kwargs.clone();
        self.submitter
            .submit_child(task)
            .await
            .map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Fires `schedule`'s latest due slot, if any, by its missed-slot policy.
    async fn fire_due(&self, schedule: &Schedule, reached: &mut HashMap<String, i64>) {
        let now = epoch_millis();
        let after = match reached.get(&schedule.name) {
            Some(slot) => *slot,
            None => match self.leaders.last_slot(&schedule.name).await {
                Ok(Some(slot)) => slot,
                Ok(None) => {
                    // Never fired anywhere: start counting from now.
                    if self
                        .leaders
                        .record_slot(&schedule.name, now, None)
                        .await
                        .is_ok()
                    {
                        reached.insert(schedule.name.clone(), now);
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(schedule = %schedule.name, error = %error, "cannot read where the schedule got to");
                    return;
                }
            },
        };
        reached.insert(schedule.name.clone(), after);
        let Some((slot, skipped)) = schedule.latest_due(after, now, SLOT_SCAN) else {
            return;
        };
        let late = Duration::from_millis(u64::try_from(now - slot).unwrap_or(0));
        let fire = match schedule.missed {
            Missed::CatchUpOne => true,
            Missed::Skip => late <= ON_TIME,
        };
        let count = |outcome: &str, n: u64| {
            metrics()
                .schedule_firings
                .with_label_values(&[schedule.name.as_str(), outcome])
                .inc_by(n);
        };
        if skipped > 0 || !fire {
            let missed = skipped + usize::from(!fire);
            tracing::warn!(schedule = %schedule.name, missed, policy = ?schedule.missed, "slots passed while no replica fired them; not fired");
            count("missed", missed as u64);
        }
        let mut task_id = None;
        if fire {
            let id = match self.submit_slot(schedule, slot).await {
                Ok(id) => id,
                Err(error) => {
                    // Not recorded as reached: the next tick submits the same id again.
                    tracing::warn!(schedule = %schedule.name, slot, error = %error, "cannot submit the schedule's firing; trying again");
                    count("failed", 1);
                    return;
                }
            };
            tracing::info!(schedule = %schedule.name, id = %id, late_ms = late.as_millis() as u64, "schedule fired");
            count("fired", 1);
            task_id = Some(id);
        }
        match self
            .leaders
            .record_slot(&schedule.name, slot, task_id.as_deref())
            .await
        {
            Ok(()) => {
                reached.insert(schedule.name.clone(), slot);
            }
            // The task exists under its slot's id: firing it again is harmless.
            Err(error) => {
                tracing::warn!(schedule = %schedule.name, error = %error, "cannot record the slot fired")
            }
        }
    }
}
