//! The promises at the defaults users run and under the faults they meet: a backlog, a broker
//! connection reset or a broker node killed, a MongoDB that stops answering, a far ETA beside
//! other submissions, a write concern in the URI. Each test counts how many times each task ran
//! and checks what the client was told, not only where the task ended.

use crate::common;

mod submission;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{Mode, Proxy};
use common::{PrivateRabbit, Running, TestEnv};
use kobe::amqp::TaskMessage;
use kobe::config::ServiceUrl;
use kobe::domain::{TaskId, TaskState};
use kobe::tasks::{Invocation, Registry, Task, TaskError, TaskFuture};
use serde_json::{json, Map};

/// Each run of a [`Recorded`] task: which worker ran it, when, and how it ended.
#[derive(Debug, Clone)]
struct Run {
    worker: &'static str,
    task_id: String,
    started: Instant,
    ended: Option<Instant>,
    /// The handler saw its cancel signal (an operator's cancel, or a lease it cannot keep).
    told_to_stop: bool,
}

type Runs = Arc<Mutex<Vec<Run>>>;

/// A task that records every run; runs `ms` milliseconds unless told to stop first, and then
/// fails retryably (as a handler that honours the signal does). `ignore_stop`: runs on anyway.
#[derive(Clone)]
struct Recorded {
    name: &'static str,
    worker: &'static str,
    ms: u64,
    ignore_stop: bool,
    /// End in a retryable failure instead of a success.
    fail: bool,
    /// End when this is notified instead of after `ms`.
    until: Option<Arc<tokio::sync::Notify>>,
    runs: Runs,
}

impl Recorded {
    fn new(name: &'static str, worker: &'static str, ms: u64, runs: &Runs) -> Self {
        Self {
            name,
            worker,
            ms,
            ignore_stop: false,
            fail: false,
            until: None,
            runs: runs.clone(),
        }
    }
}

/// Marks its run ended when the handler's future is dropped (finished, or aborted).
struct EndOfRun(Runs, usize);

impl Drop for EndOfRun {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.0.lock() {
            runs[self.1].ended = Some(Instant::now());
        }
    }
}

impl Task for Recorded {
    fn name(&self) -> &'static str {
        self.name
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        let this = self.clone();
        Box::pin(async move {
            let index = {
                let mut runs = this.runs.lock().unwrap();
                runs.push(Run {
                    worker: this.worker,
                    task_id: invocation.task_id.to_string(),
                    started: Instant::now(),
                    ended: None,
                    told_to_stop: false,
                });
                runs.len() - 1
            };
            let _end = EndOfRun(this.runs.clone(), index);
            let until = tokio::time::Instant::now() + Duration::from_millis(this.ms);
            let mut cancel = invocation.cancel.clone();
            let ended = || {
                if this.fail {
                    Err(TaskError::Retryable("failed as planned".into()))
                } else {
                    Ok(json!({"ran_ms": this.ms}))
                }
            };
            let finish = async {
                match &this.until {
                    Some(go) => go.notified().await,
                    None => tokio::time::sleep_until(until).await,
                }
            };
            tokio::pin!(finish);
            tokio::select! {
                () = &mut finish => ended(),
                () = cancel.raised() => {
                    this.runs.lock().unwrap()[index].told_to_stop = true;
                    if this.ignore_stop {
                        finish.await;
                        return ended();
                    }
                    Err(TaskError::Retryable("stopped when told to".into()))
                }
            }
        })
    }
}

fn registry_with(task: Recorded) -> Registry {
    let mut registry = Registry::with_builtin_tasks();
    registry
        .register(task)
        .expect("a task name of the test's own");
    registry
}

fn runs_of(runs: &Runs, id: &str) -> Vec<Run> {
    runs.lock()
        .unwrap()
        .iter()
        .filter(|r| r.task_id == id)
        .cloned()
        .collect()
}

fn message(task: &str) -> TaskMessage {
    TaskMessage::new(TaskId::generate(), task, vec![], Map::new())
}

