//! Transmission reply headers (spec: "Simple reply message", "Structured
//! reply chunk message", extended headers).

use super::{ChunkType, ReplyFlags};

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
