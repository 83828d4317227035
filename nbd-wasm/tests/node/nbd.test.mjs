// NbdServer and NbdClient (the Node build of nbd-wasm) against each other
// in memory, and against recorded protocol bytes. Run after
// nbd-wasm/build.sh with: node --test nbd-wasm/tests/node/
import { test } from "node:test";
import assert from "node:assert/strict";
import { Pair, hex, nbd, random, toHex } from "./harness.mjs";

const MiB = 1024 * 1024;
const ALL = {
  flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true,
  cache: true, resize: true, multiConn: true, blockStatus: true,
};

function randomBytes(rand, length) {
  const data = new Uint8Array(length);
  for (let i = 0; i < length; i++) data[i] = rand(256);
  return data;
}

test("defaultPort is the IANA port", () => {
  assert.equal(nbd.defaultPort(), 10809);
});

test("negotiation: export selected on both sides", () => {
  const pair = new Pair({
    exports: [
      { name: "other", size: 4096 },
      { name: "disk", size: MiB, description: "a RAM disk", capabilities: ALL },
    ],
    clientOptions: { exportName: "disk" },
    storage: new Uint8Array(MiB),
  });
  pair.connect();
  const selected = pair.serverEvents.find((e) => e.type === "exportSelected");
  assert.deepEqual(
    { ...selected, flags: undefined },
    { type: "exportSelected", index: 1, name: "disk", size: MiB, flags: undefined,
      structuredReplies: true, extendedHeaders: true },
  );
  const info = pair.clientEvents.find((e) => e.type === "export");
  assert.equal(info.size, MiB);
  assert.equal(info.flags, selected.flags);
  assert.equal(info.canFlush && info.canTrim && info.canWriteZeroes && info.extendedHeaders, true);
  assert.equal(info.readOnly, false);
  const { type, ...fields } = info;
  assert.equal(type, "export");
  assert.deepEqual(pair.client.export, fields);
  assert.ok(pair.clientEvents.some((e) => e.type === "ready"));
  assert.equal(pair.client.isReady, true);
});

for (const [label, clientOptions] of [
  ["extended headers", {}],
  ["structured replies", { extendedHeaders: false }],
  ["simple replies", { structuredReplies: false, extendedHeaders: false, blockStatus: false }],
]) {
  test(`${label}: many writes and reads in flight, completed asynchronously out of order`, async () => {
    const size = 2 * MiB;
    const storage = new Uint8Array(size);
    const pair = new Pair({
      exports: [{ name: "", size, capabilities: ALL }],
      clientOptions,
      storage,
      seed: 7,
    });
    pair.connect();
    const rand = random(42);
    const mirror = new Uint8Array(size);
    // 64 writes of various sizes at disjoint places (some bigger than one push).
    const writes = [];
    for (let i = 0; i < 64; i++) {
      const offset = i * 32768 + rand(1000);
      const data = randomBytes(rand, 1 + rand(i % 8 === 0 ? 30000 : 3000));
      mirror.set(data, offset);
      writes.push(pair.write(offset, data));
    }
    assert.ok(pair.server.inFlight > 1 || pair.pending > 1, "requests are in flight together");
    for (const result of await Promise.all(writes)) assert.equal(result.error, null);
    assert.equal((await pair.request((c) => c.flush())).error, null);
    assert.deepEqual(storage, mirror);

    const reads = [];
    for (let i = 0; i < 40; i++) {
      const offset = rand(size - 70000);
      const length = 1 + rand(70000);
      reads.push(pair.read(offset, length).then((r) => ({ ...r, offset, length })));
    }
    const results = await Promise.all(reads);
    for (const { error, data, offset, length } of results) {
      assert.equal(error, null);
      assert.deepEqual(data, mirror.subarray(offset, offset + length));
    }
    // Completions came in another order than the requests.
    const order = pair.clientEvents.filter((e) => e.type === "done").map((e) => e.id);
    assert.notDeepEqual(order, [...order].sort((a, b) => a - b));
  });
}

