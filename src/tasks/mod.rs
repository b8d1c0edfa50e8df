//! Units of work: the [`Task`] trait, the errors a task reports, and the [`Registry`] of tasks a
//! process knows. Nothing here knows how a task arrived or where its outcome goes.

pub mod declared;
mod demo_long_io;
mod demo_sharded_job;
pub mod schema;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

pub use demo_long_io::DemoLongIo;
pub use demo_sharded_job::{DemoShard, DemoShardedJob};
pub use schema::KwargsSchema;

use crate::domain::{Priority, TaskId};
use crate::store::{CheckpointRepository, LeaseRepository, ShardRepository};

/// [`Task::kind`] of a task Python Celery workers run.
pub const CELERY_KIND: &str = "celery";

/// What a handler's future resolves to.
pub(crate) type HandlerResult = Result<Value, TaskError>;
pub type TaskFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// A task's failure, saying what the worker should do next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// Transient (a timeout, a dependency down): try again after a backoff.
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time (bad input, a bug): dead-letter now.
    #[error("{0}")]
    Permanent(String),
    /// Transient, and the other side said when to come back (an HTTP `Retry-After`): try again
    /// no sooner than `after` (at most an hour), or after the backoff if that is longer.
    #[error("{cause}")]
    RetryAfter { after: Duration, cause: String },
}

/// One attempt of one task, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub task_id: TaskId,
    /// 1 on the first attempt.
    pub attempt: u32,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// Raised when the soft time limit passes: the handler should wrap up. The hard limit follows
    /// and abandons the attempt whatever the handler does.
    pub soft_limit: SoftLimit,
    /// Raised when an operator cancels the task (`kobe task cancel`): a handler that stops — any
    /// error it returns then — ends the task `REVOKED`; one that runs on ends as it ends.
    pub cancel: Signal,
    /// What a worker offers tasks that need more than their arguments; `None` outside a worker.
    pub context: Option<Arc<TaskContext>>,
    /// The W3C trace context the task was submitted under, for calls the task makes onwards.
    pub traceparent: Option<String>,
}

impl Invocation {
    /// An invocation outside a worker: attempt 1, no limits, no context.
    pub fn new(task_id: TaskId, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        Self {
            task_id,
            attempt: 1,
            args,
            kwargs,
            soft_limit: Signal::never(),
            cancel: Signal::never(),
            context: None,
            traceparent: None,
        }
    }

    /// Resolves when the handler should wrap up: the soft limit passed or the task was cancelled.
    /// Says which.
    pub(crate) async fn wrap_up(&self) -> WrapUp {
        let (mut soft_limit, mut cancel) = (self.soft_limit.clone(), self.cancel.clone());
        tokio::select! {
            () = cancel.raised() => WrapUp::Cancelled,
            () = soft_limit.raised() => WrapUp::SoftLimit,
        }
    }
    /// The worker's context, or a permanent error for a task that cannot run without one.
    pub(crate) fn context(&self) -> Result<Arc<TaskContext>, TaskError> {
        self.context
            .clone()
            .ok_or_else(|| TaskError::Permanent("this task needs a worker's context".into()))
    }
}

/// Why a handler is asked to wrap up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WrapUp {
    SoftLimit,
    Cancelled,
}

/// Services a worker lends to tasks: the lease frontier, checkpoints, shard plans, and a way to
/// submit child tasks.
pub struct TaskContext {
    pub leases: LeaseRepository,
    pub checkpoints: CheckpointRepository,
    pub shards: ShardRepository,
    pub spawner: Arc<dyn Spawner>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext").finish_non_exhaustive()
    }
}

/// A task submitted by a running task.
#[derive(Debug, Clone)]
pub struct ChildTask {
    pub id: TaskId,
    pub task_name: String,
    pub kwargs: Map<String, Value>,
    pub parent_id: TaskId,
}

/// Submits child tasks (implemented where tasks meet the broker, in `commands`).
pub trait Spawner: Send + Sync {
    /// Records and publishes `child`. Spawning an id that already exists is not an error: a
    /// retried parent spawns the same children again.
    fn spawn(
        &self,
        child: ChildTask,
    ) -> Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + '_>>;
}

/// A one-way switch a handler watches: the soft time limit passing, or an operator's cancel.
#[derive(Debug, Clone)]
pub struct Signal(tokio::sync::watch::Receiver<bool>);

