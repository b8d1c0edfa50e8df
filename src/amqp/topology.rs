//! The AMQP topology: names and declarations of every exchange and queue Kobe uses.
//!
//! ```text
//!   publish ──▶ {p}.tasks (direct) ──route──▶ {p}.{route}  ──consume──▶ worker
//!                    ▲                           │ nack / dead-letter
//!                    │ after the delay           ▼
//!   retry ──▶ {p}.retry (headers) ──level──▶ {p}.retry.{ms}     {p}.dlx (fanout) ──▶ {p}.dlq
//! ```
//!
//! `{p}` is the configured prefix (`kobe` by default); tests use their own prefix so they can run in
//! parallel on one broker. With quorum queues (`KOBE_QUEUE_TYPE=quorum`) every queue that holds a
//! task — the routes', the delay queues and the DLQ — is a quorum queue, replicated across the
//! cluster; those that dead-letter do it at least once (`x-dead-letter-strategy`, which needs
//! `x-overflow=reject-publish`), and the broker's delivery limit is set explicitly and high so
//! Kobe's own redelivery cap decides what is poison. Quorum queues have no `x-max-priority`:
//! RabbitMQ 3.x delivers them in order whatever the priority; 4.x has two levels (5–9 before
//! 0–4). A delay queue has a message TTL and dead-letters into `{p}.tasks`
//! keeping the message's routing key, so a retried message comes back to its own queue. Every
//! declaration is idempotent: `serve`, `worker` and `healthcheck` all declare what they use.

use std::collections::BTreeMap;
use std::time::Duration;

use amiquip::{
    AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};

use super::AmqpError;
use crate::cause::Cause;
use crate::domain::{Priority, QueueKind};

/// The route of tasks no route names.
pub const DEFAULT_ROUTE: &str = "default";

use super::wire::RETRY_LEVEL_HEADER;

/// Delays of the delay levels. A message waits in the longest level not longer than what is
/// left of its delay, for exactly that level's time: every message of one level expires in the
/// order it came, so none waits behind another's longer TTL (a broker expires only a queue's
/// head). What is left when it arrives (its `eta`) sends it through the levels again: a wait is
/// a few hops, each exact, and is late by less than the shortest level.
pub const RETRY_LEVELS_MS: [u64; 16] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_200_000, 3_600_000, 21_600_000,
];

/// The quorum queues' `x-delivery-limit` unless configured (`KOBE_QUORUM_DELIVERY_LIMIT`).
pub(crate) const DEFAULT_DELIVERY_LIMIT: u32 = 10_000;

/// Names and routes of one deployment's exchanges and queues.
#[derive(Clone, Debug)]
pub struct Topology {
    prefix: String,
    kind: QueueKind,
    /// Task name → route.
    routes: BTreeMap<String, String>,
    /// Quorum queues' `x-delivery-limit`.
    delivery_limit: u32,
    /// Also Celery's event exchange and the queue of its task events Kobe tracks Celery workers
    /// by (see [`crate::celery`]).
    celery_events: bool,
}

/// Celery's event exchange (a topic exchange; `event_exchange` in Celery's settings).
pub const CELERY_EVENT_EXCHANGE: &str = "celeryev";

