//! `kobe serve`: the HTTP API.

use std::net::SocketAddr;

use anyhow::Context;

use crate::amqp::Publisher;
use crate::config::Settings;
use crate::http::{AppState, Application};
use crate::store::{self, Cache, TaskRepository};
use crate::tasks::Registry;
use crate::telemetry::metrics::Metrics;

/// Builds the API's clients from settings. Nothing is contacted yet: the publisher connects in
/// the background and the database on first use, so the API starts (and answers `/health`) while
/// a dependency is still coming up.
pub async fn state(settings: &Settings, registry: Registry) -> anyhow::Result<AppState> {
    let db = store::connect(
        &settings.mongodb_uri,
        &settings.mongodb_db,
        settings.dependency_timeout,
    )
    .await
    .context("failed to configure the MongoDB client")?;
    let cache = Cache::new(
        &settings.redis_url,
        &settings.redis_prefix,
        settings.dependency_timeout,
    )
    .context("failed to configure the Redis pool")?;
    let topology = super::topology(settings);
    let publisher = Publisher::start(
        &settings.rabbitmq_url,
        topology.clone(),
        settings.publish_timeout,
    )
    .context("failed to start the publisher")?;
    Ok(AppState {
        registry,
        tasks: TaskRepository::new(&db),
        publisher,
        topology,
        metrics: Metrics::new(),
        db,
        cache,
        dependency_timeout: settings.dependency_timeout,
    })
}

/// Runs until SIGTERM/SIGINT, then stops accepting and lets in-flight requests finish.
pub async fn run(settings: Settings, addr: Option<SocketAddr>) -> anyhow::Result<()> {
    let addr = addr.unwrap_or(settings.http_addr);
    let state = state(&settings, Registry::with_builtin_tasks()).await?;
    let app = Application::build(state, addr, settings.shutdown_grace)
        .with_context(|| format!("failed to listen on {addr}"))?;
    tracing::info!(addr = %addr, port = app.port(), "serving the HTTP API");
    let handle = app.handle();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        handle.stop(true).await;
    });
    app.run_until_stopped()
        .await
        .context("HTTP server failed")?;
    tracing::info!("HTTP API stopped");
    Ok(())
}
