// An NBD client over one WebSocket (through websockify, or any WebSocket
// to TCP proxy, in front of an NBD server), with promises: list exports,
// describe one, read, write, block status.
import { NbdClient } from "./wasm.js";

/** How long connecting and negotiating may take by default. */
const CONNECT_TIMEOUT_MS = 10000;

/** The error of a failed NBD request or session; `nbdError` is the NBD error name when there is one. */
export class NbdRequestError extends Error {
  constructor(message, nbdError = null) {
    super(message);
    this.name = "NbdRequestError";
    this.nbdError = nbdError;
  }
}

/** NBD_FLAG_* transmission flags by bit. */
export const TRANSMISSION_FLAGS = [
  [0x1, "HAS_FLAGS"], [0x2, "READ_ONLY"], [0x4, "SEND_FLUSH"], [0x8, "SEND_FUA"],
  [0x10, "ROTATIONAL"], [0x20, "SEND_TRIM"], [0x40, "SEND_WRITE_ZEROES"], [0x80, "SEND_DF"],
  [0x100, "CAN_MULTI_CONN"], [0x200, "SEND_RESIZE"], [0x400, "SEND_CACHE"], [0x800, "SEND_FAST_ZERO"],
  [0x1000, "BLOCK_STATUS_PAYLOAD"],
];

/** The names of the bits set in transmission `flags`. */
export function flagNames(flags) {
  return TRANSMISSION_FLAGS.filter(([bit]) => flags & bit).map(([, name]) => name);
}

/** One negotiated NBD session over a WebSocket. Open with `NbdConnection.open`. */
export class NbdConnection {
  constructor(ws, client) {
    this.ws = ws;
    this.client = client;
    /** Negotiation events (greeted, info, metaContext, optionRefused, listEntry, export). */
    this.negotiation = [];
    this.contexts = new Map(); // context id -> name
    this.requests = new Map();
    this.closed = false;
    this.closeError = null;
    this.onClose = null;
    this.waiter = null;
  }