impl Topology {
    pub fn new(prefix: &str, kind: QueueKind, routes: BTreeMap<String, String>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            kind,
            routes,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            celery_events: false,
        }
    }

    /// The same topology with Celery's event exchange and the queue of its task events.
    pub fn with_celery_events(mut self) -> Self {
        self.celery_events = true;
        self
    }

    /// Where Celery workers' task events wait for Kobe: one durable queue that every `serve`
    /// replica shares, so each event is taken once, and those sent while none runs wait.
    pub fn celery_events_queue(&self) -> String {
        format!("{}.celery-events", self.prefix)
    }

    /// The same topology with quorum queues' delivery limit at `limit`.
    pub(crate) fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = limit.max(1);
        self
    }

    pub fn kind(&self) -> QueueKind {
        self.kind
    }

    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }

    pub(crate) fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    pub(crate) fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// The queue a route's messages wait in.
    pub fn queue(&self, route: &str) -> String {
        format!("{}.{route}", self.prefix)
    }

    pub fn retry_queue(&self, level_ms: u64) -> String {
        format!("{}.retry.{level_ms}", self.prefix)
    }

    /// The route (routing key) of a task.
    pub(crate) fn route_of<'a>(&'a self, task_name: &str) -> &'a str {
        self.routes
            .get(task_name)
            .map(String::as_str)
            .unwrap_or(DEFAULT_ROUTE)
    }

    /// The route a delivery's routing key stands for: the key itself, or — for a message sent
    /// through the default exchange, whose routing key is the queue's name — that queue's route.
    /// What Kobe republishes (a retry, a delay) goes through its own exchange, by route.
    pub(crate) fn route_for_key<'a>(&self, routing_key: &'a str) -> &'a str {
        routing_key
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .filter(|route| !route.is_empty())
            .unwrap_or(routing_key)
    }

    /// Every route some task is sent to, `default` included.
    pub fn routes(&self) -> Vec<String> {
        let mut routes: Vec<String> = self.routes.values().cloned().collect();
        routes.push(DEFAULT_ROUTE.to_owned());
        routes.sort();
        routes.dedup();
        routes
    }

    /// The delay level for a delay: the longest level not longer than it (the shortest for a
    /// delay below every level).
    pub fn retry_level_for(delay: Duration) -> u64 {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        RETRY_LEVELS_MS
            .into_iter()
            .rev()
            .find(|level| *level <= ms)
            .unwrap_or(RETRY_LEVELS_MS[0])
    }

    /// The same message, routed through the delay queues so it reaches its queue after `delay`
    /// (retries, and tasks submitted with a countdown or an ETA).
    pub fn delayed(&self, mut outgoing: super::Outgoing, delay: Duration) -> super::Outgoing {
        let level = Self::retry_level_for(delay);
        let mut headers = outgoing.properties.headers().clone().unwrap_or_default();
        headers.insert(
            RETRY_LEVEL_HEADER.into(),
            AmqpValue::LongString(level.to_string()),
        );
        outgoing.exchange = self.retry_exchange();
        outgoing.properties = outgoing
            .properties
            .with_headers(headers)
            // The level's own TTL, as every message of the level has: the level's queue then
            // expires its messages in order. The rest of a longer delay is held in further hops
            // (the worker delays a task that is not due yet again).
            .with_expiration(level.to_string());
        outgoing
    }

    fn task_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(self.dead_letter_exchange()),
        );
        match self.kind {
            QueueKind::Classic => {
                args.insert(
                    "x-max-priority".into(),
                    AmqpValue::ShortShortUInt(Priority::MAX),
                );
            }
            QueueKind::Quorum => self.insert_quorum_arguments(&mut args, true),
        }
        args
    }

    /// Quorum queue arguments; `dead_letters`: the queue dead-letters somewhere, at least once.
    fn insert_quorum_arguments(&self, args: &mut FieldTable, dead_letters: bool) {
        args.insert(
            "x-queue-type".into(),
            AmqpValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AmqpValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        if dead_letters {
            args.insert(
                "x-dead-letter-strategy".into(),
                AmqpValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AmqpValue::LongString("reject-publish".into()),
            );
        }
    }

    fn dead_letter_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::new();
        if self.kind == QueueKind::Quorum {
            self.insert_quorum_arguments(&mut args, false);
        }
        args
    }

    fn retry_queue_arguments(&self, level_ms: u64) -> FieldTable {
        let mut args = FieldTable::new();
        args.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(self.tasks_exchange()),
        );
        args.insert(
            "x-message-ttl".into(),
            AmqpValue::LongLongInt(i64::try_from(level_ms).unwrap_or(i64::MAX)),
        );
        if self.kind == QueueKind::Quorum {
            self.insert_quorum_arguments(&mut args, true);
        }
        args
    }

    /// Declares everything, idempotently. A queue that exists with other arguments (say, declared
    /// by an older version without a dead-letter exchange) makes the broker close the channel with
    /// PRECONDITION_FAILED, which surfaces here as an error naming the queue.
    pub fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        let durable_exchange = |kind: ExchangeType, name: String| {
            channel
                .exchange_declare(
                    kind,
                    name.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                )
                .map(drop)
                .map_err(|e| AmqpError::Topology {
                    what: format!("exchange {name}"),
                    reason: Cause::of(e),
                })
        };
        durable_exchange(ExchangeType::Direct, self.tasks_exchange())?;
        durable_exchange(ExchangeType::Headers, self.retry_exchange())?;
        durable_exchange(ExchangeType::Fanout, self.dead_letter_exchange())?;

        self.declare_queue(
            channel,
            &self.dead_letter_queue(),
            self.dead_letter_queue_arguments(),
        )?;
        self.bind(
            channel,
            &self.dead_letter_queue(),
            &self.dead_letter_exchange(),
            "",
            FieldTable::new(),
        )?;

        for route in self.routes() {
            let queue = self.queue(&route);
            self.declare_queue(channel, &queue, self.task_queue_arguments())?;
            self.bind(
                channel,
                &queue,
                &self.tasks_exchange(),
                &route,
                FieldTable::new(),
            )?;
        }

        if self.celery_events {
            durable_exchange(ExchangeType::Topic, CELERY_EVENT_EXCHANGE.to_owned())?;
            let mut args = FieldTable::new();
            // Bounded: events nobody takes for long (no `serve` running) give way to newer ones.
            args.insert("x-max-length".into(), AmqpValue::LongInt(1_000_000));
            if self.kind == QueueKind::Quorum {
                args.insert(
                    "x-queue-type".into(),
                    AmqpValue::LongString("quorum".into()),
                );
            }
            let queue = self.celery_events_queue();
            self.declare_queue(channel, &queue, args)?;
            self.bind(
                channel,
                &queue,
                CELERY_EVENT_EXCHANGE,
                "task.#",
                FieldTable::new(),
            )?;
        }

        for level in RETRY_LEVELS_MS {
            let queue = self.retry_queue(level);
            self.declare_queue(channel, &queue, self.retry_queue_arguments(level))?;
            let mut matching = FieldTable::new();
            matching.insert("x-match".into(), AmqpValue::LongString("all".into()));
            matching.insert(
                RETRY_LEVEL_HEADER.into(),
                AmqpValue::LongString(level.to_string()),
            );
            self.bind(channel, &queue, &self.retry_exchange(), "", matching)?;
        }
        Ok(())
    }

    fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        channel
            .queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    arguments,
                    ..Default::default()
                },
            )
            .map(drop)
            .map_err(|e| {
                let text = e.to_string();
                let what = if text.contains("x-queue-type") {
                    // A queue cannot change type in place.
                    format!(
                        "queue {name} (it exists as another queue type than KOBE_QUEUE_TYPE={}; queues cannot change type in place — drain and delete it, or see the README's \"Switching to quorum queues\")",
                        match self.kind {
                            QueueKind::Classic => "classic",
                            QueueKind::Quorum => "quorum",
                        }
                    )
                } else {
                    format!("queue {name}")
                };
                AmqpError::Topology {
                    what,
                    reason: Cause::of(e),
                }
            })
    }

    fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        channel
            .queue_bind(queue, exchange, routing_key, arguments)
            .map_err(|e| AmqpError::Topology {
                what: format!("binding {exchange} → {queue}"),
                reason: Cause::of(e),
            })
    }

    /// Every queue name this topology declares, for checks and for deleting a test's topology.
    /// The queues worth watching: each route's, and the dead-letter queue.
    pub(crate) fn watched_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.routes().iter().map(|r| self.queue(r)).collect();
        queues.push(self.dead_letter_queue());
        queues
    }

    pub fn all_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self.routes().iter().map(|r| self.queue(r)).collect();
        queues.push(self.dead_letter_queue());
        queues.extend(RETRY_LEVELS_MS.iter().map(|l| self.retry_queue(*l)));
        if self.celery_events {
            queues.push(self.celery_events_queue());
        }
        queues
    }

    /// Every exchange name this topology declares.
    pub(crate) fn all_exchanges(&self) -> Vec<String> {
        vec![
            self.tasks_exchange(),
            self.retry_exchange(),
            self.dead_letter_exchange(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let routes = BTreeMap::from([("demo_long_io".to_owned(), "io".to_owned())]);
        Topology::new("kobe", QueueKind::Classic, routes)
    }

    #[test]
    fn names_carry_the_prefix() {
        let t = topology();
        assert_eq!(t.tasks_exchange(), "kobe.tasks");
        assert_eq!(t.dead_letter_queue(), "kobe.dlq");
        assert_eq!(t.queue("default"), "kobe.default");
        assert_eq!(t.retry_queue(1000), "kobe.retry.1000");
    }

    #[test]
    fn unrouted_tasks_go_to_default() {
        let t = topology();
        assert_eq!(t.route_of("demo_long_io"), "io");
        assert_eq!(t.route_of("anything_else"), DEFAULT_ROUTE);
        assert_eq!(t.routes(), vec!["default".to_owned(), "io".to_owned()]);
    }

    #[test]
    fn a_queue_name_as_routing_key_stands_for_its_route() {
        let t = Topology::new("kobe", QueueKind::Classic, BTreeMap::new());
        assert_eq!(t.route_for_key("default"), "default");
        assert_eq!(t.route_for_key(&t.queue("crawl")), "crawl");
        assert_eq!(t.route_for_key("kobe."), "kobe.");
        assert_eq!(t.route_for_key("other.crawl"), "other.crawl");
    }

    #[test]
    fn a_far_delay_never_carries_an_expiration_past_the_broker_limit() {
        let t = Topology::new("kobe", QueueKind::Classic, BTreeMap::new());
        let outgoing = |delay| {
            t.delayed(
                crate::amqp::Outgoing {
                    exchange: t.tasks_exchange(),
                    routing_key: "default".into(),
                    body: Vec::new(),
                    properties: Default::default(),
                },
                delay,
            )
        };
        let far = outgoing(Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(
            far.properties.expiration().as_deref(),
            Some(
                RETRY_LEVELS_MS[RETRY_LEVELS_MS.len() - 1]
                    .to_string()
                    .as_str()
            )
        );
        assert!(far.check().is_ok());
        let near = outgoing(Duration::from_millis(1_500));
        assert_eq!(near.properties.expiration().as_deref(), Some("1000"));
    }

    #[test]
    fn a_delay_waits_in_the_longest_level_not_longer_than_it() {
        assert_eq!(Topology::retry_level_for(Duration::from_millis(1)), 100);
        assert_eq!(Topology::retry_level_for(Duration::from_millis(100)), 100);
        assert_eq!(Topology::retry_level_for(Duration::from_millis(249)), 100);
        assert_eq!(Topology::retry_level_for(Duration::from_millis(250)), 250);
        assert_eq!(Topology::retry_level_for(Duration::from_secs(119)), 60_000);
        assert_eq!(
            Topology::retry_level_for(Duration::from_secs(86_400)),
            21_600_000
        );
    }

    #[test]
    fn quorum_queues_get_the_safe_dead_letter_strategy() {
        let t = Topology::new("kobe", QueueKind::Quorum, BTreeMap::new());
        let args = t.task_queue_arguments();
        assert_eq!(
            args.get("x-dead-letter-strategy"),
            Some(&AmqpValue::LongString("at-least-once".into()))
        );
        assert!(!args.contains_key("x-max-priority"));
        assert_eq!(
            args.get("x-delivery-limit"),
            Some(&AmqpValue::LongLongInt(i64::from(DEFAULT_DELIVERY_LIMIT)))
        );
    }

    #[test]
    fn with_quorum_every_queue_that_holds_a_task_is_quorum() {
        let t = Topology::new("kobe", QueueKind::Quorum, BTreeMap::new()).with_delivery_limit(7);
        let quorum = Some(&AmqpValue::LongString("quorum".into()));
        for args in [
            t.task_queue_arguments(),
            t.retry_queue_arguments(1000),
            t.dead_letter_queue_arguments(),
        ] {
            assert_eq!(args.get("x-queue-type"), quorum);
            assert_eq!(
                args.get("x-delivery-limit"),
                Some(&AmqpValue::LongLongInt(7))
            );
        }
        assert_eq!(
            t.retry_queue_arguments(1000).get("x-dead-letter-strategy"),
            Some(&AmqpValue::LongString("at-least-once".into()))
        );
        let classic = topology();
        assert!(!classic
            .retry_queue_arguments(1000)
            .contains_key("x-queue-type"));
    }
}
