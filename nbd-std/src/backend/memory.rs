//! Sparse in-memory storage.
//!
//! The export is cut into 64 KiB pages. A page is allocated on its first
//! write and freed again by `trim` and by `write_zeroes` without
//! `NO_HOLE`, so an export costs memory only for what was written: a 1 TiB
//! export holds no page at all until written. Pages live in 64 shards
//! (by page index), each a hash map behind its own `RwLock`: readers never
//! block one another, and a 4 KiB read is one shard lock, one hash lookup
//! and a copy. A page absent from its shard reads as zeroes.
//!
//! Pages live in 2 MiB blocks of their own (`blocks`): a trim gives their
//! memory back to the kernel. With `huge-pages` the blocks are mapped for
//! transparent huge pages, and random requests over a large export miss
//! the TLB far less often.
//!
//! A second, coarse map counts the allocated pages of each 1 GiB chunk;
//! `block_status` uses it to skip empty (or full) chunks in one step, so a
//! query over a mostly empty terabyte costs a thousand lookups, not
//! sixteen million.
//!
//! Memory has nothing to persist: `flush` and `FUA` succeed at once, which
//! is truthful for storage that lives exactly as long as the process.

use std::cell::Cell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nbd_core::export::Capabilities;
use nbd_core::wire::{AllocationFlags, ExtDescriptor};

use super::{Backend, ReadPiece, ZeroFlags, push_extent};

mod blocks;
use blocks::{PageBlocks, PageBuf};

const PAGE_SHIFT: u32 = 16;
/// Allocation granularity in bytes (64 KiB).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
const PAGE_MASK: u64 = PAGE_SIZE as u64 - 1;

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// Pages per accounting chunk (2^14 pages of 64 KiB = 1 GiB).
const CHUNK_SHIFT: u32 = 14;
const CHUNK_PAGES: u32 = 1 << CHUNK_SHIFT;

/// At most this many single-page lookups per `block_status` call, bounding
/// its cost when chunks are partly allocated.
const MAX_PAGE_LOOKUPS: usize = 1 << 18;

const HOLE_ZERO: u64 = (AllocationFlags::HOLE.bits() | AllocationFlags::ZERO.bits()) as u64;

/// Granules of 4 KiB, the last 1,024 of them written on each thread
/// remembered (direct-mapped, 4 MiB in all: about what a core's cache
/// holds), tell a write likely to find its lines in the cache from one
/// that is not (see `PageBuf::store`).
const RECENT_GRANULE_SHIFT: u32 = 12;
const RECENT_GRANULES: usize = 1024;

thread_local! {
    /// Granule number + 1 (0: none) per slot. Per thread, so writers on
    /// different CPUs do not pass its lines back and forth; shared by
    /// the thread's exports, whose granules may collide: a wrong guess
    /// costs time, never data.
    static GRANULES_WRITTEN: [Cell<u64>; RECENT_GRANULES] =
        const { [const { Cell::new(0) }; RECENT_GRANULES] };
}

/// Whether the 4 KiB granule at `offset` is among the last written on
/// this thread; it is remembered as written either way.
fn written_lately(offset: u64) -> bool {
    let tag = (offset >> RECENT_GRANULE_SHIFT) + 1;
    GRANULES_WRITTEN.with(|written| written[tag as usize % RECENT_GRANULES].replace(tag) == tag)
}

/// A page, shared copy-on-write with replies still being sent
/// (`read_shared`): writers go through [`unshared`].
type Page = Arc<PageData>;

struct PageData(PageBuf);

impl std::fmt::Debug for PageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageData({} bytes)", self.0.len())
    }
}

