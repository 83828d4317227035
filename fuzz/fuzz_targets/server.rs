//! The server state machine under arbitrary client bytes, input splits and
//! completion orders. The driver and its invariants are shared with the
//! `server_robustness` proptest in nbd-core.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../nbd-core/tests/fuzz_driver/mod.rs"]
mod fuzz_driver;

fuzz_target!(|data: &[u8]| fuzz_driver::run(data));
