//! Tasks declared in a file, run by a real worker against a real HTTP receiver this test starts
//! and against real child processes: what each answer or exit status makes of the task, how many
//! times each ran, and what the receiver and the program were given.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use common::TestEnv;
use kobe::amqp::TaskMessage;
use kobe::domain::{TaskId, TaskState};
use kobe::tasks::declared;
use kobe::tasks::Registry;
use serde_json::{json, Value};

const SECRET: &str = "a-test-signing-secret";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    body: Value,
    signed: bool,
    idempotency_key: Option<String>,
    traceparent: Option<String>,
}

/// Calls by path.
type Calls = Arc<Mutex<HashMap<String, Vec<Call>>>>;

/// A receiver on a free port whose paths answer as their names say; it records every call.
struct Receiver {
    base: String,
    calls: Calls,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    async fn start() -> Self {
        let calls: Calls = Arc::default();
        let recorded = calls.clone();
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(web::Data::new(recorded.clone()))
                .default_service(web::to(answer))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .expect("bind the receiver");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base: format!("http://127.0.0.1:{port}"),
            calls,
            handle,
        }
    }

    fn calls(&self, path: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

async fn answer(request: HttpRequest, body: web::Bytes, calls: web::Data<Calls>) -> HttpResponse {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    // The receiver's side of the signature: recompute it over the time sent and the bytes
    // received, and refuse a stale time (a replay).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let timestamp: Option<u64> = header("x-kobe-timestamp").and_then(|t| t.parse().ok());
    let signed = timestamp.is_some_and(|t| {
        now.abs_diff(t) <= 300
            && header("x-kobe-signature").as_deref()
                == Some(declared::http::signature(SECRET.as_bytes(), t, &body).as_str())
    });
    let path = request.path().to_owned();
    let nth = {
        let mut calls = calls.lock().unwrap();
        let list = calls.entry(path.clone()).or_default();
        list.push(Call {
            at: Instant::now(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            signed,
            idempotency_key: header("idempotency-key"),
            traceparent: header("traceparent"),
        });
        list.len()
    };
    match (path.as_str(), nth) {
        ("/ok", _) => HttpResponse::Ok().json(json!({"size": 42})),
        ("/flaky", 1) => HttpResponse::InternalServerError().body("warming up"),
        ("/flaky", _) => HttpResponse::Ok().body("done"),
        ("/bad", _) => HttpResponse::BadRequest().body("no such recipient"),
        ("/later", 1) => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "2"))
            .body("slow down"),
        ("/later", _) => HttpResponse::Ok().json(json!("at last")),
        // Points elsewhere: to a probe of this receiver, or to the origin a query names.
        ("/redirect", _) => {
            let to = request
                .query_string()
                .strip_prefix("to=")
                .map(|to| {
                    percent_encoding::percent_decode_str(to)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .unwrap_or_else(|| "/probe".into());
            HttpResponse::Found()
                .insert_header(("Location", to))
                .finish()
        }
        ("/probe", _) => HttpResponse::Ok().json(json!("the probe was reached")),
        ("/slow", _) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            HttpResponse::Ok().finish()
        }
        // Takes 2 s and notes when it ended (under "/exclusive:end").
        ("/exclusive", _) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let ended = Call {
                at: Instant::now(),
                body: Value::Null,
                signed,
                idempotency_key: None,
                traceparent: None,
            };
            calls
                .lock()
                .unwrap()
                .entry("/exclusive:end".into())
                .or_default()
                .push(ended);
            HttpResponse::Ok().json(json!("done"))
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

/// The secret and the variables a test's tasks file may name.
fn lookup(name: &str) -> Option<String> {
    match name {
        "KOBE_TASK_SIGNING_SECRET" => Some(SECRET.to_owned()),
        "KOBE_DECLARED_PASS" => Some("passed-on".to_owned()),
        _ => None,
    }
}

/// Kobe's built-in tasks and those `text` declares.
fn registry(text: &str) -> Registry {
    let mut registry = Registry::with_builtin_tasks();
    for task in declared::parse(text, Path::new("test.toml"), &lookup)
        .expect("a valid file")
        .tasks
    {
        registry.register_shared(task).expect("a new name");
    }
    registry
}

fn message(task: &str, kwargs: Value) -> TaskMessage {
    TaskMessage::new(
        TaskId::generate(),
        task,
        vec![],
        kwargs.as_object().cloned().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tasks_are_signed_and_each_answer_decides_the_outcome() {
    let receiver = Receiver::start().await;
    let base = &receiver.base;
    let knobs = "retry_base_ms = 50\nretry_max_delay_ms = 200";
    let text = format!(
        r#"
[[task]]
name = "http_ok"
kind = "http"
url = "{base}/ok"
{knobs}

[[task]]
name = "http_flaky"
kind = "http"
url = "{base}/flaky"
{knobs}

[[task]]
name = "http_bad"
kind = "http"
url = "{base}/bad"
{knobs}

[[task]]
name = "http_later"
kind = "http"
url = "{base}/later"
{knobs}

[[task]]
name = "http_slow"
kind = "http"
url = "{base}/slow"
time_limit_s = 1
max_retries = 1
{knobs}
"#
    );
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_on(5, Vec::new(), registry(&text));
    let publisher = env.publisher();
    let mut ok = message("http_ok", json!({"to": "ops"}));
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    ok.traceparent = Some(traceparent.into());
    let flaky = message("http_flaky", json!({}));
    let bad = message("http_bad", json!({}));
    let later = message("http_later", json!({}));
    let slow = message("http_slow", json!({}));
    for m in [&ok, &flaky, &bad, &later, &slow] {
        env.publish_message(&publisher, m).await;
    }

    let done = env
        .wait_final(ok.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success);
    assert_eq!(done.result, Some(json!({"size": 42})));
    let calls = receiver.calls("/ok");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].signed,
        "the signature verifies on the receiving side"
    );
    assert_eq!(calls[0].idempotency_key.as_deref(), Some(ok.id.as_str()));
    assert_eq!(calls[0].traceparent.as_deref(), Some(traceparent));
    assert_eq!(calls[0].body["task_id"], ok.id.as_str());
    assert_eq!(calls[0].body["task_name"], "http_ok");
    assert_eq!(calls[0].body["attempt"], 1);
    assert_eq!(calls[0].body["kwargs"], json!({"to": "ops"}));

    let done = env
        .wait_final(flaky.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success);
    assert_eq!(done.result, Some(json!("done")));
    assert_eq!(done.retries, 1);
    let calls = receiver.calls("/flaky");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].body["attempt"], 2);
    assert!(calls.iter().all(|c| c.signed));

    let done = env
        .wait_failure(
            bad.id.as_str(),
            Duration::from_secs(20),
            "no such recipient",
        )
        .await;
    assert!(done.root_cause.unwrap().contains("400"));
    assert_eq!(done.retries, 0, "a 400 is not retried");
    assert_eq!(receiver.calls("/bad").len(), 1);

    let done = env
        .wait_final(later.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success);
    let calls = receiver.calls("/later");
    assert_eq!(calls.len(), 2);
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After: 2 was honoured over a 50 ms backoff: {waited:?}"
    );

    env.wait_failure(
        slow.id.as_str(),
        Duration::from_secs(30),
        "did not answer within",
    )
    .await;
    assert_eq!(
        receiver.calls("/slow").len(),
        2,
        "one attempt and one retry"
    );
    worker.stop().await;
    receiver.handle.stop(false).await;
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_tasks_read_stdin_and_their_exit_status_decides_the_outcome() {
    let dir = std::env::temp_dir().join(common::unique("kobe-declared"));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("sleeper.pid");
    let text = format!(
        r#"
[[task]]
name = "cmd_words"
kind = "command"
argv = ["python3", "-c", "import json, sys; d = json.load(sys.stdin); print(json.dumps({{'words': len(d['kwargs']['text'].split())}}))"]

[[task]]
name = "cmd_env"
kind = "command"
argv = ["env"]
env = ["KOBE_DECLARED_PASS"]

[[task]]
name = "cmd_tempfail"
kind = "command"
argv = ["python3", "-c", "import json, sys; d = json.load(sys.stdin); print('second') if d['attempt'] > 1 else sys.exit(75)"]
retry_base_ms = 50

[[task]]
name = "cmd_fail"
kind = "command"
argv = ["sh", "-c", "echo boom >&2; exit 3"]

[[task]]
name = "cmd_soft"
kind = "command"
argv = ["sh", "-c", "trap 'echo stopped; exit 0' TERM; sleep 20 & wait"]
soft_time_limit_s = 0.5
time_limit_s = 10

[[task]]
name = "cmd_sleeper"
kind = "command"
argv = ["sh", "-c", "sleep 60 & echo $! > {pidfile}; wait"]
time_limit_s = 1
"#,
        pidfile = pidfile.display()
    );
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_on(5, Vec::new(), registry(&text));
    let publisher = env.publisher();
    let words = message("cmd_words", json!({"text": "one two three"}));
    let environment = message("cmd_env", json!({}));
    let tempfail = message("cmd_tempfail", json!({}));
    let fail = message("cmd_fail", json!({}));
    let soft = message("cmd_soft", json!({}));
    let sleeper = message("cmd_sleeper", json!({}));
    for m in [&words, &environment, &tempfail, &fail, &soft, &sleeper] {
        env.publish_message(&publisher, m).await;
    }

    let done = env
        .wait_final(words.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    assert_eq!(done.result, Some(json!({"words": 3})));

    let done = env
        .wait_final(environment.id.as_str(), Duration::from_secs(20))
        .await;
    let printed = done.result.unwrap();
    let names: Vec<&str> = printed
        .as_str()
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    assert!(
        printed
            .as_str()
            .unwrap()
            .contains("KOBE_DECLARED_PASS=passed-on"),
        "{printed}"
    );
    assert!(
        names
            .iter()
            .all(|n| ["PATH", "KOBE_DECLARED_PASS"].contains(n)),
        "nothing of Kobe's environment leaks: {names:?}"
    );

    let done = env
        .wait_final(tempfail.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success);
    assert_eq!(done.result, Some(json!("second")));
    assert_eq!(done.retries, 1, "exit 75 asked for exactly one retry");

    let done = env
        .wait_failure(
            fail.id.as_str(),
            Duration::from_secs(20),
            "exited with 3: boom",
        )
        .await;
    assert_eq!(done.retries, 0);

    let done = env
        .wait_final(soft.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    assert_eq!(
        done.result,
        Some(json!("stopped")),
        "SIGTERM at the soft limit"
    );

    env.wait_failure(sleeper.id.as_str(), Duration::from_secs(20), "time limit")
        .await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    common::eventually(
        Duration::from_secs(10),
        "the sleeper's child killed",
        || async { gone(pid).then_some(()) },
    )
    .await;
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_schema_refuses_bad_kwargs_at_submission_and_the_catalogue_shows_kinds() {
    let text = r#"
[[task]]
name = "notify"
kind = "http"
url = "http://127.0.0.1:9/hooks"
route = "io"
kwargs_schema = { type = "object", required = ["to"], properties = { to = { type = "string" } } }
"#;
    let env = TestEnv::with(&[("KOBE_TASK_ROUTES", "notify=io")]).await;
    env.init_db().await;
    let api = env.spawn_api_with(registry(text)).await;
    let response = api
        .start_task(json!({"task_name": "notify", "kwargs": {"to": 5}}))
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["field"], "kwargs.to", "{body}");

    let tasks: Vec<Value> = api.get("/tasks").await.json().await.unwrap();
    let notify = tasks.iter().find(|t| t["name"] == "notify").unwrap();
    assert_eq!(notify["kind"], "http");
    assert_eq!(notify["route"], "io");
    assert_eq!(notify["kwargs_schema"]["required"], json!(["to"]));
    let demo = tasks.iter().find(|t| t["name"] == "demo_long_io").unwrap();
    assert_eq!(demo["kind"], "rust");
    api.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kobe_tasks_check_names_the_file_line_and_field() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-check"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[task]]\nname = \"wc\"\nkind = \"command\"\nargv = [\"wc\", \"-w\"]\nroute = \"bulk\"\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[task]]\nname = \"wc\"\nkind = \"command\"\nargv = [\"wc\"]\n\n[[task]]\nname = \"hook\"\nkind = \"http\"\n",
    )
    .unwrap();

    let output = env
        .kobe_command(&["tasks", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("wc") && stdout.contains("kind=command") && stdout.contains("bulk"),
        "{stdout}"
    );

    let output = env
        .kobe_command(&["tasks", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:6: task `hook`: url: required", bad.display())),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_kwargs_field_type_is_a_load_error_not_a_silent_pass() {
    let text = "[[task]]\nname = \"t\"\nkind = \"command\"\nargv = [\"true\"]\nkwargs_schema = { type = \"object\", properties = { a = { format = \"email\" } } }\n";
    let err = declared::parse(text, Path::new("t.toml"), &lookup).unwrap_err();
    assert_eq!(err.field, "kwargs_schema");
    assert!(err.reason.contains("format"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kobe_binary_runs_a_declared_task_on_its_own_route_and_refuses_a_bad_file() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-file"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        "[[task]]\nname = \"shout\"\nkind = \"command\"\nroute = \"loud\"\nargv = [\"python3\", \"-c\", \"import json, sys; print(json.dumps(json.load(sys.stdin)['kwargs']['word'].upper()))\"]\n",
    )
    .unwrap();
    let file_var = file.to_str().unwrap().to_owned();
    let port = common::free_port();
    let spawn = |args: &[&str]| {
        env.kobe_command(args)
            .env("KOBE_TASKS_FILE", &file_var)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(common::Process::new)
            .unwrap()
    };
    let serve = spawn(&["serve", "--addr", &format!("127.0.0.1:{port}")]);
    let worker = spawn(&["worker", "--concurrency", "2"]);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&client, &base).await;
    let response = client
        .post(format!("{base}/task/start"))
        .json(&json!({"task_name": "shout", "kwargs": {"word": "hey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = env.wait_final(&id, Duration::from_secs(30)).await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    assert_eq!(done.result, Some(json!("HEY")));
    assert_eq!(
        done.route, "loud",
        "the file's route, since KOBE_TASK_ROUTES names none"
    );
    worker.stop();
    serve.stop();
    // The route the file added is not in the test's own topology: remove its queue here.
    let with_route = kobe::amqp::Topology::new(
        &env.settings.broker.prefix,
        env.settings.broker.queue_kind,
        [("shout".to_owned(), "loud".to_owned())].into(),
    );
    kobe::amqp::delete_topology(&env.settings.broker.url, &with_route).unwrap();

    std::fs::write(&file, "[[task]]\nname = \"shout\"\nkind = \"command\"\n").unwrap();
    let output = env
        .kobe_command(&["worker"])
        .env("KOBE_TASKS_FILE", &file_var)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{file_var}:1: task `shout`: argv: required")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_task_stays_where_it_was_declared() {
    let receiver = Receiver::start().await;
    // Another origin (another port), such as a local admin port or a metadata service.
    let elsewhere = Receiver::start().await;
    let base = &receiver.base;
    let other = format!("{}/probe", elsewhere.base);
    let encoded: String =
        percent_encoding::utf8_percent_encode(&other, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let text = format!(
        r#"
[[task]]
name = "http_redirected"
kind = "http"
url = "{base}/redirect"

[[task]]
name = "http_same_origin"
kind = "http"
url = "{base}/redirect"
follow_redirects = "same-origin"

[[task]]
name = "http_away"
kind = "http"
url = "{base}/redirect?to={encoded}"
follow_redirects = "same-origin"
"#
    );
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_on(3, Vec::new(), registry(&text));
    let publisher = env.publisher();
    let redirected = message("http_redirected", json!({}));
    let same_origin = message("http_same_origin", json!({}));
    let away = message("http_away", json!({}));
    for m in [&redirected, &same_origin, &away] {
        env.publish_message(&publisher, m).await;
    }
    // Not followed by default: a failure that says where it pointed.
    let done = env
        .wait_final(redirected.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Failure);
    let cause = done.root_cause.unwrap();
    assert!(
        cause.contains("302") && cause.contains("not followed"),
        "{cause}"
    );
    // Opted in: followed to its own origin only.
    let done = env
        .wait_final(same_origin.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Success, "{done:?}");
    assert_eq!(receiver.calls("/probe").len(), 1);
    let done = env
        .wait_final(away.id.as_str(), Duration::from_secs(20))
        .await;
    assert_eq!(done.state, TaskState::Failure);
    assert!(
        elsewhere.calls("/probe").is_empty(),
        "the other origin was called"
    );
    // The signed headers never went to the other origin either.
    assert_eq!(receiver.calls("/redirect").len(), 3);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_a_running_http_task_never_calls_its_receiver_beside_it() {
    let receiver = Receiver::start().await;
    let text = format!(
        "[[task]]\nname = \"exclusive\"\nkind = \"http\"\nurl = \"{}/exclusive\"\n",
        receiver.base
    );
    let env = TestEnv::new().await;
    let worker = env.spawn_worker_on(10, Vec::new(), registry(&text));
    let publisher = env.publisher();
    let first = message("exclusive", json!({}));
    env.publish_message(&publisher, &first).await;
    common::eventually(Duration::from_secs(20), "the receiver called", || async {
        (!receiver.calls("/exclusive").is_empty()).then_some(())
    })
    .await;
    // The same task published again while its first copy runs (a client re-sending its id, an
    // outbox re-send after a lost confirm), twice over.
    env.publish_message(&publisher, &first).await;
    env.publish_message(&publisher, &first).await;
    let task = env
        .wait_final(first.id.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    env.wait_queue_empty("default", "every copy settled").await;
    assert_eq!(
        receiver.calls("/exclusive").len(),
        1,
        "a duplicate called the receiver"
    );
    worker.stop().await;
    receiver.handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_the_receiver_is_called_again_only_once_the_first_worker_is_gone() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-exclusive"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        format!(
            "[[task]]\nname = \"exclusive\"\nkind = \"http\"\nurl = \"{}/exclusive\"\n",
            receiver.base
        ),
    )
    .unwrap();
    let spawn = || {
        env.kobe_command(&["worker"])
            .env("KOBE_TASKS_FILE", &file)
            .env("KOBE_TASK_SIGNING_SECRET", SECRET)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(common::Process::new)
            .unwrap()
    };
    let doomed = spawn();
    let publisher = env.publisher();
    let first = message("exclusive", json!({}));
    env.publish_message(&publisher, &first).await;
    common::eventually(Duration::from_secs(30), "the receiver called", || async {
        (!receiver.calls("/exclusive").is_empty()).then_some(())
    })
    .await;
    let replacement = spawn();
    // A duplicate waits for the replacement too.
    env.publish_message(&publisher, &first).await;
    doomed.kill();
    let killed_at = Instant::now();
    let task = env
        .wait_final(first.id.as_str(), Duration::from_secs(60))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    env.wait_queue_empty("default", "every copy settled").await;
    let calls = receiver.calls("/exclusive");
    assert_eq!(calls.len(), 2, "{calls:?}");
    // The second call began only after the worker making the first was gone.
    assert!(
        calls[0].at < killed_at && calls[1].at >= killed_at,
        "{calls:?}"
    );
    replacement.stop();
    receiver.handle.stop(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_dies_with_a_worker_killed_by_sigkill_and_runs_once_at_a_time() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-orphan"));
    std::fs::create_dir_all(&dir).unwrap();
    let ran = dir.join("ran.txt");
    // A sleep no other process on the machine has, so the test can find its own.
    let marker = format!("{}.{}", 8, std::process::id());
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        format!(
            "[[task]]\nname = \"slow\"\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"echo start >> {ran}; sleep {marker}; echo end >> {ran}\"]\n\n\
             [[task]]\nname = \"quick\"\nkind = \"command\"\nargv = [\"sh\", \"-c\", \"echo quick >> {ran}\"]\n",
            ran = ran.display()
        ),
    )
    .unwrap();
    let spawn = || {
        env.kobe_command(&["worker"])
            .env("KOBE_TASKS_FILE", &file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(common::Process::new)
            .unwrap()
    };
    let lines = || {
        std::fs::read_to_string(&ran)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let doomed = spawn();
    let publisher = env.publisher();
    let slow = message("slow", json!({}));
    env.publish_message(&publisher, &slow).await;
    common::eventually(Duration::from_secs(30), "the command started", || async {
        (lines() == ["start"] && !processes_with(&marker).is_empty()).then_some(())
    })
    .await;
    doomed.kill();
    // Its whole group goes with it: the shell and its sleep.
    common::eventually(Duration::from_secs(5), "no orphan left", || async {
        processes_with(&marker).is_empty().then_some(())
    })
    .await;
    // The next worker takes the attempt over once its lease lapses and runs it alone, to its
    // end; a command that finishes by itself leaves no watchdog behind either.
    let replacement = spawn();
    let task = env
        .wait_final(slow.id.as_str(), Duration::from_secs(90))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(lines(), ["start", "start", "end"]);
    let quick = message("quick", json!({}));
    env.publish_message(&publisher, &quick).await;
    let task = env
        .wait_final(quick.id.as_str(), Duration::from_secs(30))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    common::eventually(
        Duration::from_secs(5),
        "no process of the task left",
        || async { processes_with(&marker).is_empty().then_some(()) },
    )
    .await;
    replacement.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_task_goes_straight_to_its_address_whatever_proxy_the_environment_names() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-no-proxy"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        format!(
            "[[task]]\nname = \"direct\"\nkind = \"http\"\nurl = \"{}/ok\"\n",
            receiver.base
        ),
    )
    .unwrap();
    // A proxy would resolve names itself, past the check of every address: none is used, even
    // one the environment names (here one that answers nothing).
    let worker = env
        .kobe_command(&["worker"])
        .env("KOBE_TASKS_FILE", &file)
        .env("KOBE_TASK_SIGNING_SECRET", SECRET)
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("http_proxy", "http://127.0.0.1:9")
        .env("ALL_PROXY", "http://127.0.0.1:9")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(common::Process::new)
        .unwrap();
    let message = message("direct", json!({}));
    env.publish_message(&env.publisher(), &message).await;
    let task = env
        .wait_final(message.id.as_str(), Duration::from_secs(60))
        .await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(receiver.calls("/ok").len(), 1);
    worker.stop();
    receiver.handle.stop(false).await;
    let _ = std::fs::remove_dir_all(&dir);
}
