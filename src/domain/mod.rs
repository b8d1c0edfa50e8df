//! Domain vocabulary: task ids, task states and priorities, parsed once at the edge. No I/O here.

pub mod document;
pub mod fingerprint;
pub mod network;
pub mod schedule;
pub mod shard;

pub use fingerprint::Fingerprint;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A task's identity: the `_id` of its `Tasks` document and the AMQP `message_id`.
///
/// Kobe generates UUIDv4 ids; ids from Celery clients are accepted too, so the only rules are the
/// ones that keep an id safe in a URL path, a Redis key and a log line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= 128
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err("a task id is 1–128 characters of letters, digits, `-`, `_`, `.` or `:`".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id as the store holds it: it was checked when it came in, and one an older version
    /// let through is still the task's name.
    pub fn stored(raw: String) -> Self {
        Self(raw)
    }
}

/// A task id reads as the text it is wherever text is wanted (a filter, a key, a log line).
impl std::ops::Deref for TaskId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for TaskId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for TaskId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TaskId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for TaskId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<TaskId> for String {
    fn eq(&self, other: &TaskId) -> bool {
        *self == other.0
    }
}

impl PartialEq<TaskId> for &str {
    fn eq(&self, other: &TaskId) -> bool {
        *self == other.0
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> Self {
        id.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one normalized state a client sees. States only move forward:
/// `PENDING → STARTED → (RETRY → STARTED)* → SUCCESS | FAILURE | REVOKED`, where `REVOKED` may
/// also follow `PENDING` or `RETRY` directly (cancelled before it ran again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Recorded and published; no worker has taken it yet.
    Pending,
    /// A worker is running it.
    Started,
    /// An attempt failed with a retryable error; the next attempt waits in a delay queue.
    Retry,
    /// Finished; the result is recorded.
    Success,
    /// Finished without a result: retries spent, a permanent error, a time limit, or never
    /// published.
    Failure,
    /// Cancelled by an operator: before it ran (its message is acked unrun when it arrives), or
    /// while it ran and its handler stopped when asked.
    Revoked,
}

impl TaskState {
    pub(crate) const ALL: [TaskState; 6] = [
        Self::Pending,
        Self::Started,
        Self::Retry,
        Self::Success,
        Self::Failure,
        Self::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Started => "STARTED",
            Self::Retry => "RETRY",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Revoked => "REVOKED",
        }
    }

    /// Finished states never change again — but for an operator's retry (`kobe task retry`,
    /// `kobe dlq replay`), which reopens a `FAILURE` or `REVOKED` task as `RETRY` for one more
    /// attempt.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure | Self::Revoked)
    }

    /// Final states an operator may run again.
    pub(crate) const RERUNNABLE: [TaskState; 2] = [Self::Failure, Self::Revoked];

    /// The states a task may be in for a transition to `self` to be allowed: the table the store's
    /// transition filters are tested against.
    #[cfg(test)]
    pub(crate) fn allowed_predecessors(self) -> &'static [TaskState] {
        match self {
            Self::Pending => &[],
            // A redelivery after a crash finds the task STARTED and starts it again.
            Self::Started => &[Self::Pending, Self::Started, Self::Retry],
            Self::Retry => &[Self::Pending, Self::Started],
            Self::Success | Self::Failure | Self::Revoked => {
                &[Self::Pending, Self::Started, Self::Retry]
            }
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown task state `{s}`"))
    }
}

/// Classic queues for one broker; quorum queues for a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueKind {
    Classic,
    Quorum,
}

impl FromStr for QueueKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "classic" => Ok(Self::Classic),
            "quorum" => Ok(Self::Quorum),
            other => Err(format!("expected `classic` or `quorum`, got `{other}`")),
        }
    }
}

/// AMQP message priority, 0 (lowest) to 9 (highest), as RabbitMQ recommends for classic queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Priority(u8);

/// A stored priority out of range (none is written) reads as the nearest one.
impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        Ok(Self(value.clamp(0, i64::from(Self::MAX)) as u8))
    }
}

impl Priority {
    pub const MAX: u8 = 9;

    pub fn new(value: i64) -> Result<Self, String> {
        u8::try_from(value)
            .ok()
            .filter(|v| *v <= Self::MAX)
            .map(Self)
            .ok_or_else(|| format!("priority must be between 0 and {}", Self::MAX))
    }

    pub fn value(self) -> u8 {
        self.0
    }
}

/// Longest time limit a task may have: the API refuses more, and a message asking for more (a
/// Celery client's `timelimit` of 2e19 s, say) gets this. It stays below the broker's
/// `consumer_timeout` (deploy/rabbitmq/20-kobe.conf).
/// Milliseconds since the Unix epoch, now (0 on a clock set before 1970).
pub(crate) fn epoch_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks a name that ends up in queue names, database names, Redis keys or metric labels: 1–64
/// characters of letters, digits, `_`, `-` or `.`.
pub(crate) fn check_safe_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{value}` must be 1–64 characters of letters, digits, `_`, `-` or `.`"
        ))
    }
}

pub(crate) const MAX_TIME_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Seconds from a message header as a time limit: absent, non-finite or non-positive values
/// mean "none given"; values past `MAX_TIME_LIMIT` are clamped to it. Never panics.
pub fn time_limit(seconds: Option<f64>) -> Option<Duration> {
    let seconds = seconds.filter(|s| s.is_finite() && *s > 0.0)?;
    Some(
        Duration::try_from_secs_f64(seconds)
            .unwrap_or(MAX_TIME_LIMIT)
            .min(MAX_TIME_LIMIT),
    )
}

/// How secondary indexes are created (`KOBE_MONGODB_INDEX_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexChoice {
    /// Composite where the engine is DocumentDB, the engine's own default elsewhere.
    #[default]
    Auto,
    /// The engine's default type (MongoDB's only one).
    Standard,
    /// DocumentDB's composite type (`enableCompositeTerm: true`).
    Composite,
}

impl std::str::FromStr for IndexChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "standard" => Ok(Self::Standard),
            "composite" => Ok(Self::Composite),
            other => Err(format!(
                "`{other}` is not an index type: auto, standard or composite"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_limits_are_clamped_not_panicked_on() {
        assert_eq!(time_limit(Some(2e19)), Some(MAX_TIME_LIMIT));
        assert_eq!(time_limit(Some(f64::INFINITY)), None);
        assert_eq!(time_limit(Some(f64::NAN)), None);
        assert_eq!(time_limit(Some(-1.0)), None);
        assert_eq!(time_limit(Some(0.0)), None);
        assert_eq!(time_limit(Some(1.5)), Some(Duration::from_millis(1500)));
        assert_eq!(time_limit(None), None);
    }

    #[test]
    fn generated_ids_parse() {
        let id = TaskId::generate();
        assert_eq!(TaskId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn unsafe_ids_are_refused() {
        for bad in ["", "a/b", "a b", "x\n", &"a".repeat(129)] {
            assert!(TaskId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn states_round_trip_and_only_move_forward() {
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>().unwrap(), state);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        for target in TaskState::ALL {
            for from in target.allowed_predecessors() {
                assert!(!from.is_final(), "{from} -> {target}");
            }
        }
    }

    #[test]
    fn priority_is_bounded() {
        assert_eq!(Priority::new(9).unwrap().value(), 9);
        assert!(Priority::new(10).is_err());
        assert!(Priority::new(-1).is_err());
    }
}
