//! `no_std` shell that runs the NBD core on microcontrollers.
//!
//! Not implemented yet. This crate will hold:
//!
//! - a server loop over a [smoltcp] TCP socket (and `embedded-io` streams),
//!   feeding received bytes to `nbd_core`'s server state machine and
//!   sending the headers and payloads it asks for;
//! - a block-device trait with an SD-card implementation over SPI
//!   (`embedded-sdmmc`), so a board can export its card;
//! - `defmt` logging (feature `defmt`, forwarded to `nbd-core/defmt`).
//!
//! It builds today for `thumbv6m-none-eabi` and `thumbv7em-none-eabihf`.
//!
//! [smoltcp]: https://docs.rs/smoltcp
#![no_std]
#![forbid(unsafe_code)]

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;
