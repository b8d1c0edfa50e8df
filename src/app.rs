//! The `kobe` command line as a library: [`App`] runs `serve`, `worker`, `init-db`, `healthcheck`
//! and `tasks check` over a registry of tasks, so a binary of your own can add its tasks to Kobe's.
//!
//! ```no_run
//! use kobe::tasks::{Invocation, Task, TaskFuture};
//!
//! struct Hello;
//!
//! impl Task for Hello {
//!     fn name(&self) -> &'static str {
//!         "hello"
//!     }
//!     fn run(&self, invocation: Invocation) -> TaskFuture {
//!         Box::pin(async move { Ok(serde_json::json!({"hello": invocation.kwargs})) })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     kobe::App::new().task(Hello).run()
//! }
//! ```
//!
//! Tasks declared in `KOBE_TASKS_FILE` join the registry at start; a name taken twice stops
//! start-up, naming the file and line. Periodic tasks come from the file's `[[schedule]]` tables or
//! from [`App::schedule`].

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::{Cli, Command, TaskCommand, TasksCommand, WorkflowCommand};
use crate::commands::Ended;
use crate::config::Settings;
use crate::tasks::{Registry, Task};
use crate::{commands, shutdown, telemetry};

/// Kobe's command line over a registry of tasks.
#[derive(Default)]
pub struct App {
    registry: Registry,
    refused: Vec<String>,
    /// Periodic tasks given in code; added once the tasks file's tasks are in.
    schedules: Vec<crate::domain::schedule::Schedule>,
}

impl App {
    /// No tasks yet: add yours with [`App::task`], Kobe's demos with [`App::with_builtin_tasks`].
    ///
    /// Installs ring as the process's TLS crypto provider (as Kobe's MongoDB client uses), so
    /// HTTP clients on rustls — an http task's, or one a task of yours builds — find one.
    pub fn new() -> Self {
        crate::tasks::declared::http::install_tls_provider();
        Self::default()
    }

    /// Adds Kobe's built-in tasks (`demo_long_io`, `demo_sharded_job`, `demo_shard`).
    pub fn with_builtin_tasks(mut self) -> Self {
        for task in Registry::with_builtin_tasks().tasks() {
            self.add(task);
        }
        self
    }

    /// Adds a task. A name taken twice makes [`App::run`] refuse to start, naming it.
    pub fn task(mut self, task: impl Task) -> Self {
        self.add(Arc::new(task));
        self
    }

    /// Adds a periodic task (as a `[[schedule]]` table would): its task must be registered by
    /// the time the command runs, in code or in `KOBE_TASKS_FILE`.
    pub fn schedule(mut self, schedule: crate::domain::schedule::Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    fn add(&mut self, task: Arc<dyn Task>) {
        if let Err(duplicate) = self.registry.register_shared(task) {
            self.refused.push(duplicate.to_string());
        }
    }

    /// Parses the command line, reads settings (and `.env`), starts telemetry and runs the
    /// command. Exit status: 0 done, 1 failed, 2 bad settings or tasks.
    pub fn run(self) -> ExitCode {
        // The .env file is read before the command line is parsed, so flags that fall back to
        // variables (`--concurrency` ← KOBE_CONCURRENCY) see its values too.
        if let Err(error) = load_env_file() {
            eprintln!("kobe: cannot read the .env file: {error}");
            return ExitCode::from(2);
        }
        let cli = Cli::parse();
        if let Command::Tasks(TasksCommand::Check { file }) = &cli.command {
            return match commands::tasks::check(file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kobe: {error}");
                    ExitCode::from(2)
                }
            };
        }
        let mut settings = match Settings::from_env() {
            Ok(settings) => settings,
            Err(error) => {
                eprintln!("kobe: {error}");
                return ExitCode::from(2);
            }
        };
        let registry = match self.registry_for(&mut settings, &cli.command) {
            Ok(registry) => registry,
            Err(error) => {
                eprintln!("kobe: {error}");
                return ExitCode::from(2);
            }
        };
        telemetry::init(&settings.log_level, settings.log_format);
        telemetry::install_panic_hook();
        tracing::debug!(
            rabbitmq = %settings.broker.url,
            mongodb = %settings.mongo.uri,
            db = %settings.mongo.db,
            redis = %settings.redis.url,
            tasks = ?registry.names(),
            "settings loaded"
        );

        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::error!(error = %error, "cannot start the async runtime");
                return ExitCode::FAILURE;
            }
        };
        // An operator's command tells its person on stderr; a service logs how it failed.
        let interactive = matches!(
            cli.command,
            Command::Task(_) | Command::Dlq(_) | Command::Workflow(_)
        );
        let ended = runtime.block_on(dispatch(cli.command, settings, registry));
        let result = match ended {
            Ok(Ended::Done) => ExitCode::SUCCESS,
            Ok(Ended::Refused) => ExitCode::FAILURE,
            Err(error) if interactive => {
                eprintln!("kobe: {error:#}");
                ExitCode::from(2)
            }
            Err(error) => {
                tracing::error!(error = ?error, "kobe failed");
                ExitCode::FAILURE
            }
        };
        // amiquip threads may still be waiting on a dead broker; do not wait for them.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        telemetry::otel::shutdown();
        result
    }

    /// The registry the command runs with: the tasks given in code, then those of
    /// `KOBE_TASKS_FILE` (for `serve`, `worker`, `beat` and the commands that submit), whose
    /// routes join the settings' unless `KOBE_TASK_ROUTES` routes the task already.
    fn registry_for(self, settings: &mut Settings, command: &Command) -> Result<Registry, String> {
        if let Some(first) = self.refused.first() {
            return Err(first.clone());
        }
        let mut registry = self.registry;
        let submits = matches!(
            command,
            Command::Task(TaskCommand::StartMany { .. })
                | Command::Workflow(WorkflowCommand::Start { .. })
        );
        if let (Some(file), Command::Serve(_) | Command::Worker(_) | Command::Beat, _)
        | (Some(file), _, true) = (&settings.tasks_file, command, submits)
        {
            let lookup = |name: &str| std::env::var(name).ok();
            let declared =
                crate::tasks::declared::load(file, &lookup).map_err(|e| e.to_string())?;
            for task in declared.tasks {
                let name = task.name();
                registry.register_shared(task).map_err(|_| {
                    format!(
                        "{}: task `{name}` is declared, but a task of that name is built in",
                        file.display()
                    )
                })?;
            }
            for schedule in declared.schedules {
                registry
                    .schedule(schedule)
                    .map_err(|reason| format!("{}: {reason}", file.display()))?;
            }
        }
        // Only the commands that fire or list schedules need them (and their tasks).
        if matches!(command, Command::Serve(_) | Command::Beat) {
            for schedule in self.schedules {
                registry.schedule(schedule)?;
            }
        }
        for (task, route) in registry.routes() {
            settings.broker.task_routes.entry(task).or_insert(route);
        }
        Ok(registry)
    }
}