/// The soft time limit as a handler sees it.
pub(crate) type SoftLimit = Signal;

impl Signal {
    /// A signal and the switch that raises it.
    pub(crate) fn pair() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (raise, signal) = tokio::sync::watch::channel(false);
        (raise, Self(signal))
    }

    /// A signal that is never raised.
    pub fn never() -> Self {
        Self::pair().1
    }

    pub fn is_raised(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the signal is raised; never, if it will not be.
    pub async fn raised(&mut self) {
        if self.0.wait_for(|raised| *raised).await.is_err() {
            // The switch is gone without being raised: it will not be.
            std::future::pending::<()>().await;
        }
    }
}

/// Input a task refuses at submission time, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    /// A path such as `kwargs.duration_ms`.
    pub field: String,
    pub reason: String,
}

/// How often and how patiently a task is retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 3 means up to 4 attempts.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub factor: f64,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry): exponential, capped, with
    /// "equal jitter": half the delay is fixed and half is random, so delays still grow from one
    /// retry to the next while retries of many tasks do not arrive in lockstep. `jitter` is a
    /// uniform sample from [0, 1).
    pub(crate) fn delay_for(&self, retry: u32, jitter: f64) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let nominal = self.base_delay.as_secs_f64() * self.factor.powi(exponent);
        let capped = nominal.min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(capped / 2.0 + capped / 2.0 * jitter.clamp(0.0, 1.0))
    }
}

/// A named unit of work.
pub trait Task: Send + Sync + 'static {
    /// The name clients submit it by; unique in a registry.
    fn name(&self) -> &'static str;

    /// Checks arguments before the task is accepted, so bad input is a 422 at submission
    /// instead of a dead letter later.
    fn validate(&self, _args: &[Value], _kwargs: &Map<String, Value>) -> Result<(), InvalidInput> {
        Ok(())
    }

    /// Runs one attempt. Handlers must be idempotent: delivery is at least once.
    fn run(&self, invocation: Invocation) -> TaskFuture;

    /// What kind of task this is, as `GET /tasks` shows it: `rust` for a task compiled in,
    /// `http`, `command` or `celery` (run by Python Celery workers) for one declared in
    /// `KOBE_TASKS_FILE`.
    fn kind(&self) -> &'static str {
        "rust"
    }

    /// The route (queue suffix) the task travels on unless `KOBE_TASK_ROUTES` says otherwise.
    fn route(&self) -> Option<&str> {
        None
    }

    /// The priority of a submission that names none.
    fn priority(&self) -> Option<Priority> {
        None
    }

    /// A JSON Schema for the kwargs, checked at submission before [`Task::validate`].
    fn kwargs_schema(&self) -> Option<&KwargsSchema> {
        None
    }

    /// Retries for retryable errors.
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }

    /// Hard time limit when the message carries none: the attempt is abandoned and fails.
    fn time_limit(&self) -> Duration {
        Duration::from_secs(300)
    }

    /// Soft time limit when the message carries none: the handler is told and may clean up.
    fn soft_time_limit(&self) -> Option<Duration> {
        None
    }
}

