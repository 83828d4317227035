//! Memory for the memory export's pages: blocks of 2 MiB taken from the
//! kernel, each cut into 32 pages.
//!
//! With huge pages (the export option `huge-pages`) the blocks are marked
//! for transparent huge pages. Random 4 KiB requests to a large memory
//! export touch a different page each; in 4 KiB mappings every one of
//! them missed the TLB, and in a virtual machine a miss walks two page
//! tables. One 2 MiB mapping covers 32 pages: at queue depth 32 on a
//! 1 GiB export, server CPU per 4 KiB read fell by about 0.45 µs, per
//! write by 0.15 (docs/BENCHMARKS.md). Not the default: on a virtual
//! machine whose host reclaims free guest memory, the first write to
//! each block faults in 2 MiB the host must back anew, and filling 1 GiB
//! took 2 to 5 times the CPU.
//!
//! A page's memory goes back to the kernel as soon as the page is freed
//! (`MADV_DONTNEED`: RSS follows what is stored, after a trim too) and its
//! place is kept for the next page. A free place therefore always reads
//! as zeroes, and a new page costs no memset. Blocks are unmapped when the
//! export's last page is gone.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::cell::Cell;
use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::mm::{self, Advice, MapFlags, ProtFlags};

#[cfg(target_arch = "x86_64")]
use crate::average::EighthAverage;
#[cfg(target_arch = "x86_64")]
use std::time::Instant;

/// The size of a transparent huge page on x86-64 and of the blocks.
const BLOCK_SIZE: usize = 2 << 20;

/// Blocks of memory shared by one export's pages.
pub(super) struct PageBlocks {
    page_size: usize,
    /// Blocks are mapped for transparent huge pages.
    huge_pages: bool,
    state: Mutex<Places>,
    /// The export is gone: no page will be taken again, and freed
    /// places need not be zeroed (the blocks are unmapped with the last).
    retired: AtomicBool,
}

struct Places {
    /// Block addresses, each `BLOCK_SIZE`-aligned and mapped for
    /// `BLOCK_SIZE` bytes.
    blocks: Vec<usize>,
    /// Places holding no page, all zeroes; the last one is taken first
    /// (recently freed places before fresh ones).
    free: Vec<usize>,
}

impl PageBlocks {
    /// Blocks for pages of `page_size` bytes, a power of two that
    /// divides [`BLOCK_SIZE`]; mapped for huge pages with `huge_pages`.
    pub(super) fn new(page_size: usize, huge_pages: bool) -> Arc<Self> {
        debug_assert!(page_size.is_power_of_two() && BLOCK_SIZE.is_multiple_of(page_size));
        Arc::new(Self {
            page_size,
            huge_pages,
            state: Mutex::new(Places {
                blocks: Vec::new(),
                free: Vec::new(),
            }),
            retired: AtomicBool::new(false),
        })
    }

    /// A page of zeroes; fails only when the kernel has no memory to map.
    pub(super) fn zeroed(self: &Arc<Self>) -> io::Result<PageBuf> {
        let mut places = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if places.free.is_empty() {
            let block = map_block(self.huge_pages)?;
            places.blocks.push(block);
            places.free.extend(
                (0..BLOCK_SIZE / self.page_size)
                    .rev()
                    .map(|i| block + i * self.page_size),
            );
        }
        let place = places.free.pop().and_then(|at| NonNull::new(at as *mut u8));
        drop(places);
        place
            .map(|start| PageBuf {
                start,
                blocks: Arc::clone(self),
            })
            .ok_or_else(|| io::Error::other("no place for a page after mapping a block"))
    }

    /// Says the export is gone: its pages are about to be freed, and
    /// their memory goes back with the unmapped blocks, without a system
    /// call per page (a 64 GiB export holds a million pages).
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Takes back the place of a page that is gone, returning its memory
    /// to the kernel.
    fn give_back(&self, start: NonNull<u8>) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the place is this pool's, `page_size` bytes inside a
        // mapped block, and no page refers to it any more.
        let advised =
            unsafe { mm::madvise(start.as_ptr().cast(), self.page_size, Advice::LinuxDontNeed) };
        if advised.is_err() {
            // SAFETY: as above; the place must read as zeroes when taken.
            unsafe { start.as_ptr().write_bytes(0, self.page_size) };
        }
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .free
            .push(start.as_ptr() as usize);
    }
}

