//! Mixed fleets with Celery, against a real Celery 5 from PyPI (the venv `scripts/test.sh` makes,
//! at `$KOBE_CELERY_VENV`, default `~/.cache/kobe/celery-venv`): a Python client's
//! `AsyncResult.get()` returns what a Kobe worker's task returned, and its failure's traceback.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestEnv;
use kobe::tasks::{Invocation, Task, TaskError, TaskFuture};
use serde_json::{json, Value};

/// Where Celery's results go in these tests: a Redis database of their own.
const RESULTS: &str = "redis://127.0.0.1:6379/3";

/// The venv holding Celery 5 (and Flower), made by `scripts/test.sh`.
pub fn celery_venv() -> PathBuf {
    let venv = std::env::var_os("KOBE_CELERY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kobe/celery-venv")
        });
    assert!(
        venv.join("bin/celery").exists(),
        "no Celery venv at {} (scripts/test.sh makes it; or set KOBE_CELERY_VENV)",
        venv.display()
    );
    venv
}

/// Runs `tests/celery/peer.py` with the test's names; its one JSON line.
fn peer(env: &TestEnv, args: &[&str]) -> Value {
    let output = Command::new(celery_venv().join("bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/celery/peer.py"))
        .args(args)
        .env("RABBITMQ_URL", env.settings.broker.url.expose())
        .env("KOBE_AMQP_PREFIX", &env.settings.broker.prefix)
        .env("KOBE_CELERY_RESULTS", RESULTS)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "peer.py {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("peer.py printed {stdout:?}: {e}"))
}

/// `py_add`: the sum of its arguments; fails for good when one is `"boom"`. Counts its runs.
struct Add {
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

impl Task for Add {
    fn name(&self) -> &'static str {
        "py_add"
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(invocation.task_id.to_string())
            .or_default() += 1;
        Box::pin(async move {
            if invocation.args.contains(&json!("boom")) {
                return Err(TaskError::Permanent("ValueError: boom".into()));
            }
            Ok(json!(invocation.args.iter().filter_map(Value::as_i64).sum::<i64>()))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_clients_async_result_gets_a_kobe_workers_result_and_its_failures_traceback() {
    let env = TestEnv::with(&[("KOBE_CELERY_RESULTS", RESULTS)]).await;
    env.init_db().await;
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = kobe::tasks::Registry::with_builtin_tasks();
    registry.register(Add { runs: runs.clone() }).unwrap();
    let api = env.spawn_api_with(registry).await;
    let worker = env.worker_with(8, Add { runs: runs.clone() });

    // From a Celery client: send_task, then AsyncResult.get().
    let sent = tokio::task::block_in_place(|| peer(&env, &["call", "py_add", "[1, 2, 39]"]));
    assert_eq!(sent["state"], "SUCCESS", "{sent}");
    assert_eq!(sent["result"], 42, "{sent}");
    assert_eq!(sent["ready"], true);
    assert_eq!(sent["name"], "py_add", "result_extended fields: {sent}");
    assert!(sent["worker"].as_str().unwrap().starts_with("kobe-"), "{sent}");
    let id = sent["task_id"].as_str().unwrap().to_owned();
    assert_eq!(
        env.wait_final(&id, Duration::from_secs(10)).await.result,
        Some(json!(42)),
        "Kobe's own record agrees"
    );

    // A failure: get() raises, and the traceback names the cause.
    let failed = tokio::task::block_in_place(|| peer(&env, &["call", "py_add", "[1, \"boom\"]"]));
    assert_eq!(failed["state"], "FAILURE", "{failed}");
    assert_eq!(failed["error"], "Exception", "{failed}");
    assert_eq!(failed["message"], "ValueError: boom", "{failed}");
    assert!(
        failed["traceback"].as_str().unwrap().contains("ValueError: boom"),
        "{failed}"
    );

    // Submitted through Kobe's API, read from Python by its id.
    let id = api
        .submit(json!({"task_name": "py_add", "args": [20, 22]}))
        .await;
    let read = tokio::task::block_in_place(|| peer(&env, &["get", &id]));
    assert_eq!(read["state"], "SUCCESS", "{read}");
    assert_eq!(read["result"], 42, "{read}");
    assert_eq!(
        api.status(&id).await.json::<Value>().await.unwrap()["state"],
        "SUCCESS",
        "Kobe's status route is unchanged"
    );
    for (task, count) in runs.lock().unwrap().iter() {
        assert_eq!(*count, 1, "{task} ran once");
    }
    assert_eq!(runs.lock().unwrap().len(), 3);
    worker.stop().await;
    api.stop().await;
}
