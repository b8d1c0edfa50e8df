//! `kobe init-db`: create MongoDB collections and indexes from `migrations/`.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;

use crate::config::Settings;
use crate::store::migrations::{self, Change, Progress};

/// Applies the migrations and prints one line per collection and index as it goes, so a long
/// index build shows what it is waiting for. Fails (non-zero exit) when an index exists with
/// another definition.
pub async fn run(settings: &Settings) -> anyhow::Result<super::Ended> {
    let db = super::database(settings).await?;
    let mut building = Instant::now();
    let composite = migrations::composite(&db, settings.mongo.index_type).await?;
    println!(
        "indexes: {}",
        if composite {
            "DocumentDB's composite type (enableCompositeTerm)"
        } else {
            "the engine's default type"
        }
    );
    let outcomes = migrations::apply_with(&db, composite, |progress| {
        match progress {
            Progress::Building {
                collection,
                indexes,
            } => {
                building = Instant::now();
                println!(
                    "building {} index(es) of {collection}: {} …",
                    indexes.len(),
                    indexes.join(", ")
                );
            }
            Progress::Done(outcome)
                if outcome.change == Change::Created && outcome.index.is_some() =>
            {
                println!("{outcome} ({:.2} s)", building.elapsed().as_secs_f64());
            }
            Progress::Done(outcome) => println!("{outcome}"),
        }
        // Progress must reach a terminal or a log collector line by line, not at exit.
        let _ = std::io::stdout().flush();
    })
    .await
    .with_context(|| {
        format!(
            "failed to apply migrations to {} at {}",
            settings.mongo.db, settings.mongo.uri
        )
    })?;
    let count = |wanted: fn(&Change) -> bool| outcomes.iter().filter(|o| wanted(&o.change)).count();
    let created = count(|c| *c == Change::Created);
    let conflicts = count(|c| matches!(c, Change::Conflict(_)));
    println!(
        "database {}: {created} created, {} already present, {conflicts} conflicts",
        settings.mongo.db,
        outcomes.len() - created - conflicts
    );
    anyhow::ensure!(
        conflicts == 0,
        "{conflicts} index(es) exist with another definition; drop them or fix migrations/"
    );
    Ok(super::Ended::Done)
}
