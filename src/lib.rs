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
//! | [`cli`] | the command line (clap) |
//! | [`config`] | settings from the environment, validated at start-up; secrets redacted |
//! | [`telemetry`] | logging (pretty or JSON), the panic hook, Prometheus metrics |
//! | [`domain`] | task ids, states, priorities: parsed values, no I/O |
//! | [`amqp`] | RabbitMQ: topology, Celery v2 messages, confirming publisher, manual-ack consumer |
//! | [`tasks`] | the `Task` trait, its errors, the registry, built-in tasks |
//! | [`store`] | MongoDB repositories, migrations, Redis |
//! | [`http`] | the actix-web API |
//! | [`commands`] | `serve`, `worker`, `init-db`, `healthcheck`: where the modules are wired together |
//! | [`shutdown`] | SIGTERM/SIGINT |
//!
//! `tasks` never sees AMQP or HTTP types, `store` never sees HTTP or AMQP, `amqp` never touches
//! MongoDB or Redis: only `commands` joins them.

// A worker's delivery future nests the handler, the store and the Redis measurement deeply
// enough that computing its layout needs more than the default 128 levels.
#![recursion_limit = "256"]

pub mod amqp;
pub mod cli;
pub mod commands;
pub mod config;
pub mod domain;
pub mod http;
pub mod shutdown;
pub mod store;
pub mod submit;
pub mod tasks;
pub mod telemetry;
pub mod worker;
