//! A delivery being worked on, and what its claim can lead to.

use std::sync::{Arc, Mutex};

use mongodb::bson::DateTime;

use super::decision::Happened;
use crate::amqp::{Delivery, TaskMessage};
use crate::store::attempts::Attempt;

/// The attempt a delivery is working on (and whether it holds its lease), kept where a panic
/// handler can find it.
pub(super) type AttemptCell = Arc<Mutex<Option<(Attempt, bool)>>>;

/// A delivery being worked on.
pub(super) struct Job<'a> {
    pub(super) delivery: &'a Delivery,
    pub(super) attempt: Attempt,
    /// What a retry is published from; an unreadable delivery (or one whose handling panicked)
    /// has none, and its plan is never a retry.
    pub(super) message: Option<&'a TaskMessage>,
    /// The attempt holds the task's lease (its claim was applied).
    pub(super) claimed: bool,
    /// When its claim was taken (it ran from then on).
    pub(super) started_at: Option<DateTime>,
    /// Starts of this attempt, this one included (once claimed).
    pub(super) deliveries: u32,
    /// Another copy's lease of this attempt was found: closing it unrun is not this copy's call.
    pub(super) lease_found: bool,
    /// Until when its handler's run could trust the lease (the last renewal, less the margin):
    /// an outcome recorded later first checks the lease is still its own.
    pub(super) trusted_until: Option<std::time::Instant>,
}

impl<'a> Job<'a> {
    /// A delivery not claimed yet.
    pub(super) fn new(delivery: &'a Delivery, attempt: Attempt) -> Self {
        Self {
            delivery,
            attempt,
            message: None,
            claimed: false,
            started_at: None,
            deliveries: 0,
            lease_found: false,
            trusted_until: None,
        }
    }

    /// The job of a message that was read.
    pub(super) fn reading(mut self, message: &'a TaskMessage) -> Self {
        self.message = Some(message);
        self
    }

    pub(super) fn retries(&self) -> u32 {
        self.attempt.retries
    }

    /// The attempt's number, from 1.
    pub(super) fn attempt_number(&self) -> u32 {
        self.attempt.retries.saturating_add(1)
    }
}

/// Where a claim (or the look at a refused one) leads.
#[derive(Debug)]
pub(super) enum Next {
    /// Something happened to the task (it ran, or must close unrun): plan it and carry it out.
    Conclude(Happened),
    /// The delivery is settled (or left for the broker) already.
    Settled,
    /// The task became takeable while it was looked at: claim again.
    Retake,
}
