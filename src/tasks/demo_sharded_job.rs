//! `demo_sharded_job` and its shards, `demo_shard`: the shape of a sharded crawl.
//!
//! The job splits its items with `fnv1a64(item) % shards`, records that plan in `ShardMeta` before
//! any shard runs, puts each item on the lease frontier (`PendingTasks`, one queue per shard) and
//! submits one `demo_shard` task per shard. A shard leases its items one by one, does the work,
//! records a `TaskCheckpoint` and completes the lease; a retried or redelivered shard skips what
//! its checkpoints say is done. `fail_after` makes every shard fail (retryably) on its first
//! attempt after that many items, to show the resume.

use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::{json, Map, Value};

use super::{
    optional_u64, ChildTask, InvalidInput, Invocation, Task, TaskContext, TaskError, TaskFuture,
};
use crate::domain::shard::{shard_of, HASH_NAME, STRATEGY};
use crate::domain::TaskId;
use crate::store::ShardMeta;

const MAX_SHARDS: u64 = 256;
const MAX_ITEMS: usize = 100_000;
/// A shard's lease on one item; items are short, so no renewal is needed.
const ITEM_LEASE: Duration = Duration::from_secs(60);

pub struct DemoShardedJob;
pub struct DemoShard;

fn store_error(e: crate::store::StoreError) -> TaskError {
    TaskError::Retryable(e.to_string())
}

fn job_key(kwargs: &Map<String, Value>) -> Result<String, InvalidInput> {
    let invalid = |reason: &str| InvalidInput {
        field: "kwargs.job_key".into(),
        reason: reason.into(),
    };
    let key = kwargs
        .get("job_key")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("required: a string naming the job"))?;
    // It becomes part of task ids and queue names.
    if key.is_empty()
        || key.len() > 64
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid("1–64 letters, digits, `-`, `_` or `.`"));
    }
    Ok(key.to_owned())
}

struct JobParams {
    job_key: String,
    items: Vec<String>,
    shards: u32,
    fail_after: Option<u64>,
    item_ms: u64,
}

fn job_params(kwargs: &Map<String, Value>) -> Result<JobParams, InvalidInput> {
    let job_key = job_key(kwargs)?;
    let items: Vec<String> = match (kwargs.get("items"), kwargs.get("count")) {
        (Some(Value::Array(items)), None) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(InvalidInput {
                    field: "kwargs.items".into(),
                    reason: "every item key is a string".into(),
                }),
            })
            .collect::<Result<_, _>>()?,
        (None, Some(_)) => {
            let count = optional_u64(kwargs, "count", 0)?;
            (0..count).map(|i| format!("item-{i}")).collect()
        }
        _ => {
            return Err(InvalidInput {
                field: "kwargs.items".into(),
                reason: "give either `items` (a list of keys) or `count`".into(),
            })
        }
    };
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(InvalidInput {
            field: "kwargs.items".into(),
            reason: format!("between 1 and {MAX_ITEMS} items"),
        });
    }
    let shards = optional_u64(kwargs, "shards", 4)?;
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(InvalidInput {
            field: "kwargs.shards".into(),
            reason: format!("between 1 and {MAX_SHARDS}"),
        });
    }
    let fail_after = match kwargs.get("fail_after") {
        None | Some(Value::Null) => None,
        Some(_) => Some(optional_u64(kwargs, "fail_after", 0)?),
    };
    Ok(JobParams {
        job_key,
        items,
        shards: shards as u32,
        fail_after,
        item_ms: optional_u64(kwargs, "item_ms", 0)?,
    })
}

/// The queue (and checkpoint shard key) of one shard.
pub(crate) fn shard_queue(job_key: &str, shard: u32) -> String {
    format!("{job_key}:shard:{shard}")
}

impl Task for DemoShardedJob {
    fn name(&self) -> &'static str {
        "demo_sharded_job"
    }

    fn validate(&self, _args: &[Value], kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        job_params(kwargs).map(drop)
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        Box::pin(async move {
            let params =
                job_params(&invocation.kwargs).map_err(|e| TaskError::Permanent(e.to_string()))?;
            let context = invocation.context()?;
            let shard_task_ids: Vec<String> = (0..params.shards)
                .map(|i| shard_queue(&params.job_key, i))
                .collect();
            // The plan is written before any shard exists; a retried planner gets the same plan.
            let plan = context
                .shards
                .plan(&ShardMeta {
                    job_id: params.job_key.clone(),
                    strategy: STRATEGY.into(),
                    hash: HASH_NAME.into(),
                    shards: params.shards,
                    items: params.items.len() as u64,
                    shard_task_ids: shard_task_ids.clone(),
                    planned_by: invocation.task_id.to_string(),
                    created_at: DateTime::now(),
                })
                .await
                .map_err(store_error)?;
            if plan.planned_by != invocation.task_id.as_str() {
                return Err(TaskError::Permanent(format!(
                    "job `{}` was already planned by task {}",
                    plan.job_id, plan.planned_by
                )));
            }
            for item in &params.items {
                let shard = shard_of(item, plan.shards);
                context
                    .leases
                    .enqueue(
                        &shard_queue(&plan.job_id, shard),
                        &format!("{}:{item}", plan.job_id),
                        json!({"item": item}),
                    )
                    .await
                    .map_err(store_error)?;
            }
            for (shard, id) in plan.shard_task_ids.iter().enumerate() {
                let mut kwargs = Map::new();
                kwargs.insert("job_key".into(), json!(plan.job_id));
                kwargs.insert("shard".into(), json!(shard));
                kwargs.insert("item_ms".into(), json!(params.item_ms));
                if let Some(k) = params.fail_after {
                    kwargs.insert("fail_after".into(), json!(k));
                }
                context
                    .spawner
                    .spawn(ChildTask {
                        id: TaskId::parse(id).map_err(TaskError::Permanent)?,
                        task_name: "demo_shard".into(),
                        kwargs,
                        parent_id: invocation.task_id.clone(),
                    })
                    .await?;
            }
            Ok(json!({
                "job_id": plan.job_id,
                "strategy": plan.strategy,
                "hash": plan.hash,
                "shards": plan.shards,
                "items": plan.items,
                "shard_task_ids": plan.shard_task_ids,
            }))
        })
    }
}

