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
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kobe/celery-venv")
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
            Ok(json!(invocation
                .args
                .iter()
                .filter_map(Value::as_i64)
                .sum::<i64>()))
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
    assert!(
        sent["worker"].as_str().unwrap().starts_with("kobe-"),
        "{sent}"
    );
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
        failed["traceback"]
            .as_str()
            .unwrap()
            .contains("ValueError: boom"),
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

/// A Python Celery worker (`celery worker -E`) on the test's `py` queue, stopped on drop.
struct PythonWorker {
    child: std::process::Child,
    dir: PathBuf,
    runs: PathBuf,
}

impl PythonWorker {
    fn start(env: &TestEnv) -> Self {
        let dir = std::env::temp_dir().join(common::unique("kobe-celery-worker"));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = dir.join("runs");
        std::fs::write(&runs, "").unwrap();
        let log = std::fs::File::create(dir.join("worker.log")).unwrap();
        let child = Command::new(celery_venv().join("bin/celery"))
            .args([
                "-A",
                "worker",
                "worker",
                "-E",
                "--pool",
                "solo",
                "--without-mingle",
            ])
            .args(["--without-gossip", "--loglevel", "INFO", "-n"])
            .arg(format!("py-{}@%h", std::process::id()))
            .args(["-Q", &format!("{}.py", env.settings.broker.prefix)])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/celery"))
            .env("RABBITMQ_URL", env.settings.broker.url.expose())
            .env("KOBE_AMQP_PREFIX", &env.settings.broker.prefix)
            .env("KOBE_CELERY_RESULTS", RESULTS)
            .env("PEER_RUNS", &runs)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("celery worker starts");
        Self { child, dir, runs }
    }

