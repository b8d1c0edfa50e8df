//! `kobe worker`: wiring only. Builds the clients from settings, starts the consumer and hands
//! its deliveries to the execution core (`crate::worker`).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::amqp::{Consumer, ConsumerConfig};
use crate::celery::fleet::{Announcer, FleetConfig};
use crate::cli::WorkerArgs;
use crate::config::Settings;
use crate::store::celery_results::CeleryResults;
use crate::store::{
    CheckpointRepository, ErrorLogRepository, LeaseRepository, PayloadRepository, ShardRepository,
    TaskRepository,
};
use crate::tasks::{Registry, TaskContext};
use crate::worker::spawner::WorkerSpawner;
use crate::worker::{Services, Worker, WorkerConfig};

/// What a worker process runs with, from its command line.
pub struct WorkerOptions {
    pub concurrency: u16,
    pub prefetch_multiplier: u16,
    /// Routes to consume; empty means every configured route.
    pub routes: Vec<String>,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl From<WorkerArgs> for WorkerOptions {
    fn from(args: WorkerArgs) -> Self {
        Self {
            concurrency: args.concurrency,
            prefetch_multiplier: args.prefetch_multiplier,
            routes: args.queues,
            metrics_addr: args.metrics_addr,
        }
    }
}

/// Runs a worker until `shutdown` resolves, then stops consuming, lets in-flight tasks finish
/// within the grace period and closes the connection (unfinished messages return to the queue).
pub async fn run(
    settings: Settings,
    options: WorkerOptions,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<super::Ended> {
    // A worker counts its own commands: the driver's events would copy every batch it sends.
    let db = super::database_counted(&settings, crate::store::Monitoring::Own).await?;
    let topology = super::topology(&settings);
    // Celery workers take what is theirs; a message of theirs that reaches a Kobe worker all the
    // same (on a queue it was told to consume) is handed on as a task it does not know.
    let celery_routes = registry.celery_only_routes();
    let registry = registry.run_here();
    let routes = if options.routes.is_empty() {
        let mut routes = topology.routes();
        routes.retain(|route| !celery_routes.contains(route));
        routes
    } else {
        options.routes.clone()
    };
    let queues: Vec<String> = routes.iter().map(|r| topology.queue(r)).collect();
    let prefetch = options
        .concurrency
        .saturating_mul(options.prefetch_multiplier);
    let publisher = super::publisher(&settings)?;
    let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
    let consumer = Consumer::start(
        ConsumerConfig {
            url: settings.broker.url.clone(),
            topology: topology.clone(),
            queues: queues.clone(),
            prefetch,
            name: format!("kobe worker {}", settings.broker.prefix),
        },
        deliveries_tx,
    )
    .context("failed to start the consumer")?;
    let mut watched = queues.clone();
    watched.push(topology.dead_letter_queue());
    let mut services = services(&settings, &db, topology, publisher, &consumer)?;
    let revokes = settings.celery.events.then(|| {
        let (announcer, revokes) = Announcer::start(FleetConfig {
            url: settings.broker.url.clone(),
            concurrency: options.concurrency,
            prefetch,
            queues: queues.clone(),
            registered: registry.names().iter().map(|n| (*n).to_owned()).collect(),
            show_payloads: settings.worker.log_payloads,
        });
        services.celery_events = Some(announcer.clone());
        let revoking = tokio::spawn(revoke_on_request(
            revokes,
            services.tasks.clone(),
            services.cache.clone(),
        ));
        (announcer, revoking)
    });
    let worker = Worker::new(
        registry,
        services,
        worker_config(&settings, options.concurrency),
    );
    tracing::info!(concurrency = options.concurrency, prefetch, queues = ?queues, "worker started");
    let metrics_server = options.metrics_addr.map(serve_metrics).transpose()?;
    let background = crate::shutdown::Trigger::default();
    let depths = super::spawn_queue_depth_watch(&settings, watched, &background);

    let stop_consuming = {
        let settler = consumer.settler();
        async move {
            shutdown.await;
            settler.stop_consuming();
        }
    };
    worker.run(deliveries, stop_consuming).await;
    // Let the settlements just sent reach the consumer thread before it closes.
    tokio::task::spawn_blocking(move || consumer.close())
        .await
        .context("consumer thread panicked")?;
    background.pull();
    if let Some((announcer, revoking)) = revokes {
        announcer.stop();
        revoking.abort();
    }
    let _ = depths.await;
    if let Some(handle) = metrics_server {
        handle.stop(true).await;
    }
    tracing::info!("worker stopped");
    Ok(super::Ended::Done)
}

/// Cancels each task Celery's tools ask to revoke (Flower, `celery control revoke`), as
/// `kobe task cancel` does: a waiting task is revoked, a running one asked to stop.
async fn revoke_on_request(
    mut revokes: mpsc::UnboundedReceiver<String>,
    tasks: crate::store::TaskRepository,
    cache: crate::store::Cache,
) {
    let by = "celery control revoke";
    while let Some(id) = revokes.recv().await {
        match crate::operate::cancel::cancel(&tasks, &cache, &[], &id, by).await {
            // A Celery client's task not received yet: Kobe knows nothing of it but its id.
            // Its first attempt is closed as cancelled, so when it comes it is not run, as a
            // Celery worker keeps a revoked id.
            Ok(crate::store::attempts::Cancelled::Missing) => {
                let request = crate::store::tasks::OperatorRequest {
                    at: mongodb::bson::DateTime::now(),
                    by: by.to_owned(),
                };
                let closed = tasks
                    .leases()
                    .close(
                        &id,
                        "",
                        0,
                        crate::domain::TaskState::Revoked,
                        Some(&request),
                    )
                    .await;
                if let Err(error) = closed {
                    tracing::warn!(error = %error, task_id = %id, "cannot keep the revoked id of a task not received yet");
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %error, task_id = %id, "cannot cancel the task Celery's tools revoked")
            }
        }
    }
}

/// How the worker behaves, from settings and `--concurrency`.
fn worker_config(settings: &Settings, concurrency: u16) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        slot_wait: settings.worker.slot_wait,
        unknown_task_grace: settings.worker.unknown_task_grace,
        lease: settings.worker.execution_lease,
        max_deliveries: settings.worker.max_deliveries,
        inline_limit: settings.submit.payload_inline_limit,
        log_payloads: settings.worker.log_payloads,
        result_ttl: settings.redis.result_ttl,
        retry: settings.worker.retry.clone(),
        task_retry: settings.worker.task_retry.clone(),
        shutdown_grace: settings.shutdown_grace,
    }
}

