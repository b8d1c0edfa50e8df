//! RabbitMQ transport: connections, topology, the Celery v2 wire format, a pipelined confirming
//! publisher and a manual-ack consumer.
//!
//! amiquip is blocking, so every connection lives on a thread of its own; the async side talks to
//! it over channels (requests in, `oneshot` replies out). Nothing here knows about MongoDB, Redis
//! or HTTP.

pub(crate) mod connection;
pub mod consumer;
pub mod dead_letter_queue;
mod held;
pub mod message;
pub mod outgoing;
pub mod publisher;
pub mod topology;
pub(crate) mod wire;

use std::time::Duration;

pub use crate::domain::QueueKind;
pub use consumer::{Consumer, ConsumerConfig, Delivery, DeliveryTag, Settlement};
pub use message::{MessageError, TaskMessage};
pub use outgoing::Outgoing;
pub use publisher::Publisher;
pub use topology::Topology;
pub use wire::RECORDED_HEADER;

use crate::cause::Cause;
use crate::config::ServiceUrl;

/// What went wrong talking to the broker, phrased so the caller knows what to do: a connection or
/// topology error means "the broker is not usable now" (503, reconnect); a nack or a confirm
/// timeout means "this message may not be stored" (report it, retry the publish).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {endpoint}: {reason}")]
    Connect {
        endpoint: String,
        #[source]
        reason: Cause,
    },
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("cannot declare {what}: {reason}")]
    Topology {
        what: String,
        #[source]
        reason: Cause,
    },
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    /// Published `mandatory` and returned: no queue is bound for its route.
    #[error("RabbitMQ could not route the message to any queue: {0}")]
    Unroutable(String),
    /// The publisher already has this many messages waiting: shed load, retry later.
    #[error("the publisher has {0} messages waiting already; try again shortly")]
    Busy(usize),
    #[error("RabbitMQ did not confirm the message within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the connection to RabbitMQ was lost before the message was confirmed: {0}")]
    ConnectionLost(#[source] Cause),
    #[error("AMQP channel error: {0}")]
    Channel(#[source] Cause),
    /// A message the broker would answer by closing the channel (and so fail every publish in
    /// flight beside it): refused before it is sent.
    #[error("RabbitMQ would refuse this message: {0}")]
    Invalid(String),
}

/// Opens a connection the way Kobe's own threads do (TCP_NODELAY, bounded connect time), for
/// tools, benchmarks and tests that need a raw amiquip connection.
pub fn connect(url: &ServiceUrl, timeout: Duration) -> Result<amiquip::Connection, AmqpError> {
    connection::Endpoint::parse(url)?.connect(timeout)
}

pub use connection::node_addresses;

/// Each broker node `url` names (one, or a cluster's, comma-separated) and whether it accepts
/// an AMQP connection within `timeout`. Blocking; nodes are tried one after another.
pub(crate) fn node_reports(
    url: &ServiceUrl,
    timeout: Duration,
) -> Vec<(String, Result<(), String>)> {
    let endpoint = match connection::Endpoint::parse(url) {
        Ok(endpoint) => endpoint,
        Err(e) => return vec![(url.to_string(), Err(e.to_string()))],
    };
    endpoint
        .each_node()
        .into_iter()
        .map(|node| {
            let answer = node
                .connect_as(timeout, "kobe-healthcheck")
                .map(|connection| drop(connection.close()))
                .map_err(|e| e.to_string());
            (node.display, answer)
        })
        .collect()
}

/// A queue as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueReport {
    pub name: String,
    pub messages: u32,
    pub consumers: u32,
}

/// Connects, declares the topology (which fails if a queue exists non-durable or with other
/// arguments) and reports each task queue and the dead-letter queue. Used by `healthcheck`.
pub fn check_topology(
    url: &ServiceUrl,
    topology: &Topology,
    timeout: Duration,
) -> Result<Vec<QueueReport>, AmqpError> {
    let endpoint = connection::Endpoint::parse(url)?;
    let mut connection = endpoint.connect(timeout)?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
    topology.declare(&channel)?;
    let mut names: Vec<String> = topology
        .routes()
        .iter()
        .map(|r| topology.queue(r))
        .collect();
    names.push(topology.dead_letter_queue());
    let mut reports = Vec::new();
    for name in names {
        let queue =
            channel
                .queue_declare_passive(name.clone())
                .map_err(|e| AmqpError::Topology {
                    what: format!("queue {name}"),
                    reason: Cause::of(e),
                })?;
        reports.push(QueueReport {
            name,
            messages: queue.declared_message_count().unwrap_or(0),
            consumers: queue.declared_consumer_count().unwrap_or(0),
        });
    }
    let _ = connection.close();
    Ok(reports)
}

/// Messages ready in each of `queues` (passive declares on one short connection); a queue that
/// does not exist is left out.
pub(crate) fn queue_depths(
    url: &ServiceUrl,
    queues: &[String],
    timeout: Duration,
) -> Result<Vec<QueueReport>, AmqpError> {
    let mut connection = connect(url, timeout)?;
    let mut reports = Vec::new();
    for name in queues {
        // A passive declare of a missing queue closes the channel: one channel per queue.
        let channel = connection
            .open_channel(None)
            .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
        if let Ok(queue) = channel.queue_declare_passive(name.as_str()) {
            reports.push(QueueReport {
                name: name.clone(),
                messages: queue.declared_message_count().unwrap_or(0),
                consumers: queue.declared_consumer_count().unwrap_or(0),
            });
            let _ = channel.close();
        }
    }
    let _ = connection.close();
    Ok(reports)
}

/// Deletes every exchange and queue of a topology. For tests and for tearing down a deployment
/// on purpose; never called by `serve` or `worker`.
pub fn delete_topology(url: &ServiceUrl, topology: &Topology) -> Result<(), AmqpError> {
    let endpoint = connection::Endpoint::parse(url)?;
    let mut connection = endpoint.connect(Duration::from_secs(5))?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
    for queue in topology.all_queues() {
        channel
            .queue_delete(queue, Default::default())
            .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
    }
    for exchange in topology.all_exchanges() {
        channel
            .exchange_delete(exchange, false)
            .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
    }
    let _ = connection.close();
    Ok(())
}

/// The longest wait between two reconnection attempts: a broker that is back is used again
/// within this long, and a connect attempt to a broker that is down costs next to nothing.
pub(crate) const RECONNECT_CAP: Duration = Duration::from_millis(500);

/// Reconnection delays: exponential from 100 ms, capped, so a broker restart is survived without
/// hammering it.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(cap: Duration) -> Self {
        Self {
            next: Duration::from_millis(100),
            cap,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}
