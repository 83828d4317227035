//! Why a call was refused ([`UsageError`]) or the connection must end
//! ([`ProtocolError`]).

use crate::wire::{
    BlockSizeConstraints, ChunkType, Command, CommandFlags, OptionCode, OptionReplyType,
    TransmissionFlags, WireError,
};

/// Why a command was refused locally; nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum UsageError {
    /// Transmission has not begun (wait for [`Event::Ready`](super::Event::Ready)).
    NotReady,
    /// The session is ending: a disconnect was asked for, the server
    /// reported `NBD_ESHUTDOWN`, or the connection closed.
    Closing,
    /// `REQUESTS` requests are in flight; wait for one to finish.
    Full,
    /// The server did not advertise this command (or, for block status, no
    /// metadata context was selected).
    NotAdvertised(Command),
    /// A flag not valid for this command.
    InvalidFlags(CommandFlags),
    /// A flag the server did not advertise.
    FlagNotAdvertised(CommandFlags),
    /// The export is read-only.
    ReadOnly,
    /// A length of zero.
    ZeroLength,
    /// The range ends past the export's end.
    OutOfRange,
    /// Offset or length is not a multiple of the minimum block size.
    Misaligned {
        /// The minimum block size.
        minimum: u32,
    },
    /// The length exceeds the maximum block size (or a compact header's
    /// 32-bit length).
    TooLarge {
        /// The largest length allowed.
        maximum: u64,
    },
    /// A resize is already in flight.
    ResizeInFlight,
}

