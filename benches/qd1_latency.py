#!/usr/bin/env python3
"""Mean and 99th-percentile latency of the fio runs in a
benches/compare.py results directory, as a markdown table: submission and
completion together (fio's `lat`); the p99 of completion alone (`clat`)
in reports from before 2026-12-06, when compare.py did not yet ask fio
for the percentiles of `lat`.

compare.py reports the p50; at queue depth 1 the mean (the inverse of the
IOPS) and the tail say more when a server's latencies are bimodal.

    python3 benches/qd1_latency.py benches/results/TIMESTAMP [--all]

Only the QD1 workloads unless --all. Cells: median over rounds (min–max).
Uses the raw fio JSON compare.py keeps in RESULTS/fio/ (libnbd workloads
have none). Only the Python 3 standard library.
"""

import argparse
import json
import os
import re
import signal
import statistics
import sys

RUN = re.compile(r"r(\d+)-(?P<workload>.+?-qd\d+)-(?P<server>.+)\.json$")
# compare.py's column order; other names follow.
ORDER = ["nbd-std", "nbd-std-before", "nbdkit", "qemu-nbd", "nbd-server", "nbd-std-null", "nbdkit-null"]


def latencies(path: str) -> tuple[float, float] | None:
    """(mean, p99) latency in µs of one fio run, or None."""
    try:
        with open(path) as f:
            job = json.load(f)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    # A server woken by the client's send makes the submission dear,
    # which completion latency alone does not show.
    lat = side["lat_ns"]
    if not lat.get("N"):
        return None
    tail = lat if "percentile" in lat else side["clat_ns"]
    return lat["mean"] / 1000, tail["percentile"]["99.000000"] / 1000


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a compare.py output directory")
    p.add_argument("--all", action="store_true", help="every fio workload, not only QD1")
    args = p.parse_args(argv)
    fio_dir = os.path.join(args.results, "fio")
    try:
        names = sorted(os.listdir(fio_dir))
    except OSError as error:
        print(f"qd1_latency: {fio_dir}: {error.strerror}", file=sys.stderr)
        return 1
    table: dict[str, dict[str, list[tuple[float, float]]]] = {}
    servers: list[str] = []
    for name in names:
        match = RUN.match(name)
        if not match or name.endswith("-warmup.json"):
            continue
        workload, server = match["workload"], match["server"]
        if not args.all and not workload.endswith("-qd1"):
            continue
        got = latencies(os.path.join(fio_dir, name))
        if got is None:
            continue
        table.setdefault(workload, {}).setdefault(server, []).append(got)
        if server not in servers:
            servers.append(server)
    if not table:
        print(f"qd1_latency: no fio runs in {fio_dir}", file=sys.stderr)
        return 1
    servers.sort(key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))
    print("| workload | figure | " + " | ".join(servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for workload, by_server in table.items():
        for index, label in enumerate(("mean latency µs", "p99 latency µs")):
            cells = [cell([run[index] for run in by_server[s]]) if s in by_server else "–" for s in servers]
            print(f"| {workload if index == 0 else ''} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    sys.exit(main(sys.argv[1:]))
