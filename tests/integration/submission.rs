//! A task submitted through the API, against live RabbitMQ, MongoDB and Redis: its way to an
//! outcome, the statuses it passes, and what the API answers when the input is wrong or a
//! dependency is down. What a client may rely on beyond one submission is in `api_contract`.

use crate::common;

use std::time::Duration;

use common::{Running, TestEnv};
use mongodb::bson::doc;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_travels_from_the_api_through_the_worker_to_success() {
    let Running { env, api, worker } = TestEnv::with_worker(&[], 10).await;

    let id = api.submit(common::quick_task(200)).await;
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let (status, seen) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(status["state"], "SUCCESS", "{status}");
    assert_eq!(status["task_id"], id.as_str());
    assert_eq!(status["task_name"], "demo_long_io");
    assert!(status["finished_at"].is_string(), "{status}");
    assert_eq!(seen.last().map(String::as_str), Some("SUCCESS"));

    // The attempt's outcome holds the result the handler returned: one insert, keyed by the
    // attempt; the submitted document is not rewritten.
    let stored = env
        .db
        .collection::<mongodb::bson::Document>("TaskLeases")
        .find_one(doc! {"_id": format!("{id}:0/outcome")})
        .await
        .unwrap()
        .unwrap();
    let submitted = env
        .db
        .collection::<mongodb::bson::Document>("Tasks")
        .find_one(doc! {"_id": &id})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(submitted.get_str("state"), Ok("PENDING"));
    // The worker counts its own commands (the driver's events would copy each batch): its
    // claim and its outcome went out as inserts into TaskLeases.
    assert!(
        common::metric("kobe_mongo_commands_total{purpose=\"insert:TaskLeases\"}") >= 1.0,
        "the worker's inserts are counted"
    );
    assert_eq!(
        stored
            .get_document("result")
            .unwrap()
            .get_i64("slept_ms")
            .unwrap(),
        200
    );

    worker.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn an_id_never_submitted_is_not_found() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    for id in [
        uuid::Uuid::new_v4().to_string(),
        "not a valid id".to_owned(),
    ] {
        let response = api.status(&id).await;
        assert_eq!(response.status(), 404, "{id}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn an_unknown_task_name_is_422_naming_the_field_and_writes_nothing() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let response = api.start_task(json!({"task_name": "no_such_task"})).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "task_name", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("demo_long_io"));
    let written = env
        .db
        .collection::<mongodb::bson::Document>("Tasks")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(written, 0);
    api.stop().await;
}

#[tokio::test]
async fn bad_kwargs_are_422_naming_the_kwarg() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let response = api
        .start_task(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": "long"}}))
        .await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["field"], "kwargs.duration_ms", "{problem}");
    api.stop().await;
}

#[tokio::test]
async fn an_unreachable_broker_is_503_with_a_reason_and_the_task_is_closed() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f");
    let env = TestEnv::with(&[("RABBITMQ_URL", &url), ("KOBE_PUBLISH_TIMEOUT_MS", "2000")]).await;
    let api = env.spawn_api_unready().await;
    let response = api.start_task(common::quick_task(1)).await;
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("RabbitMQ"), "{problem}");
    // The client was told "not accepted", so the task must never run: it is recorded as FAILURE.
    let task_id = problem["task_id"]
        .as_str()
        .expect("503 names the task it closed");
    let status: Value = api.status(task_id).await.json().await.unwrap();
    assert_eq!(status["state"], "FAILURE", "{status}");
    assert!(status["root_cause"]
        .as_str()
        .unwrap()
        .contains("not published"));
    api.stop().await;
}

