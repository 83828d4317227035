//! Structured reply chunk payloads (spec: "Structured reply types").

use super::{ChunkType, WireList};

/// A `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor: 32-bit length, 32-bit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Descriptor {
    /// Extent length (nonzero).
    pub length: u32,
    /// Status flags, defined by the metadata context.
    pub status: u32,
}

/// A `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` descriptor: 64-bit length, 64-bit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExtDescriptor {
    /// Extent length (nonzero).
    pub length: u64,
    /// Status flags, defined by the metadata context.
    pub status: u64,
}

/// The payload of one structured reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`: no payload; always the final chunk.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: 64-bit offset, then the data (at least one byte).
    OffsetData {
        /// Export offset of the data.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: 64-bit offset, 32-bit nonzero size of zeroes.
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Bytes that read as zero.
        size: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: 32-bit context id, then at least one descriptor.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Descriptors, in export order.
        descriptors: WireList<'a, Descriptor>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: 32-bit context id, 32-bit nonzero
    /// descriptor count, then that many 64-bit descriptors.
    BlockStatusExt {
        /// Metadata context id.
        context_id: u32,
        /// Descriptors, in export order.
        descriptors: WireList<'a, ExtDescriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR`: 32-bit nonzero error, 16-bit message length, message.
    Error {
        /// Error value.
        error: u32,
        /// Message for humans.
        message: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`: as `Error`, then the 64-bit offset it concerns.
    ErrorOffset {
        /// Error value.
        error: u32,
        /// Message for humans.
        message: &'a [u8],
        /// Export offset where the error happened.
        offset: u64,
    },
    /// A type this version does not know, with its raw payload.
    Unknown {
        /// The chunk type.
        chunk_type: ChunkType,
        /// Raw payload.
        data: &'a [u8],
    },
}

impl<'a> super::ListItem<'a> for Descriptor {
    fn decode(input: &mut &'a [u8]) -> Option<Self> {
        let (head, rest) = input.split_first_chunk::<8>()?;
        *input = rest;
        let (length, status) = head.split_at(4);
        Some(Self {
            length: u32::from_be_bytes(length.try_into().ok()?),
            status: u32::from_be_bytes(status.try_into().ok()?),
        })
    }
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode_into(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.length.to_be_bytes());
        out[4..8].copy_from_slice(&self.status.to_be_bytes());
    }
}

impl<'a> super::ListItem<'a> for ExtDescriptor {
    fn decode(input: &mut &'a [u8]) -> Option<Self> {
        let (head, rest) = input.split_first_chunk::<16>()?;
        *input = rest;
        let (length, status) = head.split_at(8);
        Some(Self {
            length: u64::from_be_bytes(length.try_into().ok()?),
            status: u64::from_be_bytes(status.try_into().ok()?),
        })
    }
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode_into(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.length.to_be_bytes());
        out[8..16].copy_from_slice(&self.status.to_be_bytes());
    }
}
