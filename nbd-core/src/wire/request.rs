//! Transmission requests (spec: "Request message", extended headers).

use super::{Command, CommandFlags, WireList};

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
