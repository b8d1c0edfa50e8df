//! An operator's commands: `kobe task list/show/retry/cancel` and `kobe dlq list/show/replay/purge`.

use anyhow::Context;

use super::Ended;
use crate::cli::{DlqCommand, LetterFilter};
use crate::config::Settings;
use crate::operate::dead_letters::{LetterSummary, ReplayOutcome, Selection};
use crate::operate::Operations;

/// Who asked, for the task's history and the log: the operating-system user.
pub fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn selection(filter: LetterFilter, task_ids: Vec<String>) -> Selection {
    Selection {
        task_ids,
        task_name: filter.task_name,
        reason: filter.reason,
        older_than: filter.older_than,
    }
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(|ms| {
        mongodb::bson::DateTime::from_millis(ms)
            .try_to_rfc3339_string()
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

fn row(letter: &LetterSummary) -> String {
    format!(
        "{:<36}  {:<20}  {:>8}  {:<24}  {}",
        letter.task_id.as_deref().unwrap_or("-"),
        letter.task_name.as_deref().unwrap_or("-"),
        letter.attempts.map_or("-".into(), |n| n.to_string()),
        when(letter.dead_lettered_at),
        letter.reason
    )
}

/// The clients an operator's command needs, with the publisher connected (or given up on).
pub async fn operations(settings: &Settings) -> anyhow::Result<Operations> {
    let (db, cache, submitter) = connected_submitter(settings).await?;
    Ok(super::operations(
        settings,
        &db,
        submitter,
        cache,
        Vec::new(),
    ))
}

/// A command's submitter, its publisher connected (or given up on), with the database and cache
/// it writes to.
pub(super) async fn connected_submitter(
    settings: &Settings,
) -> anyhow::Result<(
    mongodb::Database,
    crate::store::Cache,
    crate::submit::Submitter,
)> {
    let db = super::database(settings).await?;
    let cache = super::cache(settings)?;
    let publisher = super::publisher(settings)?;
    // The publisher connects in the background; a replay right away would find it not yet there.
    let deadline = std::time::Instant::now()
        + settings
            .dependency_timeout
            .max(std::time::Duration::from_secs(5));
    while publisher.connected().is_err() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let writer = super::writer(settings, &db);
    let submitter = super::submitter(settings, &db, cache.clone(), publisher, writer);
    Ok((db, cache, submitter))
}

/// `kobe task retry ID`; `Ok(Ended::Refused)` when the task was not retried (exit 1).
pub async fn retry(settings: &Settings, id: &str) -> anyhow::Result<Ended> {
    use crate::operate::rerun::Rerun;
    let ops = operations(settings).await?;
    let answer = ops
        .rerun(id, &operator())
        .await
        .context("failed to reopen the task")?;
    Ok(match answer {
        Rerun::Published(task) => {
            println!("retried  {id}  (attempt {})", task.retries + 1);
            Ended::Done
        }
        Rerun::NotFailed(state) => {
            eprintln!("kobe: task {id} is {state}; only a FAILURE or REVOKED task can be retried");
            Ended::Refused
        }
        Rerun::Missing => {
            eprintln!("kobe: no task {id}");
            Ended::Refused
        }
        Rerun::NotPublished(error) => {
            eprintln!(
                "kobe: the retry of {id} was recorded but not confirmed ({error}); run it again"
            );
            Ended::Refused
        }
    })
}

/// `kobe task cancel ID`; `Ok(Ended::Refused)` when there was nothing to cancel (exit 1).
pub async fn cancel(
    settings: &Settings,
    registry: &crate::tasks::Registry,
    id: &str,
) -> anyhow::Result<Ended> {
    use crate::store::attempts::Cancelled;
    let db = super::database(settings).await?;
    let cache = super::cache(settings)?;
    let tasks = crate::store::TaskRepository::new(&db);
    let python_run = registry.celery_tasks();
    let answer = crate::operate::cancel::cancel(&tasks, &cache, &python_run, id, &operator())
        .await
        .context("failed to cancel the task")?;
    Ok(match answer {
        Cancelled::Revoked => {
            println!("revoked  {id}  (it will not run)");
            Ended::Done
        }
        Cancelled::AlreadyRevoked => {
            println!("revoked  {id}  (already)");
            Ended::Done
        }
        Cancelled::Requested => {
            println!("stopping {id}  (running; its handler is asked to stop — `kobe task show {id}` tells how it ended)");
            Ended::Done
        }
        Cancelled::Finished(state) => {
            eprintln!("kobe: task {id} is {state}; a finished task cannot be cancelled");
            Ended::Refused
        }
        Cancelled::RunByCelery(name) => {
            eprintln!("kobe: task {id} ({name}) runs on Python Celery workers, which Kobe cannot stop; revoke it with Celery's own control: celery control revoke {id}");
            Ended::Refused
        }
        Cancelled::Missing => {
            eprintln!("kobe: no task {id}");
            Ended::Refused
        }
    })
}

/// `kobe task list`: a table of tasks in one state, newest change first.
pub(crate) async fn list_tasks(
    settings: &Settings,
    query: crate::cli::TaskQuery,
) -> anyhow::Result<Ended> {
    use crate::store::search::Search;
    let state = query
        .state
        .as_deref()
        .map(str::parse::<crate::domain::TaskState>)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--state: {e}"))?;
    let parent_id = query
        .parent_id
        .as_deref()
        .map(crate::domain::TaskId::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--parent: {e}"))?;
    let db = super::database(settings).await?;
    let since = query.within.map(|w| {
        let ms = i64::try_from(w.as_millis()).unwrap_or(i64::MAX);
        mongodb::bson::DateTime::from_millis(
            mongodb::bson::DateTime::now()
                .timestamp_millis()
                .saturating_sub(ms),
        )
    });
    let (tasks, next) = crate::store::TaskRepository::new(&db)
        .find(&Search {
            state,
            task_name: query.task_name,
            route: query.route,
            parent_id: parent_id.map(|id| id.to_string()),
            root_cause: query.root_cause,
            since,
            limit: query.limit,
            ..Search::default()
        })
        .await
        .context("failed to search the tasks")?;
    println!(
        "{:<36}  {:<20}  {:>8}  {:<24}  root cause",
        "task id", "task", "attempts", "changed at"
    );
    for task in &tasks {
        println!(
            "{:<36}  {:<20}  {:>8}  {:<24}  {}",
            task.id,
            task.task_name,
            task.retries + 1,
            when(Some(task.updated_at.timestamp_millis())),
            task.root_cause.as_deref().unwrap_or("")
        );
    }
    let more = if next.is_some() {
        " (more: raise --limit)"
    } else {
        ""
    };
    println!("{} task(s){more}", tasks.len());
    Ok(Ended::Done)
}

/// `kobe task show ID`: the task, its failed attempts and its replays, as JSON.
pub(crate) async fn show_task(settings: &Settings, id: &str) -> anyhow::Result<Ended> {
    let db = super::database(settings).await?;
    let Some(task) = crate::store::TaskRepository::new(&db)
        .get(id)
        .await
        .context("failed to read the task")?
    else {
        eprintln!("kobe: no task {id}");
        return Ok(Ended::Refused);
    };
    let errors = crate::store::ErrorLogRepository::new(&db)
        .for_task(id)
        .await
        .context("failed to read the task's errors")?;
    let shown = serde_json::json!({
        "task": serde_json::to_value(&task)?,
        "attempts": serde_json::to_value(crate::store::error_log::history(&task, &errors))?,
        "errors": serde_json::to_value(&errors)?,
    });
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(Ended::Done)
}

/// Runs a `dlq` subcommand; `Ok(Ended::Refused)` when it did not do what was asked (exit 1).
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<Ended> {
    let letters = operations(settings).await?;
    match command {
        DlqCommand::List {
            filter,
            limit,
            json,
        } => {
            let found = letters
                .dead_letters(selection(filter, Vec::new()), limit as usize)
                .await
                .context("failed to read the dead-letter queue")?;
            if json {
                for letter in &found {
                    println!("{}", serde_json::to_string(letter)?);
                }
            } else {
                println!(
                    "{:<36}  {:<20}  {:>8}  {:<24}  reason",
                    "task id", "task", "attempts", "dead-lettered at"
                );
                for letter in &found {
                    println!("{}", row(letter));
                }
                println!("{} letter(s)", found.len());
            }
            Ok(Ended::Done)
        }
        DlqCommand::Show { id } => match letters
            .dead_letter(&id)
            .await
            .context("failed to read the dead-letter queue")?
        {
            Some(letter) => {
                println!("{}", serde_json::to_string_pretty(&letter)?);
                Ok(Ended::Done)
            }
            None => {
                eprintln!("kobe: no dead letter for task {id}");
                Ok(Ended::Refused)
            }
        },
        DlqCommand::Replay {
            ids,
            all,
            filter,
            dry_run,
        } => replay(&letters, ids, all, filter, dry_run).await,
        DlqCommand::Purge {
            filter,
            yes,
            dry_run,
        } => {
            if !yes && !dry_run {
                anyhow::bail!(
                    "purging removes dead letters for good: add --yes (or --dry-run to count them)"
                );
            }
            let count = letters
                .purge(selection(filter, Vec::new()), dry_run)
                .await
                .context("failed to purge the dead-letter queue")?;
            if dry_run {
                println!("{count} letter(s) would be removed");
            } else {
                tracing::info!(by = %operator(), removed = count, "dead letters purged");
                println!("{count} letter(s) removed");
            }
            Ok(Ended::Done)
        }
    }
}

/// `kobe dlq replay`: refused when a letter was kept or an id has no letter.
async fn replay(
    letters: &Operations,
    ids: Vec<String>,
    all: bool,
    filter: LetterFilter,
    dry_run: bool,
) -> anyhow::Result<Ended> {
    let filtered =
        filter.task_name.is_some() || filter.reason.is_some() || filter.older_than.is_some();
    if ids.is_empty() && !all && !filtered {
        anyhow::bail!(
            "say which letters to replay: task ids, --task NAME, --reason, --older-than or --all"
        );
    }
    let wanted = ids.clone();
    let outcomes = letters
        .replay(selection(filter, ids), dry_run, &operator())
        .await
        .context("failed to replay from the dead-letter queue")?;
    let mut ok = true;
    for outcome in &outcomes {
        match outcome {
            ReplayOutcome::Replayed { task_id, retries } => {
                println!("replayed  {task_id}  (attempt {})", retries + 1)
            }
            ReplayOutcome::WouldReplay { task_id } => println!("would replay  {task_id}"),
            ReplayOutcome::Stale { task_id, state } => {
                println!("removed stale letter  {task_id}  (the task is {state} now)")
            }
            ReplayOutcome::Kept { task_id, why } => {
                ok = false;
                println!(
                    "kept  {}  {why}",
                    task_id.as_deref().unwrap_or("(no task id)")
                )
            }
        }
    }
    let seen = |id: &String| outcomes.iter().any(|o| o.task_id() == Some(id.as_str()));
    for id in wanted.iter().filter(|id| !seen(id)) {
        ok = false;
        eprintln!("kobe: no dead letter for task {id}");
    }
    println!("{} letter(s)", outcomes.len());
    Ok(ok.into())
}

/// `kobe task start-many FILE`: one submission per line, answered line by line; `Ok(Ended::Refused)`
/// when a line was not accepted (exit 1).
pub async fn start_many(
    settings: &Settings,
    registry: &crate::tasks::Registry,
    file: &std::path::Path,
) -> anyhow::Result<Ended> {
    use crate::http::routes::bulk::{submit_items, ItemResult};
    use crate::http::routes::submit::{parse_value, TaskStart};
    use anyhow::Context;
    use std::io::BufRead;

    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let opened =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        Box::new(std::io::BufReader::new(opened))
    };
    let (_, _, submitter) = connected_submitter(settings).await?;
    let trace = crate::telemetry::trace::TraceContext::new_root();
    let mut lines = reader.lines().enumerate();
    let mut all_accepted = true;
    let mut out = std::io::stdout().lock();
    loop {
        // KOBE_BULK_MAX lines at a time: their records share insert commands, their publishes
        // are confirmed pipelined.
        let mut chunk = Vec::new();
        for (number, line) in lines.by_ref() {
            let line = line.with_context(|| format!("{}: line {}", file.display(), number + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            chunk.push((number, line));
            if chunk.len() == settings.api.bulk_max {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let (numbers, items): (Vec<usize>, Vec<_>) = chunk
            .into_iter()
            .map(|(number, line)| {
                let item = serde_json::from_str(&line)
                    .map_err(|e| crate::http::ApiError::MalformedBody(e.to_string()))
                    .and_then(parse_value::<TaskStart>);
                (number, item)
            })
            .unzip();
        let answers = submit_items(
            registry,
            &submitter,
            settings.submit.dedup_window,
            items,
            trace,
        )
        .await;
        let results = numbers
            .into_iter()
            .zip(answers)
            .map(|(number, answer)| ItemResult::of(number, answer));
        for result in results {
            all_accepted &= result.problem.is_none();
            use std::io::Write;
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
        }
    }
    submitter.finish().await;
    Ok(all_accepted.into())
}
