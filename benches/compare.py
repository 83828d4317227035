#!/usr/bin/env python3
"""Compare NBD servers side by side: nbd-std against nbdkit, qemu-nbd and nbd-server.

Each server exports 1 GiB on its own loopback port, is filled once, then fio's
nbd engine runs the workloads in interleaved rounds while the server's CPU time
is read from /proc. The headline figure is server CPU per I/O (see README.md).

    python3 benches/compare.py            # full run: 3 rounds x 6 workloads x 4 servers
    python3 benches/compare.py --short    # smoke run: 1 round, 2 s + 1 s warm-up
    python3 benches/compare.py --pin      # servers on CPU 0, clients on CPU 1
    python3 benches/compare.py --storage shm --workloads all --floor
    python3 benches/compare.py --storage disk --cold --workloads randread-4k-qd1,randread-4k-qd32

Servers and clients run unpinned by default (as servers run in practice);
--pin places them with taskset. --storage memory (default) serves nbd-std's
and nbdkit's memory exports (qemu-nbd and nbd-server a file in /dev/shm);
shm and disk serve one file (in /dev/shm, or --file-dir) from every server.
--floor adds nbd-std and nbdkit over null exports (no storage work).
--cold (with --storage disk) evicts the file from the page cache before
each measured run, so reads come from the disk; the servers take turns
leading the rounds (use as many rounds as servers).

Needs: fio (with the nbd engine), nbdkit, qemu-nbd, nbd-server, nbdinfo, taskset
(apt-get install fio nbdkit nbd-server qemu-utils libnbd-bin) and cargo.
Only the Python 3 standard library is used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from nbdcopy_loop import evict_file  # beside this script: one way to make a file cold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20

# key, label, fio --rw (or libnbd:OP, see libnbd_qd1.py, or nbdcopy:in|out, see
# nbdcopy_loop.py), --bs, --iodepth (nbdcopy: informational, it opens its default 4 connections), headline metric
WORKLOADS = [
    ("randread-4k-qd1", "4k random read QD1", "randread", "4k", 1, "iops"),
    ("randread-4k-qd32", "4k random read QD32", "randread", "4k", 32, "iops"),
    ("randwrite-4k-qd1", "4k random write QD1", "randwrite", "4k", 1, "iops"),
    ("randwrite-4k-qd32", "4k random write QD32", "randwrite", "4k", 32, "iops"),
    ("read-1m-qd8", "1M sequential read QD8", "read", "1M", 8, "mibs"),
    ("write-1m-qd8", "1M sequential write QD8", "write", "1M", 8, "mibs"),
    ("read-1m-qd1", "1M sequential read QD1", "read", "1M", 1, "mibs"),
    ("write-1m-qd1", "1M sequential write QD1", "write", "1M", 1, "mibs"),
    ("read-512-qd1", "libnbd 512-byte random read QD1", "libnbd:read", "512", 1, "iops"),
    ("write-fua-4k-qd1", "libnbd 4k random write + FUA QD1", "libnbd:write-fua", "4096", 1, "iops"),
    ("write-flush-4k-qd1", "libnbd 4k random write, then FLUSH, QD1", "libnbd:write-flush", "4096", 1, "iops"),
    ("copy-in", "nbdcopy a file into the export, 256 KiB requests", "nbdcopy:in", "262144", 4, "mibs"),
    ("copy-out", "nbdcopy the export to null:, 256 KiB requests", "nbdcopy:out", "262144", 4, "mibs"),
]
DEFAULT_WORKLOADS = [w[0] for w in WORKLOADS[:6]]
ALL_SERVERS = ["nbd-std", "nbdkit", "qemu-nbd", "nbd-server"]
# --floor: the same I/O loops over exports that store nothing.
FLOOR_SERVERS = ["nbd-std-null", "nbdkit-null"]
# --before-bin: another nbd-std build (say, main's) beside this one, not a peer.
BEFORE_SERVER = "nbd-std-before"
PEERS = ["nbdkit", "qemu-nbd", "nbd-server"]
LIBNBD_PYTHON = "/usr/bin/python3"  # python3-libnbd is built for Debian's Python only
REQUIRED_TOOLS = ["fio", "nbdinfo", "nbdcopy", "taskset", "nbdkit", "qemu-nbd", "nbd-server"]

# Every process we started and have not yet stopped, for cleanup on any exit.
LIVE_SERVERS: list = []
LIVE_CLIENTS: list = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- #
# /proc readers


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 512M, 1T)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}[m.group(2).upper()]
    return int(m.group(1)) << shift


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def proc_stat(pid: int) -> dict | None:
    """Fields of /proc/PID/stat we use (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    return {
        "state": rest[0],
        "ppid": int(rest[1]),
        "ticks": int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]),
    }


def all_stats() -> dict[int, dict]:
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    return stats


def process_tree(root: int, stats: dict[int, dict]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st["ppid"], []).append(pid)
    tree = [root] if root in stats else []
    i = 0
    while i < len(tree):
        tree.extend(children.get(tree[i], []))
        i += 1
    return tree


def server_cpu(root: int) -> tuple[int, set[int]]:
    """CPU ticks (utime+stime, all threads, plus reaped children) of root and
    its live descendants (nbd-server forks a child per connection)."""
    stats = all_stats()
    tree = process_tree(root, stats)
    return sum(stats[p]["ticks"] for p in tree), set(tree)


