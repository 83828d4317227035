//! `no_std` shell that runs the NBD core on microcontrollers, without an
//! allocator.
//!
//! - [`storage`]: an export over an [`embedded_sdmmc::BlockDevice`] (an SD
//!   card) with byte granularity, through one 512-byte scratch block;
//! - [`io::serve`]: a blocking loop over an `embedded-io` stream (a TCP
//!   socket of a W5500-style chip, a serial link);
//! - `defmt` logging (feature `defmt`, forwarded to `nbd-core/defmt`).
//!
//! It builds for `thumbv6m-none-eabi` and `thumbv7em-none-eabihf`.
#![no_std]
#![forbid(unsafe_code)]

#[macro_use]
mod log;
mod driver;
pub mod io;
pub mod net;
pub mod storage;

pub use driver::Error;
pub use storage::BlockStorage;

/// TCP port an NBD server listens on unless told otherwise (IANA).
pub const DEFAULT_PORT: u16 = nbd_core::wire::DEFAULT_PORT;