/// Reads `--env-file PATH`, or `./.env` when there is one (its absence is no error).
fn load_env_file() -> Result<(), dotenvy::Error> {
    let env_file = env_file_argument();
    let read = match &env_file {
        Some(path) => dotenvy::from_path(path),
        None => dotenvy::dotenv().map(drop),
    };
    match read {
        Err(error) if !error.not_found() || env_file.is_some() => Err(error),
        _ => Ok(()),
    }
}

/// `--env-file PATH` (or `--env-file=PATH`), looked up before clap parses everything else.
fn env_file_argument() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--env-file" {
            return args.next().map(Into::into);
        }
        if let Some(path) = text.strip_prefix("--env-file=") {
            return Some(path.into());
        }
    }
    None
}

/// Runs the command with its settings and tasks.
async fn dispatch(
    command: Command,
    settings: Settings,
    registry: Registry,
) -> anyhow::Result<Ended> {
    use commands::operations;
    match command {
        Command::Serve(args) => commands::serve::run(settings, args.addr, registry).await,
        Command::Worker(args) => {
            commands::worker::run(settings, args.into(), registry, shutdown::signal()).await
        }
        Command::Beat => commands::beat::run(settings, registry).await,
        Command::InitDb => commands::init_db::run(&settings).await,
        Command::Healthcheck => commands::healthcheck::run(&settings).await,
        Command::Task(TaskCommand::Retry { id }) => operations::retry(&settings, &id).await,
        Command::Task(TaskCommand::Cancel { id }) => {
            operations::cancel(&settings, &registry, &id).await
        }
        Command::Task(TaskCommand::Show { id }) => operations::show_task(&settings, &id).await,
        Command::Task(TaskCommand::List(query)) => operations::list_tasks(&settings, query).await,
        Command::Task(TaskCommand::StartMany { file }) => {
            operations::start_many(&settings, &registry, &file).await
        }
        Command::Dlq(command) => operations::run(&settings, command).await,
        Command::Workflow(WorkflowCommand::Start { file, key }) => {
            commands::workflow::start(&settings, &registry, &file, key.as_deref()).await
        }
        Command::Workflow(WorkflowCommand::Show { id }) => {
            commands::workflow::show(&settings, &id).await
        }
        Command::Workflow(WorkflowCommand::Cancel { id }) => {
            commands::workflow::cancel(&settings, &id).await
        }
        // Checked before any settings are read.
        Command::Tasks(_) => Ok(Ended::Done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::schedule::{Missed, Schedule, When};

    fn tick(task: &str) -> Schedule {
        Schedule {
            name: "tick".into(),
            task: task.into(),
            when: When::Every(60),
            kwargs: Default::default(),
            route: None,
            missed: Missed::Skip,
            workflow: None,
        }
    }

    #[test]
    fn schedules_from_code_join_the_commands_that_fire_them() {
        let mut settings = Settings::from_lookup(|_| None).unwrap();
        let app = || {
            App::new()
                .with_builtin_tasks()
                .schedule(tick("demo_long_io"))
        };
        let registry = app().registry_for(&mut settings, &Command::Beat).unwrap();
        assert_eq!(registry.schedules().len(), 1);
        let registry = app().registry_for(&mut settings, &Command::InitDb).unwrap();
        assert!(registry.schedules().is_empty());
        let unknown = App::new()
            .schedule(tick("nowhere"))
            .registry_for(&mut settings, &Command::Beat)
            .err()
            .unwrap();
        assert!(unknown.contains("`nowhere`"), "{unknown}");
    }
}
