//! An export that stores nothing: reads return zeroes, writes are dropped.
//!
//! It measures the server itself: with no storage work, what a request
//! costs is the protocol loop and the socket (the floor the other
//! backends are compared against, as `nbdkit null` is for nbdkit).
//! Nothing written can be read back, so flush and FUA succeed at once:
//! there is nothing to make durable.

use std::io;

use nbd_core::export::Capabilities;
use nbd_core::wire::{AllocationFlags, ExtDescriptor};

use super::{Backend, ReadPiece, ZeroFlags};

/// Storage of `size` bytes that are always zero.
#[derive(Debug)]
pub struct NullBackend {
    size: u64,
}

impl NullBackend {
    /// A null export of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size }
    }
}

impl Backend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            resize: false,
            rotational: false,
            ..Capabilities::ALL
        }
    }

    fn may_block(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn read_shared(
        &self,
        _offset: u64,
        length: u64,
        pieces: &mut Vec<ReadPiece>,
    ) -> Option<io::Result<()>> {
        // Lengths are capped by the core (at most 4 GiB).
        Some(
            usize::try_from(length)
                .map(|length| pieces.push(ReadPiece::Zeroes(length)))
                .map_err(|_| io::Error::other("read longer than the address space")),
        )
    }

    fn write_at(&self, _data: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _length: u64, _flags: ZeroFlags) -> io::Result<()> {
        Ok(())
    }

    fn block_status(
        &self,
        _offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        let status = AllocationFlags::HOLE.bits() | AllocationFlags::ZERO.bits();
        extents.push(ExtDescriptor {
            length,
            status: status.into(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zeroes_whatever_was_written() {
        let backend = NullBackend::new(1 << 20);
        backend.write_at(&[7; 4096], 0).expect("write");
        let mut buf = [1u8; 4096];
        backend.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        let mut pieces = Vec::new();
        backend
            .read_shared(0, 8192, &mut pieces)
            .expect("lends")
            .expect("read");
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].len(), 8192);
        assert_eq!(pieces[0].bytes(), None);
    }
}
