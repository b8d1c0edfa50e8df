//! `kind = "http"`: one attempt is one `POST` of the invocation as JSON to the task's URL.
//!
//! The request carries `Idempotency-Key: <task_id>` (an attempt may be delivered again), the
//! submission's `traceparent`, `X-Kobe-Timestamp: <unix seconds>` and `X-Kobe-Signature:
//! sha256=<hex>`, an HMAC-SHA256 of `<timestamp>.<body>` under a secret from the environment,
//! which the receiver checks — and refuses when the timestamp is stale, so a captured request
//! cannot be replayed later — before trusting the body.
//!
//! The request stays where it was declared: redirects are not followed (a 3xx is the task's
//! failure, naming where it pointed), unless the task says `follow_redirects = "same-origin"`,
//! which follows up to five to the declared scheme, host and port only. A host name that
//! resolves to a loopback or link-local address (DNS rebinding towards a metadata service or a
//! local admin port) is refused, unless the declared host is itself loopback or link-local;
//! `allow_networks` and `deny_networks` narrow the destinations further.
//!
//! The answer decides the outcome:
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | `SUCCESS`, with the body as the result (JSON when it parses, text otherwise) |
//! | 408, 429, 5xx, a timeout, no connection | retry with the task's backoff, no sooner than `Retry-After` (seconds) |
//! | any other 4xx | `FAILURE` without retry, an excerpt of the body as the root cause |
//!
//! The request times out at the task's `time_limit_s`. A cancel (`kobe task cancel`) stops waiting for
//! the answer and ends the task `REVOKED`; the receiver may still act on the request.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use reqwest::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;

use super::destinations::{destinations, GuardedResolver};
use super::fields::{excerpt, field, FieldError};
use crate::config::{redact_url, Secret};
use crate::tasks::{HandlerResult, Invocation, TaskError};

/// The variable holding the signing secret when a task names none.
pub(crate) const DEFAULT_SECRET_VARIABLE: &str = "KOBE_TASK_SIGNING_SECRET";
/// The header carrying the body's signature.
pub(crate) const SIGNATURE_HEADER: &str = "x-kobe-signature";
/// The header carrying the time the signature covers (unix seconds).
pub(crate) const TIMESTAMP_HEADER: &str = "x-kobe-timestamp";
/// Redirects `follow_redirects = "same-origin"` follows at most.
const MAX_REDIRECTS: usize = 5;
/// Most of a response body kept as a result.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Characters of an error body kept as a root cause.
const EXCERPT_CHARS: usize = 500;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The signature of `body` sent at `timestamp` (unix seconds) under `secret`, as the
/// `X-Kobe-Signature` header carries it: HMAC-SHA256 of `<timestamp>.<body>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A declared HTTP call.
pub(crate) struct HttpCall {
    url: reqwest::Url,
    headers: Vec<(HeaderName, Secret<HeaderValue>)>,
    secret: Secret<Vec<u8>>,
    client: reqwest::Client,
}

impl fmt::Debug for HttpCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("HttpCall")
            .field("url", &redact_url(self.url.as_str()))
            .field("headers", &names)
            .finish_non_exhaustive()
    }
}

/// Replaces each `${VAR}` in `value` by the variable's value.
fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "`${` without a closing `}`".to_owned())?;
        let name = &after[..end];
        let resolved = lookup(name).ok_or_else(|| format!("the variable {name} is not set"))?;
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How long the other side asks to wait before trying again (`Retry-After` in seconds).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A redirect the call does not follow: a permanent failure naming where it pointed.
fn not_followed(target: &str, response: &reqwest::Response) -> TaskError {
    let to = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(redact_url)
        .unwrap_or_else(|| "nowhere".into());
    TaskError::Permanent(format!(
        "{target} answered {}, a redirect to {to}: not followed (an http task stays where it was declared; follow_redirects = \"same-origin\" follows redirects to its own origin)",
        response.status()
    ))
}

