// Test helpers: load the Node build of the package, and connect an
// NbdServer to an NbdClient in memory, with a Uint8Array as the server's
// storage and completions that resolve asynchronously (promises, timers),
// so they arrive out of order.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
export const nbd = require("../../pkg/node/nbd_wasm.js");

export const hex = (text) => Uint8Array.from(Buffer.from(text.replace(/\s+/g, ""), "hex"));
export const toHex = (bytes) => Buffer.from(bytes).toString("hex");

/** A small deterministic generator (LCG), so failures reproduce. */
export function random(seed) {
  let state = seed >>> 0;
  return (limit) => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state % limit;
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Serves `storage` with `server` and talks to it with `client`. Storage
 * requests are carried out after a random delay (0..maxDelay ms), or held
 * until `release()` when `hold` is set.
 */
export class Pair {
  constructor({ exports, serverOptions, clientOptions, storage, maxDelay = 3, seed = 1, hold = false }) {
    this.server = new nbd.NbdServer(exports, serverOptions);
    this.client = new nbd.NbdClient(clientOptions ?? {});
    this.storage = storage;
    this.maxDelay = maxDelay;
    this.rand = random(seed);
    this.hold = hold;
    this.held = [];
    this.serverEvents = [];
    this.clientEvents = [];
    this.requests = new Map(); // client request id -> {resolve, chunks, ...}
    this.pending = 0;
  }

  /** Moves bytes both ways until neither side has anything to say. */
  pump() {
    for (;;) {
      let moved = false;
      const toServer = this.client.takeOutput();
      const serverEvents = toServer.length ? this.server.push(toServer) : this.server.poll();
      moved ||= toServer.length > 0 || serverEvents.length > 0;
      for (const event of serverEvents) this.onServerEvent(event);
      const toClient = this.server.takeOutput();
      const clientEvents = toClient.length ? this.client.push(toClient) : this.client.poll();
      moved ||= toClient.length > 0 || clientEvents.length > 0;
      for (const event of clientEvents) this.onClientEvent(event);
      if (!moved) return;
    }
  }

  /** Runs `work` (which completes a request) later, then pumps again. */
  later(work) {
    if (this.hold) {
      this.held.push(work);
      return;
    }
    this.pending++;
    sleep(this.rand(this.maxDelay + 1)).then(() => {
      this.pending--;
      work();
      this.pump();
    });
  }

  /** Runs the held completions in the given order (indexes into `held`). */
  release(order = this.held.map((_, i) => i)) {
    const held = this.held;
    this.held = [];
    for (const i of order) held[i]();
    this.pump();
  }

  onServerEvent(event) {
    this.serverEvents.push(event);
    const { server, storage } = this;
    switch (event.type) {
      case "read":
        this.later(() => server.completeRead(event.id, storage.slice(event.offset, event.offset + event.length)));
        break;
      case "writeData":
        storage.set(event.data, event.offset);
        if (event.remaining === 0) this.later(() => server.complete(event.id, null));
        break;
      case "trim":
      case "writeZeroes":
        storage.fill(0, event.offset, event.offset + event.length);
        this.later(() => server.complete(event.id, null));
        break;
      case "flush":
      case "cache":
        this.later(() => server.complete(event.id, null));
        break;
      case "blockStatus":
        this.later(() => server.completeBlockStatus(event.id, extentsOf(storage, event.offset, event.length)));
        break;
    }
  }

  onClientEvent(event) {
    this.clientEvents.push(event);
    const request = this.requests.get(event.id);
    switch (event.type) {
      case "readData":
        request.data.set(event.data, event.offset - request.offset);
        break;
      case "readHole":
        request.data.fill(0, event.offset - request.offset, event.offset - request.offset + event.length);
        break;
      case "blockStatus":
        request.extents.push(...event.extents);
        break;
      case "done":
        this.requests.delete(event.id);
        request.resolve({ error: event.error, data: request.data, extents: request.extents });
        break;
    }
  }

  /** Issues a client request (`issue` returns its id) and waits for its `done`. */
  request(issue, { offset = 0, length = 0 } = {}) {
    const id = issue(this.client);
    const done = new Promise((resolve) => {
      this.requests.set(id, { resolve, offset, data: new Uint8Array(length), extents: [] });
    });
    this.pump();
    return done;
  }

  read(offset, length) {
    return this.request((c) => c.read(offset, length), { offset, length });
  }

  write(offset, data) {
    return this.request((c) => c.write(offset, data));
  }

  /** Negotiates; resolves once the client is ready. */
  connect() {
    this.pump();
    if (!this.client.isReady) throw new Error(`client not ready: ${JSON.stringify(this.clientEvents)}`);
  }
}

/** Block status of `storage`: 4 KiB blocks of zeroes are holes (status 3). */
export function extentsOf(storage, offset, length) {
  const extents = [];
  const end = Math.min(storage.length, offset + length);
  for (let at = offset; at < end; ) {
    const next = Math.min(end, (Math.floor(at / 4096) + 1) * 4096);
    const zero = storage.subarray(at, next).every((b) => b === 0);
    const status = zero ? 3 : 0;
    const last = extents[extents.length - 1];
    if (last && last.status === status) last.length += next - at;
    else extents.push({ length: next - at, status });
    at = next;
  }
  return extents;
}
