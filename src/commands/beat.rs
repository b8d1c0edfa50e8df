//! `kobe beat`: the periodic tasks, fired by whichever replica leads (see `crate::beat`).

use std::collections::HashMap;

use crate::beat::{Beat, ScheduledWorkflows};
use crate::config::Settings;
use crate::http::ApiError;
use crate::store::{LeaderRepository, PayloadRepository};
use crate::tasks::Registry;

/// The schedules' firing loop for `serve` and `beat`, under the name `holder`; `None` without
/// schedules. A schedule's workflow is checked here, as `POST /workflow/start` checks one: a
/// bad step stops start-up, naming the schedule and the step's path.
pub fn beat(
    settings: &Settings,
    registry: &Registry,
    submitter: crate::submit::Submitter,
    db: &mongodb::Database,
    holder: String,
) -> anyhow::Result<Option<Beat>> {
    if registry.schedules().is_empty() {
        return Ok(None);
    }
    let mut checked = HashMap::new();
    for schedule in registry.schedules() {
        let Some(body) = &schedule.workflow else {
            continue;
        };
        let trace = crate::telemetry::trace::TraceContext::new_root();
        let workflow = crate::http::routes::workflow::check(
            registry,
            submitter.topology(),
            body,
            Some(&schedule.name),
            &trace,
        )
        .map_err(|error| match error {
            ApiError::Validation { field, reason } => {
                anyhow::anyhow!("schedule `{}`: {field}: {reason}", schedule.name)
            }
            other => anyhow::anyhow!("schedule `{}`: {other}", schedule.name),
        })?;
        checked.insert(schedule.name.clone(), workflow);
    }
    let workflows = (!checked.is_empty()).then(|| ScheduledWorkflows {
        service: crate::workflow::Workflows::new(db, PayloadRepository::new(db), submitter.clone()),
        checked,
    });
    Ok(Some(Beat {
        schedules: registry.schedules().to_vec(),
        submitter,
        leaders: LeaderRepository::new(db),
        holder,
        lease: settings.beat.lease,
        workflows,
    }))
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(settings: Settings, registry: Registry) -> anyhow::Result<super::Ended> {
    let db = super::database(&settings).await?;
    let cache = super::cache(&settings)?;
    let publisher = super::publisher(&settings)?;
    let writer = super::writer(&settings, &db);
    let submitter = super::submitter(&settings, &db, cache, publisher, writer);
    let holder = crate::beat::holder_name();
    let Some(beat) = beat(&settings, &registry, submitter, &db, holder)? else {
        anyhow::bail!("no schedules: declare [[schedule]] tables in KOBE_TASKS_FILE");
    };
    beat.run(crate::shutdown::signal()).await;
    Ok(super::Ended::Done)
}