/// `url` (a service's, of this machine) with host and port replaced by `proxy`'s.
fn through(proxy: &Proxy, url: &ServiceUrl) -> ServiceUrl {
    ServiceUrl::new(proxy.url_for(url.expose()))
}

/// `host:port` of a service URL.
fn address_of(url: &ServiceUrl) -> String {
    let parsed = url::Url::parse(url.expose()).expect("a service URL");
    format!(
        "{}:{}",
        parsed.host_str().unwrap(),
        parsed.port_or_known_default().unwrap_or(27017)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_long_tasks_runs_each_once_and_a_wait_is_no_delivery() {
    // The shipped defaults: concurrency 10, prefetch x4, a 1 s slot wait, 5 deliveries at most.
    let env = TestEnv::with(&[("KOBE_EXECUTION_LEASE_MS", "30000")]).await;
    let runs: Runs = Runs::default();
    let worker = env.spawn_worker_on(
        10,
        vec![],
        registry_with(Recorded::new("backlog_task", "w", 3000, &runs)),
    );
    let publisher = env.publisher();
    let messages: Vec<TaskMessage> = (0..40).map(|_| message("backlog_task")).collect();
    for m in &messages {
        env.publish_message(&publisher, m).await;
    }
    for m in &messages {
        let task = env.wait_final(m.id.as_str(), Duration::from_secs(90)).await;
        assert_eq!(task.state, TaskState::Success, "{task:?}");
        assert_eq!(
            task.deliveries, 1,
            "a wait for a run slot counted: {task:?}"
        );
        assert_eq!(runs_of(&runs, m.id.as_str()).len(), 1, "{task:?}");
    }
    assert_eq!(
        env.queue_depth(env.topology.dead_letter_queue()).await,
        Some(0)
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_and_a_busy_worker_come_back_after_their_broker_connections_are_reset() {
    // The idle worker consumes a route of its own, so it has nothing to do when the fault comes.
    let env = TestEnv::with(&[("KOBE_TASK_ROUTES", "idle_task=idle")]).await;
    let proxy = Proxy::start(&address_of(&env.settings.broker.url)).await;
    let mut settings = env.settings.clone();
    settings.broker.url = through(&proxy, &env.settings.broker.url);
    let runs: Runs = Runs::default();
    let busy = env.spawn_worker_with_settings(
        settings.clone(),
        2,
        vec!["default".into()],
        registry_with(Recorded::new("reset_task", "busy", 2000, &runs)),
    );
    let idle = env.spawn_worker_with_settings(
        settings,
        2,
        vec!["idle".into()],
        registry_with(Recorded::new("idle_task", "idle", 10, &runs)),
    );
    // Each worker's consumer and publisher connect through the proxy.
    common::eventually(
        common::startup_deadline(),
        "both workers connected",
        || async { (proxy.accepted() >= 4).then_some(()) },
    )
    .await;
    let publisher = env.publisher();
    let long = message("reset_task");
    env.publish_message(&publisher, &long).await;
    common::eventually(Duration::from_secs(20), "the long task running", || async {
        (!runs_of(&runs, long.id.as_str()).is_empty()).then_some(())
    })
    .await;

    let before = proxy.accepted();
    proxy.set(Mode::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Mode::Pass);
    let reset_at = Instant::now();
    common::eventually(
        Duration::from_secs(30),
        "both workers reconnected",
        || async { (proxy.accepted() >= before + 4).then_some(()) },
    )
    .await;

    // New work reaches both.
    let fresh = message("reset_task");
    env.publish_message(&publisher, &fresh).await;
    let for_idle = message("idle_task");
    publisher
        .publish(kobe::amqp::Outgoing {
            exchange: env.topology.tasks_exchange(),
            routing_key: "idle".into(),
            body: for_idle.body(),
            properties: for_idle.properties(),
        })
        .await
        .expect("published to the idle route");
    for m in [&fresh, &for_idle, &long] {
        let task = env.wait_final(m.id.as_str(), Duration::from_secs(30)).await;
        assert_eq!(task.state, TaskState::Success, "{task:?}");
        assert_eq!(runs_of(&runs, m.id.as_str()).len(), 1, "{m:?} ran again");
    }
    assert!(reset_at.elapsed() < Duration::from_secs(30));
    assert_eq!(runs_of(&runs, for_idle.id.as_str())[0].worker, "idle");
    busy.stop().await;
    idle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_back_after_their_broker_node_is_killed_and_restarted() {
    let rabbit = PrivateRabbit::start();
    let env = TestEnv::with(&[
        ("RABBITMQ_URL", &rabbit.url()),
        ("KOBE_TASK_ROUTES", "idle_task=idle"),
    ])
    .await;
    env.init_db().await;
    let runs: Runs = Runs::default();
    let mut registry = registry_with(Recorded::new("killed_node_task", "busy", 3000, &runs));
    registry
        .register(Recorded::new("idle_task", "idle", 10, &runs))
        .unwrap();
    let busy = env.spawn_worker_on(2, vec!["default".into()], registry.clone());
    // Nothing comes to this one's route before the fault.
    let idle = env.spawn_worker_on(2, vec!["idle".into()], registry.clone());
    let api = env.spawn_api_with(registry).await;
    common::wait_ready(&api.client, &api.address).await;
    let long = api.submit(json!({"task_name": "killed_node_task"})).await;
    common::eventually(Duration::from_secs(20), "the long task running", || async {
        (!runs_of(&runs, &long).is_empty()).then_some(())
    })
    .await;

    rabbit.kill();
    // While the node is gone the API says so: nothing is accepted that cannot be published.
    let refused = api
        .start_task(json!({"task_name": "killed_node_task"}))
        .await;
    assert_eq!(refused.status(), 503);
    rabbit.restart();
    let killed_at = Instant::now();

    let fresh = common::eventually(Duration::from_secs(30), "a submission accepted", || async {
        let response = api
            .start_task(json!({"task_name": "killed_node_task"}))
            .await;
        if response.status() != 202 {
            return None;
        }
        let body: serde_json::Value = response.json().await.ok()?;
        body["task_id"].as_str().map(str::to_owned)
    })
    .await;
    let for_idle = api.submit(json!({"task_name": "idle_task"})).await;
    for id in [&fresh, &for_idle] {
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(task.state, TaskState::Success);
    }
    assert_eq!(runs_of(&runs, &for_idle)[0].worker, "idle");
    assert!(
        killed_at.elapsed() < Duration::from_secs(40),
        "new work ran {:?} after the restart",
        killed_at.elapsed()
    );
    let task = env.wait_final(&long, Duration::from_secs(30)).await;
    assert_eq!(task.state, TaskState::Success);
    assert_eq!(runs_of(&runs, &long).len(), 1, "the running task ran again");
    assert_eq!(runs_of(&runs, &fresh).len(), 1);
    busy.stop().await;
    idle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_mongodb_stops_its_handler_before_another_can_take_the_task() {
    // The fixture's 3 s lease: renewed every second, trusted for 2.5 s.
    let env = TestEnv::new().await;
    let proxy = Proxy::start(&address_of(&env.settings.mongo.uri)).await;
    let mut cut_off = env.settings.clone();
    cut_off.mongo.uri = through(&proxy, &env.settings.mongo.uri);
    let runs: Runs = Runs::default();
    let a = env.spawn_worker_with_settings(
        cut_off,
        2,
        vec![],
        registry_with(Recorded::new("exclusive_task", "a", 6000, &runs)),
    );
    let publisher = env.publisher();
    let first = message("exclusive_task");
    env.publish_message(&publisher, &first).await;
    common::eventually(Duration::from_secs(20), "worker a running it", || async {
        (!runs_of(&runs, first.id.as_str()).is_empty()).then_some(())
    })
    .await;

    proxy.set(Mode::Blackhole);
    let cut_at = Instant::now();
    // A second worker, and a second copy of the message (a duplicate publish).
    let b = env.spawn_worker_on(
        2,
        vec![],
        registry_with(Recorded::new("exclusive_task", "b", 500, &runs)),
    );
    env.publish_message(&publisher, &first).await;
    common::eventually(Duration::from_secs(30), "worker b running it", || async {
        runs_of(&runs, first.id.as_str())
            .iter()
            .any(|r| r.worker == "b")
            .then_some(())
    })
    .await;
    let seen = runs_of(&runs, first.id.as_str());
    let on_a = seen.iter().find(|r| r.worker == "a").unwrap();
    let on_b = seen.iter().find(|r| r.worker == "b").unwrap();
    assert!(
        on_a.told_to_stop,
        "a's handler was never told to stop: {seen:?}"
    );
    let a_ended = on_a.ended.expect("a's handler still runs beside b's");
    assert!(
        a_ended <= on_b.started,
        "two runs side by side: a ended {:?} after b started",
        a_ended - on_b.started
    );
    assert!(a_ended - cut_at < Duration::from_secs(3), "{seen:?}");

    proxy.set(Mode::Pass);
    let task = env
        .wait_final(first.id.as_str(), Duration::from_secs(60))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    // a's abandoned copy comes back after the fault and finds the task finished.
    env.wait_queue_empty("default", "every copy settled").await;
    let seen = runs_of(&runs, first.id.as_str());
    assert_eq!(seen.len(), 2, "{seen:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_time_limit_holds_while_mongodb_does_not_answer() {
    let env = TestEnv::new().await;
    let proxy = Proxy::start(&address_of(&env.settings.mongo.uri)).await;
    let mut cut_off = env.settings.clone();
    cut_off.mongo.uri = through(&proxy, &env.settings.mongo.uri);
    let runs: Runs = Runs::default();
    let mut stubborn = Recorded::new("limited_task", "a", 20_000, &runs);
    stubborn.ignore_stop = true;
    let worker = env.spawn_worker_with_settings(cut_off, 2, vec![], registry_with(stubborn));
    let publisher = env.publisher();
    let mut limited = message("limited_task");
    // Past the first renewal (1 s), before the lease would be given up (2.5 s).
    limited.hard_time_limit = Some(1.8);
    env.publish_message(&publisher, &limited).await;
    common::eventually(Duration::from_secs(20), "running", || async {
        (!runs_of(&runs, limited.id.as_str()).is_empty()).then_some(())
    })
    .await;
    proxy.set(Mode::Blackhole);
    let run = common::eventually(Duration::from_secs(10), "the handler stopped", || async {
        runs_of(&runs, limited.id.as_str())
            .into_iter()
            .find(|r| r.ended.is_some())
    })
    .await;
    let ran = run.ended.unwrap() - run.started;
    assert!(ran < Duration::from_millis(2400), "ran {ran:?}");

    proxy.set(Mode::Pass);
    let task = env
        .wait_final(limited.id.as_str(), Duration::from_secs(60))
        .await;
    assert_eq!(task.state, TaskState::Failure);
    assert!(
        task.root_cause.as_deref().unwrap().contains("time limit"),
        "{task:?}"
    );
    assert_eq!(runs_of(&runs, limited.id.as_str()).len(), 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_eta_is_held_in_hops_and_fails_no_submission_beside_it() {
    let Running { env, api, worker } = TestEnv::with_worker(&[], 2).await;
    let far = json!({"task_name": "demo_long_io", "eta": "2099-01-01T00:00:00Z"});
    let near = common::quick_task(1);
    let mut requests = vec![api.start_task(far.clone())];
    requests.extend((0..20).map(|_| api.start_task(near.clone())));
    let answers = futures_util::future::join_all(requests).await;
    let mut ids = Vec::new();
    for answer in answers {
        assert_eq!(answer.status(), 202);
        let body: serde_json::Value = answer.json().await.unwrap();
        ids.push(body["task_id"].as_str().unwrap().to_owned());
    }
    for id in &ids[1..] {
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(task.state, TaskState::Success);
    }
    // The far one waits in the longest delay level (its own TTL), not run, not refused.
    let longest = *kobe::amqp::topology::RETRY_LEVELS_MS.last().unwrap();
    let held = env.queue_depth(env.topology.retry_queue(longest)).await;
    assert_eq!(held, Some(1));
    let far_task = env.tasks().get(&ids[0]).await.unwrap().unwrap();
    assert_eq!(far_task.state, TaskState::Pending);

    // A Celery client's far ETA and a retry delay past the broker's limit: the worker delays
    // them the same way and its publisher keeps working.
    let publisher = env.publisher();
    let mut celery_far = message("demo_long_io");
    celery_far.eta = Some("2099-01-01T00:00:00".into());
    env.publish_message(&publisher, &celery_far).await;
    common::eventually(Duration::from_secs(20), "delayed again", || async {
        (env.queue_depth(env.topology.retry_queue(longest)).await? == 2).then_some(())
    })
    .await;
    let after = api.submit(near).await;
    assert_eq!(
        env.wait_final(&after, Duration::from_secs(30)).await.state,
        TaskState::Success
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_carry_the_write_concern_of_the_uri() {
    use kobe::store::batch::{BatchConfig, BatchWriter, Write, WriteOp};
    use mongodb::bson::doc;
    use mongodb::event::command::CommandEvent;

    let env = TestEnv::new().await;
    let uri = common::mongodb_uri();
    let uri = if uri.contains('?') {
        format!("{uri}&w=majority&journal=true")
    } else {
        format!("{uri}/?w=majority&journal=true")
    };
    let seen: Arc<Mutex<HashMap<String, mongodb::bson::Document>>> = Arc::default();
    let captured = seen.clone();
    let mut options = mongodb::options::ClientOptions::parse(&uri).await.unwrap();
    options.command_event_handler = Some(mongodb::event::EventHandler::callback(
        move |event: CommandEvent| {
            if let CommandEvent::Started(started) = event {
                captured
                    .lock()
                    .unwrap()
                    .insert(started.command_name.clone(), started.command);
            }
        },
    ));
    let db = mongodb::Client::with_options(options)
        .unwrap()
        .database(env.db.name());
    let writer = BatchWriter::start(db, BatchConfig::default());
    let collection = "WriteConcernProbe";
    let inserted = writer
        .write(Write {
            collection,
            op: WriteOp::Insert(doc! {"_id": "probe"}),
            purpose: "test",
        })
        .await;
    assert!(inserted.is_ok(), "{inserted:?}");
    let updated = writer
        .write(Write {
            collection,
            op: WriteOp::Upsert {
                filter: doc! {"_id": "probe"},
                update: doc! {"$set": {"seen": true}},
            },
            purpose: "test",
        })
        .await;
    assert!(updated.is_ok(), "{updated:?}");
    let seen = seen.lock().unwrap().clone();
    for command in ["insert", "update"] {
        let concern = seen[command]
            .get_document("writeConcern")
            .unwrap_or_else(|_| panic!("{command} without a write concern: {:?}", seen[command]));
        assert_eq!(concern.get_str("w").unwrap(), "majority");
        assert!(concern.get_bool("j").unwrap());
    }
    let _ = env
        .db
        .collection::<mongodb::bson::Document>(collection)
        .drop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_while_it_runs_is_not_retried_when_its_attempt_then_fails() {
    let env = TestEnv::with(&[("KOBE_RETRY_BASE_MS", "100")]).await;
    env.init_db().await;
    let runs: Runs = Runs::default();
    // Fails retryably the moment the test says, paying no heed to the cancel signal: its
    // failure lands before the worker's next look for cancels (once a second) passes it on.
    let go = Arc::new(tokio::sync::Notify::new());
    let mut deaf = Recorded::new("deaf_task", "w", 60_000, &runs);
    deaf.ignore_stop = true;
    deaf.fail = true;
    deaf.until = Some(go.clone());
    let registry = registry_with(deaf);
    let worker = env.spawn_worker_on(2, vec![], registry.clone());
    let api = env.spawn_api_with(registry).await;
    common::wait_ready(&api.client, &api.address).await;
    let id = api.submit(json!({"task_name": "deaf_task"})).await;
    common::eventually(Duration::from_secs(20), "running", || async {
        (!runs_of(&runs, &id).is_empty()).then_some(())
    })
    .await;
    let cancelled = api
        .client
        .post(format!("{}/task/{id}/cancel", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    go.notify_waiters();
    let task = env.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(task.state, TaskState::Revoked, "{task:?}");
    // The retry it published before its failure met the cancel comes back and is acked unrun.
    let m = kobe::telemetry::metrics::metrics();
    common::eventually(
        Duration::from_secs(10),
        "the retry's copy acked",
        || async {
            (m.duplicate_deliveries.with_label_values(&["revoked"]).get() >= 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        runs_of(&runs, &id).len(),
        1,
        "the next attempt ran after the cancel"
    );
    worker.stop().await;
}

/// Signals process `pid` (`SIGSTOP`, `SIGCONT`): a worker paused as `docker pause` pauses one.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: a plain kill(2) of a child process this test started.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_cannot_change_what_the_status_says() {
    let env = TestEnv::with(&[("KOBE_EXECUTION_LEASE_MS", "3000")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    common::wait_ready(&api.client, &api.address).await;
    // Worker A runs in a process of its own, so that it can be paused whole.
    let mut a = env
        .kobe_command(&["worker", "--concurrency", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start worker A");
    let a_name = format!(":{}", a.id());
    let kwargs = json!({"duration_ms": 4000});
    let id = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": kwargs}))
        .await;
    let tasks = env.tasks();
    common::eventually(Duration::from_secs(20), "running on A", || async {
        let task = tasks.get(&id).await.ok()??;
        (task.state == TaskState::Started && task.worker.as_deref()?.ends_with(&a_name))
            .then_some(())
    })
    .await;

    // A stops dead, and its lease lapses.
    signal(a.id(), libc::SIGSTOP);
    common::eventually(Duration::from_secs(10), "A's lease lapsed", || async {
        let lease = tasks.leases().get(&id, 0).await.ok()??;
        (lease.lease_until < mongodb::bson::DateTime::now()).then_some(())
    })
    .await;
    // Copies of the task (a redelivery, a duplicate publish) reach worker B, which takes the
    // lapsed lease over and runs the task. (The broker still hands some to paused A, which has
    // room in its prefetch: a few copies make sure B gets one.)
    let b = env.spawn_worker(2);
    common::eventually(Duration::from_secs(10), "B consuming beside A", || async {
        let consumers = env.consumer_count(env.topology.queue("default")).await?;
        (consumers >= 2).then_some(())
    })
    .await;
    let message = TaskMessage::new(
        TaskId::parse(&id).unwrap(),
        "demo_long_io",
        vec![],
        kwargs.as_object().cloned().unwrap(),
    );
    let publisher = env.publisher();
    for _ in 0..4 {
        env.publish_message(&publisher, &message).await;
    }
    let b_name = kobe::config::worker_name();
    common::eventually(Duration::from_secs(20), "taken over by B", || async {
        let task = tasks.get(&id).await.ok()??;
        (task.state == TaskState::Started && task.worker.as_deref()? == b_name).then_some(())
    })
    .await;

    // A wakes up with its handler done: what it says is not the task's word.
    signal(a.id(), libc::SIGCONT);
    let task = env.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(task.state, TaskState::Success);
    assert_eq!(task.worker.as_deref(), Some(b_name), "{task:?}");
    let outcome = tasks
        .outcomes()
        .get(&id, 0)
        .await
        .unwrap()
        .expect("an outcome");
    assert_eq!(
        outcome.worker.as_deref(),
        Some(b_name),
        "B's outcome decides"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &a.id().to_string()])
        .status();
    let _ = a.wait();
    b.stop().await;
    api.stop().await;
}