/// Serves `/metrics` alone on `addr`, in the background.
fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<actix_web::dev::ServerHandle> {
    let server = crate::http::Application::metrics_only(addr)
        .with_context(|| format!("failed to listen on {addr} for metrics"))?;
    tracing::info!(addr = %addr, port = server.port(), "serving worker metrics");
    let handle = server.handle();
    tokio::spawn(server.run_until_stopped());
    Ok(handle)
}

/// What the worker talks to, built once: the store's repositories and batchers, the cache, the
/// publisher and the consumer's settler, and what running tasks may use.
fn services(
    settings: &Settings,
    db: &mongodb::Database,
    topology: crate::amqp::Topology,
    publisher: crate::amqp::Publisher,
    consumer: &Consumer,
) -> anyhow::Result<Services> {
    let cache = super::cache(settings)?;
    let writer = super::writer_counted(settings, db, crate::store::Monitoring::Own);
    let submitter = super::submitter(
        settings,
        db,
        cache.clone(),
        publisher.clone(),
        writer.clone(),
    );
    let context = Arc::new(TaskContext {
        leases: LeaseRepository::new(db),
        checkpoints: CheckpointRepository::new(db),
        shards: ShardRepository::new(db),
        spawner: Arc::new(WorkerSpawner {
            submitter: submitter.clone(),
        }),
    });
    let workflows = crate::workflow::Workflows::new(db, PayloadRepository::new(db), submitter);
    Ok(Services {
        tasks: TaskRepository::new(db),
        errors: ErrorLogRepository::new(db),
        payloads: PayloadRepository::new(db),
        reader: crate::store::lookup::BatchReader::start(
            db.clone(),
            settings.mongo.batch_linger,
            std::time::Duration::from_secs(10),
            true,
        ),
        writer,
        cache,
        publisher,
        topology,
        settler: consumer.settler(),
        liveness: consumer.liveness(),
        context,
        workflows,
        celery_events: None,
        celery_results: settings
            .celery
            .results
            .as_ref()
            .map(|url| {
                CeleryResults::new(
                    url,
                    settings.celery.result_expires,
                    settings.dependency_timeout,
                )
            })
            .transpose()?,
    })
}
