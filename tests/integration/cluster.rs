//! Beyond one broker: several broker addresses with failover (a private node that is stopped,
//! then the machine's), and `KOBE_QUEUE_TYPE=quorum` on the local broker (a one-node cluster):
//! every queue that holds a task is a quorum queue, retries and delays pass through quorum delay
//! queues, a classic deployment meeting them is told why it cannot start, and priorities do what
//! this broker version does with them.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PrivateRabbit, Running, TestEnv};
use kobe::domain::{QueueKind, TaskState};
use kobe::tasks::{Invocation, Registry, Task, TaskFuture};
use serde_json::json;

/// `name type` of every queue with `prefix`, as `rabbitmqctl` reports them.
fn queue_types(prefix: &str) -> Vec<(String, String)> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "type"])
        .output()
        .expect("rabbitmqctl (the RabbitMQ the tests run against is local)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .filter(|(name, _)| name.starts_with(&format!("{prefix}.")))
        .collect()
}

/// The broker's version, from its connection properties.
fn broker_major_version(url: &kobe::config::ServiceUrl) -> u32 {
    let connection = kobe::amqp::connect(url, Duration::from_secs(5)).expect("connect");
    let version = match connection.server_properties().get("version") {
        Some(amiquip::AmqpValue::LongString(v)) => v.clone(),
        other => panic!("no version in the server properties: {other:?}"),
    };
    let _ = connection.close();
    version.split('.').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quorum_queues_every_task_queue_is_quorum_and_retries_and_delays_arrive() {
    let Running { env, api, worker } = TestEnv::with_worker(
        &[("KOBE_QUEUE_TYPE", "quorum"), ("KOBE_RETRY_BASE_MS", "100")],
        2,
    )
    .await;
    let retried = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .await;
    let delayed = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}, "countdown": 1.0}),
        )
        .await;
    let task = env.wait_final(&retried, Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Success, 1));
    let task = env.wait_final(&delayed, Duration::from_secs(20)).await;
    assert_eq!((task.state, task.retries), (TaskState::Success, 0));

    let prefix = env.settings.broker.prefix.clone();
    let types = queue_types(&prefix);
    assert_eq!(types.len(), env.topology.all_queues().len(), "{types:?}");
    assert!(types.iter().all(|(_, kind)| kind == "quorum"), "{types:?}");
    worker.stop().await;

    // A classic deployment pointed at these queues is told why it cannot declare them.
    let classic = kobe::amqp::Topology::new(&prefix, QueueKind::Classic, Default::default());
    let url = env.settings.broker.url.clone();
    let refused = tokio::task::spawn_blocking(move || {
        kobe::amqp::check_topology(&url, &classic, Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(refused.contains("cannot change type in place"), "{refused}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_on_quorum_queues_follow_the_broker_version() {
    let env = TestEnv::with(&[("KOBE_QUEUE_TYPE", "quorum")]).await;
    env.init_db().await;
    let publisher = env.publisher();
    let mut ids = Vec::new();
    for priority in [0, 9] {
        let mut message = kobe::amqp::TaskMessage::new(
            kobe::domain::TaskId::generate(),
            "demo_long_io",
            vec![],
            Default::default(),
        );
        message.priority = kobe::domain::Priority::new(priority).unwrap();
        env.publish_message(&publisher, &message).await;
        ids.push(message.id.to_string());
    }
    let url = env.settings.broker.url.clone();
    let major = tokio::task::spawn_blocking(move || broker_major_version(&url))
        .await
        .unwrap();
    let queue = env.topology.queue("default");
    let order: Vec<String> = env
        .drain(queue)
        .await
        .iter()
        .filter_map(|m| m.header_text("id"))
        .collect();
    if major >= 4 {
        // Two levels: 5–9 before 0–4.
        assert_eq!(order, [ids[1].clone(), ids[0].clone()], "RabbitMQ {major}");
    } else {
        // RabbitMQ 3.x quorum queues ignore priorities: first in, first out.
        assert_eq!(order, ids, "RabbitMQ {major}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_broker_addresses_kobe_moves_to_the_next_when_one_is_lost() {
    let rabbit = PrivateRabbit::start();
    let shared = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let urls = format!("{},{shared}", rabbit.url());
    let env = TestEnv::with(&[("RABBITMQ_URL", &urls), ("KOBE_PUBLISH_TIMEOUT_MS", "2000")]).await;
    env.init_db().await;
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let registry = || {
        let mut registry = Registry::with_builtin_tasks();
        registry.register(Flaky(runs.clone())).unwrap();
        registry
    };
    let api = env.spawn_api_with(registry()).await;
    let worker = env.spawn_worker_on(2, Vec::new(), registry());

    let mut accepted = Vec::new();
    for _ in 0..5 {
        accepted.push(api.submit(json!({"task_name": "flaky"})).await);
    }
    for id in &accepted {
        env.wait_final(id, Duration::from_secs(20)).await;
    }
    let ready: serde_json::Value = api.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["rabbitmq_nodes"][0]["reachable"], true, "{ready}");

    // The first node goes away: the API refuses work (503, not run) until its publisher has
    // reconnected to the second, then accepts again; the worker moves too.
    rabbit.stop();
    let lost = Instant::now();
    let mut refused = 0;
    loop {
        let response = api.start_task(json!({"task_name": "flaky"})).await;
        match response.status().as_u16() {
            202 => {
                let body: serde_json::Value = response.json().await.unwrap();
                accepted.push(body["task_id"].as_str().unwrap().to_owned());
                break;
            }
            503 => refused += 1,
            other => panic!("unexpected {other}: {:?}", response.text().await),
        }
        assert!(
            lost.elapsed() < Duration::from_secs(60),
            "no failover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the API refused {refused} submission(s) for {:?} after the node was lost",
        lost.elapsed()
    );
    for _ in 0..4 {
        accepted.push(api.submit(json!({"task_name": "flaky"})).await);
    }
    for id in &accepted {
        let task = env.wait_final(id, Duration::from_secs(30)).await;
        assert_eq!(task.state, TaskState::Success, "{task:?}");
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), accepted.len(), "every accepted task ran");
    assert!(
        runs.values().all(|n| *n == 1),
        "each exactly once: {runs:?}"
    );
    let ready: serde_json::Value = api.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["rabbitmq_nodes"][0]["reachable"], false, "{ready}");
    assert_eq!(ready["rabbitmq_nodes"][1]["reachable"], true, "{ready}");
    let output = env.kobe_command(&["healthcheck"]).output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("DOWN") && report.contains(" up"),
        "{report}"
    );
    assert!(
        !report.contains(":guest@"),
        "no password in the report: {report}"
    );
    worker.stop().await;
    api.stop().await;
}

/// Counts runs per task id; fails the first attempt of tasks submitted with `{"fail_first": true}`.
struct Flaky(Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>);

impl Task for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn run(&self, invocation: Invocation) -> TaskFuture {
        let runs = {
            let mut all = self.0.lock().unwrap();
            let n = all.entry(invocation.task_id.to_string()).or_default();
            *n += 1;
            *n
        };
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if invocation.kwargs.get("fail_first") == Some(&json!(true)) && invocation.attempt == 1
            {
                return Err(kobe::tasks::TaskError::Retryable(format!(
                    "planned failure, run {runs}"
                )));
            }
            Ok(json!({"attempt": invocation.attempt}))
        })
    }
}

