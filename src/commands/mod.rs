//! The subcommands: wiring only. This is the one place settings become clients and modules meet.

pub mod healthcheck;
pub mod init_db;
pub mod outbox;
pub mod serve;
pub mod submit;
pub mod worker;

use crate::amqp::Topology;
use crate::config::Settings;

/// The topology every command uses.
pub fn topology(settings: &Settings) -> Topology {
    Topology::new(
        &settings.amqp_prefix,
        settings.queue_kind,
        settings.task_routes.clone(),
    )
}
