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
use actix_web::{web, Error, HttpMessage, ResponseError};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

use super::session;

/// Who a request was authenticated as, for the handlers (the task history's `by`), and the CSRF
/// token of its page session, if it came with one.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub by: String,
    pub csrf: Option<String>,
}

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
        let token = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes());
        found | bool::from(given.as_slice().ct_eq(token.as_slice()))
    })
}

/// The bearer token, if the request has one.
fn bearer(headers: &actix_web::http::header::HeaderMap) -> Option<String> {
    headers
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned)
}

/// Whether the request carries one of the API tokens as its bearer (or no tokens are
/// configured). For answers that say more to a token's holder (`/ready`).
pub(crate) fn authorized(request: &actix_web::HttpRequest, tokens: &[String]) -> bool {
    tokens.is_empty() || bearer(request.headers()).is_some_and(|t| token_matches(&t, tokens))
}

/// A body declared as something other than JSON: its content type.
fn not_json(request: &ServiceRequest) -> Option<String> {
    let headers = request.headers();
    let has_body = headers.contains_key("transfer-encoding")
        || headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    if !has_body {
        return None;
    }
    // No type at all is read as JSON (and is a 400 if it is not): only a type that says
    // otherwise — text/plain, a form — is refused. A cookie's page session needs its CSRF token
    // whatever the body.
    let content_type = headers.get("content-type")?.to_str().unwrap_or("");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"));
    (!json).then(|| content_type.to_owned())
}

/// Runs a Redis call as a task of its own: polled from the runtime rather than from inside the
/// middleware chain, so the reply parser's deep stack does not sit on top of the chain's.
async fn off_stack<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T, crate::store::StoreError>> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    tokio::spawn(call).await.unwrap_or_else(|e| {
        Err(crate::store::StoreError::Redis(
            crate::cause::Cause::context("the Redis call stopped", e),
        ))
    })
}

/// Whether the method may change something (the ones a CSRF check guards).
fn changes_state(method: &actix_web::http::Method) -> bool {
    !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS")
}

fn refuse<B>(request: ServiceRequest, error: ApiError) -> ServiceResponse<EitherBody<B>> {
    // A browser on the operator page is sent to sign in; API clients get the 401.
    let response = if matches!(error, ApiError::Unauthorized) && request.path().starts_with("/ui") {
        actix_web::HttpResponse::SeeOther()
            .insert_header(("Location", "/ui/login"))
            .finish()
    } else {
        error.error_response()
    };
    request.into_response(response).map_into_right_body()
}

pub(crate) async fn guard(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    // The decision runs boxed and is done before the handler starts: the handler's (large)
    // future then runs on a stack that holds little of the guard's.
    if let Err(refused) = Box::pin(admit(&request)).await {
        return Ok(refuse(request, refused));
    }
    Box::pin(next.call(request))
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// Lets the request through, or says why not: its token or page session (recorded in the
/// request as its [`Caller`]), the page's origin and CSRF token, a JSON body, the rate limit.
async fn admit(request: &ServiceRequest) -> Result<(), ApiError> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(());
    };
    if !protected(request.path(), state.metrics_auth) {
        return Ok(());
    }
    let tokens = state.api_tokens.expose();
    // Who the request is, and the name the rate limit counts it under.
    let mut limited_as = None;
    let address = || {
        format!(
            "ip:{}",
            client_address(request.request(), &state.trusted_proxies)
        )
    };
    if !tokens.is_empty() {
        let Some((caller, key)) = identify(request, &state).await? else {
            // Wrong tokens count against the sender's address: guessing is limited too.
            if state.rate_limit > 0 {
                count(&state, address(), 1).await?;
            }
            return Err(ApiError::Unauthorized);
        };
        request.extensions_mut().insert(caller);
        limited_as = Some(key);
    }
    if changes_state(request.method()) {
        if let Some(content_type) = not_json(request) {
            return Err(ApiError::UnsupportedMediaType(content_type));
        }
    }
    if state.rate_limit > 0 {
        // Per token (or page session) when there is one — it names a client better than an
        // address — else per peer address.
        let client = limited_as.unwrap_or_else(address);
        request.extensions_mut().insert(RateKey(client.clone()));
        count(&state, client, 1).await?;
    }
    Ok(())
}

