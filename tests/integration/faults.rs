//! Failure paths that need a process or a broker of the test's own: signals to a worker process,
//! and a private RabbitMQ node stopped and restarted under the API and a worker.

use crate::common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{PrivateRabbit, Running, TestEnv};
use serde_json::{json, Value};

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

    let id = api.submit(common::quick_task(1500)).await;
    api.wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    common::signal(worker.id(), libc::SIGTERM);
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

    let id = api.submit(common::quick_task(1500)).await;
    let (started, _) = api
        .wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    common::signal(worker.id(), libc::SIGKILL);
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
    let Running {
        env: _env,
        api,
        worker,
    } = TestEnv::with_worker(
        &[("RABBITMQ_URL", &url), ("KOBE_PUBLISH_TIMEOUT_MS", "3000")],
        1,
    )
    .await;

    // A backlog: one task running, the rest waiting in the durable queue.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(api.submit(common::quick_task(400)).await);
    }
    rabbit.stop();

    // With the broker down the API says so, within its publish timeout.
    let started = Instant::now();
    let response = api.start_task(common::quick_task(1)).await;
    assert_eq!(response.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );

    rabbit.restart();
    // The same API process accepts tasks again once its publisher has reconnected: within about
    // a second of the broker listening again (reconnection attempts are at most 500 ms apart).
    let back = Instant::now();
    let late = common::eventually(Duration::from_secs(30), "API accepting again", || async {
        let response = api.start_task(common::quick_task(1)).await;
        if response.status() != 202 {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        body["task_id"].as_str().map(str::to_owned)
    })
    .await;
    let reconnected = back.elapsed();
    eprintln!("API accepting again {reconnected:?} after the broker listened again");
    assert!(
        reconnected < Duration::from_millis(2500),
        "API took {reconnected:?} to accept again"
    );
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
    let id = api.submit(common::quick_task(60000)).await;
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
        common::signal(worker.id(), libc::SIGKILL);
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
    env.dead_letter_for("delivered 2 times").await;
    assert_eq!(env.tasks().get(&id).await.unwrap().unwrap().deliveries, 2);
    worker.stop().await;
    api.stop().await;
}

/// A test's slice of the services on its own broker, with short publish timeouts and retries.
async fn on_private_broker(rabbit: &PrivateRabbit) -> TestEnv {
    TestEnv::with(&[
        ("RABBITMQ_URL", &rabbit.url()),
        ("KOBE_PUBLISH_TIMEOUT_MS", "800"),
        ("KOBE_RETRY_BASE_MS", "100"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_be_published_holds_the_delivery_without_rerunning_it() {
    let rabbit = PrivateRabbit::start();
    let env = on_private_broker(&rabbit).await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(2);
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 5000, "fail_attempts": 1}}))
        .await;
    api.wait_for_state(&id, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    // The broker refuses publishes while the first attempt fails: its retry cannot be sent.
    // (The attempt runs 5 s, so the alarm is up before it ends even on a loaded machine.)
    rabbit.memory_alarm(true);
    let tasks = env.tasks();
    let running = tasks.get(&id).await.unwrap().unwrap();
    assert!(
        running.state == kobe::domain::TaskState::Started && running.finished_at.is_none(),
        "the alarm came too late to test anything: {running:?}"
    );
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
    rabbit.memory_alarm(false);

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

/// Records the attempts it runs; the first takes 5 s and fails.
struct SlowFailsFirst(std::sync::Arc<std::sync::Mutex<Vec<u32>>>);
impl kobe::tasks::Task for SlowFailsFirst {
    fn name(&self) -> &'static str {
        "slow_fails_first"
    }
    fn run(&self, invocation: kobe::tasks::Invocation) -> kobe::tasks::TaskFuture {
        self.0.lock().unwrap().push(invocation.attempt);
        Box::pin(async move {
            if invocation.attempt == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                return Err(kobe::tasks::TaskError::Retryable(
                    "first attempt fails".into(),
                ));
            }
            Ok(json!({"attempt": invocation.attempt}))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_while_its_retry_cannot_be_published_owes_the_retry_to_the_outbox() {
    let rabbit = PrivateRabbit::start();
    let env = on_private_broker(&rabbit).await;
    let attempts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = env.worker_with(2, SlowFailsFirst(attempts.clone()));
    let publisher = env.publisher();
    let message = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::generate(),
        "slow_fails_first",
        vec![],
        Default::default(),
    );
    let id = message.id.to_string();
    env.publish_message(&publisher, &message).await;
    let tasks = env.tasks();
    common::eventually(Duration::from_secs(20), "STARTED", || async {
        let task = tasks.get(&id).await.ok()??;
        (task.state == kobe::domain::TaskState::Started).then_some(())
    })
    .await;
    rabbit.memory_alarm(true);
    common::eventually(Duration::from_secs(20), "retry publish failing", || async {
        (common::metric("kobe_amqp_publishes_total{outcome=\"failed\"}") >= 1.0).then_some(())
    })
    .await;
    // The worker stops while it holds the delivery: it cannot settle it any more, and the
    // retry's message may or may not be queued. It records RETRY with the next attempt owed.
    worker.stop().await;
    let owed = tasks.get(&id).await.unwrap().unwrap();
    assert_eq!(owed.state, kobe::domain::TaskState::Retry, "{owed:?}");
    assert_eq!(owed.retries, 1);
    assert_eq!(
        owed.publish_state,
        Some(kobe::store::tasks::PublishState::Pending)
    );
    rabbit.memory_alarm(false);

    // The outbox pays the debt; the returned first-attempt message is stale and never runs.
    let outbox = kobe::submit::outbox::Outbox {
        tasks: env.tasks(),
        submitter: env.submitter(),
        age: Duration::ZERO,
    };
    assert_eq!(outbox.sweep_once().await.unwrap(), 1);
    let worker = env.worker_with(2, SlowFailsFirst(attempts.clone()));
    let done = env.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (done.state, done.retries),
        (kobe::domain::TaskState::Success, 1)
    );
    env.wait_queue_empty("default", "the stale copy acked")
        .await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2], "each attempt ran once");
    worker.stop().await;
}

