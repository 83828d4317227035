//! Transmission requests (spec: "Request message", extended headers).

use super::cursor::{Reader, Writer};
use super::{
    Command, CommandFlags, EXTENDED_REQUEST_HEADER_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_HEADER_LEN,
    REQUEST_MAGIC, WireError, WireList,
};

/// Which request and reply headers a connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum HeaderStyle {
    /// 28-byte requests with 32-bit lengths; simple or structured replies.
    #[default]
    Compact,
    /// 32-byte requests and replies with 64-bit lengths
    /// (`NBD_OPT_EXTENDED_HEADERS` negotiated).
    Extended,
}

/// A request header, compact (28 bytes) or extended (32 bytes).
///
/// Compact: magic `0x25609513`, flags, type, cookie, offset, 32-bit length.
/// Extended: magic `0x21e41c71`, flags, type, cookie, offset, 64-bit length.
/// A `WRITE` (and, with `PAYLOAD_LEN`, any command) is followed by `length`
/// bytes of payload, which are not part of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestHeader {
    /// Command flags.
    pub flags: CommandFlags,
    /// Request type.
    pub command: Command,
    /// Opaque value the reply echoes (the spec's "handle"/"cookie").
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length (of the effect, or of the payload with `PAYLOAD_LEN`).
    pub length: u64,
}

/// Payload of `NBD_CMD_BLOCK_STATUS` with `NBD_CMD_FLAG_PAYLOAD_LEN`
/// (extended headers, `NBD_FLAG_BLOCK_STAT_PAYLOAD`): the effect length,
/// then the metadata context ids the client wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatusPayload<'a> {
    /// Length of the range queried.
    pub effect_length: u64,
    /// Context ids to report on.
    pub context_ids: WireList<'a, u32>,
}

impl RequestHeader {
    /// Parses a request header of the given style from the front of `input`.
    pub fn parse(input: &[u8], style: HeaderStyle) -> Result<(&[u8], Self), WireError> {
        let (magic, len) = match style {
            HeaderStyle::Compact => (REQUEST_MAGIC, REQUEST_HEADER_LEN),
            HeaderStyle::Extended => (EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_HEADER_LEN),
        };
        let mut r = Reader::streaming(input, len);
        r.magic_u32(magic)?;
        let flags = CommandFlags(r.u16()?);
        let command = Command::from_wire(r.u16()?);
        let cookie = r.u64()?;
        let offset = r.u64()?;
        let length = match style {
            HeaderStyle::Compact => r.u32()?.into(),
            HeaderStyle::Extended => r.u64()?,
        };
        let header = Self {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        Ok((r.rest(), header))
    }

    /// Parses a request header of either style, told apart by its magic;
    /// any other magic is [`WireError::BadMagic`].
    pub fn parse_any(input: &[u8]) -> Result<(&[u8], (HeaderStyle, Self)), WireError> {
        let mut r = Reader::streaming(input, REQUEST_HEADER_LEN);
        let style = match r.u32()? {
            REQUEST_MAGIC => HeaderStyle::Compact,
            EXTENDED_REQUEST_MAGIC => HeaderStyle::Extended,
            found => {
                return Err(WireError::BadMagic {
                    found: found.into(),
                });
            }
        };
        let (rest, header) = Self::parse(input, style)?;
        Ok((rest, (style, header)))
    }

    /// Bytes a header of `style` takes: 28 or 32.
    pub fn encoded_len(style: HeaderStyle) -> usize {
        match style {
            HeaderStyle::Compact => REQUEST_HEADER_LEN,
            HeaderStyle::Extended => EXTENDED_REQUEST_HEADER_LEN,
        }
    }

    /// Writes the header in `style` to the front of `out`. A compact header
    /// cannot carry a length over `u32::MAX` ([`WireError::InvalidValue`]).
    pub fn encode(&self, style: HeaderStyle, out: &mut [u8]) -> Result<usize, WireError> {
        let compact_length = match style {
            HeaderStyle::Compact => {
                Some(u32::try_from(self.length).map_err(|_| WireError::InvalidValue("length"))?)
            }
            HeaderStyle::Extended => None,
        };
        let mut w = Writer::new(out, Self::encoded_len(style))?;
        w.u32(match style {
            HeaderStyle::Compact => REQUEST_MAGIC,
            HeaderStyle::Extended => EXTENDED_REQUEST_MAGIC,
        })?;
        w.u16(self.flags.bits())?;
        w.u16(self.command.to_wire())?;
        w.u64(self.cookie)?;
        w.u64(self.offset)?;
        match compact_length {
            Some(length) => w.u32(length)?,
            None => w.u64(self.length)?,
        }
        Ok(w.finish())
    }
}

/// Bytes of the effect length that opens a [`BlockStatusPayload`].
pub const STATUS_EFFECT_LEN: usize = 8;
/// Bytes of each context id of a [`BlockStatusPayload`].
pub const STATUS_CONTEXT_ID_LEN: usize = 4;

impl<'a> BlockStatusPayload<'a> {
    /// Parses the complete payload: 64-bit effect length, then 32-bit
    /// context ids filling the rest exactly.
    pub fn parse_payload(data: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::payload(data);
        let effect_length = r.u64()?;
        let context_ids = WireList::decode_all(r.rest()).ok_or(WireError::BadLength)?;
        Ok(Self {
            effect_length,
            context_ids,
        })
    }

    /// Parses the effect length at the front of `input` (a streaming read
    /// of [`STATUS_EFFECT_LEN`] bytes), for a receiver that reads the
    /// payload as it arrives.
    pub fn parse_effect_length(input: &[u8]) -> Result<(&[u8], u64), WireError> {
        let mut r = Reader::streaming(input, STATUS_EFFECT_LEN);
        let effect_length = r.u64()?;
        Ok((r.rest(), effect_length))
    }

    /// Parses one context id at the front of `input` (a streaming read of
    /// [`STATUS_CONTEXT_ID_LEN`] bytes), after the effect length.
    pub fn parse_context_id(input: &[u8]) -> Result<(&[u8], u32), WireError> {
        let mut r = Reader::streaming(input, STATUS_CONTEXT_ID_LEN);
        let id = r.u32()?;
        Ok((r.rest(), id))
    }

    /// Bytes the payload takes.
    pub fn encoded_len(&self) -> usize {
        8usize.saturating_add(self.context_ids.encoded_len())
    }

    /// Writes the payload to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.encoded_len())?;
        w.u64(self.effect_length)?;
        self.context_ids
            .encode_into(w.slot(self.context_ids.encoded_len())?);
        Ok(w.finish())
    }
}
