//! Structured reply chunk payloads (spec: "Structured reply types").

use super::cursor::{Reader, Writer, len_u16, len_u32};
use super::{ChunkHeader, ChunkType, HeaderStyle, ReplyFlags, WireError, WireList};

/// The fixed fields that open a chunk payload, with the length of the
/// variable tail after them instead of the tail itself: what a sender
/// encodes into a small scratch before sending the tail (read data,
/// descriptors, a message) from wherever it lives, and what a receiver
/// parses before streaming the tail. [`Chunk`] encodes through it.
///
/// `NBD_REPLY_TYPE_ERROR_OFFSET` ends with an offset after its message:
/// its tail is the message, then [`ERROR_OFFSET_TRAILER_LEN`] bytes read
/// by [`ChunkPrefix::parse_error_offset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ChunkPrefix {
    /// `NBD_REPLY_TYPE_NONE`: no payload.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: offset; tail: `data_len` (nonzero) bytes of data.
    OffsetData {
        /// Export offset of the data.
        offset: u64,
        /// Bytes of data after the offset.
        data_len: u64,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: offset and nonzero size; no tail.
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Bytes that read as zero.
        size: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id; tail: `count` 8-byte descriptors.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// Descriptors after the context id (nonzero).
        count: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: context id, descriptor count;
    /// tail: `count` 16-byte descriptors.
    BlockStatusExt {
        /// Metadata context id.
        context_id: u32,
        /// Descriptors after the count (nonzero).
        count: u32,
    },
    /// An error chunk (`NBD_REPLY_TYPE_ERROR`, `ERROR_OFFSET`, or an error
    /// type this version does not know): nonzero error, message length;
    /// tail: the message (and for `ERROR_OFFSET` the offset; for unknown
    /// types whatever the type adds).
    Error {
        /// The error chunk type.
        chunk_type: ChunkType,
        /// Error value.
        error: u32,
        /// Bytes of message after the length.
        message_len: u16,
    },
}

/// Bytes of the offset that ends an `NBD_REPLY_TYPE_ERROR_OFFSET` payload.
pub const ERROR_OFFSET_TRAILER_LEN: usize = 8;

impl ChunkPrefix {
    /// The chunk type.
    pub fn chunk_type(&self) -> ChunkType {
        match self {
            Self::None => ChunkType::None,
            Self::OffsetData { .. } => ChunkType::OffsetData,
            Self::OffsetHole { .. } => ChunkType::OffsetHole,
            Self::BlockStatus { .. } => ChunkType::BlockStatus,
            Self::BlockStatusExt { .. } => ChunkType::BlockStatusExt,
            Self::Error { chunk_type, .. } => *chunk_type,
        }
    }

    /// Bytes of fixed fields a chunk of `chunk_type` opens with, or `None`
    /// for a non-error type this version does not know.
    pub fn fixed_len(chunk_type: ChunkType) -> Option<usize> {
        match chunk_type {
            ChunkType::None => Some(0),
            ChunkType::OffsetData => Some(8),
            ChunkType::OffsetHole => Some(12),
            ChunkType::BlockStatus => Some(4),
            ChunkType::BlockStatusExt => Some(8),
            other if other.is_error() => Some(6),
            _ => None,
        }
    }

    /// Bytes of the fixed fields.
    pub fn encoded_len(&self) -> usize {
        Self::fixed_len(self.chunk_type()).unwrap_or(0)
    }

    /// Bytes after the fixed fields: data, descriptors, or message (and
    /// the trailing offset of `ERROR_OFFSET`).
    pub fn tail_len(&self) -> u64 {
        match *self {
            Self::None | Self::OffsetHole { .. } => 0,
            Self::OffsetData { data_len, .. } => data_len,
            Self::BlockStatus { count, .. } => u64::from(count) * 8,
            Self::BlockStatusExt { count, .. } => u64::from(count) * 16,
            Self::Error {
                chunk_type,
                message_len,
                ..
            } => {
                let trailer = if chunk_type == ChunkType::ErrorOffset {
                    ERROR_OFFSET_TRAILER_LEN as u64
                } else {
                    0
                };
                u64::from(message_len) + trailer
            }
        }
    }