/// Runs `f` on a channel of the test broker (a connection of its own).
async fn on_channel<T: Send + 'static>(
    env: &TestEnv,
    f: impl FnOnce(&amiquip::Channel) -> T + Send + 'static,
) -> T {
    let url = env.settings.broker.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut connection = kobe::amqp::connect(&url, Duration::from_secs(5)).expect("connect");
        let channel = connection.open_channel(None).expect("channel");
        let result = f(&channel);
        let _ = connection.close();
        result
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_no_queue_takes_is_a_503_and_the_task_never_runs() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // The route's queue is gone: the broker would confirm the message and drop it.
    let queue = env.topology.queue("default");
    on_channel(&env, move |channel| {
        channel
            .queue_delete(queue, Default::default())
            .expect("delete the queue")
    })
    .await;
    let response = api.start_task(common::quick_task(1)).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("could not route"),
        "{body}"
    );
    let id = body["task_id"].as_str().unwrap().to_owned();
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(task.state, kobe::domain::TaskState::Failure);
    assert!(task.root_cause.unwrap().contains("not published"));
    assert!(common::metric("kobe_amqp_publishes_total{outcome=\"returned\"}") >= 1.0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_nacks_is_a_503_and_the_task_never_runs() {
    let env = TestEnv::new().await;
    let api = env.spawn_api().await;
    // A second queue on the route that takes nothing and refuses publishes: the broker nacks.
    let full = format!("{}.full", env.settings.broker.prefix);
    let exchange = env.topology.tasks_exchange();
    let declared = full.clone();
    on_channel(&env, move |channel| {
        let mut arguments = amiquip::FieldTable::new();
        arguments.insert("x-max-length".into(), amiquip::AmqpValue::LongInt(0));
        arguments.insert(
            "x-overflow".into(),
            amiquip::AmqpValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(
                declared.clone(),
                amiquip::QueueDeclareOptions {
                    arguments,
                    ..Default::default()
                },
            )
            .expect("declare");
        channel
            .queue_bind(declared, exchange, "default", Default::default())
            .expect("bind");
    })
    .await;
    let response = api.start_task(common::quick_task(1)).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    on_channel(&env, move |channel| {
        let _ = channel.queue_delete(full, Default::default());
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("nack"), "{body}");
    let id = body["task_id"].as_str().unwrap().to_owned();
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(task.state, kobe::domain::TaskState::Failure);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_publisher_queue_answers_503_at_once_with_retry_after() {
    // A broker that accepts connections and never answers: the publisher is stuck connecting,
    // and its queue (two places) fills.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(16).flatten() {
            held.push(stream);
        }
    });
    let env = TestEnv::with(&[
        (
            "RABBITMQ_URL",
            &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        ),
        ("KOBE_PUBLISH_QUEUE", "2"),
        ("KOBE_PUBLISH_TIMEOUT_MS", "3000"),
    ])
    .await;
    let api = std::sync::Arc::new(env.spawn_api_unready().await);
    let mut requests = Vec::new();
    for _ in 0..12 {
        let api = api.clone();
        requests.push(tokio::spawn(async move {
            let started = Instant::now();
            let response = api.start_task(common::quick_task(1)).await;
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            (body, retry_after, started.elapsed())
        }));
    }
    let mut busy = 0;
    for request in requests {
        let (body, retry_after, took) = request.await.unwrap();
        assert_eq!(body["status"], 503, "{body}");
        if body["detail"].as_str().unwrap().contains("waiting already") {
            busy += 1;
            assert_eq!(retry_after.as_deref(), Some("1"));
            assert!(took < Duration::from_secs(2), "refused after {took:?}");
            // Not accepted, so closed: it never runs.
            let id = body["task_id"].as_str().unwrap().to_owned();
            let task = env.tasks().get(&id).await.unwrap().unwrap();
            assert_eq!(task.state, kobe::domain::TaskState::Failure);
        }
    }
    assert!(busy >= 1, "no request was refused by the full queue");
}

/// Counts its runs per task id.
#[derive(Clone, Default)]
struct RunLog(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl kobe::tasks::Task for RunLog {
    fn name(&self) -> &'static str {
        "logged"
    }
    fn run(&self, invocation: kobe::tasks::Invocation) -> kobe::tasks::TaskFuture {
        *self
            .0
            .lock()
            .unwrap()
            .entry(invocation.task_id.to_string())
            .or_default() += 1;
        Box::pin(async { Ok(json!("ran")) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_means_the_task_never_runs_and_a_202_that_it_runs_once() {
    // Confirms that come later than 3 ms count as lost: many submissions are refused
    // although the broker stored their message, and a worker is taking messages meanwhile.
    let timeout = std::env::var("KOBE_TEST_CONFIRM_MS").unwrap_or_else(|_| "3".into());
    let env = TestEnv::with(&[("KOBE_PUBLISH_TIMEOUT_MS", &timeout)]).await;
    let log = RunLog::default();
    let mut registry = kobe::tasks::Registry::with_builtin_tasks();
    registry.register(log.clone()).unwrap();
    let api = std::sync::Arc::new(env.spawn_api_with(registry.clone()).await);
    common::eventually(common::startup_deadline(), "API ready", || async {
        (api.get("/ready").await.status() == 200).then_some(())
    })
    .await;
    let worker = env.spawn_worker_on(4, vec![], registry);
    let mut answers = Vec::new();
    for round in 0..5 {
        let mut requests = Vec::new();
        for _ in 0..8 {
            let api = api.clone();
            requests.push(tokio::spawn(async move {
                let response = api.start_task(json!({"task_name": "logged"})).await;
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            }));
        }
        for request in requests {
            answers.push(request.await.unwrap());
        }
        let _ = round;
    }
    let tasks = env.tasks();
    let (mut refused, mut accepted) = (0, 0);
    for (status, body) in &answers {
        let id = body["task_id"]
            .as_str()
            .expect("every answer names its task");
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        match status {
            503 => {
                refused += 1;
                assert_eq!(task.state, kobe::domain::TaskState::Failure, "{task:?}");
                assert!(task
                    .root_cause
                    .as_deref()
                    .unwrap()
                    .contains("not published"));
            }
            202 => {
                accepted += 1;
                assert_eq!(task.state, kobe::domain::TaskState::Success, "{task:?}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Every message that reached the broker has been consumed (refused ones acked unrun).
    env.wait_queue_empty("default", "queue drained").await;
    worker.stop().await;
    let runs = log.0.lock().unwrap().clone();
    for (status, body) in &answers {
        let id = body["task_id"].as_str().unwrap();
        let ran = runs.get(id).copied().unwrap_or(0);
        match status {
            503 => assert_eq!(ran, 0, "task {id} was refused but ran"),
            _ => assert_eq!(ran, 1, "task {id} was accepted and ran {ran} times"),
        }
        let _ = tasks.get(id).await;
    }
    assert!(
        refused > 0,
        "no confirm was lost: nothing was provoked ({accepted} accepted)"
    );
    let kept = common::metric("kobe_lost_confirms_total{outcome=\"accepted\"}");
    eprintln!("{refused} refused, {accepted} accepted ({kept} of them after a lost confirm, because a worker had the task)");
}

/// Each run's invocation (one JSON line per run) in `file`, for the task ids it ran.
fn runs_in(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|run| run["task_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_a_steps_outcome_and_its_hand_on_loses_no_step_and_runs_none_twice()
{
    use common::proxy::{Mode, Proxy};
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-handon"));
    std::fs::create_dir_all(&dir).unwrap();
    let runs = dir.join("runs.jsonl");
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        format!(
            "[[task]]\nname = \"wf_step\"\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"cat >> {runs}; echo >> {runs}; sleep 1; echo 1\"]\n",
            runs = runs.display()
        ),
    )
    .unwrap();
    let port = common::free_port();
    let serve = env
        .kobe_command(&["serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("KOBE_TASKS_FILE", &file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Process::new)
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&client, &base).await;
    // The worker reaches MongoDB through a proxy the test slows down.
    let uri = &env.vars["MONGODB_URI"];
    let address = url::Url::parse(uri).unwrap();
    let upstream = format!(
        "{}:{}",
        address.host_str().unwrap(),
        address.port().unwrap_or(27017)
    );
    let proxy = Proxy::start(&upstream).await;
    let mut worker = env
        .kobe_command(&["worker"])
        .env("KOBE_TASKS_FILE", &file)
        .env("MONGODB_URI", proxy.url_for(uri))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let started = client
        .post(format!("{base}/workflow/start"))
        .json(&json!({"workflow": {"chain": [
            {"task_name": "wf_step"},
            {"task_name": "wf_step", "immutable": true}
        ]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let workflow: Value = started.json().await.unwrap();
    let workflow = workflow["workflow_id"].as_str().unwrap().to_owned();
    let (first, second) = (format!("{workflow}:0"), format!("{workflow}:1"));
    let tasks = env.tasks();
    common::eventually(
        Duration::from_secs(30),
        "the first step running",
        || async {
            let task = tasks.get(&first).await.ok()??;
            (task.state == kobe::domain::TaskState::Started).then_some(())
        },
    )
    .await;
    // Every answer MongoDB sends the worker now takes 400 ms: its outcome lands while the
    // hand-on (a read, another read, the next step's insert) is still under way.
    proxy.set(Mode::Slow(Duration::from_millis(400)));
    common::eventually(
        Duration::from_secs(30),
        "the first step's outcome",
        || async {
            let task = tasks.get(&first).await.ok()??;
            (task.state == kobe::domain::TaskState::Success).then_some(())
        },
    )
    .await;
    common::signal(worker.id(), libc::SIGKILL);
    common::wait_exit(&mut worker, Duration::from_secs(10)).await;
    assert!(
        tasks.get(&second).await.unwrap().is_none(),
        "the next step was submitted before the kill: the test missed its window"
    );

    // Another worker gets the first step's delivery again, finds it finished and hands on.
    let mut replacement = env
        .kobe_command(&["worker"])
        .env("KOBE_TASKS_FILE", &file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ended = common::eventually(Duration::from_secs(30), "the workflow ends", || async {
        let view: Value = client
            .get(format!("{base}/workflow/{workflow}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (view["state"] != "PENDING" && view["state"] != "STARTED").then_some(view)
    })
    .await;
    assert_eq!(ended["state"], "SUCCESS", "{ended}");
    let ran = runs_in(&runs);
    let times = |id: &str| ran.iter().filter(|r| *r == id).count();
    assert_eq!((times(&first), times(&second)), (1, 1), "runs: {ran:?}");
    assert_eq!(tasks.get(&first).await.unwrap().unwrap().deliveries, 1);
    common::signal(replacement.id(), libc::SIGTERM);
    common::wait_exit(&mut replacement, Duration::from_secs(20)).await;
    serve.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
