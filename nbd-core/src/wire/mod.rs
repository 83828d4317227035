//! Wire layer: a parser and an encoder for every NBD message.
//!
//! Spec: `doc/proto.md` of NetworkBlockDevice/nbd, with the extended-headers
//! extension. Every message type follows the same shape:
//!
//! - `parse(input) -> Result<(rest, Self), WireError>` reads one message
//!   from the front of `input`, borrowing strings and payloads from it. It
//!   is streaming: a short input gives [`WireError::Incomplete`] with the
//!   number of further bytes needed, never a wrong value.
//! - `encoded_len(&self)` and `encode(&self, out) -> Result<usize, WireError>`
//!   write the message to the front of `out` and return its length.
//!
//! Option and chunk payloads arrive after a header that gives their length,
//! so their parsers (`parse_payload`) take the complete payload and reject
//! anything that does not fill it exactly.

mod chunk;
mod codes;
mod cursor;
mod flags;
mod handshake;
mod info;
mod list;
mod option;
mod reply;
mod request;

pub use chunk::{Chunk, ChunkPrefix, Descriptor, ERROR_OFFSET_TRAILER_LEN, ExtDescriptor};
pub use codes::{
    CHUNK_ERROR_BIT, ChunkType, Command, ErrorCode, InfoType, OPTION_REPLY_ERROR_BIT, OptionCode,
    OptionReplyType,
};
pub use flags::{
    AllocationFlags, ClientFlags, CommandFlags, HandshakeFlags, ReplyFlags, TransmissionFlags,
};
pub use handshake::{
    ExportNameReply, Greeting, HELLO_MAGICS_LEN, HelloStyle, OldstyleGreeting, ServerHello,
};
pub use info::{BlockSizeConstraints, Info};
pub use list::{ListItem, WireList, WireListIter};
pub use option::{
    InfoRequest, MetaContextRequest, OptionHeader, OptionReply, OptionReplyHeader, OptionRequest,
};
pub use reply::{ChunkHeader, REPLY_MAGIC_LEN, ReplyHeader, ReplyKind, SimpleReply};
pub use request::{
    BlockStatusPayload, HeaderStyle, RequestHeader, STATUS_CONTEXT_ID_LEN, STATUS_EFFECT_LEN,
};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic` of the oldstyle greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: compact request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`: extended request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// IANA port for NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Newstyle greeting: magic, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Oldstyle greeting: magics, size, flags, 124 zeroes.
pub const OLDSTYLE_GREETING_LEN: usize = 152;
/// Option request header: `IHAVEOPT`, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Compact request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Extended request header.
pub const EXTENDED_REQUEST_HEADER_LEN: usize = 32;
/// Simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Extended reply chunk header.
pub const EXTENDED_REPLY_HEADER_LEN: usize = 32;
/// Zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string (export name, description, message, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Why bytes could not be parsed or a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum WireError {
    /// The input ends early: at least `needed` more bytes are required.
    Incomplete {
        /// Further bytes needed before parsing can progress.
        needed: usize,
    },
    /// A magic number is not the one this message starts with.
    BadMagic {
        /// The magic found (widened to 64 bits).
        found: u64,
    },
    /// A length field does not match the message it describes.
    BadLength,
    /// A field holds a value the spec forbids; names the field.
    InvalidValue(&'static str),
    /// The output buffer is too small: `needed` bytes are required.
    BufferTooSmall {
        /// Bytes the encoding needs.
        needed: usize,
    },
}

impl core::fmt::Display for WireError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Incomplete { needed } => {
                write!(f, "incomplete message: {needed} more bytes needed")
            }
            Self::BadMagic { found } => write!(f, "bad magic number {found:#x}"),
            Self::BadLength => f.write_str("length field does not match the message"),
            Self::InvalidValue(field) => write!(f, "invalid value in field `{field}`"),
            Self::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for WireError {}