    /// Bytes of the whole payload (the header's `length`).
    pub fn payload_len(&self) -> u64 {
        (self.encoded_len() as u64).saturating_add(self.tail_len())
    }

    /// Checks what the header's `payload_len` alone tells about a chunk of
    /// `chunk_type`, before its fields arrive: too short for the fixed
    /// fields, or not filled by whole descriptors, is
    /// [`WireError::BadLength`]; a non-error type this version does not
    /// know is [`WireError::InvalidValue`] (its layout is unknown).
    pub fn check_length(chunk_type: ChunkType, payload_len: u64) -> Result<(), WireError> {
        let fixed = Self::fixed_len(chunk_type).ok_or(WireError::InvalidValue("chunk type"))?;
        let tail = payload_len
            .checked_sub(fixed as u64)
            .ok_or(WireError::BadLength)?;
        let ok = match chunk_type {
            ChunkType::None | ChunkType::OffsetHole => tail == 0,
            ChunkType::OffsetData => tail > 0,
            ChunkType::BlockStatus => tail > 0 && tail % 8 == 0 && tail / 8 <= u32::MAX.into(),
            ChunkType::BlockStatusExt => tail > 0 && tail % 16 == 0,
            ChunkType::ErrorOffset => tail >= ERROR_OFFSET_TRAILER_LEN as u64,
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(WireError::BadLength)
        }
    }

    /// Parses the fixed fields of a chunk of `chunk_type` whose header
    /// announced `payload_len` bytes, from the front of `input` (a
    /// streaming read: a short input is [`WireError::Incomplete`]), and
    /// checks the announced length against them (see
    /// [`check_length`](Self::check_length)): a length the fields and the
    /// type's tail do not fill exactly is [`WireError::BadLength`]; a zero
    /// hole size, descriptor count or error is [`WireError::InvalidValue`].
    /// An error type this version does not know may carry bytes after its
    /// message.
    pub fn parse(
        chunk_type: ChunkType,
        payload_len: u64,
        input: &[u8],
    ) -> Result<(&[u8], Self), WireError> {
        let fixed = Self::fixed_len(chunk_type).ok_or(WireError::InvalidValue("chunk type"))?;
        let tail = payload_len
            .checked_sub(fixed as u64)
            .ok_or(WireError::BadLength)?;
        let mut r = Reader::streaming(input, fixed);
        let prefix = match chunk_type {
            ChunkType::None => Self::None,
            ChunkType::OffsetData => Self::OffsetData {
                offset: r.u64()?,
                data_len: tail,
            },
            ChunkType::OffsetHole => {
                let offset = r.u64()?;
                let size = r.u32()?;
                if size == 0 {
                    return Err(WireError::InvalidValue("hole size"));
                }
                Self::OffsetHole { offset, size }
            }
            ChunkType::BlockStatus => Self::BlockStatus {
                context_id: r.u32()?,
                // `check_length` bounds the count.
                count: (tail / 8) as u32,
            },
            ChunkType::BlockStatusExt => {
                let context_id = r.u32()?;
                let count = r.u32()?;
                if count == 0 {
                    return Err(WireError::InvalidValue("descriptor count"));
                }
                Self::BlockStatusExt { context_id, count }
            }
            _ => {
                let error = r.u32()?;
                let message_len = r.u16()?;
                if error == 0 {
                    return Err(WireError::InvalidValue("error"));
                }
                Self::Error {
                    chunk_type,
                    error,
                    message_len,
                }
            }
        };
        // Checked after the fields, so that a zero field is reported as
        // such even where it also leaves the length short.
        Self::check_length(chunk_type, payload_len)?;
        let fits = match chunk_type {
            // Later versions may add fields after an unknown error's message.
            ChunkType::Unknown(_) => prefix.tail_len() <= tail,
            _ => prefix.tail_len() == tail,
        };
        if !fits {
            return Err(WireError::BadLength);
        }
        Ok((r.rest(), prefix))
    }

