//! Worker throughput, memory and MongoDB cost, against the broker alone in the same run.
//!
//! - `broker`: a raw amiquip consumer with the worker's prefetch, acking each message — about what
//!   the broker sustains for consume + ack;
//! - `kobe`: a `kobe worker --concurrency 10` process (release build) draining N pre-loaded no-op
//!   tasks (`demo_long_io` with `duration_ms: 0`), each recorded `PENDING` beforehand as the API
//!   would, tracked in MongoDB to `SUCCESS`; its rate comes from the tasks' own `finished_at`;
//! - `store`: the MongoDB in use taking the writes a task needs (its claim, an insert into
//!   `TaskLeases`, and its outcome in `Tasks`) through the same group-commit writer, as fast as it
//!   can: the ceiling, in tasks a second, of what the store allows;
//! - the worker's peak resident memory (VmHWM) and the MongoDB commands it sent per task (its own
//!   `kobe_mongo_commands_total`).
//!
//! Prints `key=value` lines; `scripts/bench.sh compare` sets this beside the Celery baseline.
//! MongoDB comes from `KOBE_BENCH_MONGODB_URI` (scripts/bench.sh starts one).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions};
use futures_util::TryStreamExt;
use kobe::amqp::{Outgoing, Publisher, QueueKind, TaskMessage, Topology};
use kobe::config::{default_of, ServiceUrl};
use kobe::domain::TaskId;
use kobe::store::TaskDocument;
use mongodb::bson::{doc, Document};

fn noop(topology: &Topology) -> (TaskId, Outgoing) {
    let kwargs = serde_json::json!({"duration_ms": 0})
        .as_object()
        .cloned()
        .unwrap();
    let id = TaskId::generate();
    let m = TaskMessage::new(id.clone(), "demo_long_io", vec![], kwargs);
    // As Kobe's submitter sends it: a Tasks document records the task (see insert_pending).
    let mut headers = m.headers();
    headers.insert(
        kobe::amqp::RECORDED_HEADER.into(),
        amiquip::AmqpValue::Boolean(true),
    );
    let outgoing = Outgoing {
        exchange: topology.tasks_exchange(),
        routing_key: "default".into(),
        body: m.body(),
        properties: m.properties().with_headers(headers),
    };
    (id, outgoing)
}

