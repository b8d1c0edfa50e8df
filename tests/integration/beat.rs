//! Periodic tasks with two `kobe serve` replicas: one leads and fires each slot once; when it is
//! killed, the other takes the lead and goes on; every firing is one task, published once.

use crate::common;

use std::time::Duration;

use common::TestEnv;
use mongodb::bson::{doc, Document};
use serde_json::Value;

async fn schedules(client: &reqwest::Client, base: &str) -> Option<Value> {
    client
        .get(format!("{base}/schedules"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The slots (ms) fired so far, in order.
async fn fired(env: &TestEnv) -> Vec<i64> {
    use futures_util::TryStreamExt;
    let docs: Vec<Document> = env
        .db
        .collection::<Document>("Tasks")
        .find(doc! {"_id": {"$regex": "^schedule:tick:"}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut slots: Vec<i64> = docs
        .iter()
        .map(|d| {
            d.get_str("_id")
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    slots.sort_unstable();
    slots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_fire_each_slot_once_and_the_survivor_takes_over_from_a_killed_leader() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-beat"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        "[[schedule]]\nname = \"tick\"\ntask = \"demo_long_io\"\nevery = 1\nkwargs = { duration_ms = 1 }\n",
    )
    .unwrap();
    let check = env
        .kobe_command(&["tasks", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("1 schedule(s)"),
        "{check:?}"
    );
    let client = reqwest::Client::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let port = common::free_port();
        let process = env
            .kobe_command(&["serve", "--addr", &format!("127.0.0.1:{port}")])
            .env("KOBE_TASKS_FILE", &file)
            .env("KOBE_BEAT_LEASE_MS", "2000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(common::Process::new)
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        common::wait_ready(&client, &base).await;
        replicas.push((base, process));
    }

    // One of them leads, and says so; the other says who does.
    let leader = common::eventually(Duration::from_secs(15), "a leader", || async {
        for (i, (base, _)) in replicas.iter().enumerate() {
            let answer = schedules(&client, base).await?;
            if answer["this_replica_leads"] == true {
                return Some(i);
            }
        }
        None
    })
    .await;
    let other = 1 - leader;
    let seen_by_other = schedules(&client, &replicas[other].0).await.unwrap();
    assert_eq!(
        seen_by_other["this_replica_leads"], false,
        "{seen_by_other}"
    );
    assert!(seen_by_other["leader"].is_string(), "{seen_by_other}");
    assert_eq!(seen_by_other["schedules"][0]["when"], "every 1 s");
    let page = client
        .get(format!("{}/ui", replicas[other].0))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("data-schedule=\"tick\""), "{page}");
    common::eventually(Duration::from_secs(15), "three firings", || async {
        (fired(&env).await.len() >= 3).then_some(())
    })
    .await;

    // The leader dies without letting go: the other takes over once the lease lapses.
    let (_, process) = replicas.remove(leader);
    process.kill();
    let at_kill = fired(&env).await;
    let (survivor, survivor_process) = replicas.remove(0);
    common::eventually(Duration::from_secs(15), "the survivor leads", || async {
        (schedules(&client, &survivor).await?["this_replica_leads"] == true).then_some(())
    })
    .await;
    common::eventually(
        Duration::from_secs(15),
        "firings after the takeover",
        || async { (fired(&env).await.len() >= at_kill.len() + 3).then_some(()) },
    )
    .await;
    survivor_process.stop();

    // Each slot once: distinct, whole seconds, in order; the gap while nobody led is at most
    // the lease and a renewal, and only the latest missed slot was caught up.
    let slots = fired(&env).await;
    let mut distinct = slots.clone();
    distinct.dedup();
    assert_eq!(distinct, slots, "a slot fired twice: {slots:?}");
    assert!(slots.iter().all(|s| s % 1000 == 0), "{slots:?}");
    let widest = slots.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    eprintln!(
        "slots fired: {slots:?} (killed after {}; widest gap {widest} ms)",
        at_kill.len()
    );
    assert!(widest <= 5000, "gap of {widest} ms: {slots:?}");
    // Each firing is published once. The killed leader may have died between recording a
    // firing and publishing it: that one is owed by the outbox, which any `serve` relays. One
    // without the schedule (so nothing new fires) and with a short outbox age settles the debt.
    let port = common::free_port();
    let relay = env
        .kobe_command(&["serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("KOBE_OUTBOX_AGE_MS", "500")
        .env("KOBE_OUTBOX_INTERVAL_MS", "200")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(common::Process::new)
        .unwrap();
    common::wait_ready(&client, &format!("http://127.0.0.1:{port}")).await;
    let queue = env.topology.queue("default");
    common::eventually(Duration::from_secs(15), "every firing queued", || async {
        let depth = env.queue_depth(queue.clone()).await?;
        (depth as usize >= slots.len()).then_some(())
    })
    .await;
    relay.stop();
    // A copy more is allowed where the leader died between the broker's confirm and recording
    // it (the worker runs the task once); a slot missing or a task never fired is not.
    let mut queued: Vec<i64> = env
        .drain(queue)
        .await
        .iter()
        .map(|m| {
            let id = m.header_text("id").expect("a task id");
            id.rsplit(':').next().unwrap().parse().unwrap()
        })
        .collect();
    queued.sort_unstable();
    queued.dedup();
    assert_eq!(queued, slots, "queued slots against fired ones");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The workflows a schedule started, by id, with their states.
async fn workflows(env: &TestEnv) -> Vec<Document> {
    use futures_util::TryStreamExt;
    env.db
        .collection::<Document>("Workflows")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_starts_one_workflow_per_slot_and_a_bad_step_stops_start_up() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let dir = std::env::temp_dir().join(common::unique("kobe-beat-workflow"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[schedule]]\nname = \"crawl\"\nevery = 1\nworkflow = '{\"chain\": [{\"task_name\": \"demo_long_io\"}, {\"task_name\": \"nowhere\"}]}'\n",
    )
    .unwrap();
    let refused = env
        .kobe_command(&["serve", "--addr", "127.0.0.1:0"])
        .env("KOBE_TASKS_FILE", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("schedule `crawl`: workflow.chain[1].task_name"),
        "{stderr}"
    );

    let file = dir.join("tasks.toml");
    std::fs::write(
        &file,
        r#"[[schedule]]
name = "crawl"
every = 1
workflow = { chain = [{ task_name = "demo_long_io", expires = 2, kwargs = { duration_ms = 1 } }, { task_name = "demo_long_io", immutable = true, kwargs = { duration_ms = 1 } }] }
"#,
    )
    .unwrap();
    let port = common::free_port();
    let serve = env
        .kobe_command(&["serve", "--addr", &format!("127.0.0.1:{port}")])
        .env("KOBE_TASKS_FILE", &file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(common::Process::new)
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    common::wait_ready(&client, &base).await;
    let worker = env.spawn_worker(2);
    // Its first step expires 2 s after it is started: counted from each firing, so firings
    // long after start-up run too.
    common::eventually(Duration::from_secs(30), "five workflows done", || async {
        let done = workflows(&env)
            .await
            .iter()
            .filter(|w| w.get_str("state") == Ok("SUCCESS"))
            .count();
        (done >= 5).then_some(())
    })
    .await;
    // Every firing the leader counted is a workflow of its own (a slot fired twice would be
    // the same one), each of two steps that ran once.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serve.stop();
    let fired: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kobe_schedule_firings_total") && l.contains("\"fired\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    let started = workflows(&env).await;
    assert!(fired >= 5.0, "{metrics}");
    // The scrape and the stop leave room for one more firing between them.
    assert!(
        (started.len() as f64 - fired).abs() <= 1.0,
        "{} workflows for {fired} firings",
        started.len()
    );
    for workflow in started
        .iter()
        .filter(|w| w.get_str("state") == Ok("SUCCESS"))
    {
        let id = workflow.get_str("_id").unwrap();
        let steps: Vec<Document> = {
            use futures_util::TryStreamExt;
            env.db
                .collection::<Document>("Tasks")
                .find(doc! {"workflow_id": id})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap()
        };
        assert_eq!(steps.len(), 2, "{id}: {steps:?}");
        for step in &steps {
            let task = env.tasks().get(step.get_str("_id").unwrap()).await;
            let task = task.unwrap().unwrap();
            assert_eq!(task.state, kobe::domain::TaskState::Success, "{step}");
            assert_eq!(task.deliveries, 1, "{step}");
        }
    }
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
