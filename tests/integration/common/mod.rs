//! Helpers shared by the integration tests: each test gets its own MongoDB database, AMQP prefix
//! and Redis prefix, talks to the real services, and removes what it created when it ends (also
//! when it panics).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use kobe::amqp::Topology;
use kobe::commands;
use kobe::config::Settings;
use kobe::http::Application;
use kobe::tasks::Registry;
use mongodb::Database;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The MongoDB the test script chose.
pub fn mongodb_uri() -> String {
    std::env::var("KOBE_TEST_MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into())
}

/// How long a test waits for a process or server it started to come up. Generous, because the
/// wait polls a condition and ends as soon as it holds: a slow machine or a slow MongoDB engine
/// costs time only when it is really slow. `KOBE_TEST_STARTUP_S` overrides it.
pub fn startup_deadline() -> Duration {
    let seconds = std::env::var("KOBE_TEST_STARTUP_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

mod pool;
mod private;
pub mod proxy;

pub use private::{
    close_connections, free_port, signal, wait_exit, PrivateRabbit, PrivateRedis, Process,
};

/// The scenario most tests start from: the test's services with Kobe's schema, an API that is
/// ready and a worker at the shipped settings. Bind `env` (as `_env` if unused): dropping it
/// gives back the database and deletes the queues.
pub struct Running {
    pub env: TestEnv,
    pub api: TestApi,
    pub worker: TestWorker,
}

/// The body of a built-in task that sleeps `duration_ms` and succeeds: the quick task a test
/// submits when what it runs does not matter.
pub fn quick_task(duration_ms: u64) -> Value {
    serde_json::json!({"task_name": "demo_long_io", "kwargs": {"duration_ms": duration_ms}})
}

/// One test's private slice of the services.
pub struct TestEnv {
    pub vars: HashMap<String, String>,
    pub settings: Settings,
    pub db: Database,
    pub topology: Topology,
    database: TestDatabase,
}

/// Where a test's MongoDB data lives, and so what its end cleans up.
enum TestDatabase {
    /// Borrowed from the pool of initialized databases: given back.
    Pooled(pool::Lease),
    /// Created for this test alone, without the schema: dropped.
    Fresh(String),
    /// The test points Kobe at a MongoDB of its own (or none): nothing to clean.
    Elsewhere,
}

impl TestEnv {
    /// A test with a database from the pool: Kobe's schema is in place and every collection is
    /// empty.
    pub async fn new() -> Self {
        Self::with(&[]).await
    }

    /// With extra settings (`KOBE_*` variables) on top of the test's own names.
    pub async fn with(extra: &[(&str, &str)]) -> Self {
        Self::build(extra, false).await
    }

    /// With a database of its own that has no collections and no indexes yet, for tests of
    /// `init-db` and of what happens without the schema.
    pub async fn with_fresh_database(extra: &[(&str, &str)]) -> Self {
        Self::build(extra, true).await
    }

    async fn build(extra: &[(&str, &str)], fresh: bool) -> Self {
        // HTTP clients of tests use rustls, as Kobe's do: it needs a crypto provider.
        kobe::tasks::declared::http::install_tls_provider();
        kobe::telemetry::init(
            &std::env::var("KOBE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            kobe::config::LogFormat::Pretty,
        );
        let name = unique("kobetest");
        let mut vars: HashMap<String, String> = HashMap::from([
            ("MONGODB_URI".into(), mongodb_uri()),
            ("KOBE_AMQP_PREFIX".into(), name.clone()),
            ("KOBE_REDIS_PREFIX".into(), name.clone()),
            ("KOBE_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            ("KOBE_SHUTDOWN_GRACE".into(), "10".into()),
            // A killed attempt's task is taken over this soon after (tests kill workers).
            ("KOBE_EXECUTION_LEASE_MS".into(), "3000".into()),
        ]);
        for (k, v) in extra {
            vars.insert((*k).into(), (*v).into());
        }
        let database = if vars["MONGODB_URI"] != mongodb_uri() || vars.contains_key("MONGODB_DB") {
            TestDatabase::Elsewhere
        } else if fresh {
            TestDatabase::Fresh(name.replace('-', "_"))
        } else {
            TestDatabase::Pooled(pool::acquire(&mongodb_uri()).await)
        };
        let db_name = match &database {
            TestDatabase::Pooled(lease) => lease.name.clone(),
            TestDatabase::Fresh(name) => name.clone(),
            TestDatabase::Elsewhere => vars
                .get("MONGODB_DB")
                .cloned()
                .unwrap_or_else(|| name.replace('-', "_")),
        };
        vars.insert("MONGODB_DB".into(), db_name);
        let settings =
            Settings::from_lookup(|k| vars.get(k).cloned()).expect("test settings are valid");
        let db = kobe::store::connect(
            &settings.mongo.uri,
            &settings.mongo.db,
            Duration::from_secs(5),
            kobe::store::Monitoring::Driver,
        )
        .await
        .expect("MongoDB client");
        let topology = commands::topology(&settings);
        Self {
            vars,
            settings,
            db,
            topology,
            database,
        }
    }

    /// A test of its own with `extra` settings, the schema applied, an API and a worker of
    /// `concurrency` slots: see [`Running`].
    pub async fn with_worker(extra: &[(&str, &str)], concurrency: u16) -> Running {
        let env = Self::with(extra).await;
        env.init_db().await;
        let api = env.spawn_api().await;
        let worker = env.spawn_worker(concurrency);
        Running { env, api, worker }
    }

    pub async fn init_db(&self) {
        kobe::store::migrations::apply(&self.db, |_| {})
            .await
            .expect("migrations apply");
    }

    /// Starts the API on a free port and waits until it is ready, so its publisher has declared
    /// the topology before the test runs (and before cleanup deletes it).
    pub async fn spawn_api(&self) -> TestApi {
        let api = self.spawn_api_unready().await;
        eventually(startup_deadline(), "API ready", || async {
            let response = api.get("/ready").await;
            (response.status() == 200).then_some(())
        })
        .await;
        api
    }

    /// Starts the API on a free port without waiting for its dependencies.
    pub async fn spawn_api_unready(&self) -> TestApi {
        self.spawn_api_with(Registry::with_builtin_tasks()).await
    }

    /// Starts the API with a registry of the test's own, without waiting for its dependencies.
    pub async fn spawn_api_with(&self, registry: Registry) -> TestApi {
        let state = commands::serve::state(&self.settings, registry)
            .await
            .expect("app state");
        let app = Application::build(state, self.settings.api.addr, Duration::from_secs(5))
            .expect("bind");
        let port = app.port();
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        TestApi {
            address: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            handle,
        }
    }

    /// A worker running the built-in tasks and the test's own `task`.
    pub fn worker_with(&self, concurrency: u16, task: impl kobe::tasks::Task) -> TestWorker {
        let mut registry = Registry::with_builtin_tasks();
        registry
            .register(task)
            .expect("a task name of the test's own");
        self.spawn_worker_on(concurrency, Vec::new(), registry)
    }

    /// Waits until the queue of `route` holds no ready message.
    pub async fn wait_queue_empty(&self, route: &str, what: &str) {
        let queue = self.topology.queue(route);
        eventually(Duration::from_secs(30), what, || async {
            (self.queue_depth(queue.clone()).await? == 0).then_some(())
        })
        .await;
    }

    /// Starts a worker in this process; stop it with [`TestWorker::stop`].
    pub fn spawn_worker(&self, concurrency: u16) -> TestWorker {
        self.spawn_worker_on(concurrency, Vec::new(), Registry::with_builtin_tasks())
    }

    pub fn spawn_worker_on(
        &self,
        concurrency: u16,
        routes: Vec<String>,
        registry: Registry,
    ) -> TestWorker {
        self.spawn_worker_with_settings(self.settings.clone(), concurrency, routes, registry)
    }

    /// A worker of this test's names with settings of the test's own (a connection through a
    /// proxy, say).
    pub fn spawn_worker_with_settings(
        &self,
        settings: Settings,
        concurrency: u16,
        routes: Vec<String>,
        registry: Registry,
    ) -> TestWorker {
        let (stop, stopped) = oneshot::channel::<()>();
        // The shipped default unless the test is about the setting.
        let prefetch_multiplier = self
            .vars
            .get("KOBE_PREFETCH_MULTIPLIER")
            .and_then(|m| m.parse().ok())
            .unwrap_or(kobe::cli::DEFAULT_PREFETCH_MULTIPLIER);
        let options = commands::worker::WorkerOptions {
            concurrency,
            prefetch_multiplier,
            routes,
            metrics_addr: None,
        };
        let join = tokio::spawn(commands::worker::run(
            settings,
            options,
            registry,
            async move {
                let _ = stopped.await;
            },
        ));
        TestWorker {
            stop: Some(stop),
            join,
        }
    }
}

impl Drop for TestEnv {
    /// Gives back (or drops) the database and deletes the AMQP topology, on a thread of its own
    /// so it also runs while a failed test unwinds.
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let topology = self.topology.clone();
        let database = std::mem::replace(&mut self.database, TestDatabase::Elsewhere);
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    match database {
                        TestDatabase::Pooled(lease) => lease.release(&mongodb_uri()).await,
                        TestDatabase::Fresh(name) => {
                            if let Ok(db) = kobe::store::connect(
                                &kobe::config::ServiceUrl::new(mongodb_uri()),
                                &name,
                                Duration::from_secs(5),
                                kobe::store::Monitoring::Driver,
                            )
                            .await
                            {
                                let _ = db.drop().await;
                            }
                        }
                        TestDatabase::Elsewhere => {}
                    }
                });
            }
            if let Err(e) = kobe::amqp::delete_topology(&settings.broker.url, &topology) {
                eprintln!("cleanup of {}: {e}", topology.tasks_exchange());
            }
        })
        .join();
    }
}