/// Checks a submission's arguments against the task's schema, then its own validation.
pub(crate) fn check_input(
    task: &dyn Task,
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<(), InvalidInput> {
    if let Some(schema) = task.kwargs_schema() {
        schema.check(kwargs)?;
    }
    task.validate(args, kwargs)
}

/// A registry that refused a task.
#[derive(Debug, thiserror::Error)]
#[error("a task named `{0}` is already registered")]
pub struct DuplicateTask(pub &'static str);

/// The tasks a process can run, fixed at start-up.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<&'static str, Arc<dyn Task>>,
    /// Periodic tasks (`[[schedule]]` in the tasks file, or [`Registry::schedule`]).
    schedules: Vec<crate::domain::schedule::Schedule>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Kobe's built-in tasks.
    pub fn with_builtin_tasks() -> Self {
        let mut registry = Self::new();
        let registered = registry
            .register(DemoLongIo)
            .and_then(|()| registry.register(DemoShardedJob))
            .and_then(|()| registry.register(DemoShard));
        registered.expect("built-in task names are unique");
        registry
    }

    pub fn register(&mut self, task: impl Task) -> Result<(), DuplicateTask> {
        self.register_shared(Arc::new(task))
    }

    /// Registers a task already behind an `Arc` (a declared task, built at run time).
    pub fn register_shared(&mut self, task: Arc<dyn Task>) -> Result<(), DuplicateTask> {
        let name = task.name();
        if self.tasks.contains_key(name) {
            return Err(DuplicateTask(name));
        }
        self.tasks.insert(name, task);
        Ok(())
    }

    /// Adds a periodic task. A name already scheduled, or a task not registered, is refused
    /// (register the task first). A schedule that starts a workflow has its steps checked when
    /// the schedules start firing, as `POST /workflow/start` checks them.
    pub fn schedule(&mut self, schedule: crate::domain::schedule::Schedule) -> Result<(), String> {
        if self.schedules.iter().any(|s| s.name == schedule.name) {
            return Err(format!("schedule `{}` is declared twice", schedule.name));
        }
        if schedule.workflow.is_none() && !self.tasks.contains_key(schedule.task.as_str()) {
            return Err(format!(
                "schedule `{}` names task `{}`, which is not registered (known: {})",
                schedule.name,
                schedule.task,
                self.names().join(", ")
            ));
        }
        self.schedules.push(schedule);
        Ok(())
    }

    /// The periodic tasks, in the order they were added.
    pub fn schedules(&self) -> &[crate::domain::schedule::Schedule] {
        &self.schedules
    }

    /// Task name → route, for every task that names its own route.
    pub fn routes(&self) -> BTreeMap<String, String> {
        self.tasks
            .values()
            .filter_map(|task| Some((task.name().to_owned(), task.route()?.to_owned())))
            .collect()
    }

    /// The tasks Kobe's workers run: all but those Celery workers do (`kind = "celery"`).
    pub fn run_here(&self) -> Self {
        let mut here = self.clone();
        here.tasks.retain(|_, task| task.kind() != CELERY_KIND);
        here
    }

    /// Names of the tasks Celery workers run (`kind = "celery"`).
    pub fn celery_tasks(&self) -> Vec<String> {
        self.tasks
            .values()
            .filter(|task| task.kind() == CELERY_KIND)
            .map(|task| task.name().to_owned())
            .collect()
    }

    /// Routes only Celery workers' tasks travel on: Kobe's workers leave their queues alone.
    pub fn celery_only_routes(&self) -> Vec<String> {
        let mut celery: Vec<String> = Vec::new();
        let mut here: Vec<&str> = vec![crate::amqp::topology::DEFAULT_ROUTE];
        for task in self.tasks.values() {
            match (task.kind() == CELERY_KIND, task.route()) {
                (true, Some(route)) => celery.push(route.to_owned()),
                (false, Some(route)) => here.push(route),
                _ => {}
            }
        }
        celery.retain(|route| !here.contains(&route.as_str()));
        celery.sort();
        celery.dedup();
        celery
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.tasks.get(name).cloned()
    }

    /// Whether a task of that name is registered.
    pub fn knows(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// Every registered task, by name.
    pub fn tasks(&self) -> impl Iterator<Item = Arc<dyn Task>> + '_ {
        self.tasks.values().cloned()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.tasks.keys().copied().collect()
    }
}

/// Reads an optional non-negative integer kwarg, naming it when it has the wrong type.
pub(crate) fn optional_u64(
    kwargs: &Map<String, Value>,
    name: &str,
    default: u64,
) -> Result<u64, InvalidInput> {
    match kwargs.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value.as_u64().ok_or_else(|| InvalidInput {
            field: format!("kwargs.{name}"),
            reason: "expected a non-negative integer".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_are_capped() {
        let policy = RetryPolicy {
            max_retries: 10,
            base_delay: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_millis(1000),
        };
        assert_eq!(policy.delay_for(1, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay_for(1, 1.0), Duration::from_millis(100));
        // The slowest second retry is no faster than the fastest... of the next one.
        for retry in 1..4 {
            assert!(policy.delay_for(retry + 1, 0.0) >= policy.delay_for(retry, 1.0));
        }
        assert_eq!(policy.delay_for(30, 1.0), Duration::from_millis(1000));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut registry = Registry::with_builtin_tasks();
        assert!(registry.register(DemoLongIo).is_err());
        assert_eq!(
            registry.names(),
            vec!["demo_long_io", "demo_shard", "demo_sharded_job"]
        );
    }
}