impl std::fmt::Debug for PageBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let places = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("PageBlocks")
            .field("page_size", &self.page_size)
            .field("blocks", &places.blocks.len())
            .field("free", &places.free.len())
            .finish()
    }
}

impl Drop for PageBlocks {
    fn drop(&mut self) {
        // Every page holds the pool: none is left.
        let places = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        for &block in &places.blocks {
            // SAFETY: mapped by `map_block` for `BLOCK_SIZE` bytes, and no
            // page is left in it.
            let _ = unsafe { mm::munmap(block as *mut c_void, BLOCK_SIZE) };
        }
    }
}

/// Maps a block of zeroes at a `BLOCK_SIZE` boundary, so the kernel can
/// back it with one huge page (asked for with `huge_pages`).
fn map_block(huge_pages: bool) -> io::Result<usize> {
    let span = 2 * BLOCK_SIZE;
    // SAFETY: a fresh anonymous mapping, not aliasing any Rust object.
    let mapped = unsafe {
        mm::mmap_anonymous(
            std::ptr::null_mut(),
            span,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }? as usize;
    let block = mapped.next_multiple_of(BLOCK_SIZE);
    let before = block - mapped;
    let after = span - before - BLOCK_SIZE;
    // SAFETY: the parts of the fresh mapping outside the block; nothing
    // refers to them.
    unsafe {
        if before > 0 {
            let _ = mm::munmap(mapped as *mut c_void, before);
        }
        if after > 0 {
            let _ = mm::munmap((block + BLOCK_SIZE) as *mut c_void, after);
        }
        // Huge pages are a gain, not a need: a kernel without them
        // (or with them turned off) maps small pages.
        if huge_pages {
            let _ = mm::madvise(block as *mut c_void, BLOCK_SIZE, Advice::LinuxHugepage);
        }
    }
    Ok(block)
}

/// One page's bytes, owned like a `Box<[u8]>`.
pub(super) struct PageBuf {
    start: NonNull<u8>,
    blocks: Arc<PageBlocks>,
}

// SAFETY: a `PageBuf` owns its place alone, as a `Box<[u8]>` owns its
// bytes: shared references only read, writing takes `&mut`.
unsafe impl Send for PageBuf {}
// SAFETY: as above.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// A new page holding the same bytes.
    pub(super) fn try_clone(&self) -> io::Result<Self> {
        let mut copy = self.blocks.zeroed()?;
        copy.copy_from_slice(self);
        Ok(copy)
    }

    /// Copies `data` into the page at `at`. A write to a random page of
    /// a large export misses the cache, and the vector stores `memcpy`
    /// uses for copies of a few KiB first read each line they fill from
    /// memory; streaming stores write whole lines without reading them
    /// (4 KiB random writes at queue depth 32 on 1 GiB: 0.2 to 0.5 µs
    /// less server CPU each). But they also push the lines out of the
    /// cache: for bytes `likely_cached` (written lately) an ordinary copy
    /// is cheaper (over 256 KiB written again and again, 0.3 µs a write).
    /// Longer copies go the way this thread found cheaper lately (see
    /// [`LongCopies`]).
    pub(super) fn store(&mut self, at: usize, data: &[u8], likely_cached: bool) {
        let place = &mut self[at..at + data.len()];
        #[cfg(target_arch = "x86_64")]
        if !likely_cached && data.len() >= STREAMED_STORE_MIN {
            if data.len() <= STREAMED_STORE_MAX {
                stream_copy(place, data);
            } else {
                LONG_COPIES.with(|copies| copies.copy(place, data));
            }
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = likely_cached;
        place.copy_from_slice(data);
    }
}

/// Shorter copies stay in the cache: they likely share lines with what
/// is around them.
#[cfg(target_arch = "x86_64")]
const STREAMED_STORE_MIN: usize = 1024;
/// Longer copies go the way found cheaper (see [`LongCopies`]).
#[cfg(target_arch = "x86_64")]
const STREAMED_STORE_MAX: usize = 8192;

/// One long copy in this many goes the way that is not the cheaper one
/// lately, so a change (of the machine's load, of where the data lands)
/// is seen: at most 1.6 % of the copies the dearer way.
#[cfg(target_arch = "x86_64")]
const TRY_THE_OTHER_WAY_EVERY: u32 = 64;

#[cfg(target_arch = "x86_64")]
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
#[cfg(target_arch = "x86_64")]
struct LongCopies {
    /// Nanoseconds a KiB, `memcpy` then streamed.
    nanos_per_kib: [Cell<EighthAverage>; 2],
    copies: Cell<u32>,
}

#[cfg(target_arch = "x86_64")]
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
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let kib = (data.len() as u64 / 1024).max(1);
        let way = &self.nanos_per_kib[usize::from(streamed)];
        let mut average = way.get();
        average.note(nanos / kib);
        way.set(average);
    }
}

