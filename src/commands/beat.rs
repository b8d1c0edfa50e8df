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
    let bodies: HashMap<String, serde_json::Map<String, serde_json::Value>> = registry
        .schedules()
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.workflow.clone()?)))
        .collect();
    let (registry_of_check, topology) = (registry.clone(), submitter.topology().clone());
    let check = move |name: &str, key: &str| {
        let body = bodies
            .get(name)
            .ok_or_else(|| format!("schedule `{name}` has no workflow"))?;
        let trace = crate::telemetry::trace::TraceContext::new_root();
        crate::http::routes::workflow::check(&registry_of_check, &topology, body, Some(key), &trace)
            .map_err(|error| match error {
                ApiError::Validation { field, reason } => {
                    format!("schedule `{name}`: {field}: {reason}")
                }
                other => format!("schedule `{name}`: {other}"),
            })
    };
    // Each is checked now, so a bad one stops start-up, and again at each firing.
    let mut any = false;
    for schedule in registry.schedules().iter().filter(|s| s.workflow.is_some()) {
        check(&schedule.name, &schedule.name).map_err(anyhow::Error::msg)?;
        any = true;
    }
    let workflows = any.then(|| ScheduledWorkflows {
        service: crate::workflow::Workflows::new(db, PayloadRepository::new(db), submitter.clone()),
        check: Box::new(check),
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
