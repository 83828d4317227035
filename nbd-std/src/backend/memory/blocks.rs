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

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::mm::{self, Advice, MapFlags, ProtFlags};

#[cfg(target_arch = "x86_64")]
mod streaming;

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
    /// `streaming::LongCopies`).
    pub(super) fn store(&mut self, at: usize, data: &[u8], likely_cached: bool) {
        let place = &mut self[at..at + data.len()];
        #[cfg(target_arch = "x86_64")]
        if !likely_cached && streaming::stored(place, data) {
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = likely_cached;
        place.copy_from_slice(data);
    }
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
