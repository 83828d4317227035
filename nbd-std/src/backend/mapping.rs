//! A shared mapping of an export's file, lent to the socket so read data
//! in the page cache reaches the client with one copy (the kernel's,
//! into the socket) rather than two (into a buffer of ours, then into the
//! socket); and, writable, so a write's payload is received straight into
//! the file's pages (files in memory: see `FileBackend::receive_at`).
//!
//! Only the kernel reads or writes through it: [`FileMap::io_slice`]
//! gives a slice for a vectored write to a plain socket, and
//! [`FileMap::place`] one for a receive from it, never bytes for the
//! server to look at. A page past the file's end (the file shrunk by
//! another process, or by a resize while the data waited) then fails that
//! send or receive with `EFAULT`, where an access by the server itself
//! would raise `SIGBUS` and end the process.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustix::mm::ProtFlags;

/// A shared mapping of the first [`len`](FileMap::len) bytes of a file,
/// read-only unless made with `FileMap::new_writable`.
pub struct FileMap {
    base: NonNull<core::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is only handed to the kernel (the server never
// reads or writes through it); it is unmapped once, when the last owner
// drops it.
#[allow(unsafe_code)]
unsafe impl Send for FileMap {}
// SAFETY: as above; the server itself neither reads nor writes the
// mapped bytes through `&self`.
#[allow(unsafe_code)]
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the first `len` bytes of `file` (not zero; pages past the
    /// file's end fault when written from, see the module notes).
    pub(crate) fn new(file: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
        Self::map(file, len, ProtFlags::READ)
    }

    /// Maps the first `len` bytes of `file` to be written by the kernel
    /// (see [`place`](Self::place)).
    pub(crate) fn new_writable(file: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
        Self::map(file, len, ProtFlags::READ | ProtFlags::WRITE)
    }

    fn map(file: BorrowedFd<'_>, len: u64, protection: ProtFlags) -> io::Result<Self> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "cannot map that length"))?;
        // SAFETY: a fresh mapping at an address the kernel picks, of a
        // descriptor we borrow for the call; it aliases no Rust memory.
        #[allow(unsafe_code)]
        let base = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                protection,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )
        }?;
        let base = NonNull::new(base).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { base, len })
    }

    /// `length` bytes of a writable mapping from `offset`, for the
    /// kernel to receive into from a socket (`recv`): the file's pages
    /// themselves, so the payload is copied once. `None` past the
    /// mapping. Never read or written by the server: a page past the
    /// file's end, or one that cannot be allocated (a full `tmpfs`),
    /// fails that receive with `EFAULT` instead of raising `SIGBUS`.
    #[allow(clippy::mut_from_ref)]
    pub fn place(&self, offset: u64, length: usize) -> Option<&mut [u8]> {
        let start = self.start(offset, length)?;
        // SAFETY: `start` and `length` lie inside the mapping, which lives
        // as long as `self`. As with `io_slice`, other writers to the file
        // may change these bytes at any time; the slice is only handed to
        // the kernel's copy out of a socket, which reports an unbacked
        // page as `EFAULT`.
        #[allow(unsafe_code)]
        let bytes = unsafe { core::slice::from_raw_parts_mut(start, length) };
        Some(bytes)
    }

    /// Where `length` bytes from `offset` start; `None` unless they all
    /// lie inside the mapping.
    fn start(&self, offset: u64, length: usize) -> Option<*mut u8> {
        let offset = usize::try_from(offset).ok()?;
        if offset.checked_add(length)? > self.len {
            return None;
        }
        // SAFETY: `offset` is at most the mapping's length, so the result
        // stays inside it (or one past its end).
        #[allow(unsafe_code)]
        let start = unsafe { self.base.as_ptr().cast::<u8>().add(offset) };
        Some(start)
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether nothing is mapped (never: a mapping has a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `length` bytes from `offset`, for a vectored write to a socket;
    /// `None` past the mapping. The bytes are the file's as the kernel
    /// copies them, not as they were when this was called.
    pub fn io_slice(&self, offset: u64, length: usize) -> Option<IoSlice<'_>> {
        let start = self.start(offset, length)?;
        // SAFETY: `start` and `length` lie inside the mapping, which lives
        // as long as `self`. Its bytes may change (writes to the file) or
        // stop being backed (the file shrunk): the slice is only ever read
        // by the kernel's copy into a socket, which reports the latter as
        // `EFAULT` (see the module notes).
        #[allow(unsafe_code)]
        let bytes = unsafe { core::slice::from_raw_parts(start.cast_const(), length) };
        Some(IoSlice::new(bytes))
    }
}

