#!/usr/bin/env bash
# Line and region coverage of nbd-core/src/wire reached by the
# conversation tests (every nbd-core integration test except the wire
# round-trip suite), then by the round-trip suite alone. It shows whether
# the codec the tests exercise is the one the state machines use.
#
# Needs the llvm-tools component (rustup component add llvm-tools).
# Builds into target/coverage so the normal build stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."

sysroot=$(rustc --print sysroot)
llvm_bin="$sysroot/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin"
for tool in llvm-profdata llvm-cov; do
    [ -x "$llvm_bin/$tool" ] || { echo "missing $tool: rustup component add llvm-tools" >&2; exit 1; }
done

target_dir=target/coverage
profiles=$target_dir/profiles
rm -rf "$profiles"
mkdir -p "$profiles"
export RUSTFLAGS="-C instrument-coverage"
export CARGO_TARGET_DIR=$target_dir

# Test binaries of nbd-core, one per integration test file.
mapfile -t binaries < <(
    cargo test -p nbd-core --tests --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["kind"] == ["test"] and msg["package_id"].find("nbd-core") >= 0:
        print(msg["target"]["name"] + " " + msg["executable"])
'
)

report() {
    local label=$1 filter=$2
    local first="" objects=()
    for entry in "${binaries[@]}"; do
        local name=${entry%% *} exe=${entry#* }
        [ "$filter" = roundtrip ] && [ "$name" != wire_roundtrip ] && continue
        [ "$filter" = conversation ] && [ "$name" = wire_roundtrip ] && continue
        mkdir -p "$profiles/$filter"
        LLVM_PROFILE_FILE="$profiles/$filter/$name-%p-%m.profraw" "$exe" -q >/dev/null 2>&1 ||
            { echo "test binary $name failed" >&2; exit 1; }
        # llvm-cov takes the first binary bare, the others with --object.
        if [ -z "$first" ]; then first=$exe; else objects+=(--object "$exe"); fi
    done
    "$llvm_bin/llvm-profdata" merge -sparse "$profiles/$filter"/*.profraw -o "$profiles/$filter.profdata"
    echo "== nbd-core/src/wire covered by the $label =="
    "$llvm_bin/llvm-cov" report --instr-profile "$profiles/$filter.profdata" "$first" "${objects[@]}" \
        --sources "$(pwd)/nbd-core/src/wire" |
        sed "s|$(pwd)/||"
}

report "conversation tests (all nbd-core tests but wire_roundtrip)" conversation
report "wire round-trip suite" roundtrip
