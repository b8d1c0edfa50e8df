//! Settings: read once at start-up from the environment (and an optional `.env`), parsed into typed
//! values, and rejected with a message naming the variable when a value is malformed.
//!
//! Every setting has a default that matches `docker-compose.yml` run on one machine, so `kobe serve`
//! works against local services with no configuration at all.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

mod parse;
pub mod variables;

pub use variables::{default_of, VARIABLES};

use crate::domain::QueueKind;
use parse::{duration_ms, parse_factor, parse_retries, parse_routes, parse_task_retry, Reader};

/// A configuration error, naming the variable so the operator knows what to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

/// A connection URL that may carry a password. `Display` and `Debug` print it with the password
/// replaced by `***`; only [`ServiceUrl::expose`] hands out the real thing, to the client that
/// connects with it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its credentials, for the one client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for ServiceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceUrl({self})")
    }
}

/// This machine's name: `$HOSTNAME`, else `/etc/hostname` (for `origin` headers and lease holders).
pub(crate) fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// This worker process where Celery's tools show workers (Flower, `celery inspect`, a task's
/// result meta), in Celery's `name@host` form: `kobe-<pid>@<host>`.
pub fn celery_hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "kobe-{}@{}",
            std::process::id(),
            host_name().unwrap_or_else(|| "unknown".into())
        )
    })
}

/// This worker process, as the attempts it runs name it: `host:pid`.
pub fn worker_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "{}:{}",
            host_name().unwrap_or_else(|| "unknown".into()),
            std::process::id()
        )
    })
}

/// Replaces the password of `scheme://user:password@host…` with `***`. Works on URLs the `url`
/// crate refuses (MongoDB's `host1,host2` seed lists), and leaves URLs without a password alone.
pub fn redact_url(url: &str) -> String {
    // A list of URLs (a cluster's nodes) has a password in each.
    if url.matches("://").count() > 1 {
        return url.split(',').map(redact_one).collect::<Vec<_>>().join(",");
    }
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last '@' of the authority ends the credentials: a password may itself contain '@'.
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..authority_start],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// A secret value: `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pretty" => Ok(Self::Pretty),
            "json" => Ok(Self::Json),
            other => Err(format!("expected `pretty` or `json`, got `{other}`")),
        }
    }
}

/// Everything Kobe can be told from outside, validated, grouped by who reads it. Every group is
/// read from the environment by the same reader, with the same errors naming the variable.
#[derive(Clone, Debug)]
pub struct Settings {
    pub broker: BrokerSettings,
    pub mongo: MongoSettings,
    pub redis: RedisSettings,
    pub api: ApiSettings,
    pub worker: WorkerSettings,
    pub submit: SubmitSettings,
    pub beat: BeatSettings,
    pub celery: CelerySettings,
    /// A `tracing` filter directive such as `info` or `kobe=debug,info`.
    pub log_level: String,
    pub log_format: LogFormat,
    /// How long a readiness or health probe waits for one dependency.
    pub dependency_timeout: Duration,
    /// How long a stopping `serve` or `worker` lets what is in flight finish.
    pub shutdown_grace: Duration,
    /// Tasks declared in a TOML file (`KOBE_TASKS_FILE`), read at start by `serve` and `worker`.
    pub tasks_file: Option<std::path::PathBuf>,
}

/// RabbitMQ: where it is, how Kobe names and shapes its queues, how publishes wait.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// `amqp://user:password@host:port/vhost` (several, comma-separated, for a cluster).
    pub url: ServiceUrl,
    /// Prefix of every AMQP exchange and queue name, so several deployments (or tests) can share
    /// one broker without touching each other's messages.
    pub prefix: String,
    /// Classic queues (one broker) or quorum queues (a cluster).
    pub queue_kind: QueueKind,
    /// With quorum queues: the broker's `x-delivery-limit`.
    pub quorum_delivery_limit: u32,
    /// How long a publish may wait for the broker's confirm before the caller gets an error.
    pub publish_timeout: Duration,
    /// Publishes that may wait for the publishing connection; more are refused at once (503).
    pub publish_queue: usize,
    /// Task name → route (queue suffix); unrouted tasks go to `default`.
    pub task_routes: BTreeMap<String, String>,
}

