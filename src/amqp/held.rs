//! The deliveries a consumer's channel has handed to the worker and not settled yet, and how a
//! batch of settlements goes to the broker: nacks one by one, acks as few `multiple` acks as are
//! safe.
//!
//! Delivery tags count up per channel across all its consumers, but each queue's consumer has a
//! receiver of its own, so tags reach this thread out of order: tag 11 of queue B may be handed
//! on while tag 10 of queue A still waits in A's receiver. A `multiple` ack covers every
//! unsettled tag up to its own, so it must stop below the lowest tag not yet received as well as
//! below the lowest held one not being acked — else it acks a delivery before it ran.
//! Pure bookkeeping: what it decides is sent by the consumer, and unit-tested here against a
//! simulated channel.

use std::collections::{BTreeSet, HashMap};

/// How a delivery ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove it from the queue.
    Ack,
    /// `basic.nack(requeue=false)`: the broker dead-letters it.
    DeadLetter,
    /// Put it back for another consumer.
    Requeue,
}

/// The unsettled deliveries of one channel, by tag, with what has been received so far.
pub(crate) struct Held<T> {
    deliveries: HashMap<u64, T>,
    /// Every tag below this one has been received (tags start at 1 on a channel).
    received_below: u64,
    /// Tags received above `received_below`, out of order.
    ahead: BTreeSet<u64>,
}

/// What to send for a batch of settlements.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action<T> {
    Nack {
        delivery: T,
        requeue: bool,
    },
    Ack(T),
    /// Acks every unsettled delivery of the channel up to and including this one.
    AckMultiple(T),
}

impl<T> Held<T> {
    pub fn new() -> Self {
        Self {
            deliveries: HashMap::new(),
            received_below: 1,
            ahead: BTreeSet::new(),
        }
    }

    /// A delivery received from the channel, held until it is settled.
    pub fn receive(&mut self, tag: u64, delivery: T) {
        self.deliveries.insert(tag, delivery);
        if tag == self.received_below {
            self.received_below += 1;
            while self.ahead.remove(&self.received_below) {
                self.received_below += 1;
            }
        } else if tag > self.received_below {
            self.ahead.insert(tag);
        }
    }

    /// Takes a delivery back without settling it through [`Held::settle`].
    pub fn remove(&mut self, tag: u64) -> Option<T> {
        self.deliveries.remove(&tag)
    }

    /// What to send for `settlements`: every nack of a held delivery, then the acks, a run of
    /// them below every delivery that stays unsettled (held, or not received yet) as one
    /// `multiple` ack. A settlement of a tag not held (settled already, or twice in the batch)
    /// sends nothing.
    pub fn settle(&mut self, settlements: Vec<(u64, Settlement)>) -> Vec<Action<T>> {
        let mut actions = Vec::new();
        let mut acks = Vec::new();
        for (tag, settlement) in settlements {
            let requeue = match settlement {
                Settlement::Ack => {
                    acks.push(tag);
                    continue;
                }
                Settlement::DeadLetter => false,
                Settlement::Requeue => true,
            };
            if let Some(delivery) = self.deliveries.remove(&tag) {
                actions.push(Action::Nack { delivery, requeue });
            }
        }
        acks.sort_unstable();
        acks.dedup();
        acks.retain(|tag| self.deliveries.contains_key(tag));
        if acks.is_empty() {
            return actions;
        }
        let plan = plan_acks(self.deliveries.keys().copied(), self.received_below, &acks);
        if let Some(upto) = plan.multiple {
            if let Some(last) = self.deliveries.remove(&upto) {
                self.deliveries.retain(|&tag, _| tag > upto);
                actions.push(Action::AckMultiple(last));
            }
        }
        for tag in plan.single {
            if let Some(delivery) = self.deliveries.remove(&tag) {
                actions.push(Action::Ack(delivery));
            }
        }
        actions
    }
}

/// How a set of acks is sent.
#[derive(Debug, PartialEq, Eq)]
struct AckPlan {
    /// One `multiple` ack of every held delivery up to this tag, all of them acked.
    multiple: Option<u64>,
    /// The rest, one by one.
    single: Vec<u64>,
}

