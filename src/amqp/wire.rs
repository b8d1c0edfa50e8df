//! Kobe's own header vocabulary on top of Celery's protocol: every header name Kobe reads or
//! writes besides Celery's lives here.

use amiquip::{AmqpProperties, AmqpValue, FieldTable};

/// Names the `RawPayload` that holds a message's arguments (they were too large to travel).
pub(crate) const PAYLOAD_HEADER: &str = "kobe-payload-ref";

/// The delay level a retried (or delayed) message waits in, matched by the retry exchange.
pub(crate) const RETRY_LEVEL_HEADER: &str = "kobe-retry-level";

/// Why a message was dead-lettered (on messages in the dead-letter queue).
pub(crate) const DEAD_LETTER_REASON_HEADER: &str = "x-kobe-reason";

/// The routing key a dead-lettered message had, so it can be sent back to its queue.
pub(crate) const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-kobe-original-routing-key";

/// Attempts made before a message was dead-lettered.
pub(crate) const ATTEMPTS_HEADER: &str = "x-kobe-attempts";

/// How many times workers that did not know a message's task handed it on (a rolling deploy:
/// an old worker meets a task only new ones have).
pub(crate) const UNKNOWN_HOPS_HEADER: &str = "x-kobe-unknown-hops";

/// The text of a header, if it is text.
pub fn text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.get(name)? {
        AmqpValue::LongString(s) => Some(s.clone()),
        AmqpValue::ByteArray(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

/// The task id and name of a message, as far as its headers can be read: enough to record why
/// a message that cannot be decoded was refused. An id that is not a valid task id is `None`.
pub(crate) fn identity(properties: &AmqpProperties) -> (Option<String>, Option<String>) {
    let Some(headers) = properties.headers() else {
        return (None, None);
    };
    let id = text(headers, "id").filter(|id| crate::domain::TaskId::parse(id).is_ok());
    (id, text(headers, "task"))
}

/// The `RawPayload` reference a message carries instead of its arguments.
pub(crate) fn payload_reference(properties: &AmqpProperties) -> Option<String> {
    text(properties.headers().as_ref()?, PAYLOAD_HEADER)
}

/// On a message Kobe's submitter published: a `Tasks` document records the task and its
/// arguments, so its worker keeps no copy of them with its outcomes (a Celery client's task,
/// without one, is rerun from what its outcome keeps).
pub const RECORDED_HEADER: &str = "kobe-recorded";

/// Whether a `Tasks` document records the message's task ([`RECORDED_HEADER`]).
pub(crate) fn is_recorded(properties: &AmqpProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.contains_key(RECORDED_HEADER))
}

/// When the message was dead-lettered (milliseconds since the epoch), for `kobe dlq purge`.
pub(crate) const DEAD_LETTERED_AT_HEADER: &str = "x-kobe-dead-lettered-at";

/// An integer header, as RabbitMQ may hand any integer width back.
pub(crate) fn integer(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.get(name)? {
        AmqpValue::LongLongInt(n) => Some(*n),
        AmqpValue::LongInt(n) => Some(i64::from(*n)),
        AmqpValue::ShortInt(n) => Some(i64::from(*n)),
        AmqpValue::LongUInt(n) => Some(i64::from(*n)),
        AmqpValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

/// Longest reason a dead letter's header carries (bytes); the whole one is in `TaskErrorLog`. The
/// headers travel in one frame, which the broker bounds (128 KiB by default): a longer reason —
/// a task's error text can be anything — would have the dead letter refused again and again.
pub(crate) const MAX_REASON_BYTES: usize = 4096;

/// `reason` cut at a character boundary to [`MAX_REASON_BYTES`], marked where it was cut.
fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// A delivery's properties as it goes to the dead-letter exchange: its own, plus why, where it
/// came from and how many attempts it had.
pub(crate) fn dead_letter_properties(
    properties: &AmqpProperties,
    reason: &str,
    routing_key: &str,
    attempts: Option<u32>,
) -> AmqpProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        DEAD_LETTER_REASON_HEADER.into(),
        AmqpValue::LongString(bounded_reason(reason)),
    );
    headers.insert(
        ORIGINAL_ROUTING_KEY_HEADER.into(),
        AmqpValue::LongString(routing_key.to_owned()),
    );
    if let Some(attempts) = attempts {
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AmqpValue::LongLongInt(i64::from(attempts)),
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    headers.insert(DEAD_LETTERED_AT_HEADER.into(), AmqpValue::LongLongInt(now));
    properties.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_reason_fits_in_its_frame_whatever_the_error_said() {
        // A Rust task's error of 200 KB, multibyte at the cut.
        let reason = "é".repeat(100_000);
        let properties =
            dead_letter_properties(&AmqpProperties::default(), &reason, "kobe.default", Some(3));
        let headers = properties.headers().clone().unwrap();
        let AmqpValue::LongString(kept) = &headers[DEAD_LETTER_REASON_HEADER] else {
            panic!("no reason header");
        };
        assert!(
            kept.len() <= MAX_REASON_BYTES && kept.ends_with('…'),
            "{}",
            kept.len()
        );
        assert!(reason.starts_with(kept.trim_end_matches('…')));
        assert_eq!(bounded_reason("short"), "short");
    }

    #[test]
    fn identity_reads_what_it_can_and_refuses_unsafe_ids() {
        let mut headers = FieldTable::new();
        headers.insert("id".into(), AmqpValue::LongString("abc-1".into()));
        headers.insert("task".into(), AmqpValue::LongString("demo".into()));
        let props = AmqpProperties::default().with_headers(headers.clone());
        assert_eq!(
            identity(&props),
            (Some("abc-1".into()), Some("demo".into()))
        );
        headers.insert("id".into(), AmqpValue::LongString("a/b".into()));
        let props = AmqpProperties::default().with_headers(headers);
        assert_eq!(identity(&props).0, None);
        assert_eq!(identity(&AmqpProperties::default()), (None, None));
    }

    #[test]
    fn dead_letters_carry_their_reason() {
        let props = dead_letter_properties(&AmqpProperties::default(), "boom", "default", Some(3));
        let headers = props.headers().clone().unwrap();
        assert_eq!(
            text(&headers, DEAD_LETTER_REASON_HEADER).as_deref(),
            Some("boom")
        );
        assert_eq!(
            headers.get(ATTEMPTS_HEADER),
            Some(&AmqpValue::LongLongInt(3))
        );
    }
}
