#!/usr/bin/env bash
# Builds the firmware (release) and runs it in QEMU's LM3S6965 evaluation
# board, with CARD as its SD card and its NBD port forwarded to
# 127.0.0.1:PORT (default 10809). The firmware's defmt log (semihosting) is
# decoded with defmt-print. Stop with Ctrl-C.
#
#   examples/lm3s6965/run-qemu.sh CARD [PORT]
#   nbdinfo nbd://127.0.0.1:PORT/
#
# CARD is a raw image whose size is a power of two (QEMU's SD model insists),
# e.g. `truncate -s 4M card.img`. Needs qemu-system-arm, the
# thumbv7m-none-eabi Rust target and defmt-print
# (`cargo install --locked defmt-print`). CARGO_TARGET_DIR is honoured.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 CARD [PORT]" >&2
    exit 2
fi
card=$1
port=${2:-10809}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ! -f $card ]]; then
    echo "$0: no such card image: $card" >&2
    exit 1
fi
size=$(stat -c %s -- "$card")
if (( size == 0 || (size & (size - 1)) != 0 )); then
    echo "$0: $card is $size bytes; QEMU's SD card needs a power of two (qemu-img resize)" >&2
    exit 1
fi
for tool in qemu-system-arm defmt-print; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$0: $tool is not installed (see docs/EMBEDDED.md)" >&2
        exit 1
    fi
done

(cd "$here" && cargo build --release)
target_dir=${CARGO_TARGET_DIR:-$here/target}
elf=$target_dir/thumbv7m-none-eabi/release/nbd-lm3s6965

echo "serving $card on nbd://127.0.0.1:$port/ (Ctrl-C stops QEMU)" >&2
# Semihosting output (the defmt frames) is QEMU's stdout; QEMU's own
# messages stay on stderr.
qemu-system-arm \
    -M lm3s6965evb \
    -nographic \
    -semihosting-config enable=on,target=native \
    -drive "if=sd,format=raw,file=$card" \
    -nic "user,hostfwd=tcp:127.0.0.1:$port-10.0.2.15:10809" \
    -kernel "$elf" \
    | defmt-print -e "$elf"
