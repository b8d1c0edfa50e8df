//! Helpers shared by the integration tests: each test gets its own MongoDB database, AMQP prefix
//! and Redis prefix, talks to the real services, and removes what it created when it ends (also
//! when it panics).
#![allow(dead_code)]

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

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One test's private slice of the services.
pub struct TestEnv {
    pub vars: HashMap<String, String>,
    pub settings: Settings,
    pub db: Database,
    pub topology: Topology,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with(&[]).await
    }

    /// With extra settings (`KOBE_*` variables) on top of the test's own names.
    pub async fn with(extra: &[(&str, &str)]) -> Self {
        kobe::telemetry::init(
            &std::env::var("KOBE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            kobe::config::LogFormat::Pretty,
        );
        let name = unique("kobetest");
        let mut vars: HashMap<String, String> = HashMap::from([
            ("MONGODB_URI".into(), mongodb_uri()),
            ("MONGODB_DB".into(), name.replace('-', "_")),
            ("KOBE_AMQP_PREFIX".into(), name.clone()),
            ("KOBE_REDIS_PREFIX".into(), name.clone()),
            ("KOBE_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            ("KOBE_SHUTDOWN_GRACE".into(), "10".into()),
        ]);
        for (k, v) in extra {
            vars.insert((*k).into(), (*v).into());
        }
        let settings =
            Settings::from_lookup(|k| vars.get(k).cloned()).expect("test settings are valid");
        let db = kobe::store::connect(
            &settings.mongodb_uri,
            &settings.mongodb_db,
            Duration::from_secs(5),
        )
        .await
        .expect("MongoDB client");
        let topology = commands::topology(&settings);
        Self {
            vars,
            settings,
            db,
            topology,
        }
    }

    pub async fn init_db(&self) {
        kobe::store::migrations::apply(&self.db)
            .await
            .expect("migrations apply");
    }

    /// Starts the API on a free port and waits until it is ready, so its publisher has declared
    /// the topology before the test runs (and before cleanup deletes it).
    pub async fn spawn_api(&self) -> TestApi {
        let api = self.spawn_api_unready().await;
        eventually(Duration::from_secs(15), "API ready", || async {
            let response = api
                .client
                .get(format!("{}/ready", api.address))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        api
    }

    /// Starts the API on a free port without waiting for its dependencies.
    pub async fn spawn_api_unready(&self) -> TestApi {
        let state = commands::serve::state(&self.settings, Registry::with_builtin_tasks())
            .await
            .expect("app state");
        let app = Application::build(state, self.settings.http_addr, Duration::from_secs(5))
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
        let (stop, stopped) = oneshot::channel::<()>();
        let options = commands::worker::WorkerOptions {
            concurrency,
            prefetch_multiplier: 1,
            routes,
        };
        let join = tokio::spawn(commands::worker::run(
            self.settings.clone(),
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
    /// Drops the database and deletes the AMQP topology, on a thread of its own so it also runs
    /// while a failed test unwinds.
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    if let Ok(db) = kobe::store::connect(
                        &settings.mongodb_uri,
                        &settings.mongodb_db,
                        Duration::from_secs(5),
                    )
                    .await
                    {
                        let _ = db.drop().await;
                    }
                });
            }
            if let Err(e) = kobe::amqp::delete_topology(&settings.rabbitmq_url, &topology) {
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
    join: JoinHandle<anyhow::Result<()>>,
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