  /**
   * Connects to `url` and negotiates. Options: everything `NbdClient`
   * takes (`exportName`, `mode`: "go" | "info" | "list", …), plus
   * `WebSocket` (a constructor; default the global one), `protocols`
   * (default ["binary"], what websockify expects), `timeoutMs`.
   * Resolves once the session is ready (mode "go"), or finished (modes
   * "info" and "list": see `negotiation`).
   */
  static open(url, options = {}) {
    const { WebSocket: WebSocketClass = globalThis.WebSocket, protocols = ["binary"], timeoutMs = CONNECT_TIMEOUT_MS, ...rest } = options;
    const clientOptions = { requestName: true, requestDescription: true, requestBlockSize: true, ...rest };
    const client = new NbdClient(clientOptions);
    const ws = new WebSocketClass(url, protocols);
    ws.binaryType = "arraybuffer";
    const connection = new NbdConnection(ws, client);
    connection.mode = clientOptions.mode ?? "go";
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        connection.fail(new NbdRequestError(`no answer from ${url} within ${timeoutMs} ms`));
      }, timeoutMs);
      connection.waiter = (error) => {
        clearTimeout(timer);
        connection.waiter = null;
        if (error) reject(error);
        else resolve(connection);
      };
      ws.onopen = () => connection.send();
      ws.onmessage = (event) => connection.receive(new Uint8Array(event.data));
      ws.onerror = () => {
        connection.closeError ??= new NbdRequestError(`WebSocket ${url} failed (is websockify running?)`);
      };
      ws.onclose = () => connection.ended();
    });
  }

  /** The export as negotiated (size, flags, block sizes, can* booleans), or null. */
  get export() {
    return this.exportInfo ?? null;
  }

  send() {
    const output = this.client.takeOutput();
    if (output.length && this.ws.readyState === 1) this.ws.send(output);
  }

  receive(bytes) {
    let events;
    try {
      events = this.client.push(bytes);
    } catch (error) {
      this.fail(new NbdRequestError(String(error.message ?? error)));
      return;
    }
    this.handle(events);
    this.send();
  }

  handle(events) {
    for (const event of events) {
      const request = this.requests.get(event.id);
      switch (event.type) {
        case "readData":
          request?.data.set(event.data, event.offset - request.offset);
          break;
        case "readHole":
          request?.data.fill(0, event.offset - request.offset, event.offset - request.offset + event.length);
          break;
        case "blockStatus":
          request?.extents.push({ context: this.contexts.get(event.contextId), offset: event.offset, extents: event.extents });
          break;
        case "done":
          this.requests.delete(event.id);
          if (!request) break;
          if (event.error) request.reject(new NbdRequestError(`${request.what}: ${event.error}`, event.error));
          else request.resolve(request);
          break;
        case "metaContext":
          this.contexts.set(event.contextId, event.name);
          this.negotiation.push(event);
          break;
        case "export":
          this.exportInfo = { ...event };
          delete this.exportInfo.type;
          this.negotiation.push(event);
          break;
        case "ready":
          this.waiter?.(null);
          break;
        case "close":
          this.finish();
          break;
        case "error":
          this.fail(new NbdRequestError(event.message));
          return;
        default:
          this.negotiation.push(event);
      }
    }
  }

  /** The server or the network closed the WebSocket. */
  ended() {
    if (!this.closed) {
      try {
        this.client.end();
      } catch (error) {
        // A clean end (after list/info, or after our disconnect) does not throw.
        this.closeError ??= new NbdRequestError(`connection closed: ${error.message ?? error}`);
      }
      this.handle(this.client.poll());
    }
    this.finish();
  }

  /** The server's refusal message, if it refused an option. */
  refusal() {
    const refused = this.negotiation.find((e) => e.type === "optionRefused" && (e.option.includes("Go") || e.option.includes("ExportName")));
    return refused ? `server refused ${refused.option}: ${refused.replyType}${refused.message ? ` (${refused.message})` : ""}` : null;
  }

  fail(error) {
    this.closeError ??= error;
    if (this.ws.readyState <= 1) this.ws.close();
    this.waiter?.(error);
    this.finish();
  }

  finish() {
    if (this.closed) return;
    this.closed = true;
    if (this.waiter) {
      // Modes "list" and "info" end with the session; "go" should have been ready.
      if (this.mode !== "go" && !this.closeError) this.waiter(null);
      else this.waiter(this.closeError ?? new NbdRequestError(this.refusal() ?? "the server closed the connection"));
    }
    const error = this.closeError ?? new NbdRequestError("connection closed");
    for (const request of this.requests.values()) request.reject(error);
    this.requests.clear();
    if (this.ws.readyState <= 1) this.ws.close();
    this.onClose?.(this.closeError);
  }

  request(what, issue, { offset = 0, length = 0, data = true } = {}) {
    if (this.closed) return Promise.reject(this.closeError ?? new NbdRequestError("connection closed"));
    return new Promise((resolve, reject) => {
      let id;
      try {
        id = issue(this.client);
      } catch (error) {
        reject(new NbdRequestError(`${what}: ${error.message ?? error}`));
        return;
      }
      this.requests.set(id, { what, resolve, reject, offset, data: data ? new Uint8Array(length) : null, extents: [] });
      this.send();
    });
  }

  /** Reads `length` bytes at `offset`. */
  async read(offset, length) {
    return (await this.request(`read ${offset}+${length}`, (c) => c.read(offset, length), { offset, length })).data;
  }

  /** Writes `data` at `offset`. */
  async write(offset, data, { fua = false } = {}) {
    await this.request(`write ${offset}+${data.length}`, (c) => c.write(offset, data, fua), { data: false });
  }

  async flush() {
    await this.request("flush", (c) => c.flush(), { data: false });
  }

  /**
   * Block status from `offset` for up to `length` bytes, of the first
   * context (base:allocation by default): `[{offset, length, status}]`,
   * possibly covering less than asked (the server decides).
   */
  async blockStatus(offset, length) {
    const request = await this.request(`block status ${offset}+${length}`, (c) => c.blockStatus(offset, length), { data: false });
    const first = request.extents[0];
    if (!first) return [];
    const out = [];
    let at = first.offset;
    for (const extent of first.extents) {
      out.push({ offset: at, length: extent.length, status: extent.status });
      at += extent.length;
    }
    return out;
  }

  /** Ends the session gracefully (NBD_CMD_DISC once every request is answered). */
  async close() {
    if (this.closed) return;
    const done = new Promise((resolve) => {
      this.onClose = resolve;
    });
    try {
      this.client.disconnect();
      this.send();
      this.handle(this.client.poll());
      this.send();
    } catch {
      this.finish();
    }
    // The server closes after NBD_CMD_DISC; do not wait for ever.
    const timer = setTimeout(() => this.finish(), 2000);
    await done;
    clearTimeout(timer);
  }
}

/** The exports a server lists: `[{name, description}]`. */
export async function listExports(url, options = {}) {
  const connection = await NbdConnection.open(url, { ...options, mode: "list" });
  return connection.negotiation
    .filter((e) => e.type === "listEntry")
    .map(({ name, description }) => ({ name, description }));
}

/** Connects to export `exportName` of the server behind `url` (mode "go"); see `NbdConnection.open`. */
export function connectExport(url, options = {}) {
  return NbdConnection.open(url, { ...options, mode: "go" });
}
