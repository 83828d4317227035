// Runs nbd-wasm's NbdServer and NbdClient against each other in the page:
// the client's bytes go to the server and back, the server's storage is a
// RamDisk from the package's JavaScript layer. document.body.dataset.state
// ends as "done" or "error"; #log says what happened.
import { NbdClient, NbdServer, RamDisk, exportOf, fillPattern, load } from "nbd-wasm";

const log = document.getElementById("log");
const say = (line) => {
  log.textContent += `${line}\n`;
};

/** Moves bytes between client and server until both are quiet; storage requests are answered from `disk` at once. */
function pump(server, client, disk, onClientEvent) {
  for (let moved = true; moved; ) {
    moved = false;
    const toServer = client.takeOutput();
    for (const event of toServer.length ? server.push(toServer) : server.poll()) {
      moved = true;
      serve(server, disk, event);
    }
    const toClient = server.takeOutput();
    for (const event of toClient.length ? client.push(toClient) : client.poll()) {
      moved = true;
      onClientEvent(event);
    }
    moved ||= toServer.length > 0 || toClient.length > 0;
  }
}

function serve(server, disk, event) {
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

  const results = new Map(); // request id -> {data, extents, error}
  const onClientEvent = (event) => {
    if (event.type === "export") say(`export "ram": ${event.size} bytes, ${event.extendedHeaders ? "extended headers" : "structured replies"}`);
    const result = results.get(event.id);
    if (!result) return;
    if (event.type === "readData") result.data.set(event.data, event.offset - result.offset);
    if (event.type === "blockStatus") result.extents.push(...event.extents);
    if (event.type === "done") result.error = event.error ?? "none";
  };
  const request = (id, offset = 0, length = 0) => {
    const result = { offset, data: new Uint8Array(length), extents: [], error: null };
    results.set(id, result);
    pump(server, client, disk, onClientEvent);
    if (result.error === null) throw new Error(`request ${id} not answered`);
    if (result.error !== "none") throw new Error(`request ${id} failed: ${result.error}`);
    return result;
  };

  pump(server, client, disk, onClientEvent);
  if (!client.isReady) throw new Error("the client did not reach transmission");

  const written = fillPattern(new Uint8Array(64 * 1024), 1024 * 1024);
  request(client.write(1024 * 1024, written));
  request(client.flush());
  const { data } = request(client.read(1024 * 1024, written.length), 1024 * 1024, written.length);
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
  (error) => {
    say(`error: ${error.message}`);
    document.body.dataset.state = "error";
  },
);
