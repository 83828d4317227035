//! Arbitrary server bytes, input splits and call sequences against the
//! client state machine (the same driver as the `client` fuzz target).

mod client_fuzz_driver;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("NBD_ROBUSTNESS_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1024),
        ..ProptestConfig::default()
    })]

    #[test]
    fn client_survives_arbitrary_servers(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        client_fuzz_driver::run(&data);
    }
}

/// The driver itself: random cases must reach transmission and finish
/// requests often enough for the invariants to mean something.
#[test]
fn random_cases_reach_deep_states() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut totals = client_fuzz_driver::Stats::default();
    let mut errors = std::collections::BTreeMap::new();
    let (mut ready, mut failed, cases) = (0, 0, 400);
    for _ in 0..cases {
        let data: Vec<u8> = (0..1500)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let stats = client_fuzz_driver::run_with_stats(&data);
        ready += usize::from(stats.ready);
        failed += usize::from(stats.failed);
        *errors.entry(format!("{:?}", stats.error)).or_insert(0) += 1;
        totals.issued += stats.issued;
        totals.done += stats.done;
        totals.content += stats.content;
    }
    println!(
        "{cases} cases: {ready} reached transmission, {failed} ended in a protocol error; \
         {} requests issued, {} done, {} content events",
        totals.issued, totals.done, totals.content
    );
    println!("errors: {errors:?}");
    assert!(ready * 4 >= cases, "too few cases reach transmission");
    assert!(
        totals.done >= 500 && totals.content >= 1000,
        "too few requests finish"
    );
}