def settle_children(root: int, baseline: set[int], timeout: float = 5.0) -> bool:
    """Wait until the server's process tree is back to its pre-run members, so
    per-connection children have exited and been reaped into cutime/cstime."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = all_stats()
        tree = process_tree(root, stats)
        extra = [p for p in tree if p not in baseline]
        if not extra:
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st["state"] not in ("Z", "X")


def system_ticks() -> dict:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return {"busy": user + nice + system + irq + softirq, "steal": steal, "idle": idle + iowait}


def loadavg() -> dict:
    with open("/proc/loadavg") as f:
        a = f.read().split()
    return {"load1": float(a[0]), "load5": float(a[1]), "running": a[3]}


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def listening(port: int) -> bool:
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            pass
    return False


def free_port(used: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in used:
            used.add(port)
            return port


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else ""


# --------------------------------------------------------------------------- #
# Servers


class Server:
    """One NBD server process on its own loopback port."""

    def __init__(self, name: str, ctx: "Context", size_arg: str, size: int, tag: str):
        self.name = name
        self.ctx = ctx
        self.size_arg = size_arg
        self.size = size
        self.tag = tag
        self.port = free_port(ctx.ports)
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.files: list[str] = []
        self.cmd: list[str] = []
        self.dead = False
        self.logpath = os.path.join(ctx.outdir, "logs", f"{name}-{tag}.log")
        export = "bench" if name == "nbd-server" else ""
        self.uri = f"nbd://127.0.0.1:{self.port}/{export}"

    # Each server's command line, without the taskset prefix.
    def command(self) -> list[str]:
        p = str(self.port)
        on_file = self.ctx.storage != "memory" and self.tag == "bench"
        if self.name in ("nbd-std", BEFORE_SERVER):
            binary = self.ctx.args.before_bin if self.name == BEFORE_SERVER else self.ctx.nbd_std_bin
            if self.ctx.stand_in:
                return [binary, p, str(self.size // MiB)]
            extra = shlex.split(self.ctx.args.before_args) if self.name == BEFORE_SERVER else []
            if on_file:
                return [binary, "serve", "--port", p, "--export", f"bench=file:{self.shm_file()}", *extra]
            if self.ctx.args.huge_pages and self.name == "nbd-std":
                return [binary, "serve", "--port", p, "--export", f"bench=memory:{self.size_arg},huge-pages"]
            return [binary, "serve", "--port", p, "--size", self.size_arg, *extra]
        if self.name == "nbd-std-null":
            return [self.ctx.nbd_std_bin, "serve", "--port", p, "--export", f"bench=null:{self.size_arg}"]
        if self.name == "nbdkit-null":
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", p, "null", self.size_arg]
        if self.name == "nbdkit":
            if on_file:
                return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", p, "file", self.shm_file()]
            return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", p, "memory", self.size_arg]
        if self.name == "qemu-nbd":
            img = self.shm_file()
            clients = str(self.ctx.args.idle_connections) if self.tag == "idle" else "8"
            return ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", p, "-t", "-e", clients, "-x", "", img]
        if self.name == "nbd-server":
            img = self.shm_file()
            conf = os.path.join(self.ctx.tmpdir, f"nbd-server-{self.tag}.conf")
            with open(conf, "w") as f:
                f.write(
                    "[generic]\n"
                    "listenaddr = 127.0.0.1\n"
                    f"port = {self.port}\n"
                    "allowlist = false\n"
                    "[bench]\n"
                    f"exportname = {img}\n"
                    # FLUSH and FUA as fdatasync, as the other servers do
                    # (nbd-server advertises neither unless told).
                    "flush = true\n"
                    "fua = true\n"
                )
            self.conf = conf
            self.pidfile = os.path.join(self.ctx.tmpdir, f"nbd-server-{self.tag}.pid")
            return ["nbd-server", "-C", conf, "-p", self.pidfile]
        raise BenchError(f"unknown server {self.name}")

    def shm_file(self) -> str:
        if self.ctx.shared_file and self.tag == "bench":
            return self.ctx.shared_file  # every server on the same file
        path = f"/dev/shm/nbd-bench-{os.getpid()}-{self.name}-{self.tag}.img"
        with open(path, "wb") as f:
            f.truncate(self.size)  # sparse: the fill through NBD allocates it
        self.files.append(path)
        return path

    def start(self) -> None:
        self.cmd = self.ctx.pin(self.ctx.server_cpus) + self.command()
        LIVE_SERVERS.append(self)
        logf = open(self.logpath, "w")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
        logf.close()
        if self.name == "nbd-server":
            # nbd-server always daemonizes: the launcher exits, the daemon
            # writes its PID to the -p file.
            try:
                rc = self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise BenchError("nbd-server launcher did not exit")
            if rc != 0:
                raise BenchError(f"nbd-server exited {rc}: {self.log_tail()}")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with open(self.pidfile) as f:
                        text = f.read().strip()
                    if text:
                        self.pid = int(text)
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.05)
            if self.pid is None:
                raise BenchError("nbd-server wrote no PID file")
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                if self.conf.encode() not in f.read():
                    raise BenchError(f"PID {self.pid} from {self.pidfile} is not our nbd-server")
        else:
            self.pid = self.proc.pid  # taskset execs the server: same PID
        deadline = time.monotonic() + 30
        while not listening(self.port):
            if not alive(self.pid):
                raise BenchError(f"{self.name} exited at startup: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} is not listening on port {self.port}")
            time.sleep(0.05)
        log(f"{self.name}: PID {self.pid}, {self.uri}  ({shlex.join(self.cmd)})")

    def check_size(self) -> None:
        out = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or int(out.stdout.strip() or 0) != self.size:
            raise BenchError(f"{self.name}: nbdinfo --size {self.uri}: {out.stdout.strip()} {out.stderr.strip()}")

    def log_tail(self) -> str:
        try:
            with open(self.logpath) as f:
                return " | ".join(f.read().strip().splitlines()[-5:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.pid is not None and alive(self.pid):
            victims = process_tree(self.pid, all_stats())  # the server and its children, by PID
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while any(alive(p) for p in victims) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in victims:
                if alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.files = []
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)


# --------------------------------------------------------------------------- #
# fio runs


def write_random_file(path: str, size: int, write_size: int = MiB) -> None:
    """Writes `size` bytes of random data (one random MiB repeated) to
    `path` in writes of `write_size` bytes (a divisor of a MiB: the page
    cache keeps the file in folios about that large), allocated and on
    the device (fsync) before it returns."""
    block = os.urandom(MiB)
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // MiB):
            for at in range(0, MiB, write_size):
                f.write(block[at : at + write_size])
        os.fsync(f.fileno())


class Context:
    def __init__(self, args):
        self.args = args
        self.outdir = args.out
        self.tmpdir = tempfile.mkdtemp(prefix="nbd-bench-")
        self.ports: set[int] = set()
        self.stand_in = args.stand_in
        self.nbd_std_bin = ""
        self.server_cpus = args.server_cpus
        self.client_cpus = args.client_cpus
        self.no_pin = not args.pin
        self.storage = args.storage
        self.shared_file = ""
        self.copy_file = ""

    def copy_source(self, size: int) -> str:
        """The file nbdcopy copies into exports: random bytes, the
        export's size, in /dev/shm (so the source costs no disk reads),
        written once for every server."""
        if not self.copy_file:
            path = f"/dev/shm/nbd-bench-{os.getpid()}-copy-source.img"
            write_random_file(path, size)
            self.copy_file = path
        return self.copy_file

    def pin(self, cpus: str) -> list[str]:
        return [] if self.no_pin else ["taskset", "-c", cpus]

    def make_shared_file(self, size: int) -> None:
        """--storage shm|disk: one file for every server, written whole
        (allocated) before any server starts, so none pays the allocation."""
        directory = self.args.file_dir or ("/dev/shm" if self.storage == "shm" else "/var/tmp")
        path = os.path.join(directory, f"nbd-bench-{os.getpid()}.img")
        write_size = self.args.file_writes
        log(f"writing {size // MiB} MiB to {path} in writes of {write_size} bytes")
        write_random_file(path, size, write_size)
        self.shared_file = path

    def evict_shared_file(self) -> None:
        """--cold: the shared file's pages leave the page cache (written
        back first: dirty pages cannot be dropped), for every server alike."""
        evict_file(self.shared_file)


def fio_metrics(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']} in {path}")
    r, w = job["read"], job["write"]
    return {
        "ios": r["total_ios"] + w["total_ios"],
        "iops": r["iops"] + w["iops"],
        "mibs": (r["bw_bytes"] + w["bw_bytes"]) / MiB,
        "bytes": r["io_bytes"] + w["io_bytes"],
        "runtime_ms": max(r["runtime"], w["runtime"]),
        "lat_mean_us": max(r["lat_ns"]["mean"], w["lat_ns"]["mean"]) / 1000,
        "p50_us": max(
            (d["lat_ns"].get("percentile", {}).get("50.000000", 0) for d in (r, w) if d["total_ios"]),
            default=0,
        )
        / 1000,
    }


def run_fio(ctx: Context, server: Server, name: str, fio_args: list[str]) -> dict:
    """One fio process against the server, bracketed by CPU/load samples;
    fio_args ["libnbd:OP", BYTES, SECONDS] runs libnbd_qd1.py instead,
    ["nbdcopy:in|out", BYTES, SECONDS] nbdcopy_loop.py."""
    out = os.path.join(ctx.outdir, "fio", f"{name}.json")
    if fio_args and fio_args[0].startswith("nbdcopy:"):
        script = os.path.join(REPO, "benches", "nbdcopy_loop.py")
        direction, length, seconds = fio_args[0][len("nbdcopy:") :], fio_args[1], fio_args[2]
        source = ctx.copy_source(server.size)
        cmd = ctx.pin(ctx.client_cpus) + [sys.executable, script, server.uri, direction, source, length, seconds]
        if ctx.args.cold:
            # Every copy into (or out of) a cold file, not only the first.
            cmd.append(ctx.shared_file)
        return run_client(ctx, server, name, cmd, out, request_bytes=int(length))
    if fio_args and fio_args[0].startswith("libnbd:"):
        script = os.path.join(REPO, "benches", "libnbd_qd1.py")
        op, length, seconds = fio_args[0][len("libnbd:") :], fio_args[1], fio_args[2]
        cmd = ctx.pin(ctx.client_cpus) + [LIBNBD_PYTHON, script, server.uri, op, length, seconds]
        return run_client(ctx, server, name, cmd, out, request_bytes=int(length))
    cmd = ctx.pin(ctx.client_cpus) + [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={server.uri}",
        "--numjobs=1",
        "--output-format=json",
        f"--output={out}",
    ] + fio_args
    return run_client(ctx, server, name, cmd, out, request_bytes=None)


def libnbd_metrics(path: str, length: int) -> dict:
    with open(path) as f:
        data = json.load(f)
    return {
        "ios": data["ios"],
        "iops": data["iops"],
        "mibs": data["iops"] * length / MiB,
        "bytes": data["ios"] * length,
        "runtime_ms": data["seconds"] * 1000,
        "lat_mean_us": data["mean_us"],
        "p50_us": data["p50_us"],
    }


def run_client(
    ctx: Context, server: Server, name: str, cmd: list[str], out: str, request_bytes: int | None
) -> dict:
    """Runs one client: fio (request_bytes None), or a script printing
    libnbd_qd1.py's JSON for requests of request_bytes."""
    libnbd = request_bytes is not None
    if ctx.args.cold:
        ctx.evict_shared_file()
    srv0, members = server_cpu(server.pid)
    sys0, load0 = system_ticks(), loadavg()
    t0 = time.monotonic()
    with open(os.path.join(ctx.outdir, "logs", f"{name}.fio.log"), "w") as logf:
        stdout = open(out, "w") if libnbd else logf
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=logf)
        if libnbd:
            stdout.close()
    LIVE_CLIENTS.append(proc)
    _, status, ru = os.wait4(proc.pid, 0)  # on Ctrl-C, main's cleanup kills it
    proc.returncode = os.waitstatus_to_exitcode(status)
    LIVE_CLIENTS.remove(proc)
    wall = time.monotonic() - t0
    sys1, load1 = system_ticks(), loadavg()
    settled = settle_children(server.pid, members)
    srv1, _ = server_cpu(server.pid)
    if proc.returncode != 0:
        raise BenchError(f"fio exited {proc.returncode} (see logs/{name}.fio.log)")
    if not alive(server.pid):
        server.dead = True
        raise BenchError(f"{server.name} died during {name}: {server.log_tail()}")
    m = libnbd_metrics(out, request_bytes) if libnbd else fio_metrics(out)
    server_s = (srv1 - srv0) / CLK_TCK
    fio_s = ru.ru_utime + ru.ru_stime
    busy_s = (sys1["busy"] - sys0["busy"]) / CLK_TCK
    m.update(
        {
            "fio_json": os.path.relpath(out, ctx.outdir),
            "wall_s": wall,
            "server_cpu_s": server_s,
            "cpu_us_per_io": server_s / m["ios"] * 1e6 if m["ios"] else None,
            "fio_cpu_s": fio_s,
            # CPU used by everything but this server and this fio, in % of one CPU.
            "others_cpu_pct": max(0.0, busy_s - server_s - fio_s) / wall * 100,
            "steal_pct": (sys1["steal"] - sys0["steal"]) / CLK_TCK / wall * 100,
            "load1_before": load0["load1"],
            "load1_after": load1["load1"],
            "children_settled": settled,
        }
    )
    return m


