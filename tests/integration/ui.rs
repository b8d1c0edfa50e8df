//! The operator page in a real browser (headless Chromium), and the task search behind it.

use crate::common;

use std::time::Duration;

use common::{Running, TestEnv};
use serde_json::{json, Value};

/// Headless Chromium with a profile of its own (removed after), asked to do `what` to `url`;
/// its standard output.
async fn chromium(what: &[&str], url: &str) -> Vec<u8> {
    let profile = std::env::temp_dir().join(common::unique("kobe-chromium"));
    let output = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(what)
        .arg(url)
        .output()
        .await
        .expect("chromium (scripts/test.sh installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(output.status.success(), "{output:?}");
    output.stdout
}

/// A picture of the page at `url`, as Chromium draws it, saved in the tests' output folder
/// (`target/tmp/screenshots/NAME.png`); returns where.
pub(crate) async fn screenshot(url: &str, name: &str) -> std::path::PathBuf {
    let folder = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join(format!("{name}.png"));
    let target = format!("--screenshot={}", path.display());
    chromium(&["--window-size=1000,600", &target], url).await;
    path
}

/// The page at `url` as Chromium renders it (the DOM after its scripts ran).
pub(crate) async fn rendered(url: String) -> String {
    String::from_utf8_lossy(&chromium(&["--dump-dom"], &url).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_scripted_run_and_the_search_pages_through_failures() {
    let Running { env, api, worker } = TestEnv::with_worker(&[("KOBE_RETRY_MAX", "0")], 2).await;
    let ok = api.submit(common::quick_task(1)).await;
    // Two failures, one after the other, so the newer one is known.
    let mut failed = Vec::new();
    for _ in 0..2 {
        let id = api
            .submit(json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": 1, "fail_attempts": 1}}))
            .await;
        env.wait_final(&id, Duration::from_secs(20)).await;
        failed.push(id);
    }
    env.wait_final(&ok, Duration::from_secs(20)).await;

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
    let (status, problem) = page("parent_id=a%2Fb".into()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("parent_id"))
    );
    let (status, problem) = page(format!("root_cause={}", "x".repeat(201))).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("root_cause"))
    );
    let (_, by_cause) =
        page("state=FAILURE&root_cause=RETRIES%20EXHAUSTED&route=default".into()).await;
    assert_eq!(by_cause["tasks"].as_array().unwrap().len(), 2, "{by_cause}");

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

    // Show one letter with its body; purge: refused without confirm, counted, then removed.
    let letter: Value = api
        .get(&format!("/dlq/{}", failed[1]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letter["task_id"], failed[1].as_str(), "{letter}");
    assert!(letter["body"].is_array(), "the Celery body: {letter}");
    assert_eq!(api.get(&format!("/dlq/{}", failed[0])).await.status(), 404);
    let purge = |body: Value| {
        let client = api.client.clone();
        let url = format!("{}/dlq/purge", api.address);
        async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, problem) = purge(json!({})).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("confirm")));
    let (status, counted) = purge(json!({"dry_run": true})).await;
    assert_eq!((status, &counted["removed"]), (200, &json!(1)), "{counted}");
    let (_, kept) = purge(json!({"confirm": true, "task_name": "another_task"})).await;
    assert_eq!(kept["removed"], 0);
    let (_, removed) = purge(json!({"confirm": true})).await;
    assert_eq!(removed["removed"], 1);
    let letters: Value = api.get("/dlq").await.json().await.unwrap();
    assert_eq!(letters["letters"], json!([]), "{letters}");
    worker.stop().await;
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_tokens_a_browser_signs_in_once_and_its_buttons_work() {
    let token = "ui-test-token-0123456789";
    let env = TestEnv::with(&[("KOBE_API_TOKENS", token)]).await;
    env.init_db().await;
    let api = env.spawn_api().await;

    // A browser without a session lands on the sign-in form, not on a JSON 401.
    let dom = rendered(format!("{}/ui", api.address)).await;
    assert!(dom.contains("name=\"token\""), "{dom}");
    assert!(!dom.contains(token));

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let sign_in = |token: &'static str| {
        let client = no_redirects.clone();
        let url = format!("{}/ui/login", api.address);
        async move {
            client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"))
                .send()
                .await
                .unwrap()
        }
    };
    let refused = sign_in("not-the-token-at-all").await;
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    let signed_in = sign_in(token).await;
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    assert!(
        !cookie.contains(token),
        "the cookie carries the token: {cookie}"
    );

    // The page and its buttons' requests pass with the cookie; without, the API still says 401.
    let page = no_redirects
        .get(format!("{}/ui", api.address))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"kobe-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its session's CSRF token")
        .to_owned();
    let id = {
        let response = no_redirects
            .post(format!("{}/task/start", api.address))
            .bearer_auth(token)
            .json(&common::quick_task(1))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        response.json::<Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let detail = no_redirects
        .get(format!("{}/ui/task/{id}", api.address))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        detail.contains(&format!("data-cancel=\"{id}\"")),
        "{detail}"
    );
    let cancel = |cookie: Option<String>| {
        let mut request = no_redirects.post(format!("{}/task/{id}/cancel", api.address));
        if let Some(cookie) = cookie {
            // As the page's own script sends it.
            request = request
                .header("cookie", cookie)
                .header("x-kobe-csrf", &csrf)
                .header("sec-fetch-site", "same-origin");
        }
        request.send()
    };
    assert_eq!(cancel(None).await.unwrap().status(), 401);
    let cancelled = cancel(Some(session.clone())).await.unwrap();
    assert_eq!(cancelled.status(), 200);
    let task = env.tasks().get(&id).await.unwrap().unwrap();
    assert_eq!(task.state, kobe::domain::TaskState::Revoked);
    let by = task.cancel_requested.unwrap().by;
    assert!(by.starts_with("api:token-") && !by.contains(token), "{by}");
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_tasks_are_listed_exactly_after_thousands_have_finished() {
    let common::Running { env, api, worker } = TestEnv::with_worker(&[], 10).await;
    // Thousands of finished attempts first: their leases once crowded the running ones out.
    for _ in 0..3 {
        let tasks: Vec<Value> = (0..700).map(|_| common::quick_task(0)).collect();
        let response = api
            .client
            .post(format!("{}/task/start_many", api.address))
            .json(&json!({ "tasks": tasks }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let done = || async {
        env.db
            .collection::<mongodb::bson::Document>("TaskLeases")
            .count_documents(mongodb::bson::doc! {"state": "SUCCESS"})
            .await
            .unwrap()
    };
    common::eventually(Duration::from_secs(120), "2,100 tasks done", || async {
        (done().await == 2_100).then_some(())
    })
    .await;
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(api.submit(common::quick_task(6_000)).await);
    }
    running.sort();
    let listed = common::eventually(Duration::from_secs(10), "the three listed", || async {
        let response = api.get("/task?state=STARTED").await;
        let body: Value = response.json().await.ok()?;
        let mut ids: Vec<String> = body["tasks"]
            .as_array()?
            .iter()
            .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        (ids == running).then_some(ids)
    })
    .await;
    assert_eq!(listed.len(), 3);
    for id in &running {
        api.wait_for_final(id, Duration::from_secs(30)).await;
    }
    // Finished, they are listed no more.
    common::eventually(Duration::from_secs(10), "none listed", || async {
        let body: Value = api.get("/task?state=STARTED").await.json().await.ok()?;
        body["tasks"].as_array()?.is_empty().then_some(())
    })
    .await;
    worker.stop().await;
}
