//! Sessions of the operator page: `/ui/login` trades an API token for a random session id kept
//! in Redis with an expiry, never the token itself. The cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` over TLS or behind a proxy that says so) carries only the id; Redis knows it by a
//! digest, so a copy of Redis holds no usable cookie. A session lasts `SESSION_TTL`, ends at
//! sign-out, and stops working as soon as the token it was opened with leaves `KOBE_API_TOKENS`.
//!
//! A cookie is sent by the browser whatever page asked, so a request it authenticates that
//! changes anything must come from the page: same origin (`Sec-Fetch-Site`, `Origin`) and the
//! session's CSRF token in `CSRF_HEADER`, which only the page's own script can read.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::store::{Cache, StoreError};

/// The cookie that carries the session id.
pub(crate) const SESSION_COOKIE: &str = "kobe_session";
/// The header the page's script sends its CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-kobe-csrf";
/// How long a session lasts.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// What Redis keeps of a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Who signed in, as the task history names them (the token's fingerprint).
    pub by: String,
    /// The token's digest: the session ends when no configured token has it.
    token_digest: String,
    /// Sent by the page with every request that changes something.
    pub csrf: String,
}

fn digest(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The session id in the request's cookie, if it has one. The cookie is `SameSite=Strict`, so
/// another site's page cannot make a browser send it (another port of the same host can: hence
/// [`cross_site`]).
pub(crate) fn id_in(headers: &actix_web::http::header::HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Opens a session for `token` (already checked); returns its id, for the cookie.
pub async fn open(cache: &Cache, token: &str, by: String) -> Result<String, StoreError> {
    let id = random_hex();
    let session = Session {
        by,
        token_digest: digest(token),
        csrf: random_hex(),
    };
    let json = serde_json::to_string(&session).unwrap_or_default();
    cache.put_session(&digest(&id), &json, SESSION_TTL).await?;
    Ok(id)
}

/// The live session `id` names, if any: unknown, expired, or opened with a token that is no
/// longer configured is none.
pub async fn find(
    cache: &Cache,
    id: &str,
    tokens: &[String],
) -> Result<Option<Session>, StoreError> {
    let Some(json) = cache.session(&digest(id)).await? else {
        return Ok(None);
    };
    let Ok(session) = serde_json::from_str::<Session>(&json) else {
        return Ok(None);
    };
    let still_configured = tokens.iter().any(|t| digest(t) == session.token_digest);
    Ok(still_configured.then_some(session))
}

/// Ends session `id`.
pub async fn close(cache: &Cache, id: &str) -> Result<(), StoreError> {
    cache.drop_session(&digest(id)).await
}

/// The `Set-Cookie` value for session `id` (`None`: the cookie that clears it).
pub fn cookie(id: Option<&str>, secure: bool) -> String {
    let (value, age) = match id {
        Some(id) => (id, SESSION_TTL.as_secs()),
        None => ("", 0),
    };
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}={value}; Path=/; Max-Age={age}; HttpOnly; SameSite=Strict{secure}")
}

/// Whether the request came over TLS, or through a proxy that says it did.
pub(crate) fn over_tls(request: &actix_web::HttpRequest) -> bool {
    request.connection_info().scheme() == "https"
        || request
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// Why a cookie-authenticated request that changes something is not from the page, if it is not.
pub(crate) fn cross_site(
    headers: &actix_web::http::header::HeaderMap,
    host: &str,
    session: &Session,
) -> Option<&'static str> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" {
            return Some("the request came from another site or origin (Sec-Fetch-Site)");
        }
    }
    if let Some(origin) = text("origin") {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if origin_host != host {
            return Some("the request came from another origin (Origin)");
        }
    }
    let sent = text(CSRF_HEADER).unwrap_or_default();
    let expected = session.csrf.as_bytes();
    use subtle::ConstantTimeEq;
    if sent.len() != expected.len() || !bool::from(sent.as_bytes().ct_eq(expected)) {
        return Some("the page's CSRF token is missing or wrong (X-Kobe-CSRF)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            by: "api:token-00".into(),
            token_digest: digest("t"),
            csrf: "c".repeat(64),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> actix_web::http::header::HeaderMap {
        let mut headers = actix_web::http::header::HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                actix_web::http::header::HeaderName::from_static(name),
                value.parse().unwrap(),
            );
        }
        headers
    }

    #[test]
    fn only_the_page_itself_may_change_things_with_the_cookie() {
        let s = session();
        let csrf = s.csrf.clone();
        let host = "127.0.0.1:8000";
        let own = headers(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://127.0.0.1:8000"),
            ("x-kobe-csrf", &csrf),
        ]);
        assert_eq!(cross_site(&own, host, &s), None);
        let sibling = headers(&[("sec-fetch-site", "same-site"), ("x-kobe-csrf", &csrf)]);
        assert!(cross_site(&sibling, host, &s).is_some());
        let other_port = headers(&[("origin", "http://127.0.0.1:9000"), ("x-kobe-csrf", &csrf)]);
        assert!(cross_site(&other_port, host, &s).is_some());
        let no_token = headers(&[("sec-fetch-site", "same-origin")]);
        assert!(cross_site(&no_token, host, &s).is_some());
        let wrong = headers(&[("x-kobe-csrf", "nope")]);
        assert!(cross_site(&wrong, host, &s).is_some());
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = actix_web::http::header::HeaderMap::new();
        headers.insert(
            actix_web::http::header::COOKIE,
            "a=1; kobe_session=0123456789abcdef ; b=2".parse().unwrap(),
        );
        assert_eq!(id_in(&headers).as_deref(), Some("0123456789abcdef"));
        let mut empty = actix_web::http::header::HeaderMap::new();
        empty.insert(
            actix_web::http::header::COOKIE,
            "kobe_session=".parse().unwrap(),
        );
        assert_eq!(id_in(&empty), None);
    }

    #[test]
    fn the_cookie_holds_the_id_only_and_is_secure_over_tls() {
        let c = cookie(Some("abc"), true);
        assert!(
            c.starts_with("kobe_session=abc;")
                && c.contains("HttpOnly")
                && c.contains("SameSite=Strict")
                && c.ends_with("; Secure"),
            "{c}"
        );
        assert!(!cookie(Some("abc"), false).contains("Secure"));
        assert!(cookie(None, false).contains("Max-Age=0"));
    }
}