test("held completions answered in reverse order", async () => {
  const storage = Uint8Array.from({ length: 64 * 1024 }, (_, i) => i % 251);
  const pair = new Pair({ exports: [{ name: "", size: storage.length }], storage, hold: true });
  pair.connect();
  const reads = [];
  for (let i = 0; i < 8; i++) reads.push(pair.read(i * 4096, 4096));
  assert.equal(pair.server.inFlight, 8);
  assert.equal(pair.held.length, 8);
  pair.release([7, 6, 5, 4, 3, 2, 1, 0]);
  const done = pair.clientEvents.filter((e) => e.type === "done");
  const dataOrder = pair.clientEvents
    .filter((e) => e.type === "readData")
    .map((e) => e.offset / 4096);
  assert.deepEqual(dataOrder, [7, 6, 5, 4, 3, 2, 1, 0]);
  assert.equal(done.length, 8);
  const results = await Promise.all(reads);
  results.forEach(({ error, data }, i) => {
    assert.equal(error, null);
    assert.deepEqual(data, storage.subarray(i * 4096, (i + 1) * 4096));
  });
});

test("a flush waits for the writes before it", () => {
  const storage = new Uint8Array(MiB);
  const pair = new Pair({ exports: [{ name: "", size: MiB, capabilities: ALL }], storage, hold: true });
  pair.connect();
  pair.write(0, new Uint8Array(512).fill(1));
  pair.request((c) => c.flush());
  assert.equal(pair.serverEvents.filter((e) => e.type === "flush").length, 0);
  pair.release(); // completes the write; the flush is handed out now
  assert.equal(pair.serverEvents.filter((e) => e.type === "flush").length, 1);
  pair.release();
  assert.equal(pair.clientEvents.filter((e) => e.type === "done").length, 2);
});

test("block status, holes, zeroing and trim", async () => {
  const size = MiB;
  const storage = new Uint8Array(size);
  storage.fill(9, 8192, 16384);
  const pair = new Pair({ exports: [{ name: "", size, capabilities: ALL }], storage });
  pair.connect();
  const status = await pair.request((c) => c.blockStatus(0, 65536), {});
  assert.equal(status.error, null);
  assert.deepEqual(status.extents.slice(0, 3), [
    { length: 8192, status: 3 },
    { length: 8192, status: 0 },
    { length: 65536 - 16384, status: 3 },
  ]);
  const bs = pair.clientEvents.find((e) => e.type === "blockStatus");
  assert.equal(bs.offset, 0);
  assert.ok(bs.contextId > 0);

  assert.equal((await pair.request((c) => c.writeZeroes(8192, 4096, true))).error, null);
  assert.equal((await pair.request((c) => c.trim(12288, 4096))).error, null);
  assert.ok(storage.subarray(8192, 16384).every((b) => b === 0));
  const zeroes = pair.serverEvents.find((e) => e.type === "writeZeroes");
  assert.equal(zeroes.noHole, true);

  // A hole answered with completeReadZeroes comes as readHole.
  pair.hold = true;
  const read = pair.read(0, 4096);
  const request = pair.serverEvents.at(-1);
  assert.equal(request.type, "read");
  pair.held = [];
  pair.server.completeReadZeroes(request.id);
  pair.pump();
  const { error, data } = await read;
  assert.equal(error, null);
  assert.deepEqual(data, new Uint8Array(4096));
  assert.ok(pair.clientEvents.some((e) => e.type === "readHole" && e.length === 4096));
});

