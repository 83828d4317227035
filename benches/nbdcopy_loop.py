#!/usr/bin/env python3
"""Whole-export copies with nbdcopy, back to back, for benches/compare.py.

    python3 benches/nbdcopy_loop.py URI in|out SOURCE REQUEST_BYTES SECONDS [EVICT]

`in` copies the file SOURCE into the export at URI, `out` copies the
export to `null:`; nbdcopy runs with its defaults (four connections where
the server allows several, 64 requests in flight on each) and requests of
REQUEST_BYTES. Copies run until SECONDS have passed (at least one), each
one whole. Prints one JSON object in the form libnbd_qd1.py prints: the
requests done (export size / REQUEST_BYTES per copy), requests a second,
and the mean and median time of one copy in µs.

With EVICT (a file: the export's, for compare.py's --cold), that file is
written back and dropped from the page cache before each copy, so every
copy finds it cold, not only the first; the time that takes is not
counted.
"""

import json
import os
import statistics
import subprocess
import sys
import time


def evict_file(path):
    """Writes the file back (dirty pages cannot be dropped) and drops its
    pages from the page cache."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv):
    if len(argv) not in (5, 6) or argv[1] not in ("in", "out"):
        print(__doc__, file=sys.stderr)
        return 2
    uri, direction, source, request, seconds = argv[0], argv[1], argv[2], int(argv[3]), float(argv[4])
    evict = argv[5] if len(argv) == 6 else None
    size = os.path.getsize(source)
    if size % request:
        print(f"{source}: {size} bytes is not a whole number of {request}-byte requests", file=sys.stderr)
        return 2
    endpoints = [source, uri] if direction == "in" else [uri, "null:"]
    command = ["nbdcopy", f"--request-size={request}", *endpoints]
    copies = []
    evicting = 0.0
    start = time.monotonic()
    while not copies or time.monotonic() - start - evicting < seconds:
        if evict:
            began = time.monotonic()
            evict_file(evict)
            evicting += time.monotonic() - began
        began = time.monotonic()
        done = subprocess.run(command, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            print(f"{' '.join(command)} exited {done.returncode}", file=sys.stderr)
            return 1
        copies.append(time.monotonic() - began)
    elapsed = time.monotonic() - start - evicting
    requests = len(copies) * (size // request)
    print(json.dumps({
        "ios": requests,
        "iops": requests / elapsed,
        "seconds": elapsed,
        "mean_us": statistics.mean(copies) * 1e6,
        "p50_us": statistics.median(copies) * 1e6,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
