#!/usr/bin/python3
"""One request at a time through libnbd, for workloads fio's nbd engine
cannot express (FUA writes) and for the smallest requests.

    /usr/bin/python3 benches/libnbd_qd1.py URI OP BYTES SECONDS

OP is read, write, write-fua (NBD_CMD_FLAG_FUA on every write) or
write-flush (NBD_CMD_FLUSH after every write). Requests go to random
BYTES-aligned offsets; prints one JSON object: requests done, requests/s,
and latency percentiles in µs (a write-flush pair counts as one request).
python3-libnbd works only with Debian's /usr/bin/python3.
"""

import json
import random
import sys
import time

import nbd

OPS = ("read", "write", "write-fua", "write-flush")


def main(argv):
    if len(argv) != 4 or argv[1] not in OPS:
        print(__doc__, file=sys.stderr)
        return 2
    uri, op, length, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // length
    buf = bytearray(random.randbytes(length))
    rng = random.Random()
    latencies = []
    start = time.monotonic()
    end = start + seconds
    clock = time.perf_counter_ns
    while time.monotonic() < end:
        offset = rng.randrange(blocks) * length
        t0 = clock()
        if op == "read":
            h.pread(length, offset)
        elif op == "write":
            h.pwrite(buf, offset)
        elif op == "write-fua":
            h.pwrite(buf, offset, nbd.CMD_FLAG_FUA)
        else:
            h.pwrite(buf, offset)
            h.flush()
        latencies.append(clock() - t0)
    elapsed = time.monotonic() - start
    h.shutdown()
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] / 1000

    print(json.dumps({
        "ios": len(latencies),
        "seconds": elapsed,
        "iops": len(latencies) / elapsed,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "mean_us": sum(latencies) / len(latencies) / 1000,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
