// Serves a disk to NBD clients over WebSocket "provider sessions" (see
// `nbd-std bridge`): each session is an NBD server from its first byte.
// The page keeps exactly one idle session open; the bridge hands the next
// NBD client to it, and the first client bytes tell the page to open the
// next idle session.
import { NbdServer } from "./wasm.js";
import { OptionReader } from "./options.js";

/** How long to wait before reopening an idle session that failed, growing to MAX_RETRY_MS. */
const RETRY_MS = 500;
const MAX_RETRY_MS = 5000;
/**
 * Reads wait while the bytes of reads under way (read, or answered but
 * not sent yet) plus the WebSocket's send buffer would pass this: a
 * browser cannot stop receiving, so replies are held back instead, and
 * the client's requests queue in the server (at most maxInFlight). One
 * read always proceeds, whatever its size.
 */
const SEND_HIGH_WATER = 16 * 1024 * 1024;
/** How often a waiting read looks at the send buffer again. */
const DRAIN_POLL_MS = 4;
/** Largest WebSocket message sent (the bridge accepts up to 64 MiB). */
const MAX_MESSAGE = 4 * 1024 * 1024;

/** The NBD export an `NbdServer` offers for `disk`. */
export function exportOf(disk, { name = "", description = "" } = {}) {
  return {
    name,
    description,
    size: disk.size,
    readOnly: Boolean(disk.readOnly),
    capabilities: disk.capabilities ?? {},
    ...(disk.blockSizes ? { blockSizes: disk.blockSizes } : {}),
  };
}

/** The NBD error name for a failed disk operation. */
function errorName(error) {
  return typeof error?.nbdError === "string" ? error.nbdError : "EIO";
}

/**
 * One provider session: a WebSocket to the bridge and an NbdServer.
 * States: "connecting", "idle" (greeting sent, no client yet), "active",
 * "closed".
 */
class Session {
  constructor(owner, id) {
    this.owner = owner;
    this.id = id;
    this.state = "connecting";
    this.server = null;
    this.options = new OptionReader();
    this.writes = new Map(); // request id -> {pending: Promise[], fua}
    this.requests = new Map(); // request id -> {op, offset, length, start}
    this.pumpQueued = false;
    this.reading = 0; // bytes of reads under way (see reserve)
    this.bytesIn = 0;
    this.bytesOut = 0;
    this.closeReason = null;
    const ws = new owner.WebSocket(owner.url, owner.protocols);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => this.onOpen();
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onclose = (event) => this.onClose(event);
    ws.onerror = () => {
      this.closeReason ??= "WebSocket error";
    };
    this.ws = ws;
  }

  emit(event) {
    this.owner.emit({ ...event, session: this.id });
  }

  onOpen() {
    if (this.state !== "connecting") return;
    try {
      this.server = new NbdServer([this.owner.export], this.owner.serverOptions);
    } catch (error) {
      this.fail(`cannot create the server: ${error.message ?? error}`);
      return;
    }
    this.state = "idle";
    this.send(); // the newstyle greeting, at once: the bridge buffers it
    this.emit({ type: "idle" });
    this.owner.sessionIdle(this);
  }

  onMessage(data) {
    if (this.state === "closed" || !this.server) return;
    const bytes = new Uint8Array(data instanceof ArrayBuffer ? data : data.buffer ?? data);
    this.bytesIn += bytes.length;
    if (this.state === "idle") {
      this.state = "active";
      this.emit({ type: "attached" });
      this.owner.sessionTaken(this);
    }
    for (const option of this.options.push(bytes)) this.emit({ type: "option", ...option });
    this.drive((server) => server.push(bytes));
  }

  /** Runs the server (`push` or `poll`), handles its events and sends what it has for the client. */
  drive(step) {
    let events;
    try {
      events = step(this.server);
    } catch (error) {
      this.fail(`server: ${error.message ?? error}`);
      return;
    }
    this.handle(events);
    this.send();
  }

  onClose(event) {
    if (this.state === "closed") return;
    const was = this.state;
    this.state = "closed";
    if (was === "active" && this.server && !this.server.isClosed) {
      try {
        this.server.end();
      } catch (error) {
        // The client went away without NBD_OPT_ABORT or NBD_CMD_DISC.
        this.closeReason ??= `client left mid-session: ${error.message ?? error}`;
      }
    }
    this.server?.free();
    this.server = null;
    const reason = this.closeReason ?? (event?.reason || `WebSocket closed (${event?.code ?? "?"})`);
    this.emit({ type: "closed", reason, bytesIn: this.bytesIn, bytesOut: this.bytesOut, wasIdle: was !== "active" });
    this.owner.sessionClosed(this, was);
  }

