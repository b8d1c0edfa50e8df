//! Celery's Redis result backend, written as a Celery worker writes it (`KOBE_CELERY_RESULTS`),
//! so Python code that sent a task, or got its id from Kobe's API, reads its state and result
//! with `AsyncResult` unchanged: `celery-task-meta-<id>` holds Celery's JSON meta for
//! `result_expires`, and every write is published on the channel of the same name, where
//! Celery's `AsyncResult.get()` listens.
//!
//! MongoDB stays the authority: a task's final meta is written after its outcome is recorded
//! and before its delivery is acked, so a redelivery writes it again if Redis did not take it.
//! A final state (`SUCCESS`, `FAILURE`, `REVOKED`) is never replaced by a passing one
//! (`STARTED`, `RETRY`) written late, whatever the order the writes arrive in.

use std::time::Duration;

use deadpool_redis::{redis, Config, Pool, Runtime};
use mongodb::bson::DateTime;
use serde_json::{json, Map, Value};

use super::attempts::Transition;
use super::StoreError;
use crate::cause::Cause;
use crate::config::{celery_hostname, ServiceUrl};
use crate::domain::TaskState;

/// Sets the key for its expiry and publishes it, unless a passing state would replace a final
/// one. `KEYS[1]`: the meta's key (and channel); `ARGV`: the meta, its expiry in seconds, `1`
/// when the meta is final.
const PUT_SCRIPT: &str = r#"
local old = redis.call('GET', KEYS[1])
if old and ARGV[3] ~= '1' then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' then
    local s = meta['status']
    if s == 'SUCCESS' or s == 'FAILURE' or s == 'REVOKED' then return 0 end
  end
end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// Celery's key (and channel) for a task's meta.
pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// What a task's meta says besides its state: Celery's `result_extended` fields.
#[derive(Debug, Clone, Default)]
pub struct About {
    pub task_id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
    pub queue: String,
}

/// One state of a task, as Celery's meta says it.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    Started,
    Retry { cause: String },
    Success { result: Value },
    Failure { cause: String },
    Revoked { cause: String },
}

impl Meta {
    /// The meta of a stored state; `None` for `PENDING`, which Celery never stores.
    pub fn of_state(
        state: TaskState,
        result: Option<Value>,
        cause: Option<String>,
    ) -> Option<Self> {
        let cause = cause.unwrap_or_default();
        Some(match state {
            TaskState::Pending => return None,
            TaskState::Started => Self::Started,
            TaskState::Retry => Self::Retry { cause },
            TaskState::Success => Self::Success {
                result: result.unwrap_or(Value::Null),
            },
            TaskState::Failure => Self::Failure { cause },
            TaskState::Revoked => Self::Revoked { cause },
        })
    }

    /// The meta of an attempt's recorded outcome.
    pub fn of_transition(transition: &Transition) -> Self {
        match transition {
            Transition::Success { result } => Self::Success {
                result: result.clone(),
            },
            Transition::Retry { root_cause, .. } => Self::Retry {
                cause: root_cause.clone(),
            },
            Transition::Failure { root_cause, .. } => Self::Failure {
                cause: root_cause.clone(),
            },
            Transition::Revoked { root_cause } => Self::Revoked {
                cause: root_cause.clone(),
            },
        }
    }

    fn status(&self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Retry { .. } => "RETRY",
            Self::Success { .. } => "SUCCESS",
            Self::Failure { .. } => "FAILURE",
            Self::Revoked { .. } => "REVOKED",
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Success { .. } | Self::Failure { .. } | Self::Revoked { .. }
        )
    }

    /// Celery's JSON meta (`result_extended` fields included) at `now`.
    pub fn to_json(&self, about: &About, now: DateTime) -> Value {
        let exception = |module: &str, kind: &str, cause: &str| json!({"exc_type": kind, "exc_message": [cause], "exc_module": module});
        let (result, traceback) = match self {
            Self::Started => (
                json!({"pid": std::process::id(), "hostname": celery_hostname()}),
                Value::Null,
            ),
            Self::Success { result } => (result.clone(), Value::Null),
            Self::Retry { cause } => (
                exception("celery.exceptions", "Retry", cause),
                traceback_of(cause),
            ),
            Self::Failure { cause } => (
                exception("builtins", "Exception", cause),
                traceback_of(cause),
            ),
            Self::Revoked { cause } => (
                exception(
                    "celery.exceptions",
                    "TaskRevokedError",
                    if cause.is_empty() { "revoked" } else { cause },
                ),
                Value::Null,
            ),
        };
        json!({
            "status": self.status(),
            "result": result,
            "traceback": traceback,
            "children": [],
            "date_done": if self.is_final() {
                Value::String(now.try_to_rfc3339_string().unwrap_or_default())
            } else {
                Value::Null
            },
            "task_id": about.task_id,
            "name": about.name,
            "args": about.args,
            "kwargs": about.kwargs,
            "worker": celery_hostname(),
            "retries": about.retries,
            "queue": about.queue,
        })
    }
}

/// What Python shows as the traceback: Kobe's root cause, which names what failed.
fn traceback_of(cause: &str) -> Value {
    Value::String(format!(
        "Traceback (most recent call last):\n  (a Kobe worker ran the task: {})\n{}\n",
        celery_hostname(),
        cause
    ))
}

