//! `GET /metrics`: Prometheus text format.

use actix_web::HttpResponse;

/// Prometheus metrics (text format). Needs a token when `KOBE_METRICS_AUTH=true`.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::telemetry::metrics::metrics().render())
}
