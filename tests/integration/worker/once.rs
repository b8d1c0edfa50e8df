//! One attempt, one outcome: a task runs once however its message arrives again (a dropped
//! connection, a second worker, a duplicate publish, a stale attempt), and every outcome that
//! cannot be stored, every hostile header and every poison message still ends in one decision.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestEnv;
use kobe::amqp::TaskMessage;
use kobe::domain::{TaskId, TaskState};
use kobe::store::ErrorLogRepository;
use kobe::tasks::{Invocation, Registry, Task, TaskFuture};
use serde_json::{json, Map, Value};

use super::{demo, kwargs, Counted};

/// Counts its runs and takes `ms` milliseconds each.
struct SlowCounted {
    name: &'static str,
    runs: Arc<AtomicUsize>,
    ms: u64,
}
impl Task for SlowCounted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let ms = self.ms;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({"attempt": invocation.attempt}))
        })
    }
}

fn slow(name: &'static str, ms: u64) -> (SlowCounted, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    (
        SlowCounted {
            name,
            runs: runs.clone(),
            ms,
        },
        runs,
    )
}

/// Waits until the task's document says STARTED, and returns it.
async fn wait_started(env: &TestEnv, id: &str) -> kobe::store::TaskDocument {
    let tasks = env.tasks();
    common::eventually(Duration::from_secs(20), "task STARTED", || async {
        tasks
            .get(id)
            .await
            .ok()
            .flatten()
            .filter(|t| t.state == TaskState::Started)
    })
    .await
}

