//! The HTTP API (actix-web): the app, its shared state, routes and error mapping.
//!
//! [`Application::build`] binds the listener (port 0 in tests) and returns the running server and
//! its port; stopping is the caller's business, so tests and `kobe serve` drive it the same way.

pub mod error;
pub(crate) mod guard;
pub mod openapi;
pub mod routes;
pub mod session;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::{web, App, HttpServer};
use futures_util::FutureExt;
use mongodb::Database;
use tracing::Instrument;

pub use error::ApiError;

use crate::config::Secret;
use crate::store::{Cache, ErrorLogRepository, PayloadRepository, ShardRepository, TaskRepository};
use crate::submit::Submitter;
use crate::tasks::Registry;
use crate::telemetry::metrics::metrics;

/// What every handler can reach.
pub struct AppState {
    pub registry: Registry,
    pub tasks: TaskRepository,
    pub errors: ErrorLogRepository,
    pub shards: ShardRepository,
    pub payloads: PayloadRepository,
    /// Records and publishes tasks.
    pub submitter: Submitter,
    /// Starts workflows and shows them.
    pub workflows: crate::workflow::Workflows,
    /// How long a dedup fingerprint holds.
    pub dedup_window: Duration,
    /// With the result backend on: how long results stay.
    pub result_ttl: Option<Duration>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most tasks in one bulk submission.
    pub bulk_max: usize,
    /// Requests per window per client on `/task*` (0: unlimited).
    pub rate_limit: u32,
    pub rate_window: Duration,
    /// Accepted bearer tokens; empty: no authentication.
    pub api_tokens: Secret<Vec<String>>,
    pub metrics_auth: bool,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<crate::domain::network::Network>,
    pub db: Database,
    pub cache: Cache,
    /// Bound on each readiness probe.
    pub dependency_timeout: Duration,
    /// Cancel, rerun, the dead letters and the overview (`/task/{id}/…`, `/dlq`, `/ui`).
    pub operations: crate::operate::Operations,
    /// The periodic tasks (`/schedules`).
    pub schedules: Vec<crate::domain::schedule::Schedule>,
    pub leaders: crate::store::LeaderRepository,
    /// This replica's name in the schedules' lease, when it competes for it.
    pub beat_holder: Option<String>,
}

/// A route whose other methods answer 405 naming the one it has (`Allow`).
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed { allow })
    }))
}

/// A bound, running HTTP server.
pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Binds `addr` and builds the server; it runs when awaited.
    pub fn build(
        state: AppState,
        addr: SocketAddr,
        shutdown_timeout: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(state);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(actix_web::middleware::from_fn(guard::guard))
                .wrap_fn(|request, service| {
                    let method = request.method().to_string();
                    let route = request
                        .match_pattern()
                        .unwrap_or_else(|| "unmatched".to_owned());
                    let span = tracing::info_span!("http.request", http.method = %method, http.route = %route);
                    let started = Instant::now();
                    service
                        .call(request)
                        .instrument(span)
                        .map(move |result| {
                            if let Ok(response) = &result {
                                let status = response.status().as_u16().to_string();
                                metrics()
                                    .http_requests
                                    .with_label_values(&[&route, &method, &status])
                                    .inc();
                                metrics()
                                    .http_request_duration
                                    .with_label_values(&[&route, &method])
                                    .observe(started.elapsed().as_secs_f64());
                            }
                            result
                        })
                })
                .service(resource("/task", "GET").route(web::get().to(routes::search::search)))
                .service(resource("/task/start", "POST").route(web::post().to(routes::submit::start)))
                .service(resource("/task/start_many", "POST").route(web::post().to(routes::bulk::start_many)))
                .service(resource("/task/status/{id}", "GET").route(web::get().to(routes::status::status)))
                .service(resource("/task/result/{id}", "GET").route(web::get().to(routes::status::result)))
                .service(resource("/task/{id}/retry", "POST").route(web::post().to(routes::actions::retry)))
                .service(resource("/task/{id}/cancel", "POST").route(web::post().to(routes::actions::cancel)))
                .service(resource("/workflow/start", "POST").route(web::post().to(routes::workflow::start)))
                .service(resource("/workflow/{id}", "GET").route(web::get().to(routes::workflow::show)))
                .service(resource("/workflow/{id}/cancel", "POST").route(web::post().to(routes::workflow::cancel)))
                .service(resource("/tasks", "GET").route(web::get().to(routes::catalog::list)))
                .service(resource("/schedules", "GET").route(web::get().to(routes::schedules::list)))
                .service(resource("/health", "GET").route(web::get().to(routes::health::health)))
                .service(resource("/ready", "GET").route(web::get().to(routes::health::ready)))
                .service(resource("/metrics", "GET").route(web::get().to(routes::metrics::metrics)))
                .service(resource("/openapi.json", "GET").route(web::get().to(routes::docs::openapi)))
                .service(resource("/docs", "GET").route(web::get().to(routes::docs::page)))
                .service(resource("/dlq", "GET").route(web::get().to(routes::dlq::list)))
                .service(resource("/dlq/replay", "POST").route(web::post().to(routes::dlq::replay)))
                .service(resource("/dlq/purge", "POST").route(web::post().to(routes::dlq::purge)))
                .service(resource("/dlq/{task_id}", "GET").route(web::get().to(routes::dlq::show)))
                .service(resource("/ui", "GET").route(web::get().to(routes::ui::overview)))
                .service(
                    web::resource("/ui/login")
                        .route(web::get().to(routes::ui::login_form))
                        .route(web::post().to(routes::ui::login)),
                )
                .service(resource("/ui/logout", "POST").route(web::post().to(routes::ui::logout)))
                .service(resource("/ui/task/{id}", "GET").route(web::get().to(routes::ui::task)))
                .service(resource("/ui/workflow/{id}", "GET").route(web::get().to(routes::workflow_page::show)))
                .service(resource("/docs/{asset}", "GET").route(web::get().to(routes::docs::asset)))
                .default_service(web::to(routes::not_found))
        })
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(shutdown_timeout.as_secs().max(1))
        .run();
        Ok(Self { port, server })
    }

    /// A server with `/metrics` and `/health` alone, for `worker --metrics-addr`.
    pub(crate) fn metrics_only(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let port = listener.local_addr()?.port();
        let server = HttpServer::new(|| {
            App::new()
                .service(resource("/metrics", "GET").route(web::get().to(routes::metrics::metrics)))
                .service(resource("/health", "GET").route(web::get().to(routes::health::health)))
                .default_service(web::to(routes::not_found))
        })
        .workers(1)
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(1)
        .run();
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server (gracefully: in-flight requests finish).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
