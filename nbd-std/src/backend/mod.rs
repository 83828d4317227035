//! Storage behind an export. A [`Backend`] is what a user implements to
//! serve their own storage; `memory`, `file` and `null` are the ones the CLI
//! offers.
//!
//! Methods take `&self` and may be called from several threads at once
//! (several connections, several requests in flight); a backend makes its
//! own interior state safe. Offsets and lengths are already validated by
//! the protocol core: in range, aligned to the export's block sizes.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::sync::Arc;

use nbd_core::export::{Capabilities, DEFAULT_BLOCK_SIZES};
use nbd_core::wire::{BlockSizeConstraints, ErrorCode, ExtDescriptor};

pub mod fault;
pub mod file;
pub mod mapping;
pub mod memory;
pub mod null;
#[cfg(feature = "s3")]
pub mod s3;

pub use fault::FaultBackend;
pub use file::FileBackend;
pub use mapping::FileMap;
pub use memory::MemoryBackend;
pub use null::NullBackend;
#[cfg(feature = "s3")]
pub use s3::S3Backend;

/// How `write_zeroes` must behave (`NBD_CMD_WRITE_ZEROES` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Fail with `io::ErrorKind::Unsupported` at once unless zeroing is
    /// faster than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
}

/// A piece of read data a backend lends instead of copying.
#[derive(Clone)]
pub enum ReadPiece {
    /// `range` of a reference-counted buffer the store keeps unchanged
    /// while it is shared (copy-on-write).
    Shared {
        /// The buffer.
        bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
        /// The bytes of it to send.
        range: Range<usize>,
    },
    /// That many zero bytes.
    Zeroes(usize),
}

impl ReadPiece {
    /// The bytes, or `None` for zeroes.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Shared { bytes, range } => Some(&(**bytes).as_ref()[range.clone()]),
            Self::Zeroes(_) => None,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Shared { range, .. } => range.len(),
            Self::Zeroes(length) => *length,
        }
    }

    /// Whether the piece is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for ReadPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shared { range, .. } => write!(f, "Shared({range:?})"),
            Self::Zeroes(length) => write!(f, "Zeroes({length})"),
        }
    }
}

/// Largest read the server does on the connection's thread while the
/// client has other requests in flight (see the module notes): copying
/// this much costs less than handing it to the pool and back; larger
/// copies overlap with the other requests' on the pool.
pub const INLINE_BYTES: usize = 256 << 10;

/// What a `try_read_now` that fills a zeroed slice does with its buffer:
/// appends `length` zero bytes, lets `fill` fill them, and takes them off
/// again when `fill` answers `None` (the caller then reads another way,
/// from the buffer as it was).
#[cfg(feature = "s3")]
pub(crate) fn try_fill_appended(
    buffer: &mut Vec<u8>,
    length: usize,
    fill: impl FnOnce(&mut [u8]) -> Option<io::Result<()>>,
) -> Option<io::Result<()>> {
    let start = buffer.len();
    buffer.resize(start + length, 0);
    let result = fill(&mut buffer[start..]);
    if result.is_none() {
        buffer.truncate(start);
    }
    result
}

