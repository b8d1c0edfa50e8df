//! A confirming publisher with pipelined confirms.
//!
//! One long-lived connection, on its own thread, shared by every caller. A caller hands over a
//! message and awaits a `oneshot`; the thread publishes at once and goes back to reading, so many
//! messages are in flight together, and each caller is woken when the broker confirms *its*
//! message (out-of-order and `multiple` confirms are smoothed by tag). No lock is held across a
//! round trip. A nack, a confirm timeout or a lost connection is an error the caller sees; the
//! thread then reconnects with backoff and the next publish goes through without a restart.
//!
//! Every message is published `mandatory`: one the broker cannot route to any queue (a route
//! whose queue was deleted) comes back as `basic.return` before its confirm, and the caller gets
//! [`AmqpError::Unroutable`] — a confirm alone does not mean the message is stored. The request
//! queue is bounded: when it is full the caller is told at once ([`AmqpError::Busy`]) instead of
//! waiting behind thousands of others.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use amiquip::{Channel, Confirm, ConfirmSmoother, Connection, Publish, Return};
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

use super::connection::Endpoint;
pub use super::outgoing::{Outgoing, MAX_EXPIRATION_MS};
use super::{AmqpError, Backoff, Topology};
use crate::cause::Cause;
use crate::config::ServiceUrl;
use crate::telemetry::metrics::metrics;

/// Publishes waiting for the publishing thread at most, unless told otherwise; more are refused
/// with [`AmqpError::Busy`].
pub(crate) const MAX_QUEUED_PUBLISHES: usize = 4096;

struct Request {
    message: Outgoing,
    /// After this the caller has given up; the thread does not publish a request it finds late.
    deadline: Instant,
    reply: oneshot::Sender<Result<(), AmqpError>>,
}

/// Handle to the publishing thread. Clones share the thread; it stops when the last handle is
/// dropped, after answering what is in flight.
#[derive(Clone)]
pub struct Publisher {
    requests: Sender<Request>,
    confirm_timeout: Duration,
    connected: Arc<AtomicBool>,
    /// The bound of the request queue.
    queued: usize,
}

impl Publisher {
    /// Starts the publishing thread. It connects (and declares `topology`) in the background;
    /// until it is connected, publishes fail fast with [`AmqpError::Unavailable`].
    pub fn start(
        url: &ServiceUrl,
        topology: Topology,
        confirm_timeout: Duration,
    ) -> Result<Self, AmqpError> {
        Self::start_bounded(url, topology, confirm_timeout, MAX_QUEUED_PUBLISHES)
    }

    /// Like [`Publisher::start`], with at most `queued` publishes waiting for the thread.
    pub(crate) fn start_bounded(
        url: &ServiceUrl,
        topology: Topology,
        confirm_timeout: Duration,
        queued: usize,
    ) -> Result<Self, AmqpError> {
        let endpoint = Endpoint::parse(url)?;
        let queued = queued.max(1);
        let (requests, inbox) = crossbeam_channel::bounded(queued);
        let connected = Arc::new(AtomicBool::new(false));
        let thread = PublisherThread::new(endpoint, topology, confirm_timeout, connected.clone());
        thread::Builder::new()
            .name("kobe-publisher".into())
            .spawn(move || thread.run(inbox))
            .map_err(|e| {
                AmqpError::Unavailable(Cause::context("cannot start publisher thread", e))
            })?;
        Ok(Self {
            requests,
            confirm_timeout,
            connected,
            queued,
        })
    }

    /// Whether the publishing connection is up, for readiness probes.
    pub fn connected(&self) -> Result<(), AmqpError> {
        if self.connected.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(AmqpError::Unavailable("publisher is not connected".into()))
        }
    }

    /// Publishes and waits for the broker's confirm.
    #[tracing::instrument(name = "amqp.publish", skip_all, fields(exchange = %message.exchange, routing_key = %message.routing_key))]
    pub async fn publish(&self, message: Outgoing) -> Result<(), AmqpError> {
        message.check()?;
        let (reply, confirmed) = oneshot::channel();
        let deadline = Instant::now() + self.confirm_timeout;
        self.requests
            .try_send(Request {
                message,
                deadline,
                reply,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => {
                    metrics()
                        .amqp_publishes
                        .with_label_values(&["refused_busy"])
                        .inc();
                    AmqpError::Busy(self.queued)
                }
                TrySendError::Disconnected(_) => {
                    AmqpError::Unavailable("publisher thread has stopped".into())
                }
            })?;
        match tokio::time::timeout(self.confirm_timeout, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AmqpError::Unavailable(
                "publisher thread dropped the request".into(),
            )),
            Err(_) => Err(AmqpError::ConfirmTimeout(self.confirm_timeout)),
        }
    }
}

