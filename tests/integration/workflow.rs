//! Workflows against live services: results passed along a chain, a chord that joins once, a
//! failure that stops what comes after and runs `on_failure` once, a finished step handed on
//! twice, a start sent twice, a cancel. Each counts how often every step ran.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestApi, TestEnv, TestWorker};
use kobe::tasks::{Invocation, Registry, Task, TaskError, TaskFuture};
use serde_json::{json, Value};

/// Runs of each task id.
type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// `wf_add`: the sum of every number in its arguments (lists included), after `sleep_ms`;
/// then fails for good with `fail: true`, or on its first run with `fail_once: true`. Counts
/// its runs.
struct Add {
    runs: Runs,
}

fn sum(value: &Value) -> i64 {
    match value {
        Value::Number(n) => n.as_i64().unwrap_or_default(),
        Value::Array(items) => items.iter().map(sum).sum(),
        _ => 0,
    }
}

impl Task for Add {
    fn name(&self) -> &'static str {
        "wf_add"
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        let runs = {
            let mut runs = self.runs.lock().unwrap();
            let count = runs.entry(invocation.task_id.to_string()).or_default();
            *count += 1;
            *count
        };
        Box::pin(async move {
            if let Some(ms) = invocation.kwargs.get("sleep_ms").and_then(Value::as_u64) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if runs == 1 && invocation.kwargs.get("fail_once") == Some(&json!(true)) {
                return Err(TaskError::Permanent("failed its first run".into()));
            }
            if invocation.kwargs.get("fail") == Some(&json!(true)) {
                return Err(TaskError::Permanent("asked to fail".into()));
            }
            if let Some(bytes) = invocation.kwargs.get("bytes").and_then(Value::as_u64) {
                return Ok(json!("x".repeat(bytes as usize)));
            }
            Ok(json!(sum(&Value::Array(invocation.args.clone()))))
        })
    }
}

struct Fleet {
    env: TestEnv,
    api: TestApi,
    worker: TestWorker,
    runs: Runs,
}

/// An API and a worker (at the shipped settings) that know `wf_add`.
async fn fleet() -> Fleet {
    fleet_on(TestEnv::new().await).await
}

/// [`fleet`] on a test slice of the test's own.
async fn fleet_on(env: TestEnv) -> Fleet {
    env.init_db().await;
    let runs = Runs::default();
    let mut registry = Registry::with_builtin_tasks();
    registry.register(Add { runs: runs.clone() }).unwrap();
    let api = env.spawn_api_with(registry).await;
    common::eventually(common::startup_deadline(), "API ready", || async {
        (api.get("/ready").await.status() == 200).then_some(())
    })
    .await;
    let worker = env.worker_with(8, Add { runs: runs.clone() });
    Fleet {
        env,
        api,
        worker,
        runs,
    }
}