def workload_args(rw: str, bs: str, qd: int, seconds: float) -> list[str]:
    if rw.startswith(("libnbd:", "nbdcopy:")):
        return [rw, bs, str(seconds)]
    return [
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        "--time_based",
        f"--runtime={int(seconds * 1000)}ms",
        "--norandommap",
        "--randrepeat=0",
        # Percentiles of the whole latency (submission and completion),
        # not of completion alone: a server that is woken by the client's
        # send makes the submission dear (nbdkit's slat was 7.6 µs against
        # 2.8 at QD1), which completion percentiles hide.
        "--lat_percentiles=1",
    ]


def fill(ctx: Context, server: Server) -> dict:
    log(f"fill {server.name}: writing all {server.size // MiB} MiB once")
    m = run_fio(ctx, server, f"fill-{server.name}", ["--rw=write", "--bs=1M", "--iodepth=8"])
    if m["bytes"] != server.size:
        raise BenchError(f"fill of {server.name} wrote {m['bytes']} of {server.size} bytes")
    return m


def measure(ctx: Context, server: Server, wl: tuple, rnd: int) -> dict:
    key, _label, rw, bs, qd, _metric = wl
    args = ctx.args
    # Warm-up on its own connection, then the measured run with no fio ramp, so
    # that every I/O the server did inside the CPU window is counted by fio.
    warm = None
    if args.ramp > 0:
        warm = run_fio(ctx, server, f"r{rnd}-{key}-{server.name}-warmup", workload_args(rw, bs, qd, args.ramp))
    m = run_fio(ctx, server, f"r{rnd}-{key}-{server.name}", workload_args(rw, bs, qd, args.runtime))
    if warm is not None:
        m["warmup"] = {k: warm[k] for k in ("iops", "mibs", "cpu_us_per_io", "fio_json")}
    return m