struct Pending {
    sent: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), AmqpError>>,
    /// What a `basic.return` is matched by.
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
    /// The broker returned it: unroutable, whatever its confirm says.
    returned: Option<String>,
}

struct Link {
    // Field order is drop order: the channel must close before its connection.
    channel: Channel,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    connection: Connection,
    smoother: ConfirmSmoother,
    next_tag: u64,
    pending: BTreeMap<u64, Pending>,
}

struct PublisherThread {
    endpoint: Endpoint,
    topology: Topology,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    backoff: Backoff,
    link: Option<Link>,
    connected: Arc<AtomicBool>,
    next_attempt: Instant,
    last_error: Cause,
}

impl PublisherThread {
    fn new(
        endpoint: Endpoint,
        topology: Topology,
        confirm_timeout: Duration,
        connected: Arc<AtomicBool>,
    ) -> Self {
        Self {
            endpoint,
            topology,
            connect_timeout: confirm_timeout.min(Duration::from_secs(5)),
            confirm_timeout,
            backoff: Backoff::new(super::RECONNECT_CAP),
            link: None,
            connected,
            next_attempt: Instant::now(),
            last_error: "not connected yet".into(),
        }
    }

    fn run(mut self, inbox: Receiver<Request>) {
        loop {
            if self.link.is_none() && Instant::now() >= self.next_attempt {
                self.connect();
            }
            let wake_at = self.next_wake();
            let wait = wake_at.saturating_duration_since(Instant::now());
            let event = match &self.link {
                Some(link) => select! {
                    recv(inbox) -> request => Event::Request(request.ok()),
                    recv(link.confirms) -> confirm => Event::Confirm(confirm.ok()),
                    recv(link.returns) -> returned => Event::Return(returned.ok()),
                    default(wait) => Event::Tick,
                },
                None => match inbox.recv_timeout(wait) {
                    Ok(request) => Event::Request(Some(request)),
                    Err(RecvTimeoutError::Timeout) => Event::Tick,
                    Err(RecvTimeoutError::Disconnected) => Event::Request(None),
                },
            };
            match event {
                Event::Request(Some(request)) => {
                    self.publish(request);
                    // Publish everything already waiting before reading confirms: batching the
                    // writes is what lets confirms pipeline under load.
                    while let Ok(request) = inbox.try_recv() {
                        self.publish(request);
                    }
                }
                Event::Request(None) => break,
                Event::Confirm(Some(confirm)) => self.confirmed(confirm),
                Event::Confirm(None) | Event::Return(None) => self.lost("connection closed".into()),
                Event::Return(Some(returned)) => self.returned(returned),
                Event::Tick => {}
            }
            self.expire();
        }
        if let Some(link) = self.link.take() {
            Self::fail_all(
                link.pending,
                &AmqpError::Unavailable("publisher stopped".into()),
            );
            drop(link.channel);
            let _ = link.connection.close();
        }
    }

    fn next_wake(&self) -> Instant {
        let soon = Instant::now() + Duration::from_millis(500);
        match &self.link {
            // The first pending request has the earliest deadline (see `expire`).
            Some(link) => link
                .pending
                .first_key_value()
                .map_or(soon, |(_, p)| p.deadline.min(soon)),
            None => self.next_attempt.min(soon),
        }
    }