/// Celery's Redis result backend.
#[derive(Clone)]
pub struct CeleryResults {
    pool: Pool,
    expires: Duration,
    timeout: Duration,
}

impl CeleryResults {
    /// Builds the pool; connections open lazily, so this succeeds while Redis is down.
    pub fn new(url: &ServiceUrl, expires: Duration, timeout: Duration) -> Result<Self, StoreError> {
        let mut config = Config::from_url(url.expose());
        config.pool = Some(deadpool_redis::PoolConfig {
            max_size: 16,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(timeout),
                create: Some(timeout),
                recycle: Some(timeout),
            },
            ..Default::default()
        });
        let pool = config.create_pool(Some(Runtime::Tokio1)).map_err(|e| {
            StoreError::Redis(Cause::context(
                format!("invalid KOBE_CELERY_RESULTS {url}"),
                e,
            ))
        })?;
        Ok(Self {
            pool,
            expires,
            timeout,
        })
    }

    /// Writes `meta` of the task `about` names and publishes it; a passing state never replaces
    /// a final one. Bounded by the dependency timeout.
    #[tracing::instrument(name = "celery.result.put", skip_all, fields(status = meta.status()))]
    pub async fn put(&self, about: &About, meta: &Meta) -> Result<(), StoreError> {
        let json = meta.to_json(about, DateTime::now()).to_string();
        let attempt = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| StoreError::Redis(Cause::of(e)))?;
            let mut command = redis::cmd("EVAL");
            command
                .arg(PUT_SCRIPT)
                .arg(1)
                .arg(meta_key(&about.task_id))
                .arg(json)
                .arg(self.expires.as_secs().max(1))
                .arg(if meta.is_final() { "1" } else { "0" });
            let _: i64 = command
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::Redis(Cause::of(e)))?;
            Ok(())
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| StoreError::Redis(format!("no answer within {:?}", self.timeout).into()))?
    }

    /// The meta stored for a task, if any (what a Celery worker, or a Kobe one, wrote).
    #[tracing::instrument(name = "celery.result.get", skip(self))]
    pub async fn meta(&self, task_id: &str) -> Result<Option<Value>, StoreError> {
        let attempt = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| StoreError::Redis(Cause::of(e)))?;
            let mut command = redis::cmd("GET");
            command.arg(meta_key(task_id));
            let stored: Option<String> = command
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::Redis(Cause::of(e)))?;
            Ok(stored.and_then(|json| serde_json::from_str(&json).ok()))
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| StoreError::Redis(format!("no answer within {:?}", self.timeout).into()))?
    }

    /// Writes a passing state without waiting for it: a late one cannot replace the outcome.
    pub fn put_soon(&self, about: About, meta: Meta) {
        let results = self.clone();
        tokio::spawn(async move {
            if let Err(error) = results.put(&about, &meta).await {
                tracing::debug!(error = %error, "cannot write the Celery result meta");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn about() -> About {
        About {
            task_id: "t-1".into(),
            name: "add".into(),
            args: vec![json!(1), json!(2)],
            queue: "kobe.default".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_success_is_celerys_meta_with_the_result_and_its_date() {
        let now = DateTime::from_millis(1_700_000_000_123);
        let meta = Meta::Success { result: json!(3) }.to_json(&about(), now);
        assert_eq!(meta["status"], "SUCCESS");
        assert_eq!(meta["result"], 3);
        assert_eq!(meta["traceback"], Value::Null);
        assert_eq!(meta["children"], json!([]));
        assert_eq!(meta["task_id"], "t-1");
        assert_eq!(meta["args"], json!([1, 2]));
        assert_eq!(meta["date_done"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn a_failure_is_an_exception_python_can_rebuild_with_the_cause_as_traceback() {
        let meta = Meta::Failure {
            cause: "ValueError: no such url".into(),
        }
        .to_json(&about(), DateTime::now());
        assert_eq!(meta["status"], "FAILURE");
        assert_eq!(
            meta["result"],
            json!({"exc_type": "Exception", "exc_message": ["ValueError: no such url"], "exc_module": "builtins"})
        );
        assert!(meta["traceback"]
            .as_str()
            .unwrap()
            .ends_with("ValueError: no such url\n"));
        let revoked = Meta::Revoked { cause: "".into() }.to_json(&about(), DateTime::now());
        assert_eq!(revoked["result"]["exc_type"], "TaskRevokedError");
        assert_eq!(revoked["result"]["exc_message"], json!(["revoked"]));
    }

    #[test]
    fn passing_states_have_no_date_and_pending_is_never_stored() {
        let started = Meta::Started.to_json(&about(), DateTime::now());
        assert_eq!(started["date_done"], Value::Null);
        assert_eq!(started["result"]["hostname"], celery_hostname());
        assert!(celery_hostname().starts_with("kobe-"));
        assert!(celery_hostname().contains('@'));
        assert_eq!(Meta::of_state(TaskState::Pending, None, None), None);
        assert!(!Meta::Retry { cause: "x".into() }.is_final());
        assert!(Meta::of_state(TaskState::Revoked, None, None)
            .unwrap()
            .is_final());
    }
}