/// MongoDB: where it is, its indexes, and how writes are grouped into commands.
#[derive(Clone, Debug)]
pub struct MongoSettings {
    /// The connection string.
    pub uri: ServiceUrl,
    /// The database holding Kobe's collections.
    pub db: String,
    /// How `init-db` creates indexes.
    pub index_type: crate::domain::IndexChoice,
    /// How long the first write of a group-commit batch waits for others.
    pub batch_linger: Duration,
    /// Statements per group-commit command at most.
    pub batch_max: usize,
}

/// Redis: where it is, its keys, what it caches.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port/db`.
    pub url: ServiceUrl,
    /// Prefix of every Redis key Kobe writes.
    pub prefix: String,
    /// How long a status answer may be served from Redis.
    pub status_cache_ttl: Duration,
    /// Keep results in Redis for `GET /task/result/{id}`, for this long; `None`: off.
    pub result_ttl: Option<Duration>,
}

/// Working beside a Celery fleet on one broker.
#[derive(Clone, Debug)]
pub struct CelerySettings {
    /// Celery's Redis result backend, written by Kobe workers as Celery workers write it; `None`:
    /// not written.
    pub results: Option<ServiceUrl>,
    /// How long a result stays there (Celery's `result_expires`).
    pub result_expires: Duration,
    /// Workers send Celery's worker and task events and answer Celery's remote control.
    pub events: bool,
    /// How long a `kind = "celery"` task may stay unfinished before `serve` looks for its
    /// outcome in the result backend (an event may have been lost).
    pub reconcile_after: Duration,
}

/// The HTTP API of `kobe serve`.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most tasks in one `POST /task/start_many`.
    pub bulk_max: usize,
    /// Requests per window per client on `/task*`; 0 turns rate limiting off.
    pub rate_limit: u32,
    pub rate_window: Duration,
    /// Bearer tokens accepted on `/task*` (and `/metrics` when `metrics_auth`); empty: no auth.
    pub tokens: Secret<Vec<String>>,
    /// Whether `/metrics` needs a token too.
    pub metrics_auth: bool,
    /// Proxies whose `X-Forwarded-For` names the client (rate limits, sign-in tries).
    pub trusted_proxies: Vec<crate::domain::network::Network>,
}

/// How `kobe worker` runs tasks.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// How long a running attempt's execution lease holds without renewal (renewed every third
    /// of it). A copy of the task delivered again waits at most this long after its attempt died.
    pub execution_lease: Duration,
    /// Starts of one attempt after which its message is poison: closed `FAILURE` and
    /// dead-lettered with the count.
    pub max_deliveries: u32,
    /// How long a prefetched delivery may wait for a run slot before it goes back to its queue.
    pub slot_wait: Duration,
    /// How long a message of a task no worker it met knows keeps coming back before it is closed
    /// as an unknown task.
    pub unknown_task_grace: Duration,
    /// Overrides of every task's retry policy, where set.
    pub retry: RetryOverrides,
    /// Overrides for one task each, applied after `retry`.
    pub task_retry: BTreeMap<String, RetryOverrides>,
    /// Log task arguments when a worker starts a task (off: payloads may hold personal data).
    pub log_payloads: bool,
}

/// How tasks come in: dedup, large arguments, the outbox.
#[derive(Clone, Debug)]
pub struct SubmitSettings {
    /// How long a dedup fingerprint keeps answering with its first task.
    pub dedup_window: Duration,
    /// Arguments and results larger than this many bytes (as JSON) go to `RawPayload`.
    pub payload_inline_limit: usize,
    /// The outbox publishes unconfirmed tasks older than this...
    pub outbox_age: Duration,
    /// ...looking this often.
    pub outbox_interval: Duration,
}

