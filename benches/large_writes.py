#!/usr/bin/python3
"""Large writes on one connection: nbd-std serve against nbdkit file.

A libnbd client keeps DEPTH writes of SIZE bytes in flight (aio_pwrite of
the same buffer each time) until TOTAL bytes are written to a file export,
then flushes. For each server, in alternating rounds on the same kind of
file: elapsed time and the server's peak RSS (VmHWM).

    /usr/bin/python3 benches/large_writes.py --nbd-std target/release/nbd-std

python3-libnbd works only with Debian's /usr/bin/python3.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

MIB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, process, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def start(kind, args, path, port):
    if kind == "nbd-std":
        command = [args.nbd_std, "serve", "--port", str(port), "--log-level", "warn",
                   "--export", f"disk=file:{path}"]
    else:
        command = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", path]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, process)
    except Exception:
        process.kill()
        process.wait()
        raise
    return process


def write_all(port, name, size, depth, total):
    handle = nbd.NBD()
    handle.connect_uri(f"nbd://127.0.0.1:{port}/{name}")
    buffer = nbd.Buffer.from_bytearray(bytearray(os.urandom(size)))
    export = handle.get_size()
    offset, issued = 0, 0
    started = time.monotonic()
    while issued < total or handle.aio_in_flight() > 0:
        while issued < total and handle.aio_in_flight() < depth:
            handle.aio_pwrite(buffer, offset % (export - size + 1))
            offset += size
            issued += size
        handle.poll(-1)
    handle.flush()
    elapsed = time.monotonic() - started
    handle.shutdown()
    return elapsed


def round_once(kind, args, directory):
    path = os.path.join(directory, f"{kind}.img")
    with open(path, "wb") as f:
        f.truncate(args.export_size)
    port = free_port()
    process = start(kind, args, path, port)
    try:
        name = "disk" if kind == "nbd-std" else ""
        elapsed = write_all(port, name, args.request_size, args.depth, args.total)
        rss = peak_rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(path)
    return elapsed, rss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nbd-std", default="target/release/nbd-std")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--request-size", type=int, default=32 * MIB)
    p.add_argument("--total", type=int, default=2048 * MIB)
    p.add_argument("--export-size", type=int, default=4096 * MIB)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    args = p.parse_args()
    results = {"nbd-std": [], "nbdkit": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for round_number in range(args.rounds):
            for kind in ("nbd-std", "nbdkit"):
                elapsed, rss = round_once(kind, args, directory)
                results[kind].append((elapsed, rss))
                print(f"round {round_number + 1} {kind}: {elapsed:.2f} s, "
                      f"peak RSS {rss / 1024:.0f} MiB", file=sys.stderr)
    print(f"{args.depth} writes of {args.request_size // MIB} MiB in flight, "
          f"{args.total // MIB} MiB written, {args.rounds} rounds (median, min-max)")
    print("| server | time s | peak RSS MiB |")
    print("|---|---|---|")
    for kind, runs in results.items():
        times = [t for t, _ in runs]
        rss = [r / 1024 for _, r in runs]
        print(f"| {kind} | {statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) "
              f"| {statistics.median(rss):.0f} ({min(rss):.0f}-{max(rss):.0f}) |")


if __name__ == "__main__":
    main()
