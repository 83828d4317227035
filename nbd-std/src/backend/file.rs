//! A raw image file or a block device.
//!
//! Positioned I/O (`pread`/`pwrite`) on one shared descriptor, so requests
//! from any number of connections run in parallel and share the kernel's
//! page cache: a `flush` (`fdatasync`) from one connection covers the
//! writes of all, which makes multi-conn safe.
//!
//! On regular files:
//! - block status follows `SEEK_DATA`/`SEEK_HOLE` (holes are `HOLE | ZERO`,
//!   the rest data); filesystems without them report everything as data;
//! - `trim` punches a hole (`FALLOC_FL_PUNCH_HOLE`), so trimmed ranges
//!   read back as zeroes; where the filesystem cannot, `trim` does nothing
//!   (the protocol makes it advisory);
//! - `write_zeroes` punches a hole (unless `NO_HOLE`) or uses
//!   `FALLOC_FL_ZERO_RANGE`, and writes zero buffers where the filesystem
//!   supports neither, or fails with `Unsupported` when asked to be fast;
//! - `resize` changes the file's length.
//!
//! What may run on the connection's thread rather than the blocking pool
//! (`try_read_now` and friends): reads the page cache holds
//! (`preadv2(RWF_NOWAIT)`, which refuses instead of waiting for the disk;
//! on `tmpfs`/`ramfs` every read; the server asks for those over
//! [`INLINE_BYTES`](super::INLINE_BYTES) only when nothing else is in flight), writes of
//! any size, and on `tmpfs`/`ramfs` flushes (memory, nothing behind it).
//! A buffered write copies into the page cache; the server then stores a
//! write's payload straight from its input buffer, one copy in all,
//! where the pool needed a copy into a buffer of its own first (measured
//! in `docs/BENCHMARKS.md`). The kernel may still throttle a writer with
//! too many dirty pages, which then holds that thread: `RWF_NOWAIT`
//! cannot tell beforehand, ext4 refuses it on buffered writes.
//!
//! On block devices the size is the device's; zeroing uses the kernel's
//! `fallocate` on the device (write-zeroes or discard commands) on the
//! sector-aligned part of a range, `trim` discards, and neither block
//! status nor resize is offered.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use nbd_core::export::Capabilities;
use nbd_core::wire::{AllocationFlags, ExtDescriptor};
use rustix::fs::{Advice, FallocateFlags, SeekFrom};
use rustix::io::Errno;

use super::mapping::LazyMap;
use super::{Backend, FileMap, ZeroFlags, push_extent};

const HOLE_ZERO: u64 = (AllocationFlags::HOLE.bits() | AllocationFlags::ZERO.bits()) as u64;

/// `statfs` magic numbers of filesystems that live in memory.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Largest zero buffer written at once when zeroing by hand.
const ZERO_CHUNK: u64 = 1 << 20;

/// Writes from memory of this size or more into a regular file take
/// turns (`FileBackend::large_write_turn`); smaller ones hold the
/// inode's lock too briefly for spinning on it to cost more than
/// sleeping.
const LARGE_WRITE_BYTES: usize = 64 << 10;

/// Storage in a regular file (raw image) or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: AtomicU64,
    read_only: bool,
    block_device: bool,
    /// `fallocate` alignment: the logical sector size on block devices,
    /// 1 on files.
    sector: u64,
    rotational: bool,
    /// The device executes write-zeroes itself (so `ZERO_RANGE` on it is
    /// fast); always true for files, where `ZERO_RANGE` is an extent
    /// operation.
    native_zeroes: bool,
    /// Whether each `fallocate` mode is still believed to work; cleared
    /// on the first `EOPNOTSUPP`.
    discard: AtomicBool,
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    seek_data: AtomicBool,
    /// `preadv2(RWF_NOWAIT)` is still believed to work.
    nowait_reads: AtomicBool,
    /// `cachestat` (Linux 6.5) is still believed to work.
    cachestat: AtomicBool,
    /// The file lives in memory (`tmpfs`, `ramfs`): nothing blocks on a device.
    in_memory: bool,
    /// Writes hold it shared, `resize` exclusively: no write validated
    /// against the old size lands past a new, smaller end.
    resizing: RwLock<()>,
    /// The mapping reads are sent from (`file_map`).
    map: LazyMap,
    /// The writable mapping large write payloads are received into
    /// (files in memory, `receive_at`).
    write_map: LazyMap,
    /// Held by a large write to a regular file (of [`LARGE_WRITE_BYTES`]
    /// or more) while it copies into the page cache. The kernel allows
    /// one buffered write to a file at a time (the inode's lock) and a
    /// second writer spins while the first copies: with `nbdcopy`'s four
    /// connections on two I/O threads that spinning was 14 % of the
    /// server's CPU. Waiting here sleeps instead, which leaves the CPU to
    /// the client. Block devices take no such lock, so their writes do not
    /// wait here.
    large_write_turn: Mutex<()>,
}

