#!/usr/bin/env bash
# nbdcopy reads of a 512 MiB random export over TLS from nbd-std serve,
# nbdkit memory and qemu-nbd, side by side in one run: throughput (client
# bound here) and the server's CPU seconds per read, the telling figure.
#
#   benches/tls_read.sh [ROUNDS]        # default 3; needs openssl, nbdcopy,
#                                       # nbdkit, qemu-nbd, taskset
# Servers run on CPU 0, nbdcopy on CPU 1. Certificates are made in a
# temporary directory (no client certificates: server authentication only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
size_mib=512
cargo build -q --release -p nbd-std
nbd_std=$PWD/target/release/nbd-std

dir=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir" "/dev/shm/nbd-tls-bench-$$.img"
}
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca-key.pem" -out "$dir/ca-cert.pem" \
    -days 2 -subj "/CN=bench CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$dir/server-key.pem" -out "$dir/server.csr" \
    -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$dir/ext.cnf"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca-cert.pem" -CAkey "$dir/ca-key.pem" \
    -CAcreateserial -out "$dir/server-cert.pem" -days 2 -extfile "$dir/ext.cnf" 2>/dev/null
head -c $((size_mib << 20)) /dev/urandom >"$dir/data.img"
cp "$dir/data.img" "/dev/shm/nbd-tls-bench-$$.img"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid
port[nbd-std]=$(free_port); port[nbdkit]=$(free_port); port[qemu-nbd]=$(free_port)

taskset -c 0 "$nbd_std" serve --port "${port[nbd-std]}" --size ${size_mib}M --log-level warn \
    --tls require --tls-cert "$dir/server-cert.pem" --tls-key "$dir/server-key.pem" &
pid[nbd-std]=$!
taskset -c 0 nbdkit -f -i 127.0.0.1 -p "${port[nbdkit]}" --tls=require --tls-certificates="$dir" \
    memory ${size_mib}M &
pid[nbdkit]=$!
taskset -c 0 qemu-nbd -f raw -b 127.0.0.1 -p "${port[qemu-nbd]}" -t -x '' \
    --object "tls-creds-x509,id=tls0,dir=$dir,endpoint=server,verify-peer=off" --tls-creds tls0 \
    "/dev/shm/nbd-tls-bench-$$.img" &
pid[qemu-nbd]=$!
pids=("${pid[@]}")
sleep 2

uri() { echo "nbds://127.0.0.1:${port[$1]}/?tls-certificates=$dir"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
tick_hz=$(getconf CLK_TCK)

# The memory servers start empty: fill them with the same random data
# (qemu-nbd serves the file already holding it).
taskset -c 1 nbdcopy "$dir/data.img" "$(uri nbd-std)"
taskset -c 1 nbdcopy "$dir/data.img" "$(uri nbdkit)"

echo "round server MiB/s server-CPU-s"
for round in $(seq "$rounds"); do
    for name in nbd-std nbdkit qemu-nbd; do
        before=$(cpu_ticks "${pid[$name]}")
        start=$(date +%s.%N)
        taskset -c 1 nbdcopy "$(uri "$name")" null:
        end=$(date +%s.%N)
        after=$(cpu_ticks "${pid[$name]}")
        python3 -c "print($round, '$name', round($size_mib / ($end - $start)), round(($after - $before) / $tick_hz, 2))"
    done
done
