// Prints what an NBD client asked in a recorded session: its options, the
// export it selected, and every request, one line each. The bytes go
// through nbd-wasm's NbdServer (the nbd-core state machine), which parses
// them exactly as a server would; the requests are answered at once
// (reads with zeroes), and the answers are thrown away.
//
//   node parse.mjs SESSION [--json]
//
// Exit status 0, 1 when the bytes break the protocol (the error is the
// last line), 2 when SESSION cannot be read.
//
// SESSION holds the bytes one client sent, from its first (record.mjs
// writes such files). The parser's server accepts every option and any
// offset, so it follows sessions whose server accepted what the client
// asked; a client that fell back after a refusal (say, from extended
// headers to structured replies) is read as if it had not been refused.
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { NbdServer, OptionReader } from "nbd-wasm";

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: { json: { type: "boolean", default: false } },
});
if (positionals.length !== 1) {
  console.error("usage: node parse.mjs SESSION [--json]");
  process.exit(2);
}
let session;
try {
  session = new Uint8Array(await readFile(positionals[0]));
} catch (error) {
  console.error(`cannot read ${positionals[0]}: ${error.message}`);
  process.exit(2);
}

/** The largest export size a JavaScript number holds exactly, a multiple of 4096: any request in the session fits. */
const ANY_SIZE = Math.floor(Number.MAX_SAFE_INTEGER / 4096) * 4096;
const EVERYTHING = {
  flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true,
  cache: true, resize: true, multiConn: true, blockStatus: true,
};

// The options, read first: they name the export the client selects, which
// the parsing server must offer for the rest to be read.
const reader = new OptionReader();
const negotiation = reader.push(session);
const selecting = negotiation.find((option) => option.name === "GO" || option.name === "EXPORT_NAME");
const exportName = selecting ? nameIn(selecting) : "";

const print = (event) => {
  if (options.json) console.log(JSON.stringify(event, (_, value) => (value instanceof Uint8Array ? [...value] : value)));
  else console.log(describe(event));
};

print({ type: "clientFlags", flags: reader.clientFlags });
for (const option of negotiation) print({ type: "option", ...option });

const server = new NbdServer([{ name: exportName, size: ANY_SIZE, capabilities: EVERYTHING }], {});
server.takeOutput();
let ending = null; // the close or error event, once seen
let events = server.push(session);
while (events.length) {
  for (const event of events) {
    print(event);
    answer(event);
    if (event.type === "close" || event.type === "error") ending = event;
  }
  server.takeOutput();
  events = server.poll();
}
if (!ending) print({ type: "cut", bytes: server.bufferedInput });
process.exitCode = ending?.type === "error" ? 1 : 0;

/** Completes a request at once, so the core goes on to the next one. */
function answer(event) {
  switch (event.type) {
    case "read":
      server.completeReadZeroes(event.id);
      break;
    case "writeData":
      if (event.remaining === 0) server.complete(event.id, null);
      break;
    case "blockStatus":
      server.completeBlockStatus(event.id, [{ length: event.length, status: 0 }]);
      break;
    case "flush":
    case "trim":
    case "writeZeroes":
    case "cache":
    case "resize":
      server.complete(event.id, null);
      break;
    case "unknown":
      if (event.id !== undefined) server.complete(event.id, "EINVAL");
      break;
    default:
      break;
  }
}

/** The export name an NBD_OPT_GO or NBD_OPT_EXPORT_NAME asks for (OptionReader's detail: `export "NAME", …` or `"NAME"`). */
function nameIn(option) {
  const quoted = option.detail.match(/^(?:export )?("(?:[^"\\]|\\.)*")/);
  return quoted ? JSON.parse(quoted[1]) : "";
}

/** One line for people. */
function describe(event) {
  const range = `offset ${event.offset} length ${event.length}`;
  const flags = (names) => names.filter(([, on]) => on).map(([name]) => name).join(" ");
  switch (event.type) {
    case "clientFlags":
      return `client flags 0x${(event.flags ?? 0).toString(16).padStart(8, "0")}`;
    case "option":
      return `option ${event.name}${event.detail ? ` ${event.detail}` : ""}`;
    case "exportSelected":
      return `export ${JSON.stringify(event.name)} selected, ${event.extendedHeaders ? "extended headers" : event.structuredReplies ? "structured replies" : "simple replies"}`;
    case "read":
    case "cache":
      return `${event.type} ${range}`;
    case "write":
      return `write ${range}${event.fua ? " fua" : ""}`;
    case "writeData":
      return `  data at ${event.offset}: ${event.data.length} bytes ${hex(event.data.subarray(0, 8))}${event.data.length > 8 ? " …" : ""}`;
    case "flush":
      return "flush";
    case "trim":
      return `trim ${range}${event.fua ? " fua" : ""}`;
    case "writeZeroes":
      return `write-zeroes ${range} ${flags([["fua", event.fua], ["no-hole", event.noHole], ["fast-zero", event.fastZero]])}`.trimEnd();
    case "blockStatus":
      return `block-status ${range}${event.reqOne ? " req-one" : ""}`;
    case "resize":
      return `resize to ${event.size}`;
    case "close":
      return `end: ${event.reason}`;
    case "error":
      return `protocol error: ${event.message}`;
    case "cut":
      return `the session ends before the client disconnected${event.bytes ? ` (${event.bytes} bytes of an unfinished message)` : ""}`;
    default:
      return JSON.stringify(event);
  }
}

function hex(bytes) {
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join(" ");
}
