//! Worker throughput and memory, as ratios against baselines measured in the same run:
//!
//! - `broker`: a raw amiquip consumer with the worker's prefetch, acking each message — about what
//!   the broker sustains for consume + ack;
//! - `kobe`: a `kobe worker --concurrency 10` process (release build) running no-op tasks
//!   (`demo_long_io` with `duration_ms: 0`), each tracked in MongoDB (STARTED, then SUCCESS);
//! - the worker's peak resident memory (VmHWM) while doing it.
//!
//! MongoDB comes from `KOBE_BENCH_MONGODB_URI` (scripts/bench.sh starts one); with the test
//! stand-in, MongoDB is the bottleneck and the ratio says more about it than about Kobe.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions};
use kobe::amqp::{Outgoing, Publisher, QueueKind, TaskMessage, Topology};
use kobe::config::{defaults, ServiceUrl};
use kobe::domain::TaskId;
use mongodb::bson::doc;

fn noop(topology: &Topology) -> Outgoing {
    let kwargs = serde_json::json!({"duration_ms": 0})
        .as_object()
        .cloned()
        .unwrap();
    let m = TaskMessage::new(TaskId::generate(), "demo_long_io", vec![], kwargs);
    Outgoing {
        exchange: topology.tasks_exchange(),
        routing_key: "default".into(),
        body: m.body(),
        properties: m.properties(),
    }
}

async fn fill(publisher: &Publisher, topology: &Topology, n: usize) {
    let mut pending = Vec::new();
    for _ in 0..n {
        let publisher = publisher.clone();
        let m = noop(topology);
        pending.push(tokio::spawn(async move { publisher.publish(m).await }));
        if pending.len() == 256 {
            for p in pending.drain(..) {
                p.await.unwrap().expect("confirmed");
            }
        }
    }
    for p in pending {
        p.await.unwrap().expect("confirmed");
    }
}

fn broker_rate(url: &ServiceUrl, queue: &str, n: usize) -> f64 {
    let mut connection = kobe::amqp::connect(url, Duration::from_secs(5)).unwrap();
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, 10, false).unwrap();
    let consumer = channel
        .basic_consume(queue, ConsumerOptions::default())
        .unwrap();
    let started = Instant::now();
    let mut seen = 0;
    for message in consumer.receiver().iter() {
        if let ConsumerMessage::Delivery(delivery) = message {
            consumer.ack(delivery).unwrap();
            seen += 1;
            if seen == n {
                break;
            }
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(consumer);
    drop(channel);
    let _ = connection.close();
    rate
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let url = ServiceUrl::new(
        std::env::var("RABBITMQ_URL").unwrap_or_else(|_| defaults::RABBITMQ_URL.into()),
    );
    let mongodb =
        std::env::var("KOBE_BENCH_MONGODB_URI").unwrap_or_else(|_| defaults::MONGODB_URI.into());
    let n: usize = std::env::var("KOBE_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let prefix = format!("kobebench-{}", std::process::id());
    let db_name = prefix.replace('-', "_");
    let topology = Topology::new(&prefix, QueueKind::Classic, Default::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let publisher = Publisher::start(&url, topology.clone(), Duration::from_secs(30)).unwrap();
    runtime.block_on(async {
        while publisher.connected().is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    // Baseline: the broker alone.
    runtime.block_on(fill(&publisher, &topology, n));
    let broker = broker_rate(&url, &topology.queue("default"), n);

    // Kobe: the same messages through a worker process.
    runtime.block_on(fill(&publisher, &topology, n));
    // Built by scripts/bench.sh beforehand: cargo holds its build lock while a bench runs.
    let binary =
        std::env::var("KOBE_BENCH_BINARY").unwrap_or_else(|_| "target/release/kobe".into());
    assert!(
        std::path::Path::new(&binary).exists(),
        "{binary} is missing: cargo build --release --bin kobe"
    );
    let started = Instant::now();
    let mut worker = Command::new(&binary)
        .args(["worker", "--concurrency", "10"])
        .env("RABBITMQ_URL", url.expose())
        .env("MONGODB_URI", &mongodb)
        .env("MONGODB_DB", &db_name)
        .env("KOBE_AMQP_PREFIX", &prefix)
        .env("KOBE_REDIS_PREFIX", &prefix)
        .env("KOBE_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start kobe worker");
    let (elapsed, peak) = runtime.block_on(async {
        let db = kobe::store::connect(
            &ServiceUrl::new(mongodb.clone()),
            &db_name,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let tasks = db.collection::<mongodb::bson::Document>("Tasks");
        let mut peak = 0;
        loop {
            peak = peak.max(peak_rss_kib(worker.id()).unwrap_or(0));
            let done = tasks
                .count_documents(doc! {"state": "SUCCESS"})
                .await
                .unwrap_or(0);
            if done as usize >= n {
                break (started.elapsed(), peak);
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{done} of {n} done after 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let peak = peak.max(peak_rss_kib(worker.id()).unwrap_or(0));
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    let _ = worker.wait();
    let kobe_rate = n as f64 / elapsed.as_secs_f64();

    println!("worker throughput, {n} no-op tasks, same broker, same run:");
    println!("  broker alone (consume + ack, prefetch 10): {broker:>8.0} msg/s");
    println!("  kobe worker --concurrency 10 (tracked):    {kobe_rate:>8.0} tasks/s");
    println!("  kobe / broker: {:.2}", kobe_rate / broker);
    println!(
        "  worker peak resident memory: {:.1} MiB",
        peak as f64 / 1024.0
    );
    println!("  MongoDB: {}", kobe::config::redact_url(&mongodb));

    runtime.block_on(async {
        if let Ok(db) = kobe::store::connect(
            &ServiceUrl::new(mongodb.clone()),
            &db_name,
            Duration::from_secs(5),
        )
        .await
        {
            let _ = db.drop().await;
        }
    });
    drop(publisher);
    kobe::amqp::delete_topology(&url, &topology).expect("delete the benchmark's topology");
}
