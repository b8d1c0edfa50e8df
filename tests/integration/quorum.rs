//! `KOBE_QUEUE_TYPE=quorum` on the local broker (a one-node cluster): every queue that holds a
//! task is a quorum queue, retries and delays pass through quorum delay queues, a classic
//! deployment meeting them is told why it cannot start, and priorities do what this broker
//! version does with them.

use crate::common;

use std::time::Duration;

use common::TestEnv;
use kobe::domain::{QueueKind, TaskState};
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
    let env = TestEnv::with(&[("KOBE_QUEUE_TYPE", "quorum"), ("KOBE_RETRY_BASE_MS", "100")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let worker = env.spawn_worker(2);
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

    let prefix = env.settings.amqp_prefix.clone();
    let types = queue_types(&prefix);
    assert_eq!(types.len(), env.topology.all_queues().len(), "{types:?}");
    assert!(types.iter().all(|(_, kind)| kind == "quorum"), "{types:?}");
    worker.stop().await;

    // A classic deployment pointed at these queues is told why it cannot declare them.
    let classic = kobe::amqp::Topology::new(&prefix, QueueKind::Classic, Default::default());
    let url = env.settings.rabbitmq_url.clone();
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
    let url = env.settings.rabbitmq_url.clone();
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