/// Storage for one export.
pub trait Backend: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Optional commands this storage supports; the export's transmission
    /// flags follow from them. `flush` and `fua` must only be claimed when
    /// [`flush`](Self::flush) really makes data durable.
    fn capabilities(&self) -> Capabilities;

    /// Block size constraints clients must respect.
    fn block_sizes(&self) -> BlockSizeConstraints {
        DEFAULT_BLOCK_SIZES
    }

    /// Whether calls may block for long (disk I/O): the server then runs
    /// them on a thread pool. Fast in-memory backends return `false` and
    /// run inline on the connection's task.
    fn may_block(&self) -> bool {
        true
    }

    /// The asynchronous form of this storage, for network storage whose
    /// calls wait on round trips rather than on a CPU or a disk: the server
    /// then runs each request as a task instead of a blocking call on the
    /// thread pool. `None` (the default) means "use the blocking calls".
    fn async_form(&self) -> Option<Arc<dyn AsyncBackend>> {
        None
    }

    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads `length` bytes from `offset` onto the end of `buffer`, as
    /// `read_at` into zero-filled room would. The default zero-fills and
    /// calls `read_at`; a backend that can read into uninitialized memory
    /// (a file, `pread`) skips that pass over the buffer, which costs as
    /// much as a tenth of a 1 MiB read. After an error the buffer's
    /// length is unspecified.
    fn read_appended(&self, buffer: &mut Vec<u8>, offset: u64, length: usize) -> io::Result<()> {
        let start = buffer.len();
        buffer.resize(start + length, 0);
        self.read_at(&mut buffer[start..], offset)
    }

    /// Appends pieces covering `length` bytes from `offset` without
    /// copying them, for backends whose data already sits in shareable
    /// buffers; the server then sends them as they are. `None` (the
    /// default) means "not supported: use `read_at`". Only called on
    /// backends that do not block.
    fn read_shared(
        &self,
        offset: u64,
        length: u64,
        pieces: &mut Vec<ReadPiece>,
    ) -> Option<io::Result<()>> {
        let _ = (offset, length, pieces);
        None
    }

    /// Stores `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;

    /// For a backend that may block: does what
    /// [`read_appended`](Self::read_appended) does only if that cannot
    /// wait for a device (data in the page cache), so the server may do
    /// it on the connection's thread instead of handing it off.
    /// `None` (the default): it might block, and the server reads it
    /// elsewhere (through its `io_uring` from
    /// [`page_cache_file`](Self::page_cache_file), else `read_appended` on
    /// the pool). `buffer` is left as it was then.
    fn try_read_now(
        &self,
        buffer: &mut Vec<u8>,
        offset: u64,
        length: usize,
    ) -> Option<io::Result<()>> {
        let _ = (buffer, offset, length);
        None
    }

    /// For a backend whose bytes are a file's (or a block device's) at
    /// the same offsets: that file. The server sends read data from its
    /// page cache (`sendfile`) without copying it into a buffer of its
    /// own, only for ranges [`in_page_cache`](Self::in_page_cache) says
    /// are there and only on plain sockets; and it reads through its
    /// `io_uring` what [`try_read_now`](Self::try_read_now) could not.
    /// `None` (the default): reads copy, and those that may block go to
    /// the pool.
    fn page_cache_file(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Whether all `length` bytes from `offset` are in the page cache of
    /// [`page_cache_file`](Self::page_cache_file) now, so sending them
    /// from there waits for a device at most for pages whose read is
    /// already under way (`cachestat` cannot tell those apart). `false`
    /// (the default) when unknown.
    fn in_page_cache(&self, offset: u64, length: u64) -> bool {
        let _ = (offset, length);
        false
    }

    /// For a backend with a [`page_cache_file`](Self::page_cache_file): a
    /// read-only mapping of that file covering its first `end` bytes, for
    /// the server to send read data the page cache holds with one copy
    /// (the kernel's into the socket). `None` (the default) when there is
    /// none, or `end` is past the export.
    fn file_map(&self, end: u64) -> Option<Arc<FileMap>> {
        let _ = end;
        None
    }

    /// Whether [`receive_at`](Self::receive_at) takes write payloads
    /// straight from the socket into storage now. The server then reads
    /// the rest of a 4 KiB unit left incomplete in its input buffer on
    /// its own, so that the payload after it can come that way too.
    fn receives_payloads(&self) -> bool {
        false
    }

    /// Stores up to `length` bytes of a write at `offset` that `receive`
    /// puts straight into the backend's own memory, without a buffer
    /// between: `receive` fills the slice it is given as far as it can
    /// and says how many bytes it put there (fewer than asked: it has no
    /// more for now). Returns the bytes stored, up to the first short
    /// fill; an error only when nothing was stored (a later call then
    /// starts where the failure is). `None` when the backend has no
    /// memory of its own to lend (the caller stores another way, and
    /// `receive` was never called).
    fn receive_at(
        &self,
        offset: u64,
        length: usize,
        receive: &mut dyn FnMut(&mut [u8]) -> usize,
    ) -> Option<io::Result<usize>> {
        let _ = (offset, length, receive);
        None
    }

    /// As [`try_read_now`](Self::try_read_now) for `write_at`: `Some` when
    /// the write was done without waiting for a device.
    fn try_write_now(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        let _ = (data, offset);
        None
    }

    /// As [`try_read_now`](Self::try_read_now) for making a range durable
    /// (`flush_range`; the whole export when `range` is `None`): `Some` when
    /// done without waiting for a device (storage with nothing behind it).
    fn try_flush_now(&self, range: Option<(u64, u64)>) -> Option<io::Result<()>> {
        let _ = range;
        None
    }

    /// Makes every completed write durable (`NBD_CMD_FLUSH`).
    fn flush(&self) -> io::Result<()>;

    /// Makes the range durable (`NBD_CMD_FLAG_FUA`); by default a flush.
    fn flush_range(&self, offset: u64, length: u64) -> io::Result<()> {
        let _ = (offset, length);
        self.flush()
    }

    /// Discards the range (`NBD_CMD_TRIM`); its content is unspecified after.
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// Zeroes the range (`NBD_CMD_WRITE_ZEROES`). The default writes zero
    /// buffers, which is never fast.
    fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> io::Result<()> {
        if flags.fast {
            return Err(io::ErrorKind::Unsupported.into());
        }
        const CHUNK: usize = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(usize::try_from(length).unwrap_or(CHUNK))];
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Hints that the range will be read soon (`NBD_CMD_CACHE`).
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// Appends the `base:allocation` extents covering at least the first
    /// byte of the range, in order, to `extents` (`NBD_CMD_BLOCK_STATUS`).
    /// Status bits are `AllocationFlags` (`HOLE` = 1, `ZERO` = 2). The
    /// default reports the whole range as allocated data.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        let _ = offset;
        extents.push(ExtDescriptor { length, status: 0 });
        Ok(())
    }

    /// Changes the size (`NBD_CMD_RESIZE`).
    fn resize(&self, size: u64) -> io::Result<()> {
        let _ = size;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// A storage operation in flight: owns what it needs, so it can run as a
/// task of its own.
pub type StorageFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The asynchronous calls of a [`Backend`] whose storage is a network
/// service (see [`Backend::async_form`]). Same contract as the blocking
/// calls of the same name; buffers travel in and back out.
pub trait AsyncBackend: Send + Sync + 'static {
    /// Fills `buffer` from `offset`.
    fn read(&self, buffer: Vec<u8>, offset: u64) -> StorageFuture<(Vec<u8>, io::Result<()>)>;

    /// Stores `data` at `offset`.
    fn write(&self, data: Vec<u8>, offset: u64) -> StorageFuture<(Vec<u8>, io::Result<()>)>;

    /// Makes every completed write durable.
    fn flush(&self) -> StorageFuture<io::Result<()>>;

    /// Makes the range durable.
    fn flush_range(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>>;

    /// Discards the range.
    fn trim(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>>;

    /// Zeroes the range.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> StorageFuture<io::Result<()>>;

    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, length: u64) -> StorageFuture<io::Result<()>>;

    /// Appends the `base:allocation` extents of the range to `extents`.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: Vec<ExtDescriptor>,
    ) -> StorageFuture<(Vec<ExtDescriptor>, io::Result<()>)>;
}