    fn connect(&mut self) {
        let attempt = (|| {
            let mut connection = self.endpoint.connect(self.connect_timeout)?;
            let channel = connection
                .open_channel(None)
                .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
            self.topology.declare(&channel)?;
            let returns = channel
                .listen_for_returns()
                .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
            let confirms = channel
                .listen_for_publisher_confirms()
                .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
            channel
                .enable_publisher_confirms()
                .map_err(|e| AmqpError::Channel(Cause::of(e)))?;
            Ok::<_, AmqpError>(Link {
                channel,
                confirms,
                returns,
                connection,
                smoother: ConfirmSmoother::new(),
                next_tag: 1,
                pending: BTreeMap::new(),
            })
        })();
        match attempt {
            Ok(link) => {
                tracing::info!(endpoint = %self.endpoint.display, "publisher connected to RabbitMQ");
                self.backoff.reset();
                self.link = Some(link);
                self.connected.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "publisher cannot connect to RabbitMQ");
                self.last_error = Cause::of(e);
                self.next_attempt = Instant::now() + delay;
            }
        }
    }

    fn publish(&mut self, request: Request) {
        if Instant::now() >= request.deadline {
            let _ = request
                .reply
                .send(Err(AmqpError::ConfirmTimeout(self.confirm_timeout)));
            return;
        }
        if self.link.is_none() && Instant::now() >= self.next_attempt {
            self.connect();
        }
        let Some(link) = self.link.as_mut() else {
            metrics()
                .amqp_publishes
                .with_label_values(&["failed"])
                .inc();
            let _ = request
                .reply
                .send(Err(AmqpError::Unavailable(self.last_error.clone())));
            return;
        };
        let m = &request.message;
        let sent = link.channel.basic_publish(
            m.exchange.as_str(),
            Publish {
                body: &m.body,
                routing_key: m.routing_key.clone(),
                mandatory: true,
                immediate: false,
                properties: m.properties.clone(),
            },
        );
        match sent {
            Ok(()) => {
                let tag = link.next_tag;
                link.next_tag += 1;
                metrics()
                    .amqp_publishes
                    .with_label_values(&["published"])
                    .inc();
                link.pending.insert(
                    tag,
                    Pending {
                        sent: Instant::now(),
                        deadline: request.deadline,
                        reply: request.reply,
                        exchange: request.message.exchange,
                        routing_key: request.message.routing_key,
                        message_id: request.message.properties.message_id().clone(),
                        returned: None,
                    },
                );
            }
            Err(e) => {
                let cause = Cause::of(e);
                let _ = request
                    .reply
                    .send(Err(AmqpError::ConnectionLost(cause.clone())));
                self.lost(cause);
            }
        }
    }

    /// Marks the oldest in-flight message the return is about (the broker names no tag; the
    /// exchange, routing key and message id tell which).
    fn returned(&mut self, returned: Return) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let message_id = returned.properties.message_id().clone();
        let matching = link.pending.values_mut().find(|p| {
            p.returned.is_none()
                && p.exchange == returned.exchange
                && p.routing_key == returned.routing_key
                && p.message_id == message_id
        });
        if let Some(pending) = matching {
            pending.returned = Some(format!(
                "{} {} (exchange {:?}, routing key {:?})",
                returned.reply_code, returned.reply_text, returned.exchange, returned.routing_key
            ));
        }
    }

    fn confirmed(&mut self, confirm: Confirm) {
        // The broker sends a message's return before its confirm, and amiquip hands frames
        // over in order: any return for what is confirmed now is already waiting.
        while let Some(returned) = self.link.as_ref().and_then(|l| l.returns.try_recv().ok()) {
            self.returned(returned);
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        for confirm in link.smoother.process(confirm) {
            let (tag, mut outcome, mut result) = match confirm {
                Confirm::Ack(p) => (p.delivery_tag, "confirmed", Ok(())),
                Confirm::Nack(p) => (p.delivery_tag, "nacked", Err(AmqpError::Nacked)),
            };
            if let Some(pending) = link.pending.remove(&tag) {
                if let (Some(why), Ok(())) = (&pending.returned, &result) {
                    outcome = "returned";
                    result = Err(AmqpError::Unroutable(why.clone()));
                }
                let m = metrics();
                m.amqp_publishes.with_label_values(&[outcome]).inc();
                m.amqp_confirm_duration
                    .with_label_values(&[outcome])
                    .observe(pending.sent.elapsed().as_secs_f64());
                let _ = pending.reply.send(result);
            }
        }
    }

    /// Answers every request whose deadline passed; its message may still be stored, which is
    /// why consumers treat a task that is already finished as done.
    fn expire(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        // Tags are handed out in request order and every request gets the same timeout, so
        // deadlines grow with the tag: the late ones are at the front.
        let now = Instant::now();
        while let Some(entry) = link.pending.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            let p = entry.remove();
            metrics()
                .amqp_publishes
                .with_label_values(&["failed"])
                .inc();
            let _ = p
                .reply
                .send(Err(AmqpError::ConfirmTimeout(self.confirm_timeout)));
        }
    }

    fn lost(&mut self, reason: Cause) {
        self.connected.store(false, Ordering::Relaxed);
        if let Some(link) = self.link.take() {
            tracing::warn!(reason = %reason, in_flight = link.pending.len(), "publisher lost its RabbitMQ connection");
            Self::fail_all(link.pending, &AmqpError::ConnectionLost(reason.clone()));
        }
        self.last_error = reason;
        self.next_attempt = Instant::now() + self.backoff.next_delay();
    }

    fn fail_all(pending: BTreeMap<u64, Pending>, error: &AmqpError) {
        for (_, p) in pending {
            metrics()
                .amqp_publishes
                .with_label_values(&["failed"])
                .inc();
            let _ = p.reply.send(Err(error.clone()));
        }
    }
}

// One value per loop turn, on the stack: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Event {
    Request(Option<Request>),
    Confirm(Option<Confirm>),
    Return(Option<Return>),
    Tick,
}
