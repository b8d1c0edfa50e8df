//! A manual-ack consumer on its own thread.
//!
//! The thread owns the connection and channel, forwards each delivery to the async side (body and
//! properties moved out, the amiquip `Delivery` kept back for its ack), and settles deliveries
//! when the async side says how. After a lost connection it reconnects with backoff, redeclares
//! the topology and consumes again; settlements for deliveries of the old connection are dropped,
//! since the broker has already returned those messages to their queues.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use amiquip::{AmqpProperties, Channel, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use tokio::sync::mpsc;

use super::connection::Endpoint;
use super::held::{Action, Held};
use super::{AmqpError, Backoff, Topology};
use crate::cause::Cause;
use crate::config::ServiceUrl;

/// What a consumer connects to and reads.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub url: ServiceUrl,
    pub topology: Topology,
    /// Queue names (not routes) to consume.
    pub queues: Vec<String>,
    /// Unacknowledged deliveries the broker may push to each queue's consumer.
    pub prefetch: u16,
    /// The connection's name in the broker's client properties.
    pub name: String,
}

/// Identifies a delivery across reconnections: tags restart at 1 on every channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryTag {
    generation: u64,
    tag: u64,
}

/// Which connection's deliveries can still be settled: a delivery of any other connection has
/// been handed back to its queue by the broker, so it must not be started.
#[derive(Clone, Debug, Default)]
pub struct Liveness(Arc<AtomicU64>);

impl Liveness {
    /// Whether the delivery came on the connection that is up now.
    pub(crate) fn is_live(&self, tag: DeliveryTag) -> bool {
        self.0.load(Ordering::Acquire) == tag.generation
    }

    fn set(&self, generation: u64) {
        self.0.store(generation, Ordering::Release);
    }
}

/// A message handed to the async side.
#[derive(Debug)]
pub struct Delivery {
    pub tag: DeliveryTag,
    pub redelivered: bool,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: AmqpProperties,
}

pub use super::held::Settlement;

enum Command {
    Settle(DeliveryTag, Settlement),
    StopConsuming,
    Close,
}

/// Handle to the consuming thread.
pub struct Consumer {
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    liveness: Liveness,
}

impl Consumer {
    /// Starts consuming; deliveries arrive on `deliveries`. Connection failures are retried with
    /// backoff forever (logged), so a worker started before its broker simply waits for it.
    pub fn start(
        config: ConsumerConfig,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> Result<Self, AmqpError> {
        let endpoint = Endpoint::parse(&config.url)?;
        let (commands, inbox) = crossbeam_channel::unbounded();
        let liveness = Liveness::default();
        let live = liveness.clone();
        let thread = thread::Builder::new()
            .name("kobe-consumer".into())
            .spawn(move || ConsumerThread::new(endpoint, config, deliveries, inbox, live).run())
            .map_err(|e| {
                AmqpError::Unavailable(Cause::context("cannot start consumer thread", e))
            })?;
        Ok(Self {
            commands,
            thread: Some(thread),
            liveness,
        })
    }

    /// Tells whether a delivery's connection is still the one up.
    pub(crate) fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// Acks or nacks a delivery. Settling a delivery of a connection that has since been lost is
    /// a no-op: the broker already requeued it.
    pub fn settle(&self, tag: DeliveryTag, settlement: Settlement) {
        let _ = self.commands.send(Command::Settle(tag, settlement));
    }

    /// A cheap handle that can only settle, for task futures.
    pub(crate) fn settler(&self) -> Settler {
        Settler(self.commands.clone())
    }

    /// Closes the connection; unsettled deliveries return to their queues.
    pub fn close(mut self) {
        let _ = self.commands.send(Command::Close);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close);
    }
}

/// Settles deliveries from any thread or task.
#[derive(Clone)]
pub struct Settler(Sender<Command>);

impl Settler {
    pub fn settle(&self, tag: DeliveryTag, settlement: Settlement) {
        let _ = self.0.send(Command::Settle(tag, settlement));
    }

    /// Cancels the consumers: no new deliveries; in-flight ones can still be settled.
    pub(crate) fn stop_consuming(&self) {
        let _ = self.0.send(Command::StopConsuming);
    }
}

struct ConsumerThread {
    endpoint: Endpoint,
    config: ConsumerConfig,
    deliveries: mpsc::UnboundedSender<Delivery>,
    inbox: Receiver<Command>,
    generation: u64,
    liveness: Liveness,
    stopped: bool,
}

