//! `kobe serve`: the HTTP API.

use std::net::SocketAddr;

use anyhow::Context;

use crate::config::Settings;
use crate::http::{AppState, Application};
use crate::store::{ErrorLogRepository, PayloadRepository, ShardRepository, TaskRepository};
use crate::submit::outbox::Outbox;
use crate::tasks::Registry;

/// Builds the API's clients from settings. Nothing is contacted yet: the publisher connects in
/// the background and the database on first use, so the API starts (and answers `/health`) while
/// a dependency is still coming up.
pub async fn state(settings: &Settings, registry: Registry) -> anyhow::Result<AppState> {
    let db = super::database(settings).await?;
    let cache = super::cache(settings)?;
    let publisher = super::publisher(settings)?;
    let writer = super::writer(settings, &db);
    let submitter = super::submitter(settings, &db, cache.clone(), publisher, writer);
    let operations = super::operations(
        settings,
        &db,
        submitter.clone(),
        cache.clone(),
        registry.celery_tasks(),
    );
    // This replica competes for the schedules' lead when it has schedules and may fire them.
    let beat_holder =
        (settings.beat.enabled && !registry.schedules().is_empty()).then(crate::beat::holder_name);
    Ok(AppState {
        schedules: registry.schedules().to_vec(),
        leaders: crate::store::LeaderRepository::new(&db),
        beat_holder,
        registry,
        tasks: TaskRepository::new(&db),
        errors: ErrorLogRepository::new(&db),
        shards: ShardRepository::new(&db),
        payloads: PayloadRepository::new(&db),
        workflows: crate::workflow::Workflows::new(
            &db,
            PayloadRepository::new(&db),
            submitter.clone(),
        ),
        submitter,
        dedup_window: settings.submit.dedup_window,
        result_ttl: settings.redis.result_ttl,
        max_body_bytes: settings.api.max_body_bytes,
        bulk_max: settings.api.bulk_max,
        rate_limit: settings.api.rate_limit,
        rate_window: settings.api.rate_window,
        api_tokens: settings.api.tokens.clone(),
        metrics_auth: settings.api.metrics_auth,
        trusted_proxies: settings.api.trusted_proxies.clone(),
        db,
        cache,
        dependency_timeout: settings.dependency_timeout,
        operations,
    })
}

/// Runs until SIGTERM/SIGINT, then stops accepting and lets in-flight requests finish.
pub async fn run(
    settings: Settings,
    addr: Option<SocketAddr>,
    registry: Registry,
) -> anyhow::Result<super::Ended> {
    let addr = addr.unwrap_or(settings.api.addr);
    let state = state(&settings, registry).await?;
    // A schedule's bad workflow stops start-up before anything runs.
    let beat = match state.beat_holder.clone() {
        Some(holder) => super::beat::beat(
            &settings,
            &state.registry,
            state.submitter.clone(),
            &state.db,
            holder,
        )?,
        None => None,
    };
    let outbox = Outbox {
        tasks: state.tasks.clone(),
        submitter: state.submitter.clone(),
        age: settings.submit.outbox_age,
    };
    let background = crate::shutdown::Trigger::default();
    let outbox = tokio::spawn(outbox.run(settings.submit.outbox_interval, background.pulled()));
    let beat = beat.map(|beat| tokio::spawn(beat.run(background.pulled())));
    let celery = spawn_celery_tracking(&settings, &state, background.pulled())?;
    let watched = state.submitter.topology().watched_queues();
    let depths = super::spawn_queue_depth_watch(&settings, watched, &background);
    // Before the listener opens: a SIGTERM from then on is a graceful stop.
    let stop = crate::shutdown::signal();
    let app = Application::build(state, addr, settings.shutdown_grace)
        .with_context(|| format!("failed to listen on {addr}"))?;
    tracing::info!(addr = %addr, port = app.port(), "serving the HTTP API");
    let handle = app.handle();
    tokio::spawn(async move {
        stop.await;
        handle.stop(true).await;
    });
    app.run_until_stopped()
        .await
        .context("HTTP server failed")?;
    background.pull();
    if let Some(beat) = beat {
        let _ = beat.await;
    }
    if let Some(celery) = celery {
        let _ = celery.await;
    }
    let _ = tokio::join!(outbox, depths);
    tracing::info!("HTTP API stopped");
    Ok(super::Ended::Done)
}

/// Takes Celery workers' task events into the store until `shutdown`, when the registry has
/// tasks they run (`kind = "celery"`); `None` when it has none.
pub fn spawn_celery_tracking(
    settings: &Settings,
    state: &AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let names = state.registry.celery_tasks();
    if names.is_empty() {
        return Ok(None);
    }
    let results = settings
        .celery
        .results
        .as_ref()
        .map(|url| {
            crate::store::celery_results::CeleryResults::new(
                url,
                settings.celery.result_expires,
                settings.dependency_timeout,
            )
        })
        .transpose()?;
    let tracking = crate::celery::Tracking {
        tasks: state.tasks.clone(),
        names,
        cache: state.cache.clone(),
        payloads: state.payloads.clone(),
        inline_limit: settings.submit.payload_inline_limit,
        workflows: state.workflows.clone(),
        results,
        reconcile_after: settings.celery.reconcile_after,
    };
    let settings = settings.clone();
    Ok(Some(tokio::spawn(async move {
        let topology = super::topology(&settings);
        if let Err(error) = tracking.run(&settings, topology, shutdown).await {
            tracing::error!(error = %error, "cannot track Celery workers' task events");
        }
    })))
}