/// What one submission was told.
#[derive(Debug)]
enum Told {
    Accepted { id: String, fail_first: bool },
    Refused { id: Option<String>, at: Duration },
}

/// Three private RabbitMQ nodes clustered on this machine, quorum queues, an API and two workers
/// given all three addresses; 1,200 submissions (a sixth retrying once, a sixth delayed) while one
/// node is stopped, restarted, and then another stopped. Every accepted task must end SUCCESS
/// having run exactly as planned; every refused one must not have run. Minutes long: run by
/// `scripts/bench.sh cluster` (it sets KOBE_TEST_CLUSTER=1), not by the test suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_nodes_under_load_and_no_accepted_task_is_lost_or_run_twice() {
    if std::env::var("KOBE_TEST_CLUSTER").as_deref() != Ok("1") {
        eprintln!("skipped: set KOBE_TEST_CLUSTER=1 (scripts/bench.sh cluster) to run it");
        return;
    }
    let nodes: Vec<PrivateRabbit> = (0..3).map(|_| PrivateRabbit::start()).collect();
    nodes[1].join(&nodes[0]);
    nodes[2].join(&nodes[0]);
    common::eventually(Duration::from_secs(60), "a three-node cluster", || async {
        (nodes[0].running_members() == 3).then_some(())
    })
    .await;
    let urls: Vec<String> = nodes.iter().map(PrivateRabbit::url).collect();
    let env = TestEnv::with(&[
        ("RABBITMQ_URL", &urls.join(",")),
        ("KOBE_QUEUE_TYPE", "quorum"),
        ("KOBE_RETRY_BASE_MS", "200"),
        ("KOBE_PUBLISH_TIMEOUT_MS", "3000"),
    ])
    .await;
    env.init_db().await;
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let registry = || {
        let mut registry = Registry::with_builtin_tasks();
        registry.register(Flaky(runs.clone())).unwrap();
        registry
    };
    let api = Arc::new(env.spawn_api_with(registry()).await);
    let workers = [
        env.spawn_worker_on(10, Vec::new(), registry()),
        env.spawn_worker_on(10, Vec::new(), registry()),
    ];
    // As `serve` runs it: the outbox publishes what a lost confirm left owed.
    let outbox = kobe::submit::outbox::Outbox {
        tasks: env.tasks(),
        submitter: env.submitter(),
        age: Duration::from_secs(2),
    };
    let outbox = tokio::spawn(outbox.run(Duration::from_millis(500), std::future::pending()));

    const TOTAL: usize = 1200;
    let started = Instant::now();
    let told = Arc::new(std::sync::Mutex::new(Vec::<Told>::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..8 {
        let (api, told, next) = (api.clone(), told.clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= TOTAL {
                    break;
                }
                let fail_first = n % 6 == 1;
                let mut body = json!({"task_name": "flaky", "kwargs": {"fail_first": fail_first}});
                if n % 6 == 2 {
                    body["countdown"] = json!(1.5);
                }
                let response = api.start_task(body).await;
                let status = response.status().as_u16();
                let answer: serde_json::Value = response.json().await.unwrap_or_default();
                let id = answer["task_id"].as_str().map(str::to_owned);
                let record = match status {
                    202 => Told::Accepted {
                        id: id.expect("a 202 names its task"),
                        fail_first,
                    },
                    503 => Told::Refused {
                        id,
                        at: started.elapsed(),
                    },
                    other => panic!("unexpected {other}: {answer}"),
                };
                told.lock().unwrap().push(record);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let answered = || told.lock().unwrap().len();
    let wait_for = |count: usize| {
        let answered = &answered;
        async move {
            common::eventually(Duration::from_secs(120), "submissions", || async {
                (answered() >= count).then_some(())
            })
            .await
        }
    };
    wait_for(300).await;
    let first_loss = started.elapsed();
    eprintln!("cluster: stopping node 1 at {first_loss:?}");
    tokio::task::block_in_place(|| nodes[0].stop());
    wait_for(600).await;
    eprintln!("cluster: restarting node 1 at {:?}", started.elapsed());
    tokio::task::block_in_place(|| nodes[0].restart());
    wait_for(800).await;
    let second_loss = started.elapsed();
    eprintln!("cluster: stopping node 2 at {second_loss:?}");
    tokio::task::block_in_place(|| nodes[1].stop());
    for submitter in submitters {
        submitter.await.unwrap();
    }
    eprintln!(
        "cluster: {} submissions answered at {:?}",
        answered(),
        started.elapsed()
    );

    let told = std::mem::take(&mut *told.lock().unwrap());
    let mut accepted: Vec<(&String, bool)> = Vec::new();
    let mut refused: Vec<(&Option<String>, Duration)> = Vec::new();
    for answer in &told {
        match answer {
            Told::Accepted { id, fail_first } => accepted.push((id, *fail_first)),
            Told::Refused { id, at } => refused.push((id, *at)),
        }
    }
    for (id, _) in &accepted {
        let task = env.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(task.state, TaskState::Success, "accepted, then {task:?}");
    }
    outbox.abort();
    let runs = runs.lock().unwrap().clone();
    for (id, fail_first) in &accepted {
        let expected = if *fail_first { 2 } else { 1 };
        assert_eq!(runs.get(*id).copied(), Some(expected), "task {id}");
    }
    for (id, _) in &refused {
        if let Some(id) = id {
            assert!(!runs.contains_key(id.as_str()), "refused task {id} ran");
        }
    }
    let window = |from: Duration| {
        let during: Vec<Duration> = refused
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at >= from && *at < from + Duration::from_secs(60))
            .collect();
        match (during.first(), during.last()) {
            (Some(a), Some(b)) => format!("{} refused over {:?}", during.len(), *b - *a),
            _ => "none refused".into(),
        }
    };
    eprintln!(
        "cluster: {} accepted, {} refused, all ran as planned in {:?}; first node lost: {}; second node lost: {}",
        accepted.len(),
        refused.len(),
        started.elapsed(),
        window(first_loss),
        window(second_loss)
    );
    assert!(accepted.len() >= 1000, "{} accepted", accepted.len());
    for worker in workers {
        worker.stop().await;
    }
}
