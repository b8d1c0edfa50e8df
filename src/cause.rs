//! [`Cause`]: the error underneath one of Kobe's own errors, kept whole.
//!
//! Each layer's error enum says what the caller should do next (retry, 503, dead-letter); the
//! driver error that led there rides along as a `Cause`. Its `Display` is the text a log line or
//! an API answer shows; its [`source`](std::error::Error::source) is the driver's own error, so
//! a report can walk the chain and code can downcast to the driver's type. Clonable, because one
//! failed MongoDB command answers every write that travelled in it.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// What went wrong underneath: a description, and the error it came from when there is one.
#[derive(Clone)]
pub struct Cause {
    detail: String,
    source: Option<Arc<dyn Error + Send + Sync + 'static>>,
}

impl Cause {
    /// A cause Kobe found itself (a timeout, a stopped writer): no error underneath.
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
            source: None,
        }
    }

    /// A driver's error, described by its own text.
    pub fn of<E: Error + Send + Sync + 'static>(error: E) -> Self {
        Self {
            detail: error.to_string(),
            source: Some(Arc::new(error)),
        }
    }

    /// A driver's error, described by `context` followed by its own text.
    pub(crate) fn context<E: Error + Send + Sync + 'static>(
        context: impl fmt::Display,
        error: E,
    ) -> Self {
        Self {
            detail: format!("{context}: {error}"),
            source: Some(Arc::new(error)),
        }
    }

    /// The driver's error, when it is a `T`.
    pub fn driver<T: Error + 'static>(&self) -> Option<&T> {
        self.source.as_deref()?.downcast_ref::<T>()
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{} (caused by {source:?})", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref()?.source()
    }
}

impl From<String> for Cause {
    fn from(detail: String) -> Self {
        Self::new(detail)
    }
}

impl From<&str> for Cause {
    fn from(detail: &str) -> Self {
        Self::new(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver error with a source of its own, as the MongoDB driver's errors have.
    #[derive(Debug, thiserror::Error)]
    #[error("command failed")]
    struct DriverError(#[source] std::io::Error);

    #[test]
    fn the_driver_error_and_its_chain_stay_reachable() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let cause = Cause::context("connecting", DriverError(inner));
        assert_eq!(cause.to_string(), "connecting: command failed");
        assert!(cause.driver::<DriverError>().is_some());
        let source = cause.source().expect("the driver's own source");
        let inner = source
            .downcast_ref::<std::io::Error>()
            .expect("the inner error");
        assert_eq!(inner.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(Cause::new("timed out").source().is_none());
    }
}
