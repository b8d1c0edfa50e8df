//! MongoDB as the authority: dedup, raw payloads, the outbox and status history — against the
//! MongoDB the test script provides. Sharded jobs are in [`shards`].

use crate::common;

mod shards;

use std::sync::Arc;
use std::time::Duration;

use common::{Running, TestEnv};
use kobe::domain::{TaskId, TaskState};
use kobe::store::{PayloadRepository, TaskDocument, TaskRepository};
use kobe::submit::outbox::Outbox;
use kobe::tasks::{Invocation, Registry, Task, TaskFuture};
use mongodb::bson::{doc, DateTime};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_submissions_make_one_task_and_one_message() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = Arc::new(env.spawn_api().await);
    let body = json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 5, "note": "x"}, "dedup": true});
    let mut requests = Vec::new();
    for _ in 0..32 {
        let api = api.clone();
        let body = body.clone();
        requests.push(tokio::spawn(async move {
            let response = api.start_task(body).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }));
    }
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.unwrap());
    }
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b)
        .collect();
    let deduplicated: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    assert_eq!(deduplicated.len(), 31, "{answers:?}");
    let id = &accepted[0]["task_id"];
    assert!(deduplicated
        .iter()
        .all(|b| &b["task_id"] == id && b["deduplicated"] == true));
    // Whoever was pointed at the first task finds it.
    assert_eq!(api.status(id.as_str().unwrap()).await.status(), 200);

    let tasks = env
        .db
        .collection::<mongodb::bson::Document>("Tasks")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(tasks, 1);
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(1)
    );

    // Key order does not make a new task; a different argument does.
    let reordered = api
        .start_task(json!({"dedup": true, "kwargs": {"note": "x", "duration_ms": 5}, "task_name": "demo_long_io"}))
        .await;
    assert_eq!(reordered.status(), 200);
    let different = api
        .start_task(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 6, "note": "x"}, "dedup": true}))
        .await;
    assert_eq!(different.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_returns_the_first_task() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let send = |body: Value| {
        api.client
            .post(format!("{}/task/start", api.address))
            .header("Idempotency-Key", "order-1234")
            .json(&body)
            .send()
    };
    let first = send(common::quick_task(1)).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // Same key, other arguments: still the first task (the key is the client's promise).
    let again = send(common::quick_task(2)).await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["task_id"], first["task_id"]);
    assert_eq!(again["deduplicated"], true);
    let bad = api
        .start_task(json!({"task_name": "demo_long_io", "dedup_key": ""}))
        .await;
    assert_eq!(bad.status(), 422);
    assert_eq!(bad.json::<Value>().await.unwrap()["field"], "dedup_key");
    // A tab passes HTTP's header rules but not the documented alphabet.
    let tabbed = api
        .client
        .post(format!("{}/task/start", api.address))
        .header("Idempotency-Key", "order\t1234")
        .json(&json!({"task_name": "demo_long_io"}))
        .send()
        .await
        .unwrap();
    assert_eq!(tabbed.status(), 422);
    assert_eq!(
        tabbed.json::<Value>().await.unwrap()["field"],
        "Idempotency-Key"
    );
}

