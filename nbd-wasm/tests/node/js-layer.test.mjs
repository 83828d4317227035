// The JavaScript layer (nbd-wasm/js/) from Node: disks, serveDisk over
// provider sessions, NbdConnection, partition tables and the option
// reader, with an in-memory bridge (memory-bridge.mjs). Run after
// nbd-wasm/build.sh with: node --test nbd-wasm/tests/node/
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as nbd from "../../js/index.js";
import { MemoryBridge } from "./memory-bridge.mjs";
import { random } from "./harness.mjs";

await nbd.load();

const MiB = 1024 * 1024;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The test pattern, computed here independently of fillPattern. */
function pattern(offset, length) {
  const out = Buffer.alloc(length);
  for (let at = 0; at < length; at += 4) out.writeUInt32LE(Math.imul((offset + at) / 4 + 1, 0x9e3779b1) >>> 0, at);
  return new Uint8Array(out);
}

async function until(condition, what, ms = 2000) {
  for (const start = Date.now(); !condition(); await sleep(2)) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
  }
}

/** Serves `disk` through a memory bridge; returns the server, the bridge and the events seen. */
async function serve(disk, options = {}) {
  const bridge = new MemoryBridge();
  const events = [];
  const server = nbd.serveDisk("ws://bridge/", disk, {
    WebSocket: bridge.Provider, onEvent: (e) => events.push(e), ...options,
  });
  await until(() => server.states.idle === 1, "an idle session");
  const connect = (opts = {}) => nbd.connectExport("ws://bridge/", { WebSocket: bridge.Client, ...opts });
  return { bridge, server, events, connect };
}

test("sizes parse and format", () => {
  assert.equal(nbd.parseSize("64M"), 64 * MiB);
  assert.equal(nbd.parseSize("1GiB"), 1024 * MiB);
  assert.equal(nbd.parseSize("4096"), 4096);
  assert.equal(nbd.parseSize("1.5k"), 1536);
  assert.throws(() => nbd.parseSize("12X"), /use bytes/);
  assert.equal(nbd.formatSize(64 * MiB), "64 MiB");
  assert.equal(nbd.formatSize(1536), "1.5 KiB");
});

test("RamDisk: pattern, reads, writes, zero extents", () => {
  const disk = new nbd.RamDisk("1M", { fill: "pattern" });
  assert.deepEqual(disk.read(4096, 64), pattern(4096, 64));
  disk.zero(8192, 3 * 4096);
  assert.deepEqual(disk.extents(0, MiB), [
    { length: 8192, status: 0 }, { length: 3 * 4096, status: 2 }, { length: MiB - 5 * 4096, status: 0 },
  ]);
  assert.throws(() => disk.read(MiB - 1, 2), /outside the disk/);
});

test("serveDisk: the greeting goes out at once; a client reads the pattern, writes, reads back; one idle session stays", async () => {
  const disk = new nbd.RamDisk(4 * MiB, { fill: "pattern" });
  const { bridge, server, events, connect } = await serve(disk, { name: "ram", description: "a RAM disk" });
  assert.equal(bridge.idle.length, 1);
  assert.deepEqual(bridge.idle[0].protocols, ["binary"]);
  assert.equal(Buffer.from(bridge.idle[0].buffered[0].subarray(0, 16)).toString(), "NBDMAGICIHAVEOPT");

  const conn = await connect({ exportName: "ram" });
  assert.equal(conn.export.size, 4 * MiB);
  assert.equal(conn.export.readOnly, false);
  assert.ok(nbd.flagNames(conn.export.flags).includes("SEND_FLUSH"));
  assert.deepEqual(await conn.read(MiB, 4096), pattern(MiB, 4096));
  const data = new Uint8Array(10000).fill(0xab);
  await conn.write(12345, data);
  await conn.flush();
  assert.deepEqual(await conn.read(12345, 10000), data);
  assert.deepEqual(disk.bytes.subarray(12345, 22345), data);
  assert.deepEqual(server.states, { connecting: 0, idle: 1, active: 1 });

  // A second client while the first is attached gets the new idle session.
  const second = await connect({ exportName: "ram" });
  assert.deepEqual(await second.read(0, 8), pattern(0, 8));
  await second.close();
  await conn.close();
  await until(() => server.states.active === 0, "sessions to close");
  assert.equal(server.states.idle, 1);
  assert.equal(bridge.pairs, 2);

  const types = events.map((e) => e.type);
  for (const type of ["connecting", "idle", "attached", "option", "exportSelected", "request", "done", "closed"]) {
    assert.ok(types.includes(type), `event ${type} seen`);
  }
  const options = events.filter((e) => e.type === "option" && e.session === 1).map((e) => e.name);
  assert.deepEqual(options.slice(-1), ["GO"]);
  assert.ok(options.includes("EXTENDED_HEADERS") || options.includes("STRUCTURED_REPLY"));
  const go = events.find((e) => e.type === "option" && e.name === "GO");
  assert.match(go.detail, /export "ram"/);
  const selected = events.find((e) => e.type === "exportSelected");
  assert.equal(selected.name, "ram");
  assert.equal(server.stats.bytesWritten, 10000);
  assert.equal(server.stats.bytesRead, 4096 + 10000 + 8);
  server.stop();
});

