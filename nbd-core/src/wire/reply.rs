//! Transmission reply headers (spec: "Simple reply message", "Structured
//! reply chunk message", extended headers).

use super::cursor::{Reader, Writer};
use super::{
    ChunkType, EXTENDED_REPLY_HEADER_LEN, EXTENDED_REPLY_MAGIC, HeaderStyle, ReplyFlags,
    SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
    WireError,
};

/// Simple reply: magic `0x67446698`, error, cookie (16 bytes), followed by
/// the read data for a successful `NBD_CMD_READ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SimpleReply {
    /// Error value, zero for success (see [`super::ErrorCode`]).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Header of one reply chunk: structured (20 bytes: magic `0x668e33ef`,
/// flags, type, cookie, 32-bit length) or extended (32 bytes: magic
/// `0x6e8a278c`, flags, type, cookie, offset, 64-bit length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChunkHeader {
    /// Reply flags (`DONE`).
    pub flags: ReplyFlags,
    /// Chunk type.
    pub chunk_type: ChunkType,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset, echoed (extended headers only; zero otherwise).
    pub offset: u64,
    /// Length of the chunk payload that follows.
    pub length: u64,
}

/// Any reply header, told apart by its magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReplyHeader {
    /// Simple reply.
    Simple(SimpleReply),
    /// Structured reply chunk header (compact headers).
    Structured(ChunkHeader),
    /// Extended reply chunk header.
    Extended(ChunkHeader),
}

impl SimpleReply {
    /// Parses a simple reply header from the front of `input`.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, SIMPLE_REPLY_LEN);
        r.magic_u32(SIMPLE_REPLY_MAGIC)?;
        let error = r.u32()?;
        let cookie = r.u64()?;
        Ok((r.rest(), Self { error, cookie }))
    }

    /// Bytes the header takes: 16.
    pub fn encoded_len(&self) -> usize {
        SIMPLE_REPLY_LEN
    }

    /// Writes the header to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, SIMPLE_REPLY_LEN)?;
        w.u32(SIMPLE_REPLY_MAGIC)?;
        w.u32(self.error)?;
        w.u64(self.cookie)?;
        Ok(w.finish())
    }
}

impl ChunkHeader {
    /// Parses a chunk header of the given style from the front of `input`:
    /// structured for [`HeaderStyle::Compact`] (`offset` is then zero),
    /// extended for [`HeaderStyle::Extended`].
    pub fn parse(input: &[u8], style: HeaderStyle) -> Result<(&[u8], Self), WireError> {
        let (magic, len) = match style {
            HeaderStyle::Compact => (STRUCTURED_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN),
            HeaderStyle::Extended => (EXTENDED_REPLY_MAGIC, EXTENDED_REPLY_HEADER_LEN),
        };
        let mut r = Reader::streaming(input, len);
        r.magic_u32(magic)?;
        let flags = ReplyFlags(r.u16()?);
        let chunk_type = ChunkType::from_wire(r.u16()?);
        let cookie = r.u64()?;
        let (offset, length) = match style {
            HeaderStyle::Compact => (0, r.u32()?.into()),
            HeaderStyle::Extended => (r.u64()?, r.u64()?),
        };
        let header = Self {
            flags,
            chunk_type,
            cookie,
            offset,
            length,
        };
        Ok((r.rest(), header))
    }

    /// Bytes a header of `style` takes: 20 or 32.
    pub fn encoded_len(style: HeaderStyle) -> usize {
        match style {
            HeaderStyle::Compact => STRUCTURED_REPLY_HEADER_LEN,
            HeaderStyle::Extended => EXTENDED_REPLY_HEADER_LEN,
        }
    }