test("storage errors reach the client by name; misuse throws", async () => {
  const storage = new Uint8Array(MiB);
  const pair = new Pair({ exports: [{ name: "", size: MiB, capabilities: ALL }], storage, hold: true });
  pair.connect();
  const read = pair.read(0, 512);
  const write = pair.write(4096, new Uint8Array(512));
  const [readEvent] = pair.serverEvents.filter((e) => e.type === "read");
  const [writeEvent] = pair.serverEvents.filter((e) => e.type === "write");
  assert.throws(() => pair.server.complete(readEvent.id, null), /completeRead/);
  assert.throws(() => pair.server.completeRead(readEvent.id, new Uint8Array(5)), /wants 512 bytes/);
  assert.throws(() => pair.server.complete(readEvent.id, "EBOGUS"), /unknown NBD error/);
  assert.throws(() => pair.server.complete(12345, null), /no request in flight/);
  pair.server.complete(readEvent.id, "EIO");
  pair.server.complete(writeEvent.id, "NBD_ENOSPC");
  pair.held = [];
  pair.pump();
  assert.equal((await read).error, "EIO");
  assert.equal((await write).error, "ENOSPC");

  assert.throws(() => pair.client.read(MiB, 512), /past the end/);
  assert.throws(() => pair.client.read(-1, 512), /non-negative integer/);
  assert.throws(() => new nbd.NbdServer([{ name: "x" }]), /without size/);
  assert.throws(
    () => new nbd.NbdServer([{ name: "x", size: 4096, blockSizes: { minimum: 3 } }]),
    /minimum block size/,
  );
});

test("read-only export: writes refused by the client before sending", () => {
  const pair = new Pair({
    exports: [{ name: "ro", size: 65536, readOnly: true }],
    clientOptions: { exportName: "ro" },
    storage: new Uint8Array(65536),
  });
  pair.connect();
  assert.equal(pair.client.export.readOnly, true);
  assert.throws(() => pair.client.write(0, new Uint8Array(512)), /read-only/);
});

test("disconnect waits for requests in flight, then both sides close", async () => {
  const storage = new Uint8Array(65536);
  const pair = new Pair({ exports: [{ name: "", size: 65536 }], storage });
  pair.connect();
  const read = pair.read(0, 4096);
  pair.client.disconnect();
  pair.pump();
  assert.equal((await read).error, null);
  assert.deepEqual(pair.serverEvents.at(-1), { type: "close", reason: "disconnect" });
  assert.deepEqual(pair.clientEvents.at(-1), { type: "close" });
  assert.equal(pair.server.isClosed, true);
  assert.equal(pair.client.isClosed, true);
  pair.client.end();
});

test("list mode and unknown exports", () => {
  const exports = [
    { name: "a", size: 4096, description: "first" },
    { name: "b", size: 8192 },
  ];
  const list = new Pair({ exports, clientOptions: { mode: "list" }, storage: new Uint8Array(0) });
  list.pump();
  assert.deepEqual(
    list.clientEvents.filter((e) => e.type === "listEntry"),
    [
      { type: "listEntry", name: "a", description: "first" },
      { type: "listEntry", name: "b", description: "" },
    ],
  );
  assert.equal(list.clientEvents.at(-1).type, "close");
  assert.equal(list.serverEvents.at(-1).reason, "abort");

  const missing = new Pair({ exports, clientOptions: { exportName: "zzz" }, storage: new Uint8Array(0) });
  missing.pump();
  const refused = missing.clientEvents.find((e) => e.type === "optionRefused");
  assert.equal(refused.option, "Go");
  assert.match(refused.replyType, /Unknown/);
});

// A client session recorded as bytes: fixed newstyle with NO_ZEROES,
// NBD_OPT_EXPORT_NAME "disk", one 512-byte read at 4096 (cookie
// 0x0102030405060708), NBD_CMD_DISC.
const CLIENT_CAPTURE = `
  00000003
  49484156454f5054 00000001 00000004 6469736b
  25609513 0000 0000 0102030405060708 0000000000001000 00000200
  25609513 0000 0002 0000000000000009 0000000000000000 00000000`;

