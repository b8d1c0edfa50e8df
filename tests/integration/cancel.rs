//! Cancelling tasks (`POST /task/{id}/cancel`, `kobe task cancel`) against live services: a
//! waiting task never runs, a running one is asked to stop, a finished one is refused, and a
//! revoked task can be run again.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestEnv;
use kobe::domain::{TaskId, TaskState};
use kobe::tasks::{Invocation, Registry, Task, TaskError, TaskFuture};
use serde_json::{json, Value};

/// Counts its runs; with `{"wait": true}` it runs until cancelled (at most 60 s) and stops when
/// asked, unless `{"ignore": true}`, when it finishes its 3 s regardless.
struct Cancellable(Arc<AtomicUsize>);

impl Task for Cancellable {
    fn name(&self) -> &'static str {
        "cancellable"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let kw = &invocation.kwargs;
            if kw.get("ignore") == Some(&json!(true)) {
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Ok(json!({"ignored_cancel": invocation.cancel.is_raised()}));
            }
            if kw.get("wait") == Some(&json!(true)) {
                let mut cancel = invocation.cancel.clone();
                tokio::select! {
                    () = cancel.raised() => return Err(TaskError::Permanent("stopped on request".into())),
                    () = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
            Ok(json!("ran"))
        })
    }
}

fn registry(runs: &Arc<AtomicUsize>) -> Registry {
    let mut registry = Registry::with_builtin_tasks();
    registry.register(Cancellable(runs.clone())).unwrap();
    registry
}

