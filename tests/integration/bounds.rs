//! Every request's cost is bounded: the largest body each route allows, in the shapes that
//! cost the most to read, is answered quickly, and the process beside it keeps serving.
//! (How fast exactly is for the benchmarks; these bounds hold on a debug build of a loaded
//! 2-core machine and fail by orders of magnitude on quadratic work.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, TestApi, TestEnv};

/// Probes `/health` on the API every 20 ms until told to stop (at most 2,000 probes), and
/// returns the slowest answer.
fn probe_health(api: &TestApi, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Duration> {
    let url = format!("{}/health", api.address);
    // A client of its own: the probes do not queue behind the large request's connection.
    let client = reqwest::Client::new();
    tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        for _ in 0..2_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let sent = Instant::now();
            let response = client.get(&url).send().await.expect("health answers");
            assert_eq!(response.status(), 200);
            slowest = slowest.max(sent.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    })
}

/// Sends `body` to `path` while `/health` is probed; returns the answer, how long it took and
/// the slowest health probe meanwhile.
async fn send_beside_probes(
    api: &TestApi,
    path: &str,
    body: Vec<u8>,
) -> (u16, Value, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let probes = probe_health(api, stop.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = Instant::now();
    let response = api
        .client
        .post(format!("{}{path}", api.address))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let took = sent.elapsed();
    stop.store(true, Ordering::Relaxed);
    (status, answer, took, probes.await.unwrap())
}

/// One submission of about `bytes` as sent, built to cost the most to check: a key of
/// `key_bytes` over a list of zeros. Written as text: the test itself holds no tree of values,
/// so the process's memory is the server's.
fn heavy_item(bytes: usize, key_bytes: usize) -> String {
    let zeros = (bytes - key_bytes - 64) / 2;
    let mut item = format!(
        r#"{{"task_name":"demo_long_io","kwargs":{{"{}":["#,
        "k".repeat(key_bytes)
    );
    item.push_str(&"0,".repeat(zeros));
    item.push_str("0]}}");
    item
}

/// The longest key task arguments may have.
const KEY_MAX: usize = 1024;

/// Peak resident memory of this test process (nextest runs each test in a process of its own).
fn peak_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_bulk_body_in_its_costliest_shape_is_answered_while_health_keeps_answering() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let item_max = env.settings.api.max_body_bytes;
    // Eleven items just under the per-item bound; the shape that once pinned the API for 45 s
    // (a 2 MB key over a million zeros, 4 MB: over the item bound); a 1,025-byte key. The whole
    // body is just under the bulk bound (16 × KOBE_MAX_BODY_BYTES).
    let mut tasks: Vec<String> = (0..11)
        .map(|_| heavy_item(item_max - 200, KEY_MAX))
        .collect();
    tasks.push(heavy_item(4_000_000, 2_000_000));
    tasks.push(heavy_item(2_000, KEY_MAX + 1));
    let body = format!(r#"{{"tasks":[{}]}}"#, tasks.join(",")).into_bytes();
    drop(tasks);
    let before = peak_rss_mb();
    assert!(
        body.len() > 14 * item_max && body.len() <= 16 * item_max,
        "{} bytes",
        body.len()
    );
    let (status, answer, took, slowest) = send_beside_probes(&api, "/task/start_many", body).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert!(results[..11].iter().all(|r| r["status"] == 202), "{answer}");
    // An item over KOBE_MAX_BODY_BYTES is refused as /task/start would refuse it.
    assert_eq!(results[11]["status"], 413);
    // A key over the bound is named, cut short.
    assert_eq!(results[12]["status"], 422);
    let field = results[12]["problem"]["field"].as_str().unwrap();
    assert!(
        field.starts_with("kwargs.kkk") && field.len() < 80,
        "{field}"
    );
    assert!(took < Duration::from_secs(20), "answered in {took:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a /health probe took {slowest:?}"
    );
    // What the server grew by (this process holds the body it sent too, counted before).
    let grown = peak_rss_mb().saturating_sub(before);
    eprintln!("16 MiB bulk: answered in {took:?}, slowest /health {slowest:?}, grew {grown} MB");
    assert!(grown < 300, "the server grew by {grown} MB");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_single_submission_in_its_costliest_shape_is_answered_at_once() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let item_max = env.settings.api.max_body_bytes;
    let body = heavy_item(item_max - 200, KEY_MAX).into_bytes();
    let (status, answer, took, slowest) = send_beside_probes(&api, "/task/start", body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a /health probe took {slowest:?}"
    );
    // The shape of the attack, as large as a single submission may be: refused at once.
    let body = heavy_item(item_max - 200, item_max / 2).into_bytes();
    assert!(body.len() <= item_max);
    let (status, answer, took, _) = send_beside_probes(&api, "/task/start", body).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("1024 bytes")
            || answer.to_string().contains("1024 bytes"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_submission_counts_each_item_against_the_rate_limit() {
    // A long window: both requests fall in it, wherever the clock is.
    let env = TestEnv::with(&[("KOBE_RATE_LIMIT", "50"), ("KOBE_RATE_WINDOW_MS", "60000")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let post = |n: usize| {
        let tasks: Vec<Value> = (0..n).map(|_| common::quick_task(1)).collect();
        api.client
            .post(format!("{}/task/start_many", api.address))
            .json(&json!({ "tasks": tasks }))
            .send()
    };
    assert_eq!(post(30).await.unwrap().status(), 200);
    // 30 counted already (and one readiness probe at most): 30 more are over 50.
    let over = post(30).await.unwrap();
    assert_eq!(over.status(), 429);
    assert!(over.headers().contains_key("retry-after"));
    api.stop().await;
}

fn steps(n: usize) -> Value {
    json!({"group": (0..n).map(|_| common::quick_task(1)).collect::<Vec<_>>()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_is_bounded_by_its_edges_and_the_largest_allowed_one_starts() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let api = env.spawn_api().await;
    let post = |body: Value| {
        send_beside_probes(&api, "/workflow/start", serde_json::to_vec(&body).unwrap())
    };
    // A group of 2,500 after a group of 2,500: 6.25 M edges in about 150 KB. It once kept a
    // core busy for minutes and grew to gigabytes.
    let (status, answer, took, slowest) =
        post(json!({"workflow": {"chain": [steps(2_500), steps(2_500)]}})).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["field"], "workflow.chain[1].group[8]");
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a /health probe took {slowest:?}"
    );
    // The most edges allowed (141 × 141 = 19,881) and the most steps allowed (5,000: a step, a
    // group of 4,998 and a callback): recorded and started.
    for workflow in [
        json!({"chain": [steps(141), steps(141)]}),
        json!({"chain": [common::quick_task(1), steps(4_998), common::quick_task(1)]}),
    ] {
        let (status, answer, took, slowest) = post(json!({ "workflow": workflow })).await;
        assert_eq!(status, 202, "{answer}");
        assert!(took < Duration::from_secs(30), "answered in {took:?}");
        assert!(
            slowest < Duration::from_millis(500),
            "a /health probe took {slowest:?}"
        );
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_deliveries_load_no_arguments_until_they_have_a_slot_and_a_claim() {
    // Deliveries wait in the worker for a slot as long as the blockers run (at the default they
    // would go back to the queue after a second, and come again).
    let env = TestEnv::with(&[("KOBE_SLOT_WAIT_MS", "20000")]).await;
    env.init_db().await;
    let api = env.spawn_api().await;
    // Two slots, held by two long tasks; at the default prefetch the worker takes six more
    // deliveries, each with arguments of about 1 MB kept in RawPayload (several times that as
    // values in memory, once loaded).
    let blockers = [
        api.submit(common::quick_task(5_000)).await,
        api.submit(common::quick_task(5_000)).await,
    ];
    let worker = env.spawn_worker(2);
    for id in &blockers {
        api.wait_for_state(id, Duration::from_secs(20), |b| b["state"] == "STARTED")
            .await;
    }
    let item = heavy_item(env.settings.api.max_body_bytes - 200, 8);
    let mut large = Vec::new();
    for _ in 0..6 {
        let response = api
            .client
            .post(format!("{}/task/start", api.address))
            .header("content-type", "application/json")
            .body(item.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        large.push(body["task_id"].as_str().unwrap().to_owned());
    }
    // All six are prefetched (the queue is empty) while the blockers still run ...
    env.wait_queue_empty("default", "the large tasks prefetched")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and none has read its arguments: take them away, and each finds them missing when it
    // gets its slot and claim. (Loaded on arrival, they all ran.)
    let payloads = env.db.collection::<mongodb::bson::Document>("RawPayload");
    let ids: Vec<String> = large.iter().map(|id| format!("{id}:args")).collect();
    let deleted = payloads
        .delete_many(mongodb::bson::doc! {"_id": {"$in": &ids}})
        .await
        .unwrap();
    assert_eq!(deleted.deleted_count, 6);
    for id in &blockers {
        let (done, _) = api.wait_for_final(id, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "SUCCESS", "{done}");
    }
    for id in &large {
        let (done, _) = api.wait_for_final(id, Duration::from_secs(60)).await;
        assert_eq!(done["state"], "FAILURE", "{done}");
        assert!(
            done["root_cause"]
                .as_str()
                .unwrap_or_default()
                .contains(":args"),
            "{done}"
        );
    }
    worker.stop().await;
    api.stop().await;
}