async fn one_connection_drop_runs_the_task_once(workers: usize) {
    let env = TestEnv::new().await;
    let (task, runs) = slow("slow_counted", 2500);
    let mut registry = Registry::with_builtin_tasks();
    registry.register(task).unwrap();
    let mut running = vec![env.spawn_worker_on(2, vec![], registry.clone())];
    for _ in 1..workers {
        running.push(env.spawn_worker_on(2, vec![], registry.clone()));
    }
    let publisher = env.publisher();
    let message = TaskMessage::new(TaskId::generate(), "slow_counted", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let started = wait_started(&env, message.id.as_str()).await;

    // The broker drops every worker's consumer connection while the task runs: its message
    // is redelivered (to a reconnected consumer of this worker, or to the other worker).
    let closed = common::close_connections(&format!("kobe worker {}", env.settings.broker.prefix));
    assert_eq!(closed, workers, "consumer connections closed");

    let done = env
        .wait_final(message.id.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    // The redelivered copy never started beside the running attempt, and never after it.
    env.wait_queue_empty("default", "redelivery settled").await;
    for worker in running {
        worker.stop().await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the task ran more than once"
    );
    assert_eq!(
        done.started_at, started.started_at,
        "started_at overwritten"
    );
    assert_eq!(done.attempt_token, started.attempt_token);
    assert_eq!(done.deliveries, 1, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consumer_connection_does_not_run_the_task_twice() {
    one_connection_drop_runs_the_task_once(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_with_a_second_worker_does_not_run_the_task_twice() {
    one_connection_drop_runs_the_task_once(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_publish_of_a_running_task_waits_and_is_acked_without_running() {
    let env = TestEnv::new().await;
    let (task, runs) = slow("slow_counted", 1500);
    let worker = env.worker_with(4, task);
    let publisher = env.publisher();
    let message = TaskMessage::new(TaskId::generate(), "slow_counted", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    wait_started(&env, message.id.as_str()).await;
    // The same message again while the first copy runs (a duplicate publish).
    env.publish_message(&publisher, &message).await;
    let done = env
        .wait_final(message.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success);
    env.wait_queue_empty("default", "duplicate settled").await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(common::metric("kobe_duplicate_deliveries_total{reason=\"held\"}") >= 1.0);
}

/// Returns what MongoDB cannot store.
struct Unstorable;
impl Task for Unstorable {
    fn name(&self) -> &'static str {
        "unstorable"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        let kind = invocation.kwargs["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            Ok(match kind.as_str() {
                "u64" => json!({"n": u64::MAX}),
                "nul" => {
                    let mut object = Map::new();
                    object.insert("a\u{0}b".into(), json!(1));
                    Value::Object(object)
                }
                _ => json!("x".repeat(17 * 1024 * 1024)),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_mongodb_cannot_store_fails_the_task_once_instead_of_looping() {
    let env = TestEnv::new().await;
    let worker = env.worker_with(3, Unstorable);
    let publisher = env.publisher();
    let mut ids = Vec::new();
    for kind in ["u64", "nul", "huge"] {
        let message = TaskMessage::new(
            TaskId::generate(),
            "unstorable",
            vec![],
            kwargs(json!({"kind": kind})),
        );
        env.publish_message(&publisher, &message).await;
        ids.push(message.id.to_string());
    }
    let errors = ErrorLogRepository::new(&env.db);
    for id in &ids {
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(task.state, TaskState::Failure, "{task:?}");
        assert!(
            task.root_cause
                .as_deref()
                .unwrap()
                .contains("the result cannot be stored"),
            "{task:?}"
        );
        // Ran once: one start, one error record.
        assert_eq!(task.deliveries, 1, "{task:?}");
        assert_eq!(errors.for_task(id).await.unwrap().len(), 1);
    }
    let dead = env.dead_letters(3).await;
    assert!(dead.iter().all(|m| m
        .header_text("x-kobe-reason")
        .unwrap()
        .contains("cannot be stored")));
    worker.stop().await;
}

/// Its `time_limit` panics: outside the handler, in the worker's own handling of the delivery.
struct PanicsInWorker;
impl Task for PanicsInWorker {
    fn name(&self) -> &'static str {
        "panics_in_worker"
    }
    fn run(&self, _: Invocation) -> TaskFuture {
        Box::pin(async { Ok(json!(null)) })
    }
    fn time_limit(&self) -> Duration {
        panic!("a bug outside the handler")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_and_a_panic_in_delivery_handling_still_settle_the_message() {
    let env = TestEnv::new().await;
    // One slot: a delivery that never settled would hold it, and the last message would never run.
    let worker = env.worker_with(1, PanicsInWorker);
    let publisher = env.publisher();

    // A Celery client's time limit of 2e19 seconds: clamped, not a panic.
    let mut huge = demo(json!({"duration_ms": 1}));
    huge.hard_time_limit = Some(2e19);
    huge.soft_time_limit = Some(f64::MAX);
    env.publish_message(&publisher, &huge).await;
    assert_eq!(
        env.wait_final(huge.id.as_str(), Duration::from_secs(20))
            .await
            .state,
        TaskState::Success
    );

    let buggy = TaskMessage::new(TaskId::generate(), "panics_in_worker", vec![], Map::new());
    env.publish_message(&publisher, &buggy).await;
    env.wait_failure(
        buggy.id.as_str(),
        Duration::from_secs(20),
        "a bug outside the handler",
    )
    .await;
    env.dead_letter_for("worker error").await;

    let after = demo(json!({"duration_ms": 1}));
    env.publish_message(&publisher, &after).await;
    assert_eq!(
        env.wait_final(after.id.as_str(), Duration::from_secs(20))
            .await
            .state,
        TaskState::Success
    );
    worker.stop().await;
}

/// The lease an attempt that started `deliveries` times and died left behind, long lapsed.
async fn lapsed_lease(env: &TestEnv, message: &TaskMessage, retries: u32, deliveries: u32) {
    let died = mongodb::bson::DateTime::from_millis(0);
    env.db
        .collection::<mongodb::bson::Document>(kobe::store::task_leases::COLLECTION)
        .insert_one(mongodb::bson::doc! {
            "_id": kobe::store::task_leases::lease_id(message.id.as_str(), retries),
            "task_id": message.id.as_str(),
            "task_name": &message.task,
            "retries": i64::from(retries),
            "token": "an-attempt-that-died",
            "started_at": died,
            "lease_until": died,
            "deliveries": i64::from(deliveries),
        })
        .await
        .unwrap();
}

/// Sets fields of a task document as an earlier attempt would have left them.
async fn record(env: &TestEnv, message: &TaskMessage, fields: mongodb::bson::Document) {
    let mut document = kobe::store::TaskDocument::pending(&message.id, &message.task, "default");
    document.publish_state = None;
    env.tasks().insert(&document).await.unwrap();
    env.db
        .collection::<mongodb::bson::Document>("Tasks")
        .update_one(
            mongodb::bson::doc! {"_id": message.id.as_str()},
            mongodb::bson::doc! {"$set": fields},
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempt_never_runs_and_never_moves_retries_back() {
    let env = TestEnv::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = env.worker_with(2, Counted(runs.clone()));
    let publisher = env.publisher();
    // The task is waiting for its third attempt; a late copy of its first arrives.
    let message = TaskMessage::new(TaskId::generate(), "counted", vec![], Map::new());
    record(
        &env,
        &message,
        mongodb::bson::doc! {"state": "RETRY", "retries": 2_i64},
    )
    .await;
    lapsed_lease(&env, &message, 0, 1).await;
    lapsed_lease(&env, &message, 1, 1).await;
    env.publish_message(&publisher, &message).await;
    env.wait_queue_empty("default", "stale copy settled").await;
    common::eventually(Duration::from_secs(5), "counted as stale", || async {
        (common::metric("kobe_duplicate_deliveries_total{reason=\"stale_attempt\"}") >= 1.0)
            .then_some(())
    })
    .await;
    worker.stop().await;
    let task = env.tasks().get(message.id.as_str()).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Retry);
    assert_eq!(task.retries, 2);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_owed_by_a_dead_attempt_is_published_by_the_redelivery() {
    let env = TestEnv::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = env.worker_with(2, Counted(runs.clone()));
    let publisher = env.publisher();
    // An attempt recorded FAILURE and died before its dead letter was confirmed.
    let message = TaskMessage::new(TaskId::generate(), "counted", vec![], Map::new());
    record(
        &env,
        &message,
        mongodb::bson::doc! {"state": "FAILURE", "root_cause": "it broke", "dead_letter": "pending"},
    )
    .await;
    lapsed_lease(&env, &message, 0, 1).await;
    env.publish_message(&publisher, &message).await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        dead[0].header_text("id").as_deref(),
        Some(message.id.as_str())
    );
    assert_eq!(
        dead[0].header_text("x-kobe-reason").as_deref(),
        Some("it broke")
    );
    let tasks = env.tasks();
    common::eventually(Duration::from_secs(10), "debt noted as paid", || async {
        let task = tasks.get(message.id.as_str()).await.ok()??;
        (task.dead_letter == Some(kobe::store::tasks::DeadLetterState::Sent)).then_some(())
    })
    .await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_started_too_often_is_closed_as_poison() {
    let env = TestEnv::with(&[("KOBE_MAX_DELIVERIES", "3")]).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = env.worker_with(2, Counted(runs.clone()));
    let publisher = env.publisher();
    // Three attempts started it and died without an outcome (their leases have lapsed).
    let message = TaskMessage::new(TaskId::generate(), "counted", vec![], Map::new());
    record(&env, &message, mongodb::bson::doc! {"state": "PENDING"}).await;
    lapsed_lease(&env, &message, 0, 3).await;
    env.publish_message(&publisher, &message).await;
    env.wait_failure(
        message.id.as_str(),
        Duration::from_secs(20),
        "delivered 3 times",
    )
    .await;
    env.dead_letter_for("delivered 3 times").await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mongodb_down_an_unknown_task_is_neither_acked_nor_dead_lettered() {
    let closed = common::free_port();
    let env = TestEnv::with(&[
        ("MONGODB_URI", &format!("mongodb://127.0.0.1:{closed}")),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "300"),
        // About closing an unknown task, not about handing it on first.
        ("KOBE_UNKNOWN_TASK_GRACE_MS", "0"),
    ])
    .await;
    let publisher = env.publisher();
    let message = TaskMessage::new(TaskId::generate(), "no_such_task", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let queue = env.topology.queue("default");
    let worker = env.spawn_worker(1);
    common::eventually(Duration::from_secs(10), "message taken", || async {
        (env.queue_depth(queue.clone()).await? == 0).then_some(())
    })
    .await;
    // It cannot close the attempt (the write before its FAILURE), so it holds the message and
    // tries again (a second try means the first one's failure was answered, and nothing was
    // settled on it).
    common::eventually(Duration::from_secs(20), "FAILURE tried twice", || async {
        (common::metric("kobe_mongo_statements_total{purpose=\"lease_close\"}") >= 2.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        env.queue_depth(env.topology.dead_letter_queue()).await,
        Some(0)
    );
    worker.stop().await;
    common::eventually(
        Duration::from_secs(10),
        "message back in the queue",
        || async { (env.queue_depth(queue.clone()).await? == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        env.queue_depth(env.topology.dead_letter_queue()).await,
        Some(0)
    );
}

/// Fails its first attempt, counting runs per attempt.
struct FailsFirst(Arc<std::sync::Mutex<Vec<u32>>>);
impl Task for FailsFirst {
    fn name(&self) -> &'static str {
        "fails_first"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        self.0.lock().unwrap().push(invocation.attempt);
        Box::pin(async move {
            if invocation.attempt == 1 {
                return Err(kobe::tasks::TaskError::Retryable(
                    "first attempt fails".into(),
                ));
            }
            Ok(json!("second time lucky"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_of_a_failed_attempt_waiting_for_its_retry_is_acked_without_running() {
    // A long first retry delay: the task sits in RETRY while the copy arrives.
    let env = TestEnv::with(&[("KOBE_RETRY_BASE_MS", "3000"), ("KOBE_RETRY_MAX", "2")]).await;
    env.init_db().await;
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = env.worker_with(2, FailsFirst(attempts.clone()));
    let publisher = env.publisher();
    let message = TaskMessage::new(TaskId::generate(), "fails_first", vec![], Map::new());
    let id = message.id.to_string();
    env.publish_message(&publisher, &message).await;
    let tasks = env.tasks();
    let waiting = common::eventually(Duration::from_secs(20), "RETRY", || async {
        tasks
            .get(&id)
            .await
            .ok()
            .flatten()
            .filter(|t| t.state == TaskState::Retry)
    })
    .await;
    assert_eq!(
        waiting.retries, 1,
        "the failure is counted when RETRY is recorded"
    );

    // The first attempt's message again, as after an ack lost with a dropped connection.
    env.publish_message(&publisher, &message).await;
    let done = env.wait_final(&id, Duration::from_secs(20)).await;
    assert_eq!((done.state, done.retries), (TaskState::Success, 1));
    assert_eq!(
        *attempts.lock().unwrap(),
        [1, 2],
        "attempt 1 ran once, then attempt 2"
    );
    assert!(common::metric("kobe_duplicate_deliveries_total{reason=\"stale_attempt\"}") >= 1.0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_document_cannot_be_read_is_dead_lettered_not_cycled() {
    let env = TestEnv::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let worker = env.worker_with(2, Counted(runs.clone()));
    let publisher = env.publisher();
    // A hand-edited document: its state is not a state. Its second attempt's message looks it up.
    let mut message = TaskMessage::new(TaskId::generate(), "counted", vec![], Map::new());
    message.retries = 1;
    record(&env, &message, mongodb::bson::doc! {"state": 42_i64}).await;
    env.publish_message(&publisher, &message).await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        dead[0].header_text("id").as_deref(),
        Some(message.id.as_str())
    );
    let reason = dead[0].header_text("x-kobe-reason").unwrap_or_default();
    assert!(reason.contains("cannot be read"), "{reason}");
    env.wait_queue_empty("default", "the delivery settled")
        .await;
    worker.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // Its attempt's outcome says why, beside the unreadable document.
    let outcome = env
        .tasks()
        .outcomes()
        .get(message.id.as_str(), 1)
        .await
        .unwrap()
        .expect("an outcome");
    assert_eq!(outcome.state, TaskState::Failure);
}