#[tokio::test]
async fn health_answers_and_ready_reports_each_dependency() {
    let env = TestEnv::new().await;
    let api = env.spawn_api_unready().await;
    let health = api.get("/health").await;
    assert_eq!(health.status(), 200);
    // The publisher connects in the background: ready once it has.
    let body = common::eventually(Duration::from_secs(10), "ready", || async {
        let response = api.get("/ready").await;
        (response.status() == 200).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(body["checks"]["mongodb"]["ok"], true);
    assert_eq!(body["checks"]["redis"]["ok"], true);
    api.stop().await;
}

#[tokio::test]
async fn with_mongodb_down_the_api_answers_503_naming_it() {
    let closed = common::free_port();
    let env = TestEnv::with(&[
        ("MONGODB_URI", &format!("mongodb://127.0.0.1:{closed}")),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "500"),
    ])
    .await;
    let api = env.spawn_api_unready().await;
    let response = api.start_task(common::quick_task(1)).await;
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("MongoDB"),
        "{problem}"
    );
    let response = api.status(&uuid::Uuid::new_v4().to_string()).await;
    assert_eq!(response.status(), 503);
    let ready = api.get("/ready").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert!(
        body["failed"]
            .as_array()
            .unwrap()
            .contains(&json!("mongodb")),
        "{body}"
    );
    assert_eq!(body["checks"]["redis"]["ok"], true, "{body}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_many_answers_each_item_as_start_would_and_shares_its_inserts() {
    let env = TestEnv::with(&[("KOBE_BULK_MAX", "300")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let post = |body: Value| {
        api.client
            .post(format!("{}/task/start_many", api.address))
            .json(&body)
            .send()
    };
    let inserts_before = common::metric("kobe_mongo_commands_total{purpose=\"insert:Tasks\"}");
    let mut tasks: Vec<Value> = (0..250)
        .map(|i| json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "n": i}}))
        .collect();
    // An unknown task, a bad field, and two items with one key.
    tasks.push(json!({"task_name": "no_such_task"}));
    tasks.push(json!({"task_name": "demo_long_io", "priority": 12}));
    tasks.push(json!({"task_name": "demo_long_io", "dedup_key": "bulk-one"}));
    tasks.push(json!({"task_name": "demo_long_io", "dedup_key": "bulk-one"}));
    let response = post(json!({ "tasks": tasks })).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 254);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["index"], i, "{result}");
    }
    assert!(
        results[..250]
            .iter()
            .all(|r| r["status"] == 202 && r["task_id"].is_string()),
        "{body}"
    );
    assert_eq!(results[250]["status"], 422);
    assert_eq!(results[250]["problem"]["field"], "task_name");
    assert_eq!(results[251]["status"], 422);
    assert_eq!(results[251]["problem"]["field"], "priority");
    let mut keyed: Vec<i64> = results[252..]
        .iter()
        .map(|r| r["status"].as_i64().unwrap())
        .collect();
    keyed.sort();
    assert_eq!(keyed, [200, 202], "{body}");
    assert_eq!(results[252]["task_id"], results[253]["task_id"]);
    // 251 records in a few insert commands, not one each (the batch, split where the writer's
    // commands in flight cut it, and the keyed items' own).
    let inserts =
        common::metric("kobe_mongo_commands_total{purpose=\"insert:Tasks\"}") - inserts_before;
    assert!(inserts <= 8.0, "{inserts} insert commands for 251 records");

    // Every accepted task runs.
    let worker = env.spawn_worker(10);
    for result in &results[..250] {
        let id = result["task_id"].as_str().unwrap();
        let task = env.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(task.state, kobe::domain::TaskState::Success);
    }

    // The batch as a whole: none, or more than KOBE_BULK_MAX.
    let empty = post(json!({"tasks": []})).await.unwrap();
    assert_eq!(empty.status(), 422);
    let body: Value = empty.json().await.unwrap();
    assert_eq!(body["field"], "tasks");
    let many: Vec<Value> = (0..301)
        .map(|_| json!({"task_name": "demo_long_io"}))
        .collect();
    let over = post(json!({ "tasks": many })).await.unwrap();
    assert_eq!(over.status(), 422);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_lists_every_attempt_with_its_worker_start_end_and_outcome() {
    let Running {
        env: _env,
        api,
        worker,
    } = TestEnv::with_worker(
        &[
            ("KOBE_RETRY_BASE_MS", "50"),
            ("KOBE_RETRY_MAX_DELAY_MS", "200"),
        ],
        2,
    )
    .await;
    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 20, "fail_attempts": 1}}),
        )
        .await;
    let (status, _) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(status["state"], "SUCCESS", "{status}");
    let attempts = status["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{status}");
    let this_worker = kobe::config::worker_name();
    for (n, (attempt, outcome)) in attempts.iter().zip(["RETRY", "SUCCESS"]).enumerate() {
        assert_eq!(attempt["attempt"], n + 1, "{attempt}");
        assert_eq!(attempt["outcome"], outcome, "{attempt}");
        assert_eq!(attempt["worker"], this_worker, "{attempt}");
        let started = attempt["started_at"].as_str().expect("started");
        let ended = attempt["ended_at"].as_str().expect("ended");
        assert!(started <= ended, "{attempt}");
    }
    assert!(attempts[0]["root_cause"].is_string());
    assert!(attempts[0]["ended_at"].as_str() <= attempts[1]["started_at"].as_str());
    // The task's page shows the same attempts.
    let page = api
        .get(&format!("/ui/task/{id}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("<h2>Attempts</h2>"), "{page}");
    assert_eq!(page.matches(this_worker).count(), 2, "{page}");
    worker.stop().await;
    api.stop().await;
}
