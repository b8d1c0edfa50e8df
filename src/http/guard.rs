//! Authentication and rate limiting for `/task*` (and `/metrics` when configured): one middleware
//! so every protected route gets both, before any handler runs.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, Error, ResponseError};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

fn protected(path: &str, metrics_auth: bool) -> bool {
    path.starts_with("/task")
        || path.starts_with("/ui")
        || path.starts_with("/dlq")
        || (metrics_auth && path == "/metrics")
}

/// Compares against every token without stopping early, in constant time per token, so the
/// answer's timing says nothing about how much of a token was right.
fn token_matches(given: &str, tokens: &[String]) -> bool {
    tokens.iter().fold(false, |found, token| {
        found | bool::from(given.as_bytes().ct_eq(token.as_bytes()))
    })
}

pub async fn guard(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        return next
            .call(request)
            .await
            .map(ServiceResponse::map_into_left_body);
    };
    if !protected(request.path(), state.metrics_auth) {
        return next
            .call(request)
            .await
            .map(ServiceResponse::map_into_left_body);
    }

    let bearer = request
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    let tokens = state.api_tokens.expose();
    if !tokens.is_empty() {
        let authorized = bearer.as_deref().is_some_and(|t| token_matches(t, tokens));
        if !authorized {
            let response = ApiError::Unauthorized.error_response();
            return Ok(request.into_response(response).map_into_right_body());
        }
    }

    if state.rate_limit > 0 {
        // Per token when there is one (a token names a client better than an address), else
        // per peer address. The token itself never reaches Redis: only a hash of it.
        let client = match &bearer {
            Some(token) if !tokens.is_empty() => {
                format!("token:{:016x}", crate::domain::shard::fnv1a64(token))
            }
            _ => format!(
                "ip:{}",
                request
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_else(|| "unknown".into())
            ),
        };
        match state
            .cache
            .over_rate_limit(&client, state.rate_limit, state.rate_window)
            .await
        {
            Ok(Some(retry_after)) => {
                let response = ApiError::RateLimited { retry_after }.error_response();
                return Ok(request.into_response(response).map_into_right_body());
            }
            Ok(None) => {}
            // Redis down: serve rather than refuse everyone; the limit is a courtesy, not a
            // guarantee.
            Err(error) => {
                tracing::warn!(error = %error, "rate limiter unavailable; request allowed")
            }
        }
    }
    next.call(request)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_token_matches() {
        let tokens = vec!["0123456789abcdef".to_owned(), "fedcba9876543210".to_owned()];
        assert!(token_matches("fedcba9876543210", &tokens));
        assert!(!token_matches("0123456789abcde", &tokens));
        assert!(!token_matches("", &tokens));
        assert!(!token_matches("0123456789abcdef0", &tokens));
    }

    #[test]
    fn task_routes_are_protected_and_health_is_not() {
        assert!(protected("/task/start", false));
        assert!(protected("/tasks", false));
        assert!(!protected("/health", true));
        assert!(!protected("/metrics", false));
        assert!(protected("/metrics", true));
    }
}