/// Whether the `copies`-th long copy is streamed, given what copies took
/// lately each way: the cheaper way, the other one every
/// [`TRY_THE_OTHER_WAY_EVERY`] copies; a way not timed yet is tried
/// first (its average reads 0).
#[cfg(target_arch = "x86_64")]
fn streams_next(copies: u32, plain: EighthAverage, streamed: EighthAverage) -> bool {
    let streaming_cheaper = streamed.value() < plain.value();
    streaming_cheaper != copies.is_multiple_of(TRY_THE_OTHER_WAY_EVERY)
}

/// `dst.copy_from_slice(src)` with non-temporal stores for the 16-byte
/// aligned middle of `dst`. Wider stores (32 and 64 bytes) were not
/// faster: the write-combining buffers fill whole lines either way.
#[cfg(target_arch = "x86_64")]
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

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the place is `page_size` bytes of a mapped block, owned
        // by this page alone, and stays mapped while the page holds the pool.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.blocks.page_size) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.blocks.page_size) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        self.blocks.give_back(self.start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 64 << 10;

    #[test]
    fn pages_are_zeroed_distinct_and_a_freed_place_is_zero_again() -> io::Result<()> {
        let blocks = PageBlocks::new(PAGE, true);
        let mut pages = (0..40)
            .map(|_| blocks.zeroed())
            .collect::<io::Result<Vec<PageBuf>>>()?;
        for (i, page) in pages.iter_mut().enumerate() {
            assert!(page.iter().all(|&b| b == 0));
            page.fill(i as u8 + 1);
        }
        for (i, page) in pages.iter().enumerate() {
            assert!(
                page.iter().all(|&b| b == i as u8 + 1),
                "page {i} was overwritten"
            );
        }
        // Two blocks for 40 pages of 64 KiB, each at a 2 MiB boundary.
        let state = blocks.state.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(state.blocks.len(), 2);
        assert!(state.blocks.iter().all(|b| b % BLOCK_SIZE == 0));
        drop(state);
        let freed_at = pages[3].start;
        drop(pages.remove(3));
        let reused = blocks.zeroed()?;
        assert_eq!(reused.start, freed_at, "the freed place is taken first");
        assert!(reused.iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn stores_land_exactly_where_asked_whatever_the_alignment() -> io::Result<()> {
        let blocks = PageBlocks::new(PAGE, false);
        let mut page = blocks.zeroed()?;
        let mut expected = vec![0u8; PAGE];
        let mut seed = 7u32;
        // Short and long, aligned and not, ending at the page's end too.
        for (at, len) in [
            (0, 4096),
            (3, 1500),
            (17, 1024),
            (4096, 1),
            (100, 8191),
            (8, 20000),
            (PAGE - 1037, 1037),
        ] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            page.store(at, &data, len % 2 == 0);
            expected[at..at + len].copy_from_slice(&data);
            assert!(page[..] == expected[..], "store of {len} bytes at {at}");
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
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

    #[cfg(target_arch = "x86_64")]
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

    #[cfg(target_arch = "x86_64")]
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

    #[test]
    fn a_clone_is_a_separate_copy() -> io::Result<()> {
        let blocks = PageBlocks::new(PAGE, false);
        let mut page = blocks.zeroed()?;
        page[..5].copy_from_slice(b"hello");
        let mut copy = page.try_clone()?;
        copy[0] = b'j';
        assert_eq!(&page[..5], b"hello");
        assert_eq!(&copy[..5], b"jello");
        Ok(())
    }
}