/// Returns its kwargs' `blob` length and the blob itself.
struct Echo;
impl Task for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        Box::pin(async move { Ok(json!({"kwargs": invocation.kwargs, "args": invocation.args})) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kib_argument_travels_through_raw_payload_intact() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let mut registry = Registry::with_builtin_tasks();
    registry.register(Echo).unwrap();
    let api = env.spawn_api_with(registry.clone()).await;
    common::eventually(Duration::from_secs(10), "ready", || async {
        let r = api.get("/ready").await;
        (r.status() == 200).then_some(())
    })
    .await;
    let worker = env.spawn_worker_on(2, vec![], registry);
    let blob: String = (0..100 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let id = api
        .submit(json!({"task_name": "echo", "args": [1, "two"], "kwargs": {"blob": blob}}))
        .await;
    let document = env.tasks().get(&id).await.unwrap().unwrap();
    let reference = document
        .payload_ref
        .clone()
        .expect("large arguments go to RawPayload");
    assert!(!serde_json::to_string(&document.kwargs)
        .unwrap()
        .contains(&blob[..100]));

    let done = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    // The result is as large: it is stored apart too, and is exactly what the handler saw.
    let result_ref = kobe::store::payloads::reference_in(done.result.as_ref().unwrap())
        .expect("result reference")
        .to_owned();
    let payloads = PayloadRepository::new(&env.db);
    let result = payloads.get(&result_ref).await.unwrap().unwrap();
    assert_eq!(result["kwargs"]["blob"].as_str().unwrap(), blob);
    assert_eq!(result["args"], json!([1, "two"]));
    assert!(payloads.get(&reference).await.unwrap().is_some());
    // Neither lives forever: the result expires from when it was stored, the arguments once
    // their task finished (the TTL index on `expires_at` collects them).
    let raw = env
        .db
        .collection::<mongodb::bson::Document>(kobe::store::payloads::COLLECTION);
    for id in [&result_ref, &reference] {
        common::eventually(Duration::from_secs(10), "an expiry", || async {
            raw.find_one(doc! {"_id": id.as_str()})
                .await
                .ok()
                .flatten()
                .and_then(|d| d.get_datetime("expires_at").ok().copied())
        })
        .await;
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_publishes_a_task_that_was_never_confirmed() {
    let env = TestEnv::new().await;
    env.init_db().await;
    // As if the API crashed between writing the task and publishing it, a minute ago.
    let id = TaskId::generate();
    let mut document = TaskDocument::pending(&id, "demo_long_io", "default");
    document.kwargs = json!({"duration_ms": 1}).as_object().cloned().unwrap();
    document.created_at = DateTime::from_millis(DateTime::now().timestamp_millis() - 60_000);
    env.tasks().insert(&document).await.unwrap();

    let submitter = env.submitter();
    let outbox = |age| Outbox {
        tasks: TaskRepository::new(&env.db),
        submitter: submitter.clone(),
        age,
    };
    // Two sweepers at once: the claim lets exactly one publish it.
    let (first, second) = (
        outbox(Duration::from_secs(30)),
        outbox(Duration::from_secs(30)),
    );
    let (a, b) = tokio::join!(first.sweep_once(), second.sweep_once());
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    assert_eq!(
        outbox(Duration::from_secs(30)).sweep_once().await.unwrap(),
        0,
        "confirmed now"
    );
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(1)
    );

    let worker = env.spawn_worker(1);
    assert_eq!(
        env.wait_final(id.as_str(), Duration::from_secs(20))
            .await
            .state,
        TaskState::Success
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_retries_timestamps_and_the_last_error() {
    let Running {
        env: _env,
        api,
        worker,
    } = TestEnv::with_worker(&[("KOBE_RETRY_BASE_MS", "100")], 2).await;
    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .await;
    let (status, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(status["state"], "SUCCESS");
    assert_eq!(status["retries"], 1);
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(status[field].is_string(), "{field}: {status}");
    }
    assert!(
        status["root_cause"]
            .as_str()
            .unwrap()
            .contains("simulated I/O failure"),
        "{status}"
    );
    assert_eq!(status["errors"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["errors"][0]["decision"], "retry");
    worker.stop().await;
    api.stop().await;
}

/// A dedup claim left by a submission that died before recording its task, `age` ago.
async fn ghost_claim(env: &TestEnv, key: &str, age: Duration) -> String {
    let ghost = TaskId::generate().to_string();
    let fingerprint = kobe::domain::Fingerprint::of_key("demo_long_io", key);
    let now = DateTime::now().timestamp_millis();
    env.db
        .collection::<mongodb::bson::Document>("TaskDedup")
        .insert_one(doc! {
            "task_fingerprint": fingerprint.as_str(),
            "task_id": &ghost,
            "created_at": DateTime::from_millis(now - age.as_millis() as i64),
            "expires_at": DateTime::from_millis(now + 3_600_000),
        })
        .await
        .unwrap();
    ghost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_claim_whose_task_never_appeared_is_taken_over() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    let submit = |key: &'static str| {
        api.client
            .post(format!("{}/task/start", api.address))
            .header("Idempotency-Key", key)
            .json(&common::quick_task(1))
            .send()
    };
    // Long dead: taken over at once.
    let ghost = ghost_claim(&env, "order-old", Duration::from_secs(60)).await;
    let response = submit("order-old").await.unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["task_id"], ghost.as_str());
    assert_eq!(
        api.status(body["task_id"].as_str().unwrap()).await.status(),
        200
    );

    // Claimed a moment ago: its submitter may still be recording it, so the duplicate waits —
    // and never answers with the id of a task that does not exist.
    let ghost = ghost_claim(&env, "order-young", Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    let response = submit("order-young").await.unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["task_id"], ghost.as_str());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // And the fingerprint is the new task's now.
    let again = submit("order-young").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<Value>().await.unwrap()["task_id"],
        body["task_id"]
    );
    api.stop().await;
}

/// A failed task as the search sees it.
fn failed(id: &str, route: &str, parent: Option<&str>, cause: &str, at_ms: i64) -> TaskDocument {
    let mut task = TaskDocument::pending(&TaskId::parse(id).unwrap(), "searched", route);
    task.state = TaskState::Failure;
    task.parent_id = parent.map(str::to_owned);
    task.root_cause = Some(cause.to_owned());
    task.updated_at = DateTime::from_millis(at_ms);
    task.finished_at = Some(task.updated_at);
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_filters_by_route_parent_and_root_cause_on_an_index() {
    use kobe::store::search::Search;
    let env = TestEnv::new().await;
    env.init_db().await;
    let tasks = env.tasks();
    let now = DateTime::now().timestamp_millis();
    let parent = "job-1";
    for task in [
        failed(
            "t-io-1",
            "io",
            None,
            "Timeout (a.b) talking to S3",
            now - 3000,
        ),
        failed(
            "t-io-2",
            "io",
            Some(parent),
            "connection refused",
            now - 2000,
        ),
        failed(
            "t-default",
            "default",
            Some(parent),
            "TIMEOUT again",
            now - 1000,
        ),
    ] {
        tasks.insert(&task).await.unwrap();
    }
    let mut done = TaskDocument::pending(&TaskId::parse("t-done").unwrap(), "searched", "io");
    done.state = TaskState::Success;
    done.parent_id = Some(parent.into());
    tasks.insert(&done).await.unwrap();

    let ids = |search: Search| {
        let tasks = tasks.clone();
        async move {
            let (found, _) = tasks
                .find(&Search {
                    limit: 50,
                    ..search
                })
                .await
                .unwrap();
            found.into_iter().map(|t| t.id).collect::<Vec<_>>()
        }
    };
    let by_route = Search {
        route: Some("io".into()),
        ..Search::default()
    };
    assert_eq!(ids(by_route.clone()).await, ["t-io-2", "t-io-1"]);
    // The children of a job, in any state, newest first; or in one state.
    let children = Search {
        parent_id: Some(parent.into()),
        ..Search::default()
    };
    assert_eq!(ids(children.clone()).await.len(), 3);
    let failed_children = Search {
        state: Some(TaskState::Failure),
        ..children.clone()
    };
    assert_eq!(ids(failed_children).await, ["t-default", "t-io-2"]);
    // Root-cause text: case-insensitive, taken literally (the dot and parentheses).
    let cause = |text: &str| Search {
        root_cause: Some(text.into()),
        ..Search::default()
    };
    assert_eq!(ids(cause("timeout")).await, ["t-default", "t-io-1"]);
    assert_eq!(ids(cause("(a.b)")).await, ["t-io-1"]);
    assert!(ids(cause("(a.c)")).await.is_empty());
    // Created within a range (the three were created now, the search's range is the last minute).
    let created = |from_ms: i64| Search {
        created_since: Some(DateTime::from_millis(from_ms)),
        ..Search::default()
    };
    assert_eq!(ids(created(now - 60_000)).await.len(), 3);
    assert!(ids(created(now + 60_000)).await.is_empty());

    // Each query runs on an index, where the server explains its plans the way MongoDB does.
    for (search, index) in [
        (by_route, "state_updated_at"),
        (cause("timeout"), "state_updated_at"),
        (children, "parent_id_updated_at"),
    ] {
        let plan = tasks.explain_search(&search).await.unwrap().to_string();
        if plan.contains("winningPlan") && plan.contains("indexName") {
            assert!(plan.contains(index), "{index} in {plan}");
            assert!(!plan.contains("COLLSCAN"), "{plan}");
        } else {
            eprintln!("this MongoDB-compatible server explains differently: {plan}");
        }
    }
}

/// A claim writes only the attempt's lease: while tasks run, their `Tasks` documents stay as
/// submitted, yet the status, the search and `kobe task show` all say STARTED (one read model);
/// the worker renews its running attempts' leases together, in one command per tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_tasks_are_started_to_every_reader_and_renewed_together() {
    // About the renewal cadence: a lease of 1.5 s is renewed every 0.5 s.
    let Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_EXECUTION_LEASE_MS", "1500")], 4).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(api.submit(common::quick_task(6000)).await);
    }
    for id in &ids {
        api.wait_for_state(id, Duration::from_secs(20), |b| b["state"] == "STARTED")
            .await;
    }
    let tasks = env.tasks();
    for id in &ids {
        let stored = tasks.stored(id).await.unwrap().unwrap();
        assert_eq!(
            stored.state,
            TaskState::Pending,
            "the claim wrote Tasks: {stored:?}"
        );
        let read = tasks.get(id).await.unwrap().unwrap();
        assert_eq!(read.state, TaskState::Started);
        assert!(read.worker.is_some(), "{read:?}");
    }
    // The search reads the workers' own running lists, which follow a start within a beat's
    // spacing (0.1 s) and its write.
    common::eventually(Duration::from_secs(2), "all three listed", || async {
        let found: Value = api.get("/task?state=STARTED").await.json().await.ok()?;
        let listed: Vec<String> = found["tasks"]
            .as_array()?
            .iter()
            .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
            .collect();
        ids.iter().all(|id| listed.contains(id)).then_some(())
    })
    .await;
    let shown = env
        .kobe_command(&["task", "show", &ids[0]])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("STARTED"), "{shown}");

    // Renewals: one command covers every running attempt.
    common::eventually(Duration::from_secs(10), "three renewals", || async {
        (common::metric("kobe_lease_renewals_total") >= 3.0).then_some(())
    })
    .await;
    let commands = common::metric("kobe_lease_renewals_total");
    let renewed = common::metric("kobe_leases_renewed_total");
    assert!(
        renewed >= 2.0 * commands,
        "{renewed} leases renewed by {commands} commands"
    );
    for id in &ids {
        let (done, _) = api.wait_for_final(id, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "SUCCESS", "{done}");
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_a_worker_recorded_first_is_still_a_refusal() {
    use kobe::store::tasks::Refusal;
    let env = TestEnv::new().await;
    env.init_db().await;
    let tasks = env.tasks();
    // A worker met the closed lease and recorded the task FAILURE before the submitter's own
    // write: the submitter must still answer "not run", since nothing runs it.
    let id = TaskId::generate();
    let mut task = TaskDocument::pending(&id, "demo_long_io", "default");
    task.state = TaskState::Failure;
    task.root_cause = Some("not published: its submission was not accepted".into());
    tasks.insert(&task).await.unwrap();
    let refusal = tasks
        .refuse(&id, "demo_long_io", "not published: no confirm")
        .await
        .unwrap();
    assert_eq!(refusal, Refusal::NotRun);
}
