//! Every variable Kobe reads, in one table: its name, its default and what it means. Settings take
//! their defaults from here, and `.env.example` and the README's configuration table are generated
//! from it (a test fails when either has drifted: `KOBE_BLESS=1 cargo test --lib config` rewrites
//! them).

/// One variable.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    /// The value when it is unset or empty (empty: none).
    pub default: &'static str,
    /// What it means, for `.env.example` and the README.
    pub help: &'static str,
    /// Written commented out in `.env.example` (its mere presence changes behaviour).
    pub commented: bool,
    /// Holds (or may hold) a credential: keep it out of files that are shared; Kobe never logs it.
    pub secret: bool,
}

const fn var(name: &'static str, default: &'static str, help: &'static str) -> Variable {
    Variable {
        name,
        default,
        help,
        commented: false,
        secret: false,
    }
}

const fn secret(variable: Variable) -> Variable {
    Variable {
        secret: true,
        ..variable
    }
}

/// Every variable, in the order `.env.example` lists them.
pub const VARIABLES: &[Variable] = &[
    secret(var("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f", "RabbitMQ: amqp://user:password@host:port/vhost (%2f is the default vhost \"/\"). amqp:// only; terminate TLS in front of the broker. A cluster: its nodes comma-separated — every connection goes to the first that answers and moves to the next when it is lost. Passwords are shown as *** in every log line.")),
    secret(var("MONGODB_URI", "mongodb://127.0.0.1:27017", "MongoDB connection string (mongodb:// or mongodb+srv://; TLS options in the string work). Its write concern is Kobe's: with ?w=majority&journal=true (as in docker-compose.yml) a 202 survives the loss of a MongoDB node.")),
    var("MONGODB_DB", "kobe", "Kobe's MongoDB database."),
    var("KOBE_MONGODB_INDEX_TYPE", "auto", "How `init-db` creates indexes: `auto` uses DocumentDB's composite type (2.5× cheaper to keep up to date) where the engine is DocumentDB and the engine's default elsewhere; `standard` or `composite` (DocumentDB only) force one. Existing indexes are left as they are."),
    secret(var("REDIS_URL", "redis://127.0.0.1:6379/0", "Redis: redis://[:password@]host:port/db (rediss:// for TLS).")),
    var("KOBE_HTTP_ADDR", "127.0.0.1:8000", "Where `kobe serve` listens. Use 0.0.0.0:8000 inside a container."),
    var("KOBE_LOG_LEVEL", "info", "Log filter (tracing EnvFilter syntax: info, debug, kobe=debug,warn …)."),
    var("KOBE_LOG_FORMAT", "pretty", "Log format: pretty or json (one object per line)."),
    var("KOBE_AMQP_PREFIX", "kobe", "Prefix of every exchange and queue (kobe.tasks, kobe.default, kobe.dlq …)."),
    var("KOBE_REDIS_PREFIX", "kobe", "Prefix of every Redis key."),
    var("KOBE_QUEUE_TYPE", "classic", "classic (one broker) or quorum (a cluster): with quorum every queue that holds a task — routes, delay queues, the DLQ — is a quorum queue with at-least-once dead-lettering. Queues cannot change type in place: see the README's \"Switching to quorum queues\"."),
    var("KOBE_QUORUM_DELIVERY_LIMIT", "10000", "With quorum queues: the broker's x-delivery-limit, set explicitly (RabbitMQ 4 defaults to 20) and high, so a message requeued often — during a MongoDB outage, say — is decided by Kobe's own cap (KOBE_MAX_DELIVERIES), not dead-lettered by the broker."),
    var("KOBE_TASK_ROUTES", "", "Task → route (queue {prefix}.{route}), as task=route,…; unrouted tasks go to \"default\". Example: demo_long_io=io"),
    var("KOBE_PUBLISH_TIMEOUT_MS", "5000", "How long a publish waits for RabbitMQ's confirm before the API answers 503 (milliseconds)."),
    var("KOBE_PUBLISH_QUEUE", "4096", "Publishes that may wait for the publishing connection; more are refused at once with 503 and Retry-After: 1."),
    var("KOBE_DEPENDENCY_TIMEOUT_MS", "3000", "How long /ready and `kobe healthcheck` wait for each dependency (milliseconds)."),
    var("KOBE_SHUTDOWN_GRACE", "30", "How long a stopping worker lets running tasks finish, and `serve` lets requests finish (seconds)."),
    var("KOBE_CONCURRENCY", "10", "Worker: tasks running at once (the --concurrency flag wins)."),
    var("KOBE_PREFETCH_MULTIPLIER", "4", "Worker: prefetch = concurrency × multiplier (the --prefetch-multiplier flag wins). More than one lets short tasks share MongoDB commands."),
    var("KOBE_QUEUES", "", "Worker: routes to consume, comma-separated; empty: every route (the --queues flag wins)."),
    var("KOBE_WORKER_METRICS_ADDR", "", "Worker: where to serve /metrics; empty: nowhere (the --metrics-addr flag wins)."),
    var("KOBE_SLOT_WAIT_MS", "1000", "Worker: a prefetched message that finds no free run slot within this long goes back to its queue (milliseconds), so a prefetch above the concurrency never holds long tasks back."),
    var("KOBE_EXECUTION_LEASE_MS", "30000", "Worker: a running attempt holds its task's execution lease this long and renews it every third of it (milliseconds). A copy of the task delivered again waits for the attempt to finish, or for its lease to lapse if its worker died."),
    var("KOBE_UNKNOWN_TASK_GRACE_MS", "300000", "Worker: a message whose task this worker does not know goes back (every 30 s) for a worker that does — during a rolling deploy, say — for this long before it is closed FAILURE and dead-lettered as an unknown task (milliseconds; 0: at once)."),
    var("KOBE_MAX_DELIVERIES", "5", "Worker: starts of one attempt (each ended by a worker dying) after which its message is poison: the task is closed FAILURE and the message dead-lettered with the count."),
    var("KOBE_BATCH_LINGER_US", "1000", "Group commit: how long the first write of a batch waits for company (microseconds, at most 2000); writes already queued always join. 0 drains faster on DocumentDB but sends concurrent writes of one key as separate commands, which PostgreSQL may answer with a deadlock (error 112)."),
    var("KOBE_BATCH_MAX", "500", "Group commit: statements per MongoDB command at most."),
    var("KOBE_TASKS_FILE", "", "A TOML file of tasks that need no Rust (kind = \"http\" or \"command\", or \"celery\" for tasks Python Celery workers run) and of periodic tasks ([[schedule]]), read by serve, worker and beat at start; see examples/tasks.toml and `kobe tasks check FILE`. Empty: none."),
    var("KOBE_BEAT", "true", "Whether `kobe serve` fires the periodic tasks (one replica at a time, by a lease in MongoDB). false: leave it to `kobe beat` or other replicas."),
    var("KOBE_BEAT_LEASE_MS", "15000", "How long the schedules' leader holds its lease without renewing it (renewed every fifth): after a leader dies, another replica fires within about this long."),
    secret(var("KOBE_TASK_SIGNING_SECRET", "", "The secret (at least 16 characters) an http task signs its request body with (HMAC-SHA256 of the timestamp and body, in X-Kobe-Signature), unless the task names its own variable in signing_secret_env. Required when KOBE_TASKS_FILE declares an http task.")),
    var("KOBE_RETRY_MAX", "", "Retries after the first attempt, for every task; empty: each task's own policy (3 retries, 1 s base, factor 2, 300 s cap; delays exponential with jitter)."),
    var("KOBE_RETRY_BASE_MS", "", "Delay before the first retry, for every task (milliseconds); empty: each task's own."),
    var("KOBE_RETRY_FACTOR", "", "Growth of the delay from one retry to the next, for every task; empty: each task's own."),
    var("KOBE_RETRY_MAX_DELAY_MS", "", "Longest delay between retries, for every task (milliseconds); empty: each task's own."),
    var("KOBE_TASK_RETRY", "", "Retry policy of one task each, over the above: demo_long_io:max=5,base_ms=100,factor=2,cap_ms=2000;other:max=0"),
    var("KOBE_DEDUP_WINDOW_S", "86400", "How long a dedup fingerprint (Idempotency-Key, dedup_key or \"dedup\": true) keeps answering with its first task (seconds)."),
    var("KOBE_PAYLOAD_INLINE_LIMIT", "16384", "Arguments or results larger than this (bytes of JSON) are kept in MongoDB's RawPayload and the message carries a reference."),
    var("KOBE_OUTBOX_AGE_MS", "30000", "The outbox sweeper in `serve` publishes tasks recorded but never confirmed by the broker once they are this old (milliseconds)."),
    var("KOBE_OUTBOX_INTERVAL_MS", "5000", "How often the outbox sweeper looks (milliseconds)."),
    var("KOBE_BULK_MAX", "1000", "Most tasks in one POST /task/start_many (1–10,000); its body may be up to 16 × KOBE_MAX_BODY_BYTES."),
    var("KOBE_MAX_BODY_BYTES", "1048576", "Largest accepted request body (bytes); larger ones get 413."),
    var("KOBE_STATUS_CACHE_TTL_MS", "2000", "How long a status answer may come from Redis (milliseconds). Every state change invalidates it."),
    var("KOBE_RESULT_BACKEND", "none", "Result backend: none (GET /task/result answers 404 result-backend-off) or redis."),
    var("KOBE_RESULT_TTL", "86400", "With the redis result backend: how long each result is kept (seconds)."),
    secret(var("KOBE_CELERY_RESULTS", "", "Celery's result backend, as Celery's result_backend names it (redis://[:password@]host:port/db): Kobe workers write each task's state and result there as a Celery worker does (celery-task-meta-<id>, published on the key's channel), so Python's AsyncResult(id).get(), .state and .traceback work for tasks run by Kobe. A finished task's delivery is acked once its meta is written. Empty: not written.")),
    var("KOBE_CELERY_RECONCILE_AFTER_MS", "300000", "With tasks declared kind = \"celery\" and KOBE_CELERY_RESULTS set: serve reads Celery's result backend for such a task still unfinished this long after its last change (milliseconds), and records the outcome found there, so a task event lost (a broker restart, a worker without -E) does not leave it unfinished for good."),
    var("KOBE_CELERY_RESULT_EXPIRES", "86400", "With KOBE_CELERY_RESULTS: how long each task's meta is kept (seconds; Celery's result_expires)."),
    var("KOBE_CELERY_EVENTS", "false", "Workers send Celery's worker and task events (worker-online, worker-heartbeat, task-started, task-succeeded, …) to the celeryev exchange and answer Celery's remote control (ping, stats, active, registered; revoke cancels the task), so Flower and `celery inspect` show Kobe workers as kobe-<pid>@<host>."),
    var("KOBE_RATE_LIMIT", "0", "Requests per window per client (bearer token, else IP address) on /task* and /tasks, counted over a sliding window; over it, 429 with Retry-After. 0, the default, turns it off (FastAPI and Celery have none); e.g. 100 turns it on."),
    var("KOBE_RATE_WINDOW_MS", "1000", "The rate limit's window (milliseconds)."),
    var("KOBE_TRUSTED_PROXIES", "", "Addresses or networks (comma-separated: 127.0.0.1, 10.0.0.0/8) of the proxies in front of the API, such as the TLS proxy SECURITY.md prescribes: a request from one is counted, for the rate limit and the sign-in tries, under the last address its X-Forwarded-For names that is not itself a trusted proxy. Empty: under the connection's own address (X-Forwarded-For is ignored, as anyone can send it)."),
    secret(var("KOBE_API_TOKENS", "", "Bearer tokens (comma-separated, 16+ characters each). When set, every route needs \"Authorization: Bearer <token>\" (the operator page: a session from /ui/login) except /health, /ready (which then tells the unauthenticated only what is up), /docs, /openapi.json and /ui/login, and /metrics unless KOBE_METRICS_AUTH=true. Removing a token ends the page sessions opened with it. Empty: no authentication.")),
    var("KOBE_METRICS_AUTH", "false", "Whether /metrics needs a bearer token too."),
    var("KOBE_LOG_PAYLOADS", "false", "Log task arguments when a worker starts a task. Off by default: payloads may hold personal data."),
    Variable {
        commented: true,
        ..var("OTEL_EXPORTER_OTLP_ENDPOINT", "", "OpenTelemetry: an OTLP/HTTP endpoint (e.g. http://localhost:4318) to export spans to; unset, nothing is exported. The standard OTEL_* variables (OTEL_SERVICE_NAME, …) apply.")
    },
];

