//! `kobe worker`: wiring only. Builds the clients from settings, starts the consumer and hands
//! its deliveries to the execution core ([`crate::worker`]).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::amqp::{Consumer, ConsumerConfig};
use crate::cli::WorkerArgs;
use crate::config::Settings;
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
) -> anyhow::Result<()> {
    let db = super::database(&settings).await?;
    let topology = super::topology(&settings);
    let routes = if options.routes.is_empty() {
        topology.routes()
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
            url: settings.rabbitmq_url.clone(),
            topology: topology.clone(),
            queues: queues.clone(),
            prefetch,
            name: format!("kobe worker {}", settings.amqp_prefix),
        },
        deliveries_tx,
    )
    .context("failed to start the consumer")?;
    let cache = super::cache(&settings)?;
    let writer = super::writer(&settings, &db);
    let submitter = super::submitter(
        &settings,
        &db,
        cache.clone(),
        publisher.clone(),
        writer.clone(),
    );
    let context = Arc::new(TaskContext {
        leases: LeaseRepository::new(&db),
        checkpoints: CheckpointRepository::new(&db),
        shards: ShardRepository::new(&db),
        spawner: Arc::new(WorkerSpawner { submitter }),
    });
    let mut watched = queues.clone();
    watched.push(topology.dead_letter_queue());
    let worker = Worker::new(
        registry,
        Services {
            tasks: TaskRepository::new(&db),
            errors: ErrorLogRepository::new(&db),
            payloads: PayloadRepository::new(&db),
            reader: crate::store::lookup::BatchReader::start(
                db.clone(),
                settings.batch_linger,
                std::time::Duration::from_secs(10),
            ),
            writer,
            cache,
            publisher,
            topology,
            settler: consumer.settler(),
            liveness: consumer.liveness(),
            context,
        },
        WorkerConfig {
            concurrency: options.concurrency,
            slot_wait: settings.slot_wait,
            unknown_task_grace: settings.unknown_task_grace,
            lease: settings.execution_lease,
            max_deliveries: settings.max_deliveries,
            inline_limit: settings.payload_inline_limit,
            log_payloads: settings.log_payloads,
            result_ttl: settings.result_ttl,
            retry: settings.retry.clone(),
            task_retry: settings.task_retry.clone(),
            shutdown_grace: settings.shutdown_grace,
        },
    );
    tracing::info!(concurrency = options.concurrency, prefetch, queues = ?queues, "worker started");

    let metrics_server = match options.metrics_addr {
        Some(addr) => {
            let server = crate::http::Application::metrics_only(addr)
                .with_context(|| format!("failed to listen on {addr} for metrics"))?;
            tracing::info!(addr = %addr, port = server.port(), "serving worker metrics");
            let handle = server.handle();
            tokio::spawn(server.run_until_stopped());
            Some(handle)
        }
        None => None,
    };
    let depths_stop = super::spawn_queue_depth_watch(&settings, watched);

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
    let _ = depths_stop.send(());
    if let Some(handle) = metrics_server {
        handle.stop(true).await;
    }
    tracing::info!("worker stopped");
    Ok(())
}