/// The address a request came from: its connection's, or — when that is a trusted proxy — the
/// last one its `X-Forwarded-For` names that is not itself a trusted proxy (what a client puts
/// first in the header is its own say, and not believed).
pub(crate) fn client_address(
    request: &actix_web::HttpRequest,
    trusted: &[crate::domain::network::Network],
) -> String {
    let Some(peer) = request.peer_addr().map(|a| a.ip()) else {
        return "unknown".into();
    };
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer.to_string();
    }
    let forwarded: Vec<std::net::IpAddr> = request
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| part.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(*ip))
        .unwrap_or(peer)
        .to_string()
}

/// The name the rate limit counted a request under, for a handler that counts more.
#[derive(Clone)]
struct RateKey(String);

/// Counts `cost` requests of `client`; the 429 when that is over the limit.
async fn count(state: &AppState, client: String, cost: u32) -> Result<(), ApiError> {
    let (cache, limit, window) = (state.cache.clone(), state.rate_limit, state.rate_window);
    match off_stack(async move { cache.over_rate_limit(&client, limit, window, cost).await }).await
    {
        Ok(Some(retry_after)) => Err(ApiError::RateLimited { retry_after }),
        Ok(None) => Ok(()),
        // Redis down: serve rather than refuse everyone; the limit is a courtesy, not a
        // guarantee.
        Err(error) => {
            tracing::warn!(error = %error, "rate limiter unavailable; request allowed");
            Ok(())
        }
    }
}

/// Counts `more` requests against the limit for a request the guard let through as one (a bulk
/// submission counts each of its items); the 429 when they put its client over the limit.
pub(crate) async fn count_more(
    request: &actix_web::HttpRequest,
    state: &AppState,
    more: usize,
) -> Result<(), ApiError> {
    let key = request.extensions().get::<RateKey>().cloned();
    match key {
        Some(RateKey(client)) if more > 0 => {
            count(state, client, u32::try_from(more).unwrap_or(u32::MAX)).await
        }
        _ => Ok(()),
    }
}

/// The caller a request's bearer token or page session names, with its rate-limit key; `None`
/// when it has neither, or one that is not valid.
async fn identify(
    request: &ServiceRequest,
    state: &AppState,
) -> Result<Option<(Caller, String)>, ApiError> {
    let tokens = state.api_tokens.expose();
    if let Some(token) = bearer(request.headers()) {
        return Ok(token_matches(&token, tokens).then(|| {
            // The token itself never reaches Redis or a log: a digest of it does.
            let key = format!("token:{:016x}", crate::domain::shard::fnv1a64(&token));
            let by = requester_of(Some(&token));
            (Caller { by, csrf: None }, key)
        }));
    }
    let Some(id) = session::id_in(request.headers()) else {
        return Ok(None);
    };
    let (cache, tokens) = (state.cache.clone(), tokens.to_vec());
    let Some(found) = off_stack(async move { session::find(&cache, &id, &tokens).await })
        .await
        .map_err(ApiError::store)?
    else {
        return Ok(None);
    };
    if changes_state(request.method()) {
        let host = request.connection_info().host().to_owned();
        if let Some(why) = session::cross_site(request.headers(), &host, &found) {
            tracing::warn!(path = %request.path(), why, "refused a cookie-authenticated request not from the page");
            return Err(ApiError::Forbidden(format!(
                "refused: {why}; the page's own buttons send it"
            )));
        }
    }
    let key = format!("session:{}", found.by);
    Ok(Some((
        Caller {
            by: found.by,
            csrf: Some(found.csrf),
        },
        key,
    )))
}

/// Who asked, for the task's history and the log: the token's fingerprint, never the token.
pub(crate) fn requester(request: &actix_web::HttpRequest) -> String {
    use actix_web::HttpMessage;
    match request.extensions().get::<Caller>() {
        Some(caller) => caller.by.clone(),
        None => requester_of(None),
    }
}

/// Who a token names, for the log and a task's history: its fingerprint, never the token.
pub(crate) fn requester_of(token: Option<&str>) -> String {
    match token {
        Some(token) => {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes());
            format!("api:token-{}", hex::encode(&digest[..4]))
        }
        None => "api:anonymous".into(),
    }
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
}
