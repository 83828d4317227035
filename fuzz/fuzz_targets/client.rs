//! The client state machine under arbitrary server bytes, input splits and
//! call sequences. The driver and its invariants are shared with the
//! `client_robustness` proptest in nbd-core.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../nbd-core/tests/client_fuzz_driver/mod.rs"]
mod client_fuzz_driver;

fuzz_target!(|data: &[u8]| client_fuzz_driver::run(data));
