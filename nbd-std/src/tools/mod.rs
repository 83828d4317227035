//! The client commands of the `nbd-std` tool, as library functions the
//! binary calls (and tests and other programs can too):
//!
//! - [`info`]: `nbd-std info`, what `nbdinfo` prints;
//! - [`map`]: `nbd-std info --map`, `--size`, `--can`, `--is`;
//! - [`copy`]: `nbd-std cp`, copies between files, standard input/output
//!   and NBD exports;
//! - [`mount`]: `nbd-std mount`, an export as a file through FUSE.
pub mod copy;
pub mod info;
pub mod map;
#[cfg(feature = "mount")]
pub mod mount;
