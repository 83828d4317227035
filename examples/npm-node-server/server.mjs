// Serves a file as an NBD export over TCP from Node: node:net carries the
// bytes, node:fs does the storage, and nbd-wasm's NbdServer (the nbd-core
// state machine compiled to WebAssembly) speaks the protocol.
//
//   node server.mjs FILE [--port 10809] [--host 127.0.0.1] [--name NAME] [--read-only]
//   nbdinfo nbd://127.0.0.1/
//   nbdcopy nbd://127.0.0.1/ copy.img
import { createServer } from "node:net";
import { open } from "node:fs/promises";
import { parseArgs } from "node:util";
import { NbdServer } from "nbd-wasm";

/** Stop reading from a client while this much of its input waits in the core (requests in flight are capped at 128). */
const INPUT_HIGH_WATER = 8 * 1024 * 1024;
/** Stop reading from a client while this much output waits in its socket. */
const OUTPUT_HIGH_WATER = 16 * 1024 * 1024;
/** Zeroes are written in pieces of this size (TRIM and WRITE_ZEROES). */
const ZERO_CHUNK = 1024 * 1024;

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: "string", default: "10809" },
    host: { type: "string", default: "127.0.0.1" },
    name: { type: "string", default: "" },
    "read-only": { type: "boolean", default: false },
  },
});
if (positionals.length !== 1) {
  console.error("usage: node server.mjs FILE [--port N] [--host ADDR] [--name NAME] [--read-only]");
  process.exit(2);
}
const [path] = positionals;
const readOnly = options["read-only"];
let file;
try {
  file = await open(path, readOnly ? "r" : "r+");
} catch (error) {
  console.error(`cannot open ${path}: ${error.message}`);
  process.exit(2);
}
const { size } = await file.stat();
const exportDescription = {
  name: options.name,
  description: `${path} served from Node`,
  size,
  readOnly,
  capabilities: { flush: true, fua: true, trim: true, writeZeroes: true, cache: true, multiConn: true },
};

let nextClient = 1;

/** One client: bytes from the socket go to the core, its storage requests to the file, its output back to the socket. */
function serveClient(socket) {
  const client = `client ${nextClient++} (${socket.remoteAddress}:${socket.remotePort})`;
  const server = new NbdServer([exportDescription], {});
  const writes = new Map(); // request id -> promises of its pieces
  let closed = false;
  console.log(`${client}: connected`);

  const send = () => {
    if (closed) return;
    const output = server.takeOutput();
    if (output.length) socket.write(output);
    const congested = server.bufferedInput > INPUT_HIGH_WATER || socket.writableLength > OUTPUT_HIGH_WATER;
    if (congested) socket.pause();
    else socket.resume();
  };

  /** Runs the core (push or poll) and acts on every event it returns. */
  const drive = (step) => {
    if (closed) return;
    let events;
    try {
      events = step();
    } catch (error) {
      end(`protocol error: ${error.message}`);
      return;
    }
    for (const event of events) handle(event);
    send();
  };

  /** Completes request `id` once `work` settles; a failed storage call becomes EIO. */
  const finish = (id, work, answer = () => server.complete(id, null)) => {
    work.then(
      (result) => !closed && answer(result),
      (error) => {
        if (closed) return;
        console.error(`${client}: request ${id}: ${error.message}`);
        server.complete(id, error.code === "ENOSPC" ? "ENOSPC" : "EIO");
      },
    ).then(() => drive(() => server.poll()));
  };

  const handle = (event) => {
    switch (event.type) {
      case "exportSelected":
        console.log(`${client}: export "${event.name}" (${event.size} bytes), ${event.extendedHeaders ? "extended headers" : event.structuredReplies ? "structured replies" : "simple replies"}`);
        break;
      case "read": {
        const buffer = new Uint8Array(event.length);
        finish(event.id, file.read(buffer, 0, event.length, event.offset), () => server.completeRead(event.id, buffer));
        break;
      }
      case "write":
        writes.set(event.id, []);
        break;
      case "writeData": {
        const pieces = writes.get(event.id);
        pieces.push(file.write(event.data, 0, event.data.length, event.offset));
        if (event.remaining === 0) {
          writes.delete(event.id);
          finish(event.id, Promise.all(pieces).then(() => event.fua && file.datasync()));
        }
        break;
      }
      case "flush":
        finish(event.id, file.datasync());
        break;
      case "trim":
      case "writeZeroes":
        finish(event.id, writeZeroes(event.offset, event.length).then(() => event.fua && file.datasync()));
        break;
      case "cache":
        finish(event.id, Promise.resolve());
        break;
      case "resize":
        server.complete(event.id, "ENOTSUP");
        break;
      case "unknown":
        if (event.id !== undefined) server.complete(event.id, "EINVAL");
        break;
      case "close":
        send();
        end(`${event.reason}`);
        break;
      case "error":
        end(`protocol error: ${event.message}`);
        break;
      default:
        break;
    }
  };

  const end = (reason) => {
    if (closed) return;
    closed = true;
    server.free();
    socket.end();
    console.log(`${client}: closed (${reason})`);
  };

  socket.on("data", (bytes) => drive(() => server.push(bytes)));
  socket.on("drain", send);
  socket.on("error", (error) => end(error.message));
  socket.on("close", () => end("connection closed"));
  send(); // the greeting
}

async function writeZeroes(offset, length) {
  const zeroes = new Uint8Array(Math.min(length, ZERO_CHUNK));
  for (let at = 0; at < length; at += zeroes.length) {
    const piece = Math.min(zeroes.length, length - at);
    await file.write(zeroes, 0, piece, offset + at);
  }
}

const listener = createServer(serveClient);
listener.on("error", (error) => {
  console.error(`cannot listen on ${options.host}:${options.port}: ${error.message}`);
  process.exit(2);
});
listener.listen(Number(options.port), options.host, () => {
  const { address, port } = listener.address();
  console.log(`serving ${path} (${size} bytes${readOnly ? ", read-only" : ""}) on ${address}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    listener.close();
    file.close().finally(() => process.exit(0));
  });
}
