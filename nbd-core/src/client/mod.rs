//! The per-connection client state machine.
//!
//! A [`Connection`] is driven by its shell through the same calls as the
//! [server](crate::server), after the shape of rustls's unbuffered API and
//! quinn-proto:
//!
//! - [`Connection::process`] takes the bytes the server sent and returns
//!   how many it consumed and at most one [`Event`]. Read data comes out as
//!   [`Event::ReadData`] slices of the caller's input, never copied; block
//!   status descriptors as [`Event::BlockStatus`] slices too. The shell
//!   handles the event, drops the consumed bytes and calls again. No event
//!   means all of the input was consumed (or the session is over).
//! - [`Connection::poll_transmit`] returns the next message to send: the
//!   client flags, an option, or a request header the core encoded, and
//!   for a write which shell-owned payload follows ([`Payload::Data`]).
//! - the command methods ([`Connection::read`], [`Connection::write`],
//!   [`Connection::flush`], …) queue requests once [`Event::Ready`] came;
//!   each returns a [`RequestId`] that the request's events carry, and the
//!   request ends with exactly one [`Event::Done`]. Requests complete in
//!   any order.
//!
//! A shell's loop, with the export mirrored in `disk`:
//!
//! ```no_run
//! use nbd_core::client::{Event, Payload, ProtocolError, StdConnection};
//! use nbd_core::wire::CommandFlags;
//!
//! /// Handles the server bytes in `input`, then sends what is due.
//! fn round(
//!     conn: &mut StdConnection,
//!     input: &mut Vec<u8>,
//!     send: &mut impl FnMut(&[u8]),
//!     disk: &mut [u8],
//! ) -> Result<(), ProtocolError> {
//!     loop {
//!         let step = conn.process(input)?;
//!         let consumed = step.consumed;
//!         let Some(event) = step.event else { break };
//!         match event {
//!             Event::Ready => {
//!                 let _ = conn.read(0, 4096, CommandFlags::empty());
//!             }
//!             Event::ReadData { offset, data, .. } => {
//!                 disk[offset as usize..][..data.len()].copy_from_slice(data);
//!             }
//!             Event::Done { id, result } => { /* request `id` ended */ }
//!             _ => {}
//!         }
//!         input.drain(..consumed);
//!     }
//!     while let Some(transmit) = conn.poll_transmit() {
//!         for part in transmit.parts {
//!             send(part);
//!         }
//!         if let Some(Payload::Data { offset, length, .. }) = transmit.payload {
//!             send(&disk[offset as usize..][..length as usize]);
//!         }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! Negotiation follows the [`Config`]: fixed newstyle only (oldstyle and
//! non-fixed servers are refused with a [`ProtocolError`]), `NO_ZEROES`
//! when offered, `NBD_OPT_STARTTLS` first when asked for (the shell starts
//! TLS on [`Event::TlsStart`]), `NBD_OPT_EXTENDED_HEADERS` (falling back to
//! `NBD_OPT_STRUCTURED_REPLY` when refused), `NBD_OPT_SET_META_CONTEXT`,
//! then `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` when the server
//! does not know it). [`Mode::Info`] and [`Mode::List`] query the server
//! with `NBD_OPT_INFO`/`NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_LIST` and
//! end with `NBD_OPT_ABORT`.
//!
//! The client never sends what the server did not advertise: a command or
//! flag the transmission flags do not expose, a range past the export's end,
//! misaligned to the minimum block size, or longer than the maximum, is
//! refused locally with a [`UsageError`]. A server that breaks the protocol
//! ends the connection with a [`ProtocolError`], never a panic.
//!
//! Memory is fixed by two const parameters: `REQUESTS`, the most requests in
//! flight, and `BUFFER`, the bytes that hold the export name and the meta
//! context queries (copied from the [`Config`]) and, after them, the data
//! of one option reply. Option replies longer than what is left are refused
//! with [`ProtocolError::ReplyTooLong`], except error messages and
//! `NBD_INFO_NAME`/`NBD_INFO_DESCRIPTION` strings, which are dropped.
//!
//! Structured reads are checked to cover the request exactly once: every
//! chunk lies inside the request, no two overlap, and at the final chunk
//! the whole range was covered (unless an error chunk came). The check
//! keeps, per read, up to [`MAX_READ_FRAGMENTS`] disjoint covered ranges
//! (adjacent chunks merge into one, so a server sending chunks in order, in
//! reverse, or in a few interleaved streams never comes near it); a server
//! fragmenting a read beyond that is refused with
//! [`ProtocolError::TooFragmented`]. Error offsets are checked to lie inside
//! the request; content chunks after an error chunk are accepted (they may
//! not overlap earlier content), and the read then fails with the error.
//!
//! A request's cookie on the wire is its [`RequestId`], so replies are
//! matched without a search, and one for a request not in flight (never
//! sent, already done) is refused. Replies to `NBD_OPT_*` must come after
//! the option was handed out by `poll_transmit`: a shell sends what is due
//! before reading more.

