//! Kobe: a reliable task-execution service.
//!
//! Clients submit named tasks over HTTP; Kobe records each task in MongoDB, publishes it to
//! RabbitMQ with publisher confirms, runs it on workers that ack only after the outcome is
//! recorded, retries failures with exponential backoff, dead-letters what cannot succeed, and
//! answers "where is my task" with one normalized state.
//!
//! # Map of the crate
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | [`App`]: the command line over a registry of tasks, for `kobe` and binaries of your own |
//! | [`cli`] | the command line (clap) |
//! | [`cause`] | the driver error under each layer's own error, kept as its source |
//! | [`config`] | settings from the environment, validated at start-up; secrets redacted |
//! | [`telemetry`] | logging (pretty or JSON), the panic hook, Prometheus metrics |
//! | [`domain`] | task ids, states, priorities: parsed values, no I/O |
//! | [`amqp`] | RabbitMQ: topology, Celery v2 messages, confirming publisher, manual-ack consumer |
//! | [`tasks`] | the `Task` trait, its errors, the registry, built-in tasks |
//! | [`store`] | MongoDB repositories, migrations, Redis |
//! | [`submit`] | the one way a task comes in: dedup, record, publish, confirm; the outbox |
//! | [`operate`] | what operators do to tasks: cancel, rerun, dead letters, the overview |
//! | [`worker`] | the execution core: deliveries, the execution lease, outcomes, group commit |
//! | [`beat`] | periodic tasks: one leader (a MongoDB lease) fires each slot once |
//! | [`http`] | the actix-web API |
//! | [`commands`] | `serve`, `worker`, `init-db`, `healthcheck`: where the modules are wired together |
//! | [`shutdown`] | SIGTERM/SIGINT |
//!
//! Floors, lowest first: `cause`, `config`, `domain`, `telemetry`; then `amqp` and `store`, which
//! never see each other's types; then `tasks`, which reach the store through their context and
//! never see AMQP or HTTP; then the services `submit`, `worker` and `beat`, which use the floors below
//! together; then `operate`, over `submit`; then `http`, which calls both; and `commands` (with `app` and `cli` above it),
//! which builds every client once and wires them. Nothing imports from a floor above its own.

// A worker's delivery future nests the handler, the store and the Redis measurement deeply
// enough that computing its layout needs more than the default 128 levels.
#![recursion_limit = "256"]

pub mod amqp;
pub mod app;
pub mod beat;
pub mod cause;
pub mod cli;
pub mod commands;
pub mod config;
pub mod domain;
pub mod http;
pub mod operate;
pub mod shutdown;
pub mod store;
pub mod submit;
pub mod tasks;
pub mod telemetry;
pub mod worker;

pub use app::App;
