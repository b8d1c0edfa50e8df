//! Redis: the status cache, the optional result backend and rate-limit counters. Redis only ever
//! holds copies: MongoDB is written first and stays the authority, and every read falls back to it
//! when Redis is slow or down.
//!
//! Write-invalidate without stale reads: a state change writes MongoDB, then replaces the cached
//! status with an *invalidation marker* that lives longer than any cache entry. Readers fill the
//! cache only with `SET NX` (so never over a marker), and only if their MongoDB read began less
//! than half a TTL ago — so a slow reader holding an old state can never put it back.

use std::time::{Duration, Instant};

use deadpool_redis::{redis, Config, Pool, Runtime};

use super::StoreError;
use crate::cause::Cause;
use crate::config::ServiceUrl;

/// INCR this window's counter (on its first request, set its expiry) and read the previous
/// window's: a sliding window, so tries that straddle a boundary still add up.
const RATE_LIMIT_SCRIPT: &str = "local n = redis.call('INCRBY', KEYS[1], ARGV[2]) \
     if n == tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
     return {n, tonumber(redis.call('GET', KEYS[2]) or '0')}";

/// What an invalidated status key holds.
const MARKER: &str = "!invalidated";

/// What [`Cache::query`] sends.
enum Query {
    Command(redis::Cmd),
    Pipeline(redis::Pipeline),
}

/// A Redis pool with Kobe's key prefix.
#[derive(Clone)]
pub struct Cache {
    pool: Pool,
    prefix: String,
    /// Bound on health checks.
    timeout: Duration,
    /// Bound on cache operations on the request path: a slow Redis costs little.
    op_timeout: Duration,
    status_ttl: Duration,
}

