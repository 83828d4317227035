// Runs nbd-wasm's NbdServer and NbdClient against each other in the page:
// the client's bytes go to the server and back, the server's storage is a
// RamDisk from the package's JavaScript layer. document.body.dataset.state
// ends as "done" or "error"; #log says what happened. TypeScript, checked
// against the package's types by `npm run check` (Vite only strips them).
import { NbdClient, NbdServer, RamDisk, exportOf, fillPattern, load } from "nbd-wasm";
import type { ClientEvent, Extent, ServerEvent } from "nbd-wasm";

const log = document.getElementById("log")!;
const say = (line: string) => {
  log.textContent += `${line}\n`;
};

/** What the client got for one request. */
interface Result {
  offset: number;
  data: Uint8Array;
  extents: Extent[];
  error: string | null;
}

/** Moves bytes between client and server until both are quiet; storage requests are answered from `disk` at once. */
function pump(server: NbdServer, client: NbdClient, disk: RamDisk, onClientEvent: (event: ClientEvent) => void) {
  for (let moved = true; moved; ) {
    const toServer = client.takeOutput();
    const serverEvents = toServer.length ? server.push(toServer) : server.poll();
    for (const event of serverEvents) serve(server, disk, event);
    const toClient = server.takeOutput();
    const clientEvents = toClient.length ? client.push(toClient) : client.poll();
    for (const event of clientEvents) onClientEvent(event);
    moved = toServer.length > 0 || toClient.length > 0 || serverEvents.length > 0 || clientEvents.length > 0;
  }
}

function serve(server: NbdServer, disk: RamDisk, event: ServerEvent) {
  switch (event.type) {
    case "read":
      server.completeRead(event.id, disk.read(event.offset, event.length));
      break;
    case "writeData":
      disk.write(event.offset, event.data);
      if (event.remaining === 0) server.complete(event.id, null);
      break;
    case "trim":
    case "writeZeroes":
      disk.zero(event.offset, event.length);
      server.complete(event.id, null);
      break;
    case "flush":
    case "cache":
      server.complete(event.id, null);
      break;
    case "blockStatus":
      server.completeBlockStatus(event.id, disk.extents(event.offset, event.length));
      break;
    default:
      break;
  }
}

async function main() {
  await load(); // fetches the .wasm Vite put in dist/assets
  const disk = new RamDisk("4M");
  const server = new NbdServer([exportOf(disk, { name: "ram" })], {});
  const client = new NbdClient({ exportName: "ram" });

  const results = new Map<number, Result>();
  const onClientEvent = (event: ClientEvent) => {
    if (event.type === "export") {
      say(`export "ram": ${event.size} bytes, ${event.extendedHeaders ? "extended headers" : "structured replies"}`);
    }
    const result = "id" in event ? results.get(event.id) : undefined;
    if (!result) return;
    if (event.type === "readData") result.data.set(event.data, event.offset - result.offset);
    if (event.type === "blockStatus") result.extents.push(...event.extents);
    if (event.type === "done") result.error = event.error ?? "none";
  };
  const request = (id: number, offset = 0, length = 0): Result => {
    const result: Result = { offset, data: new Uint8Array(length), extents: [], error: null };
    results.set(id, result);
    pump(server, client, disk, onClientEvent);
    if (result.error === null) throw new Error(`request ${id} not answered`);
    if (result.error !== "none") throw new Error(`request ${id} failed: ${result.error}`);
    return result;
  };

  pump(server, client, disk, onClientEvent);
  if (!client.isReady) throw new Error("the client did not reach transmission");

  const at = 1024 * 1024;
  const written = fillPattern(new Uint8Array(64 * 1024), at);
  request(client.write(at, written));
  request(client.flush());
  const { data } = request(client.read(at, written.length), at, written.length);
  const equal = data.every((byte, i) => byte === written[i]);
  say(`wrote 65536 bytes at 1 MiB, read them back: ${equal ? "equal" : "DIFFERENT"}`);
  const { extents } = request(client.blockStatus(0, disk.size));
  say(`block status: ${extents.map((e) => `${e.length}${e.status & 2 ? " zero" : " data"}`).join(", ")}`);
  client.disconnect();
  pump(server, client, disk, onClientEvent);
  say(`disconnected: ${client.isClosed ? "client closed" : "client still open"}, server ${server.isClosed ? "closed" : "still open"}`);
  if (!equal) throw new Error("read back different bytes");
}

main().then(
  () => {
    document.body.dataset.state = "done";
  },
  (error: Error) => {
    say(`error: ${error.message}`);
    document.body.dataset.state = "error";
  },
);