  fail(message) {
    this.emit({ type: "error", message });
    this.close(message);
  }

  close(reason) {
    this.closeReason ??= reason;
    if (this.ws.readyState <= 1) this.ws.close(1000);
    // Browsers fire onclose later; end the session now so no completion runs on a closed socket.
    this.onClose({ code: 1000, reason });
  }

  /** Sends whatever the server has for the client. */
  send() {
    if (!this.server) return;
    let output;
    try {
      output = this.server.takeOutput();
    } catch (error) {
      this.fail(`server: ${error.message ?? error}`);
      return;
    }
    if (output.length === 0) return;
    this.bytesOut += output.length;
    for (let at = 0; at < output.length; at += MAX_MESSAGE) {
      this.ws.send(output.length <= MAX_MESSAGE ? output : output.subarray(at, at + MAX_MESSAGE));
    }
  }

  /** After completions: process buffered input again and send the replies (once per microtask burst). */
  schedulePump() {
    if (this.pumpQueued) return;
    this.pumpQueued = true;
    queueMicrotask(() => {
      this.pumpQueued = false;
      if (this.server) this.drive((server) => server.poll());
    });
  }

  /** Resolves once `length` more bytes of read replies fit under SEND_HIGH_WATER; counts them as under way. */
  reserve(length) {
    const fits = () => {
      if (this.state === "closed") return true;
      const buffered = this.ws.bufferedAmount || 0;
      return buffered <= SEND_HIGH_WATER && (this.reading === 0 || this.reading + buffered + length <= SEND_HIGH_WATER);
    };
    const take = () => {
      this.reading += length;
    };
    if (fits()) return take();
    return new Promise((resolve) => {
      const check = () => (fits() ? resolve(take()) : setTimeout(check, DRAIN_POLL_MS));
      check();
    });
  }

  /** Runs `work` (value or promise), then completes request `id` with `answer(result)` or an error. */
  complete(id, work, answer) {
    Promise.resolve()
      .then(work)
      .then(
        (result) => {
          if (!this.server) return;
          try {
            answer(result);
          } catch (error) {
            // The disk's answer did not fit (a short read, bad extents): the request fails, the session goes on.
            this.server.complete(id, "EIO");
            this.finished(id, "EIO", error);
            return;
          }
          this.finished(id, null);
        },
        (error) => {
          if (!this.server) return;
          this.server.complete(id, errorName(error));
          this.finished(id, errorName(error), error);
        },
      )
      .catch((error) => this.fail(`completing request ${id}: ${error.message ?? error}`))
      .finally(() => this.schedulePump());
  }

  finished(id, error, cause) {
    const request = this.requests.get(id);
    this.requests.delete(id);
    if (!request) return;
    this.owner.count(request, error);
    if (this.owner.logRequests || error) {
      this.emit({
        type: "done", id, op: request.op, offset: request.offset, length: request.length, error,
        ms: now() - request.start, ...(cause ? { message: String(cause.message ?? cause) } : {}),
      });
    }
  }

  track(event) {
    const request = { op: event.type, offset: event.offset ?? 0, length: event.length ?? 0, start: now() };
    this.requests.set(event.id, request);
    if (this.owner.logRequests) {
      this.emit({ type: "request", id: event.id, op: request.op, offset: request.offset, length: request.length });
    }
  }

