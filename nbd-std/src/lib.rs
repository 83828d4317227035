//! std shell for the NBD core.
//!
//! Not implemented yet. This crate will hold the TCP and unix-socket
//! server, the storage backends (memory, file), client commands, a
//! WebSocket bridge, and the `nbd-std` command-line tool built on them.

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;
