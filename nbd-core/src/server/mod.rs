//! The per-connection server state machine.
//!
//! A [`Connection`] is driven by its shell through four calls, after the
//! shape of rustls's unbuffered API and quinn-proto:
//!
//! - [`Connection::process`] takes the bytes the client sent and returns how
//!   many it consumed and at most one [`Event`]; a write payload comes out
//!   as [`Event::WriteData`] slices of the caller's input, never copied.
//!   The shell handles the event, drops the consumed bytes and calls again.
//!   No event means nothing more can happen with this input now: all of it
//!   was consumed, or the connection waits on the shell (replies to send,
//!   requests to complete).
//! - [`Connection::poll_transmit`] returns the next message to send: small
//!   header bytes the core encoded, strings borrowed from the catalog, and
//!   which shell-owned payload follows (read data, by request id).
//! - [`Connection::complete`] (and its read and block-status variants) give
//!   the outcome of a storage request, in any order.
//! - [`Connection::shutdown`] starts a graceful stop.
//!
//! Memory is fixed by two const parameters: `REQUESTS`, the most requests in
//! flight, and `BUFFER`, the bytes kept for option data during negotiation
//! and for block-status descriptors during transmission. Options longer
//! than `BUFFER` are refused with `NBD_REP_ERR_TOO_BIG` without being
//! buffered.

mod connection;
mod inflight;
mod negotiation;
mod output;
mod transmission;

pub use crate::shape::{RequestId, TlsPolicy};
pub use connection::Connection;

use crate::export::Features;
use crate::wire::{ErrorCode, TransmissionFlags, WireError};

/// A connection sized for a server on an operating system: 128 requests in
/// flight, 16 KiB for options and block status.
pub type StdConnection<C> = Connection<C, 128, 16384>;

/// A connection sized for a microcontroller: 16 requests in flight and 320
/// bytes for options (longer options get `NBD_REP_ERR_TOO_BIG`) and block
/// status.
pub type SmallConnection<C> = Connection<C, 16, 320>;

/// Settings of one connection, chosen by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// TLS handling.
    pub tls: TlsPolicy,
    /// Most requests in flight at once (at most the `REQUESTS` parameter);
    /// beyond it the connection stops reading requests until one completes.
    pub max_in_flight: usize,
    /// Longest option data accepted before the connection is closed as a
    /// denial of service. Options longer than the buffer but within this
    /// limit are skipped and refused per spec.
    pub max_option_length: u32,
    /// Longest payload of a rejected request the connection reads and
    /// throws away to stay in sync; a longer one closes the connection.
    pub max_discard: u64,
    /// Refuse `NBD_OPT_GO` without an `NBD_INFO_BLOCK_SIZE` request
    /// (`NBD_REP_ERR_BLOCK_SIZE_REQD`) for exports whose minimum block size
    /// is above 1. Off by default: the spec advises serving such clients.
    pub require_block_size_request: bool,
    /// Longest read or write accepted from a client that did not ask for
    /// the block size constraints (`NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO`
    /// without `NBD_INFO_BLOCK_SIZE`): such a client cannot know the
    /// advertised maximum, so the spec's "effectively unlimited" default
    /// applies up to this cap. Never below the export's advertised maximum.
    pub max_request_length: u32,
}

/// Default [`Config::max_request_length`]: 64 MiB, nbdkit's limit, enough
/// for the reference test suite's largest requests (47.6 MiB).
pub const DEFAULT_MAX_REQUEST_LENGTH: u32 = 64 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            tls: TlsPolicy::Disabled,
            max_in_flight: usize::MAX,
            max_option_length: 64 * 1024 * 1024,
            max_discard: 64 * 1024 * 1024,
            require_block_size_request: false,
            max_request_length: DEFAULT_MAX_REQUEST_LENGTH,
        }
    }
}

/// The result of one [`Connection::process`] call.
pub type Step<'a> = crate::shape::Step<Event<'a>>;