test("serveDisk: storage completes out of order; every read gets its own data", async () => {
  const ram = new nbd.RamDisk(2 * MiB, { fill: "pattern" });
  const rand = random(9);
  const order = [];
  // A disk whose reads finish after random delays, so later requests often finish first.
  const slow = {
    size: ram.size, readOnly: false, capabilities: ram.capabilities,
    async read(offset, length) {
      await sleep(rand(15));
      order.push(offset);
      return ram.read(offset, length);
    },
    write: (o, d) => ram.write(o, d), zero: (o, l) => ram.zero(o, l), flush() {}, extents: (o, l) => ram.extents(o, l),
  };
  const { server, connect } = await serve(slow, { logRequests: false });
  const conn = await connect();
  const offsets = Array.from({ length: 40 }, (_, i) => i * 40960 + 4 * rand(100));
  const reads = await Promise.all(offsets.map((o) => conn.read(o, 5000 + 4 * rand(2000))));
  reads.forEach((data, i) => assert.deepEqual(data, pattern(offsets[i], data.length)));
  assert.notDeepEqual(order, offsets, "completions came out of order");
  assert.deepEqual([...order].sort((a, b) => a - b), [...offsets].sort((a, b) => a - b));
  await conn.close();
  server.stop();
});

test("serveDisk: reads wait while the WebSocket send buffer is full", async () => {
  const disk = new nbd.RamDisk(MiB, { fill: "pattern" });
  const { server, connect } = await serve(disk);
  const conn = await connect();
  const active = [...server.sessions].find((s) => s.state === "active");
  active.ws.bufferedAmount = 64 * MiB; // as if the network were slow
  let done = false;
  const read = conn.read(0, 4096).then((data) => {
    done = true;
    return data;
  });
  await sleep(60);
  assert.equal(done, false, "the read waits for the send buffer to drain");
  active.ws.bufferedAmount = 0;
  assert.deepEqual(await read, pattern(0, 4096));
  await conn.close();
  server.stop();
});

test("serveDisk: disk failures become NBD errors, and the session goes on", async () => {
  const ram = new nbd.RamDisk(MiB);
  const flaky = {
    size: ram.size, readOnly: false, capabilities: { flush: true },
    read(offset, length) {
      if (offset === 0) throw new nbd.DiskError("medium error", "EIO");
      if (offset === 4096) return ram.read(offset, length - 1); // short: cannot be the answer
      return Promise.reject(Object.assign(new Error("full"), { nbdError: "ENOSPC" }));
    },
    write: async () => {
      throw new nbd.DiskError("no space", "ENOSPC");
    },
    flush() {},
  };
  const events = [];
  const { server, connect } = await serve(flaky, { onEvent: (e) => events.push(e) });
  const conn = await connect();
  await assert.rejects(conn.read(0, 512), (e) => e.nbdError === "EIO");
  await assert.rejects(conn.read(4096, 512), (e) => e.nbdError === "EIO");
  await assert.rejects(conn.read(8192, 512), (e) => e.nbdError === "ENOSPC");
  await assert.rejects(conn.write(0, new Uint8Array(100)), (e) => e.nbdError === "ENOSPC");
  await conn.flush();
  const failed = events.filter((e) => e.type === "done" && e.error).map((e) => `${e.op} ${e.error} ${e.message}`);
  assert.equal(failed.length, 4);
  assert.match(failed[1], /read EIO read \d+ wants 512 bytes, got 511/);
  assert.equal(server.stats.errors, 4);
  await conn.close();
  server.stop();
});

test("serveDisk: an idle session the bridge drops is opened again (with a delay); stop ends everything", async () => {
  const { bridge, server, events, connect } = await serve(new nbd.RamDisk(MiB));
  const first = bridge.idle[0];
  first.close(1001, "bridge restarting");
  await until(() => events.some((e) => e.type === "disconnected"), "a disconnected event");
  assert.equal(server.states.idle + server.states.connecting, 0, "no reconnect at once");
  await until(() => server.states.idle === 1, "a new idle session", 3000);
  assert.notEqual(bridge.idle[0], first);
  const conn = await connect();
  assert.equal(conn.export.size, MiB);
  server.stop();
  await until(() => conn.closed, "the client to see the end");
  assert.equal(bridge.idle.length, 0);
  assert.deepEqual(server.states, { connecting: 0, idle: 0, active: 0 });
});

