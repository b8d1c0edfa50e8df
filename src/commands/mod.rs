//! The subcommands: wiring only. This is the one place settings become clients and modules meet.

pub mod beat;
pub mod healthcheck;
pub mod init_db;
pub mod operations;
pub mod serve;
pub mod tasks;
pub mod worker;
pub mod workflow;

use crate::amqp::Topology;
use crate::config::Settings;

/// How a command ended; every command answers `anyhow::Result<Ended>`, an error being what kept
/// it from running at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It did what was asked (exit 0).
    Done,
    /// It ran, and the answer is no: a check failed, nothing to retry (exit 1).
    Refused,
}

impl From<bool> for Ended {
    fn from(done: bool) -> Self {
        if done {
            Self::Done
        } else {
            Self::Refused
        }
    }
}

/// The MongoDB database of the settings (nothing is contacted until the first command); the
/// driver counts its commands.
pub async fn database(settings: &Settings) -> anyhow::Result<mongodb::Database> {
    database_counted(settings, crate::store::Monitoring::Driver).await
}

/// [`database`], its commands counted as `monitoring` says.
pub async fn database_counted(
    settings: &Settings,
    monitoring: crate::store::Monitoring,
) -> anyhow::Result<mongodb::Database> {
    use anyhow::Context;
    crate::store::connect(
        &settings.mongo.uri,
        &settings.mongo.db,
        settings.dependency_timeout,
        monitoring,
    )
    .await
    .context("failed to configure the MongoDB client")
}

/// The Redis pool of the settings, with the configured status TTL.
pub fn cache(settings: &Settings) -> anyhow::Result<crate::store::Cache> {
    use anyhow::Context;
    Ok(crate::store::Cache::new(
        &settings.redis.url,
        &settings.redis.prefix,
        settings.dependency_timeout,
    )
    .context("failed to configure the Redis pool")?
    .with_status_ttl(settings.redis.status_cache_ttl))
}

/// The confirming publisher of a process; it connects in the background.
pub fn publisher(settings: &Settings) -> anyhow::Result<crate::amqp::Publisher> {
    use anyhow::Context;
    crate::amqp::Publisher::start_bounded(
        &settings.broker.url,
        topology(settings),
        settings.broker.publish_timeout,
        settings.broker.publish_queue,
    )
    .context("failed to start the publisher")
}

/// The group-commit writer of a process, tuned by the settings (for a client the driver counts).
pub fn writer(settings: &Settings, db: &mongodb::Database) -> crate::store::batch::BatchWriter {
    writer_counted(settings, db, crate::store::Monitoring::Driver)
}

/// [`writer`] for a client whose commands are counted as `monitoring` says: under
/// [`Monitoring::Own`](crate::store::Monitoring::Own) the writer counts its commands.
pub fn writer_counted(
    settings: &Settings,
    db: &mongodb::Database,
    monitoring: crate::store::Monitoring,
) -> crate::store::batch::BatchWriter {
    crate::store::batch::BatchWriter::start(
        db.clone(),
        crate::store::batch::BatchConfig {
            linger: settings.mongo.batch_linger,
            max_statements: settings.mongo.batch_max,
            count_commands: monitoring == crate::store::Monitoring::Own,
            ..Default::default()
        },
    )
}

/// The submitter of a process (`serve`'s API and outbox, a worker's child tasks).
pub fn submitter(
    settings: &Settings,
    db: &mongodb::Database,
    cache: crate::store::Cache,
    publisher: crate::amqp::Publisher,
    writer: crate::store::batch::BatchWriter,
) -> crate::submit::Submitter {
    use crate::store::{DedupRepository, PayloadRepository, TaskRepository};
    crate::submit::Submitter::new(crate::submit::SubmitterParts {
        tasks: TaskRepository::new(db),
        payloads: PayloadRepository::new(db),
        dedup: DedupRepository::new(db),
        cache,
        publisher,
        topology: topology(settings),
        writer,
        inline_limit: settings.submit.payload_inline_limit,
    })
}

/// The operator services of a process (`serve`'s `/dlq` and `/ui`, `kobe dlq`, `kobe task`),
/// over its submitter.
pub fn operations(
    settings: &Settings,
    db: &mongodb::Database,
    submitter: crate::submit::Submitter,
    cache: crate::store::Cache,
    celery_tasks: Vec<String>,
) -> crate::operate::Operations {
    crate::operate::Operations {
        url: settings.broker.url.clone(),
        topology: topology(settings),
        tasks: crate::store::TaskRepository::new(db),
        workflows: crate::workflow::Workflows::new(
            db,
            crate::store::PayloadRepository::new(db),
            submitter.clone(),
        ),
        submitter,
        cache,
        broker_timeout: settings.dependency_timeout,
        celery_tasks,
    }
}

/// The topology every command uses.
pub fn topology(settings: &Settings) -> Topology {
    Topology::new(
        &settings.broker.prefix,
        settings.broker.queue_kind,
        settings.broker.task_routes.clone(),
    )
    .with_delivery_limit(settings.broker.quorum_delivery_limit)
}

/// Starts polling the depth of `queues` every 5 s; sending on (or dropping) the returned sender
/// stops it.
pub(crate) fn spawn_queue_depth_watch(
    settings: &Settings,
    queues: Vec<String>,
    stop: &crate::shutdown::Trigger,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch_queue_depths(
        settings.broker.url.clone(),
        queues,
        std::time::Duration::from_secs(5),
        stop.pulled(),
    ))
}

/// Polls the depth of `queues` into `kobe_queue_depth` every `interval` until `shutdown`.
pub(crate) async fn watch_queue_depths(
    url: crate::config::ServiceUrl,
    queues: Vec<String>,
    interval: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // The first poll waits a moment: at start-up the queues are still being declared.
    let mut wait = interval.min(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        let url = url.clone();
        let names = queues.clone();
        let polled = tokio::task::spawn_blocking(move || {
            crate::amqp::queue_depths(&url, &names, std::time::Duration::from_secs(5))
        })
        .await;
        match polled {
            Ok(Ok(reports)) => {
                for report in reports {
                    crate::telemetry::metrics::metrics()
                        .queue_depth
                        .with_label_values(&[report.name.as_str()])
                        .set(i64::from(report.messages));
                }
            }
            Ok(Err(error)) => tracing::debug!(error = %error, "cannot poll queue depths"),
            Err(error) => tracing::debug!(error = %error, "queue depth poll panicked"),
        }
    }
}