/// The periodic tasks.
#[derive(Clone, Debug)]
pub struct BeatSettings {
    /// `serve` fires them (competing for the lead with other replicas).
    pub enabled: bool,
    /// The schedules' leader lease.
    pub lease: Duration,
}

/// Deployment-wide overrides of the retry policies tasks declare.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetryOverrides {
    pub max_retries: Option<u32>,
    pub base_delay: Option<Duration>,
    pub factor: Option<f64>,
    pub max_delay: Option<Duration>,
}

impl Settings {
    /// Reads settings from the process environment (after `.env`, which `main` loads).
    pub(crate) fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of mutating the
    /// environment of the whole test process.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let read = Reader::new(lookup);
        let http_addr = read
            .value("KOBE_HTTP_ADDR")
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError {
                var: "KOBE_HTTP_ADDR",
                reason: format!("expected host:port such as 127.0.0.1:8000 ({e})"),
            })?;
        let log_level = read.value("KOBE_LOG_LEVEL");
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| ConfigError {
            var: "KOBE_LOG_LEVEL",
            reason: format!("not a log filter such as `info` or `kobe=debug,warn` ({e})"),
        })?;
        let result_ttl = match read.value("KOBE_RESULT_BACKEND").as_str() {
            "none" | "off" => None,
            "redis" => Some(read.seconds("KOBE_RESULT_TTL")?)
                .filter(|ttl| !ttl.is_zero())
                .or(Some(Duration::from_secs(1))),
            other => {
                return Err(ConfigError {
                    var: "KOBE_RESULT_BACKEND",
                    reason: format!("expected `none` or `redis`, got `{other}`"),
                })
            }
        };
        let rate_limit = read
            .value("KOBE_RATE_LIMIT")
            .parse::<u32>()
            .map_err(|_| ConfigError {
                var: "KOBE_RATE_LIMIT",
                reason: "expected requests per window (0 turns it off)".into(),
            })?;
        let api_tokens: Vec<String> = read
            .value("KOBE_API_TOKENS")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if api_tokens.iter().any(|t| t.len() < 16) {
            return Err(ConfigError {
                var: "KOBE_API_TOKENS",
                reason: "every token needs at least 16 characters".into(),
            });
        }
        let execution_lease = read.millis("KOBE_EXECUTION_LEASE_MS")?;
        if execution_lease < Duration::from_millis(300) {
            return Err(ConfigError {
                var: "KOBE_EXECUTION_LEASE_MS",
                reason: "expected at least 300 milliseconds (it is renewed every third of it)"
                    .into(),
            });
        }
        let retry = RetryOverrides {
            max_retries: read.maybe("KOBE_RETRY_MAX", parse_retries)?,
            base_delay: read.maybe("KOBE_RETRY_BASE_MS", duration_ms)?,
            factor: read.maybe("KOBE_RETRY_FACTOR", parse_factor)?,
            max_delay: read.maybe("KOBE_RETRY_MAX_DELAY_MS", duration_ms)?,
        };

        Ok(Self {
            broker: BrokerSettings {
                url: read.url("RABBITMQ_URL", &["amqp"])?,
                prefix: read.name("KOBE_AMQP_PREFIX")?,
                queue_kind: read.parsed("KOBE_QUEUE_TYPE")?,
                quorum_delivery_limit: read.number(
                    "KOBE_QUORUM_DELIVERY_LIMIT",
                    1..=1_000_000_000,
                    "a number of deliveries",
                )?,
                publish_timeout: read.millis("KOBE_PUBLISH_TIMEOUT_MS")?,
                publish_queue: read.number(
                    "KOBE_PUBLISH_QUEUE",
                    1..=1_000_000,
                    "a number of publishes",
                )?,
                task_routes: parse_routes(&read.value("KOBE_TASK_ROUTES"))?,
            },
            mongo: MongoSettings {
                uri: read.url("MONGODB_URI", &["mongodb", "mongodb+srv"])?,
                db: read.name("MONGODB_DB")?,
                index_type: read.parsed("KOBE_MONGODB_INDEX_TYPE")?,
                batch_linger: Duration::from_micros(read.number(
                    "KOBE_BATCH_LINGER_US",
                    0..=2000,
                    "microseconds",
                )?),
                batch_max: read.number("KOBE_BATCH_MAX", 1..=10_000, "statements per command")?,
            },
            redis: RedisSettings {
                url: read.url("REDIS_URL", &["redis", "rediss"])?,
                prefix: read.name("KOBE_REDIS_PREFIX")?,
                status_cache_ttl: read.millis("KOBE_STATUS_CACHE_TTL_MS")?,
                result_ttl,
            },
            api: ApiSettings {
                addr: http_addr,
                max_body_bytes: read.number(
                    "KOBE_MAX_BODY_BYTES",
                    1024..=64 * 1024 * 1024,
                    "a number of bytes",
                )?,
                bulk_max: read.number("KOBE_BULK_MAX", 1..=10_000, "a number of tasks")?,
                rate_limit,
                rate_window: read.millis("KOBE_RATE_WINDOW_MS")?,
                tokens: Secret::new(api_tokens),
                metrics_auth: read.flag("KOBE_METRICS_AUTH")?,
                trusted_proxies: read.networks("KOBE_TRUSTED_PROXIES")?,
            },
            worker: WorkerSettings {
                execution_lease,
                max_deliveries: read.number(
                    "KOBE_MAX_DELIVERIES",
                    1..=u32::MAX,
                    "a number of deliveries",
                )?,
                slot_wait: read.millis("KOBE_SLOT_WAIT_MS")?,
                unknown_task_grace: read.millis_or_zero("KOBE_UNKNOWN_TASK_GRACE_MS")?,
                retry,
                task_retry: parse_task_retry(&read.value("KOBE_TASK_RETRY"))?,
                log_payloads: read.flag("KOBE_LOG_PAYLOADS")?,
            },
            submit: SubmitSettings {
                dedup_window: read.seconds("KOBE_DEDUP_WINDOW_S")?,
                payload_inline_limit: read.number(
                    "KOBE_PAYLOAD_INLINE_LIMIT",
                    256..=8 * 1024 * 1024,
                    "a number of bytes",
                )?,
                outbox_age: read.millis("KOBE_OUTBOX_AGE_MS")?,
                outbox_interval: read.millis("KOBE_OUTBOX_INTERVAL_MS")?,
            },
            beat: BeatSettings {
                enabled: read.flag("KOBE_BEAT")?,
                lease: read.millis("KOBE_BEAT_LEASE_MS")?,
            },
            celery: CelerySettings {
                results: read.optional_url("KOBE_CELERY_RESULTS", &["redis", "rediss"])?,
                result_expires: read.seconds("KOBE_CELERY_RESULT_EXPIRES")?,
                events: read.flag("KOBE_CELERY_EVENTS")?,
                reconcile_after: read.millis("KOBE_CELERY_RECONCILE_AFTER_MS")?,
            },
            log_level,
            log_format: read.parsed("KOBE_LOG_FORMAT")?,
            dependency_timeout: read.millis("KOBE_DEPENDENCY_TIMEOUT_MS")?,
            shutdown_grace: read.seconds("KOBE_SHUTDOWN_GRACE")?,
            tasks_file: read.optional("KOBE_TASKS_FILE").map(Into::into),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_local_stack() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.api.addr.to_string(), "127.0.0.1:8000");
        assert_eq!(s.mongo.db, "kobe");
        assert_eq!(s.log_format, LogFormat::Pretty);
        assert_eq!(s.broker.url.expose(), default_of("RABBITMQ_URL"));
        assert_eq!(s.broker.prefix, "kobe");
    }

    #[test]
    fn every_password_of_a_broker_list_is_hidden() {
        let shown = redact_url("amqp://u:one@h1:5672,amqp://u:two@h2:5672/v");
        assert_eq!(shown, "amqp://u:***@h1:5672,amqp://u:***@h2:5672/v");
        let seeds = redact_url("mongodb://u:pw@h1,h2:27017/db?replicaSet=rs");
        assert_eq!(seeds, "mongodb://u:***@h1,h2:27017/db?replicaSet=rs");
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (var, value) in [
            ("KOBE_HTTP_ADDR", "not-an-address"),
            ("KOBE_LOG_FORMAT", "xml"),
            ("RABBITMQ_URL", "http://localhost"),
            ("RABBITMQ_URL", "amqp://a:5672,http://b:5672"),
            ("KOBE_QUORUM_DELIVERY_LIMIT", "0"),
            ("MONGODB_URI", "localhost:27017"),
            ("REDIS_URL", "127.0.0.1:6379"),
            ("MONGODB_DB", "bad/name"),
            ("KOBE_PUBLISH_TIMEOUT_MS", "soon"),
            ("KOBE_TASK_ROUTES", "demo_long_io"),
            ("KOBE_SHUTDOWN_GRACE", "-1"),
            ("KOBE_BEAT", "sometimes"),
            ("KOBE_QUEUE_TYPE", "stream"),
            ("KOBE_RETRY_FACTOR", "0.5"),
            ("KOBE_RETRY_MAX", "many"),
            ("KOBE_PAYLOAD_INLINE_LIMIT", "1"),
            ("KOBE_OUTBOX_AGE_MS", "0"),
            ("KOBE_RESULT_BACKEND", "memcached"),
            ("KOBE_API_TOKENS", "short"),
            ("KOBE_METRICS_AUTH", "maybe"),
            ("KOBE_MAX_BODY_BYTES", "10"),
            ("KOBE_EXECUTION_LEASE_MS", "100"),
            ("KOBE_MAX_DELIVERIES", "0"),
            ("KOBE_BATCH_LINGER_US", "5000"),
            ("KOBE_BATCH_MAX", "0"),
            ("KOBE_PUBLISH_QUEUE", "0"),
        ] {
            let err = settings(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{value}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn routes_parse_into_a_map() {
        let s = settings(&[("KOBE_TASK_ROUTES", "demo_long_io=io, other=bulk")]).unwrap();
        assert_eq!(s.broker.task_routes.get("demo_long_io").unwrap(), "io");
        assert_eq!(s.broker.task_routes.get("other").unwrap(), "bulk");
    }

    #[test]
    fn per_task_retry_policies_parse() {
        let s = settings(&[(
            "KOBE_TASK_RETRY",
            "demo_long_io:max=5,base_ms=100,factor=3,cap_ms=2000; other:max=0",
        )])
        .unwrap();
        let demo = &s.worker.task_retry["demo_long_io"];
        assert_eq!(demo.max_retries, Some(5));
        assert_eq!(demo.base_delay, Some(Duration::from_millis(100)));
        assert_eq!(demo.factor, Some(3.0));
        assert_eq!(demo.max_delay, Some(Duration::from_secs(2)));
        assert_eq!(s.worker.task_retry["other"].max_retries, Some(0));
        let err = settings(&[("KOBE_TASK_RETRY", "demo_long_io:tries=5")]).unwrap_err();
        assert_eq!(err.var, "KOBE_TASK_RETRY");
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let s = settings(&[("KOBE_API_TOKENS", "a-very-long-secret-token")]).unwrap();
        assert_eq!(s.api.tokens.expose().len(), 1);
        assert!(!format!("{s:?}").contains("a-very-long-secret-token"));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:s3cr@t@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("mongodb://u:pw@h1:1,h2:2/?replicaSet=x"),
            "mongodb://u:***@h1:1,h2:2/?replicaSet=x"
        );
        assert_eq!(
            redact_url("redis://:pw@localhost/0"),
            "redis://:***@localhost/0"
        );
        assert_eq!(redact_url("redis://localhost/0"), "redis://localhost/0");
        let url = ServiceUrl::new("amqp://a:hunter2@x/");
        assert!(!format!("{url} {url:?}").contains("hunter2"));
    }

    #[test]
    fn a_bad_url_error_does_not_echo_its_password() {
        let err = settings(&[("RABBITMQ_URL", "http://u:hunter2@x")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