/// Why one connection's session ended.
enum SessionEnd {
    /// Close was asked for (or every handle dropped): leave the thread.
    Close,
    /// The connection or channel failed: reconnect.
    Lost(String),
}

impl ConsumerThread {
    fn new(
        endpoint: Endpoint,
        config: ConsumerConfig,
        deliveries: mpsc::UnboundedSender<Delivery>,
        inbox: Receiver<Command>,
        liveness: Liveness,
    ) -> Self {
        Self {
            endpoint,
            config,
            deliveries,
            inbox,
            generation: 0,
            liveness,
            stopped: false,
        }
    }

    fn run(mut self) {
        let mut backoff = Backoff::new(super::RECONNECT_CAP);
        loop {
            let error = match self
                .endpoint
                .connect_as(Duration::from_secs(5), &self.config.name)
            {
                Ok(mut connection) => {
                    let end = match connection.open_channel(None) {
                        Ok(channel) => self.session(&channel, &mut backoff),
                        Err(e) => SessionEnd::Lost(e.to_string()),
                    };
                    // Whatever this connection delivered is back in its queue (or will be once
                    // the broker notices): none of it may start now.
                    self.liveness.set(0);
                    match end {
                        SessionEnd::Close => {
                            let _ = connection.close();
                            return;
                        }
                        SessionEnd::Lost(reason) => reason,
                    }
                }
                Err(e) => e.to_string(),
            };
            let delay = backoff.next_delay();
            tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "consumer lost RabbitMQ; reconnecting");
            // Wait out the backoff, still answering commands: a close must not wait for a broker.
            let until = std::time::Instant::now() + delay;
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.inbox.recv_timeout(left) {
                    Ok(Command::Close) | Err(RecvTimeoutError::Disconnected) => return,
                    Ok(Command::StopConsuming) => self.stopped = true,
                    Ok(Command::Settle(..)) => {} // that connection is gone
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            if self.stopped {
                // Stopping, and nothing can be settled on a new connection: just wait for close.
                let _ = self.inbox.recv();
                return;
            }
        }
    }

    /// Declares, consumes and settles on one connection until it ends. The backoff is reset only
    /// once consuming has started, so a declare the broker keeps refusing backs off like a
    /// connection that keeps failing.
    fn session(&mut self, channel: &Channel, backoff: &mut Backoff) -> SessionEnd {
        let consumers = match self.start_consuming(channel) {
            Ok(consumers) => consumers,
            Err(end) => return end,
        };
        backoff.reset();
        self.generation += 1;
        self.liveness.set(self.generation);
        tracing::info!(endpoint = %self.endpoint.display, queues = ?self.config.queues, prefetch = self.config.prefetch, "consuming");
        let mut held: Held<amiquip::Delivery> = Held::new();
        let mut active: Vec<bool> = vec![true; consumers.len()];

        loop {
            let mut select = Select::new();
            let mut receivers = Vec::new();
            for (i, consumer) in consumers.iter().enumerate() {
                if active[i] {
                    receivers.push((select.recv(consumer.receiver()), i));
                }
            }
            let command_index = select.recv(&self.inbox);
            let op = select.select();
            let index = op.index();

            if index == command_index {
                let ended = match op.recv(&self.inbox) {
                    Ok(command) => self.obey(channel, command, &consumers, &mut held),
                    Err(_) => Some(SessionEnd::Close),
                };
                match ended {
                    Some(end) => return end,
                    None => continue,
                }
            }

            let Some(&(_, consumer_index)) = receivers.iter().find(|(i, _)| *i == index) else {
                continue;
            };
            let message = match op.recv(consumers[consumer_index].receiver()) {
                Ok(message) => message,
                // amiquip says nothing when the socket fails (a reset, missed heartbeats, a
                // killed node): its I/O thread ends and the delivery stream closes. Unless we
                // cancelled that consumer ourselves, the connection is gone.
                Err(_) if self.stopped => {
                    active[consumer_index] = false;
                    continue;
                }
                Err(_) => {
                    return SessionEnd::Lost(
                        "the connection's delivery stream ended (connection lost)".into(),
                    )
                }
            };
            match message {
                ConsumerMessage::Delivery(delivery) => self.forward(channel, delivery, &mut held),
                ConsumerMessage::ClientCancelled => active[consumer_index] = false,
                ConsumerMessage::ServerCancelled => {
                    return SessionEnd::Lost("the broker cancelled the consumer".into())
                }
                ConsumerMessage::ServerClosedChannel(e)
                | ConsumerMessage::ServerClosedConnection(e) => {
                    return SessionEnd::Lost(e.to_string())
                }
                ConsumerMessage::ClientClosedChannel | ConsumerMessage::ClientClosedConnection => {
                    return SessionEnd::Lost("channel closed".into())
                }
            }
        }
    }

