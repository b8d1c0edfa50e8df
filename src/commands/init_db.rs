//! `kobe init-db`: create MongoDB collections and indexes from `migrations/`.

use anyhow::Context;

use crate::config::Settings;
use crate::store::migrations;

/// Applies the migrations and prints one line per collection and index. Fails (non-zero exit)
/// when an index exists with another definition.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let db = super::database(settings).await?;
    let outcomes = migrations::apply(&db).await.with_context(|| {
        format!(
            "failed to apply migrations to {} at {}",
            settings.mongodb_db, settings.mongodb_uri
        )
    })?;
    let mut conflicts = 0;
    for outcome in &outcomes {
        if matches!(outcome.change, migrations::Change::Conflict(_)) {
            conflicts += 1;
        }
        println!("{outcome}");
    }
    let created = outcomes
        .iter()
        .filter(|o| o.change == migrations::Change::Created)
        .count();
    println!(
        "database {}: {created} created, {} already present, {conflicts} conflicts",
        settings.mongodb_db,
        outcomes.len() - created - conflicts
    );
    anyhow::ensure!(
        conflicts == 0,
        "{conflicts} index(es) exist with another definition; drop them or fix migrations/"
    );
    Ok(())
}
