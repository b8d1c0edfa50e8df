//! `GET /metrics`: Prometheus text format.

use actix_web::{web, HttpResponse};

use crate::http::AppState;

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
