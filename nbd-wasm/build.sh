#!/usr/bin/env bash
# Builds the wasm package:
#
#   nbd-wasm/build.sh
#
# cargo build for wasm32-unknown-unknown (release; the size profile is
# [profile.release.package.nbd-wasm] in the root Cargo.toml), then
# wasm-bindgen into nbd-wasm/pkg/ (git-ignored):
#
#   pkg/node/  --target nodejs (CommonJS: require("nbd-wasm/pkg/node/nbd_wasm.js"))
#   pkg/web/   --target web    (ES module; call the default export `init` first;
#              nbd-wasm/js/ wraps it for browsers and Node)
#
# wasm-bindgen-cli must be exactly the wasm-bindgen version in Cargo.lock.
# Function names are stripped for size (NBD_WASM_KEEP_NAMES=1 keeps them
# for readable stack traces); wasm-opt (binaryen) shrinks the output
# further when it is installed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

want=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
if [[ -z "$want" ]]; then
    echo "build.sh: no wasm-bindgen in Cargo.lock" >&2
    exit 1
fi
if [[ "$have" != "$want" ]]; then
    echo "build.sh: wasm-bindgen-cli ${have:-not installed} does not match wasm-bindgen $want in Cargo.lock." >&2
    echo "Fix: cargo install --locked wasm-bindgen-cli --version $want" >&2
    echo "(if a locked dependency of the CLI is missing from the registry, retry without --locked)" >&2
    exit 1
fi

cargo build -p nbd-wasm --target wasm32-unknown-unknown --release
target_dir=${CARGO_TARGET_DIR:-$root/target}
wasm=$target_dir/wasm32-unknown-unknown/release/nbd_wasm.wasm

strip=(--remove-producers-section)
if [[ -z "${NBD_WASM_KEEP_NAMES:-}" ]]; then
    strip+=(--remove-name-section)
fi

pkg=$root/nbd-wasm/pkg
rm -rf "$pkg"
wasm-bindgen --target nodejs "${strip[@]}" --out-dir "$pkg/node" "$wasm"
wasm-bindgen --target web "${strip[@]}" --out-dir "$pkg/web" "$wasm"
# nbd-wasm/package.json says "type": "module" (for js/); each build says
# what its .js files are, so Node loads both whatever the parent says.
echo '{ "type": "commonjs" }' >"$pkg/node/package.json"
echo '{ "type": "module" }' >"$pkg/web/package.json"

opt=", no wasm-opt"
if command -v wasm-opt >/dev/null 2>&1; then
    for out in "$pkg"/node/nbd_wasm_bg.wasm "$pkg"/web/nbd_wasm_bg.wasm; do
        wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
            --enable-sign-ext --enable-mutable-globals "$out" -o "$out"
    done
    opt=", wasm-opt -Oz"
fi

size=$(stat -c %s "$pkg/node/nbd_wasm_bg.wasm")
printf 'nbd-wasm: %s (%d bytes, %d KiB)%s\n' "$pkg/node/nbd_wasm_bg.wasm" "$size" "$((size / 1024))" "$opt"