/// Splits `acks` (sorted, all held) into the run below both the lowest held delivery not being
/// acked and the lowest tag not received yet — one `multiple` ack covers it, as it covers
/// nothing else — and the rest.
fn plan_acks(held: impl Iterator<Item = u64>, received_below: u64, acks: &[u64]) -> AckPlan {
    let kept = held
        .filter(|tag| acks.binary_search(tag).is_err())
        .min()
        .unwrap_or(u64::MAX)
        .min(received_below);
    let below = acks.partition_point(|&tag| tag < kept);
    if below < 2 {
        return AckPlan {
            multiple: None,
            single: acks.to_vec(),
        };
    }
    AckPlan {
        multiple: Some(acks[below - 1]),
        single: acks[below..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(tags: impl IntoIterator<Item = u64>) -> Held<u64> {
        let mut held = Held::new();
        for tag in tags {
            held.receive(tag, tag);
        }
        held
    }

    fn acks(tags: &[u64]) -> Vec<(u64, Settlement)> {
        tags.iter().map(|&tag| (tag, Settlement::Ack)).collect()
    }

    #[test]
    fn acks_below_every_delivery_still_held_go_as_one_multiple_ack() {
        // Held 1..=6; 1, 2, 3 and 5 are acked: 4 is still running.
        assert_eq!(
            held(1..=6).settle(acks(&[5, 2, 1, 3])),
            [Action::AckMultiple(3), Action::Ack(5)]
        );
        // Everything held is acked.
        assert_eq!(
            held(1..=3).settle(acks(&[1, 2, 3])),
            [Action::AckMultiple(3)]
        );
    }

    #[test]
    fn an_ack_above_a_delivery_still_held_goes_alone() {
        assert_eq!(
            held(1..=4).settle(acks(&[2, 4])),
            [Action::Ack(2), Action::Ack(4)]
        );
        // A single ack needs no `multiple`.
        assert_eq!(held(1..=3).settle(acks(&[1])), [Action::Ack(1)]);
    }

    #[test]
    fn a_multiple_ack_stops_below_a_tag_still_waiting_in_another_receiver() {
        // Tag 3 of another queue is not received yet; 1, 2, 4, 5 are, and all are acked.
        let mut held = held([1, 2, 4, 5]);
        assert_eq!(
            held.settle(acks(&[1, 2, 4, 5])),
            [Action::AckMultiple(2), Action::Ack(4), Action::Ack(5)]
        );
        // Once 3 arrives, everything received is contiguous again (4 and 5 are settled).
        held.receive(3, 3);
        held.receive(6, 6);
        assert_eq!(held.settle(acks(&[3, 6])), [Action::AckMultiple(6)]);
        held.receive(7, 7);
        held.receive(8, 8);
        assert_eq!(held.settle(acks(&[7, 8])), [Action::AckMultiple(8)]);
    }

    #[test]
    fn a_tag_settled_twice_or_acked_and_nacked_in_one_batch_sends_one_settlement() {
        let mut held = held(1..=3);
        let actions = held.settle(vec![
            (1, Settlement::Ack),
            (1, Settlement::Requeue),
            (2, Settlement::Ack),
            (2, Settlement::Ack),
            (9, Settlement::Ack),
        ]);
        assert_eq!(
            actions,
            [
                Action::Nack {
                    delivery: 1,
                    requeue: true
                },
                Action::Ack(2)
            ]
        );
        assert!(held.settle(acks(&[1, 2])).is_empty());
    }

    /// A channel as the broker keeps it: the tags it delivered, in two queues' receivers, and
    /// which are settled. Random interleavings of receiving (from either receiver), running and
    /// settling in batches: no `multiple` ack ever covers a delivery that was not received, or
    /// that is still running, and every delivery is settled exactly once.
    #[test]
    fn no_interleaving_of_two_receivers_acks_a_delivery_before_it_ran() {
        for seed in 0..500 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let total = rng.u64(20..200);
            // The broker hands tags out in order, each to one queue's receiver.
            let mut receivers: [std::collections::VecDeque<u64>; 2] = Default::default();
            for tag in 1..=total {
                receivers[rng.usize(0..2)].push_back(tag);
            }
            let mut held: Held<u64> = Held::new();
            let mut received = BTreeSet::new();
            let mut running: Vec<u64> = Vec::new();
            let mut settled: BTreeSet<u64> = BTreeSet::new();
            let mut pending: Vec<(u64, Settlement)> = Vec::new();
            while settled.len() < total as usize {
                match rng.u8(0..3) {
                    // Receive from one receiver.
                    0 => {
                        let queue = rng.usize(0..2);
                        if let Some(tag) = receivers[queue].pop_front() {
                            held.receive(tag, tag);
                            received.insert(tag);
                            running.push(tag);
                        }
                    }
                    // A running delivery finishes.
                    1 if !running.is_empty() => {
                        let tag = running.swap_remove(rng.usize(0..running.len()));
                        let settlement = match rng.u8(0..10) {
                            0 => Settlement::Requeue,
                            1 => Settlement::DeadLetter,
                            _ => Settlement::Ack,
                        };
                        pending.push((tag, settlement));
                    }
                    // The consumer thread settles what has finished.
                    _ => {
                        for action in held.settle(std::mem::take(&mut pending)) {
                            let covered: Vec<u64> = match action {
                                Action::AckMultiple(upto) => {
                                    (1..=upto).filter(|tag| !settled.contains(tag)).collect()
                                }
                                Action::Ack(tag) | Action::Nack { delivery: tag, .. } => {
                                    vec![tag]
                                }
                            };
                            for tag in covered {
                                assert!(
                                    received.contains(&tag),
                                    "seed {seed}: {tag} acked before it was received"
                                );
                                assert!(
                                    !running.contains(&tag),
                                    "seed {seed}: {tag} acked while running"
                                );
                                assert!(settled.insert(tag), "seed {seed}: {tag} settled twice");
                            }
                        }
                    }
                }
            }
        }
    }
}
