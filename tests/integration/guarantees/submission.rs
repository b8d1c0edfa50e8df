//! What a submitter's answer means when MongoDB or the broker fails under it: a 503 is a task that
//! never runs, however the failure falls, and a dedup key is never given to a second task while
//! the first may still be recorded.

use crate::common;

use std::time::Duration;

use common::proxy::{Mode, Proxy};
use common::TestEnv;
use kobe::domain::{Fingerprint, TaskId, TaskState};
use kobe::submit::outbox::Outbox;
use kobe::submit::{NewTask, Submitted, Submitter};
use serde_json::{json, Map};

use super::{address_of, through};

/// A submitter whose MongoDB connections pass through `mongo`, publishing through `publisher`.
async fn submitter_through(
    env: &TestEnv,
    mongo: &Proxy,
    publisher: kobe::amqp::Publisher,
) -> (Submitter, kobe::store::TaskRepository) {
    let mut settings = env.settings.clone();
    settings.mongo.uri = through(mongo, &env.settings.mongo.uri);
    let db = kobe::store::connect(
        &settings.mongo.uri,
        &settings.mongo.db,
        Duration::from_secs(5),
        kobe::store::Monitoring::Driver,
    )
    .await
    .expect("MongoDB through the proxy");
    let submitter = kobe::commands::submitter(
        &settings,
        &db,
        kobe::commands::cache(&settings).expect("Redis pool"),
        publisher,
        kobe::commands::writer(&settings, &db),
    );
    (submitter, kobe::store::TaskRepository::new(&db))
}

fn new_task() -> NewTask {
    let mut task = NewTask::new(TaskId::generate(), "demo_long_io", "default");
    task.kwargs = json!({"duration_ms": 1}).as_object().cloned().unwrap();
    task
}

/// Sweeps the outbox once with no age limit: everything it would ever publish, now.
async fn sweep_everything(env: &TestEnv) -> usize {
    Outbox {
        tasks: env.tasks(),
        submitter: env.submitter(),
        age: Duration::ZERO,
    }
    .sweep_once()
    .await
    .expect("outbox sweep")
}

