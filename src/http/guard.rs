//! Authentication and rate limiting: one middleware so every protected route gets both, before
//! any handler runs.
//!
//! Protected is the default. Only a short list of paths is public (health, readiness, the API
//! description and its page, the sign-in form, `/metrics` unless configured otherwise), and a
//! path is public only when its fully percent-decoded form is one of them exactly: whatever
//! spelling of a protected path the router would serve — percent-encoded, doubled or trailing
//! slashes, dot segments, a path no route has — is protected.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, Error, ResponseError};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// The cookie `/ui/login` sets, so a browser on the operator page is let in behind tokens.
pub const SESSION_COOKIE: &str = "kobe_session";

fn protected(path: &str, metrics_auth: bool) -> bool {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let public = match decoded.as_ref() {
        "/health" | "/ready" | "/openapi.json" | "/docs" | "/ui/login" => true,
        "/metrics" => !metrics_auth,
        other => other.strip_prefix("/docs/").is_some_and(|asset| {
            !asset.is_empty() && !asset.contains('/') && !asset.contains("..")
        }),
    };
    !public
}

/// Compares against every token without stopping early, in constant time, so the answer's
/// timing says nothing about how much of a token was right — nor how long it is: what is
/// compared are digests of equal length.
pub(crate) fn token_matches(given: &str, tokens: &[String]) -> bool {
    use sha2::Digest;
    let given = sha2::Sha256::digest(given.as_bytes());
    tokens.iter().fold(false, |found, token| {
        let token = sha2::Sha256::digest(token.as_bytes());
        found | bool::from(given.as_slice().ct_eq(token.as_slice()))
    })
}

/// Whether the request carries one of the API tokens (or no tokens are configured).
pub fn authorized(request: &actix_web::HttpRequest, tokens: &[String]) -> bool {
    tokens.is_empty() || credential(request.headers()).is_some_and(|t| token_matches(&t, tokens))
}

/// The bearer token, else the session cookie's.
fn credential(headers: &actix_web::http::header::HeaderMap) -> Option<String> {
    headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned)
        .or_else(|| session_token(headers))
}

/// The token in the session cookie, if the request has one. The cookie is `SameSite=Strict`, so
/// another site's page cannot make a browser send it.
pub fn session_token(headers: &actix_web::http::header::HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
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

    let bearer = credential(request.headers());
    let tokens = state.api_tokens.expose();
    if !tokens.is_empty() {
        let authorized = bearer.as_deref().is_some_and(|t| token_matches(t, tokens));
        if !authorized {
            // A browser on the operator page is sent to sign in; API clients get the 401.
            let response = if request.path().starts_with("/ui") {
                actix_web::HttpResponse::SeeOther()
                    .insert_header(("Location", "/ui/login"))
                    .finish()
            } else {
                ApiError::Unauthorized.error_response()
            };
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
        assert!(protected("/ui", false));
        assert!(!protected("/ui/login", false));
        assert!(!protected("/docs/swagger-ui.css", false));
    }

    #[test]
    fn no_spelling_of_a_protected_path_is_public() {
        for path in [
            "/%74ask/start",
            "/%64lq",
            "/%64lq/purge",
            "//task/start",
            "/task//start",
            "/task/start/",
            "/%75i",
            "/health/../dlq",
            "/health%2F..%2Fdlq",
            "/docs/..%2Fdlq",
            "/docs/a/b",
            "/",
            "/no-such-route",
        ] {
            assert!(protected(path, true), "{path} is public");
        }
        assert!(protected("/%6detrics", true));
        assert!(
            !protected("/%68ealth", true),
            "a spelling of a public path is public"
        );
    }

    #[test]
    fn a_token_of_another_length_is_refused_like_any_other() {
        let tokens = vec!["0123456789abcdef".to_owned()];
        assert!(!token_matches("0", &tokens));
        assert!(!token_matches(&"x".repeat(1000), &tokens));
        assert!(token_matches("0123456789abcdef", &tokens));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = actix_web::http::header::HeaderMap::new();
        headers.insert(
            actix_web::http::header::COOKIE,
            "a=1; kobe_session=0123456789abcdef ; b=2".parse().unwrap(),
        );
        assert_eq!(session_token(&headers).as_deref(), Some("0123456789abcdef"));
        let mut empty = actix_web::http::header::HeaderMap::new();
        empty.insert(
            actix_web::http::header::COOKIE,
            "kobe_session=".parse().unwrap(),
        );
        assert_eq!(session_token(&empty), None);
    }
}
