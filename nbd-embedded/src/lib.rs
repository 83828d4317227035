//! smoltcp and embedded-io shells for the NBD core.
#![no_std]
