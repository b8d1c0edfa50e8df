//! Kobe's integration tests: one binary (one link on a small machine), one module per area, all
//! against real RabbitMQ, Redis and MongoDB. [`common`] gives each test its own database, AMQP
//! prefix and Redis prefix, so tests run in parallel and leave nothing behind.
// The futures of the deepest tests (a submission through every layer) outgrow the default
// query depth when built from scratch.
#![recursion_limit = "256"]

mod common;

mod api_contract;
mod beat;
mod bounds;
mod browser;
mod cancel;
mod celery;
mod cli;
mod cluster;
mod declared;
mod dlq;
mod faults;
mod guarantees;
mod observability;
mod security;
mod store;
mod submission;
mod ui;
mod worker;
mod workflow;
