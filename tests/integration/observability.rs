//! Observability: exact metric movements, one trace id from the API's log line to the worker's,
//! no credentials in any log line, and a dashboard that only queries metrics that exist.

use crate::common;

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::Duration;

use common::TestEnv;
use serde_json::{json, Value};

/// `name{labels} value` lines of the exposition, keyed by everything before the value.
fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(api: &common::TestApi) -> String {
    api.get("/metrics").await.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_what_happened_and_the_dashboard_queries_only_real_metrics() {
    let env = TestEnv::with(&[("KOBE_RETRY_MAX", "1"), ("KOBE_RETRY_BASE_MS", "50")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let before = samples(&scrape(&api).await);
    let worker = env.spawn_worker(4);

    let ok = api.submit(common::quick_task(1)).await;
    let retried = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}),
        )
        .await;
    let doomed = api
        .submit(
            json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 5}}),
        )
        .await;
    for id in [&ok, &retried, &doomed] {
        env.wait_final(id, Duration::from_secs(20)).await;
    }
    env.dead_letters(1).await;

    let key = |k: &str| k.to_owned();
    let expected = [
        (
            key(r#"kobe_tasks_submitted_total{task="demo_long_io"}"#),
            3.0,
        ),
        (
            key(r#"kobe_task_outcomes_total{state="SUCCESS",task="demo_long_io"}"#),
            2.0,
        ),
        (
            key(r#"kobe_task_outcomes_total{state="RETRY",task="demo_long_io"}"#),
            2.0,
        ),
        (
            key(r#"kobe_task_outcomes_total{state="FAILURE",task="demo_long_io"}"#),
            1.0,
        ),
        (key(r#"kobe_task_retries_total{task="demo_long_io"}"#), 2.0),
        (
            key(r#"kobe_dead_letters_total{reason="retries_exhausted"}"#),
            1.0,
        ),
        // 3 submissions, 2 retries, 1 dead letter.
        (
            key(r#"kobe_amqp_publishes_total{outcome="confirmed"}"#),
            6.0,
        ),
        (
            key(r#"kobe_http_requests_total{method="POST",route="/task/start",status="202"}"#),
            3.0,
        ),
        (
            key(r#"kobe_task_duration_seconds_count{task="demo_long_io"}"#),
            5.0,
        ),
    ];
    // Settlement and the last counters follow the state change: wait for them with a deadline.
    let after = common::eventually(Duration::from_secs(10), "metrics settled", || async {
        let after = samples(&scrape(&api).await);
        expected
            .iter()
            .all(|(k, delta)| {
                after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
                    >= *delta
            })
            .then_some(after)
    })
    .await;
    for (k, delta) in &expected {
        let moved = after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        assert_eq!(moved, *delta, "{k}");
    }

    // Every metric the dashboard queries is exposed (queue depths once the first poll is in).
    let exposition = common::eventually(Duration::from_secs(10), "queue depth polled", || async {
        let text = scrape(&api).await;
        text.contains("# TYPE kobe_queue_depth gauge\nkobe_queue_depth{")
            .then_some(text)
    })
    .await;
    let exposed: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dashboard: Value =
        serde_json::from_str(include_str!("../../deploy/grafana/dashboards/kobe.json")).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("kobe_") {
                    let name = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s).filter(|base| exposed.contains(base)))
                        .unwrap_or(word);
                    queried.insert(name.to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        assert!(
            exposed.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not expose"
        );
    }
    worker.stop().await;
    api.stop().await;
}

fn spawn_logged(
    env: &TestEnv,
    args: &[&str],
    log: &std::path::Path,
    extra: &[(&str, &str)],
) -> common::Process {
    let mut command = env.kobe_command(args);
    command
        .env("KOBE_LOG_FORMAT", "json")
        .env("KOBE_LOG_LEVEL", "debug");
    for (k, v) in extra {
        command.env(k, v);
    }
    command
        .stdout(Stdio::from(
            std::fs::File::create(log.with_extension("out")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .map(common::Process::new)
        .unwrap()
}

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_logs_the_trace_id_of_the_request_that_submitted_the_task() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobetest-logs"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    let serve = spawn_logged(
        &env,
        &["serve", "--addr", &format!("127.0.0.1:{port}")],
        &dir.join("serve.log"),
        &[],
    );
    let worker = spawn_logged(
        &env,
        &["worker", "--concurrency", "2"],
        &dir.join("worker.log"),
        &[],
    );
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&client, &base).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let id = submit_traced(&client, &base, format!("00-{trace_id}-00f067aa0ba902b7-01")).await;
    env.wait_final(&id, Duration::from_secs(20)).await;
    worker.stop();
    serve.stop();

    let api_line = json_lines(&dir.join("serve.log"))
        .into_iter()
        .find(|l| l["message"] == "task accepted" && l["task_id"] == id.as_str())
        .expect("the API logs the accepted task");
    let worker_line = json_lines(&dir.join("worker.log"))
        .into_iter()
        .find(|l| l["message"] == "task succeeded" && l["task_id"] == id.as_str())
        .expect("the worker logs the outcome");
    assert_eq!(api_line["trace_id"], trace_id, "{api_line}");
    assert_eq!(worker_line["trace_id"], trace_id, "{worker_line}");
    for field in ["task", "attempt", "redelivered", "retry_count"] {
        assert!(
            !worker_line[field].is_null(),
            "{field} missing: {worker_line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_carries_a_password() {
    let secret = "Xyzzy-s3cret-pw";
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(common::unique("kobetest-logs"));
    std::fs::create_dir_all(&dir).unwrap();
    let redis_port = common::free_port();
    // The test MongoDB's address with this password in place of any credentials it has.
    let uri = common::mongodb_uri();
    let rest = uri.trim_start_matches("mongodb://");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    let mongo = format!("mongodb://kobe:{secret}@{host}");
    let bad = [
        (
            "RABBITMQ_URL",
            format!("amqp://guest:{secret}@127.0.0.1:5672/%2f"),
        ),
        ("MONGODB_URI", mongo),
        (
            "REDIS_URL",
            format!("redis://:{secret}@127.0.0.1:{redis_port}/0"),
        ),
        ("KOBE_DEPENDENCY_TIMEOUT_MS", "1000".to_owned()),
    ];
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let port = common::free_port();
    let serve = spawn_logged(
        &env,
        &["serve", "--addr", &format!("127.0.0.1:{port}")],
        &dir.join("serve.log"),
        &bad,
    );
    let worker = spawn_logged(&env, &["worker"], &dir.join("worker.log"), &bad);
    let health = spawn_logged(&env, &["healthcheck"], &dir.join("health.log"), &bad);
    let client = reqwest::Client::new();
    // Make the API touch every dependency so its errors get logged.
    common::eventually(common::startup_deadline(), "serve up", || async {
        client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let _ = client
        .get(format!("http://127.0.0.1:{port}/ready"))
        .send()
        .await;
    let _ = client
        .post(format!("http://127.0.0.1:{port}/task/start"))
        .json(&json!({"task_name": "demo_long_io"}))
        .send()
        .await;
    // Let the worker and publisher try (and fail) to connect a few times.
    common::eventually(
        Duration::from_secs(20),
        "connection failures logged",
        || async {
            let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
            log.contains("reconnecting").then_some(())
        },
    )
    .await;
    worker.stop();
    serve.stop();
    let _ = health.wait();

    let mut lines = 0;
    let mut redacted = 0;
    for name in [
        "serve.log",
        "serve.out",
        "worker.log",
        "worker.out",
        "health.log",
        "health.out",
    ] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        for line in text.lines() {
            lines += 1;
            assert!(!line.contains(secret), "{name}: {line}");
            if line.contains("***") {
                redacted += 1;
            }
        }
    }
    assert!(
        lines > 10 && redacted > 0,
        "{lines} lines, {redacted} with a redacted URL"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accepts OTLP/HTTP exports and keeps their bodies: a collector of the test's own.
fn otlp_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    kept.lock().unwrap().push(body);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, bodies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_api_and_worker_export_spans_of_one_trace() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let (otlp_port, bodies) = otlp_receiver();
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let dir = std::env::temp_dir().join(common::unique("kobetest-otel"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = common::free_port();
    let otel = |service: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_SERVICE_NAME", service.into()),
        ]
    };
    let as_refs = |v: &Vec<(&'static str, String)>| -> Vec<(&'static str, String)> { v.clone() };
    let serve_env = as_refs(&otel("kobe-serve-under-test"));
    let worker_env = as_refs(&otel("kobe-worker-under-test"));
    let serve_refs: Vec<(&str, &str)> = serve_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let worker_refs: Vec<(&str, &str)> = worker_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let serve = spawn_logged(
        &env,
        &["serve", "--addr", &format!("127.0.0.1:{port}")],
        &dir.join("serve.log"),
        &serve_refs,
    );
    let worker = spawn_logged(&env, &["worker"], &dir.join("worker.log"), &worker_refs);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&client, &base).await;
    let trace_id: u128 = 0x0af7651916cd43dd8448eb211c80319c;
    let id = submit_traced(
        &client,
        &base,
        format!("00-{trace_id:032x}-b7ad6b7169203331-01"),
    )
    .await;
    env.wait_final(&id, Duration::from_secs(20)).await;
    // Both processes flush their spans on the way out.
    worker.stop();
    serve.stop();

    let needle = trace_id.to_be_bytes();
    let exported = bodies.lock().unwrap().clone();
    let with_trace: Vec<&Vec<u8>> = exported.iter().filter(|b| contains(b, &needle)).collect();
    assert!(
        with_trace
            .iter()
            .any(|b| contains(b, b"kobe-serve-under-test")),
        "the API exported no span of the trace ({} exports)",
        exported.len()
    );
    assert!(
        with_trace
            .iter()
            .any(|b| contains(b, b"kobe-worker-under-test")),
        "the worker exported no span of the trace ({} exports)",
        exported.len()
    );
    // The task document records the same trace.
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(
        task.trace_id.as_deref(),
        Some(format!("{trace_id:032x}").as_str())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Submits a one-millisecond `demo_long_io` with `traceparent`, and returns its task id.
async fn submit_traced(client: &reqwest::Client, base: &str, traceparent: String) -> String {
    let response = client
        .post(format!("{base}/task/start"))
        .header("traceparent", traceparent)
        .json(&common::quick_task(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned()
}