def measure_rss(ctx: Context, name: str) -> dict:
    """Idle RSS with a big sparse export: after startup, after one nbdinfo."""
    size_arg = ctx.args.rss_size
    server = Server(name, ctx, size_arg, parse_size(size_arg), "rss")
    res: dict = {"server": name, "export_size": size_arg}
    try:
        server.start()
        res["command"] = shlex.join(server.cmd)
        time.sleep(1.0)
        res["rss_kib_startup"] = rss_kib(server.pid)
        out = subprocess.run(["nbdinfo", server.uri], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise BenchError(f"nbdinfo failed: {out.stderr.strip()}")
        time.sleep(0.5)
        settle_children(server.pid, {server.pid})
        res["rss_kib_after_nbdinfo"] = rss_kib(server.pid)
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        res["error"] = str(e)
        log(f"RSS {name}: {e}")
    finally:
        server.stop()
    return res


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over the server and its children: nbd-server
    forks one per client, and PSS counts their shared pages once."""
    rss = pss = 0
    for pid in process_tree(root, all_stats()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return rss, pss


def measure_idle(ctx: Context, name: str) -> dict:
    """Memory of a server holding N clients that connected, read the
    greeting and said nothing more."""
    count = ctx.args.idle_connections
    server = Server(name, ctx, "1G", parse_size("1G"), "idle")
    res: dict = {"server": name, "connections": count}
    sockets: list[socket.socket] = []
    try:
        server.start()
        res["command"] = shlex.join(server.cmd)
        time.sleep(0.5)
        res["before"] = tree_memory_kib(server.pid)
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        greeted = 0
        deadline = time.monotonic() + 10
        for sock in sockets:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = b""
                while len(data) < 18:
                    chunk = sock.recv(18 - len(data))
                    if not chunk:
                        break
                    data += chunk
                greeted += data.startswith(b"NBDMAGIC")
            except OSError:
                pass
        res["greeted"] = greeted
        time.sleep(1.0)
        res["holding"] = tree_memory_kib(server.pid)
    except (BenchError, OSError) as e:
        res["error"] = str(e)
        log(f"idle {name}: {e}")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    return res


def idle_report(ctx: Context, args) -> int:
    """--idle-connections: the memory table only, no fio runs."""
    results = []
    for name in args.servers:
        log(f"idle connections: {name} holding {args.idle_connections}")
        results.append(measure_idle(ctx, name))
    lines = [
        f"Idle connections: {args.idle_connections} clients each read the greeting and stay silent "
        "(memory of the server's process tree, KiB; PSS counts shared pages once).",
        "",
        "| server | greeted | RSS before | RSS holding | PSS holding | PSS per connection |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['server']} | error: {r['error']} | | | | |")
            continue
        (rss0, pss0), (rss1, pss1) = r["before"], r["holding"]
        per = (pss1 - pss0) * 1024 / max(1, r["greeted"])
        lines.append(f"| {r['server']} | {r['greeted']} | {rss0:,} | {rss1:,} | {pss1:,} | {per:,.0f} B |")
    lines += ["", "Commands:", ""] + [f"- `{r.get('command', r['server'])}`" for r in results]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "idle.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "idle.md"), "w") as f:
        f.write(md)
    print(md)
    return 1 if any("error" in r for r in results) else 0


# --------------------------------------------------------------------------- #
# Report


def fmt_metric(v: float | None, metric: str) -> str:
    if v is None:
        return "–"
    if metric == "iops":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if metric == "mibs":
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cell(values: list[float], metric: str, errors: int = 0) -> str:
    if not values:
        return "error" if errors else "–"
    med = fmt_metric(statistics.median(values), metric)
    if len(values) == 1:
        return med
    return f"{med} ({fmt_metric(min(values), metric)}–{fmt_metric(max(values), metric)})"


def summarize(runs: list[dict], servers: list[str], workloads: list[tuple]) -> dict:
    summary = {}
    for key, _label, _rw, _bs, _qd, metric in workloads:
        per = {}
        for s in servers:
            ok = [r for r in runs if r["workload"] == key and r["server"] == s and "error" not in r]
            vals = [r[metric] for r in ok]
            cpus = [r["cpu_us_per_io"] for r in ok if r["cpu_us_per_io"] is not None]
            p50s = [r["p50_us"] for r in ok if r.get("p50_us")]
            per[s] = {
                "p50_us": p50s,
                "p50_us_median": statistics.median(p50s) if p50s else None,
                "n": len(ok),
                "errors": len([r for r in runs if r["workload"] == key and r["server"] == s and "error" in r]),
                metric: vals,
                "cpu_us_per_io": cpus,
                f"{metric}_median": statistics.median(vals) if vals else None,
                "cpu_us_per_io_median": statistics.median(cpus) if cpus else None,
            }
        summary[key] = per
    return summary


def ratio(summary_wl: dict, field: str, lower_is_better: bool) -> str:
    me = summary_wl.get("nbd-std", {}).get(field)
    peers = {s: v.get(field) for s, v in summary_wl.items() if s in PEERS and v.get(field)}
    if not me or not peers:
        return "–"
    if lower_is_better:
        best = min(peers, key=peers.get)
        return f"{peers[best] / me:.2f}× ({best})"
    best = max(peers, key=peers.get)
    return f"{me / peers[best]:.2f}× ({best})"


def render(report: dict) -> str:
    cfg, servers = report["config"], report["config"]["servers"]
    workloads = [w for w in WORKLOADS if w[0] in cfg["workloads"]]
    lines = [f"# NBD server comparison, {report['started']}", ""]
    if report.get("interrupted"):
        lines += [f"**Interrupted ({report['interrupted']}): partial results.**", ""]
    std = report["commands"].get("nbd-std", "")
    if cfg["stand_in"]:
        lines.append("**nbd-std column = STAND-IN** (`memory_server` example, not `nbd-std serve`).")
        lines.append("")
    lines += [
        f"- nbd-std: `{std}` at {report['git']}",
        f"- machine: {report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}), "
        f"kernel {report['machine']['kernel']}, {report['machine']['mem_gib']:.0f} GiB RAM, "
        f"DAMON {report['machine'].get('damon', 'not recorded')}",
        f"- placement: {cfg['placement']}",
        f"- storage: {cfg.get('storage_text', 'memory')}",
        f"- runs: {cfg['rounds']} interleaved round(s) × {len(workloads)} workload(s) × {len(servers)} server(s); "
        f"each run = {cfg['ramp']} s warm-up connection + {cfg['runtime']} s measured, "
        f"fio nbd engine, 1 job, 1 connection; exports {cfg['size']}, filled once before measuring",
        "- cells: median (min–max over rounds). CPU µs/IO = server utime+stime (all threads and "
        "children, /proc/PID/stat) during the measured run ÷ I/Os fio completed.",
        "- vs best peer: throughput = nbd-std ÷ best peer; CPU (and latency) = best peer's ÷ nbd-std's. "
        "≥ 1.00 means nbd-std is at or above the best peer (nbdkit, qemu-nbd, nbd-server; "
        "the null exports are the floor, not peers).",
        "",
        "| workload | figure | " + " | ".join(servers) + " | nbd-std vs best peer |",
        "|---|---|" + "---|" * len(servers) + "---|",
    ]
    for key, label, _rw, _bs, qd, metric in workloads:
        s = report["summary"][key]
        unit = "IOPS" if metric == "iops" else "MiB/s"
        row = [label, unit] + [cell(s[x][metric], metric, s[x]["errors"]) for x in servers]
        row.append(ratio(s, f"{metric}_median", False))
        lines.append("| " + " | ".join(row) + " |")
        row = ["", "server CPU µs/IO"] + [cell(s[x]["cpu_us_per_io"], "cpu", s[x]["errors"]) for x in servers]
        row.append(ratio(s, "cpu_us_per_io_median", True))
        lines.append("| " + " | ".join(row) + " |")
        if qd == 1:
            row = ["", "p50 latency µs"] + [cell(s[x]["p50_us"], "cpu", s[x]["errors"]) for x in servers]
            row.append(ratio(s, "p50_us_median", True))
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Fill (each export written once, sequential 1M QD8, before measuring)", ""]
    lines += ["| server | time s | MiB/s | server CPU s |", "|---|---|---|---|"]
    for name, f in report["fill"].items():
        if "error" in f:
            lines.append(f"| {name} | error: {f['error']} | | |")
        else:
            lines.append(
                f"| {name} | {f['runtime_ms'] / 1000:.2f} | {f['mibs']:,.0f} | {f['server_cpu_s']:.2f} |"
            )
    if report["rss"]:
        lines += ["", f"## Idle RSS with a {cfg['rss_size']} sparse export (VmRSS)", ""]
        lines += ["| server | after startup | after one nbdinfo |", "|---|---|---|"]
        for r in report["rss"]:
            if "error" in r:
                lines.append(f"| {r['server']} | error: {r['error'][:160]} | |")
            else:
                a, b = r.get("rss_kib_startup"), r.get("rss_kib_after_nbdinfo")
                lines.append(f"| {r['server']} | {a / 1024:.1f} MiB | {b / 1024:.1f} MiB |")
    runs = [r for r in report["runs"] if "error" not in r]
    if runs:
        lines += ["", "## Machine load during the measured runs", ""]
        lines += ["| | median | max |", "|---|---|---|"]
        for field, label in (
            ("load1_after", "load average (1 min, includes server + fio)"),
            ("others_cpu_pct", "other processes, % of one CPU"),
            ("steal_pct", "steal (hypervisor), % of one CPU"),
        ):
            vals = [r[field] for r in runs]
            lines.append(f"| {label} | {statistics.median(vals):.2f} | {max(vals):.2f} |")
        busy = [r for r in runs if r["others_cpu_pct"] > 25]
        if busy:
            lines += [
                "",
                f"{len(busy)} of {len(runs)} measured runs shared the machine with other processes using more "
                "than 25 % of a CPU: their throughput (less so their CPU µs/IO) is unreliable; rerun on a quiet machine.",
            ]
    errors = [r for r in report["runs"] if "error" in r]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines.append(f"- round {r['round']} {r['workload']} {r['server']}: {r['error']}")
    lines += ["", "<details><summary>Every run</summary>", ""]
    lines += [
        "| round | workload | server | IOPS | MiB/s | CPU µs/IO | server CPU s | fio CPU s | load1 | others % | steal % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['round']} | {r['workload']} | {r['server']} | error | | | | | | | |")
            continue
        lines.append(
            f"| {r['round']} | {r['workload']} | {r['server']} | {r['iops']:.0f} | {r['mibs']:.0f} | "
            f"{r['cpu_us_per_io']:.2f} | {r['server_cpu_s']:.2f} | {r['fio_cpu_s']:.2f} | "
            f"{r['load1_after']:.2f} | {r['others_cpu_pct']:.1f} | {r['steal_pct']:.1f} |"
        )
    lines += ["", "</details>", "", "Versions: " + "; ".join(f"{k}: {v}" for k, v in report["versions"].items())]
    lines += ["", "Commands:", ""] + [f"- {k}: `{v}`" for k, v in report["commands"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# Main


def machine_info() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "mem_gib": mem_kib / (1 << 20),
        "damon": damon_state(),
    }


def damon_state() -> str:
    """The kernel's DAMON monitors that are running, e.g. "paddr: pageout",
    or "none". One sampling physical memory clears the accessed bits of
    the page cache's folios in every mapping of them, which made nbd-std's
    reads sent from its mapping of a file dearer (docs/BENCHMARKS.md)."""
    root = "/sys/kernel/mm/damon/admin/kdamonds"
    running = []

    def text(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def numbered(path: str) -> list[str]:
        return sorted((n for n in os.listdir(path) if n.isdigit()), key=int) if os.path.isdir(path) else []

    for kdamond in numbered(root):
        if text(f"{root}/{kdamond}/state") != "on":
            continue
        contexts = f"{root}/{kdamond}/contexts"
        for context in numbered(contexts):
            schemes = f"{contexts}/{context}/schemes"
            actions = [text(f"{schemes}/{n}/action") for n in numbered(schemes)]
            operations = text(f"{contexts}/{context}/operations") or "?"
            running.append(f"{operations}: {', '.join(actions) or 'monitoring only'}")
    return "; ".join(running) or "none"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return rev + (" (dirty tree)" if dirty else "")
    except OSError:
        return "unknown"


def prepare_nbd_std(ctx: Context, args) -> None:
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    if args.nbd_std_bin:
        ctx.nbd_std_bin = args.nbd_std_bin
    elif ctx.stand_in:
        ctx.nbd_std_bin = os.path.join(target, "release", "examples", "memory_server")
    else:
        ctx.nbd_std_bin = os.path.join(target, "release", "nbd-std")
    if not args.no_build and not args.nbd_std_bin:
        cmd = ["cargo", "build", "--release"]
        cmd += ["-p", "nbd-examples", "--example", "memory_server"] if ctx.stand_in else ["-p", "nbd-std"]
        log("building: " + shlex.join(cmd))
        subprocess.run(cmd, cwd=REPO, check=True)
    if not os.access(ctx.nbd_std_bin, os.X_OK):
        raise BenchError(f"{ctx.nbd_std_bin} not found or not executable")
    if not ctx.stand_in:
        probe = subprocess.run([ctx.nbd_std_bin, "serve", "--help"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise BenchError(
                f"`{ctx.nbd_std_bin} serve --help` failed (exit {probe.returncode}): no serve command yet? "
                "Use --stand-in to benchmark the memory_server example instead."
            )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="smoke run: 2 s measured + 1 s warm-up, 1 round")
    p.add_argument("--runtime", type=float, help="measured seconds per run (default 10, --short 2)")
    p.add_argument("--ramp", type=float, help="warm-up seconds before each run (default 2, --short 1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --short 1)")
    p.add_argument("--size", default="1G", help="export size for the throughput runs (default 1G)")
    p.add_argument("--rss-size", default="1T", help="sparse export size for the idle-RSS check (default 1T)")
    p.add_argument("--no-rss", action="store_true", help="skip the idle-RSS check")
    p.add_argument("--rss-peers", action="store_true", help="also measure the peers' idle RSS")
    p.add_argument(
        "--idle-connections",
        type=int,
        metavar="N",
        help="only measure each server's memory while N silent clients are connected (no fio runs)",
    )
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma list (default: all four)")
    p.add_argument("--floor", action="store_true", help="also run nbd-std and nbdkit over null exports")
    p.add_argument(
        "--huge-pages",
        action="store_true",
        help="nbd-std's memory export with the huge-pages option (not nbd-std-before's)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma list of workload keys, or all (default: the six fio workloads)",
    )
    p.add_argument(
        "--storage",
        choices=["memory", "shm", "disk"],
        default="memory",
        help="memory exports (default), or one file in /dev/shm (shm) or on disk (disk) for every server",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="with --storage disk: evict the file from the page cache before each measured run "
        "(fsync, then POSIX_FADV_DONTNEED), so reads come from the disk",
    )
    p.add_argument("--file-dir", help="directory of the shared file (default /dev/shm for shm, /var/tmp for disk)")
    p.add_argument(
        "--file-writes",
        type=parse_size,
        default=MiB,
        help="size of the writes that make the shared file (default 1M; a divisor of 1M, "
        "e.g. 8K: the page cache keeps the file in small folios, not large ones)",
    )
    p.add_argument("--server-cpus", default="0", help="taskset CPU list for every server (default 0)")
    p.add_argument("--client-cpus", default="1", help="taskset CPU list for fio and this script (default 1)")
    p.add_argument("--pin", action="store_true", help="pin servers and clients with taskset (default: unpinned)")
    p.add_argument("--no-pin", action="store_true", help="unpinned (the default; kept for old command lines)")
    p.add_argument("--stand-in", action="store_true", help="benchmark the memory_server example as nbd-std")
    p.add_argument("--nbd-std-bin", help="use this binary for nbd-std (skips the cargo build)")
    p.add_argument(
        "--before-bin",
        help="also run this nbd-std binary (say, main's build) as the nbd-std-before column, not a peer",
    )
    p.add_argument(
        "--before-args",
        default="",
        help="options added to the nbd-std-before command line, e.g. '--poll-window 0' "
        "(with --before-bin the same binary: one setting measured beside the default)",
    )
    p.add_argument("--no-build", action="store_true", help="do not run cargo build")
    p.add_argument("--out", help="output directory (default benches/results/TIMESTAMP)")
    args = p.parse_args(argv)
    if args.runtime is None:
        args.runtime = 2.0 if args.short else 10.0
    if args.ramp is None:
        args.ramp = 1.0 if args.short else 2.0
    if args.rounds is None:
        args.rounds = 1 if args.short else 3
    for f in ("runtime", "ramp"):
        v = getattr(args, f)
        if v == int(v):
            setattr(args, f, int(v))
    if args.pin and args.no_pin:
        p.error("--pin and --no-pin contradict each other")
    if args.cold and args.storage != "disk":
        p.error("--cold needs --storage disk (a file in memory has no disk to read from)")
    if args.file_writes <= 0 or MiB % args.file_writes:
        p.error("--file-writes must divide 1M (e.g. 4K, 8K, 256K, 1M)")
    args.servers = [s for s in args.servers.split(",") if s]
    if args.floor:
        args.servers += [s for s in FLOOR_SERVERS if s not in args.servers]
    if args.before_bin and BEFORE_SERVER not in args.servers:
        args.servers.insert(1 if "nbd-std" in args.servers else 0, BEFORE_SERVER)
    for s in args.servers:
        if s not in ALL_SERVERS + FLOOR_SERVERS + [BEFORE_SERVER]:
            p.error(f"unknown server {s!r}; known: {', '.join(ALL_SERVERS + FLOOR_SERVERS)}")
        if s == BEFORE_SERVER and not args.before_bin:
            p.error(f"{BEFORE_SERVER} needs --before-bin")
    if args.workloads == "all":
        args.workloads = ",".join(w[0] for w in WORKLOADS)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in [x[0] for x in WORKLOADS]:
            p.error(f"unknown workload {w!r}; known: {', '.join(x[0] for x in WORKLOADS)}")
    if args.out is None:
        args.out = os.path.join(REPO, "benches", "results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def main(argv) -> int:
    args = parse_args(argv)
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    needed = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd", "nbd-server": "nbd-server"}
    missing = [t for t in missing if t not in needed or needed[t] in args.servers]
    if missing:
        print(
            f"missing tools: {', '.join(missing)}\n"
            "install: apt-get install fio nbdkit nbd-server qemu-utils libnbd-bin",
            file=sys.stderr,
        )
        return 2
    online = os.sched_getaffinity(0)
    if args.pin:
        for cpus in (args.server_cpus, args.client_cpus):
            if not parse_cpus(cpus) <= online:
                print(f"CPU list {cpus} not available (have {sorted(online)}); see --server-cpus/--client-cpus", file=sys.stderr)
                return 2
        if parse_cpus(args.server_cpus) & parse_cpus(args.client_cpus):
            log("note: server and client CPU lists overlap")
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))  # keep this script off the server's CPU
    os.makedirs(os.path.join(args.out, "fio"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    ctx = Context(args)
    size = parse_size(args.size)
    workloads = [w for w in WORKLOADS if w[0] in args.workloads]
    placement = (
        "unpinned"
        if not args.pin
        else f"every server on CPU {args.server_cpus}, fio (and this script) on CPU {args.client_cpus} (taskset -c)"
    )
    report: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": git_rev(),
        "machine": machine_info(),
        "config": {
            "servers": args.servers,
            "workloads": args.workloads,
            "rounds": args.rounds,
            "runtime": args.runtime,
            "ramp": args.ramp,
            "size": args.size,
            "rss_size": args.rss_size,
            "stand_in": args.stand_in,
            "server_cpus": args.server_cpus if args.pin else None,
            "client_cpus": args.client_cpus if args.pin else None,
            "placement": placement,
            "storage": args.storage,
            "cold": args.cold,
            "file_writes": args.file_writes,
            "storage_text": {
                "memory": "nbd-std and nbdkit memory exports; qemu-nbd and nbd-server a file in /dev/shm",
                "shm": "every server on one file in /dev/shm",
                "disk": f"every server on one file in {args.file_dir or '/var/tmp'}",
            }[args.storage]
            + (f", written in {args.file_writes}-byte writes" if args.storage != "memory" else "")
            + (", evicted from the page cache before each run" if args.cold else ""),
            "argv": argv,
        },
        "versions": {
            "fio": tool_version(["fio", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbd-server": tool_version(["nbd-server", "-V"]).replace("This is nbd-server version ", ""),
            "nbdinfo": tool_version(["nbdinfo", "--version"]),
        },
        "commands": {},
        "pids": {},
        "rss": [],
        "fill": {},
        "runs": [],
    }
    servers: dict[str, Server] = {}
    interrupted = None
    try:
        if "nbd-std" in args.servers or "nbd-std-null" in args.servers:
            prepare_nbd_std(ctx, args)
        if args.storage != "memory" and not args.idle_connections:
            ctx.make_shared_file(size)
        if args.idle_connections:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return idle_report(ctx, args)
        if not args.no_rss:
            for name in ["nbd-std"] + (ALL_SERVERS[1:] if args.rss_peers else []):
                if name in args.servers:
                    log(f"idle RSS: {name} with a {args.rss_size} export")
                    report["rss"].append(measure_rss(ctx, name))
        for name in args.servers:
            srv = Server(name, ctx, args.size, size, "bench")
            servers[name] = srv
            srv.start()
            srv.check_size()
            report["commands"][name] = shlex.join(srv.cmd)
            report["pids"][name] = srv.pid
        for name, srv in servers.items():
            try:
                report["fill"][name] = fill(ctx, srv)
            except BenchError as e:
                report["fill"][name] = {"error": str(e)}
                log(f"fill {name}: {e}")
        total = args.rounds * len(workloads) * len(servers)
        done = 0
        for rnd in range(1, args.rounds + 1):
            # Each server leads a round in turn: the first after another
            # server's runs can pay for them. After an eviction the first
            # reader ran slower in every round, whichever server it was
            # (the virtual disk has a cache of its own), and 1 MiB writes
            # into a file in /dev/shm right after nbdkit's random writes
            # to it came at 1.5k to 3.7k MiB/s, second at 3.3k to 3.8k.
            order = list(servers.items())
            lead = (rnd - 1) % len(order)
            order = order[lead:] + order[:lead]
            for wl in workloads:
                for name, srv in order:
                    done += 1
                    rec = {"round": rnd, "workload": wl[0], "server": name}
                    if srv.dead:
                        rec["error"] = "server died earlier"
                    else:
                        try:
                            rec.update(measure(ctx, srv, wl, rnd))
                            metric = wl[5]
                            log(
                                f"[{done}/{total}] round {rnd} {wl[0]:18} {name:10} "
                                f"{fmt_metric(rec[metric], metric):>7} {'IOPS' if metric == 'iops' else 'MiB/s':5} "
                                f"{rec['cpu_us_per_io']:7.2f} µs/IO  others {rec['others_cpu_pct']:.0f}%"
                            )
                        except BenchError as e:
                            rec["error"] = str(e)
                            log(f"[{done}/{total}] round {rnd} {wl[0]} {name}: {e}")
                    report["runs"].append(rec)
    except KeyboardInterrupt as e:
        interrupted = str(e) or "Ctrl-C"
        log(f"interrupted ({interrupted}); stopping servers, writing the partial report")
    finally:
        for proc in list(LIVE_CLIENTS):
            if proc.poll() is None:
                # fio forks its job into a new session: kill the job by PID too.
                for pid in reversed(process_tree(proc.pid, all_stats())):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
            LIVE_CLIENTS.remove(proc)
        for srv in list(LIVE_SERVERS):
            try:
                srv.stop()
            except Exception as e:  # keep cleaning up the others
                log(f"stopping {srv.name}: {e}")
        shutil.rmtree(ctx.tmpdir, ignore_errors=True)
        for path in (ctx.shared_file, ctx.copy_file):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    if interrupted:
        report["interrupted"] = interrupted
    report["summary"] = summarize(report["runs"], args.servers, workloads)
    md = render(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {os.path.join(args.out, 'results.md')} and results.json (raw fio JSON in fio/)")
    if interrupted:
        return 130
    return 1 if any("error" in r for r in report["runs"]) else 0


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); servers stopped")
        sys.exit(130)
    except (BenchError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        sys.exit(1)
