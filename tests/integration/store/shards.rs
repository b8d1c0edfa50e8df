//! Sharded jobs on MongoDB: checkpoints a retry resumes from, item leases taken exactly once,
//! the frontier a shard must empty before it is done, and child tasks spawned again after a
//! failed publish.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Running, TestEnv};
use kobe::domain::{TaskId, TaskState};
use kobe::store::checkpoints::CheckpointRepository;
use kobe::store::{LeaseRepository, TaskDocument};
use kobe::tasks::Registry;
use mongodb::bson::doc;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_job_resumes_failed_shards_from_their_checkpoints() {
    let Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_RETRY_BASE_MS", "100")], 4).await;
    let job_key = common::unique("job");
    let id = api
        .submit(json!({"task_name": "demo_sharded_job", "kwargs": {"job_key": job_key, "count": 24, "shards": 3, "fail_after": 2}}))
        .await;
    let (planned, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(planned["state"], "SUCCESS", "{planned}");

    // Every shard completes (each after one retry) and the job reports 3 of 3.
    let (status, _) = api
        .wait_for_state(&id, Duration::from_secs(60), |b| {
            b["job"]["shards_done"] == 3
        })
        .await;
    assert_eq!(status["job"]["shards_total"], 3, "{status}");
    assert_eq!(status["job"]["hash"], "fnv1a64");

    let checkpoints = CheckpointRepository::new(&env.db)
        .for_job(&job_key)
        .await
        .unwrap();
    assert_eq!(checkpoints.len(), 24, "one checkpoint per item");
    let items: HashSet<&str> = checkpoints.iter().map(|c| c.sub_key.as_str()).collect();
    assert_eq!(items.len(), 24, "no item's effect twice");
    for shard in 0..3 {
        let shard_key = format!("{job_key}:shard:{shard}");
        let of_shard: Vec<_> = checkpoints
            .iter()
            .filter(|c| c.shard_key == shard_key)
            .collect();
        let first_attempt = of_shard.iter().filter(|c| c.attempt == 1).count();
        assert_eq!(
            first_attempt,
            2.min(of_shard.len()),
            "shard {shard}: the first attempt did 2 items then failed"
        );
        assert!(of_shard.iter().all(|c| c.attempt <= 2));
        let task = env.tasks().get(&shard_key).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Success);
        if of_shard.len() > 2 {
            assert_eq!(task.retries, 1, "{task:?}");
            // The retry did only what was left.
            assert_eq!(
                task.result.unwrap()["processed"],
                (of_shard.len() - 2) as u64
            );
        }
    }
    // Items went where the hash says.
    for checkpoint in &checkpoints {
        let shard = kobe::domain::shard::shard_of(&checkpoint.sub_key, 3);
        assert_eq!(checkpoint.shard_key, format!("{job_key}:shard:{shard}"));
    }
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_leasers_take_each_of_200_items_exactly_once() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let leases = LeaseRepository::new(&env.db);
    for i in 0..200 {
        assert!(leases
            .enqueue("frontier", &format!("item-{i}"), json!({"n": i}))
            .await
            .unwrap());
    }
    assert!(
        !leases
            .enqueue("frontier", "item-0", json!({}))
            .await
            .unwrap(),
        "enqueue is idempotent"
    );
    let mut leasers = Vec::new();
    for w in 0..16 {
        let leases = leases.clone();
        leasers.push(tokio::spawn(async move {
            let me = format!("leaser-{w}");
            let mut taken = Vec::new();
            while let Some(lease) = leases
                .lease("frontier", &me, Duration::from_secs(60))
                .await
                .unwrap()
            {
                assert!(!lease.reclaimed);
                taken.push(lease.item.task_key);
            }
            taken
        }));
    }
    let mut all = Vec::new();
    for leaser in leasers {
        all.extend(leaser.await.unwrap());
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 200, "every item leased");
    assert_eq!(
        distinct.len(),
        200,
        "no item leased twice while its lease is live"
    );
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_only_the_holder_may_finish() {
    let env = TestEnv::new().await;
    env.init_db().await;
    let leases = LeaseRepository::new(&env.db);
    leases.enqueue("q", "only", json!({})).await.unwrap();
    let crashed = leases
        .lease("q", "a", Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(crashed.item.task_key, "only");
    // While a's lease is live nobody else gets the item, and b cannot complete it.
    assert!(leases
        .lease("q", "b", Duration::from_secs(60))
        .await
        .unwrap()
        .is_none());
    assert!(!leases.complete("only", "b").await.unwrap());
    assert!(!leases
        .renew("only", "b", Duration::from_secs(60))
        .await
        .unwrap());
    // a "crashes": no renewal. Once lease_until passes, the next lease reclaims it.
    let reclaimed = common::eventually(Duration::from_secs(5), "reclaim", || async {
        leases
            .lease("q", "b", Duration::from_secs(60))
            .await
            .unwrap()
    })
    .await;
    assert!(reclaimed.reclaimed);
    assert!(!leases.complete("only", "a").await.unwrap(), "a lost it");
    assert!(leases
        .renew("only", "b", Duration::from_secs(60))
        .await
        .unwrap());
    assert!(leases.complete("only", "b").await.unwrap());
    assert_eq!(leases.remaining("q").await.unwrap(), 0);
    // The completed item carries gc_at for the TTL; live items never do.
    let item = env
        .db
        .collection::<mongodb::bson::Document>("PendingTasks")
        .find_one(doc! {"task_key": "only"})
        .await
        .unwrap()
        .expect("a completed item stays until its gc_at");
    assert!(item.get_datetime("gc_at").is_ok());
}

/// Plans a job of `count` items over one shard and returns the shard's queue and task id.
async fn one_shard_job(env: &TestEnv, api: &common::TestApi, count: u32) -> (String, String) {
    let job_key = common::unique("job");
    let id = api
        .submit(json!({"task_name": "demo_sharded_job", "kwargs": {"job_key": job_key, "count": count, "shards": 1, "item_ms": 20}}))
        .await;
    let (planned, _) = api.wait_for_final(&id, Duration::from_secs(20)).await;
    assert_eq!(planned["state"], "SUCCESS", "{planned}");
    let _ = env;
    (format!("{job_key}:shard:0"), job_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_takes_back_items_an_earlier_attempt_died_holding() {
    let env = TestEnv::with(&[("KOBE_TASK_ROUTES", "demo_shard=shards")]).await;
    let api = env.spawn_api().await;
    // Plan the job with no worker for shards yet: the planner runs, the shard waits.
    let planner = env.spawn_worker_on(1, vec!["default".into()], Registry::with_builtin_tasks());
    let (queue, job_key) = one_shard_job(&env, &api, 6).await;
    planner.stop().await;
    // An attempt of the shard took an item and died holding it, its lease far from over.
    let leases = LeaseRepository::new(&env.db);
    let held = leases
        .lease_for(
            &queue,
            Some(&queue),
            &format!("{queue}#1-dead"),
            Duration::from_secs(600),
        )
        .await
        .unwrap()
        .expect("an item to hold");
    let worker = env.spawn_worker_on(2, vec!["shards".into()], Registry::with_builtin_tasks());
    let task = env.wait_final(&queue, Duration::from_secs(30)).await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    assert_eq!(
        task.retries, 0,
        "taken back at once, no retry needed: {task:?}"
    );
    let checkpoints = CheckpointRepository::new(&env.db)
        .for_job(&job_key)
        .await
        .unwrap();
    assert_eq!(checkpoints.len(), 6, "every item done, the held one too");
    assert!(checkpoints
        .iter()
        .any(|c| format!("{job_key}:{}", c.sub_key) == held.item.task_key));
    assert_eq!(leases.remaining(&queue).await.unwrap(), 0);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_is_not_done_while_another_holder_has_its_items() {
    let env = TestEnv::with(&[
        ("KOBE_RETRY_BASE_MS", "500"),
        ("KOBE_TASK_ROUTES", "demo_shard=shards"),
    ])
    .await;
    let api = env.spawn_api().await;
    let planner = env.spawn_worker_on(1, vec!["default".into()], Registry::with_builtin_tasks());
    let (queue, job_key) = one_shard_job(&env, &api, 5).await;
    planner.stop().await;
    // Someone else holds an item for a while.
    let leases = LeaseRepository::new(&env.db);
    leases
        .lease(&queue, "someone-else", Duration::from_millis(600))
        .await
        .unwrap()
        .expect("an item to hold");
    let worker = env.spawn_worker_on(2, vec!["shards".into()], Registry::with_builtin_tasks());
    let task = env.wait_final(&queue, Duration::from_secs(30)).await;
    assert_eq!(task.state, TaskState::Success, "{task:?}");
    // It retried until the item came free rather than finishing without it.
    assert!(task.retries >= 1, "{task:?}");
    let checkpoints = CheckpointRepository::new(&env.db)
        .for_job(&job_key)
        .await
        .unwrap();
    assert_eq!(checkpoints.len(), 5);
    assert_eq!(leases.remaining(&queue).await.unwrap(), 0);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_whose_publish_failed_is_published_when_its_parent_spawns_it_again() {
    let env = TestEnv::new().await;
    let submitter = env.submitter();
    // An earlier attempt of the parent recorded the child, and its publish failed.
    let id = TaskId::generate();
    let document = TaskDocument::pending(&id, "demo_long_io", "default");
    env.tasks().insert(&document).await.unwrap();
    let queue = env.topology.queue("default");
    // The publisher declares the topology once connected.
    common::eventually(Duration::from_secs(10), "publisher connected", || async {
        submitter.publisher().connected().ok()
    })
    .await;
    assert_eq!(env.queue_depth(queue.clone()).await, Some(0));

    let child = kobe::submit::NewTask::new(id.clone(), "demo_long_io", "default");
    submitter.submit_child(child.clone()).await.unwrap();
    assert_eq!(
        env.queue_depth(queue.clone()).await,
        Some(1),
        "published now"
    );
    // Once confirmed, spawning it again is a no-op.
    common::eventually(Duration::from_secs(10), "marked confirmed", || async {
        let task = env.tasks().get(id.as_str()).await.ok()??;
        (task.publish_state == Some(kobe::store::tasks::PublishState::Confirmed)).then_some(())
    })
    .await;
    submitter.submit_child(child).await.unwrap();
    assert_eq!(env.queue_depth(queue).await, Some(1), "not published twice");
}
