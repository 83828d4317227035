//! # nbd-core
//!
//! A `no_std`, sans-IO implementation of the Network Block Device protocol
//! (`doc/proto.md` of NetworkBlockDevice/nbd, with extended headers).
//!
//! The crate knows NBD and nothing about sockets, threads, clocks,
//! allocators or storage. A shell feeds it the bytes a peer sent, carries
//! out the storage requests it emits, and sends the bytes it produces:
//!
//! - [`wire`]: a parser and an encoder for every message of the protocol;
//! - [`export`]: what a server offers (the catalog a shell provides), from
//!   which transmission flags are derived;
//! - [`server`]: the per-connection server state machine;
//! - [`client`]: the per-connection client state machine;
//! - [`shape`]: the types both state machines share.
//!
//! Memory is bounded and fixed at compile time through const generics; no
//! bulk payload is ever copied: write payloads are handed out as slices of
//! the caller's input, read payloads are sent by the shell after the core's
//! header.
//!
//! # Features
//!
//! None is on by default; with none the crate builds for any target with
//! `core`.
//!
//! - `alloc`: catalogs over `Vec` and owned export descriptions.
//! - `std`: `std::error::Error` for the error types; implies `alloc`.
//! - `log`: logs through the `log` facade (std shells forward it to
//!   `tracing`).
//! - `defmt`: logs through `defmt` (microcontrollers). `defmt` and `log`
//!   exclude each other: enabling both is a compile error.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("features `defmt` and `log` are mutually exclusive: pick one logging backend");

#[macro_use]
mod log;

pub mod client;
pub mod export;
pub mod server;
pub mod shape;
pub mod wire;
