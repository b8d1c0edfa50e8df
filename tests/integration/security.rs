//! The API as an attacker meets it, with `KOBE_API_TOKENS` set: every spelling of every
//! protected route, the operator page's cookie ridden from another origin, sessions that end.

use crate::common;

use std::time::Duration;

use common::{Running, TestApi, TestEnv};
use serde_json::{json, Value};

const TOKEN: &str = "security-test-token-0123456789";

/// Spellings of `path` a router or a client might treat as the same path.
fn spellings(path: &str) -> Vec<String> {
    let encoded_first = {
        let mut chars = path.chars();
        chars.next(); // the leading slash
        let first = chars.next().unwrap();
        format!("/%{:02X}{}", first as u32, chars.as_str())
    };
    let mut doubled = path.replacen('/', "//", 1);
    if let Some(i) = path[1..].find('/') {
        doubled = format!("{}/{}", &path[..=i], &path[i + 1..]);
    }
    vec![
        path.to_owned(),
        encoded_first,
        format!("/{path}"),
        doubled,
        format!("{path}/"),
    ]
}

/// Every route of the OpenAPI document that is not public, with its path parameters filled in.
async fn protected_routes(api: &common::TestApi) -> Vec<(String, String)> {
    let document: Value = api.get("/openapi.json").await.json().await.unwrap();
    let public = ["/health", "/ready", "/openapi.json", "/docs", "/ui/login"];
    let mut routes = Vec::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        if public.contains(&path.as_str()) || path == "/metrics" {
            continue;
        }
        let filled = path
            .split('/')
            .map(|part| {
                if part.starts_with('{') {
                    "0b7e5ad2-4c1f-4a57-9a8e-2f0c5a1c0d11"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in operations.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), filled.clone()));
        }
    }
    assert!(routes.len() >= 10, "{routes:?}");
    routes
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> u16 {
    let url = format!("{base}{path}");
    let mut request = client.request(method.parse().unwrap(), url);
    if method == "POST" {
        request = request.json(&json!({"task_name": "demo_long_io", "confirm": true, "all": true}));
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_protected_route_is_served_without_a_token_or_past_the_limit() {
    let env = TestEnv::with(&[
        ("KOBE_API_TOKENS", TOKEN),
        ("KOBE_METRICS_AUTH", "true"),
        ("KOBE_RATE_LIMIT", "3"),
        ("KOBE_RATE_WINDOW_MS", "600000"),
    ])
    .await;
    env.init_db().await;
    let api = env.spawn_api().await;
    // A raw client: reqwest sends the path as it is given (no normalising of slashes or escapes).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut routes = protected_routes(&api).await;
    routes.push(("GET".into(), "/metrics".into()));
    for (method, path) in &routes {
        for spelled in spellings(path) {
            let status = send(&client, &api.address, method, &spelled, None).await;
            let expected = if spelled.starts_with("/ui") || spelled.starts_with("/%75i") {
                303 // a browser is sent to sign in
            } else {
                401
            };
            // Past the limit (wrong and missing tokens count against the address): 429.
            assert!(
                status == expected || status == 429,
                "{method} {spelled} without a token: {status}"
            );
        }
    }
    // Past the limit whatever the spelling: the token is counted, not the path.
    let mut statuses = Vec::new();
    for spelled in spellings("/tasks") {
        statuses.push(send(&client, &api.address, "GET", &spelled, Some(TOKEN)).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    // Nothing was submitted, purged or replayed.
    let recorded = env
        .db
        .collection::<mongodb::bson::Document>("Tasks")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    api.handle.stop(false).await;
}

/// Signs in and returns (the session cookie, the page's CSRF token).
async fn sign_in(client: &reqwest::Client, base: &str) -> (String, String) {
    let signed_in = client
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    let session = cookie.split(';').next().unwrap().to_owned();
    let html = client
        .get(format!("{base}/ui"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = html
        .split("name=\"kobe-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    (session, csrf)
}

/// How many dead letters `GET /dlq` lists.
pub(crate) async fn dead_letters(api: &TestApi, token: &str) -> usize {
    let letters: Value = api.get_as("/dlq", token).await.json().await.unwrap();
    letters["letters"].as_array().unwrap().len()
}

/// A task that fails once with no retries left (`KOBE_RETRY_MAX=0`): its dead letter, once its
/// message is settled. Needs a worker running.
pub(crate) async fn a_dead_letter(env: &TestEnv, api: &TestApi, token: &str) -> String {
    let id = api
        .client
        .post(format!("{}/task/start", api.address))
        .bearer_auth(token)
        .json(
            &json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.wait_final(&id, Duration::from_secs(20)).await;
    env.wait_queue_empty("default", "settled").await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_cookie_cannot_be_ridden_from_another_origin_and_sessions_end() {
    let Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_API_TOKENS", TOKEN), ("KOBE_RETRY_MAX", "0")], 2).await;
    // One dead letter to protect.
    a_dead_letter(&env, &api, TOKEN).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (session, csrf) = sign_in(&client, &api.address).await;
    assert!(!session.contains(TOKEN));
    let purge =
        |headers: Vec<(&'static str, String)>, body: &'static str, content_type: &'static str| {
            let mut request = client
                .post(format!("{}/dlq/purge", api.address))
                .header("cookie", &session)
                .header("content-type", content_type)
                .body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.send()
        };
    let confirm = "{\"confirm\":true}";
    // What the page's own script sends beside the cookie.
    let from_page = || {
        vec![
            ("x-kobe-csrf", csrf.clone()),
            ("sec-fetch-site", "same-origin".to_owned()),
        ]
    };
    // A page on another port of this host (same site, so SameSite=Strict sends the cookie):
    // a "simple" text/plain request with no preflight.
    let sibling = purge(
        vec![
            ("origin", "http://127.0.0.1:1".into()),
            ("sec-fetch-site", "same-site".into()),
        ],
        confirm,
        "text/plain",
    )
    .await
    .unwrap();
    assert_eq!(sibling.status(), 403);
    // Right origin, but without the page's CSRF token (a form post, say).
    let tokenless = purge(
        vec![("sec-fetch-site", "same-origin".into())],
        confirm,
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(tokenless.status(), 403);
    // The page's token, but not JSON: refused as such.
    let plain = purge(from_page(), confirm, "text/plain").await.unwrap();
    assert_eq!(plain.status(), 415);
    assert_eq!(dead_letters(&api, TOKEN).await, 1, "something was purged");
    // What the page itself sends passes.
    let own = purge(from_page(), confirm, "application/json")
        .await
        .unwrap();
    assert_eq!(own.status(), 200);

    // Sign-out ends the session: the cookie opens nothing afterwards.
    let out = client
        .post(format!("{}/ui/logout", api.address))
        .header("cookie", &session)
        .header("x-kobe-csrf", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = client
        .get(format!("{}/tasks", api.address))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);

    // A session ends when its token is no longer configured (the token was rotated).
    let (session, _) = sign_in(&client, &api.address).await;
    let rotated = TestEnv::with(&[
        ("KOBE_API_TOKENS", "another-token-0123456789"),
        ("KOBE_REDIS_PREFIX", env.vars["KOBE_REDIS_PREFIX"].as_str()),
        ("KOBE_AMQP_PREFIX", env.vars["KOBE_AMQP_PREFIX"].as_str()),
        ("MONGODB_DB", env.settings.mongo.db.as_str()),
    ])
    .await;
    let other = rotated.spawn_api_unready().await;
    let refused = client
        .get(format!("{}/tasks", other.address))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    worker.stop().await;
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_tries_are_limited_per_address() {
    let env = TestEnv::with(&[("KOBE_API_TOKENS", TOKEN)]).await;
    let api = env.spawn_api_unready().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let answer = client
            .post(format!("{}/ui/login", api.address))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token=guessing-0123456789")
            .send()
            .await
            .unwrap();
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(&statuses[..10], &[401; 10]);
    assert_eq!(&statuses[10..], &[429, 429], "{statuses:?}");
    // The right token is refused too while the address is over the limit.
    let blocked = client
        .post(format!("{}/ui/login", api.address))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(blocked.status(), 429);
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_tells_the_unauthenticated_only_what_is_up() {
    let closed = common::free_port();
    let env = TestEnv::with(&[
        ("KOBE_API_TOKENS", TOKEN),
        ("REDIS_URL", &format!("redis://127.0.0.1:{closed}/0")),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "300"),
    ])
    .await;
    let api = env.spawn_api_unready().await;
    let anonymous: Value = api.get("/ready").await.json().await.unwrap();
    assert_eq!(anonymous["checks"]["redis"]["ok"], false, "{anonymous}");
    assert!(
        anonymous["checks"]["redis"].get("error").is_none(),
        "{anonymous}"
    );
    assert!(
        !anonymous.to_string().contains(&closed.to_string()),
        "{anonymous}"
    );
    let detailed: Value = api.get_as("/ready", TOKEN).await.json().await.unwrap();
    assert!(
        detailed["checks"]["redis"]["error"].is_string(),
        "{detailed}"
    );
    api.handle.stop(false).await;
}

/// `count` sign-in tries with a wrong token, each said to be forwarded for `forwarded(i)`.
async fn wrong_sign_ins(
    client: &reqwest::Client,
    api: &common::TestApi,
    count: usize,
    forwarded: impl Fn(usize) -> String,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..count {
        let answer = client
            .post(format!("{}/ui/login", api.address))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", forwarded(i))
            .body("token=guessing-0123456789")
            .send()
            .await
            .unwrap();
        statuses.push(answer.status().as_u16());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_tries_are_limited_per_client_and_a_forged_header_changes_nothing() {
    // Behind the proxy (this test's connections come from 127.0.0.1): one client's guessing
    // locks that client out, not every operator behind the same proxy.
    let env = TestEnv::with(&[
        ("KOBE_API_TOKENS", TOKEN),
        ("KOBE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
    ])
    .await;
    let api = env.spawn_api_unready().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // What a client says before the proxy's own entry is not believed: the proxy appends the
    // address it saw last.
    let statuses = wrong_sign_ins(&client, &api, 11, |i| {
        format!("198.51.100.{i}, 203.0.113.5, 10.1.2.3")
    })
    .await;
    assert_eq!(&statuses[..10], &[401; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    let other = client
        .post(format!("{}/ui/login", api.address))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "203.0.113.6")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 303, "another client signs in");
    api.handle.stop(false).await;

    // Not behind a trusted proxy: the header is anyone's to send, and ignored.
    let env = TestEnv::with(&[("KOBE_API_TOKENS", TOKEN)]).await;
    let api = env.spawn_api_unready().await;
    let statuses = wrong_sign_ins(&client, &api, 11, |i| format!("203.0.113.{i}")).await;
    assert_eq!(statuses[10], 429, "{statuses:?}");
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_bearer_tokens_is_rate_limited() {
    let env = TestEnv::with(&[
        ("KOBE_API_TOKENS", TOKEN),
        ("KOBE_RATE_LIMIT", "5"),
        ("KOBE_RATE_WINDOW_MS", "60000"),
    ])
    .await;
    let api = env.spawn_api_unready().await;
    let mut statuses = Vec::new();
    for i in 0..7 {
        let answer = api
            .client
            .get(format!("{}/task/status/x", api.address))
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(&statuses[5..], &[429, 429], "{statuses:?}");
    api.handle.stop(false).await;
}