  handle(events) {
    const { disk } = this.owner;
    const server = this.server;
    for (const event of events) {
      if (!this.server) return;
      const { id } = event;
      switch (event.type) {
        case "exportSelected":
          this.options.finish();
          this.emit({ ...event, type: "exportSelected" });
          break;
        case "read":
          this.track(event);
          this.complete(id, async () => {
            await this.reserve(event.length);
            try {
              return await disk.read(event.offset, event.length);
            } finally {
              // The reply goes out with the next send (queued as a microtask, before any waiting read looks again).
              this.reading -= event.length;
            }
          }, (data) => server.completeRead(id, data));
          break;
        case "write":
          this.track(event);
          this.writes.set(id, { pending: [], fua: event.fua });
          break;
        case "writeData": {
          const write = this.writes.get(id);
          if (!write) break;
          write.pending.push(Promise.resolve().then(() => disk.write(event.offset, event.data)));
          if (event.remaining === 0) {
            this.writes.delete(id);
            this.complete(id, async () => {
              await Promise.all(write.pending);
              if (write.fua) await disk.flush?.();
            }, () => server.complete(id, null));
          }
          break;
        }
        case "flush":
          this.track(event);
          this.complete(id, () => disk.flush?.(), () => server.complete(id, null));
          break;
        case "trim":
        case "writeZeroes":
          this.track(event);
          this.complete(id, async () => {
            if (!disk.zero) throw Object.assign(new Error("cannot zero"), { nbdError: "ENOTSUP" });
            await disk.zero(event.offset, event.length);
            if (event.fua) await disk.flush?.();
          }, () => server.complete(id, null));
          break;
        case "cache":
          this.track(event);
          this.complete(id, () => undefined, () => server.complete(id, null));
          break;
        case "blockStatus":
          this.track(event);
          this.complete(
            id,
            () => (disk.extents ? disk.extents(event.offset, event.length) : [{ length: event.length, status: 0 }]),
            (extents) => server.completeBlockStatus(id, extents),
          );
          break;
        case "resize":
          this.track(event);
          this.complete(id, () => {
            throw Object.assign(new Error("resize is not supported"), { nbdError: "ENOTSUP" });
          }, () => {});
          break;
        case "close":
          this.send();
          this.close(`client ${event.reason}`);
          return;
        case "error":
          this.fail(event.message);
          return;
        case "unknown":
          if (event.id !== undefined) server.complete(event.id, "EINVAL");
          break;
        default:
          break;
      }
    }
    // A refused GO lets negotiation go on: read the next options too.
    if (this.options.atEnd) this.options.resume();
  }
}

const now = () => (globalThis.performance ?? Date).now();

/** Serves one disk over provider sessions. Create with `serveDisk`. */
export class DiskServer {
  constructor(url, disk, options = {}) {
    const WebSocketClass = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketClass !== "function") {
      throw new Error("no WebSocket: pass options.WebSocket (Node 22 has a global one; Node 20 needs --experimental-websocket)");
    }
    this.url = url;
    this.disk = disk;
    this.WebSocket = WebSocketClass;
    this.protocols = options.protocols ?? ["binary"];
    this.onEvent = options.onEvent ?? (() => {});
    this.logRequests = options.logRequests ?? true;
    this.export = exportOf(disk, options);
    this.serverOptions = options.maxInFlight ? { maxInFlight: options.maxInFlight } : {};
    this.sessions = new Set();
    this.nextId = 1;
    this.stopped = false;
    this.retryMs = RETRY_MS;
    this.retryTimer = null;
    this.stats = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0, sessions: 0 };
    this.openIdle();
  }

  emit(event) {
    try {
      this.onEvent(event);
    } catch (error) {
      console.error("serveDisk onEvent:", error);
    }
  }

  count(request, error) {
    this.stats.requests++;
    if (error) this.stats.errors++;
    else if (request.op === "read") this.stats.bytesRead += request.length;
    else if (request.op === "write") this.stats.bytesWritten += request.length;
  }

  /** Sessions in each state, e.g. `{idle: 1, active: 2}`. */
  get states() {
    const states = { connecting: 0, idle: 0, active: 0 };
    for (const session of this.sessions) states[session.state]++;
    return states;
  }

  openIdle() {
    if (this.stopped || this.retryTimer) return;
    for (const session of this.sessions) if (session.state === "connecting" || session.state === "idle") return;
    const session = new Session(this, this.nextId++);
    this.sessions.add(session);
    this.emit({ type: "connecting", session: session.id, url: this.url });
  }

  sessionIdle() {
    this.retryMs = RETRY_MS;
  }

  sessionTaken() {
    this.stats.sessions++;
    this.openIdle();
  }

  sessionClosed(session, was) {
    this.sessions.delete(session);
    if (this.stopped) return;
    if (was === "active") {
      this.openIdle();
      return;
    }
    // An idle or connecting session failed: the bridge is gone or refused; retry, slower each time.
    this.emit({ type: "disconnected", retryMs: this.retryMs });
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.openIdle();
    }, this.retryMs);
    this.retryMs = Math.min(MAX_RETRY_MS, this.retryMs * 2);
  }

  /** Closes every session (clients see their connection end) and stops reconnecting. */
  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    for (const session of [...this.sessions]) session.close("stopped");
    this.emit({ type: "stopped" });
  }
}

/**
 * Serves `disk` to NBD clients through the bridge at `url` (a WebSocket
 * URL, e.g. "ws://127.0.0.1:8081/"). Options: `name` and `description`
 * of the export, `onEvent(event)`, `logRequests` (default true: an event
 * per request), `maxInFlight`, `protocols` (default ["binary"]),
 * `WebSocket` (a constructor; default the global one).
 */
export function serveDisk(url, disk, options) {
  return new DiskServer(url, disk, options);
}