impl AsRef<[u8]> for PageData {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for PageData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for PageData {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// The page's bytes to write: a copy of its own first if a reply still
/// holds it.
fn unshared(page: &mut Page) -> io::Result<&mut PageData> {
    if Arc::get_mut(page).is_none() {
        *page = Arc::new(PageData(page.0.try_clone()?));
    }
    // Only a shard's write lock hands out `&mut Page`, and replies take
    // their references under its read lock: the fresh copy is not shared.
    Arc::get_mut(page).ok_or_else(|| io::Error::other("page shared while write-locked"))
}

type PageMap = HashMap<u64, Page, PageHash>;

/// One shard, aligned to keep neighbouring locks off one cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(RwLock<PageMap>);

/// A sparse in-memory export: pages allocated on first write, freed by
/// trim and zeroing; reads of unwritten areas return zeroes.
#[derive(Debug)]
pub struct MemoryBackend {
    size: AtomicU64,
    shards: Box<[Shard]>,
    /// Allocated pages per 1 GiB chunk; absent means none. Taken only when
    /// a page is allocated or freed (always inside a shard's write lock) and
    /// by `block_status`.
    chunks: Mutex<HashMap<u64, u32, PageHash>>,
    /// Allocated pages in total.
    pages: AtomicU64,
    /// Serialises `resize` calls.
    resizing: Mutex<()>,
    /// Where pages live.
    blocks: Arc<PageBlocks>,
}

impl MemoryBackend {
    /// An export of `size` bytes, all zeroes, holding no memory yet.
    pub fn new(size: u64) -> Self {
        Self {
            size: AtomicU64::new(size),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            chunks: Mutex::new(HashMap::default()),
            pages: AtomicU64::new(0),
            resizing: Mutex::new(()),
            blocks: PageBlocks::new(PAGE_SIZE, false),
        }
    }

    /// With `huge_pages`, pages live in memory mapped for transparent
    /// huge pages (see `blocks`). To be set before the first write.
    pub fn with_huge_pages(mut self, huge_pages: bool) -> Self {
        self.blocks = PageBlocks::new(PAGE_SIZE, huge_pages);
        self
    }

    /// Bytes of page storage currently allocated (a multiple of
    /// [`PAGE_SIZE`]).
    pub fn allocated_bytes(&self) -> u64 {
        self.pages.load(Ordering::Relaxed) << PAGE_SHIFT
    }

    fn shard(&self, page: u64) -> &RwLock<PageMap> {
        &self.shards[(page as usize) & (SHARDS - 1)].0
    }

    fn read_shard(&self, page: u64) -> RwLockReadGuard<'_, PageMap> {
        self.shard(page)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_shard(&self, page: u64) -> RwLockWriteGuard<'_, PageMap> {
        self.shard(page)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_chunks(&self) -> MutexGuard<'_, HashMap<u64, u32, PageHash>> {
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `page` was allocated. Called with its shard write-locked.
    fn count_allocated(&self, page: u64) {
        *self.lock_chunks().entry(page >> CHUNK_SHIFT).or_insert(0) += 1;
        self.pages.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that `page` was freed. Called with its shard write-locked.
    fn count_freed(&self, page: u64) {
        let mut chunks = self.lock_chunks();
        if let Entry::Occupied(mut entry) = chunks.entry(page >> CHUNK_SHIFT) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
        self.pages.fetch_sub(1, Ordering::Relaxed);
    }

    fn chunk_count(&self, chunk: u64) -> u32 {
        self.lock_chunks().get(&chunk).copied().unwrap_or(0)
    }

    fn is_allocated(&self, page: u64) -> bool {
        self.read_shard(page).contains_key(&page)
    }

    /// Zeroes `[offset, offset + length)`. With `keep_allocated` every page
    /// of the range ends up allocated (`NO_HOLE`); without it, whole pages
    /// are freed and partly covered pages that become all zeroes too.
    fn zero_range(&self, offset: u64, length: u64, keep_allocated: bool) -> io::Result<()> {
        for (page, within, n) in spans(offset, length) {
            let whole = within == 0 && n == PAGE_SIZE;
            let mut shard = self.write_shard(page);
            match shard.entry(page) {
                Entry::Occupied(entry) if whole && !keep_allocated => {
                    entry.remove();
                    self.count_freed(page);
                }
                Entry::Occupied(mut entry) => {
                    let data = unshared(entry.get_mut())?;
                    data[within..within + n].fill(0);
                    if !keep_allocated && is_zero(data) {
                        entry.remove();
                        self.count_freed(page);
                    }
                }
                Entry::Vacant(entry) => {
                    // A page past the end (the export shrank meanwhile)
                    // must not come back.
                    if keep_allocated && page << PAGE_SHIFT < self.size.load(Ordering::Acquire) {
                        entry.insert(Arc::new(self.new_page()?));
                        self.count_allocated(page);
                    }
                }
            }
        }
        Ok(())
    }

    /// Lets `fill` write into page `page` under its shard's write lock,
    /// once the export is known to still reach `until` bytes into the
    /// page: the page as stored (a copy of its own if a reply holds it),
    /// or a fresh one, kept only if `fill` says it put bytes there.
    /// Returns what `fill` returned.
    fn fill_page(
        &self,
        page: u64,
        until: usize,
        mut fill: impl FnMut(&mut PageData) -> usize,
    ) -> io::Result<usize> {
        let end = (page << PAGE_SHIFT) + until as u64;
        // Allocation happens outside the lock, so a first write does not
        // hold the shard while the page is zeroed.
        let mut fresh: Option<PageData> = None;
        loop {
            let mut shard = self.write_shard(page);
            // Checked under the lock: a concurrent shrink stores the new
            // size before sweeping each shard, so a write either lands
            // before the sweep (and is swept) or sees the new size.
            if end > self.size.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "write past the end of the export",
                ));
            }
            if let Some(existing) = shard.get_mut(&page) {
                return Ok(fill(unshared(existing)?));
            }
            if let Some(mut new) = fresh.take() {
                let filled = fill(&mut new);
                if filled > 0 {
                    shard.insert(page, Arc::new(new));
                    self.count_allocated(page);
                }
                return Ok(filled);
            }
            drop(shard);
            fresh = Some(self.new_page()?);
        }
    }