/// A mapping of an export's file made when first wanted, again when the
/// file grew past it, after [`forget`](LazyMap::forget) (the file shrank),
/// and never once making one failed (said once: the caller goes another
/// way).
#[derive(Debug, Default)]
pub(crate) struct LazyMap {
    map: Mutex<Option<Arc<FileMap>>>,
    failed: AtomicBool,
}

impl LazyMap {
    /// The mapping of `file` (`size` bytes) reaching `end` (at most
    /// `size`), made by `make` if need be; `None` past `size` or when it
    /// cannot be made (`otherwise`: what happens instead, for the warning).
    pub(crate) fn reaching(
        &self,
        file: BorrowedFd<'_>,
        end: u64,
        size: u64,
        make: fn(BorrowedFd<'_>, u64) -> io::Result<FileMap>,
        otherwise: &str,
    ) -> Option<Arc<FileMap>> {
        if end > size || self.failed.load(Ordering::Relaxed) {
            return None;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = map.as_ref().filter(|map| map.len() >= end) {
            return Some(Arc::clone(map));
        }
        match make(file, size) {
            Ok(fresh) => Some(Arc::clone(map.insert(Arc::new(fresh)))),
            Err(error) => {
                tracing::warn!("cannot map the export's file ({error}): {otherwise}");
                self.failed.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Drops the mapping (the file shrank): users in flight keep theirs,
    /// the next is made at the new length.
    pub(crate) fn forget(&self) {
        *self.map.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Whether making a mapping failed.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMap").field("len", &self.len).finish()
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the borrows
        // `io_slice` lent ended with `self`'s.
        #[allow(unsafe_code)]
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(bytes).expect("write");
        file
    }

    #[test]
    fn sends_the_files_bytes_as_they_are_when_sent() {
        let file = file_of(&[7u8; 3 * 4096]);
        let map = FileMap::new(file.as_fd(), 3 * 4096).expect("map");
        assert_eq!(map.len(), 3 * 4096);
        let slice = map.io_slice(4096, 100).expect("in range");
        // Written through the file after the slice was taken: what is
        // sent is the page cache's when copied.
        file.write_all_at(&[9u8; 10], 4096).expect("write");
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(a.write_vectored(&[slice]).expect("send"), 100);
        let mut got = [0u8; 100];
        b.read_exact(&mut got).expect("receive");
        assert_eq!(&got[..10], &[9u8; 10]);
        assert_eq!(&got[10..], &[7u8; 90]);
    }

    #[test]
    fn a_receive_lands_in_the_file_and_past_its_end_fails_without_a_signal() {
        let file = file_of(&[0u8; 2 * 4096]);
        let map = FileMap::new_writable(file.as_fd(), 2 * 4096).expect("map");
        assert!(map.place(4096, 4097).is_none(), "past the mapping");
        let (mut client, server) = std::os::unix::net::UnixStream::pair().expect("pair");
        client.write_all(&[3u8; 100]).expect("send");
        let place = map.place(10, 100).expect("in range");
        let (received, _) =
            rustix::net::recv(server.as_fd(), place, rustix::net::RecvFlags::DONTWAIT)
                .expect("receive");
        assert_eq!(received, 100);
        let mut stored = [9u8; 120];
        file.read_exact_at(&mut stored, 0).expect("read");
        assert_eq!(&stored[..10], &[0u8; 10]);
        assert_eq!(&stored[10..110], &[3u8; 100]);
        assert_eq!(&stored[110..], &[0u8; 10]);
        file.set_len(4096).expect("shrink");
        client.write_all(&[4u8; 100]).expect("send");
        let place = map.place(4096 + 10, 100).expect("still mapped");
        let error = rustix::net::recv(server.as_fd(), place, rustix::net::RecvFlags::DONTWAIT)
            .expect_err("a page past the end");
        assert_eq!(error, rustix::io::Errno::FAULT);
    }

    #[test]
    fn refuses_ranges_past_the_mapping() {
        let file = file_of(&[1u8; 4096]);
        let map = FileMap::new(file.as_fd(), 4096).expect("map");
        assert!(map.io_slice(4000, 96).is_some());
        assert!(map.io_slice(4000, 97).is_none());
        assert!(map.io_slice(u64::MAX, 1).is_none());
        assert!(FileMap::new(file.as_fd(), 0).is_err());
    }

    #[test]
    fn a_file_shrunk_under_the_mapping_fails_the_write_without_a_signal() {
        let file = file_of(&[5u8; 4 * 4096]);
        let map = FileMap::new(file.as_fd(), 4 * 4096).expect("map");
        let slice = map.io_slice(2 * 4096, 2 * 4096).expect("in range");
        file.set_len(4096).expect("shrink");
        let (mut a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let error = a.write_vectored(&[slice]).expect_err("pages past the end");
        assert_eq!(error.raw_os_error(), Some(libc::EFAULT));
    }
}
