//! The `kobe` binary as an operator runs it: `init-db`, `healthcheck`, start-up errors.

use crate::common;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::TestEnv;
use futures_util::TryStreamExt;

fn kobe(env: &TestEnv, args: &[&str], overrides: &[(&str, &str)]) -> Output {
    let mut command = env.kobe_command(args);
    command.envs(overrides.iter().copied());
    command
        .env("KOBE_LOG_LEVEL", "warn")
        .output()
        .expect("run kobe")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn index_names(env: &TestEnv) -> Vec<String> {
    let mut names = Vec::new();
    for spec in kobe::store::migrations::specs().unwrap() {
        let cursor = env
            .db
            .collection::<mongodb::bson::Document>(&spec.collection)
            .list_indexes()
            .await
            .unwrap();
        let models: Vec<mongodb::IndexModel> = cursor.try_collect().await.unwrap();
        for model in models {
            let name = model.options.and_then(|o| o.name).unwrap_or_default();
            names.push(format!("{}.{name}", spec.collection));
        }
    }
    names.sort();
    names
}

#[tokio::test]
async fn init_db_creates_every_index_once() {
    let env = TestEnv::with_fresh_database(&[]).await;
    let first = kobe(&env, &["init-db"], &[]);
    assert!(first.status.success(), "{first:?}");
    let after_first = index_names(&env).await;
    for spec in kobe::store::migrations::specs().unwrap() {
        for (name, _) in spec.indexes().unwrap() {
            let full = format!("{}.{name}", spec.collection);
            assert!(
                after_first.contains(&full),
                "{full} missing from {after_first:?}"
            );
            assert!(
                stdout(&first).contains(&format!("created index {full}")),
                "{}",
                stdout(&first)
            );
        }
    }

    let second = kobe(&env, &["init-db"], &[]);
    assert!(second.status.success(), "{second:?}");
    let report = stdout(&second);
    assert!(!report.contains("created index"), "{report}");
    assert!(!report.contains("created collection"), "{report}");
    assert!(report.contains(" 0 created"), "{report}");
    assert_eq!(index_names(&env).await, after_first);
}

/// Whether `collection.index` is of DocumentDB's composite type, as `listIndexes` shows it.
async fn composite_index(env: &TestEnv, collection: &str, index: &str) -> bool {
    use futures_util::TryStreamExt;
    let mut cursor = env
        .db
        .collection::<mongodb::bson::Document>(collection)
        .list_indexes()
        .await
        .unwrap()
        .with_type::<mongodb::bson::Document>();
    while let Some(raw) = cursor.try_next().await.unwrap() {
        if raw.get_str("name") == Ok(index) {
            return raw.contains_key("enableOrderedIndex")
                || raw.contains_key("enableCompositeTerm");
        }
    }
    panic!("{collection}.{index} missing")
}

#[tokio::test]
async fn init_db_makes_composite_indexes_only_on_documentdb_and_says_which() {
    let env = TestEnv::with_fresh_database(&[]).await;
    let documentdb = kobe::store::migrations::is_documentdb(&env.db)
        .await
        .unwrap();
    let made = kobe(&env, &["init-db"], &[]);
    assert!(made.status.success(), "{made:?}");
    let report = stdout(&made);
    if documentdb {
        assert!(
            report.contains("indexes: DocumentDB's composite type"),
            "{report}"
        );
        assert!(
            report.contains("created index Tasks.state_updated_at (composite)"),
            "{report}"
        );
        assert!(composite_index(&env, "Tasks", "state_updated_at").await);
    } else {
        // A MongoDB server is never sent the option.
        assert!(
            report.contains("indexes: the engine's default type"),
            "{report}"
        );
        assert!(!report.contains("(composite)"), "{report}");
    }
    // Asked for the standard type, a fresh database gets it on any engine.
    let standard = TestEnv::with_fresh_database(&[]).await;
    let made = kobe(
        &standard,
        &["init-db"],
        &[("KOBE_MONGODB_INDEX_TYPE", "standard")],
    );
    assert!(made.status.success(), "{made:?}");
    assert!(stdout(&made).contains("indexes: the engine's default type"));
    if documentdb {
        // DocumentDB's server setting may still make it composite; what Kobe sent is the
        // engine's default, and the report says what the index is.
        let is_composite = composite_index(&standard, "Tasks", "state_updated_at").await;
        assert_eq!(
            stdout(&made).contains("created index Tasks.state_updated_at (composite)"),
            is_composite
        );
    }
    let refused = kobe(
        &standard,
        &["init-db"],
        &[("KOBE_MONGODB_INDEX_TYPE", "fast")],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("KOBE_MONGODB_INDEX_TYPE"));
}

#[tokio::test]
async fn healthcheck_passes_when_everything_holds() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let output = kobe(&env, &["healthcheck"], &[]);
    let report = stdout(&output);
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in ["rabbitmq", "mongodb", "redis"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "{report}"
        );
    }
    assert!(
        report.contains(&env.topology.dead_letter_queue()),
        "{report}"
    );
}

#[tokio::test]
async fn healthcheck_fails_when_indexes_are_missing() {
    let env = TestEnv::with_fresh_database(&[]).await;
    let output = kobe(&env, &["healthcheck"], &[]);
    assert!(!output.status.success());
    let report = stdout(&output);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("mongodb") && l.contains("init-db")),
        "{report}"
    );
}