    /// A zeroed page.
    fn new_page(&self) -> io::Result<PageData> {
        self.blocks.zeroed().map(PageData)
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        self.blocks.retire();
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn capabilities(&self) -> Capabilities {
        // Everything: flush and FUA have nothing to persist, zeroing is a
        // memset or a free (fast), one shared store makes multi-conn safe.
        Capabilities::ALL
    }

    fn may_block(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        for (page, within, n) in spans(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n];
            done += n;
            let copied = match self.read_shard(page).get(&page) {
                Some(data) => {
                    out.copy_from_slice(&data[within..within + n]);
                    true
                }
                None => false,
            };
            if !copied {
                out.fill(0);
            }
        }
        Ok(())
    }

    /// Lends the pages themselves: a read costs a lock and a reference
    /// count per page instead of a copy.
    fn read_shared(
        &self,
        offset: u64,
        length: u64,
        pieces: &mut Vec<ReadPiece>,
    ) -> Option<io::Result<()>> {
        for (page, within, n) in spans(offset, length) {
            let piece = match self.read_shard(page).get(&page) {
                Some(data) => ReadPiece::Shared {
                    bytes: Arc::clone(data) as _,
                    range: within..within + n,
                },
                None => ReadPiece::Zeroes(n),
            };
            match (pieces.last_mut(), piece) {
                (Some(ReadPiece::Zeroes(run)), ReadPiece::Zeroes(more)) => *run += more,
                (_, piece) => pieces.push(piece),
            }
        }
        Some(Ok(()))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        for (page, within, n) in spans(offset, data.len() as u64) {
            let src = &data[done..done + n];
            done += n;
            // Asked once, so a fresh page counts as written too.
            let cached = written_lately((page << PAGE_SHIFT) + within as u64);
            self.fill_page(page, within + n, |data| {
                data.0.store(within, src, cached);
                n
            })?;
        }
        Ok(())
    }

    /// Lends the pages themselves, one at a time under its shard's write
    /// lock: a payload taken from the socket this way is copied once (by
    /// the kernel), not into a buffer first and then into the pages.
    fn receive_at(
        &self,
        offset: u64,
        length: usize,
        receive: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<io::Result<usize>> {
        let mut done = 0;
        for (page, within, n) in spans(offset, length as u64) {
            let got = match self.fill_page(page, within + n, |data| {
                receive(&mut data[within..within + n]).min(n)
            }) {
                Ok(got) => got,
                Err(error) if done == 0 => return Some(Err(error)),
                // Said by the next call, which starts at this page.
                Err(_) => break,
            };
            done += got;
            if got < n {
                break;
            }
        }
        Some(Ok(done))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Frees the pages the range covers whole and zeroes the parts of
    /// pages it covers partly (freeing them if they become all zeroes):
    /// trimmed areas read back as zeroes.
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_range(offset, length, false)
    }

    /// Always fast: freeing or clearing memory. With `NO_HOLE` the range's
    /// pages are kept (or made) allocated, so block status reports data.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        self.zero_range(offset, length, flags.no_hole)
    }

