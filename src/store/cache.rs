//! Redis: the connection pool and the key layout. Redis only ever holds copies (status cache, rate
//! limits, optional results): MongoDB is written first and stays the authority.

use std::time::Duration;

use deadpool_redis::{redis, Config, Pool, Runtime};

use super::StoreError;
use crate::config::ServiceUrl;

/// A Redis pool with Kobe's key prefix.
#[derive(Clone)]
pub struct Cache {
    pool: Pool,
    prefix: String,
    timeout: Duration,
}

impl Cache {
    /// Builds the pool; connections open lazily, so this succeeds while Redis is down.
    pub fn new(url: &ServiceUrl, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
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
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| StoreError::Redis(format!("invalid REDIS_URL {url}: {e}")))?;
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    /// `kobe:{rest}`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// `PING`, bounded by the configured timeout.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let attempt = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreError::Redis(format!(
                    "unexpected PING answer {pong:?}"
                )))
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| StoreError::Redis(format!("no answer within {:?}", self.timeout)))?
    }
}