impl FileBackend {
    /// Opens a regular file or block device, read-write unless `read_only`
    /// (then `O_RDONLY`, and every write is refused with `EROFS`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let kind = meta.file_type();
        let (block_device, size, sector, device) = if kind.is_block_device() {
            let size = rustix::fs::seek(&file, SeekFrom::End(0))?;
            let sector = rustix::fs::ioctl_blksszget(&file).map_or(512, u64::from);
            (true, size, sector.max(1), meta.rdev())
        } else if kind.is_file() {
            (false, meta.len(), 1, meta.dev())
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or block device", path.display()),
            ));
        };
        let queue = |name: &str| sysfs_queue_value(device, name);
        let in_memory = !block_device
            && rustix::fs::fstatfs(&file).is_ok_and(|fs| {
                // The field's integer type differs between architectures.
                #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
                let magic = fs.f_type as u64;
                magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
            });
        Ok(Self {
            file,
            size: AtomicU64::new(size),
            read_only,
            block_device,
            sector,
            rotational: queue("rotational") == Some(1),
            native_zeroes: !block_device || queue("write_zeroes_max_bytes").is_some_and(|n| n > 0),
            discard: AtomicBool::new(block_device),
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            seek_data: AtomicBool::new(!block_device),
            nowait_reads: AtomicBool::new(true),
            cachestat: AtomicBool::new(true),
            in_memory,
            write_map: LazyMap::default(),
            resizing: RwLock::new(()),
            map: LazyMap::default(),
            large_write_turn: Mutex::new(()),
        })
    }

    /// Checks that `length` bytes at `offset` may be changed (`what`:
    /// "write", "zeroing", for the error), and holds the size stable
    /// (against `resize`) while the guard lives.
    fn writable_range(
        &self,
        offset: u64,
        length: u64,
        what: &str,
    ) -> io::Result<RwLockReadGuard<'_, ()>> {
        self.check_writable()?;
        let size_stable = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        if offset.saturating_add(length) > self.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} past the end of the export"),
            ));
        }
        Ok(size_stable)
    }

    /// Waits for this large write's turn (`large_write_turn`); `None` for
    /// block devices, which need none.
    fn wait_for_large_write_turn(&self) -> Option<MutexGuard<'_, ()>> {
        (!self.block_device).then(|| {
            self.large_write_turn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        })
    }

    /// Whether this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(Errno::ROFS.into())
        } else {
            Ok(())
        }
    }

    /// Runs `fallocate(mode)` unless the mode is known not to work.
    /// `Ok(false)`: not supported (now remembered).
    fn try_fallocate(
        &self,
        works: &AtomicBool,
        mode: FallocateFlags,
        offset: u64,
        length: u64,
    ) -> io::Result<bool> {
        if length == 0 {
            return Ok(true);
        }
        if !works.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match rustix::fs::fallocate(&self.file, mode, offset, length) {
            Ok(()) => Ok(true),
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::NOSYS => {
                works.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; length.min(ZERO_CHUNK) as usize];
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// The sector-aligned middle `[start, end)` of a range (empty when the
    /// range holds no whole sector).
    fn aligned(&self, offset: u64, length: u64) -> (u64, u64) {
        let end = offset + length;
        let start = offset.next_multiple_of(self.sector).min(end);
        let aligned_end = (end / self.sector * self.sector).max(start);
        (start, aligned_end)
    }

    fn zero_file(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        let keep = FallocateFlags::KEEP_SIZE;
        if !flags.no_hole
            && self.try_fallocate(
                &self.punch_hole,
                FallocateFlags::PUNCH_HOLE | keep,
                offset,
                length,
            )?
        {
            return Ok(());
        }
        if self.try_fallocate(
            &self.zero_range,
            FallocateFlags::ZERO_RANGE | keep,
            offset,
            length,
        )? {
            return Ok(());
        }
        if flags.fast {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.write_zero_buffers(offset, length)
    }

    /// On a block device `PUNCH_HOLE` is a write-zeroes that may unmap and
    /// never falls back to writing; `ZERO_RANGE` keeps the blocks mapped
    /// but lets the kernel write zeroes itself when the device cannot.
    fn zero_device(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        let keep = FallocateFlags::KEEP_SIZE;
        let (start, end) = self.aligned(offset, length);
        let mut done = start == end;
        if !done && !flags.no_hole {
            done = self.try_fallocate(
                &self.punch_hole,
                FallocateFlags::PUNCH_HOLE | keep,
                start,
                end - start,
            )?;
        }
        if !done && (self.native_zeroes || !flags.fast) {
            done = self.try_fallocate(
                &self.zero_range,
                FallocateFlags::ZERO_RANGE | keep,
                start,
                end - start,
            )?;
        }
        if !done {
            if flags.fast {
                return Err(io::ErrorKind::Unsupported.into());
            }
            return self.write_zero_buffers(offset, length);
        }
        // The partial sectors at either end.
        self.write_zero_buffers(offset, start - offset)?;
        self.write_zero_buffers(end, offset + length - end)
    }

    #[cfg(test)]
    fn forget_fallocate(&self) {
        self.discard.store(false, Ordering::Relaxed);
        self.punch_hole.store(false, Ordering::Relaxed);
        self.zero_range.store(false, Ordering::Relaxed);
    }

    /// Whether every page of `length` bytes from `offset` is in the page
    /// cache (`cachestat`); `false` where the kernel cannot tell.
    fn all_cached(&self, offset: u64, length: u64) -> bool {
        if length == 0 || !self.cachestat.load(Ordering::Relaxed) {
            return false;
        }
        // `struct cachestat_range` and `struct cachestat` of
        // <linux/mman.h>; the system call has number 451 on every
        // architecture (added after the tables were unified).
        #[repr(C)]
        struct Range {
            offset: u64,
            length: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cached: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = Range { offset, length };
        let mut stat = Stat::default();
        // SAFETY: both pointers are to live structs of the layout the
        // kernel expects, the descriptor is ours, and the flags are 0.
        #[allow(unsafe_code)]
        let status = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &raw const range,
                &raw mut stat,
                0u32,
            )
        };
        if status != 0 {
            let error = io::Error::last_os_error();
            if matches!(
                error.raw_os_error(),
                Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
            ) {
                self.cachestat.store(false, Ordering::Relaxed);
            }
            return false;
        }
        let page = rustix::param::page_size() as u64;
        let pages = (offset + length).div_ceil(page) - offset / page;
        stat.cached >= pages
    }

    /// Appends `length` bytes from `offset` to `buffer`, read straight
    /// into its spare capacity.
    fn pread_appended(&self, buffer: &mut Vec<u8>, offset: u64, length: usize) -> io::Result<()> {
        self.preadv2_appended(buffer, offset, length, 0)
    }

    /// Appends `length` bytes from `offset` to `buffer` with `preadv2` and
    /// `flags`, read straight into its spare capacity (no zero-filling);
    /// on an error `buffer` is left as it was.
    fn preadv2_appended(
        &self,
        buffer: &mut Vec<u8>,
        offset: u64,
        length: usize,
        flags: libc::c_int,
    ) -> io::Result<()> {
        let start = buffer.len();
        if start.checked_add(length).is_none() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        buffer.reserve_exact(length);
        let result = loop {
            let done = buffer.len() - start;
            if done == length {
                break Ok(());
            }
            let room = &mut buffer.spare_capacity_mut()[..length - done];
            let iov = libc::iovec {
                iov_base: room.as_mut_ptr().cast(),
                iov_len: room.len(),
            };
            let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
                break Err(io::ErrorKind::InvalidInput.into());
            };
            // SAFETY: `iov` is the buffer's spare capacity, which the
            // kernel only writes; `set_len` below covers only the bytes
            // it says it wrote.
            #[allow(unsafe_code)]
            let read = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, flags) };
            match usize::try_from(read) {
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                #[allow(unsafe_code)]
                // SAFETY: the kernel wrote `n` bytes of the spare capacity.
                Ok(n) => unsafe { buffer.set_len(buffer.len() + n) },
                Err(_) => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        break Err(error);
                    }
                }
            }
        };
        if result.is_err() {
            buffer.truncate(start);
        }
        result
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn capabilities(&self) -> Capabilities {
        let writable = !self.read_only;
        Capabilities {
            flush: writable,
            fua: writable,
            // Kept even where the filesystem refuses fallocate: trim is
            // advisory, and zeroing falls back to writing zeroes (or, when
            // asked to be fast, says it cannot).
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            cache: true,
            resize: writable && !self.block_device,
            multi_conn: true,
            block_status: !self.block_device,
            rotational: self.rotational,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _size_stable = self.writable_range(offset, data.len() as u64, "write")?;
        let _turn = if data.len() >= LARGE_WRITE_BYTES {
            self.wait_for_large_write_turn()
        } else {
            None
        };
        self.file.write_all_at(data, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_appended(&self, buffer: &mut Vec<u8>, offset: u64, length: usize) -> io::Result<()> {
        self.pread_appended(buffer, offset, length)
    }

    /// Done at once when the page cache holds every byte, ready
    /// (`preadv2(RWF_NOWAIT)`), read straight into the buffer's spare
    /// capacity, not zero-filled first (zeroing 1 MiB took 7 % of the
    /// server's CPU at QD8). Not `cachestat`: it counts pages whose read
    /// is still under way, and a read of those would wait for the disk on
    /// the connection's thread.
    fn try_read_now(
        &self,
        buffer: &mut Vec<u8>,
        offset: u64,
        length: usize,
    ) -> Option<io::Result<()>> {
        if self.in_memory {
            // Nothing to wait for.
            return Some(self.pread_appended(buffer, offset, length));
        }
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return None;
        }
        match self.preadv2_appended(buffer, offset, length, libc::RWF_NOWAIT) {
            // Not all in the page cache: read elsewhere (ring or pool).
            Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => None,
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                ) =>
            {
                self.nowait_reads.store(false, Ordering::Relaxed);
                None
            }
            result => Some(result),
        }
    }

    fn page_cache_file(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn in_page_cache(&self, offset: u64, length: u64) -> bool {
        // A file in memory has nothing behind it to wait for (a hole
        // reads as the zero page).
        self.in_memory || self.all_cached(offset, length)
    }

    fn file_map(&self, end: u64) -> Option<Arc<FileMap>> {
        let (file, size) = (self.file.as_fd(), self.size());
        self.map
            .reaching(file, end, size, FileMap::new, "reads copy its data")
    }

    fn receives_payloads(&self) -> bool {
        self.in_memory && !self.write_map.failed()
    }

    /// Files in memory (`tmpfs`) only: the payload is received straight
    /// into the file's pages through a writable mapping (one copy, and the
    /// socket drained as fast as the copy goes, where a pipe took the
    /// client's pages and copied them on later: 1 MiB writes at QD8 went
    /// from 1.4k-2.5k MiB/s to 3.9k-4.9k, see docs/BENCHMARKS.md). On
    /// disk a page not in the page cache would be read before being
    /// overwritten, and a page written back faults again; there the
    /// payload is read into the connection's input buffer and written
    /// from it. A page that cannot be backed (a full `tmpfs`, the file
    /// shrunk by another process) fails the receive with `EFAULT`, and
    /// the caller stores the payload another way, which reports the
    /// error.
    fn receive_at(
        &self,
        offset: u64,
        length: usize,
        receive: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<io::Result<usize>> {
        if !self.receives_payloads() {
            return None;
        }
        let _size_stable = match self.writable_range(offset, length as u64, "write") {
            Ok(guard) => guard,
            Err(error) => return Some(Err(error)),
        };
        let end = offset + length as u64;
        let (file, size) = (self.file.as_fd(), self.size());
        let map = self.write_map.reaching(
            file,
            end,
            size,
            FileMap::new_writable,
            "payloads are read into memory first",
        )?;
        let place = map.place(offset, length)?;
        Some(Ok(receive(place)))
    }

    fn try_write_now(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        // Any size: done here, the payload is copied once; on the pool it
        // is copied into a buffer of its own first, which costs more than
        // the overlap with the socket gains.
        Some(self.write_at(data, offset))
    }

    fn try_flush_now(&self, range: Option<(u64, u64)>) -> Option<io::Result<()>> {
        let _ = range;
        self.in_memory.then(|| self.flush())
    }

    /// Punches a hole in a file (reads then return zeroes); discards on a
    /// block device (reads then return whatever the device says). Does
    /// nothing where neither works.
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_writable()?;
        let _size_stable = self.resizing.read().unwrap_or_else(PoisonError::into_inner);
        let length = length.min(self.size().saturating_sub(offset));
        let keep = FallocateFlags::KEEP_SIZE;
        let (start, end) = self.aligned(offset, length);
        if self.block_device
            && self.try_fallocate(
                &self.discard,
                FallocateFlags::PUNCH_HOLE | keep | FallocateFlags::NO_HIDE_STALE,
                start,
                end - start,
            )?
        {
            return Ok(());
        }
        self.try_fallocate(
            &self.punch_hole,
            FallocateFlags::PUNCH_HOLE | keep,
            start,
            end - start,
        )?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        let _size_stable = self.writable_range(offset, length, "zeroing")?;
        if self.block_device {
            self.zero_device(offset, length, flags)
        } else {
            self.zero_file(offset, length, flags)
        }
    }

    /// `posix_fadvise(WILLNEED)`: starts reading the range into the page
    /// cache. A hint, so a refusal is not an error.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        if let Some(length) = NonZeroU64::new(length) {
            let _ = rustix::fs::fadvise(&self.file, offset, Some(length), Advice::WillNeed);
        }
        Ok(())
    }

    /// Holes by `SEEK_DATA`/`SEEK_HOLE` (`HOLE | ZERO`), the rest data;
    /// stops after 1024 extents.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(length).min(self.size());
        if offset >= end || !self.seek_data.load(Ordering::Relaxed) {
            extents.push(ExtDescriptor { length, status: 0 });
            return Ok(());
        }
        let first = extents.len();
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(data) => data.max(pos),
                // Nothing but hole from `pos` to the end of the file.
                Err(Errno::NXIO) => end,
                Err(e) if e == Errno::INVAL || e == Errno::OPNOTSUPP => {
                    // No SEEK_DATA here: everything is data.
                    self.seek_data.store(false, Ordering::Relaxed);
                    push_extent(extents, first, end - pos, 0);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let next = data.min(end);
                if !push_extent(extents, first, next - pos, HOLE_ZERO) {
                    break;
                }
                pos = next;
                continue;
            }
            let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                // A file changed under us may answer `pos` itself: call the
                // rest data, which claims nothing.
                Ok(hole) if hole > pos => hole.min(end),
                Ok(_) | Err(Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            if !push_extent(extents, first, hole - pos, 0) {
                break;
            }
            pos = hole;
        }
        Ok(())
    }

    /// Sets the file's length: growing adds a hole, shrinking drops data
    /// past the new end. Not for block devices.
    fn resize(&self, size: u64) -> io::Result<()> {
        self.check_writable()?;
        if self.block_device {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let _exclusive = self
            .resizing
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.file.set_len(size)?;
        self.size.store(size, Ordering::Release);
        // Reads and receives in flight keep the old mappings (a page past
        // a smaller end fails their send or receive, see `FileMap`); new
        // ones map the new length.
        self.map.forget();
        self.write_map.forget();
        Ok(())
    }
}

