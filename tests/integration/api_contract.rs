//! What a client of the API may rely on beyond one submission: validation, the status cache, the
//! result backend, rate limits, authentication, readiness, OpenAPI and the docs page, graceful
//! shutdown.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{PrivateRedis, Running, TestEnv};
use serde_json::{json, Value};

async fn problem(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    (status, response.json().await.unwrap())
}

/// `{"d": {"d": … 1}}`, `levels` deep.
fn nested(levels: usize) -> Value {
    (0..levels).fold(json!(1), |inner, _| json!({ "d": inner }))
}

#[tokio::test]
async fn each_bad_field_is_a_422_naming_it() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let ok = |extra: Value| {
        let mut body = common::quick_task(1);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (json!({"args": []}), "task_name"),
        (json!({"task_name": 7}), "task_name"),
        (ok(json!({"task_name": "nope"})), "task_name"),
        (ok(json!({"args": "x"})), "args"),
        (ok(json!({"kwargs": [1]})), "kwargs"),
        (
            ok(json!({"kwargs": {"duration_ms": -5}})),
            "kwargs.duration_ms",
        ),
        (ok(json!({"priority": 10})), "priority"),
        (ok(json!({"priority": "high"})), "priority"),
        (ok(json!({"queue": "nowhere"})), "queue"),
        (ok(json!({"countdown": -1})), "countdown"),
        (ok(json!({"eta": "tomorrow"})), "eta"),
        (
            ok(json!({"eta": "2030-01-01T00:00:00Z", "countdown": 5})),
            "eta",
        ),
        (ok(json!({"expires": "2001-01-01T00:00:00Z"})), "expires"),
        (ok(json!({"expires": true})), "expires"),
        (ok(json!({"time_limit": 0})), "time_limit"),
        (
            ok(json!({"time_limit": 5, "soft_time_limit": 10})),
            "soft_time_limit",
        ),
        (ok(json!({"dedup_key": ""})), "dedup_key"),
        (ok(json!({"dedup": "yes"})), "dedup"),
        (ok(json!({"colour": "red"})), "colour"),
        (ok(json!({"time_limit": 90000})), "time_limit"),
        // What MongoDB could never store is the request's fault too.
        (
            ok(json!({"kwargs": {"duration_ms": 1, "big": u64::MAX}})),
            "kwargs.big",
        ),
        (
            ok(json!({"args": [1, {"n": 9_223_372_036_854_775_808_u64}]})),
            "args[1].n",
        ),
        (
            ok(json!({"kwargs": {"duration_ms": 1, "a": {"x\u{0}y": 1}}})),
            "kwargs.a.x\\u0000y",
        ),
        (
            ok(json!({"kwargs": {"duration_ms": 1, "deep": nested(80)}})),
            "kwargs.deep",
        ),
    ];
    for (body, field) in cases {
        let (status, problem) = problem(api.start_task(body.clone()).await).await;
        assert_eq!(status, 422, "{body}: {problem}");
        let named = problem["field"].as_str().unwrap_or_default();
        assert!(named.starts_with(field), "{body}: {problem}");
        assert_eq!(problem["status"], 422);
        assert_eq!(problem["type"], "urn:kobe:problem:validation-error");
    }
    // Not JSON at all: 400, same shape.
    let response = api
        .client
        .post(format!("{}/task/start", api.address))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(response).await.0, 400);
    api.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_a_413_and_unknown_routes_are_404_problems() {
    let env = TestEnv::with(&[("KOBE_MAX_BODY_BYTES", "2048")]).await;
    let api = env.spawn_api().await;
    let big = json!({"task_name": "demo_long_io", "kwargs": {"pad": "x".repeat(4096)}});
    let (status, body) = problem(api.start_task(big).await).await;
    assert_eq!(status, 413, "{body}");
    let missing = api.get("/nowhere").await;
    assert_eq!(problem(missing).await.0, 404);
    // A route without the method: 405 naming the one it has.
    let wrong = api.get("/task/start").await;
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    let (_, body) = problem(wrong).await;
    assert_eq!(body["type"], "urn:kobe:problem:method-not-allowed");
    let wrong = api
        .client
        .delete(format!("{}/task/status/x", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "GET");
    api.stop().await;
}

fn rank(state: &str) -> u8 {
    match state {
        "PENDING" => 0,
        "STARTED" => 1,
        "SUCCESS" => 2,
        other => panic!("unexpected state {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_status_is_never_older_than_mongodb() {
    let env = TestEnv::with(&[("KOBE_STATUS_CACHE_TTL_MS", "5000")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let id = api.submit(common::quick_task(600)).await;
    let worker = env.spawn_worker(2);
    let tasks = env.tasks();
    let mut seen = Vec::new();
    let started = Instant::now();
    loop {
        // What MongoDB holds before the read begins is the floor for what the read may answer.
        let floor = tasks
            .get(&id)
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str()
            .to_owned();
        let body: Value = api.status(&id).await.json().await.unwrap();
        let answered = body["state"].as_str().unwrap().to_owned();
        assert!(
            rank(&answered) >= rank(&floor),
            "answered {answered} after MongoDB had {floor}"
        );
        if seen.last() != Some(&answered) {
            seen.push(answered.clone());
        }
        if answered == "SUCCESS" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "seen {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen.contains(&"STARTED".to_owned()),
        "the cache hid a state: {seen:?}"
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_status_still_answers_and_ready_names_redis() {
    let redis = PrivateRedis::start();
    let env = TestEnv::with(&[
        ("REDIS_URL", &redis.url()),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "500"),
    ])
    .await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let id = api.submit(common::quick_task(1)).await;
    assert_eq!(api.status(&id).await.status(), 200);
    redis.stop();
    let response = api.status(&id).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["task_id"], id.as_str());
    let ready = api.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert!(
        ready["failed"]
            .as_array()
            .unwrap()
            .contains(&json!("redis")),
        "{ready}"
    );
    // Rate limiting fails open with Redis down: submissions still go through.
    api.submit(common::quick_task(1)).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_a_result_is_read_from_mongodb() {
    let redis = PrivateRedis::start();
    let env = TestEnv::with(&[
        ("REDIS_URL", &redis.url()),
        ("KOBE_RESULT_BACKEND", "redis"),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "500"),
    ])
    .await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(1);
    let id = api.submit(common::quick_task(1)).await;
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "SUCCESS");
    redis.stop();
    let response = api.get(&format!("/task/result/{id}")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["result"]["slept_ms"], 1, "{body}");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_backend_serves_results_until_their_ttl() {
    let env = TestEnv::with(&[("KOBE_RESULT_BACKEND", "redis"), ("KOBE_RESULT_TTL", "2")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let result = |id: String| {
        let api = &api;
        async move { api.get(&format!("/task/result/{id}")).await }
    };
    let id = api.submit(common::quick_task(1)).await;
    // No worker yet: not finished, and the answer does not wait.
    let pending = result(id.clone()).await;
    assert_eq!(pending.status(), 202);
    assert_eq!(pending.json::<Value>().await.unwrap()["state"], "PENDING");
    assert_eq!(result(uuid::Uuid::new_v4().to_string()).await.status(), 404);

    let worker = env.spawn_worker(1);
    let done = common::eventually(Duration::from_secs(20), "result", || async {
        let response = result(id.clone()).await;
        (response.status() == 200).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(done["state"], "SUCCESS");
    assert_eq!(done["result"]["slept_ms"], 1);
    // After its TTL the result is gone, and says so.
    common::eventually(Duration::from_secs(10), "result expired", || async {
        (result(id.clone()).await.status() == 410).then_some(())
    })
    .await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn with_the_result_backend_off_results_are_a_documented_404() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let response = api
        .client
        .get(format!(
            "{}/task/result/{}",
            api.address,
            uuid::Uuid::new_v4()
        ))
        .send()
        .await
        .unwrap();
    let (status, body) = problem(response).await;
    assert_eq!(status, 404);
    assert_eq!(body["type"], "urn:kobe:problem:result-backend-off");
    api.stop().await;
}

#[tokio::test]
async fn the_request_over_the_limit_gets_429_with_retry_after() {
    let env = TestEnv::with(&[("KOBE_RATE_LIMIT", "3"), ("KOBE_RATE_WINDOW_MS", "60000")]).await;
    let api = env.spawn_api().await;
    for _ in 0..3 {
        assert_eq!(api.status("unknown").await.status(), 404);
    }
    // The next one is over the limit. The limiter serves rather than refuses when Redis does not
    // answer within its bound (or a new window began meanwhile), so a loaded machine may let one
    // more through: a 429 must come within a few.
    let mut over = api.status("unknown").await;
    for _ in 0..4 {
        if over.status() == 429 {
            break;
        }
        assert_eq!(over.status(), 404);
        over = api.status("unknown").await;
    }
    assert_eq!(over.status(), 429);
    let retry_after: u64 = over.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Health is not rate limited.
    assert_eq!(api.get("/health").await.status(), 200);
    api.stop().await;
}

#[tokio::test]
async fn tokens_guard_the_task_routes_but_not_health() {
    let token = "kobe-test-token-0123456789";
    let env = TestEnv::with(&[(
        "KOBE_API_TOKENS",
        &format!("another-token-abcdefgh,{token}"),
    )])
    .await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let url = format!("{}/task/start", api.address);
    let body = common::quick_task(1);
    let missing = api.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(problem(missing).await.0, 401);
    let wrong = api
        .client
        .post(&url)
        .bearer_auth("kobe-test-token-0123456780")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(problem(wrong).await.0, 401);
    let right = api
        .client
        .post(&url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 202);
    let list = api.get("/tasks").await;
    assert_eq!(list.status(), 401);
    assert_eq!(api.get("/health").await.status(), 200);
    assert_eq!(api.get("/metrics").await.status(), 200);
    api.stop().await;
}

#[tokio::test]
async fn the_task_names_are_listed() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let tasks: Value = api.get("/tasks").await.json().await.unwrap();
    let names: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo_long_io", "demo_shard", "demo_sharded_job"]);
    api.stop().await;
}

#[tokio::test]
async fn openapi_lists_every_route_and_docs_serve_offline() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let doc: Value = api.get("/openapi.json").await.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/task/start",
        "/task/status/{id}",
        "/task/result/{id}",
        "/tasks",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} missing: {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    // Every schema a path refers to is defined.
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "undefined schema {name}");
    }

    let page = api.get("/docs").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    // Only local assets: nothing to fetch from the internet.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    for asset in ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"] {
        assert!(html.contains(asset));
        let response = api
            .client
            .get(format!("{}{asset}", api.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        assert!(response.bytes().await.unwrap().len() > 10_000, "{asset}");
    }
    api.stop().await;
}

#[tokio::test]
async fn serve_stops_gracefully_on_sigterm() {
    let env = TestEnv::new().await;
    let port = common::free_port();
    let mut serve = env
        .kobe_command(&["serve", "--addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    common::eventually(common::startup_deadline(), "serve up", || async {
        let r = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    common::signal(serve.id(), libc::SIGTERM);
    let exit = common::wait_exit(&mut serve, Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}");
    // It stopped accepting.
    assert!(client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_countdown_delays_the_start_and_an_expired_task_never_runs() {
    let Running { env, api, worker } = TestEnv::with_worker(&[], 2).await;
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}, "countdown": 1.5, "time_limit": 10, "soft_time_limit": 5}))
        .await;
    let task = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(task.state, kobe::domain::TaskState::Success);
    let waited = task.started_at.unwrap().timestamp_millis() - task.created_at.timestamp_millis();
    assert!(waited >= 1500, "started after {waited} ms");
    assert_eq!(
        task.hard_time_limit,
        Some(std::time::Duration::from_secs(10))
    );

    // A message whose expiry passed while it waited is dropped as FAILURE, never run.
    let publisher = env.publisher();
    let mut message = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::generate(),
        "demo_long_io",
        vec![],
        json!({"duration_ms": 1}).as_object().cloned().unwrap(),
    );
    message.expires = Some("2001-01-01T00:00:00Z".into());
    env.publish_message(&publisher, &message).await;
    let expired = env
        .wait_final(message.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(expired.state, kobe::domain::TaskState::Failure);
    assert!(expired.root_cause.unwrap().contains("expired"));
    assert!(expired.started_at.is_none(), "it never started");
    worker.stop().await;
    api.stop().await;
}

/// Redis commands this process has sent, of any kind.
fn redis_commands() -> f64 {
    kobe::telemetry::metrics::metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("kobe_redis_command_duration_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_tasks_to_success_without_a_call_to_redis() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let worker = env.spawn_worker(4);
    let publisher = env.publisher();
    let before = redis_commands();
    let mut ids = Vec::new();
    for _ in 0..30 {
        let message = kobe::amqp::TaskMessage::new(
            kobe::domain::TaskId::generate(),
            "demo_long_io",
            vec![],
            json!({"duration_ms": 1}).as_object().cloned().unwrap(),
        );
        env.publish_message(&publisher, &message).await;
        ids.push(message.id.to_string());
    }
    for id in &ids {
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(task.state, kobe::domain::TaskState::Success);
    }
    assert_eq!(
        redis_commands(),
        before,
        "Redis commands for 30 claims and successes"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_final_status_is_whole_and_gives_way_to_a_rerun_at_once() {
    let env = TestEnv::with(&[
        ("KOBE_STATUS_CACHE_TTL_MS", "60000"),
        ("KOBE_TASK_RETRY", "demo_long_io:max=0"),
    ])
    .await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(2);
    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .await;
    // Polled as it fails: the FAILURE first served (and cached) already lists its error.
    let failed = common::eventually(Duration::from_secs(20), "failed", || async {
        let body: Value = api.status(&id).await.json().await.ok()?;
        (body["state"] == "FAILURE").then_some(body)
    })
    .await;
    assert_eq!(
        failed["errors"].as_array().map(Vec::len),
        Some(1),
        "{failed}"
    );
    let cached: Value = api.status(&id).await.json().await.unwrap();
    assert_eq!(cached, failed);
    // The rerun clears it: the next read is not the cached FAILURE.
    let retried = api
        .client
        .post(format!("{}/task/{id}/retry", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let body: Value = api.status(&id).await.json().await.unwrap();
    assert_ne!(body["state"], "FAILURE", "{body}");
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    worker.stop().await;
    api.stop().await;
}
