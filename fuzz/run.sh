#!/usr/bin/env bash
# Runs one cargo-fuzz (libFuzzer) target for a bounded time.
#
#   fuzz/run.sh TARGET SECONDS [libFuzzer flags...]
#
# Works on the stable toolchain: cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address), which stable rustc accepts with RUSTC_BOOTSTRAP=1.
# Needs `cargo install --locked cargo-fuzz`.
#
# Corpus: new inputs go to fuzz/target/corpus/TARGET (not committed); the
# committed seeds in fuzz/corpus/TARGET are read only. A crash is saved
# under fuzz/artifacts/TARGET/ and makes this script exit non-zero;
# reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# (from the fuzz/ directory).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 TARGET SECONDS [libFuzzer flags...]" >&2
    exit 2
fi
target=$1
seconds=$2
shift 2

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$fuzz_dir"

if [[ ! -f "fuzz_targets/$target.rs" ]]; then
    echo "run.sh: no fuzz target fuzz_targets/$target.rs" >&2
    exit 2
fi
if ! grep -q "^name = \"$target\"\$" Cargo.toml; then
    echo "run.sh: fuzz_targets/$target.rs has no [[bin]] entry in fuzz/Cargo.toml" \
        "(add one, or create targets with \`cargo fuzz add $target\`)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz is missing: cargo install --locked cargo-fuzz" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
seeds="corpus/$target"
work="target/corpus/$target"
mkdir -p "$seeds" "$work"

cargo fuzz build "$target"
cargo fuzz run "$target" "$work" "$seeds" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$@"