impl Cache {
    /// Builds the pool; connections open lazily, so this succeeds while Redis is down.
    pub fn new(url: &ServiceUrl, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let op_timeout = timeout.min(Duration::from_millis(250));
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
            StoreError::Redis(Cause::context(format!("invalid REDIS_URL {url}"), e))
        })?;
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
            timeout,
            op_timeout,
            status_ttl: Duration::from_secs(2),
        })
    }

    /// With a status TTL other than the default 2 s.
    pub(crate) fn with_status_ttl(mut self, ttl: Duration) -> Self {
        self.status_ttl = ttl;
        self
    }

    /// `kobe:{rest}`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn status_key(&self, task_id: &str) -> String {
        self.key(&format!("task:{task_id}:status"))
    }

    fn result_key(&self, task_id: &str) -> String {
        self.key(&format!("task:{task_id}:result"))
    }

    /// Runs one command within `timeout`, recording its latency (and failure) by command name.
    async fn run<T: redis::FromRedisValue>(
        &self,
        command: redis::Cmd,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        let name = match command.args_iter().next() {
            Some(redis::Arg::Simple(bytes)) => String::from_utf8_lossy(bytes).to_ascii_uppercase(),
            _ => "UNKNOWN".to_owned(),
        };
        self.query(&name, Query::Command(command), timeout).await
    }

    /// Sends a command or a pipeline on a pooled connection within `timeout`, recorded under
    /// `name`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        name: &str,
        query: Query,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        // Boxed: the pool's and the connection's futures are tens of kilobytes, and every caller's
        // own future (a submission, a status, an outcome) would carry and copy them inline.
        let attempt = Box::pin(async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| StoreError::Redis(Cause::of(e)))?;
            match query {
                Query::Command(command) => command.query_async::<T>(&mut conn).await,
                Query::Pipeline(pipe) => pipe.query_async::<T>(&mut conn).await,
            }
            .map_err(|e| StoreError::Redis(Cause::of(e)))
        });
        let bounded = async {
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| StoreError::Redis(format!("no answer within {timeout:?}").into()))?
        };
        measured(name, bounded).await
    }

    /// `PING`, bounded by the configured timeout.
    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = self.run(redis::cmd("PING"), self.timeout).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Redis(
                format!("unexpected PING answer {pong:?}").into(),
            ))
        }
    }

    /// The cached status JSON, if a fresh one is there.
    #[tracing::instrument(name = "cache.status.get", skip(self))]
    pub async fn status(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(self.status_key(task_id));
        let value: Option<String> = self.run(command, self.op_timeout).await?;
        Ok(value.filter(|v| v != MARKER))
    }

    /// Caches a status read from MongoDB at `read_started`, unless a state change invalidated
    /// it since (marker present) or the read is too old to trust.
    #[tracing::instrument(name = "cache.status.put", skip(self, json))]
    pub(crate) async fn put_status(
        &self,
        task_id: &str,
        json: &str,
        read_started: Instant,
    ) -> Result<(), StoreError> {
        if read_started.elapsed() > self.status_ttl / 2 {
            return Ok(());
        }
        let mut command = redis::cmd("SET");
        command
            .arg(self.status_key(task_id))
            .arg(json)
            .arg("NX")
            .arg("PX")
            .arg(self.status_ttl.as_millis() as u64);
        let _: Option<String> = self.run(command, self.op_timeout).await?;
        Ok(())
    }

    /// Called after every state change, once MongoDB has it.
    pub(crate) async fn invalidate_status(&self, task_id: &str) -> Result<(), StoreError> {
        self.invalidate_statuses(&[task_id.to_owned()]).await
    }

    /// Invalidates statuses in one round trip: each key is replaced by a marker that outlives any
    /// entry a reader may still be about to write (see the module docs).
    #[tracing::instrument(name = "cache.status.invalidate_many", skip_all, fields(count = task_ids.len()))]
    pub(crate) async fn invalidate_statuses(&self, task_ids: &[String]) -> Result<(), StoreError> {
        let marker_ttl = (self.status_ttl * 2).as_millis() as u64;
        let mut pipe = redis::pipe();
        for id in task_ids {
            pipe.cmd("SET")
                .arg(self.status_key(id))
                .arg(MARKER)
                .arg("PX")
                .arg(marker_ttl)
                .ignore();
        }
        self.query("SET", Query::Pipeline(pipe), self.timeout).await
    }

    /// Stores a result for `ttl` (result backend).
    #[tracing::instrument(name = "cache.result.put", skip(self, json))]
    pub(crate) async fn put_result(
        &self,
        task_id: &str,
        json: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command
            .arg(self.result_key(task_id))
            .arg(json)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let _: String = self.run(command, self.timeout).await?;
        Ok(())
    }

    #[tracing::instrument(name = "cache.result.get", skip(self))]
    pub async fn result(&self, task_id: &str) -> Result<Option<String>, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(self.result_key(task_id));
        self.run(command, self.timeout).await
    }

    /// Keeps an operator-page session under (a digest of) its id for `ttl`.
    #[tracing::instrument(name = "cache.session.put", skip_all)]
    pub(crate) async fn put_session(
        &self,
        id_digest: &str,
        json: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(&format!("session:{id_digest}")))
            .arg(json)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let _: String = self.run(command, self.timeout).await?;
        Ok(())
    }

    #[tracing::instrument(name = "cache.session.get", skip_all)]
    pub async fn session(&self, id_digest: &str) -> Result<Option<String>, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(self.key(&format!("session:{id_digest}")));
        self.run(command, self.timeout).await
    }

    /// Ends a session (sign-out).
    #[tracing::instrument(name = "cache.session.drop", skip_all)]
    pub(crate) async fn drop_session(&self, id_digest: &str) -> Result<(), StoreError> {
        let mut command = redis::cmd("DEL");
        command.arg(self.key(&format!("session:{id_digest}")));
        let _: i64 = self.run(command, self.timeout).await?;
        Ok(())
    }

    /// Counts `cost` requests of `client` in the current window; `Some(retry_after)` when that
    /// puts it over `limit`.
    #[tracing::instrument(name = "cache.rate_limit", skip(self))]
    pub(crate) async fn over_rate_limit(
        &self,
        client: &str,
        limit: u32,
        window: Duration,
        cost: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let window_ms = window.as_millis().max(1) as u64;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let slot = now_ms / window_ms;
        // Both counters in one hash slot (`{client}`), as a script's keys must be.
        let key = |slot: u64| self.key(&format!("ratelimit:{{{client}}}:{slot}"));
        // One atomic round trip: count, give a new window its expiry, read the last window.
        let mut command = redis::cmd("EVAL");
        command
            .arg(RATE_LIMIT_SCRIPT)
            .arg(2)
            .arg(key(slot))
            .arg(key(slot.saturating_sub(1)))
            .arg(window_ms * 2)
            .arg(cost.max(1));
        let (current, previous): (u64, u64) = self.run(command, self.op_timeout).await?;
        Ok(over_sliding_limit(
            current,
            previous,
            now_ms % window_ms,
            window_ms,
            limit,
        ))
    }
}