impl Fleet {
    async fn start(&self, body: Value) -> reqwest::Response {
        self.api
            .client
            .post(format!("{}/workflow/start", self.api.address))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn started(&self, body: Value) -> String {
        let response = self.start(body).await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        let body: Value = response.json().await.unwrap();
        body["workflow_id"].as_str().unwrap().to_owned()
    }

    async fn show(&self, id: &str) -> Value {
        self.api
            .get(&format!("/workflow/{id}"))
            .await
            .json()
            .await
            .unwrap()
    }

    /// Reruns a failed step, as an operator would.
    async fn rerun(&self, task_id: &str) {
        let retried = self
            .api
            .client
            .post(format!("{}/task/{task_id}/retry", self.api.address))
            .send()
            .await
            .unwrap();
        assert_eq!(retried.status(), 202, "{:?}", retried.text().await);
    }

    /// Waits until the step's task is final; returns its state.
    async fn step_final(&self, task_id: &str) -> String {
        let (status, _) = self
            .api
            .wait_for_final(task_id, Duration::from_secs(30))
            .await;
        status["state"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the workflow ended; returns it.
    async fn ended(&self, id: &str) -> Value {
        common::eventually(Duration::from_secs(30), "the workflow ends", || async {
            let view = self.show(id).await;
            matches!(
                view["state"].as_str(),
                Some("SUCCESS" | "FAILURE" | "REVOKED")
            )
            .then_some(view)
        })
        .await
    }

    /// The result MongoDB recorded for the step.
    async fn result(&self, task_id: &str) -> Value {
        let task = self
            .env
            .tasks()
            .get(task_id)
            .await
            .unwrap()
            .expect("a task");
        task.result.unwrap_or_default()
    }

    fn runs_of(&self, task_id: &str) -> u32 {
        self.runs
            .lock()
            .unwrap()
            .get(task_id)
            .copied()
            .unwrap_or_default()
    }

    async fn stop(self) {
        self.worker.stop().await;
        self.api.stop().await;
        drop(self.env);
    }
}

fn step_ids(view: &Value) -> Vec<String> {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["task_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_passes_results_on_and_a_chord_joins_once_with_its_members_results_in_order() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1, 2]},
            {"group": [
                // The first member finishes last: the list still follows the members' order.
                {"task_name": "wf_add", "args": [10], "kwargs": {"sleep_ms": 300}},
                {"task_name": "wf_add", "args": [20]},
            ]},
            {"task_name": "wf_add"},
            {"task_name": "wf_add", "args": [1000], "immutable": true},
        ]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    let steps = step_ids(&view);
    assert_eq!(steps.len(), 5);
    let paths: Vec<&str> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "workflow.chain[0]",
            "workflow.chain[1].group[0]",
            "workflow.chain[1].group[1]",
            "workflow.chain[2]",
            "workflow.chain[3]",
        ]
    );
    // 1+2 = 3; the members get 3 first: 13 and 23; the callback gets [13, 23]; the immutable
    // step gets nothing before its own argument.
    let results = [json!(3), json!(13), json!(23), json!(36), json!(1000)];
    for (step, expected) in steps.iter().zip(results) {
        assert_eq!(fleet.result(step).await, expected, "{step}");
        assert_eq!(fleet.runs_of(step), 1, "{step} ran once");
    }
    let status: Value = fleet.api.status(&steps[3]).await.json().await.unwrap();
    assert_eq!(status["state"], "SUCCESS");
    assert_eq!(
        status["workflow_id"],
        id.as_str(),
        "a step says whose it is"
    );
    assert_eq!(
        common::metric("kobe_workflows_total{state=\"SUCCESS\"}"),
        1.0
    );
    // Two members after the first step, the callback after them, the last step after it.
    assert_eq!(
        common::metric("kobe_workflow_join_duration_seconds_count"),
        4.0
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_many_members_runs_its_callback_once_after_all_of_them() {
    let fleet = fleet().await;
    let members: Vec<Value> = (0..60)
        .map(|i| json!({"task_name": "wf_add", "args": [i], "kwargs": {"sleep_ms": (i * 7) % 50}}))
        .collect();
    let id = fleet
        .started(json!({"workflow": {"chain": [{"group": members}, {"task_name": "wf_add"}]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    let steps = step_ids(&view);
    let callback = steps.last().unwrap();
    assert_eq!(fleet.result(callback).await, json!((0..60).sum::<i64>()));
    for step in &steps {
        assert_eq!(fleet.runs_of(step), 1, "{step} ran once");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_failing_for_good_fails_the_workflow_stops_later_steps_and_runs_on_failure_once() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({
            "workflow": {"chain": [
                {"task_name": "wf_add", "args": [1]},
                {"task_name": "wf_add", "kwargs": {"fail": true},
                 "on_failure": {"task_name": "wf_add", "args": [9]}},
                {"task_name": "wf_add", "args": [5]},
            ]},
            "on_failure": {"task_name": "wf_add", "args": [7]},
        }))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "FAILURE", "{view}");
    let steps = step_ids(&view);
    assert_eq!(view["failed_step"], steps[1].as_str());
    assert!(
        view["reason"].as_str().unwrap().contains("asked to fail"),
        "{view}"
    );
    assert_eq!(view["steps"][2]["state"], "REVOKED", "{view}");
    assert_eq!(view["steps"][2]["submitted"], false, "{view}");
    let on_failure = format!("{id}:on_failure");
    common::eventually(Duration::from_secs(20), "on_failure ran", || async {
        (fleet.runs_of(&on_failure) == 1).then_some(())
    })
    .await;
    // It received the failed step's id and root cause before its own argument.
    let (status, _) = fleet
        .api
        .wait_for_final(&on_failure, Duration::from_secs(20))
        .await;
    assert_eq!(status["state"], "SUCCESS", "{status}");
    // The failed step's own on_failure ran once too.
    let own = format!("{}:on_failure", steps[1]);
    common::eventually(
        Duration::from_secs(20),
        "the step's on_failure ran",
        || async { (fleet.runs_of(&own) == 1).then_some(()) },
    )
    .await;
    assert_eq!(fleet.runs_of(&own), 1);
    assert_eq!(fleet.runs_of(&on_failure), 1);
    assert_eq!(fleet.runs_of(&steps[0]), 1);
    assert_eq!(fleet.runs_of(&steps[1]), 1);
    assert_eq!(
        fleet.runs_of(&steps[2]),
        0,
        "a step after the failure never runs"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_retried_to_success_lets_the_workflow_go_on() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1], "kwargs": {"fail_once": true}},
            {"task_name": "wf_add", "args": [5]},
        ]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "FAILURE", "{view}");
    let first = format!("{id}:0");
    let retried = fleet
        .api
        .client
        .post(format!("{}/task/{first}/retry", fleet.api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202, "{:?}", retried.text().await);
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    assert_eq!(fleet.runs_of(&first), 2);
    assert_eq!(fleet.runs_of(&format!("{id}:1")), 1);
    assert_eq!(fleet.result(&format!("{id}:1")).await, json!(6));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_step_delivered_again_hands_on_again_and_the_next_step_still_runs_once() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1]},
            {"task_name": "wf_add", "args": [2]},
        ]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    let steps = step_ids(&view);
    // The copy a broker redelivers when a worker dies between the outcome and its ack: the
    // worker finds the step finished, hands the workflow on again, and nothing runs twice.
    let publisher = fleet.env.publisher();
    for step in &steps {
        let mut copy = kobe::amqp::TaskMessage::new(
            kobe::domain::TaskId::parse(step).unwrap(),
            "wf_add",
            vec![json!(1)],
            Default::default(),
        );
        copy.workflow_id = Some(id.clone());
        fleet.env.publish_message(&publisher, &copy).await;
    }
    fleet
        .env
        .wait_queue_empty("default", "the copies are taken")
        .await;
    common::eventually(Duration::from_secs(10), "the copies are acked", || async {
        let acked = common::metric("kobe_duplicate_deliveries_total{reason=\"finished\"}");
        (acked >= 2.0).then_some(())
    })
    .await;
    for step in &steps {
        assert_eq!(fleet.runs_of(step), 1, "{step} ran once");
    }
    let shown = fleet.show(&id).await;
    assert_eq!(shown["state"], "SUCCESS", "{shown}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_sent_twice_with_one_key_starts_one_workflow() {
    let fleet = fleet().await;
    let body = json!({"workflow": {"chain": [
        {"task_name": "wf_add", "args": [1]},
        {"task_name": "wf_add", "args": [2]},
    ]}});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = fleet
            .api
            .client
            .post(format!("{}/workflow/start", fleet.api.address))
            .header("Idempotency-Key", "nightly-2026-12-02")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let answer: Value = response.json().await.unwrap();
        ids.push(answer["workflow_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[0], ids[1]);
    let view = fleet.ended(&ids[0]).await;
    assert_eq!(view["state"], "SUCCESS");
    for step in step_ids(&view) {
        assert_eq!(fleet.runs_of(&step), 1, "{step} ran once");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_step_is_422_naming_its_path_and_records_nothing() {
    let fleet = fleet().await;
    let cases = [
        (
            json!({"workflow": {"chain": [{"task_name": "wf_add"}, {"group": [{"task_name": "nope"}]}]}}),
            "workflow.chain[1].group[0].task_name",
        ),
        (
            json!({"workflow": {"chain": [{"task_name": "wf_add", "priority": 12}]}}),
            "workflow.chain[0].priority",
        ),
        (json!({"workflow": {"group": []}}), "workflow.group"),
        (json!({"steps": []}), "steps"),
        (
            json!({"workflow": {"task_name": "wf_add"}, "on_failure": {"task_name": "nope"}}),
            "on_failure.task_name",
        ),
    ];
    for (body, field) in cases {
        let response = fleet.start(body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["field"], field, "{problem}");
    }
    let recorded = fleet
        .env
        .db
        .collection::<mongodb::bson::Document>("Workflows")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap();
    assert_eq!(recorded, 0);
    assert_eq!(fleet.api.get("/workflow/wf-none").await.status(), 404);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_workflow_revokes_what_has_not_run_and_submits_nothing_more() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "demo_long_io", "kwargs": {"duration_ms": 30000}},
            {"task_name": "wf_add", "args": [1]},
        ]}}))
        .await;
    let first = format!("{id}:0");
    fleet
        .api
        .wait_for_state(&first, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    let response = fleet
        .api
        .client
        .post(format!("{}/workflow/{id}/cancel", fleet.api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["state"], "REVOKED", "{answer}");
    assert_eq!(answer["cancelled"], 1, "{answer}");
    let (status, _) = fleet
        .api
        .wait_for_final(&first, Duration::from_secs(20))
        .await;
    assert_eq!(status["state"], "REVOKED", "{status}");
    let view = fleet.show(&id).await;
    assert_eq!(view["state"], "REVOKED");
    assert!(
        view["reason"].as_str().unwrap().starts_with("cancelled by"),
        "{view}"
    );
    assert!(view.get("failed_step").is_none(), "{view}");
    assert_eq!(view["steps"][1]["state"], "REVOKED");
    assert_eq!(fleet.runs_of(&format!("{id}:1")), 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_starts_shows_and_refuses_a_workflow_as_the_api_does() {
    use std::io::Write;
    use std::process::Stdio;

    let env = TestEnv::new().await;
    env.init_db().await;
    let worker = env.spawn_worker(4);
    let run = |args: &[&str], input: &str| {
        let mut child = env
            .kobe_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let chain = json!({"workflow": {"chain": [
        {"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}},
        {"task_name": "demo_long_io", "kwargs": {"duration_ms": 1}},
    ]}});
    let started = run(&["workflow", "start", "-"], &chain.to_string());
    assert!(started.status.success(), "{started:?}");
    let answer: Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = answer["workflow_id"].as_str().unwrap().to_owned();
    let view = common::eventually(Duration::from_secs(30), "the workflow ends", || async {
        let shown = run(&["workflow", "show", &id], "");
        let view: Value = serde_json::from_slice(&shown.stdout).ok()?;
        (view["state"] == "SUCCESS").then_some(view)
    })
    .await;
    assert_eq!(view["steps"].as_array().unwrap().len(), 2, "{view}");

    let bad =
        json!({"workflow": {"chain": [{"task_name": "demo_long_io"}, {"task_name": "nope"}]}});
    let refused = run(&["workflow", "start", "-"], &bad.to_string());
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("workflow.chain[1].task_name"),
        "{refused:?}"
    );
    let missing = run(&["workflow", "show", "wf-none"], "");
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_draws_the_workflow_with_each_step_in_its_state_and_the_overview_lists_it() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1]},
            {"group": [
                {"task_name": "wf_add", "args": [2]},
                {"task_name": "wf_add", "kwargs": {"fail": true}},
            ]},
            {"task_name": "wf_add"},
        ]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "FAILURE", "{view}");
    // Its siblings finish: the member that did not fail succeeds.
    common::eventually(Duration::from_secs(20), "the sibling finishes", || async {
        (fleet.show(&id).await["steps"][1]["state"] == "SUCCESS").then_some(())
    })
    .await;
    let url = format!("{}/ui/workflow/{id}", fleet.api.address);
    let dom = crate::ui::rendered(url.clone()).await;
    assert!(dom.contains("<svg id=\"graph\""), "{dom}");
    let steps = step_ids(&view);
    let states = ["SUCCESS", "SUCCESS", "FAILURE", "REVOKED"];
    for (step, state) in steps.iter().zip(states) {
        assert!(
            dom.contains(&format!(
                "href=\"/ui/task/{step}\" data-step=\"{step}\" data-state=\"{state}\""
            )),
            "{step} drawn {state}: {dom}"
        );
    }
    // One arrow per wait: the two members after the first step, the callback after both.
    assert_eq!(dom.matches("<line ").count(), 4, "{dom}");
    assert!(dom.contains("asked to fail"), "the reason is shown: {dom}");
    let picture = crate::ui::screenshot(&url, "workflow").await;
    assert!(
        std::fs::metadata(&picture).unwrap().len() > 1000,
        "{picture:?}"
    );
    eprintln!("screenshot: {}", picture.display());
    let overview = crate::ui::rendered(format!("{}/ui", fleet.api.address)).await;
    assert!(
        overview.contains(&format!("data-workflow=\"{id}\"")),
        "{overview}"
    );
    fleet.stop().await;
}

/// A signature as a Celery client freezes it into a message (`add.s(3)` with its id).
fn celery_signature(task: &str, args: Value, id: &str) -> Value {
    json!({"task": task, "args": args, "kwargs": {}, "options": {"task_id": id},
           "subtask_type": null, "immutable": false, "chord_size": null})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_clients_chain_and_link_run_on_kobe_workers_once_with_the_results_passed_on() {
    let fleet = fleet().await;
    let publisher = fleet.env.publisher();
    let id = |name: &str| format!("{name}-{}", uuid::Uuid::new_v4());
    let (a, b, c, link) = (id("a"), id("b"), id("c"), id("link"));
    // chain(wf_add.s(1, 2), wf_add.s(3), wf_add.s(4)).apply_async(link=...) as Celery sends
    // it: the first task's body carries the rest of the chain, reversed, and the link.
    let mut first = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::parse(&a).unwrap(),
        "wf_add",
        vec![json!(1), json!(2)],
        Default::default(),
    );
    first.embed = Some(json!({
        "callbacks": [celery_signature("wf_add", json!([100]), &link)],
        "errbacks": null,
        "chain": [
            celery_signature("wf_add", json!([4]), &c),
            celery_signature("wf_add", json!([3]), &b),
        ],
        "chord": null,
    }));
    fleet.env.publish_message(&publisher, &first).await;
    let last = fleet.env.wait_final(&c, Duration::from_secs(30)).await;
    assert_eq!(last.result, Some(json!(10)), "1+2, then +3, then +4");
    let linked = fleet.env.wait_final(&link, Duration::from_secs(30)).await;
    assert_eq!(
        linked.result,
        Some(json!(103)),
        "the link gets the first result"
    );
    // The same message again (a redelivery): nothing runs twice.
    fleet.env.publish_message(&publisher, &first).await;
    common::eventually(Duration::from_secs(10), "the copy is acked", || async {
        (common::metric("kobe_duplicate_deliveries_total{reason=\"finished\"}") >= 1.0)
            .then_some(())
    })
    .await;
    for task in [&a, &b, &c, &link] {
        assert_eq!(fleet.runs_of(task), 1, "{task} ran once");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_reopens_a_workflow_whose_other_steps_ended_meanwhile_and_it_ends_by_them() {
    let fleet = fleet().await;
    // A fails; B succeeds after the workflow failed. Rerunning A ends it SUCCESS (B's success
    // was counted while the workflow was FAILURE).
    let id = fleet
        .started(json!({"workflow": {"group": [
            {"task_name": "wf_add", "args": [1], "kwargs": {"fail_once": true}},
            {"task_name": "wf_add", "args": [2], "kwargs": {"sleep_ms": 1500}},
        ]}}))
        .await;
    let (a, b) = (format!("{id}:0"), format!("{id}:1"));
    assert_eq!(fleet.ended(&id).await["state"], "FAILURE");
    assert_eq!(fleet.step_final(&b).await, "SUCCESS");
    fleet.rerun(&a).await;
    common::eventually(Duration::from_secs(30), "the workflow succeeds", || async {
        (fleet.show(&id).await["state"] == "SUCCESS").then_some(())
    })
    .await;
    assert_eq!((fleet.runs_of(&a), fleet.runs_of(&b)), (2, 1));

    // Both fail: rerunning A fails the workflow again at once for B (its on_failure runs for
    // that failure too), and rerunning B then ends it.
    let id = fleet
        .started(json!({
            "workflow": {"group": [
                {"task_name": "wf_add", "args": [1], "kwargs": {"fail_once": true}},
                {"task_name": "wf_add", "args": [2], "kwargs": {"fail_once": true, "sleep_ms": 500}},
            ]},
            "on_failure": {"task_name": "wf_add", "args": [7]},
        }))
        .await;
    let (a, b) = (format!("{id}:0"), format!("{id}:1"));
    assert_eq!(fleet.step_final(&b).await, "FAILURE");
    assert_eq!(fleet.ended(&id).await["failed_step"], a.as_str());
    fleet.rerun(&a).await;
    common::eventually(Duration::from_secs(30), "failed again for B", || async {
        let view = fleet.show(&id).await;
        (view["state"] == "FAILURE" && view["failed_step"] == b.as_str()).then_some(())
    })
    .await;
    assert_eq!(fleet.step_final(&a).await, "SUCCESS");
    fleet.rerun(&b).await;
    common::eventually(Duration::from_secs(30), "the workflow succeeds", || async {
        (fleet.show(&id).await["state"] == "SUCCESS").then_some(())
    })
    .await;
    let (first, second) = (format!("{id}:on_failure"), format!("{id}:on_failure:1"));
    common::eventually(
        Duration::from_secs(20),
        "on_failure ran per failure",
        || async { (fleet.runs_of(&first) == 1 && fleet.runs_of(&second) == 1).then_some(()) },
    )
    .await;
    assert_eq!((fleet.runs_of(&a), fleet.runs_of(&b)), (2, 2));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_can_never_be_submitted_fails_its_workflow_instead_of_cycling() {
    let fleet = fleet().await;
    // Two members of 9 MB each: the callback's arguments (18 MB) are more than any MongoDB
    // document may hold, now or later.
    let nine_mb = 9 * 1024 * 1024;
    let id = fleet
        .started(json!({
            "workflow": {"chain": [
                {"group": [
                    {"task_name": "wf_add", "kwargs": {"bytes": nine_mb}},
                    {"task_name": "wf_add", "kwargs": {"bytes": nine_mb}},
                ]},
                {"task_name": "wf_add"},
            ]},
            "on_failure": {"task_name": "wf_add", "args": [7]},
        }))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "FAILURE", "{view}");
    let callback = format!("{id}:2");
    assert_eq!(view["failed_step"], callback.as_str());
    assert!(
        view["reason"]
            .as_str()
            .unwrap()
            .contains("cannot be submitted"),
        "{view}"
    );
    // The members' deliveries were acked once: each ran once and none is delivered again.
    fleet
        .env
        .wait_queue_empty("default", "nothing handed back")
        .await;
    for member in [format!("{id}:0"), format!("{id}:1")] {
        let task = fleet.env.tasks().get(&member).await.unwrap().unwrap();
        assert_eq!((fleet.runs_of(&member), task.deliveries), (1, 1));
    }
    assert_eq!(fleet.runs_of(&callback), 0);
    let on_failure = format!("{id}:on_failure");
    common::eventually(Duration::from_secs(20), "on_failure ran", || async {
        (fleet.runs_of(&on_failure) == 1).then_some(())
    })
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_handed_on_after_its_workflow_was_cancelled_never_runs() {
    let fleet = fleet().await;
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1], "kwargs": {"sleep_ms": 2000}},
            {"task_name": "wf_add", "args": [2]},
        ]}}))
        .await;
    let (first, second) = (format!("{id}:0"), format!("{id}:1"));
    fleet
        .api
        .wait_for_state(&first, Duration::from_secs(20), |b| b["state"] == "STARTED")
        .await;
    let cancelled = fleet
        .api
        .client
        .post(format!("{}/workflow/{id}/cancel", fleet.api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    // A hand-on that checked the workflow just before the cancel submits the next step now.
    let submitter = fleet.env.submitter();
    let mut late = kobe::submit::NewTask::new(
        kobe::domain::TaskId::parse(&second).unwrap(),
        "wf_add",
        "default",
    );
    late.workflow_id = Some(id.clone());
    late.args = vec![json!(1), json!(2)];
    submitter.submit_child(late).await.unwrap();
    assert_eq!(fleet.step_final(&second).await, "REVOKED");
    assert_eq!(fleet.runs_of(&second), 0);
    assert_eq!(fleet.show(&id).await["state"], "REVOKED");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_answered_503_runs_nothing_and_the_same_start_again_resumes_it() {
    let rabbit = common::PrivateRabbit::start();
    let env = TestEnv::with(&[
        ("RABBITMQ_URL", &rabbit.url()),
        ("KOBE_PUBLISH_TIMEOUT_MS", "800"),
    ])
    .await;
    let fleet = fleet_on(env).await;
    let body = json!({
        "workflow": {"chain": [{"task_name": "wf_add", "args": [1]}, {"task_name": "wf_add", "args": [2]}]},
        "on_failure": {"task_name": "wf_add", "args": [7]},
    });
    let start = || {
        fleet
            .api
            .client
            .post(format!("{}/workflow/start", fleet.api.address))
            .header("Idempotency-Key", "resume-me")
            .json(&body)
            .send()
    };
    // The broker takes no publish: the first step is not confirmed.
    rabbit.memory_alarm(true);
    let refused = start().await.unwrap();
    assert_eq!(refused.status(), 503, "{:?}", refused.text().await);
    rabbit.memory_alarm(false);
    // Nothing of it ran, its on_failure included: the start sent again runs it to its end.
    let accepted = start().await.unwrap();
    assert_eq!(accepted.status(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    let id = accepted["workflow_id"].as_str().unwrap().to_owned();
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    assert_eq!(fleet.result(&format!("{id}:1")).await, json!(3));
    assert_eq!(fleet.runs_of(&format!("{id}:0")), 1);
    assert_eq!(fleet.runs_of(&format!("{id}:on_failure")), 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_links_queue_is_honoured_and_a_link_that_can_never_be_submitted_does_not_cycle() {
    let common::Running {
        env,
        api: _api,
        worker,
    } = TestEnv::with_worker(&[("KOBE_TASK_ROUTES", "demo_long_io=io")], 4).await;
    let publisher = env.publisher();
    let id = |name: &str| format!("{name}-{}", uuid::Uuid::new_v4());
    let (first, link) = (id("first"), id("link"));
    let signature = |id: &str, options: Value| {
        let mut options = options;
        options["task_id"] = json!(id);
        json!({"task": "demo_long_io", "args": [], "kwargs": {"duration_ms": 1},
               "options": options, "subtask_type": null, "immutable": true, "chord_size": null})
    };
    // Its link names the default queue, not the task's configured route.
    let mut message = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::parse(&first).unwrap(),
        "demo_long_io",
        vec![],
        json!({"duration_ms": 1}).as_object().cloned().unwrap(),
    );
    message.embed = Some(json!({
        "callbacks": [signature(&link, json!({"queue": env.topology.queue("default")}))],
        "errbacks": null, "chain": null, "chord": null,
    }));
    env.publish_message(&publisher, &message).await;
    let linked = env.wait_final(&link, Duration::from_secs(30)).await;
    assert_eq!(linked.route, "default", "{linked:?}");

    // A link whose id is over the bound can never be submitted: the finished delivery is acked
    // once, not handed back for ever.
    let doomed = id("doomed");
    let mut message = kobe::amqp::TaskMessage::new(
        kobe::domain::TaskId::parse(&doomed).unwrap(),
        "demo_long_io",
        vec![],
        json!({"duration_ms": 1}).as_object().cloned().unwrap(),
    );
    message.embed = Some(json!({
        "callbacks": [signature(&"b".repeat(130), json!({}))],
        "errbacks": null, "chain": null, "chord": null,
    }));
    env.publish_message(&publisher, &message).await;
    let task = env.wait_final(&doomed, Duration::from_secs(30)).await;
    assert_eq!(task.state, kobe::domain::TaskState::Success);
    env.wait_queue_empty("io", "the delivery settled").await;
    // Handed back, it would come again within the outage pause (1–15 s) as a duplicate of a
    // finished task, and again after that.
    let again = "kobe_duplicate_deliveries_total{reason=\"finished\"}";
    let before = common::metric(again);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        common::metric(again),
        before,
        "the finished delivery came back"
    );
    assert_eq!(
        env.tasks().get(&doomed).await.unwrap().unwrap().deliveries,
        1
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_steps_countdown_and_expiry_count_from_when_it_is_submitted() {
    let fleet = fleet().await;
    // The second step waits 1 s after the first ends, and is not expired for the first's 1.5 s.
    let id = fleet
        .started(json!({"workflow": {"chain": [
            {"task_name": "wf_add", "args": [1], "kwargs": {"sleep_ms": 1500}},
            {"task_name": "wf_add", "args": [2], "countdown": 1, "expires": 1.2},
        ]}}))
        .await;
    let view = fleet.ended(&id).await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    let tasks = fleet.env.tasks();
    let first = tasks.get(&format!("{id}:0")).await.unwrap().unwrap();
    let second = tasks.get(&format!("{id}:1")).await.unwrap().unwrap();
    let waited = second.started_at.unwrap().timestamp_millis()
        - first.finished_at.unwrap().timestamp_millis();
    assert!(
        waited >= 1_000,
        "the second step started {waited} ms after the first ended"
    );
    fleet.stop().await;
}
