//! A Kobe worker as Celery's tools see a worker (`KOBE_CELERY_EVENTS=true`): it sends Celery's
//! worker events (`worker-online`, a `worker-heartbeat` every [`HEARTBEAT`], `worker-offline`)
//! and task events (`task-received`, `task-started`, `task-succeeded`, `task-failed`,
//! `task-retried`, `task-revoked`) to the `celeryev` exchange, and answers the remote-control
//! commands Flower and `celery inspect` send on `celery.pidbox` (`ping`, `stats`, `active`,
//! `registered`, `active_queues`, and the empty lists of what Kobe does not hold: `scheduled`,
//! `reserved`, `revoked`, `conf`). A `revoke` (Flower's button, `celery control revoke`) is
//! handed to Kobe's cancel: a waiting task is revoked, a running one asked to stop.
//!
//! All of it is best effort and off the tasks' path: one thread with a connection of its own,
//! fed through a channel; events that cannot be sent while the broker is away are dropped, as a
//! Celery worker drops them.

use std::collections::{BTreeMap, HashMap};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, Channel, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions,
    ExchangeType, FieldTable, Publish, QueueDeclareOptions,
};
use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::amqp::connection::Endpoint;
use crate::amqp::topology::CELERY_EVENT_EXCHANGE;
use crate::config::{celery_hostname, ServiceUrl};
use crate::store::celery_results::{About, Meta};

/// How often a worker says it is alive (Celery's default `freq`).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Celery's remote-control exchange and the exchange replies go to.
const PIDBOX_EXCHANGE: &str = "celery.pidbox";
const REPLY_EXCHANGE: &str = "reply.celery.pidbox";

/// What Celery's tools are told this worker is.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub url: ServiceUrl,
    pub concurrency: u16,
    pub prefetch: u16,
    /// The queues it consumes.
    pub queues: Vec<String>,
    /// The tasks it runs.
    pub registered: Vec<String>,
    /// `KOBE_LOG_PAYLOADS`: arguments and results go into the events (cut, as Celery cuts
    /// them) only when payloads may be shown; else each is sent as `…`.
    pub show_payloads: bool,
}

/// Longest `repr` an event carries, as Celery's own (`argsrepr` and `resultrepr` are cut there).
const MAX_REPR: usize = 1024;
/// Notes waiting for the thread at most: past that, events are dropped (they are best effort, as
/// Celery's are) rather than held in memory.
const MAX_NOTES: usize = 10_000;
/// Tasks kept for `active` at most; no attempt runs longer than the longest time limit either,
/// so an attempt whose end never came (a lost lease, a stop) is forgotten then.
const MAX_ACTIVE: usize = 10_000;

/// One task's start, as `task-received` and `task-started` tell it: what its Celery meta says
/// of it, and the workflow it belongs to.
#[derive(Debug, Clone)]
pub struct Started {
    pub about: About,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
}

enum Note {
    Started(Started),
    Ended { task_id: String, ended: Meta },
    Stop,
}

/// Tells Celery's tools what this worker does; cheap to clone. Dropping every copy (or
/// [`Announcer::stop`]) sends `worker-offline` and closes the connection.
#[derive(Clone)]
pub struct Announcer {
    notes: Sender<Note>,
}

impl Announcer {
    /// Starts the thread; revokes asked for by Celery's tools come out of the receiver.
    pub fn start(config: FleetConfig) -> (Self, mpsc::UnboundedReceiver<String>) {
        let (notes, inbox) = crossbeam_channel::bounded(MAX_NOTES);
        let (revokes, revoked) = mpsc::unbounded_channel();
        let spawned = thread::Builder::new()
            .name("kobe-celery-events".into())
            .spawn(move || Fleet::new(config, inbox, revokes).run());
        if let Err(error) = spawned {
            tracing::error!(error = %error, "cannot start the thread that sends Celery's events");
        }
        (Self { notes }, revoked)
    }

    pub fn started(&self, started: Started) {
        let _ = self.notes.try_send(Note::Started(started));
    }

    /// How an attempt ended, as its Celery meta says it (`Started` is no end, and sends nothing).
    pub fn ended(&self, task_id: &str, ended: Meta) {
        let _ = self.notes.try_send(Note::Ended {
            task_id: task_id.to_owned(),
            ended,
        });
    }

