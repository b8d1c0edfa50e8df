//! The worker against live RabbitMQ and MongoDB: retries, dead letters, time limits, bad messages,
//! priorities, duplicates, panics.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Running, TestEnv};
use kobe::amqp::TaskMessage;
use kobe::domain::{Priority, TaskId, TaskState};
use kobe::store::{Decision, ErrorLogRepository};
use kobe::tasks::{Invocation, Registry, Task, TaskError, TaskFuture};
use serde_json::{json, Map, Value};

mod once;

pub(super) fn kwargs(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

pub(super) fn demo(kw: Value) -> TaskMessage {
    TaskMessage::new(TaskId::generate(), "demo_long_io", vec![], kwargs(kw))
}

/// Fails for good on every attempt.
struct AlwaysPermanent;
impl Task for AlwaysPermanent {
    fn name(&self) -> &'static str {
        "always_permanent"
    }
    fn run(&self, _: Invocation) -> TaskFuture {
        Box::pin(async { Err(TaskError::Permanent("the input can never work".into())) })
    }
}

/// Panics on its first attempt, succeeds after.
struct PanicsOnce;
impl Task for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics_once"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        Box::pin(async move {
            if invocation.attempt == 1 {
                panic!("handler bug on attempt 1");
            }
            Ok(json!({"attempt": invocation.attempt}))
        })
    }
}

