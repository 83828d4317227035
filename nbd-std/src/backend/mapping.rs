//! A read-only shared mapping of an export's file, lent to the socket so
//! read data in the page cache reaches the client with one copy (the
//! kernel's, into the socket) rather than two (into a buffer of ours,
//! then into the socket).
//!
//! Only the kernel reads through it: [`FileMap::io_slice`] gives a slice
//! for a vectored write to a plain socket, never bytes for the server to
//! look at. A page past the file's end (the file shrunk by another
//! process, or by a resize while the data waited) then fails that write
//! with `EFAULT`, where a read by the server itself would raise `SIGBUS`
//! and end the process.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// A read-only shared mapping of the first [`len`](FileMap::len) bytes
/// of a file.
pub struct FileMap {
    base: NonNull<core::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only and only handed to the kernel; it is
// unmapped once, when the last owner drops it.
#[allow(unsafe_code)]
unsafe impl Send for FileMap {}
// SAFETY: as above; nothing in it is mutated through `&self`.
#[allow(unsafe_code)]
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the first `len` bytes of `file` (not zero; pages past the
    /// file's end fault when written from, see the module notes).
    pub(crate) fn new(file: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
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
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )
        }?;
        let base = NonNull::new(base).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { base, len })
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
        let offset = usize::try_from(offset).ok()?;
        if offset.checked_add(length)? > self.len {
            return None;
        }
        // SAFETY: the range lies inside the mapping, which lives as long
        // as `self`. Its bytes may change (writes to the file) or stop
        // being backed (the file shrunk): the slice is only ever read by
        // the kernel's copy into a socket, which reports the latter as
        // `EFAULT` (see the module notes).
        #[allow(unsafe_code)]
        let bytes = unsafe {
            core::slice::from_raw_parts(self.base.as_ptr().cast::<u8>().add(offset), length)
        };
        Some(IoSlice::new(bytes))
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