#[tokio::test]
async fn healthcheck_names_the_dependency_on_a_closed_port() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let port = common::free_port();
    for (var, url, name) in [
        (
            "RABBITMQ_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            "rabbitmq",
        ),
        (
            "MONGODB_URI",
            format!("mongodb://127.0.0.1:{port}"),
            "mongodb",
        ),
        ("REDIS_URL", format!("redis://127.0.0.1:{port}/0"), "redis"),
    ] {
        let output = kobe(
            &env,
            &["healthcheck"],
            &[(var, &url), ("KOBE_DEPENDENCY_TIMEOUT_MS", "2000")],
        );
        assert!(!output.status.success(), "{var}");
        let report = stdout(&output);
        let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(failed.len(), 1, "{report}");
        assert!(failed[0].contains(name), "{report}");
    }
}

#[tokio::test]
async fn healthcheck_answers_within_ten_seconds_when_nothing_answers() {
    let env = TestEnv::new().await;
    // Accepts connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let _held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(16).flatten() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let output = kobe(
        &env,
        &["healthcheck"],
        &[
            (
                "RABBITMQ_URL",
                &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            ),
            ("MONGODB_URI", &format!("mongodb://127.0.0.1:{port}")),
            ("REDIS_URL", &format!("redis://127.0.0.1:{port}/0")),
            // The default probe timeout: the 10 s promise must hold without tuning.
        ],
    );
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(!output.status.success());
    let report = stdout(&output);
    for name in ["rabbitmq", "mongodb", "redis"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("FAIL") && l.contains(name)),
            "{report}"
        );
    }
}

#[tokio::test]
async fn healthcheck_keeps_its_bound_while_init_db_builds_indexes() {
    let env = TestEnv::with_fresh_database(&[]).await;
    // Collections that exist already make a real engine build each index in the background,
    // which is the slow case (seconds per createIndexes on DocumentDB).
    for spec in kobe::store::migrations::specs().unwrap() {
        env.db.create_collection(&spec.collection).await.unwrap();
    }
    let mut init = env
        .kobe_command(&["init-db"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let health = kobe(&env, &["healthcheck"], &[]);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let report = stdout(&health);
    assert!(report.lines().any(|l| l.contains("mongodb")), "{report}");
    let status = common::wait_exit(&mut init, Duration::from_secs(120)).await;
    assert!(status.success());
    // init-db said what it was building before each build finished.
    let mut out = String::new();
    std::io::Read::read_to_string(&mut init.stdout.take().unwrap(), &mut out).unwrap();
    let building = out.find("building").expect(&out);
    let created = out.find("created index").expect(&out);
    assert!(building < created, "{out}");
    let after = kobe(&env, &["healthcheck"], &[]);
    assert!(after.status.success(), "{}", stdout(&after));
}

#[tokio::test]
async fn a_malformed_setting_stops_start_up_naming_the_variable() {
    let env = TestEnv::new().await;
    let output = kobe(&env, &["serve"], &[("KOBE_HTTP_ADDR", "localhost-8000")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KOBE_HTTP_ADDR"), "{stderr}");
}

#[tokio::test]
async fn a_password_in_a_bad_url_is_not_printed() {
    let env = TestEnv::new().await;
    let output = kobe(
        &env,
        &["healthcheck"],
        &[("RABBITMQ_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")],
    );
    assert!(!output.status.success());
    let all = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!all.contains("hunter2"), "{all}");
    assert!(all.contains("***"), "{all}");
}

#[test]
fn help_lists_the_four_commands() {
    let output = Command::new(env!("CARGO_BIN_EXE_kobe"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["serve", "worker", "beat", "init-db", "healthcheck"] {
        assert!(help.contains(command), "{help}");
    }
    let version = Command::new(env!("CARGO_BIN_EXE_kobe"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("kobe "));
}

#[tokio::test]
async fn beat_without_schedules_says_what_it_needs() {
    let env = TestEnv::new().await;
    let output = kobe(&env, &["beat"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("[[schedule]]"), "{stderr}");
}

#[tokio::test]
async fn task_start_many_submits_a_jsonl_file_line_by_line() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-bulk"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tasks.jsonl");
    std::fs::write(
        &file,
        "{\"task_name\": \"demo_long_io\", \"kwargs\": {\"duration_ms\": 1}}\n\n{\"task_name\": \"nope\"}\nnot json\n{\"task_name\": \"demo_long_io\"}\n",
    )
    .unwrap();
    let output = kobe(&env, &["task", "start-many", file.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    // Indexes are the file's line numbers, from 0.
    let status: Vec<(i64, i64)> = lines
        .iter()
        .map(|l| (l["index"].as_i64().unwrap(), l["status"].as_i64().unwrap()))
        .collect();
    assert_eq!(status, [(0, 202), (2, 422), (3, 400), (4, 202)]);
    let id = lines[0]["task_id"].as_str().unwrap();
    let recorded = env.tasks().get(id).await.unwrap().expect("recorded");
    assert_eq!(recorded.task_name, "demo_long_io");
    let _ = std::fs::remove_dir_all(&dir);
}