impl core::fmt::Display for UsageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotReady => f.write_str("transmission has not begun"),
            Self::Closing => f.write_str("the session is ending"),
            Self::Full => f.write_str("too many requests in flight"),
            Self::NotAdvertised(command) => {
                write!(f, "the server does not support {command:?}")
            }
            Self::InvalidFlags(flags) => write!(f, "flags {flags:?} not valid for this command"),
            Self::FlagNotAdvertised(flags) => {
                write!(f, "the server does not support flags {flags:?}")
            }
            Self::ReadOnly => f.write_str("the export is read-only"),
            Self::ZeroLength => f.write_str("length must not be zero"),
            Self::OutOfRange => f.write_str("range extends past the end of the export"),
            Self::Misaligned { minimum } => {
                write!(f, "offset and length must be multiples of {minimum}")
            }
            Self::TooLarge { maximum } => write!(f, "length exceeds the maximum of {maximum}"),
            Self::ResizeInFlight => f.write_str("a resize is already in flight"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for UsageError {}

/// Why the connection must end now, without a goodbye (hard disconnect):
/// the server broke the protocol, or the session cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ProtocolError {
    /// The server uses oldstyle negotiation, which this client refuses.
    Oldstyle,
    /// The server does not offer fixed newstyle negotiation.
    NotFixedNewstyle,
    /// A magic number was wrong: the stream cannot be trusted any more.
    BadMagic {
        /// What was found (widened).
        found: u64,
    },
    /// A message that parses as no valid one (other than by its magic):
    /// the wire layer's reason, such as the field it refuses.
    Malformed(WireError),
    /// The server sent bytes when no reply was due (before the client's
    /// option went out, or after negotiation ended).
    UnsolicitedData,
    /// An option reply for another option than the one sent.
    UnexpectedOptionReply {
        /// The option the reply names.
        option: OptionCode,
    },
    /// A reply type the option does not allow.
    UnexpectedReplyType {
        /// The option.
        option: OptionCode,
        /// The reply type.
        reply_type: OptionReplyType,
    },
    /// An option reply's data does not fit its type.
    BadOptionReply {
        /// The option.
        option: OptionCode,
    },
    /// An option reply longer than the connection buffer can hold.
    ReplyTooLong {
        /// Its announced length.
        length: u32,
    },
    /// `NBD_OPT_GO`/`NBD_OPT_INFO` was acknowledged without `NBD_INFO_EXPORT`.
    MissingExportInfo,
    /// Transmission flags without `NBD_FLAG_HAS_FLAGS`.
    BadTransmissionFlags(TransmissionFlags),
    /// Block size constraints the spec forbids.
    BadBlockSizes(BlockSizeConstraints),
    /// More metadata contexts selected than [`MAX_META_CONTEXTS`](super::MAX_META_CONTEXTS).
    TooManyMetaContexts,
    /// Two selected metadata contexts share an id.
    DuplicateMetaContext(u32),
    /// The server refused `NBD_OPT_GO` as unknown after agreeing to extended
    /// headers, which `NBD_OPT_EXPORT_NAME` cannot use.
    GoUnsupported,
    /// A reply header of another style than negotiated (simple, structured
    /// or extended).
    WrongHeaderStyle,
    /// A reply for a cookie no request in flight carries.
    UnknownCookie {
        /// The cookie.
        cookie: u64,
    },
    /// A simple reply to a read after structured replies were negotiated.
    SimpleReplyToRead,
    /// A chunk type the request does not allow, or unknown and not an error.
    UnexpectedChunk {
        /// The chunk type.
        chunk_type: ChunkType,
        /// The request's command.
        command: Command,
    },
    /// A chunk whose length or fields do not fit its type.
    BadChunk {
        /// The chunk type.
        chunk_type: ChunkType,
    },
    /// An extended reply header that does not echo the request's offset.
    OffsetMismatch {
        /// The request's offset.
        expected: u64,
        /// The reply's.
        found: u64,
    },
    /// A content chunk or error offset outside the request's range, or a
    /// block status descriptor past the export's end (or, with `REQ_ONE`,
    /// past the request's length).
    ChunkOutOfRange,
    /// A content chunk overlapping an earlier one of the same read.
    OverlappingChunks,
    /// A read fragmented into more disjoint pieces than
    /// [`MAX_READ_FRAGMENTS`](super::MAX_READ_FRAGMENTS).
    TooFragmented,
    /// More than one content chunk for a read sent with `NBD_CMD_FLAG_DF`.
    Fragmented,
    /// A read ended successfully without covering its whole range.
    IncompleteRead,
    /// A block status descriptor of length zero.
    EmptyDescriptor,
    /// Block status for a metadata context that was not selected.
    UnknownMetaContext(u32),
    /// Two block status chunks for one context in one reply.
    DuplicateBlockStatus(u32),
    /// A block status reply ended successfully without a chunk for every
    /// selected context.
    MissingBlockStatus,
    /// The server closed the connection with the session unfinished.
    UnexpectedEof,
    /// The server closed the connection after `NBD_OPT_EXPORT_NAME`: it
    /// refused the export (that option has no error reply).
    ExportRefused,
    /// `process` was called after the connection ended.
    Closed,
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Oldstyle => f.write_str("server uses oldstyle negotiation"),
            Self::NotFixedNewstyle => f.write_str("server does not support fixed newstyle"),
            Self::BadMagic { found } => write!(f, "bad magic number {found:#x} from server"),
            Self::Malformed(error) => write!(f, "malformed message from server: {error}"),
            Self::UnsolicitedData => f.write_str("server sent data when no reply was due"),
            Self::UnexpectedOptionReply { option } => {
                write!(f, "unexpected reply to option {option:?}")
            }
            Self::UnexpectedReplyType { option, reply_type } => {
                write!(f, "reply {reply_type:?} not valid for option {option:?}")
            }
            Self::BadOptionReply { option } => write!(f, "malformed reply to option {option:?}"),
            Self::ReplyTooLong { length } => {
                write!(f, "option reply of {length} bytes is too long")
            }
            Self::MissingExportInfo => f.write_str("export described without NBD_INFO_EXPORT"),
            Self::BadTransmissionFlags(flags) => {
                write!(f, "transmission flags {flags:?} lack NBD_FLAG_HAS_FLAGS")
            }
            Self::BadBlockSizes(sizes) => write!(f, "invalid block size constraints {sizes:?}"),
            Self::TooManyMetaContexts => f.write_str("too many metadata contexts selected"),
            Self::DuplicateMetaContext(id) => write!(f, "metadata context id {id} repeated"),
            Self::GoUnsupported => {
                f.write_str("NBD_OPT_GO unsupported although extended headers were agreed")
            }
            Self::WrongHeaderStyle => f.write_str("reply header of the wrong style"),
            Self::UnknownCookie { cookie } => {
                write!(f, "reply for cookie {cookie:#x}, which is not in flight")
            }
            Self::SimpleReplyToRead => {
                f.write_str("simple reply to a read with structured replies")
            }
            Self::UnexpectedChunk {
                chunk_type,
                command,
            } => write!(f, "chunk {chunk_type:?} not valid for {command:?}"),
            Self::BadChunk { chunk_type } => write!(f, "malformed {chunk_type:?} chunk"),
            Self::OffsetMismatch { expected, found } => write!(
                f,
                "extended reply offset {found} does not echo the request's {expected}"
            ),
            Self::ChunkOutOfRange => f.write_str("reply chunk outside the request"),
            Self::OverlappingChunks => f.write_str("overlapping read chunks"),
            Self::TooFragmented => f.write_str("read fragmented into too many pieces"),
            Self::Fragmented => f.write_str("several content chunks for a DF read"),
            Self::IncompleteRead => f.write_str("read ended without covering its range"),
            Self::EmptyDescriptor => f.write_str("block status descriptor of length zero"),
            Self::UnknownMetaContext(id) => {
                write!(f, "block status for unselected metadata context {id}")
            }
            Self::DuplicateBlockStatus(id) => {
                write!(f, "block status for metadata context {id} repeated")
            }
            Self::MissingBlockStatus => {
                f.write_str("block status reply without every selected context")
            }
            Self::UnexpectedEof => f.write_str("server closed the connection unexpectedly"),
            Self::ExportRefused => f.write_str("server refused the export (NBD_OPT_EXPORT_NAME)"),
            Self::Closed => f.write_str("connection already closed"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProtocolError {}
