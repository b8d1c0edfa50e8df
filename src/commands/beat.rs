//! `kobe beat`: the periodic tasks, fired by whichever replica leads (see `crate::beat`).

use crate::beat::Beat;
use crate::config::Settings;
use crate::store::LeaderRepository;
use crate::tasks::Registry;

/// The schedules' firing loop for `serve` and `beat`, under the name `holder`; `None` without
/// schedules.
pub fn beat(
    settings: &Settings,
    registry: &Registry,
    submitter: crate::submit::Submitter,
    db: &mongodb::Database,
    holder: String,
) -> Option<Beat> {
    if registry.schedules().is_empty() {
        return None;
    }
    Some(Beat {
        schedules: registry.schedules().to_vec(),
        submitter,
        leaders: LeaderRepository::new(db),
        holder,
        lease: settings.beat.lease,
    })
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(settings: Settings, registry: Registry) -> anyhow::Result<super::Ended> {
    let db = super::database(&settings).await?;
    let cache = super::cache(&settings)?;
    let publisher = super::publisher(&settings)?;
    let writer = super::writer(&settings, &db);
    let submitter = super::submitter(&settings, &db, cache, publisher, writer);
    let holder = crate::beat::holder_name();
    let Some(beat) = beat(&settings, &registry, submitter, &db, holder) else {
        anyhow::bail!("no schedules: declare [[schedule]] tables in KOBE_TASKS_FILE");
    };
    beat.run(crate::shutdown::signal()).await;
    Ok(super::Ended::Done)
}
