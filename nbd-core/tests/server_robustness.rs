//! Arbitrary client bytes, input splits and completion orders against the
//! server state machine (the same driver as the `server` fuzz target).

mod fuzz_driver;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("NBD_ROBUSTNESS_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2048),
        ..ProptestConfig::default()
    })]

    #[test]
    fn server_survives_arbitrary_conversations(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_driver::run(&data);
    }
}

/// Each setup bit on its own, with a long well-formed conversation.
#[test]
fn every_setup_with_a_fixed_conversation() {
    for setup in 0..=255u8 {
        for handshake in [0x00u8, 0x1f, 0x02, 0x06, 0x0a, 0x0e] {
            let mut data = vec![setup, handshake];
            for round in 0..40u8 {
                // request, feed, complete, drain, in a rotating pattern
                data.extend_from_slice(&[
                    0,
                    round % 10,
                    round.wrapping_mul(7) & 0x3f,
                    0,
                    0,
                    round,
                    0,
                    4,
                ]);
                data.extend_from_slice(&[3, 0x08, 0x00, 5, round, round.wrapping_mul(3), 7]);
            }
            fuzz_driver::run(&data);
        }
    }
}
