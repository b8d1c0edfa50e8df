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
pub struct Cli {
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
    /// Create MongoDB collections and indexes from migrations/ (idempotent).
    InitDb,
    /// Check RabbitMQ, MongoDB, Redis and the AMQP topology; exit 0 only if all hold.
    Healthcheck,
    /// Work with tasks declared in a file (KOBE_TASKS_FILE).
    #[command(subcommand)]
    Tasks(TasksCommand),
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

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Tasks run at the same time.
    #[arg(long, env = "KOBE_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub concurrency: u16,

    /// Messages prefetched per concurrency slot: prefetch = concurrency × multiplier. More than
    /// one lets short tasks share MongoDB commands; a prefetched message that finds no free slot
    /// within KOBE_SLOT_WAIT_MS goes back to its queue, so long tasks are not held back.
    #[arg(long, env = "KOBE_PREFETCH_MULTIPLIER", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=100))]
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
