//! Reading the dead-letter queue without losing anything: `DeadLetterQueue` takes messages one
//! at a time, unacknowledged, on a connection of its own. A letter is removed only by
//! `DeadLetterQueue::remove`; every other one goes back to the queue, in its order, when the
//! reader is closed or dropped — or when the process dies.

use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Connection, Delivery, Get};

use super::{connection, wire, AmqpError, Topology};
use crate::cause::Cause;
use crate::config::ServiceUrl;

/// One dead letter, as its headers describe it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The task id (`id` header), when the message carried a usable one.
    pub task_id: Option<String>,
    pub task_name: Option<String>,
    /// Why it was dead-lettered (`x-kobe-reason`).
    pub reason: String,
    /// Attempts it had (`x-kobe-attempts`).
    pub attempts: Option<i64>,
    /// The route it came from (`x-kobe-original-routing-key`).
    pub route: Option<String>,
    /// When it was dead-lettered, milliseconds since the epoch (absent on letters written before
    /// Kobe recorded it).
    pub dead_lettered_at: Option<i64>,
    pub properties: AmqpProperties,
    pub body: Vec<u8>,
    /// The delivery, kept for its ack.
    delivery: Delivery,
}

impl DeadLetter {
    fn read(delivery: Delivery) -> Self {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let (task_id, task_name) = wire::identity(&delivery.properties);
        Self {
            task_id,
            task_name,
            reason: wire::text(&headers, wire::DEAD_LETTER_REASON_HEADER)
                .unwrap_or_else(|| "(no reason recorded)".into()),
            attempts: wire::integer(&headers, wire::ATTEMPTS_HEADER),
            route: wire::text(&headers, wire::ORIGINAL_ROUTING_KEY_HEADER),
            dead_lettered_at: wire::integer(&headers, wire::DEAD_LETTERED_AT_HEADER),
            properties: delivery.properties.clone(),
            body: delivery.body.clone(),
            delivery,
        }
    }
}

/// A reader of the dead-letter queue (blocking: run it on a blocking thread).
pub(crate) struct DeadLetterQueue {
    connection: Option<Connection>,
    channel: Channel,
    queue: String,
}

impl DeadLetterQueue {
    /// Opens a connection of its own to read `topology`'s dead-letter queue.
    pub fn open(url: &ServiceUrl, topology: &Topology) -> Result<Self, AmqpError> {
        let mut connection = connection::Endpoint::parse(url)?.connect(Duration::from_secs(5))?;
        let channel = connection
            .open_channel(None)
            .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
        Ok(Self {
            connection: Some(connection),
            channel,
            queue: topology.dead_letter_queue(),
        })
    }

    /// The next letter not yet taken by this reader; `None` when the queue has no more.
    pub fn take(&mut self) -> Result<Option<DeadLetter>, AmqpError> {
        let got: Option<Get> = self
            .channel
            .basic_get(self.queue.as_str(), false)
            .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
        Ok(got.map(|get| DeadLetter::read(get.delivery)))
    }

    /// Removes a letter from the queue for good.
    pub fn remove(&self, letter: DeadLetter) -> Result<(), AmqpError> {
        letter
            .delivery
            .ack(&self.channel)
            .map_err(|e| AmqpError::Channel(Cause::of(e)))
    }

    /// Closes the connection: every letter taken and not removed goes back to the queue.
    pub fn close(mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

impl Drop for DeadLetterQueue {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}