    /// Absent pages are `HOLE | ZERO`, allocated pages data (0), merged
    /// into runs; stops after 1024 extents or a bounded amount of work.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(length).min(self.size());
        if length == 0 {
            return Ok(());
        }
        if offset >= end {
            // The export shrank under the request: nothing is stored there.
            extents.push(ExtDescriptor {
                length,
                status: HOLE_ZERO,
            });
            return Ok(());
        }
        let first = extents.len();
        let mut pos = offset;
        let mut lookups = 0;
        while pos < end {
            let page = pos >> PAGE_SHIFT;
            let chunk = page >> CHUNK_SHIFT;
            let (status, next) = match self.chunk_count(chunk) {
                0 => (HOLE_ZERO, boundary(chunk, CHUNK_SHIFT + PAGE_SHIFT)),
                CHUNK_PAGES => (0, boundary(chunk, CHUNK_SHIFT + PAGE_SHIFT)),
                _ => {
                    lookups += 1;
                    let status = if self.is_allocated(page) {
                        0
                    } else {
                        HOLE_ZERO
                    };
                    (status, boundary(page, PAGE_SHIFT))
                }
            };
            let next = next.min(end);
            if !push_extent(extents, first, next - pos, status) {
                break;
            }
            pos = next;
            if lookups >= MAX_PAGE_LOOKUPS {
                break;
            }
        }
        Ok(())
    }

    /// Grows or shrinks the export. Shrinking frees the pages past the new
    /// end and clears the tail of the last page, so growing again reads
    /// zeroes there.
    fn resize(&self, size: u64) -> io::Result<()> {
        let _serial = self.resizing.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.size.swap(size, Ordering::AcqRel);
        if size >= old {
            return Ok(());
        }
        // First page that lies wholly past the end.
        let keep_below = size.div_ceil(PAGE_SIZE as u64);
        for shard in self.shards.iter() {
            let mut map = shard.0.write().unwrap_or_else(PoisonError::into_inner);
            map.retain(|&page, _| {
                let keep = page < keep_below;
                if !keep {
                    self.count_freed(page);
                }
                keep
            });
        }
        let within = (size & PAGE_MASK) as usize;
        if within != 0 {
            let page = size >> PAGE_SHIFT;
            if let Some(data) = self.write_shard(page).get_mut(&page) {
                unshared(data)?[within..].fill(0);
            }
        }
        Ok(())
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Folding fixed-size blocks lets the compiler vectorise the scan.
    data.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Start of the unit after `index` (units of `1 << shift` bytes), or
/// `u64::MAX` past the top of the address space.
fn boundary(index: u64, shift: u32) -> u64 {
    index
        .checked_add(1)
        .and_then(|i| i.checked_mul(1 << shift))
        .unwrap_or(u64::MAX)
}

/// The pieces of `[offset, offset + length)` page by page: (page index,
/// offset within the page, length).
fn spans(offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset.saturating_add(length);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let within = pos & PAGE_MASK;
        let n = (PAGE_SIZE as u64 - within).min(end - pos);
        let item = (pos >> PAGE_SHIFT, within as usize, n as usize);
        pos += n;
        Some(item)
    })
}

/// Hashing for page and chunk indices: the splitmix64 finaliser over the
/// index xored with a random per-map seed. Far cheaper than SipHash, and a
/// client cannot pick offsets that collide without knowing the seed.
#[derive(Clone, Copy, Debug)]
struct PageHash(u64);

impl Default for PageHash {
    fn default() -> Self {
        Self(std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64))
    }
}

impl BuildHasher for PageHash {
    type Hasher = PageHasher;
    fn build_hasher(&self) -> PageHasher {
        PageHasher(self.0)
    }
}