pub struct TestApi {
    pub address: String,
    pub client: reqwest::Client,
    pub handle: actix_web::dev::ServerHandle,
}

impl TestApi {
    pub async fn start_task(&self, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}/task/start", self.address))
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// Submits and returns the task id, asserting a 202.
    pub async fn submit(&self, body: Value) -> String {
        let response = self.start_task(body).await;
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        let body: Value = response.json().await.unwrap();
        body["task_id"].as_str().unwrap().to_owned()
    }

    /// `GET {path}` on the API.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("request")
    }

    /// `GET {path}` on the API with a bearer token.
    pub async fn get_as(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn status(&self, id: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/task/status/{id}", self.address))
            .send()
            .await
            .expect("request")
    }

    /// Polls the status until `accept` holds or the deadline passes; returns every state seen.
    pub async fn wait_for_state(
        &self,
        id: &str,
        deadline: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<String>) {
        let mut seen: Vec<String> = Vec::new();
        let started = Instant::now();
        loop {
            let response = self.status(id).await;
            if response.status() == 200 {
                let body: Value = response.json().await.unwrap();
                let state = body["state"].as_str().unwrap_or_default().to_owned();
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
                if accept(&body) {
                    return (body, seen);
                }
            }
            assert!(
                started.elapsed() < deadline,
                "task {id} not done within {deadline:?}; states seen: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_for_final(&self, id: &str, deadline: Duration) -> (Value, Vec<String>) {
        self.wait_for_state(id, deadline, |b| b["ready"] == true)
            .await
    }

    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

pub struct TestWorker {
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<anyhow::Result<kobe::commands::Ended>>,
}

impl TestWorker {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.join)
            .await
            .expect("worker task")
            .expect("worker run");
    }
}

/// Waits until `check` returns `Some`, polling, or panics at the deadline.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the API at `base` answers `/ready` with 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    eventually(startup_deadline(), "serve ready", || async {
        let response = client.get(format!("{base}/ready")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
}

/// A message read back from a queue.
#[derive(Debug)]
pub struct QueuedMessage {
    pub headers: amiquip::FieldTable,
}

impl QueuedMessage {
    pub fn header_text(&self, name: &str) -> Option<String> {
        match self.headers.get(name)? {
            amiquip::AmqpValue::LongString(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl TestEnv {
    /// A publisher of this test's own, for messages the API would not send.
    /// A publisher with the shipped confirm timeout, returned once it is connected: on a
    /// loaded machine connecting and declaring the topology can take seconds, which must not
    /// come out of the first publish's confirm budget.
    pub fn publisher(&self) -> kobe::amqp::Publisher {
        let publisher = kobe::amqp::Publisher::start(
            &self.settings.broker.url,
            self.topology.clone(),
            self.settings.broker.publish_timeout,
        )
        .expect("publisher");
        let deadline = std::time::Instant::now() + startup_deadline();
        while let Err(e) = publisher.connected() {
            assert!(
                std::time::Instant::now() < deadline,
                "the publisher did not connect within {:?}: {e}",
                startup_deadline()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        publisher
    }

    /// A submitter of this test's own, wired as `serve` wires its own.
    pub fn submitter(&self) -> kobe::submit::Submitter {
        kobe::commands::submitter(
            &self.settings,
            &self.db,
            commands::cache(&self.settings).expect("Redis pool"),
            self.publisher(),
            commands::writer(&self.settings, &self.db),
        )
    }

    /// Publishes a task message to its route, as a Celery client would.
    pub async fn publish_message(
        &self,
        publisher: &kobe::amqp::Publisher,
        message: &kobe::amqp::TaskMessage,
    ) {
        self.publish_raw(publisher, message.properties(), message.body())
            .await;
    }

    pub async fn publish_raw(
        &self,
        publisher: &kobe::amqp::Publisher,
        properties: amiquip::AmqpProperties,
        body: Vec<u8>,
    ) {
        publisher
            .publish(kobe::amqp::Outgoing {
                exchange: self.topology.tasks_exchange(),
                routing_key: kobe::amqp::topology::DEFAULT_ROUTE.into(),
                body,
                properties,
            })
            .await
            .expect("publish confirmed");
    }

    /// Takes every message now in `queue` (acking them).
    pub async fn drain(&self, queue: String) -> Vec<QueuedMessage> {
        let url = self.settings.broker.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection =
                kobe::amqp::connect(&url, Duration::from_secs(5)).expect("connect");
            let channel = connection.open_channel(None).expect("channel");
            let mut messages = Vec::new();
            while let Some(get) = channel.basic_get(queue.as_str(), true).expect("basic.get") {
                messages.push(QueuedMessage {
                    headers: get
                        .delivery
                        .properties
                        .headers()
                        .clone()
                        .unwrap_or_default(),
                });
            }
            let _ = connection.close();
            messages
        })
        .await
        .unwrap()
    }

    /// Messages ready in `queue`, as the broker reports them.
    /// How many consumers `queue` has.
    pub async fn consumer_count(&self, queue: String) -> Option<u32> {
        self.declared(queue, |q| q.declared_consumer_count()).await
    }

    pub async fn queue_depth(&self, queue: String) -> Option<u32> {
        self.declared(queue, |q| q.declared_message_count()).await
    }

    /// What a passive declare of `queue` says, read by `read`.
    async fn declared(
        &self,
        queue: String,
        read: fn(&amiquip::Queue) -> Option<u32>,
    ) -> Option<u32> {
        let url = self.settings.broker.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = kobe::amqp::connect(&url, Duration::from_secs(5)).ok()?;
            let channel = connection.open_channel(None).ok()?;
            let value = read(&channel.queue_declare_passive(queue).ok()?);
            let _ = connection.close();
            value
        })
        .await
        .ok()?
    }

    /// Waits until the dead-letter queue holds `count` messages, and takes them.
    pub async fn dead_letters(&self, count: usize) -> Vec<QueuedMessage> {
        let mut all = Vec::new();
        let started = Instant::now();
        while all.len() < count {
            all.extend(self.drain(self.topology.dead_letter_queue()).await);
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} of {count} dead letters: {all:?}",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        all
    }

    pub fn tasks(&self) -> kobe::store::TaskRepository {
        kobe::store::TaskRepository::new(&self.db)
    }

    /// Waits until the task's document is in a final state.
    pub async fn wait_final(&self, id: &str, deadline: Duration) -> kobe::store::TaskDocument {
        let tasks = self.tasks();
        eventually(deadline, &format!("task {id} finished"), || async {
            tasks
                .get(id)
                .await
                .ok()
                .flatten()
                .filter(|t| t.state.is_final())
        })
        .await
    }

    /// Waits until the task is final, and checks it failed for a reason mentioning `cause`.
    pub async fn wait_failure(
        &self,
        id: &str,
        deadline: Duration,
        cause: &str,
    ) -> kobe::store::TaskDocument {
        let task = self.wait_final(id, deadline).await;
        assert_eq!(task.state, kobe::domain::TaskState::Failure, "{task:?}");
        assert!(
            task.root_cause
                .as_deref()
                .unwrap_or_default()
                .contains(cause),
            "the root cause should mention {cause:?}: {task:?}"
        );
        task
    }

    /// Waits for the first dead letter and checks its `x-kobe-reason` mentions `reason`.
    pub async fn dead_letter_for(&self, reason: &str) -> Vec<QueuedMessage> {
        let dead = self.dead_letters(1).await;
        let stated = dead[0].header_text("x-kobe-reason").unwrap_or_default();
        assert!(
            stated.contains(reason),
            "the dead letter's reason should mention {reason:?}: {stated:?}"
        );
        dead
    }

    /// The `kobe` binary with this test's settings.
    pub fn kobe_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kobe"));
        command
            .env_clear()
            .args(["--env-file", "/dev/null"])
            .args(args);
        for (k, v) in &self.vars {
            command.env(k, v);
        }
        command.env("KOBE_LOG_LEVEL", "info");
        command
    }
}

/// The value of a metric sample in this process's registry (`name{labels}` as rendered).
pub fn metric(sample: &str) -> f64 {
    kobe::telemetry::metrics::metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