test("serveDisk: big reads: messages of at most 4 MiB, at most 16 MiB of replies under way (one read always goes)", async () => {
  const ram = new nbd.RamDisk(64 * MiB, { fill: "pattern" });
  let reading = 0;
  let most = 0;
  const counted = {
    size: ram.size, readOnly: false, capabilities: {},
    async read(offset, length) {
      reading += length;
      most = Math.max(most, reading);
      await sleep(2);
      reading -= length;
      return ram.read(offset, length);
    },
  };
  const { server, connect } = await serve(counted, { logRequests: false });
  const conn = await connect();
  const active = [...server.sessions].find((s) => s.state === "active");
  // Eight reads of 6 MiB at once, and one of 24 MiB (more than the mark on its own).
  const reads = Array.from({ length: 8 }, (_, i) => conn.read(i * 6 * MiB, 6 * MiB));
  reads.push(conn.read(40 * MiB, 24 * MiB));
  const results = await Promise.all(reads);
  results.slice(0, 8).forEach((data, i) => assert.deepEqual(data.subarray(0, 64), pattern(i * 6 * MiB, 64)));
  assert.deepEqual(results[8].subarray(24 * MiB - 64), pattern(64 * MiB - 64, 64));
  assert.ok(active.ws.largestMessage <= 4 * MiB, `largest message ${active.ws.largestMessage}`);
  assert.ok(most <= 24 * MiB, `at most one big read or 16 MiB under way, saw ${most}`);
  await conn.close();
  server.stop();
});

test("serveDisk: a FileDisk (Blob) is read-only: reads match, writes are refused", async () => {
  const bytes = pattern(0, 256 * 1024);
  const disk = new nbd.FileDisk(new Blob([bytes]));
  const { server, connect } = await serve(disk, { name: "file" });
  const conn = await connect({ exportName: "file" });
  assert.equal(conn.export.readOnly, true);
  const data = await conn.read(1000, 50000);
  assert.equal(createHash("sha256").update(data).digest("hex"), createHash("sha256").update(bytes.subarray(1000, 51000)).digest("hex"));
  // The client refuses before sending (the export's READ_ONLY flag); the
  // browser test sends writes anyway (nbdsh, qemu-io) and sees EPERM.
  await assert.rejects(conn.write(0, new Uint8Array(512)), /read-only/);
  await conn.close();
  server.stop();
});

test("NbdConnection: list exports, block status of a RAM disk with zeroes, refusals", async () => {
  const disk = new nbd.RamDisk(MiB, { fill: "pattern" });
  disk.zero(64 * 1024, 128 * 1024);
  const { server, connect, bridge, events } = await serve(disk, { name: "disk", description: "test disk" });
  const list = await nbd.listExports("ws://bridge/", { WebSocket: bridge.Client });
  assert.deepEqual(list, [{ name: "disk", description: "test disk" }]);
  await until(() => server.states.idle === 1, "a new idle session");
  const conn = await connect({ exportName: "disk" });
  const extents = await conn.blockStatus(0, MiB);
  assert.deepEqual(extents, [
    { offset: 0, length: 65536, status: 0 },
    { offset: 65536, length: 131072, status: 2 },
    { offset: 196608, length: MiB - 196608, status: 0 },
  ]);
  await conn.close();
  await until(() => server.states.idle === 1, "a new idle session");
  await assert.rejects(connect({ exportName: "nope" }), /refused|closed/);
  // The refused GO was read, and so was what the client sent after it.
  const refused = events.filter((e) => e.type === "option" && e.session === 3).map((e) => `${e.name} ${e.detail}`);
  assert.ok(refused.some((o) => /^GO export "nope", info /.test(o)), refused.join("; "));
  assert.equal(refused.at(-1), "ABORT ", refused.join("; "));
  server.stop();
  // No idle provider any more: a client is refused, not left hanging.
  await assert.rejects(connect(), /closed/);
});

