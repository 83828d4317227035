//! WebAssembly bindings of the NBD core.
#![no_std]