/// Waits until the task is closed as refused, and checks it never ran.
async fn wait_refused(env: &TestEnv, id: &str) {
    let task = env.wait_final(id, Duration::from_secs(60)).await;
    assert_eq!(task.state, TaskState::Failure, "{task:?}");
    assert!(task.started_at.is_none(), "a refused task ran: {task:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_is_lost_is_a_503_and_never_runs_when_it_lands_late() {
    let env = TestEnv::new().await;
    let mongo = Proxy::start(&address_of(&env.settings.mongo.uri)).await;
    let (submitter, _) = submitter_through(&env, &mongo, env.publisher()).await;
    let task = new_task();
    let id = task.id.to_string();
    // The insert leaves and is held on the way: no answer within the writer's timeout.
    mongo.set(Mode::Blackhole);
    let answer = submitter.submit(task).await;
    assert!(answer.is_err(), "{answer:?}");
    // The network heals: the held insert reaches MongoDB after the caller was told 503.
    mongo.set(Mode::Pass);
    wait_refused(&env, &id).await;
    assert_eq!(sweep_everything(&env).await, 0, "the outbox published it");
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_fails_while_mongodb_is_away_is_a_503_keeps_its_key_and_never_runs() {
    let env = TestEnv::new().await;
    let mongo = Proxy::start(&address_of(&env.settings.mongo.uri)).await;
    let broker = Proxy::start(&address_of(&env.settings.broker.url)).await;
    let publisher = kobe::amqp::Publisher::start(
        &through(&broker, &env.settings.broker.url),
        env.topology.clone(),
        Duration::from_secs(3),
    )
    .unwrap();
    common::eventually(
        common::startup_deadline(),
        "publisher connected",
        || async { publisher.connected().ok() },
    )
    .await;
    let (submitter, _) = submitter_through(&env, &mongo, publisher).await;
    let task = new_task();
    let id = task.id.to_string();
    let fingerprint = Fingerprint::of_arguments(&task.task_name, &task.args, &task.kwargs);
    // The broker stops answering: the publish times out...
    broker.set(Mode::Blackhole);
    let first = {
        let (submitter, fingerprint) = (submitter.clone(), fingerprint.clone());
        tokio::spawn(async move {
            submitter
                .submit_once(task, &fingerprint, Duration::from_secs(600))
                .await
        })
    };
    common::eventually(Duration::from_secs(20), "recorded", || async {
        env.tasks().get(&id).await.ok().flatten()
    })
    .await;
    // ...and MongoDB refuses every connection when the submitter would close the task.
    mongo.set(Mode::Reset);
    let answer = first.await.unwrap();
    assert!(answer.is_err(), "{answer:?}");

    // The same submission again is pointed at the first, not made a second task.
    let mut again = new_task();
    again.kwargs = json!({"duration_ms": 1}).as_object().cloned().unwrap();
    let retried = env
        .submitter()
        .submit_once(again, &fingerprint, Duration::from_secs(600))
        .await
        .expect("the retry answered");
    assert_eq!(
        retried,
        Submitted::Duplicate {
            task_id: id.clone()
        }
    );

    // Once MongoDB answers the first is closed; the outbox never publishes it.
    mongo.set(Mode::Pass);
    wait_refused(&env, &id).await;
    assert_eq!(sweep_everything(&env).await, 0, "the outbox published it");
    assert_eq!(
        env.queue_depth(env.topology.queue("default")).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_taken_from_a_ghost_closes_the_ghost_first() {
    use kobe::store::dedup::DedupEntry;
    let env = TestEnv::new().await;
    let task = new_task();
    let fingerprint = Fingerprint::of_arguments(&task.task_name, &task.args, &task.kwargs);
    // A submission claimed the key a minute ago and has not recorded its task (yet).
    let ghost = TaskId::generate().to_string();
    let mut entry = DedupEntry::new(fingerprint.as_str(), &ghost, Duration::from_secs(600));
    entry.created_at =
        mongodb::bson::DateTime::from_millis(entry.created_at.timestamp_millis() - 60_000);
    env.db
        .collection::<DedupEntry>(kobe::store::dedup::COLLECTION)
        .insert_one(&entry)
        .await
        .unwrap();

    let submitted = env
        .submitter()
        .submit_once(task, &fingerprint, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(submitted, Submitted::Accepted);
    // The ghost's insert, arriving late, is refused: one task for the key.
    let late = kobe::store::TaskDocument::pending(
        &TaskId::parse(&ghost).unwrap(),
        "demo_long_io",
        "default",
    );
    let inserted = env.tasks().insert(&late).await;
    assert!(inserted.is_err(), "the ghost could still be recorded");
    let closed = env.tasks().get(&ghost).await.unwrap().unwrap();
    assert_eq!(closed.state, TaskState::Failure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_clients_task_keeps_its_arguments_for_a_rerun() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker(2);
    let publisher = env.publisher();
    let kwargs = json!({"duration_ms": 1, "fail_attempts": 0})
        .as_object()
        .cloned()
        .unwrap();
    let message =
        kobe::amqp::TaskMessage::new(TaskId::generate(), "demo_long_io", vec![], kwargs.clone());
    env.publish_message(&publisher, &message).await;
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(task.state, TaskState::Success);
    assert_eq!(task.kwargs, kwargs);
    assert_eq!(task.route, "default");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_message_sent_through_the_default_exchange_comes_back() {
    let env = TestEnv::with(&[("KOBE_RETRY_BASE_MS", "100")]).await;
    let worker = env.spawn_worker(2);
    let publisher = env.publisher();
    let kwargs = json!({"duration_ms": 1, "fail_attempts": 1});
    let message = kobe::amqp::TaskMessage::new(
        TaskId::generate(),
        "demo_long_io",
        vec![],
        kwargs.as_object().cloned().unwrap(),
    );
    // As a Celery client with no exchange configured sends it: to the queue by its name.
    publisher
        .publish(kobe::amqp::Outgoing {
            exchange: String::new(),
            routing_key: env.topology.queue("default"),
            body: message.body(),
            properties: message.properties(),
        })
        .await
        .unwrap();
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(task.retries, 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_redis_missed_is_read_from_mongodb() {
    let env = TestEnv::with(&[("KOBE_RESULT_BACKEND", "redis")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    // The worker's Redis is gone: its result write fails, MongoDB's does not.
    let mut settings = env.settings.clone();
    settings.redis.url =
        kobe::config::ServiceUrl::new(format!("redis://127.0.0.1:{}/0", common::free_port()));
    let worker = env.spawn_worker_with_settings(
        settings,
        2,
        vec![],
        kobe::tasks::Registry::with_builtin_tasks(),
    );
    let id = api.submit(common::quick_task(1)).await;
    env.wait_final(&id, Duration::from_secs(30)).await;
    let answer = api.get(&format!("/task/result/{id}")).await;
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["state"], "SUCCESS");
    assert!(body["result"].is_object(), "{body}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_an_old_worker_does_not_know_waits_for_one_that_does() {
    let env = TestEnv::new().await;
    let old = env.spawn_worker(2);
    let publisher = env.publisher();
    let message =
        kobe::amqp::TaskMessage::new(TaskId::generate(), "added_later", vec![], Map::new());
    env.publish_message(&publisher, &message).await;
    let wait = kobe::amqp::Topology::retry_level_for(Duration::from_secs(30));
    common::eventually(Duration::from_secs(20), "handed on", || async {
        (env.queue_depth(env.topology.retry_queue(wait)).await? == 1).then_some(())
    })
    .await;
    assert!(
        env.tasks()
            .get(message.id.as_str())
            .await
            .unwrap()
            .is_none(),
        "the old worker closed it"
    );
    old.stop().await;
    // The new version, which knows it, starts.
    let runs = super::Runs::default();
    let new = env.spawn_worker_on(
        2,
        vec![],
        super::registry_with(super::Recorded::new("added_later", "new", 1, &runs)),
    );
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(60))
        .await;
    assert_eq!(task.state, TaskState::Success);
    assert_eq!(super::runs_of(&runs, message.id.as_str()).len(), 1);
    new.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_countdown_behind_a_longer_one_in_the_same_level_runs_on_time() {
    let common::Running { env, api, worker } = TestEnv::with_worker(&[], 2).await;
    // 14 s and then 9 s: both once waited in the 15 s level, where the 9 s one expired only
    // after the 14 s one ahead of it.
    let long = api
        .submit(json!({"task_name": "demo_long_io", "countdown": 14, "kwargs": {"duration_ms": 1}}))
        .await;
    let short = api
        .submit(json!({"task_name": "demo_long_io", "countdown": 9, "kwargs": {"duration_ms": 1}}))
        .await;
    // How long after its due time (the eta the API recorded) each one started.
    let late_by = |task: kobe::store::TaskDocument| {
        task.started_at.expect("it ran").timestamp_millis()
            - task.eta.expect("an eta").timestamp_millis()
    };
    let short_late = late_by(env.wait_final(&short, Duration::from_secs(40)).await);
    let long_late = late_by(env.wait_final(&long, Duration::from_secs(40)).await);
    eprintln!(
        "the 9 s countdown started {short_late} ms after its due time, the 14 s one {long_late} ms"
    );
    // Never early; late by less than a hop and a delivery (it was late by 5 s).
    assert!(
        (0..1_500).contains(&short_late),
        "the 9 s countdown: {short_late} ms"
    );
    assert!(
        (0..1_500).contains(&long_late),
        "the 14 s countdown: {long_late} ms"
    );
    worker.stop().await;
}
