//! Persistence: MongoDB repositories (one file per collection), the migrations that shape the
//! collections, and the Redis connection. Returns [`StoreError`]; knows nothing of HTTP or AMQP.

pub mod attempts;
pub mod batch;
pub mod cache;
pub mod celery_results;
pub mod checkpoints;
pub mod dedup;
pub(crate) mod error_log;
pub(crate) mod leaders;
pub mod leases;
pub mod lookup;
pub mod migrations;
pub mod outcomes;
pub mod payloads;
pub mod search;
pub mod shape;
pub mod shards;
pub mod task_leases;
pub mod tasks;
pub(crate) mod view;
pub mod workers;
pub mod workflows;

use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

pub use attempts::Transition;
pub use cache::Cache;
pub use checkpoints::CheckpointRepository;
pub use dedup::{Claim, DedupRepository};
pub use error_log::{Decision, ErrorLogRepository, ErrorRecord};
pub use leaders::LeaderRepository;
pub use leases::{Lease, LeaseItem, LeaseRepository};
pub use payloads::PayloadRepository;
pub use shards::{ShardMeta, ShardRepository};
pub use tasks::{TaskDocument, TaskRepository};

use mongodb::bson::DateTime;

use crate::cause::Cause;
use crate::config::ServiceUrl;

/// A store failure, phrased for the caller's decision.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database did not answer, refused the connection or failed in a way that may pass:
    /// 503, or try again later. Nothing can be said about whether the write happened.
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// A unique index refused the write (MongoDB error 11000).
    #[error("duplicate key: {0}")]
    Duplicate(#[source] Cause),
    /// The write can never succeed as it is (a value BSON cannot hold, a key with a NUL byte, a
    /// document over 16 MB, a server-side validation error): trying again changes nothing.
    #[error("MongoDB refused the write: {0}")]
    Rejected(#[source] Cause),
    /// A document could not be read into its type: a bug or a hand-edited document.
    #[error("malformed document: {0}")]
    Malformed(#[source] Cause),
    /// Redis did not answer or failed: 503, or go on without the cache where it is optional.
    #[error("Redis: {0}")]
    Redis(#[source] Cause),
    /// A migration spec cannot be read or applied.
    #[error("migration: {0}")]
    Migration(#[source] Cause),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Redis(_))
    }
}

/// Server error codes that say "not now" rather than "never": network trouble, elections,
/// shutdowns, time limits, write conflicts.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 24, 46, 50, 89, 91, 112, 133, 189, 202, 251, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// `from` plus `d`, saturating: lease ends, retention times.
pub(crate) fn later(from: DateTime, d: std::time::Duration) -> DateTime {
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(from.timestamp_millis().saturating_add(ms))
}

/// `d` from now (see [`later`]).
pub(crate) fn from_now(d: std::time::Duration) -> DateTime {
    later(DateTime::now(), d)
}

/// Whether a server error code means the write may succeed when tried again.
pub(crate) fn is_transient_code(code: i32) -> bool {
    TRANSIENT_CODES.contains(&code)
}

impl From<mongodb::error::Error> for StoreError {
    fn from(error: mongodb::error::Error) -> Self {
        use mongodb::error::{ErrorKind, WriteFailure};
        if is_duplicate_key(&error) {
            return Self::Duplicate(Cause::of(error));
        }
        let transient_label = error.contains_label("RetryableWriteError")
            || error.contains_label("TransientTransactionError");
        match *error.kind {
            ErrorKind::BsonDeserialization(_) => Self::Malformed(Cause::of(error)),
            ErrorKind::BsonSerialization(_) | ErrorKind::InvalidArgument { .. } => {
                Self::Rejected(Cause::of(error))
            }
            ErrorKind::Write(WriteFailure::WriteError(ref e))
                if !transient_label && !is_transient_code(e.code) =>
            {
                Self::Rejected(Cause::of(error))
            }
            ErrorKind::Command(ref e) if !transient_label && is_permanent_command_code(e.code) => {
                Self::Rejected(Cause::of(error))
            }
            _ => Self::Unavailable(Cause::of(error)),
        }
    }
}

/// Command errors that say the request itself is wrong (bad value, wrong type, too large).
/// Other command errors count as transient: a misread outage must not fail a task for good,
/// while a misread bad request is still ended by the worker's cap on deliveries.
fn is_permanent_command_code(code: i32) -> bool {
    matches!(
        code,
        2 | 9 | 14 | 15 | 17 | 52 | 55 | 56 | 57 | 10334 | 16755 | 17419 | 17280
    )
}

/// True for MongoDB's duplicate-key error (code 11000), however the driver wraps it.
pub(crate) fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match *error.kind {
        ErrorKind::Write(WriteFailure::WriteError(ref e)) => e.code == 11000,
        ErrorKind::Command(ref e) => e.code == 11000,
        ErrorKind::InsertMany(ref e) => e.write_errors.iter().flatten().any(|e| e.code == 11000),
        _ => false,
    }
}

/// Who counts a client's commands (`kobe_mongo_commands_total`) and times them
/// (`kobe_mongodb_duration_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Monitoring {
    /// The driver's command events: every command, at the price of a copy of each command and
    /// reply as an owned document for the handler.
    Driver,
    /// The process's own group-commit writer and batched reader, and a worker's upkeep: nearly
    /// all of a worker's commands, without that copy (which cost a worker a fifth of its
    /// instructions per task). Rarer commands (a takeover, an investigation) go uncounted.
    Own,
}

/// Counts and times one command sent by a client under [`Monitoring::Own`].
pub(crate) fn note_command(command: &str, collection: &str, took: Duration, failed: bool) {
    let m = crate::telemetry::metrics::metrics();
    m.mongo_commands
        .with_label_values(&[&format!("{command}:{collection}")])
        .inc();
    m.mongodb_duration
        .with_label_values(&[command])
        .observe(took.as_secs_f64());
    if failed {
        m.mongodb_errors.with_label_values(&[command]).inc();
    }
}

/// Opens a client for `uri` and picks `db`. Nothing is sent until the first command; a server
/// that does not answer fails that command after `timeout`.
pub async fn connect(
    uri: &ServiceUrl,
    db: &str,
    timeout: Duration,
    monitoring: Monitoring,
) -> Result<Database, StoreError> {
    let mut options = ClientOptions::parse(uri.expose()).await.map_err(|e| {
        StoreError::Unavailable(Cause::context(format!("invalid MONGODB_URI {uri}"), e))
    })?;
    options.app_name = Some("kobe".into());
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    // Every command's latency and failures, from the driver's own events: nothing to wrap.
    options.command_event_handler = (monitoring == Monitoring::Driver).then(|| {
        mongodb::event::EventHandler::callback(|event: mongodb::event::command::CommandEvent| {
            use mongodb::event::command::CommandEvent;
            let m = crate::telemetry::metrics::metrics();
            match event {
                CommandEvent::Started(e) => {
                    let collection = e
                        .command
                        .get(&e.command_name)
                        .and_then(|v| v.as_str())
                        .unwrap_or("");
                    m.mongo_commands
                        .with_label_values(&[&format!("{}:{collection}", e.command_name)])
                        .inc();
                }
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
        })
    });
    let client =
        Client::with_options(options).map_err(|e| StoreError::Unavailable(Cause::of(e)))?;
    Ok(client.database(db))
}

/// `ping`, for health and readiness.
pub(crate) async fn ping(db: &Database) -> Result<(), StoreError> {
    db.run_command(mongodb::bson::doc! {"ping": 1}).await?;
    Ok(())
}
