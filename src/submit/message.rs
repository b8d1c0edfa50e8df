//! A recorded task's message: the wire keeps Celery's forms (seconds, RFC 3339 text), and a
//! task with an ETA waits in the delay queues.

use std::time::Duration;

use mongodb::bson::DateTime;
use serde_json::Map;

use super::{SubmitError, Submitter};
use crate::amqp::wire::{PAYLOAD_HEADER, RECORDED_HEADER};
use crate::amqp::{Outgoing, TaskMessage};
use crate::store::TaskDocument;

impl Submitter {
    pub(super) fn message(
        &self,
        document: &TaskDocument,
        root_id: Option<String>,
    ) -> Result<Outgoing, SubmitError> {
        let (args, kwargs) = match &document.payload_ref {
            Some(_) => (Vec::new(), Map::new()),
            None => (document.args.clone(), document.kwargs.clone()),
        };
        let mut message = TaskMessage::new(document.id.clone(), &document.task_name, args, kwargs);
        message.priority = document.priority;
        message.traceparent = document.traceparent.clone();
        message.parent_id = document.parent_id.clone();
        message.workflow_id = document.workflow_id.clone();
        message.embed = document.embed.clone();
        if root_id.is_some() {
            message.root_id = root_id;
        }
        // The wire keeps Celery's forms: seconds, and RFC 3339 text.
        message.hard_time_limit = document.hard_time_limit.map(|d| d.as_secs_f64());
        message.soft_time_limit = document.soft_time_limit.map(|d| d.as_secs_f64());
        message.eta = document.eta.map(rfc3339);
        message.expires = document.expires.map(rfc3339);
        // A replayed task's next attempt (0 for a task never run).
        message.retries = document.retries;
        let mut headers = message.headers();
        headers.insert(RECORDED_HEADER.into(), amiquip::AmqpValue::Boolean(true));
        if let Some(reference) = &document.payload_ref {
            headers.insert(
                PAYLOAD_HEADER.into(),
                amiquip::AmqpValue::LongString(reference.clone()),
            );
        }
        let outgoing = Outgoing {
            exchange: self.topology.tasks_exchange(),
            // A task first recorded by a worker (a Celery client's) has no route of its own.
            routing_key: match document.route.as_str() {
                "" => self.topology.route_of(&document.task_name).to_owned(),
                route => route.to_owned(),
            },
            body: message.body(),
            properties: message.properties().with_headers(headers),
        };
        // A countdown or ETA: wait in the delay queues, not in the task queue.
        let wait = document
            .eta
            .map(|eta| eta.timestamp_millis() - DateTime::now().timestamp_millis());
        Ok(match wait {
            Some(wait) if wait > 0 => self
                .topology
                .delayed(outgoing, Duration::from_millis(wait as u64)),
            _ => outgoing,
        })
    }
}

/// A time as the message carries it (millisecond precision, UTC).
fn rfc3339(time: DateTime) -> String {
    time.try_to_rfc3339_string()
        .unwrap_or_else(|_| time.timestamp_millis().to_string())
}
