//! The operator page in a real browser (headless Chromium), and the task search behind it.

use crate::common;

use std::time::Duration;

use common::TestEnv;
use serde_json::{json, Value};

/// The page at `url` as Chromium renders it (the DOM after its scripts ran).
async fn rendered(url: String) -> String {
    let profile = std::env::temp_dir().join(common::unique("kobe-chromium"));
    let output = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            &url,
        ])
        .output()
        .await
        .expect("chromium (scripts/test.sh installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_scripted_run_and_the_search_pages_through_failures() {
    let env = TestEnv::with(&[("KOBE_RETRY_MAX", "0")]).await;
    env.init_db().await;
    let worker = env.spawn_worker(2);
    let api = env.spawn_api().await;
    let ok = api
        .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}}))
        .await;
    let mut failed = Vec::new();
    for _ in 0..2 {
        failed.push(
            api.submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}))
                .await,
        );
    }
    for id in failed.iter().chain([&ok]) {
        env.wait_final(id, Duration::from_secs(20)).await;
    }

    let dom = rendered(format!("{}/ui", api.address)).await;
    assert!(dom.contains("data-state=\"SUCCESS\">1<"), "{dom}");
    assert!(dom.contains("data-state=\"FAILURE\">2<"), "{dom}");
    assert!(dom.contains("id=\"failure-rate\">66.7 %<"), "{dom}");
    for id in &failed {
        assert!(dom.contains(&format!("data-task=\"{id}\"")), "{dom}");
    }
    assert!(!dom.contains(&format!("data-task=\"{ok}\"")));
    for id in &failed {
        assert!(dom.contains(&format!("data-replay=\"{id}\"")), "{dom}");
    }
    let default_queue = env.topology.queue("default");
    assert!(
        dom.contains(&format!("data-queue=\"{default_queue}\"")),
        "{dom}"
    );

    let dom = rendered(format!("{}/ui/task/{}", api.address, failed[0])).await;
    assert!(dom.contains("id=\"state\">FAILURE<"), "{dom}");
    assert!(dom.contains("retries exhausted"), "{dom}");
    assert!(
        dom.contains(&format!("data-retry=\"{}\"", failed[0])),
        "{dom}"
    );

    // The search: newest change first, one per page, then the end.
    let page = |query: String| {
        let url = format!("{}/task?{query}", api.address);
        let client = api.client.clone();
        async move {
            let response = client.get(url).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, first) = page("state=FAILURE&limit=1".into()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["tasks"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let (_, second) = page(format!("state=FAILURE&limit=1&cursor={cursor}")).await;
    let seen = [
        first["tasks"][0]["task_id"].as_str().unwrap(),
        second["tasks"][0]["task_id"].as_str().unwrap(),
    ];
    assert_eq!(
        seen,
        [failed[1].as_str(), failed[0].as_str()],
        "newest first"
    );
    let cursor = second["next_cursor"].as_str().unwrap().to_owned();
    let (_, third) = page(format!("state=FAILURE&limit=1&cursor={cursor}")).await;
    assert_eq!(third["tasks"], json!([]));
    assert!(third["next_cursor"].is_null());
    let (_, success) = page("state=SUCCESS".into()).await;
    assert_eq!(success["tasks"][0]["task_id"], ok.as_str());

    let (status, problem) = page("state=LOST".into()).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("state")));
    let (status, problem) = page("cursor=nonsense".into()).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("cursor")));
    let (status, problem) = page("limit=501".into()).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("limit")));

    // The dead-letter API: list, then replay one by id (its second attempt succeeds).
    let letters: Value = api.get("/dlq").await.json().await.unwrap();
    assert_eq!(letters["letters"].as_array().unwrap().len(), 2, "{letters}");
    let replayed: Value = api
        .client
        .post(format!("{}/dlq/replay", api.address))
        .json(&json!({"task_ids": [failed[0], "0b7e5ad2-4c1f-4a57-9a8e-2f0c5a1c0d11"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["outcomes"][0]["outcome"], "replayed", "{replayed}");
    assert_eq!(
        replayed["missing"],
        json!(["0b7e5ad2-4c1f-4a57-9a8e-2f0c5a1c0d11"])
    );
    let task = env.wait_final(&failed[0], Duration::from_secs(20)).await;
    assert_eq!(task.state, kobe::domain::TaskState::Success);
    assert!(task.replays[0].by.starts_with("api:"));
    let letters: Value = api.get("/dlq").await.json().await.unwrap();
    assert_eq!(letters["letters"].as_array().unwrap().len(), 1, "{letters}");
    let nothing = api
        .client
        .post(format!("{}/dlq/replay", api.address))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 422);
    worker.stop().await;
    api.handle.stop(false).await;
}