/// What the shell must act on.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// Negotiation ended and transmission begins on this export (after
    /// `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`). The shell binds its storage.
    ExportSelected {
        /// Index of the export in the catalog.
        index: usize,
        /// Its size at selection.
        size: u64,
        /// Transmission flags sent to the client.
        flags: TransmissionFlags,
        /// Features negotiated.
        features: Features,
    },
    /// `NBD_OPT_STARTTLS` was acknowledged (and the acknowledgement already
    /// handed to the shell): the shell starts the TLS handshake now and
    /// from then on feeds the core decrypted bytes. Earlier negotiation
    /// state is forgotten, as the spec requires.
    StartTls,
    /// A storage request.
    Request(Request),
    /// A piece of a write's payload, as a slice of the caller's input.
    /// `remaining` is what is still to come; at zero the payload is whole
    /// and the shell completes the write once it is stored.
    WriteData {
        /// The write.
        id: RequestId,
        /// Export offset of `data`.
        offset: u64,
        /// The bytes to store.
        data: &'a [u8],
        /// Payload bytes of this write still to come.
        remaining: u64,
    },
    /// The session is over (soft disconnect: `NBD_OPT_ABORT` or
    /// `NBD_CMD_DISC`, after every reply was handed to the shell). The shell
    /// sends what it still holds, shuts TLS down if running, and closes.
    Closed(CloseReason),
}

/// Why a connection ends cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT`.
    Abort,
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// [`Connection::shutdown`] was called and nothing is left in flight.
    Shutdown,
}