/// The declared headers, `${VAR}` expanded; their values are secrets.
fn parse_headers(
    headers: &BTreeMap<String, String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(HeaderName, Secret<HeaderValue>)>, FieldError> {
    let mut parsed = Vec::new();
    for (name, value) in headers {
        let at = format!("headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| field(&at, "not a valid header name"))?;
        let value = expand(value, lookup).map_err(|reason| field(&at, reason))?;
        let value =
            HeaderValue::from_str(&value).map_err(|_| field(&at, "not a valid header value"))?;
        parsed.push((header, Secret::new(value)));
    }
    Ok(parsed)
}

/// The secret the request body is signed with, from the variable the task names.
fn signing_secret(
    secret_variable: Option<&str>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, FieldError> {
    let variable = secret_variable.unwrap_or(DEFAULT_SECRET_VARIABLE);
    let secret = lookup(variable).filter(|s| !s.is_empty()).ok_or_else(|| {
        field(
            "signing_secret_env",
            format!("the variable {variable} is not set: it holds the secret the request body is signed with"),
        )
    })?;
    if secret.len() < 16 {
        return Err(field(
            "signing_secret_env",
            format!("the secret in {variable} needs at least 16 characters"),
        ));
    }
    Ok(secret)
}

/// Which redirects the call follows: none, or those to the URL's own origin.
fn redirect_policy(
    follow_redirects: Option<&str>,
    url: &reqwest::Url,
) -> Result<reqwest::redirect::Policy, FieldError> {
    Ok(match follow_redirects {
        None | Some("none") => reqwest::redirect::Policy::none(),
        Some("same-origin") => {
            let origin = url.origin();
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if attempt.url().origin() == origin {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            })
        }
        Some(other) => {
            return Err(field(
                "follow_redirects",
                format!("expected \"none\" or \"same-origin\", got `{other}`"),
            ))
        }
    })
}

impl HttpCall {
    pub(super) fn new(
        url: &str,
        headers: &BTreeMap<String, String>,
        secret_variable: Option<&str>,
        follow_redirects: Option<&str>,
        networks: (&[String], &[String]),
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, FieldError> {
        let url = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| {
                field(
                    "url",
                    format!(
                        "expected an http:// or https:// URL, got `{}`",
                        redact_url(url)
                    ),
                )
            })?;
        let parsed = parse_headers(headers, lookup)?;
        let secret = signing_secret(secret_variable, lookup)?;
        let redirects = redirect_policy(follow_redirects, &url)?;
        let destinations = destinations(&url, networks)?;
        install_tls_provider();
        let client = reqwest::Client::builder()
            // A proxy from the environment (HTTPS_PROXY …) would resolve the name itself, past
            // the resolver that checks every address.
            .no_proxy()
            .user_agent(concat!("kobe/", env!("CARGO_PKG_VERSION")))
            .redirect(redirects)
            .dns_resolver(std::sync::Arc::new(GuardedResolver(std::sync::Arc::new(
                destinations,
            ))))
            .build()
            .map_err(|e| field("url", format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            url,
            headers: parsed,
            secret: Secret::new(secret.into_bytes()),
            client,
        })
    }

    /// One attempt: the request, and what its answer means.
    /// The signed request: its idempotency key is the task id, the signature covers the
    /// timestamp and the body.
    fn request(
        &self,
        invocation: &Invocation,
        body: &[u8],
        limit: Duration,
    ) -> reqwest::RequestBuilder {
        let timestamp = unix_seconds();
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(limit)
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", invocation.task_id.as_str())
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                signature(self.secret.expose(), timestamp, body),
            );
        if let Some(traceparent) = &invocation.traceparent {
            request = request.header("traceparent", traceparent);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value.expose().clone());
        }
        request.body(body.to_vec())
    }

    pub(super) async fn run(
        &self,
        invocation: &Invocation,
        body: &Value,
        limit: Duration,
    ) -> HandlerResult {
        let body = serde_json::to_vec(body)
            .map_err(|e| TaskError::Permanent(format!("cannot encode the request: {e}")))?;
        let request = self.request(invocation, &body, limit);
        let target = redact_url(self.url.as_str());
        let mut cancel = invocation.cancel.clone();
        let sent = tokio::select! {
            sent = request.send() => sent,
            // The other side may still act on the request: it has the idempotency key.
            () = cancel.raised() => {
                return Err(TaskError::Permanent(format!(
                    "cancelled while waiting for {target}"
                )))
            }
        };
        let response = match sent {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(TaskError::Retryable(format!(
                    "{target} did not answer within {limit:?}"
                )))
            }
            Err(e) => {
                return Err(TaskError::Retryable(format!(
                    "cannot reach {target}: {}",
                    without_url(&e)
                )))
            }
        };
        let status = response.status();
        let retry_after = retry_after(&response);
        if status.is_redirection() {
            return Err(not_followed(&target, &response));
        }
        let text = read_capped(response, limit).await?;
        if status.is_success() {
            return Ok(match serde_json::from_str::<Value>(&text) {
                Ok(json) => json,
                Err(_) if text.is_empty() => Value::Null,
                Err(_) => Value::String(text),
            });
        }
        let cause = format!(
            "{target} answered {status}: {}",
            excerpt(text.trim(), EXCERPT_CHARS)
        );
        let transient =
            status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error();
        Err(match (transient, retry_after) {
            (true, Some(after)) => TaskError::RetryAfter { after, cause },
            (true, None) => TaskError::Retryable(cause),
            (false, _) => TaskError::Permanent(cause),
        })
    }
}

/// Installs ring as the process-wide rustls crypto provider (reqwest's TLS needs one; Kobe's
/// MongoDB client uses ring too), unless one is installed already.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest error's text without the URL it carries (which may hold credentials).
fn without_url(error: &reqwest::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    let mut parts = Vec::new();
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    if parts.is_empty() {
        "request failed".to_owned()
    } else {
        parts.join(": ")
    }
}

/// The response body as text, at most [`MAX_RESPONSE_BYTES`]; a longer one fails the attempt.
async fn read_capped(
    mut response: reqwest::Response,
    limit: Duration,
) -> Result<String, TaskError> {
    let mut bytes = Vec::new();
    loop {
        match tokio::time::timeout(limit, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(TaskError::Permanent(format!(
                        "the response body is over {MAX_RESPONSE_BYTES} bytes"
                    )));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Ok(None)) => return Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Ok(Err(e)) => {
                return Err(TaskError::Retryable(format!(
                    "the response broke off: {}",
                    without_url(&e)
                )))
            }
            Err(_) => {
                return Err(TaskError::Retryable(format!(
                    "the response body did not arrive within {limit:?}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_and_the_body() {
        // What a receiver computes: HMAC-SHA256 of `<timestamp>.<body>`.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature(b"Jefe", 1_700_000_000, br#"{"a":1}"#), expected);
        assert_ne!(
            signature(b"Jefe", 1_700_000_001, br#"{"a":1}"#),
            expected,
            "another time, another signature"
        );
    }

    #[test]
    fn references_expand_and_missing_ones_are_named() {
        let lookup = |name: &str| (name == "TOKEN").then(|| "s3cret".to_owned());
        assert_eq!(expand("Bearer ${TOKEN}", &lookup).unwrap(), "Bearer s3cret");
        assert_eq!(expand("plain", &lookup).unwrap(), "plain");
        assert!(expand("${NOPE}", &lookup).unwrap_err().contains("NOPE"));
        assert!(expand("${TOKEN", &lookup).is_err());
    }
}