async fn fill(publisher: &Publisher, topology: &Topology, n: usize) -> Vec<TaskId> {
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..n {
        let publisher = publisher.clone();
        let (id, m) = noop(topology);
        ids.push(id);
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
    ids
}

fn broker_rate(url: &ServiceUrl, queue: &str, n: usize, prefetch: u16) -> f64 {
    let mut connection = kobe::amqp::connect(url, Duration::from_secs(5)).unwrap();
    let channel = connection.open_channel(None).unwrap();
    channel.qos(0, prefetch, false).unwrap();
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

/// CPU seconds a process has used, its waited-for children included (a PostgreSQL backend that
/// exited counts in the postmaster's share).
fn cpu_seconds(pid: u32, with_children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let ticks = fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0);
    let children = if with_children {
        fields.get(13).unwrap_or(&0.0) + fields.get(14).unwrap_or(&0.0)
    } else {
        0.0
    };
    (ticks + children) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds used by every process whose name is one of `names` (RabbitMQ's `beam.smp`, the
/// store's processes), children included.
fn cpu_of(names: &[&str]) -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if names.contains(&comm.trim()) {
            total += cpu_seconds(pid, true);
        }
    }
    total
}

/// The broker's and the store's processes, as `cpu_of` names them.
const BROKER_PROCESSES: &[&str] = &["beam.smp"];
const STORE_PROCESSES: &[&str] = &["postgres", "documentdb_gate", "mongod"];

/// The worker process, stopped (SIGTERM, then waited for) however the benchmark ends, so a
/// failed run leaves no worker behind.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Records tasks `PENDING`, as the API leaves them once the broker confirmed their messages.
async fn insert_pending(db: &mongodb::Database, ids: &[TaskId]) {
    let tasks = db.collection::<TaskDocument>("Tasks");
    for chunk in ids.chunks(1000) {
        let docs: Vec<TaskDocument> = chunk
            .iter()
            .map(|id| {
                let mut task = TaskDocument::pending(id, "demo_long_io", "default");
                task.publish_state = Some(kobe::store::tasks::PublishState::Confirmed);
                task
            })
            .collect();
        tasks.insert_many(docs).await.unwrap();
    }
}

/// Sum of every sample of a metric family in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // reqwest (the metrics scrape) runs on rustls, which needs a crypto provider installed.
    kobe::tasks::declared::http::install_tls_provider();
    let url = ServiceUrl::new(
        std::env::var("RABBITMQ_URL").unwrap_or_else(|_| default_of("RABBITMQ_URL").into()),
    );
    let mongodb = std::env::var("KOBE_BENCH_MONGODB_URI")
        .unwrap_or_else(|_| default_of("MONGODB_URI").into());
    let n: usize = env_or("KOBE_BENCH_TASKS", 3000);
    let concurrency: u16 = env_or("KOBE_BENCH_CONCURRENCY", 10);
    let extra: Vec<String> = std::env::var("KOBE_BENCH_WORKER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
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
    let db = runtime.block_on(async {
        let db = kobe::store::connect(
            &ServiceUrl::new(mongodb.clone()),
            &db_name,
            Duration::from_secs(10),
            kobe::store::Monitoring::Driver,
        )
        .await
        .unwrap();
        kobe::store::migrations::apply(&db, |_| {}).await.unwrap();
        db
    });

    // Baseline: the broker alone.
    runtime.block_on(fill(&publisher, &topology, n));
    let broker = broker_rate(&url, &topology.queue("default"), n, concurrency);

    // Baseline: the store alone, taking the writes a task needs (its claim, an insert into
    // `TaskLeases`, then its outcome in `Tasks`) through the same group-commit writer, as fast
    // as it can (every statement submitted at once).
    let store = runtime.block_on(async {
        let tasks = kobe::store::TaskRepository::new(&db);
        let ids: Vec<TaskId> = (0..n).map(|_| TaskId::generate()).collect();
        insert_pending(&db, &ids).await;
        let writer = kobe::store::batch::BatchWriter::start(db.clone(), Default::default());
        let attempts: Vec<_> = ids
            .iter()
            .map(|id| kobe::store::attempts::Attempt::new(id.as_str(), "demo_long_io", 0))
            .collect();
        let started = Instant::now();
        let claims: Vec<_> = attempts
            .iter()
            .map(|a| {
                writer.submit(tasks.leases().claim_write(
                    a,
                    Duration::from_secs(30),
                    mongodb::bson::DateTime::now(),
                ))
            })
            .collect();
        for p in claims {
            p.result().await.expect("claim written");
        }
        let success = kobe::store::Transition::Success {
            result: serde_json::Value::Null,
        };
        let holding = kobe::store::attempts::Holding::Lease {
            started_at: mongodb::bson::DateTime::now(),
            deliveries: 1,
        };
        let outcomes: Vec<_> = attempts
            .iter()
            .map(|a| {
                let write = tasks
                    .outcomes()
                    .write(a, &success, holding)
                    .expect("outcome");
                writer.submit(write)
            })
            .collect();
        for p in outcomes {
            p.result().await.expect("outcome written");
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        // Out of the way of the drain, which counts its tasks' outcomes.
        for collection in ["Tasks", "TaskLeases"] {
            db.collection::<Document>(collection)
                .delete_many(doc! {})
                .await
                .unwrap();
        }
        rate
    });

    // Kobe: tasks recorded as the API records them, then the same messages through a worker.
    let ids = runtime.block_on(fill(&publisher, &topology, n));
    runtime.block_on(insert_pending(&db, &ids));
    // Built by scripts/bench.sh beforehand: cargo holds its build lock while a bench runs.
    let binary =
        std::env::var("KOBE_BENCH_BINARY").unwrap_or_else(|_| "target/release/kobe".into());
    assert!(
        std::path::Path::new(&binary).exists(),
        "{binary} is missing: cargo build --release --bin kobe"
    );
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let (broker_cpu_before, store_cpu_before, redis_cpu_before) = (
        cpu_of(BROKER_PROCESSES),
        cpu_of(STORE_PROCESSES),
        cpu_of(&["redis-server"]),
    );
    let worker = Command::new(&binary)
        .args(["worker", "--concurrency", &concurrency.to_string()])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(&extra)
        .env("RABBITMQ_URL", url.expose())
        .env("MONGODB_URI", &mongodb)
        .env("MONGODB_DB", &db_name)
        .env("KOBE_AMQP_PREFIX", &prefix)
        .env("KOBE_REDIS_PREFIX", &prefix)
        .env("KOBE_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kobe worker");
    let worker = KillOnDrop(worker);
    let (span_ms, peak, commands) = runtime.block_on(async {
        // Outcomes are inserts beside the leases; a binary of an earlier version (an A/B run)
        // wrote them on the Tasks documents.
        let tasks = db.collection::<Document>("Tasks");
        let outcomes = db.collection::<Document>("TaskLeases");
        let mut peak = 0;
        loop {
            peak = peak.max(peak_rss_kib(worker.id()).unwrap_or(0));
            let done = tasks
                .count_documents(doc! {"state": "SUCCESS"})
                .await
                .unwrap_or(0)
                + outcomes
                    .count_documents(doc! {"state": "SUCCESS"})
                    .await
                    .unwrap_or(0);
            if done as usize >= n {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "{done} of {n} done after 15 minutes"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let commands = metric_sum(&metrics, "kobe_mongo_commands_total");
        if let Ok(path) = std::env::var("KOBE_BENCH_METRICS_FILE") {
            let _ = std::fs::write(path, &metrics);
        }
        // The drain's span, from the tasks' own times.
        let mut first = i64::MAX;
        let mut last = i64::MIN;
        for (collection, field) in [(&tasks, "$finished_at"), (&outcomes, "$at")] {
            let span: Vec<Document> = collection
                .aggregate([
                    doc! {"$match": {"state": "SUCCESS"}},
                    doc! {"$group": {"_id": null, "first": {"$min": field}, "last": {"$max": field}}},
                ])
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            if let Some(span) = span.first() {
                if let (Ok(a), Ok(b)) = (span.get_datetime("first"), span.get_datetime("last")) {
                    first = first.min(a.timestamp_millis());
                    last = last.max(b.timestamp_millis());
                }
            }
        }
        (last - first, peak, commands)
    });
    let peak = peak.max(peak_rss_kib(worker.id()).unwrap_or(0));
    let worker_cpu = cpu_seconds(worker.id(), false);
    let broker_cpu = cpu_of(BROKER_PROCESSES) - broker_cpu_before;
    let store_cpu = cpu_of(STORE_PROCESSES) - store_cpu_before;
    let redis_cpu = cpu_of(&["redis-server"]) - redis_cpu_before;
    drop(worker);
    let kobe_rate = (n - 1) as f64 / (span_ms.max(1) as f64 / 1000.0);

    println!("tasks={n}");
    println!("broker_consume_ack_per_s={broker:.0}");
    println!("store_tasks_per_s={store:.0}");
    println!("kobe_drain_per_s={kobe_rate:.0}");
    println!("kobe_peak_rss_kib={peak}");
    println!("kobe_mongo_commands_per_task={:.3}", commands / n as f64);
    // CPU per drained task, each process on its own: far steadier than wall time on a shared
    // machine.
    let per_task = |seconds: f64| seconds * 1e6 / n as f64;
    println!("kobe_cpu_us_per_task={:.0}", per_task(worker_cpu));
    println!("kobe_broker_cpu_us_per_task={:.0}", per_task(broker_cpu));
    println!("kobe_store_cpu_us_per_task={:.0}", per_task(store_cpu));
    println!("kobe_redis_cpu_us_per_task={:.0}", per_task(redis_cpu));
    println!("mongodb={}", kobe::config::redact_url(&mongodb));

    runtime.block_on(async {
        let _ = db.drop().await;
    });
    drop(publisher);
    kobe::amqp::delete_topology(&url, &topology).expect("delete the benchmark's topology");
}
