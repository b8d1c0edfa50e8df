//! Kobe: a reliable task-execution service.
//!
//! Clients submit named tasks over HTTP; Kobe records each task in MongoDB, publishes it to
//! RabbitMQ with publisher confirms, runs it on workers that ack only after the outcome is
//! recorded, retries failures with exponential backoff, dead-letters what cannot succeed, and
//! answers "where is my task" with one normalized state.
//!
//! # Using Kobe as a library
//!
//! A binary of your own is Kobe's command line (`serve`, `worker`, `beat`, …) with your tasks in
//! its registry. What you need is re-exported here: [`App`], the [`Task`] trait with its
//! [`Invocation`], [`TaskError`] and [`TaskFuture`], and, for what a task declares, the [`tasks`]
//! module ([`tasks::KwargsSchema`], [`tasks::RetryPolicy`]); settings are read from the
//! environment as [`config::Settings`] documents; ids and states are in [`domain`].
//!
//! ```no_run
//! use kobe::{App, Invocation, Task, TaskError, TaskFuture};
//! use serde_json::json;
//!
//! /// Adds its two positional arguments.
//! struct Add;
//!
//! impl Task for Add {
//!     fn name(&self) -> &'static str {
//!         "add"
//!     }
//!
//!     fn run(&self, invocation: Invocation) -> TaskFuture {
//!         Box::pin(async move {
//!             let number = |i: usize| invocation.args.get(i).and_then(|v| v.as_i64());
//!             match (number(0), number(1)) {
//!                 (Some(a), Some(b)) => Ok(json!(a + b)),
//!                 _ => Err(TaskError::Permanent("add takes two integers".into())),
//!             }
//!         })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // `my-kobe worker` runs `add`; `my-kobe serve` accepts `{"task_name": "add", "args": [1, 2]}`.
//!     App::new().with_builtin_tasks().task(Add).run()
//! }
//! ```
//!
//! Workflows (chains, groups, chords) are built with [`Workflow`] and [`Step`] into the JSON
//! `POST /workflow/start` takes; a schedule may start one.
//!
//! `examples/custom_worker.rs` is a fuller one (a kwargs schema, a retry policy, a time limit).
//!
//! The other public modules (`amqp`, `store`, `submit`, `http`, `commands`, `telemetry`, `cli`)
//! are open so Kobe's own integration tests and benchmarks can build its parts one by one; they
//! are hidden from these docs and are not a stable interface. Everything else is private.
//!
//! # Map of the crate
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | [`App`]: the command line over a registry of tasks, for `kobe` and binaries of your own |
//! | `cli` | the command line (clap) |
//! | `cause` | the driver error under each layer's own error, kept as its source |
//! | [`config`] | settings from the environment, validated at start-up; secrets redacted |
//! | `telemetry` | logging (pretty or JSON), the panic hook, Prometheus metrics |
//! | [`domain`] | task ids, states, priorities: parsed values, no I/O |
//! | `amqp` | RabbitMQ: topology, Celery v2 messages, confirming publisher, manual-ack consumer |
//! | [`tasks`] | the `Task` trait, its errors, the registry, built-in tasks |
//! | `store` | MongoDB repositories, migrations, Redis |
//! | `submit` | the one way a task comes in: dedup, record, publish, confirm; the outbox |
//! | `operate` | what operators do to tasks: cancel, rerun, dead letters, the overview |
//! | `worker` | the execution core: deliveries, the execution lease, outcomes, group commit |
//! | `beat` | periodic tasks: one leader (a MongoDB lease) fires each slot once |
//! | `celery` | tracking what Python Celery workers run for Kobe, from their task events |
//! | `workflow` | chains, groups and chords: recorded whole, handed on by the worker that finishes a step; [`Workflow`] builds one |
//! | `http` | the actix-web API |
//! | `commands` | `serve`, `worker`, `init-db`, `healthcheck`: where the modules are wired together |
//! | `shutdown` | SIGTERM/SIGINT |
//!
//! Floors, lowest first: `cause`, `config`, `domain`, `telemetry`; then `amqp` and `store`, which
//! never see each other's types; then `tasks`, which reach the store through their context and
//! never see AMQP or HTTP; then the services `submit`, `worker`, `beat` and `celery`, which use the floors
//! below together; then `operate`, over `submit`; then `http`, which calls both; and `commands`
//! (with `app` and `cli` above it), which builds every client once and wires them. Nothing imports
//! from a floor above its own.

// A worker's delivery future nests the handler, the store and the Redis measurement deeply
// enough that computing its layout needs more than the default 128 levels.
#![recursion_limit = "256"]

pub mod app;
pub mod config;
pub mod domain;
pub mod tasks;

// Open to Kobe's own integration tests and benchmarks, not an interface: see the crate docs.
#[doc(hidden)]
pub mod amqp;
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod commands;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod store;
#[doc(hidden)]
pub mod submit;
#[doc(hidden)]
pub mod telemetry;

pub(crate) mod beat;
pub(crate) mod cause;
pub(crate) mod celery;
pub(crate) mod operate;
pub(crate) mod shutdown;
pub(crate) mod worker;
pub(crate) mod workflow;

pub use app::App;
pub use tasks::{Invocation, Registry, Task, TaskError, TaskFuture};
pub use workflow::build::{Step, Workflow};
