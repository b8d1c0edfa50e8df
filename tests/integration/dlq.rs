//! `kobe dlq …` against a real dead-letter queue: listing removes nothing, a replay runs the task
//! again as its next attempt and removes the letter only then, an interrupted replay is finished
//! by the next one, and a purge needs to be asked for.

use crate::common;

use std::time::Duration;

use common::{Running, TestEnv};
use kobe::amqp::TaskMessage;
use kobe::domain::{TaskId, TaskState};
use mongodb::bson::doc;
use serde_json::{json, Map, Value};

/// Runs `kobe dlq ARGS` with the test's settings: (exit code, stdout, stderr).
fn dlq(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let output = env.kobe_command(&all).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits until the dead-letter queue holds exactly `count` ready messages.
async fn wait_dead_letters(env: &TestEnv, count: u32) {
    let queue = env.topology.dead_letter_queue();
    common::eventually(
        Duration::from_secs(20),
        &format!("{count} dead letters"),
        || async { (env.queue_depth(queue.clone()).await? == count).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_once_and_purged_on_request() {
    let env = TestEnv::with(&[("KOBE_RETRY_MAX", "0"), ("KOBE_UNKNOWN_TASK_GRACE_MS", "0")]).await;
    env.init_db().await;
    let worker = env.spawn_worker(4);
    let publisher = env.publisher();
    // Each fails its first attempt and would succeed on its second.
    let once = || {
        let kwargs = json!({"duration_ms": 1, "fail_attempts": 1});
        TaskMessage::new(
            TaskId::generate(),
            "demo_long_io",
            vec![],
            kwargs.as_object().cloned().unwrap(),
        )
    };
    let (a, b) = (once(), once());
    let unknown = TaskMessage::new(TaskId::generate(), "no_such_task", vec![], Map::new());
    for m in [&a, &b, &unknown] {
        env.publish_message(&publisher, m).await;
        env.wait_final(m.id.as_str(), Duration::from_secs(20)).await;
    }
    wait_dead_letters(&env, 3).await;

    let (code, out, err) = dlq(&env, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    for id in [&a.id, &b.id, &unknown.id] {
        assert!(out.contains(id.as_str()), "{out}");
    }
    assert!(out.contains("3 letter(s)"), "{out}");
    wait_dead_letters(&env, 3).await;

    let (_, out, _) = dlq(&env, &["list", "--reason", "unknown task", "--json"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["task_id"], unknown.id.as_str());
    assert!(lines[0]["dead_lettered_at"].is_i64());

    let (code, out, _) = dlq(&env, &["show", a.id.as_str()]);
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["task_name"], "demo_long_io");
    assert!(shown["reason"]
        .as_str()
        .unwrap()
        .contains("retries exhausted"));
    assert_eq!(shown["body"][1]["fail_attempts"], 1, "{shown}");

    let (code, out, _) = dlq(&env, &["replay", "--dry-run", a.id.as_str()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("would replay"), "{out}");
    wait_dead_letters(&env, 3).await;
    let task = env.tasks().get(a.id.as_str()).await.unwrap().unwrap();
    assert_eq!((task.state, task.retries), (TaskState::Failure, 0));

    let (code, out, err) = dlq(&env, &["replay", a.id.as_str()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("replayed  {}  (attempt 2)", a.id)),
        "{out}"
    );
    let task = env.wait_final(a.id.as_str(), Duration::from_secs(20)).await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(task.retries, 1, "the replay ran as the second attempt");
    assert_eq!(task.replays.len(), 1);
    assert!(task.replays[0].by.starts_with("cli:"));
    wait_dead_letters(&env, 2).await;

    // Its letter is gone: a second replay finds nothing and changes nothing.
    let (code, _, err) = dlq(&env, &["replay", a.id.as_str()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no dead letter"), "{err}");
    let again = env.tasks().get(a.id.as_str()).await.unwrap().unwrap();
    assert_eq!((again.retries, again.replays.len()), (1, 1));

    // A replay interrupted after reopening `b` and before its publish was confirmed.
    env.db
        .collection::<mongodb::bson::Document>("Tasks")
        .update_one(
            doc! {"_id": b.id.as_str()},
            doc! {
                "$set": {"state": "RETRY", "retries": 1_i64, "publish_state": "pending"},
                "$push": {"replays": {"at": mongodb::bson::DateTime::now(), "by": "cli:interrupted"}},
            },
        )
        .await
        .unwrap();
    let (code, out, _) = dlq(&env, &["replay", "--task", "demo_long_io"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("replayed  {}  (attempt 2)", b.id)),
        "{out}"
    );
    let task = env.wait_final(b.id.as_str(), Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Success, 1));
    assert_eq!(
        task.replays.len(),
        1,
        "finishing the replay did not reopen it again"
    );
    wait_dead_letters(&env, 1).await;

    let (code, _, err) = dlq(&env, &["purge"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--yes"), "{err}");
    let (code, out, _) = dlq(&env, &["purge", "--older-than", "1h", "--yes"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("0 letter(s) removed"), "{out}");
    wait_dead_letters(&env, 1).await;
    let (_, out, _) = dlq(&env, &["purge", "--yes"]);
    assert!(out.contains("1 letter(s) removed"), "{out}");
    wait_dead_letters(&env, 0).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_is_retried_from_the_api_and_the_cli_and_nothing_else_is() {
    let Running { env, api, worker } = TestEnv::with_worker(&[("KOBE_RETRY_MAX", "0")], 2).await;
    // Fails its first two attempts, succeeds on the third.
    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 2}}),
        )
        .await;
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "FAILURE");

    let retry = |id: String| {
        let client = api.client.clone();
        let url = format!("{}/task/{id}/retry", api.address);
        async move { client.post(url).send().await.unwrap() }
    };
    let response = retry(id.clone()).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["attempt"], 2);
    let task = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Failure, 1));
    assert!(task.replays[0].by.starts_with("api:"));

    let output = env.kobe_command(&["task", "retry", &id]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("(attempt 3)"));
    let task = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Success, 2));
    assert_eq!(task.replays.len(), 2);
    let (status, _) = api.wait_for_final(&id, Duration::from_secs(5)).await;
    assert_eq!(status["state"], "SUCCESS", "the cached FAILURE was dropped");

    // A finished SUCCESS is refused, and left as it is.
    let response = retry(id.clone()).await;
    assert_eq!(response.status(), 409);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("SUCCESS"),
        "{problem}"
    );
    let output = env.kobe_command(&["task", "retry", &id]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!((task.retries, task.replays.len()), (2, 2));

    assert_eq!(retry(TaskId::generate().to_string()).await.status(), 404);

    let output = env
        .kobe_command(&["task", "list", "--state", "SUCCESS", "--within", "1h"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        listed.contains(&id) && listed.contains("1 task(s)"),
        "{listed}"
    );
    let output = env.kobe_command(&["task", "show", &id]).output().unwrap();
    let shown: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["task"]["state"], "SUCCESS");
    assert_eq!(shown["task"]["replays"].as_array().unwrap().len(), 2);
    assert_eq!(shown["errors"].as_array().unwrap().len(), 2, "{shown}");
    let output = env
        .kobe_command(&["task", "show", &TaskId::generate().to_string()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    worker.stop().await;
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_keeps_the_letter_of_a_task_that_is_still_on_its_way() {
    let Running { env, api, worker } = TestEnv::with_worker(&[("KOBE_RETRY_MAX", "0")], 2).await;
    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .await;
    env.wait_final(&id, Duration::from_secs(20)).await;
    wait_dead_letters(&env, 1).await;
    worker.stop().await;
    // Rerun by other means while no worker runs: the task is on its way again, not finished.
    let post = |path: String, body: Value| {
        let client = api.client.clone();
        let url = format!("{}{path}", api.address);
        async move { client.post(url).json(&body).send().await.unwrap() }
    };
    assert_eq!(
        post(format!("/task/{id}/retry"), json!({})).await.status(),
        202
    );
    let replayed: Value = post("/dlq/replay".into(), json!({"task_ids": [id]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["outcomes"][0]["outcome"], "kept", "{replayed}");
    let letters: Value = api.get("/dlq").await.json().await.unwrap();
    assert_eq!(letters["letters"].as_array().unwrap().len(), 1, "{letters}");
    // Once it has finished, the letter is stale and goes.
    let worker = env.spawn_worker(2);
    let task = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!(task.state, TaskState::Success);
    let replayed: Value = post("/dlq/replay".into(), json!({"task_ids": [id]}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["outcomes"][0]["outcome"], "stale", "{replayed}");
    let letters: Value = api.get("/dlq").await.json().await.unwrap();
    assert_eq!(letters["letters"], json!([]), "{letters}");
    worker.stop().await;
}