    /// Declares the topology, sets the prefetch and consumes every queue (none once stopped).
    fn start_consuming<'c>(
        &self,
        channel: &'c Channel,
    ) -> Result<Vec<amiquip::Consumer<'c>>, SessionEnd> {
        let lost = |e: amiquip::Error| SessionEnd::Lost(e.to_string());
        self.config
            .topology
            .declare(channel)
            .map_err(|e| SessionEnd::Lost(e.to_string()))?;
        channel.qos(0, self.config.prefetch, false).map_err(lost)?;
        let mut consumers = Vec::new();
        if !self.stopped {
            for queue in &self.config.queues {
                match channel.basic_consume(queue.as_str(), ConsumerOptions::default()) {
                    Ok(consumer) => consumers.push(consumer),
                    Err(e) => return Err(SessionEnd::Lost(format!("cannot consume {queue}: {e}"))),
                }
            }
        }
        Ok(consumers)
    }

    /// Carries out `command` and whatever more is waiting. Settlements that arrived together go
    /// out together: the acks of a batch whose outcomes were written by one command become as
    /// few `multiple` acks as the deliveries still held allow. `Some`: the session ends.
    fn obey(
        &mut self,
        channel: &Channel,
        command: Command,
        consumers: &[amiquip::Consumer<'_>],
        held: &mut Held<amiquip::Delivery>,
    ) -> Option<SessionEnd> {
        let mut settlements = Vec::new();
        let mut next = Some(command);
        while let Some(command) = next.take() {
            match command {
                Command::Settle(tag, settlement) => {
                    if tag.generation == self.generation {
                        settlements.push((tag.tag, settlement));
                    } else {
                        tracing::debug!("settlement for a delivery of a lost connection ignored");
                    }
                    if settlements.len() < MAX_SETTLEMENTS_AT_ONCE {
                        next = self.inbox.try_recv().ok();
                    }
                }
                Command::StopConsuming => {
                    self.stopped = true;
                    for consumer in consumers {
                        let _ = consumer.cancel();
                    }
                }
                Command::Close => {
                    let _ = settle_all(channel, held, settlements);
                    return Some(SessionEnd::Close);
                }
            }
        }
        settle_all(channel, held, settlements)
            .err()
            .map(|e| SessionEnd::Lost(e.to_string()))
    }

    /// Hands a delivery to the worker, holding it here until it is settled; one nobody will
    /// run goes back at once.
    fn forward(
        &self,
        channel: &Channel,
        mut delivery: amiquip::Delivery,
        held: &mut Held<amiquip::Delivery>,
    ) {
        let tag = DeliveryTag {
            generation: self.generation,
            tag: delivery.delivery_tag(),
        };
        let forwarded = Delivery {
            tag,
            redelivered: delivery.redelivered,
            routing_key: std::mem::take(&mut delivery.routing_key),
            body: std::mem::take(&mut delivery.body),
            properties: std::mem::take(&mut delivery.properties),
        };
        held.receive(tag.tag, delivery);
        if self.deliveries.send(forwarded).is_err() {
            if let Some(delivery) = held.remove(tag.tag) {
                let _ = delivery.nack(channel, true);
            }
        }
    }
}

/// Settlements handled in one go at most, so deliveries keep flowing under a flood of them.
const MAX_SETTLEMENTS_AT_ONCE: usize = 1024;

/// Sends `settlements` of deliveries in `held` as [`Held::settle`] plans them.
fn settle_all(
    channel: &Channel,
    held: &mut Held<amiquip::Delivery>,
    settlements: Vec<(u64, Settlement)>,
) -> amiquip::Result<()> {
    for action in held.settle(settlements) {
        match action {
            Action::Nack { delivery, requeue } => delivery.nack(channel, requeue)?,
            Action::Ack(delivery) => delivery.ack(channel)?,
            Action::AckMultiple(delivery) => delivery.ack_multiple(channel)?,
        }
    }
    Ok(())
}

#[cfg(test)]
impl Delivery {
    /// A delivery as the worker's unit tests hand it over: first of its connection, not
    /// redelivered.
    pub(crate) fn for_tests(routing_key: &str, body: &[u8]) -> Self {
        Self {
            tag: DeliveryTag {
                generation: 0,
                tag: 1,
            },
            redelivered: false,
            routing_key: routing_key.to_owned(),
            body: body.to_vec(),
            properties: AmqpProperties::default(),
        }
    }
}
