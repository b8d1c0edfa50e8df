//! `kobe workflow start|show|cancel`: what the workflow routes do, from a shell. A start is
//! checked exactly as `POST /workflow/start` checks it.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

use super::operations::{connected_submitter, operator};
use super::Ended;
use crate::config::Settings;
use crate::store::PayloadRepository;
use crate::tasks::Registry;
use crate::workflow::Workflows;

/// `kobe workflow start FILE|-`: prints `{"workflow_id": …}` once the workflow is recorded and
/// its first steps are confirmed; a bad step is refused (exit 1) naming its path.
pub async fn start(
    settings: &Settings,
    registry: &Registry,
    file: &Path,
    key: Option<&str>,
) -> anyhow::Result<Ended> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
    }
    let body: Map<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON object", file.display()))?;
    let trace = crate::telemetry::trace::TraceContext::new_root();
    let topology = super::topology(settings);
    let checked =
        match crate::http::routes::workflow::check(registry, &topology, &body, key, &trace) {
            Ok(checked) => checked,
            Err(error) => {
                let problem = error.problem();
                eprintln!("kobe: {}", serde_json::to_string(&problem)?);
                return Ok(Ended::Refused);
            }
        };
    let (db, _, submitter) = connected_submitter(settings).await?;
    let workflows = Workflows::new(&db, PayloadRepository::new(&db), submitter.clone());
    let id = checked.id.clone();
    workflows
        .start(checked)
        .await
        .context("the workflow is not started yet (with --key, run it again to finish)")?;
    println!("{}", serde_json::json!({"workflow_id": id}));
    submitter.finish().await;
    Ok(Ended::Done)
}

/// `kobe workflow show ID`: the workflow and each step, as JSON.
pub async fn show(settings: &Settings, id: &str) -> anyhow::Result<Ended> {
    let (db, _, submitter) = connected_submitter(settings).await?;
    let workflows = Workflows::new(&db, PayloadRepository::new(&db), submitter);
    match workflows
        .show(id)
        .await
        .context("cannot read the workflow")?
    {
        Some(view) => {
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(Ended::Done)
        }
        None => {
            eprintln!("kobe: no workflow with id `{id}`");
            Ok(Ended::Refused)
        }
    }
}

/// `kobe workflow cancel ID`.
pub async fn cancel(settings: &Settings, id: &str) -> anyhow::Result<Ended> {
    let (db, cache, submitter) = connected_submitter(settings).await?;
    let workflows = Workflows::new(&db, PayloadRepository::new(&db), submitter);
    let tasks = crate::store::TaskRepository::new(&db);
    match crate::operate::cancel::workflow(&workflows, &tasks, &cache, id, &operator())
        .await
        .context("failed to cancel the workflow")?
    {
        Some((state, cancelled)) => {
            println!("{state}  {id}  ({cancelled} step task(s) revoked or asked to stop)");
            Ok(Ended::Done)
        }
        None => {
            eprintln!("kobe: no workflow with id `{id}`");
            Ok(Ended::Refused)
        }
    }
}