    /// Writes the header in `style` to the front of `out`. A structured
    /// header has no offset (it is not written) and cannot carry a length
    /// over `u32::MAX` ([`WireError::InvalidValue`]).
    pub fn encode(&self, style: HeaderStyle, out: &mut [u8]) -> Result<usize, WireError> {
        let compact_length = match style {
            HeaderStyle::Compact => {
                Some(u32::try_from(self.length).map_err(|_| WireError::InvalidValue("length"))?)
            }
            HeaderStyle::Extended => None,
        };
        let mut w = Writer::new(out, Self::encoded_len(style))?;
        w.u32(match style {
            HeaderStyle::Compact => STRUCTURED_REPLY_MAGIC,
            HeaderStyle::Extended => EXTENDED_REPLY_MAGIC,
        })?;
        w.u16(self.flags.bits())?;
        w.u16(self.chunk_type.to_wire())?;
        w.u64(self.cookie)?;
        match compact_length {
            Some(length) => w.u32(length)?,
            None => {
                w.u64(self.offset)?;
                w.u64(self.length)?;
            }
        }
        Ok(w.finish())
    }
}

/// Which reply header a magic opens, known from its first 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReplyKind {
    /// Simple reply (16 bytes).
    Simple,
    /// Structured reply chunk header (20 bytes).
    Structured,
    /// Extended reply chunk header (32 bytes).
    Extended,
}

impl ReplyKind {
    /// Bytes of the whole header of this kind.
    pub fn header_len(self) -> usize {
        match self {
            Self::Simple => SIMPLE_REPLY_LEN,
            Self::Structured => STRUCTURED_REPLY_HEADER_LEN,
            Self::Extended => EXTENDED_REPLY_HEADER_LEN,
        }
    }
}

/// Bytes of the magic that opens every reply header.
pub const REPLY_MAGIC_LEN: usize = 4;

impl ReplyHeader {
    /// Reads the magic at the front of `input` (a streaming read of
    /// [`REPLY_MAGIC_LEN`] bytes), for a receiver that learns from it how
    /// many header bytes to wait for; any other magic is
    /// [`WireError::BadMagic`].
    pub fn parse_kind(input: &[u8]) -> Result<(&[u8], ReplyKind), WireError> {
        let mut r = Reader::streaming(input, REPLY_MAGIC_LEN);
        let kind = match r.u32()? {
            SIMPLE_REPLY_MAGIC => ReplyKind::Simple,
            STRUCTURED_REPLY_MAGIC => ReplyKind::Structured,
            EXTENDED_REPLY_MAGIC => ReplyKind::Extended,
            found => {
                return Err(WireError::BadMagic {
                    found: found.into(),
                });
            }
        };
        Ok((r.rest(), kind))
    }

    /// Parses any reply header from the front of `input`, told apart by its
    /// magic; any other magic is [`WireError::BadMagic`].
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, SIMPLE_REPLY_LEN);
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => {
                SimpleReply::parse(input).map(|(rest, reply)| (rest, Self::Simple(reply)))
            }
            STRUCTURED_REPLY_MAGIC => ChunkHeader::parse(input, HeaderStyle::Compact)
                .map(|(rest, header)| (rest, Self::Structured(header))),
            EXTENDED_REPLY_MAGIC => ChunkHeader::parse(input, HeaderStyle::Extended)
                .map(|(rest, header)| (rest, Self::Extended(header))),
            found => Err(WireError::BadMagic {
                found: found.into(),
            }),
        }
    }

    /// Bytes the header takes: 16, 20 or 32.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Simple(reply) => reply.encoded_len(),
            Self::Structured(_) => ChunkHeader::encoded_len(HeaderStyle::Compact),
            Self::Extended(_) => ChunkHeader::encoded_len(HeaderStyle::Extended),
        }
    }

    /// Writes the header to the front of `out` (a structured header drops
    /// its `offset`).
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        match self {
            Self::Simple(reply) => reply.encode(out),
            Self::Structured(header) => header.encode(HeaderStyle::Compact, out),
            Self::Extended(header) => header.encode(HeaderStyle::Extended, out),
        }
    }
}
