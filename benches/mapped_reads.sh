#!/bin/bash
# 1 MiB sequential reads at QD8 from one file on disk, nbd-std against
# nbdkit, the file written in 1 MiB writes (the page cache holds it in
# large folios) or in 8 KiB writes (small ones). Prints, for each run,
# MiB/s and the server's CPU in µs a MiB.
#
#   benches/mapped_reads.sh [large|small] [RUNS] [DIR]
#
# Uses target/release/nbd-std (or $NBD_STD), fio, nbdkit and python3; the
# file (1 GiB) goes in DIR (default /var/tmp) and is removed at the end.
# See docs/BENCHMARKS.md ("DAMON and reads sent from a file's mapping").
set -euo pipefail
layout=${1:-large}
runs=${2:-6}
dir=${3:-/var/tmp}
nbd_std=${NBD_STD:-target/release/nbd-std}
file=$dir/nbd-mapped-reads-$$.img
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$file" /tmp/nbd-mapped-reads-$$.json
}
trap cleanup EXIT

case $layout in
    large) chunk=$((1 << 20)) ;;
    small) chunk=$((8 << 10)) ;;
    *) echo "layout is large or small, not $layout" >&2; exit 2 ;;
esac
python3 - "$file" "$chunk" <<'PY'
import os, sys
path, chunk = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
with open(path, "wb", buffering=0) as f:
    for _ in range(1024):
        for at in range(0, len(block), chunk):
            f.write(block[at:at + chunk])
    os.fsync(f.fileno())
PY

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
std_port=$(free_port)
"$nbd_std" serve --port "$std_port" --export "bench=file:$file" > /dev/null 2>&1 &
pids+=($!)
std_pid=$!
kit_port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$kit_port" file "$file" &
pids+=($!)
kit_pid=$!
for _ in $(seq 100); do
    nbdinfo --size "nbd://127.0.0.1:$std_port/bench" > /dev/null 2>&1 \
        && nbdinfo --size "nbd://127.0.0.1:$kit_port/" > /dev/null 2>&1 && break
    sleep 0.1
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One 3 s run of reads against the server at PID and URI.
measure() {
    local name=$1 pid=$2 uri=$3 before after
    before=$(cpu_ticks "$pid")
    fio --name=reads --ioengine=nbd "--uri=$uri" --rw=read --bs=1M --iodepth=8 \
        --runtime=3 --time_based --output-format=json \
        "--output=/tmp/nbd-mapped-reads-$$.json" > /dev/null
    after=$(cpu_ticks "$pid")
    python3 - "$name" "$before" "$after" "$(getconf CLK_TCK)" "/tmp/nbd-mapped-reads-$$.json" <<'PY'
import json, sys
name, before, after, tck, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
job = json.load(open(path))["jobs"][0]["read"]
mib = job["io_bytes"] / (1 << 20)
print(f"{name:8s} {job['bw_bytes'] / (1 << 20):6.0f} MiB/s  server {(after - before) / tck * 1e6 / mib:6.1f} us a MiB")
PY
}
echo "layout $layout, $runs runs each, alternating"
for run in $(seq "$runs"); do
    measure nbd-std "$std_pid" "nbd://127.0.0.1:$std_port/bench"
    measure nbdkit "$kit_pid" "nbd://127.0.0.1:$kit_port/"
done
