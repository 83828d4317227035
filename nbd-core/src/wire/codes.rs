//! Enumerated protocol values (spec: "Values"): option codes, option reply
//! types, info types, commands, structured reply chunk types, error values.
//!
//! Every enum keeps values this version does not know in an `Unknown`
//! variant, so a peer's extension parses, is answered, and re-encodes
//! unchanged. `from_wire` never yields `Unknown(v)` for a known `v`.

use super::TransmissionFlags;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident: $repr:ty {
            $( $(#[$variant_meta:meta])* $variant:ident = $value:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[non_exhaustive]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )*
            /// A value this version of the spec does not define.
            Unknown($repr),
        }

        impl $name {
            /// Decodes the wire value.
            pub const fn from_wire(value: $repr) -> Self {
                match value {
                    $( $value => Self::$variant, )*
                    other => Self::Unknown(other),
                }
            }

            /// The wire value.
            pub const fn to_wire(self) -> $repr {
                match self {
                    $( Self::$variant => $value, )*
                    Self::Unknown(other) => other,
                }
            }
        }
    };
}

wire_enum! {
    /// Option code of an option request (`NBD_OPT_*`).
    OptionCode: u32 {
        /// `NBD_OPT_EXPORT_NAME` (1)
        ExportName = 1,
        /// `NBD_OPT_ABORT` (2)
        Abort = 2,
        /// `NBD_OPT_LIST` (3)
        List = 3,
        /// `NBD_OPT_PEEK_EXPORT` (4), withdrawn
        PeekExport = 4,
        /// `NBD_OPT_STARTTLS` (5)
        StartTls = 5,
        /// `NBD_OPT_INFO` (6)
        Info = 6,
        /// `NBD_OPT_GO` (7)
        Go = 7,
        /// `NBD_OPT_STRUCTURED_REPLY` (8)
        StructuredReply = 8,
        /// `NBD_OPT_LIST_META_CONTEXT` (9)
        ListMetaContext = 9,
        /// `NBD_OPT_SET_META_CONTEXT` (10)
        SetMetaContext = 10,
        /// `NBD_OPT_EXTENDED_HEADERS` (11)
        ExtendedHeaders = 11,
    }
}

/// Bit 31 marks an option reply type as an error.
pub const OPTION_REPLY_ERROR_BIT: u32 = 1 << 31;

wire_enum! {
    /// Option reply type (`NBD_REP_*`), successes and errors alike.
    OptionReplyType: u32 {
        /// `NBD_REP_ACK` (1)
        Ack = 1,
        /// `NBD_REP_SERVER` (2)
        Server = 2,
        /// `NBD_REP_INFO` (3)
        Info = 3,
        /// `NBD_REP_META_CONTEXT` (4)
        MetaContext = 4,
        /// `NBD_REP_ERR_UNSUP` (2^31 + 1)
        ErrUnsupported = 0x8000_0001,
        /// `NBD_REP_ERR_POLICY` (2^31 + 2)
        ErrPolicy = 0x8000_0002,
        /// `NBD_REP_ERR_INVALID` (2^31 + 3)
        ErrInvalid = 0x8000_0003,
        /// `NBD_REP_ERR_PLATFORM` (2^31 + 4)
        ErrPlatform = 0x8000_0004,
        /// `NBD_REP_ERR_TLS_REQD` (2^31 + 5)
        ErrTlsRequired = 0x8000_0005,
        /// `NBD_REP_ERR_UNKNOWN` (2^31 + 6): no such export.
        ErrUnknownExport = 0x8000_0006,
        /// `NBD_REP_ERR_SHUTDOWN` (2^31 + 7)
        ErrShutdown = 0x8000_0007,
        /// `NBD_REP_ERR_BLOCK_SIZE_REQD` (2^31 + 8)
        ErrBlockSizeRequired = 0x8000_0008,
        /// `NBD_REP_ERR_TOO_BIG` (2^31 + 9)
        ErrTooBig = 0x8000_0009,
        /// `NBD_REP_ERR_EXT_HEADER_REQD` (2^31 + 10)
        ErrExtendedHeaderRequired = 0x8000_000a,
    }
}

impl OptionReplyType {
    /// Whether this is an error reply (bit 31 set), known or not.
    pub const fn is_error(self) -> bool {
        self.to_wire() & OPTION_REPLY_ERROR_BIT != 0
    }
}

wire_enum! {
    /// Information type of an `NBD_REP_INFO` reply or info request (`NBD_INFO_*`).
    InfoType: u16 {
        /// `NBD_INFO_EXPORT` (0)
        Export = 0,
        /// `NBD_INFO_NAME` (1)
        Name = 1,
        /// `NBD_INFO_DESCRIPTION` (2)
        Description = 2,
        /// `NBD_INFO_BLOCK_SIZE` (3)
        BlockSize = 3,
    }
}

