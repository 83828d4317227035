//! `no_std` shell that runs the NBD core on microcontrollers, without an
//! allocator.
//!
//! - [`storage::BlockStorage`]: an export over an
//!   [`embedded_sdmmc::BlockDevice`] (an SD card, 512-byte blocks) with
//!   byte granularity: one scratch block, read-modify-write at the edges of
//!   unaligned writes, reads streamed block by block
//!   ([`ReadOutcome::Streamed`](nbd_core::server::ReadOutcome::Streamed)),
//!   so a 32 MiB request needs no more RAM than one block. Exports made by
//!   [`BlockStorage::export`] advertise minimum 1, preferred 512, maximum
//!   32 MiB, and `FLUSH`, `FUA`, `WRITE_ZEROES` (not fast), `CACHE`, and `TRIM` when
//!   made by [`BlockStorage::with_erase`] over a device that erases blocks
//!   ([`storage::EraseBlocks`]).
//! - [`io::serve`]: a blocking loop over an `embedded-io` stream (a TCP
//!   socket of a W5500-style chip, a serial link), one client per call.
//! - `io_async::serve` (feature `async`): the same loop over an
//!   `embedded-io-async` stream, for async executors: an `embassy-net`
//!   `TcpSocket` on Embassy (`examples/embassy_tap.rs`).
//! - [`net::TcpServer`]: a non-blocking shell over a smoltcp TCP socket,
//!   one client at a time, re-listening after each, driven by
//!   [`TcpServer::poll`](net::TcpServer::poll) from the application's loop.
//!   For N clients at once where RAM allows: N servers with a socket each
//!   on the same port, sharing one card through [`storage::SharedCard`],
//!   driven by [`net::poll_all`] (see [`net`], "Several clients"; no
//!   `NBD_FLAG_CAN_MULTI_CONN`, see [`storage::SharedCard`]).
//! - `defmt` logging (feature `defmt`, forwarded to `nbd-core`,
//!   `embedded-sdmmc` and `smoltcp`).
//!
//! # Durability
//!
//! `BlockDevice::write` is synchronous: it returns once the card took the
//! block. Every block of a write is written before the write is answered,
//! so `NBD_CMD_FLUSH` (and FUA) is answered only after the card has the
//! data; the card's own write cache, if any, is outside this crate's reach.
//!
//! # Memory
//!
//! Everything is in fixed-size structs; nothing is allocated. Measured with
//! `size_of` on `thumbv6m-none-eabi` and `thumbv7em-none-eabihf` (catalog
//! `&[Export]`, default `REQUESTS = 16`, `BUFFER = 320`):
//!
//! | what | bytes |
//! |---|---|
//! | `BlockStorage<D>` (scratch block + state, plus `D`) | 532 |
//! | `SmallConnection<&[Export]>` (the core, per client) | 1,696 |
//! | `net::TcpServer<&[Export], D>` (all of the above and the shell) | 2,344 |
//! | each further client: `TcpServer<&[Export], SharedCard<D>>` | 2,344 |
//! | and its smoltcp `SocketStorage` slot | 336 |
//!
//! plus the socket buffers the application gives smoltcp (the send buffer
//! must hold the largest message header: `64 + BUFFER` bytes plus the
//! longest export name and description), or for [`io::serve`] the
//! `BlockStorage`, the input buffer the caller passes, and about 1.7 KB of
//! stack for the connection. Each further client also needs its own socket
//! buffers. On a 64-bit host the figures are 536, 1,768, 2,448 and 2,456
//! (printed by `cargo test -p nbd-embedded --test state_size --
//! --nocapture`).
//!
//! `examples/tap_sim.rs` runs [`net::TcpServer`] on a Linux TAP device with
//! a file as the card: a host simulation of a board (docs/EMBEDDED.md).
//!
//! It builds for `thumbv6m-none-eabi` and `thumbv7em-none-eabihf`, with and
//! without `defmt`.
//!
//! # Features
//!
//! - `defmt` (off by default): logs through `defmt`, and turns on the
//!   `defmt` features of `nbd-core`, `embedded-sdmmc` and `smoltcp`.
#![no_std]
#![forbid(unsafe_code)]

#[macro_use]
mod log;
mod driver;
pub mod io;
#[cfg(feature = "async")]
pub mod io_async;
pub mod net;
pub mod storage;

pub use driver::Error;
pub use storage::BlockStorage;

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;