test("OptionReader: names the options of a captured negotiation", () => {
  const option = (code, data) => {
    const head = Buffer.alloc(16);
    head.write("IHAVEOPT");
    head.writeUInt32BE(code, 8);
    head.writeUInt32BE(data.length, 12);
    return Buffer.concat([head, data]);
  };
  const go = Buffer.alloc(4 + 4 + 2 + 4);
  go.writeUInt32BE(4, 0);
  go.write("disk", 4);
  go.writeUInt16BE(2, 8);
  go.writeUInt16BE(3, 10);
  go.writeUInt16BE(1, 12);
  const meta = Buffer.alloc(4 + 4 + 4 + 15);
  meta.writeUInt32BE(0, 0);
  meta.writeUInt32BE(1, 4);
  meta.writeUInt32BE(15, 8);
  meta.write("base:allocation", 12);
  const bytes = Buffer.concat([Buffer.from([0, 0, 0, 3]), option(11, Buffer.alloc(0)), option(10, meta), option(7, go), Buffer.from("after")]);
  const reader = new nbd.OptionReader();
  const seen = [];
  // Byte by byte: options split anywhere are still read whole.
  for (const b of bytes) seen.push(...reader.push(Uint8Array.of(b)));
  assert.equal(reader.clientFlags, 3);
  assert.deepEqual(seen.map((o) => `${o.name}: ${o.detail}`), [
    "EXTENDED_HEADERS: ", "SET_META_CONTEXT: base:allocation", 'GO: export "disk", info BLOCK_SIZE NAME',
  ]);
});

test("partition tables: MBR with logical partitions, and GPT", async () => {
  const sector = 512;
  const disk = new Uint8Array(4 * MiB);
  const view = new DataView(disk.buffer);
  const entry = (base, slot, type, start, sectors, boot = false) => {
    const at = base + 446 + 16 * slot;
    disk[at] = boot ? 0x80 : 0;
    disk[at + 4] = type;
    view.setUint32(at + 8, start, true);
    view.setUint32(at + 12, sectors, true);
    disk[base + 510] = 0x55;
    disk[base + 511] = 0xaa;
  };
  entry(0, 0, 0x83, 2048, 2048, true);
  entry(0, 1, 0x05, 4096, 4096);
  entry(4096 * sector, 0, 0x82, 63, 1000); // first logical, relative to its EBR
  entry(4096 * sector, 1, 0x05, 2048, 2048); // next EBR, relative to the extended partition
  entry(6144 * sector, 0, 0x0c, 63, 500);
  view.setUint32(440, 0xdeadbeef, true);
  const read = async (offset, length) => disk.slice(offset, offset + length);
  const mbr = await nbd.readPartitionTable(read, disk.length);
  assert.equal(mbr.scheme, "mbr");
  assert.equal(mbr.diskId, "deadbeef");
  assert.deepEqual(mbr.partitions.map((p) => [p.number, p.start, p.end, p.typeName, p.bootable]), [
    [1, 2048, 4095, "Linux", true], [2, 4096, 8191, "Extended", false],
    [5, 4159, 5158, "Linux swap", false], [6, 6207, 6706, "W95 FAT32 (LBA)", false],
  ]);
  assert.deepEqual(mbr.warnings, []);

  // GPT: protective MBR, header at LBA 1, entries at LBA 2.
  const gpt = new Uint8Array(4 * MiB);
  const g = new DataView(gpt.buffer);
  gpt.set(Buffer.from("55aa", "hex"), 510);
  gpt[446 + 4] = 0xee;
  g.setUint32(446 + 8, 1, true);
  g.setUint32(446 + 12, 8191, true);
  gpt.set(Buffer.from("EFI PART"), 512);
  g.setBigUint64(512 + 72, 2n, true);
  g.setUint32(512 + 80, 128, true);
  g.setUint32(512 + 84, 128, true);
  const guid = (text) => {
    const hex = text.replaceAll("-", "");
    const b = Buffer.from(hex, "hex");
    return Buffer.concat([b.subarray(0, 4).reverse(), b.subarray(4, 6).reverse(), b.subarray(6, 8).reverse(), b.subarray(8)]);
  };
  const put = (i, type, first, last, name) => {
    const at = 1024 + i * 128;
    gpt.set(guid(type), at);
    gpt.set(guid("11111111-2222-3333-4444-555555555555"), at + 16);
    g.setBigUint64(at + 32, BigInt(first), true);
    g.setBigUint64(at + 40, BigInt(last), true);
    gpt.set(Buffer.from(name, "utf16le"), at + 56);
  };
  put(0, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", 2048, 4095, "EFI");
  put(1, "0fc63daf-8483-4772-8e79-3d69d8477de4", 4096, 8158, "root");
  const table = await nbd.readPartitionTable(async (o, l) => gpt.slice(o, o + l), gpt.length);
  assert.equal(table.scheme, "gpt");
  assert.deepEqual(table.partitions.map((p) => [p.number, p.start, p.end, p.typeName, p.name]), [
    [1, 2048, 4095, "EFI System", "EFI"], [2, 4096, 8158, "Linux filesystem", "root"],
  ]);
  assert.equal(table.partitions[0].guid, "11111111-2222-3333-4444-555555555555");

  const blank = await nbd.readPartitionTable(async (o, l) => new Uint8Array(l), MiB);
  assert.equal(blank.scheme, null);
});