/// Whether `current` requests in this window, `elapsed_ms` into it, and `previous` in the one
/// before (counted for the part of it still inside the last `window_ms`) are over `limit`; if
/// so, how long until they are not.
fn over_sliding_limit(
    current: u64,
    previous: u64,
    elapsed_ms: u64,
    window_ms: u64,
    limit: u32,
) -> Option<Duration> {
    let limit = u64::from(limit);
    // previous × (window − elapsed) / window + current > limit, in integers.
    let weighted = |elapsed: u64| previous * (window_ms - elapsed) + current * window_ms;
    if weighted(elapsed_ms) <= limit * window_ms {
        return None;
    }
    let left = window_ms - elapsed_ms;
    if current > limit || previous == 0 {
        // Not under it before the next window, where this one's count weighs in.
        return Some(Duration::from_millis(left.max(1)));
    }
    // The previous window's share falls as this one goes on: under the limit once
    // previous × (window − e) ≤ (limit − current) × window.
    let under_at = window_ms.saturating_sub((limit - current) * window_ms / previous);
    Some(Duration::from_millis(
        under_at.saturating_sub(elapsed_ms).clamp(1, left.max(1)),
    ))
}

/// Records a Redis call's latency, and its failure if it failed.
async fn measured<T>(
    command: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = call.await;
    let m = crate::telemetry::metrics::metrics();
    m.redis_duration
        .with_label_values(&[command])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.redis_errors.with_label_values(&[command]).inc();
    }
    result
}

/// Invalidates cached statuses in batches: many concurrent state changes, one Redis round trip.
/// Callers await their own invalidation (so a message is settled only once readers can no longer
/// be served the old state), and Redis being down only delays them by its short timeout.
#[derive(Clone)]
pub(crate) struct Invalidator(
    tokio::sync::mpsc::UnboundedSender<(String, tokio::sync::oneshot::Sender<()>)>,
);

impl Invalidator {
    /// Starts the background task; it ends when the last handle is dropped.
    pub fn start(cache: Cache) -> Self {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(String, tokio::sync::oneshot::Sender<()>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
                if let Err(error) = cache.invalidate_statuses(&ids).await {
                    // The cached copies expire within their short TTL anyway.
                    tracing::warn!(error = %error, count = ids.len(), "cannot invalidate cached statuses");
                }
                for (_, done) in batch {
                    let _ = done.send(());
                }
            }
        });
        Self(tx)
    }

    /// Invalidates one task's cached status, together with whatever else is waiting.
    pub(crate) async fn invalidate(&self, task_id: &str) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.0.send((task_id.to_owned(), done)).is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::over_sliding_limit;
    use std::time::Duration;

    #[test]
    fn tries_that_straddle_a_window_boundary_still_add_up() {
        // 10 tries at the very end of one minute, 2 at the start of the next: limited.
        assert!(over_sliding_limit(2, 10, 5, 60_000, 10).is_some());
        // Within one window, the limit itself is allowed and one more is not.
        assert_eq!(over_sliding_limit(10, 0, 30_000, 60_000, 10), None);
        assert_eq!(
            over_sliding_limit(11, 0, 30_000, 60_000, 10),
            Some(Duration::from_millis(30_000))
        );
    }

    #[test]
    fn the_previous_window_weighs_less_as_this_one_goes_on() {
        // Half way in, 10 before count as 5: 5 + 5 is at the limit, 5 + 6 over it.
        assert_eq!(over_sliding_limit(5, 10, 30_000, 60_000, 10), None);
        // 10 × (60 − e)/60 + 6 ≤ 10 once e ≥ 36 s: 6 s from now.
        assert_eq!(
            over_sliding_limit(6, 10, 30_000, 60_000, 10),
            Some(Duration::from_millis(6_000))
        );
    }
}
