//! A message ready to publish, checked against what the broker would refuse.

use amiquip::AmqpProperties;

use super::AmqpError;

/// A message ready to go: where, and what.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: AmqpProperties,
}

/// The longest per-message TTL RabbitMQ accepts, in milliseconds.
pub const MAX_EXPIRATION_MS: u64 = u32::MAX as u64;

impl Outgoing {
    /// Refuses what the broker would refuse by closing the shared channel: an expiration that is
    /// not a whole number of milliseconds up to [`MAX_EXPIRATION_MS`], and names or header
    /// texts longer than AMQP's short strings hold.
    pub fn check(&self) -> Result<(), AmqpError> {
        if let Some(expiration) = self.properties.expiration() {
            match expiration.parse::<u64>() {
                Ok(ms) if ms <= MAX_EXPIRATION_MS => {}
                _ => {
                    return Err(AmqpError::Invalid(format!(
                        "expiration {expiration:?} is not a number of milliseconds up to {MAX_EXPIRATION_MS}"
                    )))
                }
            }
        }
        let short = [
            ("exchange", Some(self.exchange.as_str())),
            ("routing key", Some(self.routing_key.as_str())),
            ("message id", self.properties.message_id().as_deref()),
            (
                "correlation id",
                self.properties.correlation_id().as_deref(),
            ),
        ];
        for (what, text) in short {
            if text.is_some_and(|t| t.len() > 255) {
                return Err(AmqpError::Invalid(format!(
                    "{what} is longer than 255 bytes"
                )));
            }
        }
        Ok(())
    }
}