/// The default of `name`. Every variable Kobe reads is in [`VARIABLES`]; asking for another is a
/// bug, caught by the settings' own tests.
pub fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .unwrap_or_else(|| panic!("{name} is not in config::VARIABLES"))
}

/// `.env.example`, generated.
#[cfg(test)]
pub(crate) fn env_example() -> String {
    let mut out = String::from(
        "# Kobe's settings. Copy to .env (never commit .env) or set them in the environment; variables\n\
         # already set win over this file. Every value shown is the default, which matches the services of\n\
         # docker-compose.yml reached from the host. Generated from src/config/variables.rs.\n",
    );
    for v in VARIABLES {
        out.push('\n');
        let help = if v.secret {
            format!("Secret. {}", v.help)
        } else {
            v.help.to_owned()
        };
        for line in wrap(&help, 98) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        if v.commented {
            out.push_str("# ");
        }
        out.push_str(&format!("{}={}\n", v.name, v.default));
    }
    out
}

/// The README's configuration table, generated.
#[cfg(test)]
pub(crate) fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for v in VARIABLES {
        let default = if v.default.is_empty() {
            "(none)".to_owned()
        } else {
            format!("`{}`", v.default)
        };
        let secret = if v.secret { "**secret** " } else { "" };
        out.push_str(&format!(
            "| `{}` | {default} | {secret}{} |\n",
            v.name,
            v.help.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const README_START: &str =
        "<!-- configuration table: generated from src/config/variables.rs -->\n";
    const README_END: &str = "<!-- end of the configuration table -->";

    fn root(file: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file)
    }

    /// `.env.example` and the README say what the table says.
    #[test]
    fn env_example_and_readme_are_generated_from_the_table() {
        let bless = std::env::var("KOBE_BLESS").is_ok();
        let env_path = root(".env.example");
        let env = std::fs::read_to_string(&env_path).unwrap();
        if bless {
            std::fs::write(&env_path, env_example()).unwrap();
        } else {
            assert_eq!(
                env,
                env_example(),
                ".env.example drifted from src/config/variables.rs: KOBE_BLESS=1 cargo test --lib config"
            );
        }
        let readme_path = root("README.md");
        let readme = std::fs::read_to_string(&readme_path).unwrap();
        let start = readme
            .find(README_START)
            .expect("README has the table's start marker")
            + README_START.len();
        let end = readme[start..]
            .find(README_END)
            .expect("README has the table's end marker")
            + start;
        if bless {
            let updated = format!("{}{}{}", &readme[..start], markdown_table(), &readme[end..]);
            std::fs::write(&readme_path, updated).unwrap();
        } else {
            assert_eq!(
                &readme[start..end],
                markdown_table(),
                "README's table drifted from src/config/variables.rs: KOBE_BLESS=1 cargo test --lib config"
            );
        }
    }

    #[test]
    fn names_are_unique_and_help_is_given() {
        let mut names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VARIABLES.len());
        assert!(VARIABLES.iter().all(|v| !v.help.is_empty()));
    }
}
