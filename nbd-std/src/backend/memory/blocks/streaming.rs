//! Copies into pages not in the cache (x86-64): streaming stores for
//! copies of a few KiB, and for longer ones whichever way this thread
//! timed cheaper lately (see `PageBuf::store`).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::time::Instant;

use crate::average::{EighthAverage, nanos};

/// Copies `data` into `place` the way that suits bytes not in the cache,
/// if it is long enough for that to matter; `false`: not copied.
pub(super) fn stored(place: &mut [u8], data: &[u8]) -> bool {
    if data.len() < STREAMED_STORE_MIN {
        return false;
    }
    if data.len() <= STREAMED_STORE_MAX {
        stream_copy(place, data);
    } else {
        LONG_COPIES.with(|copies| copies.copy(place, data));
    }
    true
}

/// Shorter copies stay in the cache: they likely share lines with what
/// is around them.
const STREAMED_STORE_MIN: usize = 1024;
/// Longer copies go the way found cheaper (see [`LongCopies`]).
const STREAMED_STORE_MAX: usize = 8192;

/// One long copy in this many goes the way that is not the cheaper one
/// lately, so a change (of the machine's load, of where the data lands)
/// is seen: at most 1.6 % of the copies the dearer way.
const TRY_THE_OTHER_WAY_EVERY: u32 = 64;

thread_local! {
    static LONG_COPIES: LongCopies = const { LongCopies::new() };
}

/// How copies longer than [`STREAMED_STORE_MAX`] into pages not in the
/// cache go: with `memcpy` (`rep movsb`, which writes whole lines) or
/// with streaming stores. Which is cheaper depends on the machine: 1 MiB
/// writes at QD8 into a memory export ran 9 % slower streamed on one,
/// and on another streaming took 52 µs a MiB in 64 KiB copies against
/// 103 for `memcpy`: 1 MiB writes took 0.80 to 0.87× the server CPU
/// (2026-12-06, docs/BENCHMARKS.md). So each thread times the copies
/// both ways and takes the cheaper, the other way now and then.
struct LongCopies {
    /// Nanoseconds a KiB, `memcpy` then streamed.
    nanos_per_kib: [Cell<EighthAverage>; 2],
    copies: Cell<u32>,
}

impl LongCopies {
    const fn new() -> Self {
        Self {
            nanos_per_kib: [
                Cell::new(EighthAverage::empty()),
                Cell::new(EighthAverage::empty()),
            ],
            copies: Cell::new(0),
        }
    }

    fn copy(&self, place: &mut [u8], data: &[u8]) {
        let copies = self.copies.get().wrapping_add(1);
        self.copies.set(copies);
        let streamed = streams_next(
            copies,
            self.nanos_per_kib[0].get(),
            self.nanos_per_kib[1].get(),
        );
        let started = Instant::now();
        if streamed {
            stream_copy(place, data);
        } else {
            place.copy_from_slice(data);
        }
        let took = nanos(started.elapsed());
        let kib = (data.len() as u64 / 1024).max(1);
        let way = &self.nanos_per_kib[usize::from(streamed)];
        let mut average = way.get();
        average.note(took / kib);
        way.set(average);
    }
}

/// Whether the `copies`-th long copy is streamed, given what copies took
/// lately each way: the cheaper way, the other one every
/// [`TRY_THE_OTHER_WAY_EVERY`] copies; a way not timed yet is tried
/// first (its average reads 0).
fn streams_next(copies: u32, plain: EighthAverage, streamed: EighthAverage) -> bool {
    let streaming_cheaper = streamed.value() < plain.value();
    streaming_cheaper != copies.is_multiple_of(TRY_THE_OTHER_WAY_EVERY)
}

/// `dst.copy_from_slice(src)` with non-temporal stores for the 16-byte
/// aligned middle of `dst`. Wider stores (32 and 64 bytes) were not
/// faster: the write-combining buffers fill whole lines either way.
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    debug_assert_eq!(dst.len(), src.len());
    let head = dst.as_ptr().align_offset(16).min(dst.len());
    let middle = (dst.len() - head) & !15;
    dst[..head].copy_from_slice(&src[..head]);
    // SAFETY: for each `at`, `at + 16 <= head + middle <= len` for both
    // slices (of equal length), and `dst + at` is 16-byte aligned (`head`
    // aligns it, steps keep it), as `_mm_stream_si128` needs; SSE2 is part
    // of x86-64. The fence orders the streamed stores before later ones
    // (the lock release that publishes the page).
    unsafe {
        for at in (head..head + middle).step_by(16) {
            let chunk = _mm_loadu_si128(src.as_ptr().add(at).cast::<__m128i>());
            _mm_stream_si128(dst.as_mut_ptr().add(at).cast::<__m128i>(), chunk);
        }
        _mm_sfence();
    }
    dst[head + middle..].copy_from_slice(&src[head + middle..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::PAGE_SIZE as PAGE;
    use crate::backend::memory::blocks::PageBlocks;
    use std::io;

    #[test]
    fn the_streaming_copy_copies_exactly() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (at, len) in [
            (0, 4096),
            (1, 4095),
            (13, 1024),
            (63, 8192),
            (64, 8192),
            (5, 70),
        ] {
            let mut copy = vec![0xAAu8; 9000];
            stream_copy(&mut copy[at..at + len], &src[..len]);
            assert_eq!(&copy[at..at + len], &src[..len], "{len} bytes at {at}");
            assert!(
                copy[..at]
                    .iter()
                    .chain(&copy[at + len..])
                    .all(|&b| b == 0xAA)
            );
        }
    }

    #[test]
    fn long_copies_go_the_cheaper_way_and_now_and_then_the_other() {
        let (cheap, dear) = (
            EighthAverage::starting_at(50),
            EighthAverage::starting_at(100),
        );
        let untimed = EighthAverage::empty();
        // Nothing timed: memcpy first; then the way not timed yet.
        assert!(!streams_next(1, untimed, untimed));
        assert!(streams_next(2, cheap, untimed));
        assert!(!streams_next(3, untimed, cheap));
        for copies in 1..TRY_THE_OTHER_WAY_EVERY {
            assert!(streams_next(copies, dear, cheap));
            assert!(!streams_next(copies, cheap, dear));
        }
        assert!(!streams_next(TRY_THE_OTHER_WAY_EVERY, dear, cheap));
        assert!(streams_next(2 * TRY_THE_OTHER_WAY_EVERY, cheap, dear));
    }

    #[test]
    fn long_copies_land_exactly_whichever_way_they_go() -> io::Result<()> {
        let blocks = PageBlocks::new(PAGE, false);
        let mut page = blocks.zeroed()?;
        let copies = LongCopies::new();
        let mut expected = vec![0u8; PAGE];
        // Enough copies for both ways to be timed and tried again.
        for round in 0..3 * TRY_THE_OTHER_WAY_EVERY as usize {
            let (at, len) = (round % 61, PAGE / 2 + round % 4093);
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + round) as u8).collect();
            copies.copy(&mut page[at..at + len], &data);
            expected[at..at + len].copy_from_slice(&data);
            assert!(
                page[..] == expected[..],
                "copy {round}: {len} bytes at {at}"
            );
        }
        for way in &copies.nanos_per_kib {
            assert_ne!(way.get(), EighthAverage::empty(), "both ways timed");
        }
        Ok(())
    }
}