impl Task for DemoShard {
    fn name(&self) -> &'static str {
        "demo_shard"
    }

    fn validate(&self, _args: &[Value], kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        job_key(kwargs)?;
        optional_u64(kwargs, "shard", 0).map(drop)
    }

    fn run(&self, invocation: Invocation) -> TaskFuture {
        Box::pin(async move {
            let shard = ShardAttempt::of(&invocation)?;
            let context = invocation.context()?;
            let done = context
                .checkpoints
                .done(&shard.queue)
                .await
                .map_err(store_error)?;
            let (mut processed, mut skipped) = (0u64, 0u64);
            while let Some(lease) = context
                .leases
                .lease_for(&shard.queue, Some(&shard.owner), &shard.holder, ITEM_LEASE)
                .await
                .map_err(store_error)?
            {
                let key = lease.item.task_key.clone();
                let item = lease
                    .item
                    .payload
                    .get("item")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let recorded = if done.contains(item) {
                    false
                } else {
                    match shard.work(&context, item, processed).await {
                        Ok(recorded) => recorded,
                        Err(error) => {
                            // Hand the item back at once: nobody waits out its lease.
                            let _ = context.leases.release(&key, &shard.holder).await;
                            return Err(error);
                        }
                    }
                };
                if recorded {
                    processed += 1;
                } else {
                    skipped += 1;
                }
                context
                    .leases
                    .complete(&key, &shard.holder)
                    .await
                    .map_err(store_error)?;
            }
            shard.finished(&context).await?;
            Ok(json!({
                "job_id": shard.job, "shard": shard.index,
                "processed": processed, "skipped": skipped,
            }))
        })
    }
}

/// One attempt at one shard: which frontier it drains, under which names, and how it is asked to
/// misbehave.
struct ShardAttempt {
    job: String,
    index: u64,
    queue: String,
    /// The shard task, on whose behalf items are held.
    owner: String,
    /// This attempt's own name: a retry takes back what an earlier attempt still held when it died
    /// or gave up.
    holder: String,
    attempt: u32,
    fail_after: Option<u64>,
    item_ms: u64,
}

impl ShardAttempt {
    fn of(invocation: &Invocation) -> Result<Self, TaskError> {
        let kwargs = &invocation.kwargs;
        let job = job_key(kwargs).map_err(|e| TaskError::Permanent(e.to_string()))?;
        let index =
            optional_u64(kwargs, "shard", 0).map_err(|e| TaskError::Permanent(e.to_string()))?;
        let owner = invocation.task_id.to_string();
        let holder = format!(
            "{owner}#{}-{}",
            invocation.attempt,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Ok(Self {
            queue: shard_queue(&job, index as u32),
            job,
            index,
            owner,
            holder,
            attempt: invocation.attempt,
            fail_after: kwargs.get("fail_after").and_then(Value::as_u64),
            item_ms: optional_u64(kwargs, "item_ms", 0).unwrap_or(0),
        })
    }

    /// Works one item; `Ok(false)` when its checkpoint was already there.
    async fn work(
        &self,
        context: &TaskContext,
        item: &str,
        processed: u64,
    ) -> Result<bool, TaskError> {
        if self.attempt == 1 && self.fail_after == Some(processed) {
            return Err(TaskError::Retryable(format!(
                "simulated failure after {processed} items"
            )));
        }
        if self.item_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.item_ms)).await;
        }
        // The checkpoint is the item's effect: recording it twice is impossible.
        context
            .checkpoints
            .record(&self.job, &self.queue, item, self.attempt)
            .await
            .map_err(store_error)
    }

    /// Done only when the frontier is empty: an item still leased elsewhere is not done.
    async fn finished(&self, context: &TaskContext) -> Result<(), TaskError> {
        let remaining = context
            .leases
            .remaining(&self.queue)
            .await
            .map_err(store_error)?;
        if remaining > 0 {
            return Err(TaskError::Retryable(format!(
                "{remaining} item(s) of {} are still leased by another holder",
                self.queue
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kwargs(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn parameters_are_checked_naming_the_field() {
        let field = |v: Value| DemoShardedJob.validate(&[], &kwargs(v)).unwrap_err().field;
        assert_eq!(field(json!({"count": 3})), "kwargs.job_key");
        assert_eq!(
            field(json!({"job_key": "a/b", "count": 3})),
            "kwargs.job_key"
        );
        assert_eq!(field(json!({"job_key": "j"})), "kwargs.items");
        assert_eq!(field(json!({"job_key": "j", "items": [1]})), "kwargs.items");
        assert_eq!(
            field(json!({"job_key": "j", "count": 3, "shards": 0})),
            "kwargs.shards"
        );
        assert!(DemoShardedJob
            .validate(
                &[],
                &kwargs(json!({"job_key": "j", "items": ["a", "b"], "shards": 2}))
            )
            .is_ok());
    }
}