    /// Sends `worker-offline` and closes the connection.
    pub fn stop(&self) {
        let _ = self.notes.send(Note::Stop);
    }
}

/// A task running here, for `active`.
struct Active {
    started: Started,
    at: f64,
}

struct Fleet {
    config: FleetConfig,
    hostname: &'static str,
    inbox: Receiver<Note>,
    revokes: mpsc::UnboundedSender<String>,
    clock: u64,
    started_at: Instant,
    active: HashMap<String, Active>,
    processed: u64,
    /// Tasks run, by name (`stats.total`).
    total: BTreeMap<String, u64>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// JSON text standing in for a Python `repr` (Flower shows it as it is), cut as Celery cuts its
/// own; `…` when payloads are not to be shown.
fn repr(value: &Value, show: bool) -> String {
    if !show {
        return "…".to_owned();
    }
    let text = value.to_string();
    match text.char_indices().nth(MAX_REPR) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

impl Fleet {
    fn new(
        config: FleetConfig,
        inbox: Receiver<Note>,
        revokes: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            config,
            hostname: celery_hostname(),
            inbox,
            revokes,
            clock: 0,
            started_at: Instant::now(),
            active: HashMap::new(),
            processed: 0,
            total: BTreeMap::new(),
        }
    }

    fn run(mut self) {
        let endpoint = match Endpoint::parse(&self.config.url) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                tracing::error!(error = %error, "cannot send Celery's events");
                return;
            }
        };
        let mut pause = Duration::from_millis(100);
        loop {
            let ended = match endpoint.connect_as(Duration::from_secs(5), "kobe celery events") {
                Ok(mut connection) => {
                    let stopped = match connection.open_channel(None) {
                        Ok(channel) => {
                            let stopped = self.session(&channel);
                            let _ = channel.close();
                            stopped
                        }
                        Err(error) => Err(error.to_string()),
                    };
                    let _ = connection.close();
                    stopped
                }
                Err(error) => Err(error.to_string()),
            };
            match ended {
                Ok(()) => return,
                Err(reason) => {
                    tracing::debug!(error = %reason, "lost the connection Celery's events go on");
                    // Notes meanwhile keep the counts right; their events are dropped.
                    let until = Instant::now() + pause;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        match self.inbox.recv_timeout(left) {
                            Ok(Note::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                            Ok(note) => {
                                self.account(&note);
                            }
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Declares, says it is online and serves until stopped (`Ok`) or the connection fails.
    fn session(&mut self, channel: &Channel) -> Result<(), String> {
        let text = |e: amiquip::Error| e.to_string();
        let declare = |kind, name: &str, durable| {
            channel.exchange_declare(
                kind,
                name,
                ExchangeDeclareOptions {
                    durable,
                    ..Default::default()
                },
            )
        };
        declare(ExchangeType::Topic, CELERY_EVENT_EXCHANGE, true).map_err(text)?;
        declare(ExchangeType::Fanout, PIDBOX_EXCHANGE, false).map_err(text)?;
        declare(ExchangeType::Direct, REPLY_EXCHANGE, false).map_err(text)?;
        let mut arguments = FieldTable::new();
        arguments.insert("x-expires".into(), amiquip::AmqpValue::LongInt(10_000));
        arguments.insert("x-message-ttl".into(), amiquip::AmqpValue::LongInt(300_000));
        let queue = channel
            .queue_declare(
                format!("{}.celery.pidbox", self.hostname),
                QueueDeclareOptions {
                    auto_delete: true,
                    arguments,
                    ..Default::default()
                },
            )
            .map_err(text)?;
        channel
            .queue_bind(queue.name(), PIDBOX_EXCHANGE, "", FieldTable::new())
            .map_err(text)?;
        let commands = queue
            .consume(ConsumerOptions {
                no_ack: true,
                ..Default::default()
            })
            .map_err(text)?;
        self.worker_event(channel, "worker-online")?;
        let mut beat = Instant::now() + HEARTBEAT;
        let inbox = self.inbox.clone();
        loop {
            let mut select = Select::new();
            let from_inbox = select.recv(&inbox);
            let from_tools = select.recv(commands.receiver());
            let left = beat.saturating_duration_since(Instant::now());
            match select.select_timeout(left) {
                Err(_) => {
                    self.worker_event(channel, "worker-heartbeat")?;
                    beat = Instant::now() + HEARTBEAT;
                }
                Ok(op) if op.index() == from_inbox => match op.recv(&inbox) {
                    Ok(Note::Stop) | Err(_) => {
                        let _ = self.worker_event(channel, "worker-offline");
                        return Ok(());
                    }
                    Ok(note) => {
                        for (kind, fields) in self.account(&note) {
                            self.send(channel, kind, fields)?;
                        }
                    }
                },
                Ok(op) if op.index() == from_tools => match op.recv(commands.receiver()) {
                    Ok(ConsumerMessage::Delivery(delivery)) => {
                        self.obey(channel, &delivery.body)?
                    }
                    Ok(other) => return Err(format!("remote-control consumer ended: {other:?}")),
                    Err(_) => return Err("remote-control consumer ended".into()),
                },
                Ok(_) => {}
            }
        }
    }

    /// Keeps the counts and the running tasks; the task events a note stands for.
    fn account(&mut self, note: &Note) -> Vec<(&'static str, Map<String, Value>)> {
        let fields = |value: Value| match value {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        match note {
            Note::Started(started) => {
                let at = now();
                let about = &started.about;
                let longest = crate::domain::MAX_TIME_LIMIT.as_secs_f64();
                self.active.retain(|_, active| at - active.at <= longest);
                if self.active.len() >= MAX_ACTIVE {
                    let oldest = self
                        .active
                        .iter()
                        .min_by(|a, b| a.1.at.total_cmp(&b.1.at))
                        .map(|(id, _)| id.clone());
                    if let Some(oldest) = oldest {
                        self.active.remove(&oldest);
                    }
                }
                self.active.insert(
                    about.task_id.clone(),
                    Active {
                        started: started.clone(),
                        at,
                    },
                );
                let received = json!({
                    "uuid": about.task_id, "name": about.name,
                    "args": repr(&Value::Array(about.args.clone()), self.config.show_payloads),
                    "kwargs": repr(&Value::Object(about.kwargs.clone()), self.config.show_payloads),
                    "root_id": started.root_id, "parent_id": started.parent_id,
                    "retries": about.retries, "eta": null, "expires": null,
                });
                vec![
                    ("task-received", fields(received)),
                    ("task-started", fields(json!({"uuid": about.task_id}))),
                ]
            }
            Note::Ended {
                ended: Meta::Started,
                ..
            } => Vec::new(),
            Note::Ended { task_id, ended } => {
                let runtime = self
                    .active
                    .remove(task_id)
                    .map(|active| {
                        *self.total.entry(active.started.about.name).or_default() += 1;
                        now() - active.at
                    })
                    .unwrap_or_default();
                self.processed += 1;
                let event = match ended {
                    Meta::Started => unreachable!("answered above"),
                    Meta::Success { result } => (
                        "task-succeeded",
                        json!({"uuid": task_id, "result": repr(result, self.config.show_payloads), "runtime": runtime}),
                    ),
                    Meta::Failure { cause } => (
                        "task-failed",
                        json!({"uuid": task_id, "exception": cause, "traceback": cause}),
                    ),
                    Meta::Retry { cause } => (
                        "task-retried",
                        json!({"uuid": task_id, "exception": cause, "traceback": cause}),
                    ),
                    Meta::Revoked { cause } => (
                        "task-revoked",
                        json!({"uuid": task_id, "terminated": true, "signum": null, "expired": false, "reason": cause}),
                    ),
                };
                vec![(event.0, fields(event.1))]
            }
            Note::Stop => Vec::new(),
        }
    }

    fn worker_event(&mut self, channel: &Channel, kind: &'static str) -> Result<(), String> {
        let fields = json!({
            "freq": HEARTBEAT.as_secs_f64(),
            "active": self.active.len(),
            "processed": self.processed,
            "loadavg": load_average(),
            "sw_ident": "kobe",
            "sw_ver": env!("CARGO_PKG_VERSION"),
            "sw_sys": std::env::consts::OS,
        });
        match fields {
            Value::Object(map) => self.send(channel, kind, map),
            _ => unreachable!("an object"),
        }
    }

    /// Publishes one event with Celery's envelope (`type`, `hostname`, `timestamp`, `clock`, …).
    fn send(
        &mut self,
        channel: &Channel,
        kind: &'static str,
        mut fields: Map<String, Value>,
    ) -> Result<(), String> {
        self.clock += 1;
        fields.insert("type".into(), kind.into());
        fields.insert("hostname".into(), self.hostname.into());
        fields.insert("timestamp".into(), now().into());
        fields.insert("utcoffset".into(), 0.into());
        fields.insert("pid".into(), std::process::id().into());
        fields.insert("clock".into(), self.clock.into());
        let body = Value::Object(fields).to_string();
        let properties = json_properties("hostname", self.hostname);
        channel
            .basic_publish(
                CELERY_EVENT_EXCHANGE,
                Publish::with_properties(body.as_bytes(), kind.replace('-', "."), properties),
            )
            .map_err(|e| e.to_string())
    }

    /// Carries out one remote-control command and replies, if it is for this worker and asks.
    fn obey(&mut self, channel: &Channel, body: &[u8]) -> Result<(), String> {
        let Ok(command) = serde_json::from_slice::<Value>(body) else {
            return Ok(());
        };
        if let Some(destination) = command["destination"].as_array() {
            if !destination.iter().any(|d| d == self.hostname) {
                return Ok(());
            }
        }
        let method = command["method"].as_str().unwrap_or_default();
        let answer = self.answer(method, &command["arguments"]);
        let (Some(answer), Some(ticket), Some(exchange), Some(routing_key)) = (
            answer,
            command["ticket"].as_str(),
            command["reply_to"]["exchange"].as_str(),
            command["reply_to"]["routing_key"].as_str(),
        ) else {
            return Ok(());
        };
        let properties = json_properties("ticket", ticket);
        let reply = json!({ self.hostname: answer }).to_string();
        channel
            .basic_publish(
                exchange,
                Publish::with_properties(reply.as_bytes(), routing_key, properties),
            )
            .map_err(|e| e.to_string())
    }

    /// What a command answers; `None` for one Kobe does not know.
    fn answer(&mut self, method: &str, arguments: &Value) -> Option<Value> {
        Some(match method {
            "ping" => json!({"ok": "pong"}),
            "registered" => json!(self.config.registered),
            "active_queues" => Value::Array(
                self.config
                    .queues
                    .iter()
                    .map(|queue| json!({"name": queue, "routing_key": queue, "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false, "exchange": {"name": "", "type": "direct"}}))
                    .collect(),
            ),
            "active" => Value::Array(
                self.active
                    .values()
                    .map(|active| {
                        let s = &active.started.about;
                        let (args, kwargs) = match self.config.show_payloads {
                            true => (json!(s.args), json!(s.kwargs)),
                            false => (json!("…"), json!("…")),
                        };
                        json!({
                            "id": s.task_id, "name": s.name, "type": s.name,
                            "args": args, "kwargs": kwargs, "hostname": self.hostname,
                            "time_start": active.at, "acknowledged": false,
                            "delivery_info": {"routing_key": s.queue, "redelivered": false},
                            "worker_pid": std::process::id(),
                        })
                    })
                    .collect(),
            ),
            "stats" => json!({
                "total": self.total,
                "pid": std::process::id(),
                "clock": self.clock.to_string(),
                "uptime": self.started_at.elapsed().as_secs(),
                "pool": {
                    "implementation": "kobe (tokio tasks)",
                    "max-concurrency": self.config.concurrency,
                    "processes": [std::process::id()],
                    "max-tasks-per-child": "N/A",
                    "put-guarded-by-semaphore": false,
                    "timeouts": [0, 0],
                },
                "prefetch_count": self.config.prefetch,
                "broker": {"transport": "amqp"},
                "rusage": {},
            }),
            "scheduled" | "reserved" | "revoked" => json!([]),
            "conf" => json!({}),
            "revoke" => {
                let ids: Vec<String> = match &arguments["task_id"] {
                    Value::String(id) => vec![id.clone()],
                    Value::Array(ids) => ids
                        .iter()
                        .filter_map(|id| id.as_str().map(str::to_owned))
                        .collect(),
                    _ => Vec::new(),
                };
                for id in &ids {
                    let _ = self.revokes.send(id.clone());
                }
                json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
            }
            _ => return None,
        })
    }
}

/// A JSON message's properties as kombu sends them, with the one header Celery's tools read.
fn json_properties(header: &str, value: &str) -> AmqpProperties {
    let mut headers = FieldTable::new();
    headers.insert(header.into(), amiquip::AmqpValue::LongString(value.into()));
    AmqpProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
}

/// The 1, 5 and 15 minute load averages, as Celery reports them.
fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> (Fleet, mpsc::UnboundedReceiver<String>) {
        let (_notes, inbox) = crossbeam_channel::unbounded();
        let (revokes, revoked) = mpsc::unbounded_channel();
        let config = FleetConfig {
            url: ServiceUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            concurrency: 4,
            prefetch: 16,
            queues: vec!["kobe.default".into()],
            registered: vec!["wordcount".into()],
            show_payloads: true,
        };
        (Fleet::new(config, inbox, revokes), revoked)
    }

    fn started(id: &str) -> Started {
        Started {
            about: About {
                task_id: id.into(),
                name: "wordcount".into(),
                args: vec![json!(1)],
                kwargs: Map::new(),
                retries: 0,
                queue: "kobe.default".into(),
            },
            root_id: None,
            parent_id: None,
        }
    }

    #[test]
    fn a_start_is_received_and_started_and_its_end_counts_once_by_name() {
        let (mut fleet, _) = fleet();
        let events = fleet.account(&Note::Started(started("t1")));
        let kinds: Vec<_> = events.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(kinds, ["task-received", "task-started"]);
        assert_eq!(events[0].1["name"], "wordcount");
        assert_eq!(events[0].1["args"], "[1]");
        assert_eq!(fleet.answer("active", &Value::Null).unwrap()[0]["id"], "t1");

        let events = fleet.account(&Note::Ended {
            task_id: "t1".into(),
            ended: Meta::Success { result: json!(3) },
        });
        assert_eq!(events[0].0, "task-succeeded");
        assert_eq!(events[0].1["result"], "3");
        let stats = fleet.answer("stats", &Value::Null).unwrap();
        assert_eq!(stats["total"]["wordcount"], 1);
        assert_eq!(stats["pool"]["max-concurrency"], 4);
        assert_eq!(fleet.answer("active", &Value::Null).unwrap(), json!([]));
    }

    #[test]
    fn payloads_go_into_events_only_when_they_may_be_shown_and_cut_as_celery_cuts_them() {
        let (mut fleet, _) = fleet();
        let mut long = started("t1");
        long.about.args = vec![json!("x".repeat(5_000))];
        let events = fleet.account(&Note::Started(long.clone()));
        let args = events[0].1["args"].as_str().unwrap();
        assert_eq!(args.chars().count(), MAX_REPR + 1);
        assert!(args.ends_with('…'));
        fleet.config.show_payloads = false;
        let events = fleet.account(&Note::Started(started("t2")));
        assert_eq!(
            (events[0].1["args"].as_str(), events[0].1["kwargs"].as_str()),
            (Some("…"), Some("…"))
        );
        let events = fleet.account(&Note::Ended {
            task_id: "t2".into(),
            ended: Meta::Success {
                result: json!("secret"),
            },
        });
        assert_eq!(events[0].1["result"], "…");
        let active = fleet.answer("active", &Value::Null).unwrap();
        assert_eq!(active[0]["args"], "…");
        // Starts whose end never comes are not kept without bound.
        for i in 0..MAX_ACTIVE + 5 {
            fleet.account(&Note::Started(started(&format!("lost-{i}"))));
        }
        assert_eq!(fleet.active.len(), MAX_ACTIVE);
    }

    #[test]
    fn a_revoke_hands_every_id_on_and_unknown_commands_get_no_answer() {
        let (mut fleet, mut revoked) = fleet();
        let answer = fleet
            .answer("revoke", &json!({"task_id": ["a", "b"], "terminate": true}))
            .unwrap();
        assert_eq!(answer["ok"], "tasks a, b flagged as revoked");
        assert_eq!(revoked.try_recv().unwrap(), "a");
        assert_eq!(revoked.try_recv().unwrap(), "b");
        assert!(fleet.answer("shutdown", &Value::Null).is_none());
        assert_eq!(
            fleet.answer("registered", &Value::Null).unwrap(),
            json!(["wordcount"])
        );
    }
}