wire_enum! {
    /// Request type (`NBD_CMD_*`).
    Command: u16 {
        /// `NBD_CMD_READ` (0)
        Read = 0,
        /// `NBD_CMD_WRITE` (1)
        Write = 1,
        /// `NBD_CMD_DISC` (2)
        Disconnect = 2,
        /// `NBD_CMD_FLUSH` (3)
        Flush = 3,
        /// `NBD_CMD_TRIM` (4)
        Trim = 4,
        /// `NBD_CMD_CACHE` (5)
        Cache = 5,
        /// `NBD_CMD_WRITE_ZEROES` (6)
        WriteZeroes = 6,
        /// `NBD_CMD_BLOCK_STATUS` (7)
        BlockStatus = 7,
        /// `NBD_CMD_RESIZE` (8), experimental RESIZE extension
        Resize = 8,
    }
}

impl Command {
    /// Whether the command changes the export's data or size: refused on a
    /// read-only export, and waited for by a later flush.
    pub const fn changes_data(self) -> bool {
        matches!(
            self,
            Self::Write | Self::Trim | Self::WriteZeroes | Self::Resize
        )
    }

    /// The transmission flag the server must advertise before a client may
    /// send the command (spec: "Transmission flags"), if it needs one.
    /// Block status depends on a selected metadata context instead.
    pub const fn required_flag(self) -> Option<TransmissionFlags> {
        match self {
            Self::Flush => Some(TransmissionFlags::SEND_FLUSH),
            Self::Trim => Some(TransmissionFlags::SEND_TRIM),
            Self::WriteZeroes => Some(TransmissionFlags::SEND_WRITE_ZEROES),
            Self::Cache => Some(TransmissionFlags::SEND_CACHE),
            Self::Resize => Some(TransmissionFlags::SEND_RESIZE),
            _ => None,
        }
    }

    /// Whether the request's length is bounded by the export's maximum
    /// block size (spec: "Block size constraints"): reads, writes and
    /// cache. Commands without a payload in either direction (`TRIM`,
    /// `WRITE_ZEROES`) may ask for a larger effect length and the server
    /// SHOULD accept it: `nbdcopy` zeroes a 56 MiB hole in one request.
    /// `CACHE` stays capped because prefetching holds the data.
    pub const fn capped_by_maximum_block_size(self) -> bool {
        matches!(self, Self::Read | Self::Write | Self::Cache)
    }
}

/// Bit 15 marks a structured reply chunk type as an error chunk.
pub const CHUNK_ERROR_BIT: u16 = 1 << 15;

wire_enum! {
    /// Structured reply chunk type (`NBD_REPLY_TYPE_*`).
    ChunkType: u16 {
        /// `NBD_REPLY_TYPE_NONE` (0)
        None = 0,
        /// `NBD_REPLY_TYPE_OFFSET_DATA` (1)
        OffsetData = 1,
        /// `NBD_REPLY_TYPE_OFFSET_HOLE` (2)
        OffsetHole = 2,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS` (5)
        BlockStatus = 5,
        /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6)
        BlockStatusExt = 6,
        /// `NBD_REPLY_TYPE_ERROR` (2^15 + 1)
        Error = 0x8001,
        /// `NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2)
        ErrorOffset = 0x8002,
    }
}

impl ChunkType {
    /// Whether this is an error chunk (bit 15 set), known or not.
    pub const fn is_error(self) -> bool {
        self.to_wire() & CHUNK_ERROR_BIT != 0
    }
}

/// Error value of a reply (`NBD_E*`, spec: "Error values").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u32)]
pub enum ErrorCode {
    /// `NBD_EPERM` (1): operation not permitted (writes to a read-only export).
    Perm = 1,
    /// `NBD_EIO` (5): input/output error.
    Io = 5,
    /// `NBD_ENOMEM` (12): cannot allocate memory.
    NoMemory = 12,
    /// `NBD_EINVAL` (22): invalid argument.
    Invalid = 22,
    /// `NBD_ENOSPC` (28): no space left (writes past the end).
    NoSpace = 28,
    /// `NBD_EOVERFLOW` (75): value too large (DF reads too large to send whole).
    Overflow = 75,
    /// `NBD_ENOTSUP` (95): operation not supported (FAST_ZERO that is not fast).
    NotSupported = 95,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown = 108,
}

impl ErrorCode {
    /// Decodes a nonzero wire error. The spec tells clients to treat values
    /// it does not define as `NBD_EINVAL`; zero (success) gives `None`.
    pub const fn from_wire(value: u32) -> Option<Self> {
        Some(match value {
            0 => return None,
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMemory,
            28 => Self::NoSpace,
            75 => Self::Overflow,
            95 => Self::NotSupported,
            108 => Self::Shutdown,
            _ => Self::Invalid,
        })
    }

    /// The wire value.
    pub const fn to_wire(self) -> u32 {
        self as u32
    }

    /// The spec's short name, e.g. `"NBD_EPERM"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Perm => "NBD_EPERM",
            Self::Io => "NBD_EIO",
            Self::NoMemory => "NBD_ENOMEM",
            Self::Invalid => "NBD_EINVAL",
            Self::NoSpace => "NBD_ENOSPC",
            Self::Overflow => "NBD_EOVERFLOW",
            Self::NotSupported => "NBD_ENOTSUP",
            Self::Shutdown => "NBD_ESHUTDOWN",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
