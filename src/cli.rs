//! The command line: `kobe <command>`. Help text comes from these doc comments.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Kobe: a reliable task-execution service. Submit tasks over HTTP, run them on workers fed by
/// RabbitMQ, keep the truth about every task in MongoDB.
///
/// Settings come from the environment and an optional .env file; see .env.example.
#[derive(Debug, Parser)]
#[command(name = "kobe", version, about, long_about)]
pub(crate) struct Cli {
    /// Read settings from this file instead of ./.env (variables already set win).
    #[arg(long, global = true, value_name = "PATH")]
    pub env_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API (submit tasks, read their status, health, metrics).
    Serve(ServeArgs),
    /// Consume tasks from RabbitMQ and run them.
    Worker(WorkerArgs),
    /// Fire the periodic tasks (the schedules in KOBE_TASKS_FILE) without serving the API. Any
    /// number may run beside `serve` replicas: one at a time leads, by a lease in MongoDB.
    Beat,
    /// Create MongoDB collections and indexes from migrations/ (idempotent).
    InitDb,
    /// Check RabbitMQ, MongoDB, Redis and the AMQP topology; exit 0 only if all hold.
    Healthcheck,
    /// Work with tasks declared in a file (KOBE_TASKS_FILE).
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Find tasks, look at one, run a failed one again.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Look into the dead-letter queue and act on it: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Start a workflow (chain, group, chord), look at one, cancel one.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// Start the workflow in FILE (`-`: standard input), the body POST /workflow/start takes:
    /// {"workflow": {"chain": [...]}, "on_failure": {...}}. Prints {"workflow_id"} once it is
    /// recorded and its first steps are confirmed; a bad step is refused (exit 1) naming its path.
    Start {
        /// A JSON file, or `-`.
        file: std::path::PathBuf,
        /// An idempotency key: starts with the same key start one workflow (and a start cut
        /// short is finished by running it again).
        #[arg(long)]
        key: Option<String>,
    },
    /// A workflow's state and each step's path, task id and state, as JSON.
    Show {
        /// The workflow id (wf-…).
        id: String,
    },
    /// Cancel a workflow: no later step is submitted, waiting steps are revoked, running ones
    /// asked to stop. Asking again is harmless.
    Cancel {
        /// The workflow id (wf-…).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Tasks in one state (or one job's children), most recently changed first.
    List(TaskQuery),
    /// One task: its document, its failed attempts (TaskErrorLog) and its replays, as JSON.
    Show {
        /// The task id.
        id: String,
    },
    /// Run a FAILURE or REVOKED task again as its next attempt (same id; its retries go on).
    /// Any other state is refused and left alone. After an interruption, run it again to finish.
    Retry {
        /// The task id.
        id: String,
    },
    /// Cancel a task. PENDING or RETRY: it becomes REVOKED and never runs. STARTED: its handler
    /// is asked to stop, and the task ends REVOKED if it does. A finished task is refused (exit
    /// 1). Asking again is harmless.
    Cancel {
        /// The task id.
        id: String,
    },
    /// Submit many tasks: one body of POST /task/start per line of FILE (JSON Lines; `-` reads
    /// standard input). Each line is answered on its own, in order, as one JSON object per line
    /// ({"index", "status", "task_id"?, "deduplicated"?, "problem"?}); they are sent KOBE_BULK_MAX
    /// at a time, sharing MongoDB commands and broker confirms. Exit 0 when every line was
    /// accepted (or was a repeat), 1 otherwise.
    StartMany {
        /// A JSON Lines file, or `-`.
        file: PathBuf,
    },
}

/// Which tasks `kobe task list` shows.
#[derive(Debug, Args)]
pub struct TaskQuery {
    /// PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED (default FAILURE; any state with
    /// --parent).
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks of this name.
    #[arg(long = "task", value_name = "NAME")]
    pub task_name: Option<String>,
    /// Only tasks sent to this route (queue suffix).
    #[arg(long, value_name = "ROUTE")]
    pub route: Option<String>,
    /// Only children of this task (a sharded job's shards).
    #[arg(long = "parent", value_name = "TASK_ID")]
    pub parent_id: Option<String>,
    /// Only tasks whose root cause contains this text (case-insensitive).
    #[arg(long = "cause", value_name = "TEXT")]
    pub root_cause: Option<String>,
    /// Only tasks changed (finished, for a final state) within this long: 30s, 15m, 12h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub within: Option<std::time::Duration>,
    /// Show at most this many.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
}

/// Which dead letters a command is about.
#[derive(Debug, Args, Default)]
pub struct LetterFilter {
    /// Only letters of this task name.
    #[arg(long = "task", value_name = "NAME")]
    pub task_name: Option<String>,
    /// Only letters whose reason contains this text.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Only letters dead-lettered at least this long ago: 30s, 15m, 12h, 7d.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (task id, name, reason, attempts, when), oldest first. Removes nothing.
    List {
        #[command(flatten)]
        filter: LetterFilter,
        /// Show at most this many.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one task's dead letter, with its message body. Removes nothing.
    Show {
        /// The task id.
        id: String,
    },
    /// Run dead-lettered tasks again, each as a new attempt of the same task id. A letter is
    /// removed only once its new attempt is confirmed by the broker; run it again after an
    /// interruption and it finishes what was left.
    Replay {
        /// Task ids to replay.
        ids: Vec<String>,
        /// Every letter the filter selects (without a filter: the whole queue).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        filter: LetterFilter,
        /// Say what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove dead letters for good. Needs --yes (or --dry-run to count them).
    Purge {
        #[command(flatten)]
        filter: LetterFilter,
        /// Really remove them.
        #[arg(long)]
        yes: bool,
        /// Count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `30s`, `15m`, `12h`, `7d` (or plain seconds).
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected an age such as 30s, 15m, 12h or 7d, got `{text}`"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit `{other}`: use s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(seconds)))
}

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// Check a tasks file offline: its syntax, every task's fields, and the variables it names.
    /// Prints each task and exits 0, or names the file, line and field at fault and exits 2.
    Check {
        /// The TOML file, as KOBE_TASKS_FILE would name it.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: KOBE_HTTP_ADDR, or 127.0.0.1:8000].
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<SocketAddr>,
}

/// The shipped prefetch multiplier (`KOBE_PREFETCH_MULTIPLIER`).
pub const DEFAULT_PREFETCH_MULTIPLIER: u16 = 4;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Tasks run at the same time.
    #[arg(long, env = "KOBE_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub concurrency: u16,

    /// Messages prefetched per concurrency slot: prefetch = concurrency × multiplier. More than
    /// one lets short tasks share MongoDB commands; a prefetched message that finds no free slot
    /// within KOBE_SLOT_WAIT_MS goes back to its queue, so long tasks are not held back.
    #[arg(long, env = "KOBE_PREFETCH_MULTIPLIER", default_value_t = DEFAULT_PREFETCH_MULTIPLIER, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub prefetch_multiplier: u16,

    /// Routes to consume, comma-separated (queue `<prefix>.<route>` each) [default: every route
    /// in KOBE_TASK_ROUTES, plus `default`].
    #[arg(
        long,
        env = "KOBE_QUEUES",
        value_delimiter = ',',
        value_name = "ROUTE,..."
    )]
    pub queues: Vec<String>,

