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
//! TLS on [`Event::StartTls`]), `NBD_OPT_EXTENDED_HEADERS` (falling back to
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

mod config;
mod connection;
mod coverage;
mod error;
mod event;
mod inflight;
mod negotiation;
mod output;
mod replies;
mod requests;

pub use crate::shape::{RequestId, TlsPolicy};
pub use config::{Config, ConfigError, Mode};
pub use connection::Connection;
pub use error::{ProtocolError, UsageError};
pub use event::{Descriptors, Event, ExportInfo, Step};
pub use output::{Payload, Transmit};

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