/// At most this many extents per `block_status` call (the protocol lets a
/// reply cover less than the range asked for).
pub(crate) const MAX_EXTENTS: usize = 1024;

/// Appends `length` bytes of `status` to the extents pushed since `first`,
/// merging with the last one when equal. False once `MAX_EXTENTS` are
/// there and a new one would be needed.
pub(crate) fn push_extent(
    extents: &mut Vec<ExtDescriptor>,
    first: usize,
    length: u64,
    status: u64,
) -> bool {
    if extents.len() > first
        && let Some(last) = extents.last_mut().filter(|last| last.status == status)
    {
        last.length += length;
        return true;
    }
    if extents.len() - first == MAX_EXTENTS {
        return false;
    }
    extents.push(ExtDescriptor { length, status });
    true
}

/// The NBD error a storage failure is reported as (spec: "Error values":
/// `EDQUOT` and `EFBIG` map to `ENOSPC`; unknown failures are `EIO`).
pub fn error_code(error: &io::Error) -> ErrorCode {
    const EPERM: i32 = 1;
    const EACCES: i32 = 13;
    const EROFS: i32 = 30;
    const ENOMEM: i32 = 12;
    const EINVAL: i32 = 22;
    const ENOSPC: i32 = 28;
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    const EOVERFLOW: i32 = 75;
    const EOPNOTSUPP: i32 = 95;
    match error.raw_os_error() {
        Some(EPERM | EACCES | EROFS) => ErrorCode::Perm,
        Some(ENOMEM) => ErrorCode::NoMemory,
        Some(EINVAL) => ErrorCode::Invalid,
        Some(ENOSPC | EFBIG | EDQUOT) => ErrorCode::NoSpace,
        Some(EOVERFLOW) => ErrorCode::Overflow,
        Some(EOPNOTSUPP) => ErrorCode::NotSupported,
        Some(_) => ErrorCode::Io,
        None => match error.kind() {
            io::ErrorKind::Unsupported => ErrorCode::NotSupported,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => ErrorCode::Perm,
            io::ErrorKind::OutOfMemory => ErrorCode::NoMemory,
            io::ErrorKind::InvalidInput => ErrorCode::Invalid,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => ErrorCode::NoSpace,
            _ => ErrorCode::Io,
        },
    }
}

/// Helpers for the backends' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::Backend;

    /// `block_status` of the range as `(length, status)` pairs.
    pub(crate) fn status(backend: &dyn Backend, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let mut extents = Vec::new();
        backend
            .block_status(offset, length, &mut extents)
            .expect("block status");
        extents.iter().map(|e| (e.length, e.status)).collect()
    }

    /// `length` bytes read at `offset` (into a buffer that is not zeroes).
    pub(crate) fn read(backend: &dyn Backend, offset: u64, length: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; length];
        backend.read_at(&mut buf, offset).expect("read");
        buf
    }

    /// `length` bytes of data with no zero byte, different for each `seed`.
    pub(crate) fn pattern(length: usize, seed: u8) -> Vec<u8> {
        (0..length)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }
}