mod connection;
mod coverage;
mod inflight;
mod negotiation;
mod output;
mod replies;
mod requests;

pub use connection::Connection;
pub use inflight::RequestId;

use crate::export::Features;
use crate::wire::{
    BlockSizeConstraints, ChunkType, Command, CommandFlags, ErrorCode, ExtDescriptor,
    HandshakeFlags, Info, OptionCode, OptionReplyType, TransmissionFlags,
};

/// A connection sized for an operating system: 128 requests in flight and
/// 16 KiB for the export name, queries and option replies (every string the
/// spec allows fits).
pub type StdConnection = Connection<128, 16384>;

/// A connection sized for a microcontroller: 16 requests in flight and 320
/// bytes for the export name, queries and option replies.
pub type SmallConnection = Connection<16, 320>;

/// The `base:allocation` metadata context (spec: "Metadata querying").
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Most metadata contexts the client tracks from `NBD_OPT_SET_META_CONTEXT`;
/// a server selecting more is refused with
/// [`ProtocolError::TooManyMetaContexts`].
pub const MAX_META_CONTEXTS: usize = 8;

/// Most disjoint covered ranges tracked per structured read (see the
/// [module docs](self)).
pub const MAX_READ_FRAGMENTS: usize = 4;

/// Fewest bytes of `BUFFER` left for option replies after the export name
/// and queries; [`Connection::new`] refuses a configuration leaving less.
pub const MIN_REPLY_SPACE: usize = 64;

/// Whether to start TLS (spec: "TLS support", client-side requirements).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TlsPolicy {
    /// Never send `NBD_OPT_STARTTLS`.
    #[default]
    Disabled,
    /// Send `NBD_OPT_STARTTLS` first; go on in clear if the server refuses.
    Optional,
    /// Send `NBD_OPT_STARTTLS` first; end the session if the server refuses.
    Required,
}

/// What the negotiation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mode {
    /// Select the export with `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) and
    /// enter transmission.
    #[default]
    Go,
    /// Describe the export with `NBD_OPT_INFO` (and its metadata contexts
    /// with `NBD_OPT_LIST_META_CONTEXT`), then end with `NBD_OPT_ABORT`.
    Info,
    /// List the exports with `NBD_OPT_LIST`, then end with `NBD_OPT_ABORT`.
    List,
}

