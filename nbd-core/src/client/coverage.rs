//! Which bytes of a structured read its content chunks covered (spec:
//! "Structured reply types", `NBD_REPLY_TYPE_OFFSET_DATA` and
//! `NBD_REPLY_TYPE_OFFSET_HOLE`: chunks lie inside the request, never
//! overlap, and cover it whole before a successful end).
//!
//! Memory is fixed: up to [`MAX_READ_FRAGMENTS`] disjoint ranges, kept
//! sorted and merged whenever two touch, relative to the read's offset
//! (reads never exceed the maximum block size, a 32-bit value).

use super::{MAX_READ_FRAGMENTS, ProtocolError};

/// Covered ranges of one read, `[start, end)` relative to its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Coverage {
    ranges: [(u32, u32); MAX_READ_FRAGMENTS],
    count: u8,
    /// Content chunks seen (saturating), for `NBD_CMD_FLAG_DF`.
    chunks: u8,
}

impl Coverage {
    pub(super) const fn new() -> Self {
        Self {
            ranges: [(0, 0); MAX_READ_FRAGMENTS],
            count: 0,
            chunks: 0,
        }
    }

    /// Content chunks recorded so far.
    pub(super) fn chunks(&self) -> u8 {
        self.chunks
    }

    /// Records `[start, end)` (nonempty, `start < end`); fails if it
    /// overlaps a recorded range or would make too many disjoint ranges.
    pub(super) fn add(&mut self, start: u32, end: u32) -> Result<(), ProtocolError> {
        let count = usize::from(self.count);
        let ranges = &mut self.ranges[..count];
        if ranges.iter().any(|&(s, e)| s < end && start < e) {
            return Err(ProtocolError::OverlappingChunks);
        }
        // The first range after the new one (ranges are sorted).
        let at = ranges.iter().position(|&(s, _)| s >= end).unwrap_or(count);
        let joins_left = at > 0 && ranges[at - 1].1 == start;
        let joins_right = at < count && ranges[at].0 == end;
        match (joins_left, joins_right) {
            (true, true) => {
                ranges[at - 1].1 = ranges[at].1;
                self.ranges.copy_within(at + 1..count, at);
                self.count -= 1;
            }
            (true, false) => ranges[at - 1].1 = end,
            (false, true) => ranges[at].0 = start,
            (false, false) => {
                if count == MAX_READ_FRAGMENTS {
                    return Err(ProtocolError::TooFragmented);
                }
                self.ranges.copy_within(at..count, at + 1);
                self.ranges[at] = (start, end);
                self.count += 1;
            }
        }
        self.chunks = self.chunks.saturating_add(1);
        Ok(())
    }

    /// Whether `[0, length)` is covered exactly.
    pub(super) fn covers(&self, length: u32) -> bool {
        self.count == 1 && self.ranges[0] == (0, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_reverse_chunks_merge() {
        let mut c = Coverage::new();
        for i in 0..100 {
            c.add(i * 10, i * 10 + 10).expect("in order");
        }
        assert!(c.covers(1000));
        let mut c = Coverage::new();
        for i in (0..100).rev() {
            c.add(i * 10, i * 10 + 10).expect("reverse");
        }
        assert!(c.covers(1000));
        assert_eq!(c.chunks(), 100);
    }

    #[test]
    fn gaps_fill_and_overlaps_fail() {
        let mut c = Coverage::new();
        c.add(0, 10).expect("first");
        c.add(20, 30).expect("gap");
        c.add(40, 50).expect("gap");
        c.add(60, 70).expect("gap");
        assert_eq!(c.add(80, 90), Err(ProtocolError::TooFragmented));
        assert_eq!(c.add(5, 15), Err(ProtocolError::OverlappingChunks));
        assert_eq!(c.add(25, 26), Err(ProtocolError::OverlappingChunks));
        assert_eq!(c.add(0, 100), Err(ProtocolError::OverlappingChunks));
        c.add(10, 20).expect("joins two");
        c.add(50, 60).expect("joins two");
        assert!(!c.covers(70));
        c.add(30, 40).expect("joins two");
        assert!(c.covers(70));
        assert!(!c.covers(80));
    }

    #[test]
    fn full_u32_range() {
        let mut c = Coverage::new();
        c.add(u32::MAX - 1, u32::MAX).expect("tail");
        c.add(0, u32::MAX - 1).expect("head");
        assert!(c.covers(u32::MAX));
    }
}