    /// Parses the offset that ends an `NBD_REPLY_TYPE_ERROR_OFFSET`
    /// payload, after its message (a streaming read).
    pub fn parse_error_offset(input: &[u8]) -> Result<(&[u8], u64), WireError> {
        let mut r = Reader::streaming(input, ERROR_OFFSET_TRAILER_LEN);
        let offset = r.u64()?;
        Ok((r.rest(), offset))
    }

    /// Writes the offset that ends an `NBD_REPLY_TYPE_ERROR_OFFSET`
    /// payload, after its message, to the front of `out`.
    pub fn encode_error_offset(offset: u64, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, ERROR_OFFSET_TRAILER_LEN)?;
        w.u64(offset)?;
        Ok(w.finish())
    }

    /// Checks what the fields cannot express, so that whatever encodes also
    /// parses back.
    fn validate(&self) -> Result<(), WireError> {
        let check = |ok: bool, field| {
            if ok {
                Ok(())
            } else {
                Err(WireError::InvalidValue(field))
            }
        };
        match *self {
            Self::None => Ok(()),
            Self::OffsetData { data_len, .. } => check(data_len != 0, "data"),
            Self::OffsetHole { size, .. } => check(size != 0, "hole size"),
            Self::BlockStatus { count, .. } | Self::BlockStatusExt { count, .. } => {
                check(count != 0, "descriptors")
            }
            Self::Error {
                chunk_type, error, ..
            } => {
                check(chunk_type.is_error(), "chunk type")?;
                check(error != 0, "error")
            }
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        match *self {
            Self::None => {}
            Self::OffsetData { offset, .. } => w.u64(offset)?,
            Self::OffsetHole { offset, size } => {
                w.u64(offset)?;
                w.u32(size)?;
            }
            Self::BlockStatus { context_id, .. } => w.u32(context_id)?,
            Self::BlockStatusExt { context_id, count } => {
                w.u32(context_id)?;
                w.u32(count)?;
            }
            Self::Error {
                error, message_len, ..
            } => {
                w.u32(error)?;
                w.u16(message_len)?;
            }
        }
        Ok(())
    }

    /// Writes the fixed fields (no header, no tail) to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        self.validate()?;
        let mut w = Writer::new(out, self.encoded_len())?;
        self.write(&mut w)?;
        Ok(w.finish())
    }

    /// Bytes of a header of `style` and the fixed fields.
    pub fn encoded_len_with_header(&self, style: HeaderStyle) -> usize {
        ChunkHeader::encoded_len(style).saturating_add(self.encoded_len())
    }

    /// Writes a header of `style` announcing the whole payload
    /// ([`payload_len`](Self::payload_len); `request_offset` is echoed by
    /// extended headers only), then the fixed fields, to the front of
    /// `out`; the sender sends the tail after them.
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
            length: self.payload_len(),
        };
        frame_chunk(&header, style, self.encoded_len(), out, |w| self.write(w))
    }
}

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
        if let ChunkType::Unknown(_) = chunk_type {
            return Ok(Self::Unknown { chunk_type, data });
        }
        // The payload is complete: running short of it is a bad length.
        let short = |error| match error {
            WireError::Incomplete { .. } => WireError::BadLength,
            other => other,
        };
        let (tail, prefix) =
            ChunkPrefix::parse(chunk_type, data.len() as u64, data).map_err(short)?;
        let chunk = match prefix {
            ChunkPrefix::None => Self::None,
            ChunkPrefix::OffsetData { offset, .. } => Self::OffsetData { offset, data: tail },
            ChunkPrefix::OffsetHole { offset, size } => Self::OffsetHole { offset, size },
            ChunkPrefix::BlockStatus { context_id, .. } => Self::BlockStatus {
                context_id,
                descriptors: WireList::decode_all(tail).ok_or(WireError::BadLength)?,
            },
            ChunkPrefix::BlockStatusExt { context_id, count } => Self::BlockStatusExt {
                context_id,
                descriptors: WireList::decode_exact(count as usize, tail)
                    .ok_or(WireError::BadLength)?,
            },
            ChunkPrefix::Error {
                error, message_len, ..
            } => {
                let (message, trailer) = tail.split_at(message_len.into());
                if chunk_type == ChunkType::ErrorOffset {
                    let (_, offset) = ChunkPrefix::parse_error_offset(trailer).map_err(short)?;
                    Self::ErrorOffset {
                        error,
                        message,
                        offset,
                    }
                } else {
                    Self::Error { error, message }
                }
            }
        };
        Ok(chunk)
    }

    /// The fixed fields of this chunk; its tail is the data, descriptors
    /// or message (`ERROR_OFFSET` adds its trailing offset after the
    /// message). `None` for `Unknown`, whose layout is not known, or when
    /// a count or message length does not fit its field.
    pub fn prefix(&self) -> Option<ChunkPrefix> {
        let prefix = match *self {
            Self::None => ChunkPrefix::None,
            Self::OffsetData { offset, data } => ChunkPrefix::OffsetData {
                offset,
                data_len: data.len() as u64,
            },
            Self::OffsetHole { offset, size } => ChunkPrefix::OffsetHole { offset, size },
            Self::BlockStatus {
                context_id,
                descriptors,
            } => ChunkPrefix::BlockStatus {
                context_id,
                count: u32::try_from(descriptors.len()).ok()?,
            },
            Self::BlockStatusExt {
                context_id,
                descriptors,
            } => ChunkPrefix::BlockStatusExt {
                context_id,
                count: u32::try_from(descriptors.len()).ok()?,
            },
            Self::Error { error, message } | Self::ErrorOffset { error, message, .. } => {
                ChunkPrefix::Error {
                    chunk_type: self.chunk_type(),
                    error,
                    message_len: u16::try_from(message.len()).ok()?,
                }
            }
            Self::Unknown { .. } => return None,
        };
        Some(prefix)
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
        if let Some(prefix) = self.prefix() {
            prefix.write(w)?;
        }
        match self {
            Self::None | Self::OffsetHole { .. } => {}
            Self::OffsetData { data, .. } | Self::Unknown { data, .. } => w.bytes(data)?,
            Self::BlockStatus { descriptors, .. } => {
                descriptors.encode_into(w.slot(descriptors.encoded_len())?);
            }
            Self::BlockStatusExt { descriptors, .. } => {
                descriptors.encode_into(w.slot(descriptors.encoded_len())?);
            }
            Self::Error { message, .. } => w.bytes(message)?,
            Self::ErrorOffset {
                message, offset, ..
            } => {
                w.bytes(message)?;
                w.u64(*offset)?;
            }
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
        frame_chunk(&header, style, self.payload_len(), out, |w| self.write(w))
    }
}

/// Writes `header` in `style`, then the `body_len` bytes `body` writes, to
/// the front of `out`: the one way chunks are framed, for a whole [`Chunk`]
/// and for a [`ChunkPrefix`] whose tail follows.
fn frame_chunk(
    header: &ChunkHeader,
    style: HeaderStyle,
    body_len: usize,
    out: &mut [u8],
    body: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let header_len = ChunkHeader::encoded_len(style);
    let mut w = Writer::new(out, header_len.saturating_add(body_len))?;
    header.encode(style, w.slot(header_len)?)?;
    body(&mut w)?;
    Ok(w.finish())
}
