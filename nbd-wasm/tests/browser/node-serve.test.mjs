// The JS layer serving from Node instead of a page: a RamDisk through
// `nbd-std bridge` with Node's own WebSocket (global from Node 22; Node
// 20 needs --experimental-websocket), read by nbdcopy. Shows that
// nbd-wasm/js runs unchanged outside the browser.
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Child, PACKAGE_ROOT, cleanups, pattern, requireTools, runOk, sha256, startBridge, tempDir } from "./harness.mjs";

const MiB = 1024 * 1024;

const PROVIDER = (url) => `
import { load, RamDisk, serveDisk } from ${JSON.stringify(pathToFileURL(join(PACKAGE_ROOT, "js/index.js")).href)};
await load();
serveDisk(${JSON.stringify(url)}, new RamDisk("16M", { fill: "pattern" }), {
  name: "node",
  logRequests: false,
  onEvent: (e) => console.log(JSON.stringify(e)),
});
`;

test("serve from Node: serveDisk with Node's WebSocket through nbd-std bridge; nbdcopy reads the pattern", async (t) => {
  if (!requireTools(t, ["nbdinfo", "nbdcopy"])) return;
  const defer = cleanups(t);
  const bridge = await startBridge();
  defer(bridge.stop);
  const dir = await tempDir();
  defer(dir.remove);
  const major = Number(process.versions.node.split(".")[0]);
  const flags = major < 22 ? ["--experimental-websocket"] : [];
  const provider = new Child("node provider", process.execPath, [...flags, "--input-type=module", "-e", PROVIDER(bridge.wsUrl)]);
  defer(provider.stop);
  await provider.waitForOutput(/"type":"idle"/);
  const info = await runOk("nbdinfo", [`${bridge.uri}node`]);
  assert.match(info.stdout, /export-size: 16777216/);
  const copy = join(dir.path, "copy.img");
  await runOk("nbdcopy", [`${bridge.uri}node`, copy]);
  assert.equal(await sha256(copy), await sha256(pattern(16 * MiB)));
  assert.match(provider.output, /"type":"option".*"name":"GO"/);
});