/// A storage request the shell carries out, then answers with
/// [`Connection::complete`] (or the read and block-status variants).
/// Requests are already validated: in range, aligned, allowed by the
/// export's capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Request {
    /// `NBD_CMD_READ`: answer with [`Connection::complete_read`].
    Read {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Bytes to read (nonzero, at most the export's maximum block size).
        length: u64,
    },
    /// `NBD_CMD_WRITE`: the payload follows as [`Event::WriteData`].
    Write {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Payload length (nonzero).
        length: u64,
        /// Data must be durable before the reply (`NBD_CMD_FLAG_FUA`).
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`: every write completed so far must become durable.
    /// Emitted only after every earlier write on this connection completed.
    Flush {
        /// Request id.
        id: RequestId,
    },
    /// `NBD_CMD_TRIM`: the range may be discarded.
    Trim {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Length (nonzero; may exceed the maximum block size).
        length: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// `NBD_CMD_CACHE`: the client will read this range soon.
    Cache {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Length (nonzero).
        length: u64,
    },
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Length (nonzero).
        length: u64,
        /// Durable before the reply.
        fua: bool,
        /// The range must stay allocated (`NBD_CMD_FLAG_NO_HOLE`).
        no_hole: bool,
        /// Fail with `NBD_ENOTSUP` at once unless zeroing is faster than
        /// writing (`NBD_CMD_FLAG_FAST_ZERO`).
        fast: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: answer with
    /// [`Connection::complete_block_status`].
    BlockStatus {
        /// Request id.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Length of interest (a hint; nonzero).
        length: u64,
        /// Exactly one extent wanted (`NBD_CMD_FLAG_REQ_ONE`).
        req_one: bool,
    },
    /// `NBD_CMD_RESIZE` (experimental RESIZE extension): the new size is
    /// carried in the request's offset field. Emitted once nothing else is
    /// in flight; no other request is read until it completes.
    Resize {
        /// Request id.
        id: RequestId,
        /// Requested export size.
        size: u64,
    },
}

impl Request {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        match *self {
            Self::Read { id, .. }
            | Self::Write { id, .. }
            | Self::Flush { id }
            | Self::Trim { id, .. }
            | Self::Cache { id, .. }
            | Self::WriteZeroes { id, .. }
            | Self::BlockStatus { id, .. }
            | Self::Resize { id, .. } => id,
        }
    }
}

/// How a read completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ReadOutcome {
    /// The data is in the shell's hands: it follows the reply header as
    /// [`Payload::Data`].
    Data,
    /// The whole range reads as zeroes: a hole chunk with structured
    /// replies, [`Payload::Zeroes`] with simple replies.
    Zeroes,
    /// The shell will produce the data while sending it (streaming from a
    /// card); the reply stays open until [`Connection::finish_streamed_read`].
    Streamed,
    /// The read failed.
    Error(ErrorCode),
}

/// One message to send: header bytes the core encoded and strings
/// borrowed from the catalog, then the shell's [`Payload`].
pub type Transmit<'a> = crate::shape::Transmit<'a, Payload>;

/// Shell-owned bytes that follow a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Payload {
    /// The read data of request `id`: `length` bytes of the export from
    /// `offset`.
    Data {
        /// The read.
        id: RequestId,
        /// Export offset of the first byte.
        offset: u64,
        /// Bytes to send.
        length: u64,
    },
    /// `length` zero bytes (a hole read answered with a simple reply).
    Zeroes {
        /// Bytes to send.
        length: u64,
    },
}

/// Why the connection must end now, without a goodbye (hard disconnect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ProtocolError {
    /// A magic number was wrong: the stream cannot be trusted any more.
    BadMagic {
        /// What was found (widened).
        found: u64,
    },
    /// A message that parses as no valid one (other than by its magic):
    /// the wire layer's reason, such as the field it refuses.
    Malformed(WireError),
    /// The client set client flags the server does not know or did not offer.
    UnknownClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` named no export; the option cannot fail any other way.
    UnknownExport,
    /// `NBD_OPT_EXPORT_NAME` after extended headers were negotiated, which
    /// requires `NBD_OPT_GO`.
    ExportNameWithExtendedHeaders,
    /// TLS is required but the client went on without it where no error
    /// reply is possible.
    TlsRequired,
    /// An option's data is longer than `Config::max_option_length`.
    OptionTooLong {
        /// Its announced length.
        length: u32,
    },
    /// A rejected request's payload is too long to read and discard.
    PayloadTooLong {
        /// Its announced length.
        length: u64,
    },
    /// More requests arrived than the table holds (cannot happen: input
    /// stops while the table is full).
    TooManyRequests,
    /// `process` was called after the connection ended.
    Closed,
    /// The client closed the connection before ending the session (see
    /// [`Connection::end_of_input`]).
    UnexpectedEof,
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic { found } => write!(f, "bad magic number {found:#x} from client"),
            Self::Malformed(error) => write!(f, "malformed message from client: {error}"),
            Self::UnknownClientFlags(bits) => {
                write!(f, "client sent unknown client flags {bits:#x}")
            }
            Self::UnknownExport => f.write_str("NBD_OPT_EXPORT_NAME named an unknown export"),
            Self::ExportNameWithExtendedHeaders => {
                f.write_str("NBD_OPT_EXPORT_NAME used after extended headers were negotiated")
            }
            Self::TlsRequired => {
                f.write_str("client did not start TLS, which this server requires")
            }
            Self::OptionTooLong { length } => {
                write!(f, "option data of {length} bytes is too long")
            }
            Self::PayloadTooLong { length } => {
                write!(
                    f,
                    "payload of {length} bytes on a rejected request is too long to discard"
                )
            }
            Self::TooManyRequests => f.write_str("too many requests in flight"),
            Self::Closed => f.write_str("connection already closed"),
            Self::UnexpectedEof => {
                f.write_str("client closed the connection with the session unfinished")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProtocolError {}

/// Why the core refused a completion from the shell. These are bugs in the
/// shell, reported instead of panicking; the connection is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum CompletionError {
    /// No request in flight has this id (never issued, or already answered).
    UnknownRequest,
    /// The request is not of the kind this call completes.
    WrongKind,
    /// A write was completed successfully before its payload was whole.
    PayloadIncomplete,
    /// The request's previous reply has not been taken by `poll_transmit` yet.
    Busy,
    /// The reply cannot be expressed on this connection (a hole without
    /// structured replies is [`ReadOutcome::Zeroes`]'s job; an error after
    /// a simple reply's header was sent needs a hard disconnect).
    NotRepresentable,
    /// Block status without any extent, or with an extent of length zero.
    EmptyExtents,
}

impl core::fmt::Display for CompletionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::UnknownRequest => "no request in flight has this id",
            Self::WrongKind => "completion does not match the request's kind",
            Self::PayloadIncomplete => "write completed before its payload was received",
            Self::Busy => "the request's previous reply has not been transmitted yet",
            Self::NotRepresentable => "this reply cannot be expressed on this connection",
            Self::EmptyExtents => "block status needs at least one extent of nonzero length",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CompletionError {}

/// The payload of the write being received, which the shell may store
/// straight from its transport instead of passing it through
/// [`Connection::process`] ([`Connection::payload_wanted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadWanted {
    /// The write.
    pub id: RequestId,
    /// Export offset of the next payload byte.
    pub offset: u64,
    /// Payload bytes still to come.
    pub remaining: u64,
}

/// [`Connection::payload_taken`] named bytes no payload wanted: none was
/// being received for the shell to store, or fewer bytes remained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadNotWanted;

impl core::fmt::Display for PayloadNotWanted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("no write payload wanted that many bytes")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PayloadNotWanted {}