    fn runs_of(&self, id: &str) -> usize {
        std::fs::read_to_string(&self.runs)
            .unwrap()
            .lines()
            .filter(|line| *line == id)
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        common::signal(self.child.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const TASKS_FILE: &str = r#"
[[task]]
name = "py_mul"
kind = "celery"
route = "py"

[[task]]
name = "py_fail"
kind = "celery"
route = "py"
max_retries = 0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_kobe_routes_to_python_workers_get_their_outcomes_from_celerys_events() {
    let env = TestEnv::with(&[
        ("KOBE_CELERY_RESULTS", RESULTS),
        ("KOBE_TASK_ROUTES", "py_mul=py,py_fail=py"),
        ("KOBE_RESULT_BACKEND", "redis"),
    ])
    .await;
    env.init_db().await;
    let file = std::env::temp_dir().join(format!("{}.toml", common::unique("kobe-celery-tasks")));
    std::fs::write(&file, TASKS_FILE).unwrap();
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = kobe::tasks::Registry::with_builtin_tasks();
    registry.register(Add { runs: runs.clone() }).unwrap();
    for task in kobe::tasks::declared::load(&file, &|_| None).unwrap().tasks {
        registry.register_shared(task).unwrap();
    }
    std::fs::remove_file(&file).unwrap();
    let api = env.spawn_api_with(registry.clone()).await;
    let state = kobe::commands::serve::state(&env.settings, registry.clone())
        .await
        .unwrap();
    let (stop_tracking, stopped) = tokio::sync::oneshot::channel::<()>();
    let tracking = kobe::commands::serve::spawn_celery_tracking(&env.settings, &state, async {
        let _ = stopped.await;
    })
    .unwrap()
    .expect("celery tasks are declared: their events are tracked");
    // A Kobe worker with the shipped routes runs beside the Python one, and never takes theirs.
    let kobe_worker = env.spawn_worker_on(4, Vec::new(), registry);
    let python = tokio::task::block_in_place(|| PythonWorker::start(&env));

    let product = api
        .submit(json!({"task_name": "py_mul", "args": [6, 7]}))
        .await;
    let failing = api.submit(json!({"task_name": "py_fail"})).await;
    let (done, seen) = api.wait_for_final(&product, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}\n{}", python.log());
    let answer: Value = api
        .get(&format!("/task/result/{product}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["result"],
        json!({"product": 42, "factors": {"6": 7}}),
        "the result as Celery's JSON has it, read from its backend (the event's repr has an int key): {answer}"
    );
    assert!(
        seen.iter()
            .all(|s| ["PENDING", "STARTED", "SUCCESS"].contains(&s.as_str())),
        "{seen:?}"
    );
    let (failed, _) = api.wait_for_final(&failing, Duration::from_secs(60)).await;
    assert_eq!(failed["state"], "FAILURE", "{failed}");
    assert!(
        failed["root_cause"]
            .as_str()
            .unwrap_or_default()
            .contains("no such page"),
        "{failed}"
    );
    let stored = env.wait_final(&product, Duration::from_secs(5)).await;
    assert!(
        stored
            .worker
            .as_deref()
            .unwrap_or_default()
            .starts_with("py-"),
        "the Python worker ran it: {:?}",
        stored.worker
    );
    assert!(stored.started_at.is_some());

    // An event sent twice, or late, changes nothing.
    let publisher = env.publisher();
    for (routing_key, event) in [
        (
            "task.started",
            json!({"type": "task-started", "uuid": product, "hostname": "late@h", "timestamp": 1.0}),
        ),
        (
            "task.succeeded",
            json!({"type": "task-succeeded", "uuid": product, "result": "7", "timestamp": 9e9}),
        ),
        (
            "task.failed",
            json!({"type": "task-failed", "uuid": product, "exception": "late", "timestamp": 9e9}),
        ),
    ] {
        publisher
            .publish(kobe::amqp::Outgoing {
                exchange: "celeryev".into(),
                routing_key: routing_key.into(),
                body: event.to_string().into_bytes(),
                properties: amiquip::AmqpProperties::default()
                    .with_content_type("application/json".into()),
            })
            .await
            .unwrap();
    }
    let events = env
        .topology
        .clone()
        .with_celery_events()
        .celery_events_queue();
    common::eventually(
        Duration::from_secs(10),
        "the late events are taken",
        || async { (env.queue_depth(events.clone()).await? == 0).then_some(()) },
    )
    .await;
    let again = env.wait_final(&product, Duration::from_secs(5)).await;
    assert_eq!(again.state, kobe::domain::TaskState::Success);
    assert_eq!(
        again.result,
        Some(json!({"product": 42, "factors": {"6": 7}}))
    );
    assert_eq!(again.worker, stored.worker);

    // A workflow step Python runs is handed on to the next, which Kobe runs.
    let response = api
        .client
        .post(format!("{}/workflow/start", api.address))
        .json(&json!({"workflow": {"chain": [
            {"task_name": "py_mul", "args": [2, 3]},
            {"task_name": "py_add", "args": [1, 2], "immutable": true},
        ]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let workflow = response.json::<Value>().await.unwrap()["workflow_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = common::eventually(Duration::from_secs(60), "the workflow ends", || async {
        let view: Value = api
            .get(&format!("/workflow/{workflow}"))
            .await
            .json()
            .await
            .ok()?;
        (view["state"] != "PENDING" && view["state"] != "STARTED").then_some(view)
    })
    .await;
    assert_eq!(view["state"], "SUCCESS", "{view}");
    let steps = view["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{view}");
    let first = steps[0]["task_id"].as_str().unwrap();
    assert_eq!(
        python.runs_of(first),
        1,
        "the first step ran once, by Python"
    );
    assert_eq!(
        runs.lock()
            .unwrap()
            .get(steps[1]["task_id"].as_str().unwrap()),
        Some(&1),
        "the second ran once, on Kobe"
    );

    assert_eq!(python.runs_of(&product), 1, "ran once, by Python");
    assert_eq!(python.runs_of(&failing), 1, "ran once, by Python");
    drop(python);
    let _ = stop_tracking.send(());
    let _ = tracking.await;
    kobe_worker.stop().await;
    api.stop().await;
    let topology = env.topology.clone().with_celery_events();
    let url = env.settings.broker.url.clone();
    tokio::task::spawn_blocking(move || kobe::amqp::delete_topology(&url, &topology))
        .await
        .unwrap()
        .ok();
}

/// Flower on a free port, watching the test's broker; stopped on drop.
struct Flower {
    child: std::process::Child,
    address: String,
    log: PathBuf,
}

impl Flower {
    fn start(env: &TestEnv) -> Self {
        let port = common::free_port();
        let log = std::env::temp_dir().join(format!("{}.log", common::unique("kobe-flower")));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(celery_venv().join("bin/celery"))
            .arg(format!("--broker={}", env.settings.broker.url.expose()))
            .args(["flower", "--address=127.0.0.1", "--inspect_timeout=3000"])
            // Flower 2 answers its API only to a signed-in user unless told otherwise.
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .arg(format!("--port={port}"))
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("flower starts");
        Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        reqwest::get(format!("{}{path}", self.address))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_lists_a_kobe_worker_and_its_tasks_and_celerys_revoke_cancels_a_running_one() {
    let common::Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_CELERY_EVENTS", "true")], 4).await;
    let flower = Flower::start(&env);
    let me = kobe::config::celery_hostname();
    // Flower hears the worker's heartbeats.
    common::eventually(
        Duration::from_secs(60),
        "Flower sees the Kobe worker alive",
        || async {
            let alive = flower.get("/api/workers?status=true").await?;
            (alive[me] == true).then_some(())
        },
    )
    .await;

    let done = api.submit(common::quick_task(20)).await;
    api.wait_for_final(&done, Duration::from_secs(30)).await;
    let task = common::eventually(Duration::from_secs(30), "Flower lists the task", || async {
        let tasks = flower.get("/api/tasks").await?;
        let task = tasks.get(&done)?.clone();
        (task["state"] == "SUCCESS").then_some(task)
    })
    .await;
    assert_eq!(task["name"], "demo_long_io", "{task}");
    assert_eq!(task["worker"], me, "{task}");

    // Its remote control answers Flower's inspection. Flower answers from what it inspected last
    // and inspects again in the background, so ask until the answer counts the task.
    let workers = common::eventually(
        Duration::from_secs(30),
        "Flower's inspection counts the task",
        || async {
            let workers = flower.get("/api/workers?refresh=1").await?;
            (workers.get(me)?["stats"]["total"]["demo_long_io"] == 1).then_some(workers)
        },
    )
    .await;
    let inspected = &workers[me];
    assert!(
        inspected["registered"]
            .as_array()
            .unwrap()
            .contains(&json!("demo_long_io")),
        "{inspected}\n{}",
        flower.log()
    );
    assert_eq!(
        inspected["stats"]["pool"]["max-concurrency"], 4,
        "{inspected}"
    );

    // `celery control revoke` reaches Kobe's cancel, which stops the running task.
    let long = api.submit(common::quick_task(60_000)).await;
    api.wait_for_state(&long, Duration::from_secs(30), |s| s["state"] == "STARTED")
        .await;
    let revoke = tokio::task::block_in_place(|| {
        Command::new(celery_venv().join("bin/celery"))
            .arg(format!("--broker={}", env.settings.broker.url.expose()))
            .args(["control", "--timeout=5", "revoke", &long])
            .output()
            .unwrap()
    });
    let said = String::from_utf8_lossy(&revoke.stdout);
    assert!(
        revoke.status.success() && said.contains(me),
        "{said}\n{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let (ended, _) = api.wait_for_final(&long, Duration::from_secs(30)).await;
    assert_eq!(ended["state"], "REVOKED", "{ended}");

    // A Celery client's task revoked before any worker received it is not run when it comes,
    // as a Celery worker keeps a revoked id.
    let early = kobe::domain::TaskId::generate();
    let revoke = tokio::task::block_in_place(|| {
        Command::new(celery_venv().join("bin/celery"))
            .arg(format!("--broker={}", env.settings.broker.url.expose()))
            .args(["control", "--timeout=5", "revoke", early.as_str()])
            .output()
            .unwrap()
    });
    assert!(revoke.status.success());
    let closed = common::eventually(Duration::from_secs(10), "the revoked id kept", || async {
        let lease = env.tasks().leases().get(early.as_str(), 0).await.ok()??;
        lease.closed
    })
    .await;
    assert_eq!(closed, kobe::domain::TaskState::Revoked);
    let message = kobe::amqp::TaskMessage::new(
        early.clone(),
        "demo_long_io",
        vec![],
        json!({"duration_ms": 1}).as_object().cloned().unwrap(),
    );
    env.publish_message(&env.publisher(), &message).await;
    let task = env
        .wait_final(early.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(task.state, kobe::domain::TaskState::Revoked, "{task:?}");
    assert!(task.started_at.is_none(), "it never ran: {task:?}");
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_task_whose_events_were_lost_gets_its_outcome_from_the_result_backend() {
    let env = TestEnv::with(&[
        ("KOBE_CELERY_RESULTS", RESULTS),
        ("KOBE_TASK_ROUTES", "py_mul=py,py_fail=py"),
        ("KOBE_CELERY_RECONCILE_AFTER_MS", "500"),
        ("KOBE_RESULT_BACKEND", "redis"),
    ])
    .await;
    env.init_db().await;
    let file = std::env::temp_dir().join(format!("{}.toml", common::unique("kobe-celery-tasks")));
    std::fs::write(&file, TASKS_FILE).unwrap();
    let mut registry = kobe::tasks::Registry::with_builtin_tasks();
    for task in kobe::tasks::declared::load(&file, &|_| None).unwrap().tasks {
        registry.register_shared(task).unwrap();
    }
    std::fs::remove_file(&file).unwrap();
    let api = env.spawn_api_with(registry.clone()).await;
    common::eventually(common::startup_deadline(), "API ready", || async {
        (api.get("/ready").await.status() == 200).then_some(())
    })
    .await;
    let state = kobe::commands::serve::state(&env.settings, registry)
        .await
        .unwrap();
    let (stop_tracking, stopped) = tokio::sync::oneshot::channel::<()>();
    let tracking = kobe::commands::serve::spawn_celery_tracking(&env.settings, &state, async {
        let _ = stopped.await;
    })
    .unwrap()
    .expect("celery tasks are declared: their events are tracked");
    let product = api
        .submit(json!({"task_name": "py_mul", "args": [6, 7]}))
        .await;
    let failing = api.submit(json!({"task_name": "py_fail"})).await;
    // Python runs it: Kobe cannot stop it, and does not say it did.
    let cancel = api
        .client
        .post(format!("{}/task/{product}/cancel", api.address))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 409);
    let problem: Value = cancel.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("celery control revoke"),
        "{problem}"
    );
    // A Python worker ran both and wrote their metas, but no event of theirs ever came.
    use deadpool_redis::redis;
    let redis = redis::Client::open(RESULTS).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let metas = [
        (
            &product,
            json!({"status": "SUCCESS", "result": 42, "task_id": product, "traceback": null}),
        ),
        (
            &failing,
            json!({"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["no such page"]}, "task_id": failing, "traceback": "Traceback …"}),
        ),
    ];
    for (id, meta) in &metas {
        let _: () = redis::cmd("SET")
            .arg(format!("celery-task-meta-{id}"))
            .arg(meta.to_string())
            .arg("EX")
            .arg(600)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let (done, _) = api.wait_for_final(&product, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let answer: Value = api
        .get(&format!("/task/result/{product}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["result"], json!(42), "{answer}");
    let (failed, _) = api.wait_for_final(&failing, Duration::from_secs(30)).await;
    assert_eq!(failed["state"], "FAILURE", "{failed}");
    assert_eq!(
        failed["root_cause"], "ValueError('no such page')",
        "{failed}"
    );
    for (id, _) in &metas {
        let _: () = redis::cmd("DEL")
            .arg(format!("celery-task-meta-{id}"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let _ = stop_tracking.send(());
    let _ = tracking.await;
    api.stop().await;
}
