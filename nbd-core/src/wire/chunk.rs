//! Structured reply chunk payloads (spec: "Structured reply types").

use super::cursor::{Reader, Writer, len_u16, len_u32};
use super::{ChunkHeader, ChunkType, HeaderStyle, ReplyFlags, WireError, WireList};

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

impl<'a> Chunk<'a> {
    /// The chunk type.
    pub fn chunk_type(&self) -> ChunkType {
        match self {
            Self::None => ChunkType::None,
            Self::OffsetData { .. } => ChunkType::OffsetData,
            Self::OffsetHole { .. } => ChunkType::OffsetHole,
            Self::BlockStatus { .. } => ChunkType::BlockStatus,
            Self::BlockStatusExt { .. } => ChunkType::BlockStatusExt,
            Self::Error { .. } => ChunkType::Error,
            Self::ErrorOffset { .. } => ChunkType::ErrorOffset,
            Self::Unknown { chunk_type, .. } => *chunk_type,
        }
    }

    /// Parses the complete payload of a chunk of type `chunk_type` (the
    /// `length` bytes after its header), with the spec's length rules: a
    /// payload that does not fit them is [`WireError::BadLength`]; a zero
    /// hole size, descriptor count or error is [`WireError::InvalidValue`].
    /// Types this version does not know keep their raw payload.
    pub fn parse_payload(chunk_type: ChunkType, data: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::payload(data);
        let chunk = match chunk_type {
            ChunkType::None => {
                r.finish()?;
                Self::None
            }
            ChunkType::OffsetData => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(WireError::BadLength);
                }
                Self::OffsetData { offset, data }
            }
            ChunkType::OffsetHole => {
                let offset = r.u64()?;
                let size = r.u32()?;
                r.finish()?;
                if size == 0 {
                    return Err(WireError::InvalidValue("hole size"));
                }
                Self::OffsetHole { offset, size }
            }
            ChunkType::BlockStatus => {
                let context_id = r.u32()?;
                let descriptors = WireList::decode_all(r.rest()).ok_or(WireError::BadLength)?;
                if descriptors.is_empty() {
                    return Err(WireError::BadLength);
                }
                Self::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            ChunkType::BlockStatusExt => {
                let context_id = r.u32()?;
                let count = r.u32()?;
                if count == 0 {
                    return Err(WireError::InvalidValue("descriptor count"));
                }
                let rest = r.rest();
                // Checked before walking, so a huge count costs nothing.
                let count = usize::try_from(count).map_err(|_| WireError::BadLength)?;
                if count.checked_mul(16) != Some(rest.len()) {
                    return Err(WireError::BadLength);
                }
                let descriptors =
                    WireList::decode_exact(count, rest).ok_or(WireError::BadLength)?;
                Self::BlockStatusExt {
                    context_id,
                    descriptors,
                }
            }
            ChunkType::Error => {
                let (error, message) = Self::parse_error(&mut r)?;
                r.finish()?;
                Self::Error { error, message }
            }
            ChunkType::ErrorOffset => {
                let (error, message) = Self::parse_error(&mut r)?;
                let offset = r.u64()?;
                r.finish()?;
                Self::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }
            ChunkType::Unknown(_) => Self::Unknown { chunk_type, data },
        };
        Ok(chunk)
    }

    /// The common start of error chunks: nonzero error, 16-bit message
    /// length, message.
    fn parse_error(r: &mut Reader<'a>) -> Result<(u32, &'a [u8]), WireError> {
        let error = r.u32()?;
        let message_len = r.u16()?;
        let message = r.take(message_len.into())?;
        if error == 0 {
            return Err(WireError::InvalidValue("error"));
        }
        Ok((error, message))
    }

    /// Bytes of payload (the header's `length`).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::None => 0,
            Self::OffsetData { data, .. } => 8usize.saturating_add(data.len()),
            Self::OffsetHole { .. } => 12,
            Self::BlockStatus { descriptors, .. } => {
                4usize.saturating_add(descriptors.encoded_len())
            }
            Self::BlockStatusExt { descriptors, .. } => {
                8usize.saturating_add(descriptors.encoded_len())
            }
            Self::Error { message, .. } => 6usize.saturating_add(message.len()),
            Self::ErrorOffset { message, .. } => 14usize.saturating_add(message.len()),
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Checks what the type cannot express, so that whatever encodes also
    /// parses back: data, hole size, descriptor lists and errors must not be
    /// empty or zero; a message and a descriptor count must fit their fields.
    fn validate(&self) -> Result<(), WireError> {
        let check = |ok: bool, field| {
            if ok {
                Ok(())
            } else {
                Err(WireError::InvalidValue(field))
            }
        };
        match self {
            Self::None | Self::Unknown { .. } => Ok(()),
            Self::OffsetData { data, .. } => check(!data.is_empty(), "data"),
            Self::OffsetHole { size, .. } => check(*size != 0, "hole size"),
            Self::BlockStatus { descriptors, .. } => check(!descriptors.is_empty(), "descriptors"),
            Self::BlockStatusExt { descriptors, .. } => {
                check(!descriptors.is_empty(), "descriptors")?;
                len_u32(descriptors.len(), "descriptor count").map(drop)
            }
            Self::Error { error, message } | Self::ErrorOffset { error, message, .. } => {
                check(*error != 0, "error")?;
                len_u16(message.len(), "message length").map(drop)
            }
        }
    }

    /// Writes the payload (no header) to the front of `out`. A chunk the
    /// spec forbids (see [`parse_payload`](Self::parse_payload)) is
    /// [`WireError::InvalidValue`]; `Unknown` is written as given.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        self.validate()?;
        let mut w = Writer::new(out, self.payload_len())?;
        self.write(&mut w)?;
        Ok(w.finish())
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        match self {
            Self::None => {}
            Self::OffsetData { offset, data } => {
                w.u64(*offset)?;
                w.bytes(data)?;
            }
            Self::OffsetHole { offset, size } => {
                w.u64(*offset)?;
                w.u32(*size)?;
            }
            Self::BlockStatus {
                context_id,
                descriptors,
            } => {
                w.u32(*context_id)?;
                descriptors.encode_into(w.slot(descriptors.encoded_len())?);
            }
            Self::BlockStatusExt {
                context_id,
                descriptors,
            } => {
                w.u32(*context_id)?;
                w.u32(len_u32(descriptors.len(), "descriptor count")?)?;
                descriptors.encode_into(w.slot(descriptors.encoded_len())?);
            }
            Self::Error { error, message } => {
                w.u32(*error)?;
                w.u16(len_u16(message.len(), "message length")?)?;
                w.bytes(message)?;
            }
            Self::ErrorOffset {
                error,
                message,
                offset,
            } => {
                w.u32(*error)?;
                w.u16(len_u16(message.len(), "message length")?)?;
                w.bytes(message)?;
                w.u64(*offset)?;
            }
            Self::Unknown { data, .. } => w.bytes(data)?,
        }
        Ok(())
    }

    /// Bytes the chunk takes with a header of `style`.
    pub fn encoded_len_with_header(&self, style: HeaderStyle) -> usize {
        ChunkHeader::encoded_len(style).saturating_add(self.payload_len())
    }

    /// Writes the whole chunk to the front of `out`: a header of `style`
    /// (its length is the payload's; `request_offset` is echoed by extended
    /// headers only), then the payload.
    pub fn encode_with_header(
        &self,
        flags: ReplyFlags,
        cookie: u64,
        request_offset: u64,
        style: HeaderStyle,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        self.validate()?;
        let header = ChunkHeader {
            flags,
            chunk_type: self.chunk_type(),
            cookie,
            offset: request_offset,
            length: u64::try_from(self.payload_len())
                .map_err(|_| WireError::InvalidValue("length"))?,
        };
        let mut w = Writer::new(out, self.encoded_len_with_header(style))?;
        header.encode(style, w.slot(ChunkHeader::encoded_len(style))?)?;
        self.write(&mut w)?;
        Ok(w.finish())
    }
}
