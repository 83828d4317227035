//! An average of recent samples in integers, for measures the server
//! keeps of its clients, its storage and its own copies.

/// An average weighing each new sample an eighth (kept times eight, so
/// that integer division loses little).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EighthAverage {
    /// Eight times the average; `None` before the first sample.
    times_eight: Option<u64>,
}

impl EighthAverage {
    /// No sample yet: the first one noted becomes the average.
    pub(crate) const fn empty() -> Self {
        Self { times_eight: None }
    }

    /// Starting at `value`, as if every earlier sample had been it.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) const fn starting_at(value: u64) -> Self {
        Self {
            times_eight: Some(value.saturating_mul(8)),
        }
    }

    pub(crate) fn note(&mut self, sample: u64) {
        self.times_eight = Some(match self.times_eight {
            None => sample.saturating_mul(8),
            Some(x8) => (x8 - x8 / 8).saturating_add(sample),
        });
    }

    /// The average; 0 before the first sample.
    pub(crate) fn value(&self) -> u64 {
        self.times_eight.map_or(0, |x8| x8 / 8)
    }
}

/// `duration` in nanoseconds, as a sample (saturating: a sample past
/// 584 years is no use anyway).
pub(crate) fn nanos(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_is_the_average_and_each_next_weighs_an_eighth() {
        let mut average = EighthAverage::empty();
        assert_eq!(average.value(), 0);
        average.note(800);
        assert_eq!(average.value(), 800);
        average.note(0);
        assert_eq!(average.value(), 700);
        for _ in 0..100 {
            average.note(80);
        }
        assert_eq!(average.value(), 80);
    }

    #[test]
    fn a_started_average_moves_an_eighth_from_its_start() {
        let mut average = EighthAverage::starting_at(0);
        average.note(800);
        assert_eq!(average.value(), 100);
        average.note(u64::MAX);
        assert_eq!(average.value(), u64::MAX / 8);
    }
}
