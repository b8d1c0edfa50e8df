//! What the checks of a tasks file share: a field's error, the safe-name and seconds checks.

use std::time::Duration;

use crate::domain::MAX_TIME_LIMIT;

/// The field at fault, and why.
pub(super) type FieldError = (String, String);

pub(super) fn field(name: &str, reason: impl Into<String>) -> FieldError {
    (name.to_owned(), reason.into())
}

/// Names become metric labels, queue names and routing keys: keep them to a safe alphabet.
pub(super) fn check_name(field_name: &str, value: &str) -> Result<(), FieldError> {
    crate::domain::check_safe_name(value).map_err(|reason| field(field_name, reason))
}

pub(super) fn seconds(field_name: &str, value: f64) -> Result<Duration, FieldError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_TIME_LIMIT)
        .ok_or_else(|| {
            field(
                field_name,
                format!(
                    "expected seconds above 0 and at most {}",
                    MAX_TIME_LIMIT.as_secs()
                ),
            )
        })
}

/// The first `limit` characters of `text`, marked when cut.
pub(crate) fn excerpt(text: &str, limit: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(limit).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}
