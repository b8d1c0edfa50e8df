//! Liveness (`/health`: the process answers) and readiness (`/ready`: every dependency answers
//! within the probe timeout).

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::http::AppState;

/// Liveness: answers while the process runs.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Alive")))]
#[tracing::instrument(name = "http.health", skip_all)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: 200 when RabbitMQ, MongoDB and Redis answer within the probe timeout, 503 naming
/// the ones that do not. `rabbitmq_nodes` says which of the configured broker nodes accept a TCP
/// connection: with a cluster, one node down is reported there and is not a failure while the
/// publisher is connected to another. With `KOBE_API_TOKENS` set, a caller without a token learns
/// only which dependency is ok or not: the errors (driver texts, host names) are for the token's
/// holders, and for the log.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "Every dependency answers"),
    (status = 503, description = "`failed` lists the dependencies that do not"),
))]
#[tracing::instrument(name = "http.ready", skip_all)]
pub async fn ready(request: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let timeout = state.dependency_timeout;
    let (rabbitmq, mongodb, redis) = tokio::join!(
        bounded(timeout, "rabbitmq", async {
            state
                .submitter
                .publisher()
                .connected()
                .map_err(|e| e.to_string())
        }),
        bounded(timeout, "mongodb", async {
            crate::store::ping(&state.db)
                .await
                .map_err(|e| e.to_string())
        }),
        bounded(timeout, "redis", async {
            state.cache.ping().await.map_err(|e| e.to_string())
        }),
    );
    let nodes = rabbitmq_nodes(&state.operations.url, timeout).await;
    let checks = [rabbitmq, mongodb, redis];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, e)| e.is_some())
        .map(|(n, _)| *n)
        .collect();
    for (name, error) in &checks {
        if let Some(error) = error {
            tracing::warn!(dependency = name, error = %error, "not ready");
        }
    }
    let detailed = crate::http::guard::authorized(&request, state.api_tokens.expose());
    let mut body = json!({
        "status": if failed.is_empty() { "ready" } else { "unavailable" },
        "failed": failed,
        "checks": checks
            .iter()
            .map(|(name, error)| {
                let check = if detailed {
                    json!({"ok": error.is_none(), "error": error})
                } else {
                    json!({"ok": error.is_none()})
                };
                (name.to_string(), check)
            })
            .collect::<serde_json::Map<_, _>>(),
    });
    if detailed {
        body["rabbitmq_nodes"] = json!(nodes);
    } else {
        body["rabbitmq_nodes"] = json!(nodes
            .iter()
            .map(|n| json!({"reachable": n["reachable"]}))
            .collect::<Vec<_>>());
    }
    if failed.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn bounded(
    timeout: std::time::Duration,
    name: &'static str,
    check: impl std::future::Future<Output = Result<(), String>>,
) -> (&'static str, Option<String>) {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(())) => (name, None),
        Ok(Err(e)) => (name, Some(e)),
        Err(_) => (name, Some(format!("no answer within {timeout:?}"))),
    }
}

/// Whether each configured broker node accepts a TCP connection (cheap enough for a probe).
async fn rabbitmq_nodes(
    url: &crate::config::ServiceUrl,
    timeout: std::time::Duration,
) -> Vec<serde_json::Value> {
    let probes = crate::amqp::node_addresses(url)
        .into_iter()
        .map(|(shown, address)| async move {
            let reachable = match address {
                Some(address) => matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            json!({"node": shown, "reachable": reachable})
        });
    futures_util::future::join_all(probes).await
}
