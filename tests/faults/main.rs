//! Failure paths that need a process or a broker of the test's own: signals to a worker process,
//! and a private RabbitMQ node stopped and restarted under the API and a worker.

#[path = "../common/mod.rs"]
mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{PrivateRabbit, TestEnv};
use serde_json::{json, Value};

fn signal(child: &Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

fn spawn_worker_process(env: &TestEnv) -> Child {
    env.kobe_command(&["worker", "--concurrency", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kobe worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_task_finish_and_exits_cleanly() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let mut worker = spawn_worker_process(&env);

    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1500}}))
        .await;
    api.wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    signal(&worker, "TERM");
    let status = common::wait_exit(&mut worker, Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    // It finished before the worker exited: nothing left to redeliver.
    let body: Value = api.status(&id).await.json().await.unwrap();
    assert_eq!(body["state"], "SUCCESS", "{body}");
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(0)
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_the_task_is_redelivered_and_completes() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let mut worker = spawn_worker_process(&env);

    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1500}}))
        .await;
    let (started, _) = api
        .wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    signal(&worker, "KILL");
    common::wait_exit(&mut worker, Duration::from_secs(10)).await;

    let replacement = env.spawn_worker(2);
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    // A second attempt ran: the killed one never finished.
    assert_ne!(done["started_at"], started["started_at"], "{done}");
    replacement.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_task_and_needs_no_restart_of_kobe() {
    let rabbit = PrivateRabbit::start();
    let url = rabbit.url();
    let env = TestEnv::with(&[("RABBITMQ_URL", &url), ("KOBE_PUBLISH_TIMEOUT_MS", "3000")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(1);

    // A backlog: one task running, the rest waiting in the durable queue.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            api.submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 400}}))
                .await,
        );
    }
    rabbit.stop();

    // With the broker down the API says so, within its publish timeout.
    let started = Instant::now();
    let response = api
        .start_task(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}}))
        .await;
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );

    rabbit.restart();
    // The same API process accepts tasks again once its publisher has reconnected.
    let late = common::eventually(Duration::from_secs(30), "API accepting again", || async {
        let response = api
            .start_task(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}}))
            .await;
        if response.status() != 202 {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        body["task_id"].as_str().map(str::to_owned)
    })
    .await;
    ids.push(late);

    // The worker reconnected by itself and every accepted task completed.
    for id in &ids {
        let (body, _) = api.wait_for_final(id, Duration::from_secs(60)).await;
        assert_eq!(body["state"], "SUCCESS", "{body}");
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mongodb_down_a_worker_keeps_the_message_instead_of_losing_it() {
    let closed = common::free_port();
    let env = TestEnv::with(&[
        ("MONGODB_URI", &format!("mongodb://127.0.0.1:{closed}")),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "300"),
    ])
    .await;
    let publisher = env.publisher();
    let message = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::generate(),
        "demo_long_io",
        vec![],
        json!({"duration_ms": 1}).as_object().cloned().unwrap(),
    );
    env.publish_message(&publisher, &message).await;
    let queue = env.topology.queue("default");
    let worker = env.spawn_worker(1);
    // The worker takes it, cannot record STARTED, and hands it back (over and over) ...
    common::eventually(Duration::from_secs(10), "message taken", || async {
        (env.queue_depth(queue.clone()).await? == 0).then_some(())
    })
    .await;
    worker.stop().await;
    // ... so once the worker is gone the message is still there, never acked.
    common::eventually(
        Duration::from_secs(10),
        "message back in the queue",
        || async { (env.queue_depth(queue.clone()).await? == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_its_worker_each_time_is_closed_as_poison() {
    let env = TestEnv::with(&[("KOBE_MAX_DELIVERIES", "2")]).await;
    let api = env.spawn_api().await;
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 60000}}))
        .await;
    // Two workers die running it, one after the other (each start counts one delivery).
    for deliveries in 1..=2u32 {
        let mut worker = spawn_worker_process(&env);
        let tasks = env.tasks();
        common::eventually(Duration::from_secs(30), "the attempt started", || async {
            let task = tasks.get(&id).await.ok()??;
            (task.state == kobe::domain::TaskState::Started && task.deliveries == deliveries)
                .then_some(())
        })
        .await;
        signal(&worker, "KILL");
        common::wait_exit(&mut worker, Duration::from_secs(10)).await;
    }
    // The third delivery finds the attempt started twice already: poison, not a third death.
    let worker = env.spawn_worker(2);
    let (done, _) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "FAILURE", "{done}");
    assert!(
        done["root_cause"]
            .as_str()
            .unwrap()
            .contains("delivered 2 times"),
        "{done}"
    );
    let dead = env.dead_letters(1).await;
    assert!(dead[0]
        .header_text("x-kobe-reason")
        .unwrap()
        .contains("delivered 2 times"));
    assert_eq!(env.tasks().get(&id).await.unwrap().unwrap().deliveries, 2);
    worker.stop().await;
    api.stop().await;
}

/// Sets a private node's memory high watermark: 0 raises the memory alarm, which blocks every
/// publisher while consumers go on.
fn memory_alarm(rabbit: &PrivateRabbit, on: bool) {
    let watermark = if on { "0" } else { "0.4" };
    let status = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            &rabbit.node,
            "set_vm_memory_high_watermark",
            watermark,
        ])
        .status()
        .expect("rabbitmqctl");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_be_published_holds_the_delivery_without_rerunning_it() {
    let rabbit = PrivateRabbit::start();
    let url = rabbit.url();
    let env = TestEnv::with(&[
        ("RABBITMQ_URL", &url),
        ("KOBE_PUBLISH_TIMEOUT_MS", "800"),
        ("KOBE_RETRY_BASE_MS", "100"),
    ])
    .await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(2);
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1500, "fail_attempts": 1}}))
        .await;
    api.wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    // The broker refuses publishes while the first attempt fails: its retry cannot be sent.
    memory_alarm(&rabbit, true);
    let tasks = env.tasks();
    let errors = kobe::store::ErrorLogRepository::new(&env.db);
    common::eventually(Duration::from_secs(20), "retry publish failing", || async {
        (common::metric("kobe_amqp_publishes_total{outcome=\"failed\"}") >= 2.0).then_some(())
    })
    .await;
    // Meanwhile the attempt is not recorded as RETRY, and it does not run again.
    let held = tasks.get(&id).await.unwrap().unwrap();
    assert_eq!(held.state, kobe::domain::TaskState::Started, "{held:?}");
    assert_eq!(held.deliveries, 1);
    assert!(errors.for_task(&id).await.unwrap().is_empty());
    memory_alarm(&rabbit, false);

    let (done, seen) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    assert_eq!(done["retries"], 1, "{done}");
    let task = tasks.get(&id).await.unwrap().unwrap();
    assert_eq!(task.result.unwrap()["attempt"], 2);
    // Two runs in all: the attempt that failed once, and its retry.
    let recorded = errors.for_task(&id).await.unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?} (states seen: {seen:?})");
    worker.stop().await;
    api.stop().await;
}