function replayServer(chunkSize) {
  const storage = Uint8Array.from({ length: MiB }, (_, i) => (i * 7) % 256);
  const server = new nbd.NbdServer([{ name: "disk", size: MiB }]);
  let output = server.takeOutput();
  assert.equal(toHex(output), "4e42444d41474943" + "49484156454f5054" + "0003");
  const capture = hex(CLIENT_CAPTURE);
  const events = [];
  for (let at = 0; at < capture.length; at += chunkSize) {
    events.push(...server.push(capture.subarray(at, at + chunkSize)));
  }
  output = server.takeOutput();
  // NBD_OPT_EXPORT_NAME's reply: size and transmission flags (HAS_FLAGS), no zeroes.
  assert.equal(toHex(output), "0000000000100000" + "0001");
  assert.equal(events[0].type, "exportSelected");
  const read = events[1];
  assert.deepEqual(read, { type: "read", offset: 4096, length: 512, id: read.id });
  assert.equal(events.length, 2, "DISC waits for the read");
  assert.ok(server.bufferedInput === 0);
  server.completeRead(read.id, storage.subarray(4096, 4096 + 512));
  assert.deepEqual(server.poll(), [{ type: "close", reason: "disconnect" }]);
  output = server.takeOutput();
  assert.equal(toHex(output.subarray(0, 16)), "67446698" + "00000000" + "0102030405060708");
  assert.deepEqual(output.subarray(16), storage.subarray(4096, 4096 + 512));
  assert.equal(server.isClosed, true);
}

test("server replays a recorded client session (all at once)", () => replayServer(1 << 20));
test("server replays a recorded client session (byte by byte)", () => replayServer(1));
test("server replays a recorded client session (7-byte pieces)", () => replayServer(7));

test("server: a bad magic ends the connection with an error event", () => {
  const server = new nbd.NbdServer([{ name: "", size: 4096 }]);
  server.takeOutput();
  const events = server.push(hex("00000003 0102030405060708 00000001 00000000"));
  assert.equal(events.length, 1);
  assert.equal(events[0].type, "error");
  assert.match(events[0].message, /magic/);
  assert.equal(server.isClosed, true);
});

// A server session recorded as bytes: greeting (FIXED_NEWSTYLE |
// NO_ZEROES), the reply to NBD_OPT_GO (NBD_REP_INFO with NBD_INFO_EXPORT:
// size 1 MiB, flags HAS_FLAGS | SEND_FLUSH; then NBD_REP_ACK), then a
// simple reply to the client's first request (cookie = its id).
test("client replays a recorded server session", () => {
  const client = new nbd.NbdClient({
    exportName: "disk", structuredReplies: false, extendedHeaders: false,
    blockStatus: false, requestBlockSize: false,
  });
  assert.equal(client.takeOutput().length, 0, "the client waits for the greeting");
  let events = client.push(hex("4e42444d41474943 49484156454f5054 0003"));
  assert.deepEqual(events, [{ type: "greeted", flags: 3 }]);
  assert.equal(
    toHex(client.takeOutput()),
    "00000003" + "49484156454f5054" + "00000007" + "0000000a" + "00000004" + "6469736b" + "0000",
  );
  events = client.push(hex(`
    0003e889045565a9 00000007 00000003 0000000c 0000 0000000000100000 0005
    0003e889045565a9 00000007 00000001 00000000`));
  assert.deepEqual(events.map((e) => e.type), ["info", "export", "ready"]);
  assert.deepEqual(events[0], { type: "info", infoType: "export", size: MiB, flags: 5 });
  assert.equal(events[1].canFlush, true);
  const id = client.flush();
  const request = client.takeOutput();
  assert.equal(request.length, 28);
  assert.equal(toHex(request.subarray(0, 8)), "25609513" + "0000" + "0003");
  const cookie = toHex(request.subarray(8, 16));
  events = client.push(hex(`67446698 00000000 ${cookie}`));
  assert.deepEqual(events, [{ type: "done", id, error: null }]);
  // A reply for a cookie nobody sent breaks the protocol.
  events = client.push(hex("67446698 00000000 ffffffffffffff00"));
  assert.equal(events[0].type, "error");
  assert.equal(client.isClosed, true);
});