async fn post(api: &common::TestApi, path: String) -> (u16, Value) {
    let response = api
        .client
        .post(format!("{}{path}", api.address))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_is_revoked_never_runs_and_can_be_run_again() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let api = env.spawn_api_with(registry(&runs)).await;
    // No worker yet: the task waits in its queue, PENDING.
    let id = api.submit(json!({"task_name": "cancellable"})).await;
    let (pending, _) = api
        .wait_for_state(&id, Duration::from_secs(5), |b| b["state"] == "PENDING")
        .await;
    assert_eq!(pending["ready"], false);

    let (status, body) = post(&api, format!("/task/{id}/cancel")).await;
    assert_eq!((status, &body["state"]), (200, &json!("REVOKED")), "{body}");
    // Asking again changes nothing and says the same.
    let (status, body) = post(&api, format!("/task/{id}/cancel")).await;
    assert_eq!((status, &body["state"]), (200, &json!("REVOKED")), "{body}");
    let (revoked, _) = api.wait_for_final(&id, Duration::from_secs(5)).await;
    assert_eq!(revoked["state"], "REVOKED", "the client is told at once");
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert!(task.cancel_requested.unwrap().by.starts_with("api:"));

    // Its message arrives at a worker and is acked without running.
    let worker = env.spawn_worker_on(2, Vec::new(), registry(&runs));
    env.wait_queue_empty("default", "the revoked task's message acked")
        .await;
    let revoked_acks = "kobe_duplicate_deliveries_total{reason=\"revoked\"}";
    common::eventually(Duration::from_secs(10), "ack counted", || async {
        (common::metric(revoked_acks) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a revoked task never runs");
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!((task.state, task.retries), (TaskState::Revoked, 0));

    // A revoked task runs again on request, as its next attempt.
    let (status, body) = post(&api, format!("/task/{id}/retry")).await;
    assert_eq!((status, &body["attempt"]), (202, &json!(2)), "{body}");
    let task = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Success, 1));
    assert!(
        task.cancel_requested.is_none(),
        "the rerun clears the cancel"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Finished: refused, untouched. Unknown: 404.
    let (status, problem) = post(&api, format!("/task/{id}/cancel")).await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("SUCCESS"));
    let unknown = TaskId::generate();
    assert_eq!(post(&api, format!("/task/{unknown}/cancel")).await.0, 404);
    assert_eq!(
        env.tasks().get(&id).await.unwrap().unwrap().state,
        TaskState::Success
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_asked_to_stop_and_ends_revoked_unless_it_runs_on() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let api = env.spawn_api_with(registry(&runs)).await;
    let worker = env.spawn_worker_on(2, Vec::new(), registry(&runs));

    // A handler that stops when asked: REVOKED, ran once, not retried, not dead-lettered.
    let id = api
        .submit(json!({"task_name": "cancellable", "kwargs": {"wait": true}}))
        .await;
    api.wait_for_state(&id, Duration::from_secs(10), |b| b["state"] == "STARTED")
        .await;
    let output = env.kobe_command(&["task", "cancel", &id]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("stopping"));
    let task = env.wait_final(&id, Duration::from_secs(10)).await;
    assert_eq!(
        (task.state, task.retries),
        (TaskState::Revoked, 0),
        "{task:?}"
    );
    assert!(
        task.root_cause
            .as_deref()
            .unwrap()
            .contains("stopped on request"),
        "{task:?}"
    );
    assert!(task.cancel_requested.unwrap().by.starts_with("cli:"));
    let (status, _) = api.wait_for_final(&id, Duration::from_secs(5)).await;
    assert_eq!(status["state"], "REVOKED");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        env.queue_depth(env.topology.dead_letter_queue()).await,
        Some(0),
        "a cancel is not a dead letter"
    );
    // The CLI says a revoked task is revoked; a second cancel is harmless.
    let output = env.kobe_command(&["task", "cancel", &id]).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("already"));

    // A handler that runs on: its own outcome stands, and the client was told 202 STARTED.
    let stubborn = api
        .submit(json!({"task_name": "cancellable", "kwargs": {"ignore": true}}))
        .await;
    api.wait_for_state(&stubborn, Duration::from_secs(10), |b| {
        b["state"] == "STARTED"
    })
    .await;
    let (status, body) = post(&api, format!("/task/{stubborn}/cancel")).await;
    assert_eq!((status, &body["state"]), (202, &json!("STARTED")), "{body}");
    let task = env.wait_final(&stubborn, Duration::from_secs(10)).await;
    assert_eq!(task.state, TaskState::Success);
    assert_eq!(task.result, Some(json!({"ignored_cancel": true})));
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A finished task: the CLI exits 1 and changes nothing.
    let output = env
        .kobe_command(&["task", "cancel", &stubborn])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("SUCCESS"));
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_lands_after_a_retry_revokes_the_next_attempt_once() {
    let common::Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_TASK_RETRY", "demo_long_io:max=3,base_ms=2000")], 2).await;
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"fail_attempts": 1, "duration_ms": 100}}))
        .await;
    api.wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "RETRY")
        .await;
    // What a cancel racing the first attempt's RETRY leaves: its mark on the task, after the
    // RETRY was recorded.
    env.db
        .collection::<mongodb::bson::Document>("Tasks")
        .update_one(
            mongodb::bson::doc! {"_id": &id},
            mongodb::bson::doc! {"$set": {"cancel_requested": {"at": mongodb::bson::DateTime::now(), "by": "race"}}},
        )
        .await
        .unwrap();
    let closes = || common::metric("kobe_mongo_statements_total{purpose=\"lease_close\"}");
    let before = closes();
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "REVOKED", "{done}");
    assert_eq!(done["retries"], 1, "{done}");
    // Settled once, not by closing its own lease again and again.
    assert!(
        closes() - before <= 1.0,
        "{} lease closes",
        closes() - before
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stays_final_when_the_message_comes_after_the_lease_retention() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let api = env.spawn_api_with(registry(&runs)).await;
    // Cancelled while its message waits (no worker yet).
    let id = api.submit(json!({"task_name": "cancellable"})).await;
    let (status, body) = post(&api, format!("/task/{id}/cancel")).await;
    assert_eq!((status, &body["state"]), (200, &json!("REVOKED")), "{body}");
    // A finished attempt's lease of another task, to show collection still runs.
    let ran = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 0}}))
        .await;

    // Eight days pass before the message reaches a worker: every lease is past the retention.
    let worker = env.spawn_worker_on(2, Vec::new(), registry(&runs));
    env.wait_final(&ran, Duration::from_secs(20)).await;
    worker.stop().await;
    let leases = env
        .db
        .collection::<mongodb::bson::Document>(kobe::store::task_leases::COLLECTION);
    let long_ago = mongodb::bson::DateTime::from_millis(0);
    leases
        .update_many(
            mongodb::bson::doc! {"state": {"$exists": false}},
            mongodb::bson::doc! {"$set": {"lease_until": long_ago, "started_at": long_ago}},
        )
        .await
        .unwrap();
    let collected = env.tasks().leases().collect().await.unwrap();
    assert_eq!(collected, 1, "the finished attempt's lease is collected");
    let ran_task = env.tasks().get(&ran).await.unwrap().unwrap();
    assert_eq!(ran_task.state, TaskState::Success, "its outcome stays");
    assert!(
        env.tasks().leases().get(&id, 0).await.unwrap().is_some(),
        "the closed lease stays"
    );

    // The original message, arriving now, still finds its attempt closed.
    let runs_before = runs.load(Ordering::SeqCst);
    let message = kobe::amqp::TaskMessage::new(
        TaskId::parse(&id).unwrap(),
        "cancellable",
        vec![],
        serde_json::Map::new(),
    );
    let publisher = env.publisher();
    env.publish_message(&publisher, &message).await;
    let worker = env.spawn_worker_on(2, Vec::new(), registry(&runs));
    env.wait_queue_empty("default", "the late message settled")
        .await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), runs_before, "it never runs");
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Revoked);
    api.stop().await;
}
