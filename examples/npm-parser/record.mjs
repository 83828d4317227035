// Records the bytes NBD clients send: a TCP relay in front of a server
// that writes each client's bytes (client to server only) to a file.
//
//   node record.mjs --listen 10810 --server 127.0.0.1:10809 --out session.bin
//   qemu-io -f raw -c 'write -P 0xab 4096 512' nbd://127.0.0.1:10810/
//
// The first connection goes to session.bin, later ones to
// session-2.bin, session-3.bin, …
import { createServer, connect } from "node:net";
import { createWriteStream } from "node:fs";
import { parseArgs } from "node:util";

const { values: options } = parseArgs({
  options: {
    listen: { type: "string", default: "10810" },
    server: { type: "string", default: "127.0.0.1:10809" },
    out: { type: "string", default: "session.bin" },
  },
});
const separator = options.server.lastIndexOf(":");
const serverHost = options.server.slice(0, separator);
const serverPort = Number(options.server.slice(separator + 1));

let connections = 0;
const listener = createServer((client) => {
  connections++;
  const path = connections === 1 ? options.out : options.out.replace(/(\.[^./]*)?$/, `-${connections}$1`);
  const capture = createWriteStream(path);
  const upstream = connect(serverPort, serverHost);
  client.on("data", (bytes) => capture.write(bytes));
  client.pipe(upstream);
  upstream.pipe(client);
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    client.destroy();
    upstream.destroy();
    capture.end(() => console.log(`recorded ${capture.bytesWritten} bytes to ${path}`));
  };
  client.on("close", close);
  upstream.on("close", close);
  client.on("error", close);
  upstream.on("error", close);
});
listener.listen(Number(options.listen), "127.0.0.1", () => {
  console.log(`recording clients on 127.0.0.1:${listener.address().port}, relayed to ${options.server}`);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(0));