/// A number from the block device's queue settings in sysfs
/// (`/sys/dev/block/MAJ:MIN/queue/NAME`, or its parent's for a partition).
fn sysfs_queue_value(device: u64, name: &str) -> Option<u64> {
    let base = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(device),
        rustix::fs::minor(device)
    );
    [
        format!("{base}/queue/{name}"),
        format!("{base}/../queue/{name}"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .and_then(|text| text.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_support::{pattern, read, status};
    use crate::backend::{MAX_EXTENTS, error_code};
    use nbd_core::wire::ErrorCode;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    /// A fresh sparse file of `size` bytes in a temporary directory.
    fn image(dir: &tempfile::TempDir, size: u64) -> PathBuf {
        let path = dir.path().join("disk.img");
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        path
    }

    fn is_data(extents: &[(u64, u64)], at: u64) -> bool {
        let mut pos = 0;
        for &(length, status) in extents {
            if at < pos + length {
                return status == 0;
            }
            pos += length;
        }
        panic!("{at} not covered by {extents:?}");
    }

    /// Whether this filesystem reports holes at all (tmpfs and ext4 do).
    fn reports_holes(backend: &FileBackend) -> bool {
        status(backend, 0, backend.size())
            .iter()
            .any(|&(_, s)| s == HOLE_ZERO)
    }

    #[test]
    fn unaligned_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 4 * MIB), false).expect("open");
        assert_eq!(backend.size(), 4 * MIB);
        assert!(!backend.is_block_device());
        let data = pattern(70_001, 5);
        backend.write_at(&data, 12_345).expect("write");
        assert_eq!(read(&backend, 12_345, data.len()), data);
        assert_eq!(read(&backend, 12_344, 1), vec![0]);
        backend.write_at(&[7], 4 * MIB - 1).expect("last byte");
        assert_eq!(read(&backend, 4 * MIB - 1, 1), vec![7]);
        assert!(backend.write_at(&[7], 4 * MIB).is_err());
        backend.flush().expect("flush");
        backend.flush_range(0, 4096).expect("fua");
        backend.cache(0, 4 * MIB).expect("cache");
        let caps = backend.capabilities();
        assert!(caps.flush && caps.fua && caps.trim && caps.write_zeroes && caps.fast_zero);
        assert!(caps.cache && caps.resize && caps.multi_conn && caps.block_status);
        assert!(backend.may_block());
    }

    #[test]
    fn inline_io_is_the_same_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 4 * MIB), false).expect("open");
        let data = pattern(8192, 3);
        backend
            .try_write_now(&data, 4096)
            .expect("a small write is done inline")
            .expect("write");
        assert_eq!(read(&backend, 4096, data.len()), data);
        // Just written, so in the page cache: read at once where the
        // kernel can say so (`RWF_NOWAIT`), else left to the pool.
        let mut buf = b"kept".to_vec();
        match backend.try_read_now(&mut buf, 4096, data.len()) {
            Some(result) => {
                result.expect("read");
                assert_eq!(&buf[..4], b"kept");
                assert_eq!(buf[4..], data);
            }
            None => assert_eq!(buf, b"kept", "left as it was when refused"),
        }
        let large = vec![1; 2 * MIB as usize];
        backend
            .try_write_now(&large, MIB)
            .expect("writes of any size are done inline")
            .expect("write");
        assert_eq!(read(&backend, MIB, large.len()), large);
        // Cached reads of any size too: the server decides which to do here.
        let mut cached = Vec::new();
        if let Some(result) = backend.try_read_now(&mut cached, MIB, large.len()) {
            result.expect("read");
            assert_eq!(cached, large);
        }
        assert!(
            backend
                .try_write_now(&[1], 4 * MIB)
                .is_some_and(|r| r.is_err())
        );
    }

    #[test]
    fn the_page_cache_is_known_to_hold_what_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 4 * MIB), false).expect("open");
        assert!(backend.page_cache_file().is_some());
        let data = pattern(3 * MIB as usize, 9);
        backend.write_at(&data, 0).expect("write");
        backend.flush().expect("flush");
        rustix::fs::fadvise(&backend.file, 0, None, Advice::DontNeed).expect("fadvise");
        if backend.in_memory {
            // Nothing behind a file in memory to wait for.
            assert!(backend.in_page_cache(0, MIB));
            return;
        }
        assert!(
            !backend.in_page_cache(0, 3 * MIB),
            "evicted pages taken for cached"
        );
        let mut kept = b"kept".to_vec();
        assert!(
            backend.try_read_now(&mut kept, 0, MIB as usize).is_none(),
            "a read that must wait for the disk done at once"
        );
        assert_eq!(kept, b"kept", "left as it was when refused");
        assert_eq!(
            read(&backend, 12_345, MIB as usize),
            data[12_345..][..MIB as usize]
        );
        if backend.nowait_reads.load(Ordering::Relaxed) {
            // Read, so ready: done at once, after what the buffer held.
            let mut got = b"kept".to_vec();
            backend
                .try_read_now(&mut got, 12_345, MIB as usize)
                .expect("cached pages read at once")
                .expect("read");
            assert_eq!(&got[..4], b"kept");
            assert!(got[4..] == data[12_345..][..MIB as usize]);
        }
        if !backend.cachestat.load(Ordering::Relaxed) {
            eprintln!("this kernel has no cachestat: no read is taken for cached");
            return;
        }
        // The pages the read touched, its unaligned ends included (what
        // else readahead brought in is the kernel's business).
        assert!(backend.in_page_cache(12_345, MIB));
        assert!(backend.in_page_cache(12_288, 4096));
        assert!(
            !backend.in_page_cache(0, 0),
            "an empty range is never sent so"
        );
    }

    #[test]
    fn in_memory_files_flush_inline() {
        // tmpfs, where it is mounted (it is on Debian and in CI).
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let backend = FileBackend::open(&image(&dir, MIB), false).expect("open");
        assert!(backend.in_memory);
        backend
            .try_flush_now(None)
            .expect("nothing to wait for")
            .expect("flush");
        let mut buf = Vec::new();
        backend
            .try_read_now(&mut buf, 0, 4096)
            .expect("memory reads inline")
            .expect("read");
        assert_eq!(buf, vec![0; 4096]);
    }

    #[test]
    fn reads_appended_into_spare_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 4 * MIB), false).expect("open");
        let data = pattern(3 * MIB as usize, 5);
        backend.write_at(&data, 4096).expect("write");
        // Empty with exactly the room (as the server allocates it), with
        // more room than the read, and after bytes already held.
        for mut buffer in [
            Vec::with_capacity(2 * MIB as usize),
            Vec::with_capacity(3 * MIB as usize),
            vec![1, 2, 3],
        ] {
            let held = buffer.len();
            backend
                .read_appended(&mut buffer, 4096 + 17, 2 * MIB as usize)
                .expect("read");
            assert_eq!(buffer.len(), held + 2 * MIB as usize);
            assert_eq!(buffer[held..], data[17..17 + 2 * MIB as usize]);
        }
        let mut past_end = Vec::with_capacity(8192);
        let error = backend
            .read_appended(&mut past_end, 4 * MIB - 4096, 8192)
            .expect_err("past the end of the file");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn block_status_of_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 8 * MIB), false).expect("open");
        // set_len made one hole over everything.
        assert_eq!(status(&backend, 0, 8 * MIB), vec![(8 * MIB, HOLE_ZERO)]);
        backend
            .write_at(&vec![1; MIB as usize], 2 * MIB)
            .expect("write");
        backend.write_at(&[1], 6 * MIB + 100).expect("write");
        let extents = status(&backend, 0, 8 * MIB);
        assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 8 * MIB);
        assert!(!is_data(&extents, 0));
        assert!(is_data(&extents, 2 * MIB));
        assert!(is_data(&extents, 3 * MIB - 1));
        assert!(!is_data(&extents, 4 * MIB + 1));
        assert!(is_data(&extents, 6 * MIB + 100));
        assert!(!is_data(&extents, 8 * MIB - 1));
        // Alternating statuses, each extent merged.
        assert!(extents.windows(2).all(|w| w[0].1 != w[1].1));
        // A range starting inside data and ending inside a hole is clipped.
        let inner = status(&backend, 2 * MIB + 10, MIB);
        assert_eq!(inner.iter().map(|e| e.0).sum::<u64>(), MIB);
        assert_eq!(inner[0], (MIB - 10, 0));
        assert_eq!(inner[1].1, HOLE_ZERO);

        // Punch a hole in the middle of the data (trim).
        backend.trim(2 * MIB, MIB / 2).expect("trim");
        let extents = status(&backend, 0, 8 * MIB);
        assert!(!is_data(&extents, 2 * MIB));
        assert!(is_data(&extents, 2 * MIB + MIB / 2));
        assert_eq!(read(&backend, 2 * MIB, 4096), vec![0; 4096]);
    }

    #[test]
    fn write_zeroes_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, 4 * MIB), false).expect("open");
        let holes = reports_holes(&backend);
        backend
            .write_at(&vec![1; 4 * MIB as usize], 0)
            .expect("write");
        backend.flush().expect("flush");

        // Without NO_HOLE: a punched hole.
        let fast = ZeroFlags {
            no_hole: false,
            fast: true,
        };
        backend.write_zeroes(MIB, MIB, fast).expect("punch");
        assert_eq!(read(&backend, MIB - 1, 2), vec![1, 0]);
        assert_eq!(read(&backend, 2 * MIB - 1, 2), vec![0, 1]);
        if holes {
            assert!(!is_data(&status(&backend, 0, 4 * MIB), MIB));
        }

        // With NO_HOLE: zeroed, still allocated.
        let no_hole = ZeroFlags {
            no_hole: true,
            fast: false,
        };
        backend
            .write_zeroes(3 * MIB + 7, 1000, no_hole)
            .expect("zero");
        assert_eq!(read(&backend, 3 * MIB + 6, 1002), {
            let mut v = vec![0; 1002];
            v[0] = 1;
            v[1001] = 1;
            v
        });
        assert!(is_data(&status(&backend, 0, 4 * MIB), 3 * MIB + 7));
    }

    #[test]
    fn zeroing_falls_back_without_fallocate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = FileBackend::open(&image(&dir, MIB), false).expect("open");
        backend.write_at(&vec![3; MIB as usize], 0).expect("write");
        backend.forget_fallocate();
        let fast = ZeroFlags {
            no_hole: false,
            fast: true,
        };
        let err = backend.write_zeroes(100, 5000, fast).expect_err("not fast");
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert_eq!(error_code(&err), ErrorCode::NotSupported);
        // Untouched by the refused fast zero.
        assert_eq!(read(&backend, 100, 5000), vec![3; 5000]);
        backend
            .write_zeroes(100, 3 * MIB / 4, ZeroFlags::default())
            .expect("slow zero");
        assert_eq!(
            read(&backend, 100, 3 * MIB as usize / 4),
            vec![0; 3 * MIB as usize / 4]
        );
        assert_eq!(read(&backend, 99, 1), vec![3]);
        // Trim without hole punching is a successful no-op.
        backend.trim(0, MIB).expect("trim");
        assert_eq!(read(&backend, 0, 1), vec![3]);
    }

    /// tmpfs punches holes but has no `ZERO_RANGE`: NO_HOLE zeroing must
    /// fall back for real.
    #[test]
    fn tmpfs_zero_range_fallback() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let backend = FileBackend::open(&image(&dir, MIB), false).expect("open");
        backend.write_at(&vec![5; MIB as usize], 0).expect("write");
        let fast_no_hole = ZeroFlags {
            no_hole: true,
            fast: true,
        };
        match backend.write_zeroes(4096, 8192, fast_no_hole) {
            Ok(()) => assert!(backend.zero_range.load(Ordering::Relaxed)),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::Unsupported);
                assert!(!backend.zero_range.load(Ordering::Relaxed));
                assert_eq!(read(&backend, 4096, 8192), vec![5; 8192]);
            }
        }
        let no_hole = ZeroFlags {
            no_hole: true,
            fast: false,
        };
        backend.write_zeroes(4096, 8192, no_hole).expect("zero");
        assert_eq!(read(&backend, 4096, 8192), vec![0; 8192]);
        assert_eq!(read(&backend, 4095, 1), vec![5]);
        assert!(is_data(&status(&backend, 0, MIB), 4096));
        // Punching works on tmpfs.
        backend.trim(65536, 65536).expect("trim");
        assert_eq!(read(&backend, 65536, 65536), vec![0; 65536]);
        assert!(!is_data(&status(&backend, 0, MIB), 65536));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image(&dir, MIB);
        FileBackend::open(&path, false)
            .and_then(|b| b.write_at(b"hello", 10))
            .expect("write");
        let backend = FileBackend::open(&path, true).expect("open read-only");
        assert_eq!(read(&backend, 10, 5), b"hello");
        let refused = [
            backend.write_at(b"x", 0).expect_err("write"),
            backend.trim(0, 4096).expect_err("trim"),
            backend
                .write_zeroes(0, 4096, ZeroFlags::default())
                .expect_err("zero"),
            backend.resize(2 * MIB).expect_err("resize"),
        ];
        for err in refused {
            assert_eq!(error_code(&err), ErrorCode::Perm, "{err}");
        }
        let caps = backend.capabilities();
        assert!(!caps.flush && !caps.fua && !caps.trim && !caps.write_zeroes);
        assert!(!caps.fast_zero && !caps.resize);
        assert!(caps.block_status && caps.cache && caps.multi_conn);
        assert_eq!(read(&backend, 10, 5), b"hello");
    }

    #[test]
    fn the_mapping_follows_the_files_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image(&dir, MIB);
        let backend = FileBackend::open(&path, false).expect("open");
        assert!(backend.file_map(MIB + 1).is_none(), "past the export");
        let first = backend.file_map(MIB).expect("mapped");
        assert_eq!(first.len(), MIB);
        let again = backend.file_map(4096).expect("mapped");
        assert!(Arc::ptr_eq(&first, &again), "one mapping for every read");
        backend.resize(3 * MIB).expect("grow");
        let grown = backend.file_map(3 * MIB).expect("mapped after growing");
        assert_eq!(grown.len(), 3 * MIB);
        backend.resize(MIB / 2).expect("shrink");
        assert!(backend.file_map(MIB).is_none(), "past the new end");
        assert_eq!(backend.file_map(MIB / 2).expect("mapped").len(), MIB / 2);
    }

    #[test]
    fn resize_grows_and_shrinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image(&dir, MIB);
        let backend = FileBackend::open(&path, false).expect("open");
        backend.write_at(&[9; 100], MIB - 100).expect("write");
        backend.resize(3 * MIB).expect("grow");
        assert_eq!(backend.size(), 3 * MIB);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 3 * MIB);
        assert_eq!(read(&backend, MIB - 1, 2), vec![9, 0]);
        backend
            .write_at(&[4], 3 * MIB - 1)
            .expect("write at the new end");
        backend.resize(MIB - 50).expect("shrink");
        assert_eq!(backend.size(), MIB - 50);
        assert!(backend.write_at(&[1], MIB - 50).is_err());
        backend.resize(MIB).expect("grow again");
        assert_eq!(read(&backend, MIB - 51, 51), {
            let mut v = vec![0; 51];
            v[0] = 9;
            v
        });
        assert_eq!(
            status(&backend, 0, MIB).iter().map(|e| e.0).sum::<u64>(),
            MIB
        );
    }

    #[test]
    fn refuses_other_file_types() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = FileBackend::open(dir.path(), true).expect_err("a directory");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn block_status_stops_after_max_extents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocks = 2 * MAX_EXTENTS as u64 + 4;
        let step = 64 * 1024;
        let backend = FileBackend::open(&image(&dir, blocks * step), false).expect("open");
        if !reports_holes(&backend) {
            return;
        }
        for block in (0..blocks).step_by(2) {
            backend.write_at(&[1; 4096], block * step).expect("write");
        }
        let extents = status(&backend, 0, blocks * step);
        assert_eq!(extents.len(), MAX_EXTENTS);
        assert_eq!(extents[0].1, 0);
    }
}
