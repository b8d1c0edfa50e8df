//! Persistence: MongoDB repositories (one file per collection), the migrations that shape the
//! collections, and the Redis connection. Returns [`StoreError`]; knows nothing of HTTP or AMQP.

pub mod cache;
pub mod checkpoints;
pub mod dedup;
pub mod error_log;
pub mod leases;
pub mod migrations;
pub mod payloads;
pub mod shards;
pub mod tasks;

use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

pub use cache::Cache;
pub use checkpoints::CheckpointRepository;
pub use dedup::{Claim, DedupRepository};
pub use error_log::{Decision, ErrorLogRepository, ErrorRecord};
pub use leases::{Lease, LeaseItem, LeaseRepository};
pub use payloads::PayloadRepository;
pub use shards::{ShardMeta, ShardRepository};
pub use tasks::{TaskDocument, TaskRepository, Transition};

use crate::config::ServiceUrl;

/// A store failure, phrased for the caller's decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer or refused the connection: 503, retry later.
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(String),
    /// A unique index refused the write (MongoDB error 11000).
    #[error("duplicate key: {0}")]
    Duplicate(String),
    /// A document could not be read into its type: a bug or a hand-edited document.
    #[error("malformed document: {0}")]
    Malformed(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("migration: {0}")]
    Migration(String),
}

impl From<mongodb::error::Error> for StoreError {
    fn from(error: mongodb::error::Error) -> Self {
        if is_duplicate_key(&error) {
            return Self::Duplicate(error.to_string());
        }
        match *error.kind {
            mongodb::error::ErrorKind::BsonDeserialization(ref e) => Self::Malformed(e.to_string()),
            mongodb::error::ErrorKind::BsonSerialization(ref e) => Self::Malformed(e.to_string()),
            _ => Self::Unavailable(error.to_string()),
        }
    }
}

/// True for MongoDB's duplicate-key error (code 11000), however the driver wraps it.
pub fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match *error.kind {
        ErrorKind::Write(WriteFailure::WriteError(ref e)) => e.code == 11000,
        ErrorKind::Command(ref e) => e.code == 11000,
        ErrorKind::InsertMany(ref e) => e.write_errors.iter().flatten().any(|e| e.code == 11000),
        _ => false,
    }
}

/// Opens a client for `uri` and picks `db`. Nothing is sent until the first command; a server
/// that does not answer fails that command after `timeout`.
pub async fn connect(
    uri: &ServiceUrl,
    db: &str,
    timeout: Duration,
) -> Result<Database, StoreError> {
    let mut options = ClientOptions::parse(uri.expose())
        .await
        .map_err(|e| StoreError::Unavailable(format!("invalid MONGODB_URI {uri}: {e}")))?;
    options.app_name = Some("kobe".into());
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    // Every command's latency and failures, from the driver's own events: nothing to wrap.
    options.command_event_handler = Some(mongodb::event::EventHandler::callback(
        |event: mongodb::event::command::CommandEvent| {
            use mongodb::event::command::CommandEvent;
            let m = crate::telemetry::metrics::metrics();
            match event {
                CommandEvent::Succeeded(e) => m
                    .mongodb_duration
                    .with_label_values(&[e.command_name.as_str()])
                    .observe(e.duration.as_secs_f64()),
                CommandEvent::Failed(e) => {
                    m.mongodb_duration
                        .with_label_values(&[e.command_name.as_str()])
                        .observe(e.duration.as_secs_f64());
                    m.mongodb_errors
                        .with_label_values(&[e.command_name.as_str()])
                        .inc();
                }
                _ => {}
            }
        },
    ));
    let client =
        Client::with_options(options).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(client.database(db))
}

/// `ping`, for health and readiness.
pub async fn ping(db: &Database) -> Result<(), StoreError> {
    db.run_command(mongodb::bson::doc! {"ping": 1}).await?;
    Ok(())
}