/// What the client asks for during negotiation. Strings are copied into the
/// connection by [`Connection::new`], so a `Config` may borrow short-lived
/// data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config<'a> {
    /// Export to select or describe; empty for the server's default export.
    pub export_name: &'a str,
    /// What the negotiation is for.
    pub mode: Mode,
    /// TLS.
    pub tls: TlsPolicy,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
    /// Ask for extended headers first (`NBD_OPT_EXTENDED_HEADERS`); if the
    /// server refuses, structured replies are asked for instead.
    pub extended_headers: bool,
    /// Metadata context queries for `NBD_OPT_SET_META_CONTEXT` (in
    /// [`Mode::Go`], when structured replies were negotiated; none sends no
    /// option) or `NBD_OPT_LIST_META_CONTEXT` (in [`Mode::Info`]; none asks
    /// for every context).
    pub meta_contexts: &'a [&'a str],
    /// Ask for `NBD_INFO_NAME` with `NBD_OPT_GO`/`NBD_OPT_INFO`.
    pub request_name: bool,
    /// Ask for `NBD_INFO_DESCRIPTION`.
    pub request_description: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE`, promising to honour the constraints
    /// (the client honours whatever the server sends, asked for or not).
    pub request_block_size: bool,
}

impl<'a> Config<'a> {
    /// Selects `export_name` with every feature the client supports:
    /// extended headers (or structured replies), `base:allocation`, block
    /// sizes; no TLS.
    pub const fn new(export_name: &'a str) -> Self {
        Self {
            export_name,
            mode: Mode::Go,
            tls: TlsPolicy::Disabled,
            structured_replies: true,
            extended_headers: true,
            meta_contexts: &[BASE_ALLOCATION],
            request_name: false,
            request_description: false,
            request_block_size: true,
        }
    }

    /// Plain simple replies: no structured replies, no extended headers, no
    /// metadata contexts.
    #[must_use]
    pub const fn simple(mut self) -> Self {
        self.structured_replies = false;
        self.extended_headers = false;
        self.meta_contexts = &[];
        self
    }

    /// With another mode.
    #[must_use]
    pub const fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// With a TLS policy.
    #[must_use]
    pub const fn with_tls(mut self, tls: TlsPolicy) -> Self {
        self.tls = tls;
        self
    }

    /// With these metadata context queries.
    #[must_use]
    pub const fn with_meta_contexts(mut self, queries: &'a [&'a str]) -> Self {
        self.meta_contexts = queries;
        self
    }
}

impl Default for Config<'_> {
    fn default() -> Self {
        Self::new("")
    }
}

/// Why [`Connection::new`] refused a [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigError {
    /// A name or query is longer than the spec's 4096 bytes.
    StringTooLong,
    /// The export name and queries leave less than [`MIN_REPLY_SPACE`]
    /// bytes of `BUFFER`; `needed` is the smallest `BUFFER` that works.
    BufferTooSmall {
        /// Smallest buffer for this configuration.
        needed: usize,
    },
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::StringTooLong => f.write_str("export name or query longer than 4096 bytes"),
            Self::BufferTooSmall { needed } => {
                write!(f, "connection buffer too small: {needed} bytes needed")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ConfigError {}

/// The result of one [`Connection::process`] call.
#[derive(Debug)]
pub struct Step<'a> {
    /// Bytes of the input consumed; the shell drops them.
    pub consumed: usize,
    /// What the shell must act on, if anything.
    pub event: Option<Event<'a>>,
}

/// What the export offers, as negotiated. Block sizes are the server's
/// (`NBD_INFO_BLOCK_SIZE`) or the spec's defaults (1, 4096, 32 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExportInfo {
    /// Size in bytes (it changes with `NBD_CMD_RESIZE`).
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints the client honours.
    pub block_sizes: BlockSizeConstraints,
    /// Whether the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes_advertised: bool,
    /// Features negotiated.
    pub features: Features,
}

impl ExportInfo {
    fn has(&self, flag: TransmissionFlags) -> bool {
        self.flags.contains(flag)
    }
    /// `NBD_FLAG_READ_ONLY`: writes, trims, zeroing and resizing are refused.
    pub fn is_read_only(&self) -> bool {
        self.has(TransmissionFlags::READ_ONLY)
    }
    /// `NBD_CMD_FLUSH` may be sent.
    pub fn can_flush(&self) -> bool {
        self.has(TransmissionFlags::SEND_FLUSH)
    }
    /// `NBD_CMD_FLAG_FUA` may be set.
    pub fn can_fua(&self) -> bool {
        self.has(TransmissionFlags::SEND_FUA)
    }
    /// `NBD_CMD_TRIM` may be sent.
    pub fn can_trim(&self) -> bool {
        self.has(TransmissionFlags::SEND_TRIM) && !self.is_read_only()
    }
    /// `NBD_CMD_WRITE_ZEROES` may be sent.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TransmissionFlags::SEND_WRITE_ZEROES) && !self.is_read_only()
    }
    /// `NBD_CMD_FLAG_FAST_ZERO` may be set on `NBD_CMD_WRITE_ZEROES`.
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.has(TransmissionFlags::SEND_FAST_ZERO)
    }
    /// `NBD_CMD_CACHE` may be sent.
    pub fn can_cache(&self) -> bool {
        self.has(TransmissionFlags::SEND_CACHE)
    }
    /// `NBD_CMD_RESIZE` may be sent.
    pub fn can_resize(&self) -> bool {
        self.has(TransmissionFlags::SEND_RESIZE) && !self.is_read_only()
    }
    /// `NBD_CMD_FLAG_DF` may be set on reads.
    pub fn can_df(&self) -> bool {
        self.has(TransmissionFlags::SEND_DF) && self.features.structured_replies
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`: several connections may share the export.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TransmissionFlags::CAN_MULTI_CONN)
    }
    /// `NBD_FLAG_ROTATIONAL`
    pub fn is_rotational(&self) -> bool {
        self.has(TransmissionFlags::ROTATIONAL)
    }
}

/// Block status descriptors of one [`Event::BlockStatus`], as received
/// (compact 8-byte or extended 16-byte ones), already checked: nonzero
/// lengths, inside the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptors<'a> {
    bytes: &'a [u8],
    extended: bool,
}

impl<'a> Descriptors<'a> {
    pub(crate) fn new(bytes: &'a [u8], extended: bool) -> Self {
        Self { bytes, extended }
    }

    /// Bytes one descriptor takes: 8, or 16 with extended headers.
    pub fn item_len(&self) -> usize {
        if self.extended { 16 } else { 8 }
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.item_len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The descriptors in export order, widened to 64 bits.
    pub fn iter(&self) -> impl Iterator<Item = ExtDescriptor> + 'a {
        let extended = self.extended;
        let len = self.item_len();
        self.bytes
            .chunks_exact(len)
            .map(move |item| parse_descriptor(item, extended))
    }
}

