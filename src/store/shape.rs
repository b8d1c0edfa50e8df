//! How typed values of a stored document take a BSON shape where BSON has no type of their own,
//! and how documents that older versions wrote still read.

/// An optional [`Duration`](std::time::Duration) as seconds (a float), the form Celery gives its
/// time limits.
pub mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    /// A negative or non-finite number of seconds (no version writes one) reads as none.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let seconds = Option::<f64>::deserialize(d)?;
        Ok(seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64))
    }
}

/// An optional time as a BSON date. Earlier versions wrote RFC 3339 text (`eta`, `expires`);
/// that still reads, a time without a zone as UTC.
pub mod time {
    use mongodb::bson::{Bson, DateTime};
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<DateTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        value.serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime>, D::Error> {
        match Option::<Bson>::deserialize(d)? {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::DateTime(time)) => Ok(Some(time)),
            Some(Bson::String(text)) => DateTime::parse_rfc3339_str(&text)
                .or_else(|_| DateTime::parse_rfc3339_str(format!("{text}Z")))
                .map(Some)
                .map_err(|_| D::Error::custom(format!("`{text}` is not an RFC 3339 time"))),
            Some(other) => Err(D::Error::custom(format!(
                "a time is a date or RFC 3339 text, not {other}"
            ))),
        }
    }
}

pub(crate) fn to_bson(value: &serde_json::Value) -> Result<mongodb::bson::Bson, super::StoreError> {
    mongodb::bson::to_bson(value).map_err(|e| {
        super::StoreError::Rejected(crate::cause::Cause::context(
            "the value cannot be stored in BSON",
            e,
        ))
    })
}