/// Counts its runs.
pub(super) struct Counted(pub(super) Arc<AtomicUsize>);
impl Task for Counted {
    fn name(&self) -> &'static str {
        "counted"
    }
    fn run(&self, _: Invocation) -> TaskFuture {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(json!("counted")) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_retry_with_growing_delays_until_success() {
    let Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_RETRY_MAX", "3"), ("KOBE_RETRY_BASE_MS", "300")], 4).await;

    let id = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 10, "fail_attempts": 2}}),
        )
        .await;
    let (status, seen) = api.wait_for_final(&id, Duration::from_secs(30)).await;
    assert_eq!(status["state"], "SUCCESS", "{status}");
    assert_eq!(status["retries"], 2, "{status}");
    assert!(seen.contains(&"RETRY".to_owned()), "states seen: {seen:?}");

    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(task.result.unwrap()["attempt"], 3);
    let errors = ErrorLogRepository::new(&env.db)
        .for_task(&id)
        .await
        .unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors.iter().map(|e| e.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(errors.iter().all(|e| e.decision == Decision::Retry));
    let planned: Vec<i64> = errors
        .iter()
        .map(|e| e.retry_delay_ms.unwrap() as i64)
        .collect();
    assert!(planned[1] > planned[0], "planned delays {planned:?}");
    // The waits really happened: each attempt started no sooner than its planned delay after the
    // one before it started (which ran, then published its retry, before the delay began).
    let started = |e: &kobe::store::ErrorRecord| e.started_at.expect("it ran").timestamp_millis();
    let observed = [
        started(&errors[1]) - started(&errors[0]),
        task.started_at.unwrap().timestamp_millis() - started(&errors[1]),
    ];
    for (seen, plan) in observed.iter().zip(&planned) {
        assert!(seen >= plan, "observed {observed:?} planned {planned:?}");
    }

    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_retries_dead_letter_the_message_with_its_reason() {
    let env = TestEnv::with(&[("KOBE_RETRY_MAX", "2"), ("KOBE_RETRY_BASE_MS", "100")]).await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.spawn_worker(4);

    let message = demo(json!({"duration_ms": 1, "fail_attempts": 10}));
    env.publish_message(&publisher, &message).await;
    env.wait_failure(
        message.id.as_str(),
        Duration::from_secs(30),
        "retries exhausted",
    )
    .await;

    let dead = env.dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header_text("id").as_deref(),
        Some(message.id.as_str())
    );
    assert!(dead[0]
        .header_text("x-kobe-reason")
        .unwrap()
        .contains("retries exhausted"));

    let errors = ErrorLogRepository::new(&env.db)
        .for_task(message.id.as_str())
        .await
        .unwrap();
    let decisions: Vec<Decision> = errors.iter().map(|e| e.decision).collect();
    assert_eq!(
        decisions,
        [Decision::Retry, Decision::Retry, Decision::DeadLetter]
    );
    assert!(errors
        .iter()
        .all(|e| e.root_cause.contains("simulated I/O failure")));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_dead_letters_on_the_first_attempt() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.worker_with(2, AlwaysPermanent);

    let message = TaskMessage::new(TaskId::generate(), "always_permanent", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(task.state, TaskState::Failure);
    assert_eq!(task.retries, 0);
    env.dead_letter_for("can never work").await;
    let errors = ErrorLogRepository::new(&env.db)
        .for_task(message.id.as_str())
        .await
        .unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].decision, Decision::DeadLetter);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_time_limit_abandons_the_task_as_a_failure() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.spawn_worker(2);

    let mut message = demo(json!({"duration_ms": 30_000}));
    message.hard_time_limit = Some(0.3);
    env.publish_message(&publisher, &message).await;
    env.wait_failure(message.id.as_str(), Duration::from_secs(20), "time limit")
        .await;
    env.dead_letter_for("time limit").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_time_limit_lets_the_handler_stop_cleanly() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.spawn_worker(2);

    let mut message = demo(json!({"duration_ms": 30_000}));
    message.soft_time_limit = Some(0.2);
    message.hard_time_limit = Some(20.0);
    env.publish_message(&publisher, &message).await;
    env.wait_failure(
        message.id.as_str(),
        Duration::from_secs(10),
        "soft time limit",
    )
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_messages_are_dead_lettered_and_the_worker_goes_on() {
    // Unknown tasks closed at once, not handed on for other workers first.
    let env = TestEnv::with(&[("KOBE_UNKNOWN_TASK_GRACE_MS", "0")]).await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.spawn_worker(2);

    let broken = demo(json!({}));
    env.publish_raw(&publisher, broken.properties(), b"{not json".to_vec())
        .await;
    let unknown = TaskMessage::new(TaskId::generate(), "no_such_task", vec![], Map::new());
    env.publish_message(&publisher, &unknown).await;
    let headerless =
        amiquip::AmqpProperties::default().with_content_type("application/json".into());
    env.publish_raw(&publisher, headerless, b"[[], {}, {}]".to_vec())
        .await;

    let dead = env.dead_letters(3).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| m.header_text("x-kobe-reason").unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("malformed message") && r.contains("body")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown task `no_such_task`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("missing header `task`")),
        "{reasons:?}"
    );
    assert_eq!(
        env.tasks()
            .get(unknown.id.as_str())
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Failure
    );

    let good = demo(json!({"duration_ms": 1}));
    env.publish_message(&publisher, &good).await;
    assert_eq!(
        env.wait_final(good.id.as_str(), Duration::from_secs(10))
            .await
            .state,
        TaskState::Success
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_up_queue_delivers_higher_priorities_first() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let publisher = env.publisher();
    let mut low = Vec::new();
    let mut high = Vec::new();
    for priority in [1, 1, 1, 1, 8, 8, 8, 8] {
        let mut message = demo(json!({"duration_ms": 20}));
        message.priority = Priority::new(priority).unwrap();
        env.publish_message(&publisher, &message).await;
        if priority == 8 {
            high.push(message.id)
        } else {
            low.push(message.id)
        }
    }
    let worker = env.spawn_worker(1);
    let mut started = Vec::new();
    for id in low.iter().chain(&high) {
        let task = env.wait_final(id.as_str(), Duration::from_secs(20)).await;
        assert_eq!(task.state, TaskState::Success);
        started.push((task.started_at.unwrap(), high.contains(id)));
    }
    started.sort();
    let order: Vec<bool> = started.iter().map(|(_, is_high)| *is_high).collect();
    assert_eq!(
        order,
        [true, true, true, true, false, false, false, false],
        "started in order: {started:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_delivery_of_a_finished_task_does_not_run_it_again() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let publisher = env.publisher();
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = env.worker_with(2, Counted(runs.clone()));

    let message = TaskMessage::new(TaskId::generate(), "counted", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let first = env
        .wait_final(message.id.as_str(), Duration::from_secs(10))
        .await;
    assert_eq!(first.state, TaskState::Success);

    // The same message again, as a redelivery after a lost ack would bring it.
    env.publish_message(&publisher, &message).await;
    env.wait_queue_empty("default", "duplicate consumed").await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let after = env.tasks().get(message.id.as_str()).await.unwrap().unwrap();
    assert_eq!(after.finished_at, first.finished_at);
    assert_eq!(after.state, TaskState::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_is_retried_and_the_worker_survives() {
    let env = TestEnv::with(&[("KOBE_RETRY_BASE_MS", "100")]).await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.worker_with(2, PanicsOnce);

    let message = TaskMessage::new(TaskId::generate(), "panics_once", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(task.retries, 1);
    let errors = ErrorLogRepository::new(&env.db)
        .for_task(message.id.as_str())
        .await
        .unwrap();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].root_cause.contains("panicked: handler bug"),
        "{errors:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_tasks_travel_through_their_own_queue() {
    let env = TestEnv::with(&[("KOBE_TASK_ROUTES", "demo_long_io=io")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let id = api.submit(common::quick_task(1)).await;
    // The message waits in the `io` queue, not in `default`...
    assert_eq!(env.queue_depth(env.topology.queue("io")).await, Some(1));
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(0)
    );
    // ...and a worker consuming `io` runs it.
    let io = env.spawn_worker_on(1, vec!["io".into()], Registry::with_builtin_tasks());
    assert_eq!(
        env.wait_final(&id, Duration::from_secs(10)).await.state,
        TaskState::Success
    );
    io.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_run_and_dead_letter_tasks_too() {
    let env = TestEnv::with(&[("KOBE_QUEUE_TYPE", "quorum")]).await;
    env.init_db().await;
    let publisher = env.publisher();
    let worker = env.worker_with(2, AlwaysPermanent);

    let ok = demo(json!({"duration_ms": 1}));
    env.publish_message(&publisher, &ok).await;
    let doomed = TaskMessage::new(TaskId::generate(), "always_permanent", vec![], Map::new());
    env.publish_message(&publisher, &doomed).await;
    assert_eq!(
        env.wait_final(ok.id.as_str(), Duration::from_secs(20))
            .await
            .state,
        TaskState::Success
    );
    assert_eq!(
        env.wait_final(doomed.id.as_str(), Duration::from_secs(20))
            .await
            .state,
        TaskState::Failure
    );
    let dead = env.dead_letters(1).await;
    assert_eq!(
        dead[0].header_text("id").as_deref(),
        Some(doomed.id.as_str())
    );
    worker.stop().await;
}
