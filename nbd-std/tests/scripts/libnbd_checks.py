#!/usr/bin/python3
"""Checks of an NBD server through libnbd's Python bindings.

Run with Debian's interpreter (python3-libnbd is installed for it only):

    /usr/bin/python3 libnbd_checks.py URI [--sparse]
    /usr/bin/python3 libnbd_checks.py URI --read-only

URI names a fresh, all-zero, writable export of 64 to 256 MiB. With
--sparse the export is expected to track allocation (a sparse memory
export): unwritten and trimmed ranges report holes, zeroed ones report
zeroes. Without it only what the spec requires of every server is checked
(a ZERO bit means the range reads as zeroes; written data is not ZERO).
With --read-only URI names a read-only export, and only refusals of
modifying commands are checked.

Exits 0 when every check passed; otherwise prints what failed and exits 1.
"""

import errno
import random
import sys
import time

import nbd

MIB = 1 << 20
STATE_HOLE = 1
STATE_ZERO = 2
IN_FLIGHT = 64
DEADLINE_SECONDS = 60


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def connect(uri):
    h = nbd.NBD()
    h.set_handle_name("checks")
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


class Checker:
    def __init__(self, uri, sparse):
        self.uri = uri
        self.sparse = sparse
        self.h = connect(uri)
        self.size = self.h.get_size()
        check(self.size <= 256 * MIB, "export too large for the model: %d" % self.size)
        check(self.size >= 64 * MIB, "export too small: %d" % self.size)
        self.model = bytearray(self.size)
        self.rng = random.Random(0x6E6264)
        self.step = "connect"

    def data(self, n):
        return self.rng.randbytes(n)

    # ----- helpers -------------------------------------------------------

    def write(self, buf, offset, flags=0):
        self.h.pwrite(buf, offset, flags)
        self.model[offset:offset + len(buf)] = buf

    def read_check(self, count, offset, flags=0):
        got = self.h.pread(count, offset, flags)
        want = bytes(self.model[offset:offset + count])
        if got != want:
            at = next(i for i in range(count) if got[i] != want[i])
            raise CheckFailed(
                "read of %d bytes at %d differs from what was written, first at %d "
                "(got %#x, want %#x)" % (count, offset, offset + at, got[at], want[at]))

    def extents(self, offset, length):
        """base:allocation extents covering [offset, offset + length)."""
        out = []
        at = offset
        end = offset + length
        for _ in range(10000):
            if at >= end:
                return out
            got = []

            def callback(metacontext, start, entries, err):
                if metacontext == "base:allocation":
                    got.append((start, list(entries)))
                return 0

            self.h.block_status(end - at, at, callback)
            check(len(got) == 1, "block status at %d: %d base:allocation replies" % (at, len(got)))
            start, entries = got[0]
            check(start == at, "block status at %d answered for %d" % (at, start))
            check(len(entries) >= 2 and len(entries) % 2 == 0,
                  "block status at %d: entries %r" % (at, entries))
            for i in range(0, len(entries), 2):
                length_i, flags = entries[i], entries[i + 1]
                check(length_i > 0, "block status at %d: zero-length extent" % at)
                check(flags & ~3 == 0, "block status at %d: unknown flags %#x" % (at, flags))
                check(at + length_i <= self.size,
                      "block status extent %d+%d beyond the export" % (at, length_i))
                out.append((at, length_i, flags))
                at += length_i
        raise CheckFailed("block status over %d+%d did not finish" % (offset, length))

    def statuses(self, offset, length):
        """The set of flags seen over exactly [offset, offset + length)."""
        return {flags for (_, _, flags) in self.extents(offset, length)}

    def check_zero_bits(self, offset, length):
        """Where ZERO is reported the data reads as zeroes; where the model
        holds non-zero data ZERO is not reported."""
        for start, n, flags in self.extents(offset, length):
            lo, hi = max(start, offset), min(start + n, offset + length)
            if hi <= lo:
                continue
            if flags & STATE_ZERO:
                check(self.read_range(lo, hi - lo) == bytes(hi - lo),
                      "extent %d+%d reports ZERO but reads non-zero data" % (lo, hi - lo))
                check(self.model[lo:hi] == bytes(hi - lo),
                      "extent %d+%d reports ZERO over written data" % (lo, hi - lo))

    def read_range(self, offset, length):
        """Reads any length, in requests of at most 4 MiB."""
        out = bytearray()
        for at in range(offset, offset + length, 4 * MIB):
            out += self.h.pread(min(4 * MIB, offset + length - at), at)
        return bytes(out)

    def resync(self, offset, length):
        """After a trim the content is unspecified: take what the server has."""
        self.model[offset:offset + length] = self.read_range(offset, length)

    def expect_error(self, what, code, function, *args):
        try:
            function(*args)
        except nbd.Error as e:
            check(e.errnum == code,
                  "%s: failed with errno %s (%s), want %s" % (
                      what, e.errnum, e.string, errno.errorcode[code]))
        else:
            raise CheckFailed("%s: succeeded, want %s" % (what, errno.errorcode[code]))
        # The connection stays usable.
        check(self.h.aio_is_ready(), "%s: connection not ready afterwards" % what)
        self.read_check(4096, 0)
        self.write(self.data(512), 512 * self.rng.randrange(1, 100))

    # ----- checks --------------------------------------------------------

    def negotiation(self):
        h = self.h
        check(h.get_protocol() == "newstyle-fixed", "protocol %s" % h.get_protocol())
        check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
        check(h.can_meta_context("base:allocation"), "base:allocation not negotiated")
        check(not h.is_read_only(), "export is read-only")
        minimum = h.get_block_size(nbd.SIZE_MINIMUM)
        check(minimum == 1, "minimum block size %d: unaligned requests need 1" % minimum)

    def fresh_export(self):
        for offset in range(0, self.size, 4 * MIB):
            n = min(4 * MIB, self.size - offset)
            check(self.h.pread(n, offset) == bytes(n), "fresh export not zero at %d" % offset)
        self.check_zero_bits(0, self.size)
        if self.sparse:
            flags = self.statuses(0, self.size)
            check(flags == {STATE_HOLE | STATE_ZERO},
                  "fresh sparse export: statuses %r, want only hole,zero" % flags)

    def allocation(self):
        base = 8 * MIB
        # Written data is never ZERO; on a sparse export it is allocated.
        self.write(self.data(4 * MIB), base)
        self.check_zero_bits(base, 4 * MIB)
        if self.sparse:
            flags = self.statuses(base, 4 * MIB)
            check(flags == {0}, "written range: statuses %r, want data" % flags)
            # The unwritten neighbours are still holes.
            check(self.statuses(base + 4 * MIB, 4 * MIB) == {STATE_HOLE | STATE_ZERO},
                  "range after the written one is no longer a hole")
        # Trim: content unspecified, status must match reads.
        self.h.trim(4 * MIB, base)
        self.resync(base, 4 * MIB)
        self.check_zero_bits(base, 4 * MIB)
        if self.sparse:
            flags = self.statuses(base, 4 * MIB)
            check(all(f & STATE_HOLE for f in flags),
                  "trimmed range: statuses %r, want holes" % flags)
        # Write zeroes over data.
        base = 16 * MIB
        self.write(self.data(4 * MIB), base)
        self.h.zero(4 * MIB, base)
        self.model[base:base + 4 * MIB] = bytes(4 * MIB)
        self.read_check(4 * MIB, base)
        self.check_zero_bits(base, 4 * MIB)
        if self.sparse:
            flags = self.statuses(base, 4 * MIB)
            check(all(f & STATE_ZERO for f in flags),
                  "zeroed range: statuses %r, want zero" % flags)
        # Write zeroes that must stay allocated.
        base = 20 * MIB
        self.write(self.data(4 * MIB), base)
        self.h.zero(4 * MIB, base, nbd.CMD_FLAG_NO_HOLE)
        self.model[base:base + 4 * MIB] = bytes(4 * MIB)
        self.read_check(4 * MIB, base)
        self.check_zero_bits(base, 4 * MIB)
        if self.sparse:
            flags = self.statuses(base, 4 * MIB)
            check(all(not f & STATE_HOLE for f in flags),
                  "NO_HOLE zeroed range: statuses %r, want allocated" % flags)
        # Partly written block: data is not reported ZERO.
        self.write(b"\x01", 24 * MIB + 4095)
        self.check_zero_bits(24 * MIB, MIB)
        # REQ_ONE gives a single extent per context.
        got = []
        self.h.block_status(
            4 * MIB, 8 * MIB,
            lambda ctx, start, entries, err: got.append(list(entries)) or 0,
            nbd.CMD_FLAG_REQ_ONE)
        check(len(got) == 1 and len(got[0]) == 2, "REQ_ONE block status: %r" % got)
        check(got[0][0] <= 4 * MIB, "REQ_ONE extent longer than asked: %r" % got)

    def unaligned(self):
        size = self.size
        cases = [
            (4097, 1000),
            (65536 - 100, 200),
            (1, 1),
            (3 * MIB + 1, MIB + 7),
            (5 * MIB - 3, 4099),
            (size - 1, 1),
            (size - 777, 777),
        ]
        for offset, n in cases:
            self.write(self.data(n), offset)
        for offset, n in cases:
            self.read_check(n, offset)
            # With a byte either side (within the export).
            start, end = offset - 1, min(size, offset + n + 1)
            self.read_check(end - start, start)
        for offset, n in [(0, 1), (3, 5), (4095, 2), (size - 4097, 4097), (12345, 123456)]:
            self.read_check(n, offset)
        # DF: a read of up to 64 KiB comes back in one chunk.
        chunks = []

        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status))
            return 0

        got = self.h.pread_structured(65536, 12345, chunk, nbd.CMD_FLAG_DF)
        check(got == bytes(self.model[12345:12345 + 65536]), "DF read differs")
        check(len(chunks) == 1, "DF read came in chunks %r" % chunks)
        # FUA write.
        self.write(self.data(3000), 7 * MIB + 5, nbd.CMD_FLAG_FUA)
        self.read_check(3000, 7 * MIB + 5)

    def out_of_range(self):
        h = self.h
        size = self.size
        # Let the requests reach the server instead of failing in libnbd.
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
        tail = bytes(self.model[size - 512:size])
        self.expect_error("read across the end", errno.EINVAL, h.pread, 1024, size - 512)
        self.expect_error("read at the end", errno.EINVAL, h.pread, 1, size)
        self.expect_error("read past the end", errno.EINVAL, h.pread, 512, size + MIB)
        self.expect_error("write across the end", errno.ENOSPC, h.pwrite, b"x" * 1024, size - 512)
        self.expect_error("write at the end", errno.ENOSPC, h.pwrite, b"x", size)
        self.expect_error("write zeroes across the end", errno.ENOSPC, h.zero, 1024, size - 512)
        self.expect_error("trim across the end", errno.EINVAL, h.trim, 1024, size - 512)
        # Nothing was written by the refused requests.
        check(h.pread(512, size - 512) == tail, "refused write changed the last sector")
        # A payload larger than the socket buffers: the server must read it
        # all, and reply only then (libnbd cannot take a reply to a write it
        # is still sending).
        self.expect_error("16 MiB write across the end", errno.ENOSPC,
                          h.pwrite, b"x" * (16 * MIB), size - 4096)
        check(h.pread(512, size - 512) == tail, "refused write changed the last sector")
        h.set_strict_mode(h.get_strict_mode() | nbd.STRICT_BOUNDS)

    def overflow(self):
        """Offsets whose end does not fit in 64 bits."""
        h = self.h
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
        top = 1 << 64
        self.expect_error("read ending at 2^64", errno.EINVAL, h.pread, 4096, top - 4096)
        self.expect_error("read ending past 2^64", errno.EINVAL, h.pread, 8192, top - 4096)
        self.expect_error("trim ending past 2^64", errno.EINVAL, h.trim, 8192, top - 4096)
        self.expect_error("write zeroes ending past 2^64", errno.ENOSPC, h.zero, 8192, top - 4096)
        self.expect_error("write ending at 2^64", errno.ENOSPC, h.pwrite, b"y" * 4096, top - 4096)
        self.expect_error("write ending past 2^64", errno.ENOSPC, h.pwrite, b"y" * 8192, top - 4096)
        h.set_strict_mode(h.get_strict_mode() | nbd.STRICT_BOUNDS)

    def large(self):
        """Requests of the maximum block size work; larger ones are refused
        (a write's payload still consumed) and the connection stays in sync."""
        h = self.h
        maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
        check(maximum >= 4096, "maximum block size %d" % maximum)
        n = min(maximum, self.size // 2)
        self.write(self.data(n), 4096)
        self.read_check(n, 4096)
        if maximum + 4096 <= min(self.size, 64 * MIB):
            self.expect_error("read over the maximum block size", errno.EINVAL,
                              h.pread, maximum + 4096, 0)
            self.expect_error("write over the maximum block size", errno.EINVAL,
                              h.pwrite, b"z" * (maximum + 4096), 0)
            self.read_check(n, 4096)

    def wait_all(self, cookies, what):
        h = self.h
        deadline = time.monotonic() + DEADLINE_SECONDS
        while h.aio_in_flight() > 0:
            check(time.monotonic() < deadline, "%s: requests still in flight after %d s" % (
                what, DEADLINE_SECONDS))
            h.poll(1000)
        for cookie in cookies:
            # Raises nbd.Error if the command failed.
            check(h.aio_command_completed(cookie), "%s: cookie %d not completed" % (what, cookie))

    def in_flight(self):
        h = self.h
        slot = 256 * 1024
        base = 32 * MIB
        # Lengths vary and some offsets are unaligned.
        layout = []
        for i in range(IN_FLIGHT):
            n = 4096 * (1 + i % 16) + (i % 3) * 17
            offset = base + i * slot + (i % 5) * 511
            layout.append((offset, n))

        # Phase 1: 64 writes in flight.
        cookies = []
        for offset, n in layout:
            buf = self.data(n)
            self.model[offset:offset + n] = buf
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(buf), offset))
        peak = h.aio_in_flight()
        self.wait_all(cookies, "64 writes")

        # Phase 2: 64 reads in flight, each compared.
        buffers = []
        cookies = []
        for offset, n in layout:
            buf = nbd.Buffer(n)
            buffers.append(buf)
            cookies.append(h.aio_pread(buf, offset))
        peak = max(peak, h.aio_in_flight())
        self.wait_all(cookies, "64 reads")
        for (offset, n), buf in zip(layout, buffers):
            got = bytes(buf.to_bytearray())
            check(got == bytes(self.model[offset:offset + n]),
                  "aio read of %d bytes at %d differs" % (n, offset))

        # Phase 3: 32 writes and 32 reads of other slots at once.
        cookies = []
        reads = []
        for i, (offset, n) in enumerate(layout):
            if i % 2 == 0:
                buf = self.data(n)
                self.model[offset:offset + n] = buf
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(buf), offset))
            else:
                buf = nbd.Buffer(n)
                reads.append((offset, n, buf))
                cookies.append(h.aio_pread(buf, offset))
        peak = max(peak, h.aio_in_flight())
        self.wait_all(cookies, "mixed reads and writes")
        for offset, n, buf in reads:
            check(bytes(buf.to_bytearray()) == bytes(self.model[offset:offset + n]),
                  "mixed phase: aio read at %d differs" % offset)
        for offset, n in layout:
            self.read_check(n, offset)
        check(peak >= IN_FLIGHT // 2, "only %d requests were in flight at once" % peak)

        # Flush in flight with writes.
        cookies = []
        for i in range(8):
            offset = 60 * MIB + i * 4096
            buf = self.data(4096)
            self.model[offset:offset + 4096] = buf
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(buf), offset))
        cookies.append(h.aio_flush())
        self.wait_all(cookies, "flush after writes")
        self.read_check(8 * 4096, 60 * MIB)

    def everything(self):
        self.h.flush()
        for offset in range(0, self.size, 4 * MIB):
            self.read_check(min(4 * MIB, self.size - offset), offset)
        # A second connection sees the same data.
        other = connect(self.uri)
        for offset in range(0, self.size, 16 * MIB):
            n = min(4 * MIB, self.size - offset)
            check(other.pread(n, offset) == bytes(self.model[offset:offset + n]),
                  "second connection reads different data at %d" % offset)
        other.shutdown()
        self.h.shutdown()

    def run(self):
        """Runs every check; a failed one is reported and the rest still run
        (on a new connection if the failure closed this one)."""
        failures = 0
        for name in ["negotiation", "fresh_export", "allocation", "unaligned",
                     "out_of_range", "overflow", "large", "in_flight", "everything"]:
            self.step = name
            started = time.monotonic()
            try:
                getattr(self, name)()
            except (CheckFailed, nbd.Error) as e:
                failures += 1
                kind = "libnbd error: " if isinstance(e, nbd.Error) else ""
                print("FAIL %-14s %s%s" % (name, kind, e), flush=True)
                if not self.h.aio_is_ready():
                    print("     (connection lost: reconnecting)", flush=True)
                    self.h = connect(self.uri)
                continue
            print("ok   %-14s %.2f s" % (name, time.monotonic() - started), flush=True)
        return failures