#[derive(Debug)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_support::{pattern, read, status};
    use crate::backend::{MAX_EXTENTS, error_code};

    const TIB: u64 = 1 << 40;
    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn granules_written_lately_are_remembered_until_one_takes_their_place() {
        // A fresh thread: nothing written on it yet.
        std::thread::spawn(|| {
            let at = 7 << RECENT_GRANULE_SHIFT;
            assert!(!written_lately(at + 100));
            assert!(written_lately(at), "the same 4 KiB granule");
            assert!(!written_lately(at + 4096), "the next granule");
            let same_slot = at + ((RECENT_GRANULES as u64) << RECENT_GRANULE_SHIFT);
            assert!(!written_lately(same_slot));
            assert!(!written_lately(at), "its slot was taken");
        })
        .join()
        .expect("the test thread panicked");
    }

    #[test]
    fn terabyte_export_allocates_nothing() {
        let backend = MemoryBackend::new(TIB);
        assert_eq!(backend.size(), TIB);
        assert_eq!(backend.allocated_bytes(), 0);
        assert_eq!(read(&backend, TIB - 4096, 4096), vec![0; 4096]);
        assert_eq!(backend.allocated_bytes(), 0);
        // One extent for the whole terabyte, found without a page-by-page walk.
        assert_eq!(status(&backend, 0, TIB), vec![(TIB, HOLE_ZERO)]);
        assert!(!backend.may_block());
        assert_eq!(backend.capabilities(), Capabilities::ALL);
    }

    #[test]
    fn unaligned_round_trips() {
        let backend = MemoryBackend::new(4 * P);
        let data = pattern(P as usize + 1000, 7);
        backend.write_at(&data, P - 500).expect("write");
        assert_eq!(read(&backend, P - 500, data.len()), data);
        // Pages 0, 1 and 2 are touched.
        assert_eq!(backend.allocated_bytes(), 3 * P);
        assert_eq!(read(&backend, P - 501, 1), vec![0]);
        assert_eq!(read(&backend, P - 500 + data.len() as u64, 1), vec![0]);
        // Overwrite a few bytes across a page boundary.
        backend.write_at(&[1, 2, 3, 4], 2 * P - 2).expect("write");
        assert_eq!(read(&backend, 2 * P - 3, 6)[1..5], [1, 2, 3, 4]);
        assert_eq!(backend.allocated_bytes(), 3 * P);
        // Last byte of the export.
        backend.write_at(&[9], 4 * P - 1).expect("write");
        assert_eq!(read(&backend, 4 * P - 1, 1), vec![9]);
    }

    #[test]
    fn trim_frees_whole_pages_and_zeroes_partial_ones() {
        let backend = MemoryBackend::new(8 * P);
        backend
            .write_at(&pattern(4 * P as usize, 3), P)
            .expect("write");
        assert_eq!(backend.allocated_bytes(), 4 * P);
        // Covers the second half of page 1, pages 2 and 3 whole, the first
        // half of page 4.
        backend.trim(P + P / 2, 3 * P).expect("trim");
        assert_eq!(backend.allocated_bytes(), 2 * P);
        assert_eq!(
            read(&backend, P + P / 2, 3 * P as usize),
            vec![0; 3 * P as usize]
        );
        assert_eq!(
            read(&backend, P, (P / 2) as usize),
            pattern(4 * P as usize, 3)[..(P / 2) as usize]
        );
        // Trimming the rest of page 1 leaves it all zeroes: freed.
        backend.trim(P, P / 2).expect("trim");
        assert_eq!(backend.allocated_bytes(), P);
        // Trimming unallocated space allocates nothing.
        backend.trim(0, 8 * P).expect("trim");
        assert_eq!(backend.allocated_bytes(), 0);
    }

    #[test]
    fn write_zeroes_frees_unless_no_hole() {
        let backend = MemoryBackend::new(8 * P);
        backend
            .write_at(&pattern(2 * P as usize, 1), 0)
            .expect("write");
        let fast = ZeroFlags {
            no_hole: false,
            fast: true,
        };
        backend.write_zeroes(0, 2 * P, fast).expect("fast zero");
        assert_eq!(backend.allocated_bytes(), 0);

        backend.write_at(&pattern(100, 1), P + 10).expect("write");
        let no_hole = ZeroFlags {
            no_hole: true,
            fast: true,
        };
        // NO_HOLE keeps the written page and allocates the untouched ones.
        backend.write_zeroes(P, 3 * P + 7, no_hole).expect("zero");
        assert_eq!(backend.allocated_bytes(), 4 * P);
        assert_eq!(read(&backend, P, 3 * P as usize), vec![0; 3 * P as usize]);
        assert_eq!(
            status(&backend, 0, 8 * P),
            vec![(P, HOLE_ZERO), (4 * P, 0), (3 * P, HOLE_ZERO)]
        );
        // Without NO_HOLE the same range is freed again, the partial last
        // page too since it is all zeroes.
        backend
            .write_zeroes(P, 3 * P + 7, ZeroFlags::default())
            .expect("zero");
        assert_eq!(backend.allocated_bytes(), 0);
    }

    #[test]
    fn block_status_merges_and_clips() {
        let backend = MemoryBackend::new(10 * P + 100);
        backend.write_at(&[1], 2 * P).expect("write");
        backend.write_at(&[1], 3 * P + 5).expect("write");
        backend.write_at(&[1], 10 * P + 50).expect("write");
        assert_eq!(
            status(&backend, 0, 10 * P + 100),
            vec![(2 * P, HOLE_ZERO), (2 * P, 0), (6 * P, HOLE_ZERO), (100, 0)]
        );
        // Unaligned start and end inside extents.
        assert_eq!(
            status(&backend, P + 1, 2 * P),
            vec![(P - 1, HOLE_ZERO), (P + 1, 0)]
        );
        assert_eq!(status(&backend, 3 * P + 1, 10), vec![(10, 0)]);
    }

    #[test]
    fn block_status_stops_after_max_extents() {
        let pages = 2 * MAX_EXTENTS as u64 + 10;
        let backend = MemoryBackend::new(pages * P);
        for page in (0..pages).step_by(2) {
            backend.write_at(&[1], page * P).expect("write");
        }
        let extents = status(&backend, 0, pages * P);
        assert_eq!(extents.len(), MAX_EXTENTS);
        assert!(extents.iter().all(|&(length, _)| length == P));
        assert_eq!(extents[0].1, 0);
        assert_eq!(extents[1].1, HOLE_ZERO);
    }

    #[test]
    fn full_chunk_is_one_data_extent() {
        let backend = MemoryBackend::new(TIB);
        let chunk = u64::from(CHUNK_PAGES) * P;
        let block = vec![1u8; 1 << 20];
        let base = 5 * chunk;
        for at in (base..base + chunk).step_by(block.len()) {
            backend.write_at(&block, at).expect("write");
        }
        assert_eq!(backend.allocated_bytes(), chunk);
        assert_eq!(
            status(&backend, 0, TIB),
            vec![
                (base, HOLE_ZERO),
                (chunk, 0),
                (TIB - base - chunk, HOLE_ZERO)
            ]
        );
        backend.trim(base, chunk).expect("trim");
        assert_eq!(backend.allocated_bytes(), 0);
        assert_eq!(status(&backend, 0, TIB), vec![(TIB, HOLE_ZERO)]);
    }

    #[test]
    fn resize_frees_and_clears_past_the_end() {
        let backend = MemoryBackend::new(4 * P);
        backend
            .write_at(&pattern(4 * P as usize, 9), 0)
            .expect("write");
        backend.resize(P + 10).expect("shrink");
        assert_eq!(backend.size(), P + 10);
        assert_eq!(backend.allocated_bytes(), 2 * P);
        let err = backend.write_at(&[1], P + 10).expect_err("past the end");
        assert_eq!(error_code(&err), nbd_core::wire::ErrorCode::Invalid);
        backend.resize(4 * P).expect("grow");
        let after = read(&backend, 0, 4 * P as usize);
        assert_eq!(
            after[..(P + 10) as usize],
            pattern(4 * P as usize, 9)[..(P + 10) as usize]
        );
        assert!(after[(P + 10) as usize..].iter().all(|&b| b == 0));
        backend.resize(0).expect("shrink to nothing");
        assert_eq!(backend.allocated_bytes(), 0);
        backend.resize(TIB).expect("grow");
        assert_eq!(status(&backend, 0, TIB), vec![(TIB, HOLE_ZERO)]);
    }

    #[test]
    fn concurrent_writers_and_readers() {
        let backend = std::sync::Arc::new(MemoryBackend::new(64 * P));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let backend = backend.clone();
                std::thread::spawn(move || {
                    for i in 0..64u64 {
                        let offset = (i * 4 + u64::from(t)) * (P / 4) + 3;
                        let data = pattern(1000, t);
                        backend.write_at(&data, offset).expect("write");
                        assert_eq!(read(&*backend, offset, 1000), data);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        assert_eq!(backend.allocated_bytes(), 64 * P);
    }

    fn read_via_pieces(backend: &MemoryBackend, offset: u64, length: u64) -> Vec<u8> {
        let mut pieces = Vec::new();
        backend
            .read_shared(offset, length, &mut pieces)
            .expect("supported")
            .expect("read");
        let mut out = Vec::new();
        for piece in &pieces {
            match piece.bytes() {
                Some(bytes) => out.extend_from_slice(bytes),
                None => out.resize(out.len() + piece.len(), 0),
            }
        }
        out
    }

    #[test]
    fn shared_reads_equal_copied_reads() {
        let backend = MemoryBackend::new(1 << 24);
        backend
            .write_at(&pattern(100_000, 7), 70_000)
            .expect("write");
        backend
            .write_at(&pattern(10, 9), 3 * PAGE_SIZE as u64 - 5)
            .expect("write");
        for (offset, length) in [
            (0, 1 << 20),
            (69_999, 100_002),
            (3 * PAGE_SIZE as u64 - 6, 12),
            (1 << 23, 4096),
        ] {
            assert_eq!(
                read_via_pieces(&backend, offset, length),
                read(&backend, offset, length as usize),
                "range {offset}+{length}"
            );
        }
        let mut pieces = Vec::new();
        backend
            .read_shared(1 << 22, 4 * PAGE_SIZE as u64, &mut pieces)
            .expect("supported")
            .expect("read");
        assert!(
            matches!(pieces[..], [ReadPiece::Zeroes(n)] if n == 4 * PAGE_SIZE),
            "holes merge: {pieces:?}"
        );
    }

    #[test]
    fn shared_pages_are_copied_on_write() {
        let backend = MemoryBackend::new(1 << 20);
        backend.write_at(&[1; 4096], 0).expect("write");
        let mut pieces = Vec::new();
        backend
            .read_shared(0, 4096, &mut pieces)
            .expect("supported")
            .expect("read");
        // A write while the reply is still being sent must not change it.
        backend.write_at(&[2; 4096], 0).expect("write");
        backend
            .write_zeroes(
                0,
                4096,
                ZeroFlags {
                    no_hole: true,
                    fast: false,
                },
            )
            .expect("zero");
        assert_eq!(pieces[0].bytes(), Some(&[1u8; 4096][..]));
        assert_eq!(read(&backend, 0, 4096), vec![0; 4096]);
        drop(pieces);
        backend.write_at(&[3; 4096], 0).expect("write");
        assert_eq!(read(&backend, 0, 4096), vec![3; 4096]);
    }

    #[test]
    fn received_bytes_land_in_place_and_stop_at_the_first_short_fill() {
        let backend = MemoryBackend::new(4 * PAGE_SIZE as u64);
        let source = pattern(3 * PAGE_SIZE, 5);
        let mut taken = 0;
        // Gives 40,000 bytes at most, then nothing: a socket running dry.
        let mut socket = |place: &mut [u8]| {
            let n = place.len().min(40_000 - taken);
            place[..n].copy_from_slice(&source[taken..taken + n]);
            taken += n;
            n
        };
        let offset = PAGE_SIZE as u64 - 1000;
        let stored = backend.receive_at(offset, 3 * PAGE_SIZE, &mut socket);
        assert_eq!(stored.map(Result::ok), Some(Some(40_000)));
        // Nothing more to take: no page is made for it.
        let stored = backend.receive_at(offset + 40_000, 1 << 20, &mut socket);
        assert_eq!(stored.map(Result::ok), Some(Some(0)));
        assert_eq!(backend.allocated_bytes(), 2 * PAGE_SIZE as u64);
        assert_eq!(read(&backend, offset, 40_000), source[..40_000]);
        let past_end = backend.receive_at(4 * PAGE_SIZE as u64, 20, &mut socket);
        assert!(matches!(past_end, Some(Err(_))), "{past_end:?}");
    }

    #[test]
    fn flush_and_cache_succeed() {
        let backend = MemoryBackend::new(P);
        backend.flush().expect("flush");
        backend.flush_range(0, P).expect("fua");
        backend.cache(0, P).expect("cache");
    }
}
