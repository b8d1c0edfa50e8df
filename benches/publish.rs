//! Publisher throughput against the local RabbitMQ, as ratios measured in one run:
//!
//! - `raw`: amiquip alone on one thread, publishing a batch then reading every confirm — about
//!   what the broker sustains with confirms;
//! - `sequential`: Kobe's publisher, one caller awaiting each confirm before the next publish;
//! - `concurrent`: Kobe's publisher with 64 callers at once (confirms pipelined).
//!
//! Run with `scripts/bench.sh` (or `cargo bench --bench publish`); `KOBE_BENCH_MESSAGES` sets the
//! size. Uses its own exchange and queue prefix and deletes them afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{Confirm, ConfirmSmoother, Publish};
use kobe::amqp::{Outgoing, Publisher, QueueKind, TaskMessage, Topology};
use kobe::config::{default_of, ServiceUrl};
use kobe::domain::TaskId;

fn message(topology: &Topology) -> Outgoing {
    let m = TaskMessage::new(TaskId::generate(), "noop", vec![], Default::default());
    Outgoing {
        exchange: topology.tasks_exchange(),
        routing_key: "default".into(),
        body: m.body(),
        properties: m.properties(),
    }
}

fn raw(url: &ServiceUrl, topology: &Topology, n: usize) -> f64 {
    let mut connection = kobe::amqp::connect(url, Duration::from_secs(5)).expect("connect");
    let channel = connection.open_channel(None).expect("channel");
    let confirms = channel.listen_for_publisher_confirms().unwrap();
    channel.enable_publisher_confirms().unwrap();
    let outgoing: Vec<Outgoing> = (0..n).map(|_| message(topology)).collect();
    let started = Instant::now();
    for m in &outgoing {
        channel
            .basic_publish(
                m.exchange.as_str(),
                Publish::with_properties(&m.body, m.routing_key.as_str(), m.properties.clone()),
            )
            .unwrap();
    }
    let mut smoother = ConfirmSmoother::new();
    let mut confirmed = 0;
    while confirmed < n {
        for confirm in smoother.process(confirms.recv().unwrap()) {
            assert!(matches!(confirm, Confirm::Ack(_)));
            confirmed += 1;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(channel);
    let _ = connection.close();
    rate
}

async fn sequential(publisher: &Publisher, topology: &Topology, n: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..n {
        publisher
            .publish(message(topology))
            .await
            .expect("confirmed");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn concurrent(publisher: &Publisher, topology: &Topology, n: usize, callers: usize) -> f64 {
    let topology = Arc::new(topology.clone());
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..callers {
        let publisher = publisher.clone();
        let topology = topology.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..n / callers {
                publisher
                    .publish(message(&topology))
                    .await
                    .expect("confirmed");
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    (n / callers * callers) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let url = ServiceUrl::new(
        std::env::var("RABBITMQ_URL").unwrap_or_else(|_| default_of("RABBITMQ_URL").into()),
    );
    let n: usize = std::env::var("KOBE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let prefix = format!("kobebench-{}", std::process::id());
    let topology = Topology::new(&prefix, QueueKind::Classic, Default::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let publisher =
        Publisher::start(&url, topology.clone(), Duration::from_secs(30)).expect("publisher");
    // Wait for the connection (and topology) before timing anything.
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while publisher.connected().is_err() {
            assert!(
                Instant::now() < deadline,
                "publisher did not connect to {url}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let sequential_n = (n / 10).max(500);
    let raw_rate = raw(&url, &topology, n);
    let sequential_rate = runtime.block_on(sequential(&publisher, &topology, sequential_n));
    let concurrent_rate = runtime.block_on(concurrent(&publisher, &topology, n, 64));

    println!("publisher throughput, persistent messages with confirms, same broker, same run:");
    println!(
        "  raw amiquip, one batch ({n} msgs):            {raw_rate:>9.0} msg/s  (broker ceiling)"
    );
    println!("  kobe publisher, one at a time ({sequential_n} msgs): {sequential_rate:>9.0} msg/s");
    println!("  kobe publisher, 64 callers ({n} msgs):       {concurrent_rate:>9.0} msg/s");
    println!(
        "  64 callers / one at a time: {:.1}x",
        concurrent_rate / sequential_rate
    );
    println!(
        "  64 callers / broker ceiling: {:.2}",
        concurrent_rate / raw_rate
    );

    drop(publisher);
    kobe::amqp::delete_topology(&url, &topology).expect("delete the benchmark's topology");
}