/// One descriptor from exactly 8 or 16 bytes.
pub(crate) fn parse_descriptor(item: &[u8], extended: bool) -> ExtDescriptor {
    let field = |range: core::ops::Range<usize>| {
        item.get(range).map_or(0, |b| {
            b.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        })
    };
    if extended {
        ExtDescriptor {
            length: field(0..8),
            status: field(8..16),
        }
    } else {
        ExtDescriptor {
            length: field(0..4),
            status: field(4..8),
        }
    }
}

/// What the shell must act on.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The server greeted with fixed newstyle negotiation; the client flags
    /// and the first option are ready in `poll_transmit`.
    Greeted {
        /// Handshake flags the server offered.
        flags: HandshakeFlags,
    },
    /// `NBD_OPT_STARTTLS` was acknowledged: the shell runs the TLS handshake
    /// now, before sending anything else, and from then on feeds the core
    /// decrypted bytes and encrypts what `poll_transmit` returns. Bytes
    /// after the acknowledgement in the same input were not consumed.
    /// Negotiation starts afresh, as the spec requires.
    TlsStart,
    /// One `NBD_REP_SERVER` reply to `NBD_OPT_LIST`.
    ListEntry {
        /// Export name.
        name: &'a [u8],
        /// Description for humans (possibly empty).
        description: &'a [u8],
    },
    /// One `NBD_REP_META_CONTEXT` reply: a context selected by
    /// `NBD_OPT_SET_META_CONTEXT` (with the id block status replies use),
    /// or listed by `NBD_OPT_LIST_META_CONTEXT` (id 0).
    MetaContext {
        /// Context id.
        id: u32,
        /// Context name.
        name: &'a [u8],
    },
    /// One `NBD_REP_INFO` reply to `NBD_OPT_GO`/`NBD_OPT_INFO`, as received
    /// (unknown types included).
    Info(Info<'a>),
    /// The export is described: after `NBD_OPT_GO` or `NBD_OPT_INFO` was
    /// acknowledged, or `NBD_OPT_EXPORT_NAME` answered.
    Export(ExportInfo),
    /// Transmission began: commands may be issued.
    Ready,
    /// The server refused an option the session cannot go on without
    /// (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, a required
    /// `NBD_OPT_STARTTLS`, or any option with `NBD_REP_ERR_SHUTDOWN`). The
    /// core sends `NBD_OPT_ABORT` next and then reports [`Event::Closed`].
    OptionRefused {
        /// The option.
        option: OptionCode,
        /// The error reply type.
        reply_type: OptionReplyType,
        /// The server's message for humans (empty if it did not fit).
        message: &'a [u8],
    },
    /// A piece of a read's data, as a slice of the caller's input, for
    /// export offset `offset`. Pieces of one read may come in any order.
    ReadData {
        /// The read.
        id: RequestId,
        /// Export offset of `data`.
        offset: u64,
        /// The bytes read.
        data: &'a [u8],
    },
    /// A range of a read that reads as zeroes (`NBD_REPLY_TYPE_OFFSET_HOLE`).
    ReadHole {
        /// The read.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Bytes of zeroes.
        length: u64,
    },
    /// Block status descriptors for one metadata context, starting at
    /// export offset `offset`. One chunk may come as several events.
    BlockStatus {
        /// The request.
        id: RequestId,
        /// Metadata context id (see [`Event::MetaContext`]).
        context_id: u32,
        /// Export offset of the first descriptor.
        offset: u64,
        /// The descriptors.
        descriptors: Descriptors<'a>,
    },
    /// The request ended: successfully, or with the server's error. Its
    /// id may be reused from now on. For a read, success means every byte
    /// of the range came as [`Event::ReadData`] or [`Event::ReadHole`].
    Done {
        /// The request.
        id: RequestId,
        /// Its outcome.
        result: Result<(), ErrorCode>,
    },
    /// The session ended cleanly (`NBD_OPT_ABORT` acknowledged, or
    /// `NBD_CMD_DISC` sent and every request answered). The shell shuts
    /// TLS down if running and closes.
    Closed,
}

/// One message to send: `parts` in order (empty ones skipped), then the
/// shell-owned `payload`, if any. The core counts it as sent once returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Bytes the core encoded, and strings copied from the [`Config`].
    pub parts: [&'a [u8]; 3],
    /// What the shell appends after the parts.
    pub payload: Option<Payload>,
}

impl Transmit<'_> {
    /// Total bytes of `parts`.
    pub fn parts_len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
}

/// Shell-owned bytes that follow a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Payload {
    /// The data of write `id`: `length` bytes for export offset `offset`.
    Data {
        /// The write.
        id: RequestId,
        /// Export offset of the first byte.
        offset: u64,
        /// Bytes to send.
        length: u64,
    },
}

/// Why a command was refused locally; nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum UsageError {
    /// Transmission has not begun (wait for [`Event::Ready`]).
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
    /// More metadata contexts selected than [`MAX_META_CONTEXTS`].
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
    /// [`MAX_READ_FRAGMENTS`].
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