    /// Serve Prometheus metrics (`/metrics`) on this address [default: off].
    #[arg(long, env = "KOBE_WORKER_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_of;

    /// The worker flags fall back to the variables of the configuration table, with its defaults.
    #[test]
    fn ages_read_with_their_units() {
        assert_eq!(parse_age("7d").unwrap().as_secs(), 7 * 86_400);
        assert_eq!(parse_age("90").unwrap().as_secs(), 90);
        assert_eq!(parse_age("15m").unwrap().as_secs(), 900);
        assert!(parse_age("7w").unwrap_err().contains("unit"));
        assert!(parse_age("soon").is_err());
    }

    #[test]
    fn worker_flag_defaults_are_the_table_s() {
        let Command::Worker(args) = Cli::try_parse_from(["kobe", "worker"]).unwrap().command else {
            panic!("not the worker command")
        };
        assert_eq!(args.concurrency.to_string(), default_of("KOBE_CONCURRENCY"));
        assert_eq!(
            args.prefetch_multiplier.to_string(),
            default_of("KOBE_PREFETCH_MULTIPLIER")
        );
        assert!(args.queues.is_empty() && default_of("KOBE_QUEUES").is_empty());
        assert!(args.metrics_addr.is_none() && default_of("KOBE_WORKER_METRICS_ADDR").is_empty());
    }
}