def read_only_checks(uri):
    """A read-only export: reads work, writes fail with EPERM, other
    modifying commands are refused, and the connection stays usable."""
    h = connect(uri)
    h.set_strict_mode(0)
    failures = 0
    size = h.get_size()
    before = h.pread(min(size, MIB), 0)

    def refused(what, codes, function, *args):
        nonlocal failures, h
        problem = None
        try:
            function(*args)
            problem = "succeeded on a read-only export"
        except nbd.Error as e:
            if e.errnum not in codes:
                problem = "errno %s (%s), want %s" % (
                    e.errnum, e.string, "/".join(errno.errorcode[c] for c in codes))
        if not h.aio_is_ready():
            problem = (problem + "; " if problem else "") + "connection lost"
            h = connect(uri)
            h.set_strict_mode(0)
        elif h.pread(min(size, MIB), 0) != before:
            problem = (problem + "; " if problem else "") + "data changed"
        if problem:
            failures += 1
            print("FAIL %s: %s" % (what, problem), flush=True)
        else:
            print("ok   %s" % what, flush=True)

    if not h.is_read_only():
        print("FAIL export does not announce read-only")
        failures += 1
    refused("write", [errno.EPERM], h.pwrite, b"w" * 4096, 0)
    refused("unaligned write", [errno.EPERM], h.pwrite, b"w" * 3, 5)
    # Larger than the socket buffers: the whole payload must be read.
    refused("16 MiB write", [errno.EPERM], h.pwrite, b"w" * (16 * MIB), 0)
    refused("write zeroes", [errno.EPERM, errno.EINVAL], h.zero, 4096, 0)
    refused("trim", [errno.EPERM, errno.EINVAL], h.trim, 4096, 0)
    h.shutdown()
    return failures


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    if "--read-only" in sys.argv[2:]:
        failures = read_only_checks(sys.argv[1])
    else:
        failures = Checker(sys.argv[1], "--sparse" in sys.argv[2:]).run()
    if failures:
        print("%d check(s) failed" % failures)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
