//! Pauses before trying again: per delivery a growing sequence, and across deliveries a pause
//! that grows while MongoDB keeps failing, so an outage is not a redelivery storm.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The pause that grows across deliveries while MongoDB keeps failing.
#[derive(Default)]
pub(super) struct Pause {
    /// Consecutive outage pauses handed out; reset by [`Pause::recovered`].
    outages: AtomicU32,
}

impl Pause {
    pub(super) const FIRST: Duration = Duration::from_millis(250);
    pub(super) const MOST: Duration = Duration::from_secs(15);

    /// The pause before handing a message back during an outage: 1 s, doubling while the
    /// outage lasts, up to 15 s.
    pub(super) fn after_outage(&self) -> Duration {
        let n = self.outages.fetch_add(1, Ordering::Relaxed).min(4);
        (Duration::from_secs(1) * 2u32.pow(n)).min(Self::MOST)
    }

    /// MongoDB answered again: the next outage starts from the shortest pause.
    pub(super) fn recovered(&self) {
        if self.outages.load(Ordering::Relaxed) != 0 {
            self.outages.store(0, Ordering::Relaxed);
        }
    }
}

/// Growing pauses of one delivery: 250 ms, 500 ms, 1 s … up to 15 s.
pub(super) struct Pauses(Duration);

impl Default for Pauses {
    fn default() -> Self {
        Self(Pause::FIRST)
    }
}

impl Pauses {
    pub(super) fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Pause::MOST);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_are_capped() {
        let mut sequence = Pauses::default();
        let taken: Vec<Duration> = (0..8).map(|_| sequence.next()).collect();
        assert_eq!(taken[0], Duration::from_millis(250));
        assert!(taken.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*taken.last().unwrap(), Pause::MOST);
        let pause = Pause::default();
        let outages: Vec<Duration> = (0..8).map(|_| pause.after_outage()).collect();
        assert_eq!(outages[0], Duration::from_secs(1));
        assert_eq!(*outages.last().unwrap(), Pause::MOST);
        pause.recovered();
        assert_eq!(pause.after_outage(), Duration::from_secs(1));
    }
}
