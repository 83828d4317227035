// Serve mode in a real browser: the demo page serves a 64 MiB RAM disk
// with the test pattern through `nbd-std bridge`; nbdinfo, nbdcopy and
// qemu-io attach to it as to any NBD server. Needs nbd-wasm/build.sh,
// `cargo build -p nbd-std`, `npm ci` in nbd-wasm, chromium, libnbd-bin,
// qemu-utils and websockify. Run: node --test nbd-wasm/tests/browser/
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import {
  CHROMIUM, SCREENSHOT_DIR, cleanups, openPage, pattern, requireTools, runOk, sha256, startBridge, startWebsockify,
  tempDir, waitForState,
} from "./harness.mjs";

const MiB = 1024 * 1024;

test("serve: a 64 MiB RAM disk in the page, through nbd-std bridge over WebSocket: nbdinfo, nbdcopy, qemu-io", async (t) => {
  if (!requireTools(t, [CHROMIUM, "nbdinfo", "nbdcopy", "qemu-io"])) return;
  const defer = cleanups(t);
  const bridge = await startBridge();
  let passed = false;
  defer(async () => {
    await bridge.stop();
    if (!passed) for (const line of bridge.child.output.trim().split("\n").slice(-20)) t.diagnostic(`bridge: ${line}`);
  });
  const dir = await tempDir();
  defer(dir.remove);
  const { page } = await openPage(t, defer, `serve=ram&size=64M&pattern=1&ws=${encodeURIComponent(bridge.wsUrl)}`);
  await waitForState(page, "serving");

  const info = await runOk("nbdinfo", [bridge.uri]);
  assert.match(info.stdout, /export-size: 67108864 \(64M\)/);
  assert.match(info.stdout, /is_read_only: false/);
  assert.match(info.stdout, /description: RAM disk served by nbd-wasm in a browser/);

  // nbdcopy reads all 64 MiB; the checksum is computed here, not by the page.
  const expected = pattern(64 * MiB);
  const copy = join(dir.path, "copy.img");
  const read = await runOk("nbdcopy", [bridge.uri, copy]);
  assert.equal(await sha256(copy), await sha256(expected));
  const rate = 64 / (read.ms / 1000);
  t.diagnostic(`nbdcopy read 64 MiB from the browser RAM disk in ${read.ms.toFixed(0)} ms: ${rate.toFixed(1)} MiB/s`);
  console.log(`nbdcopy throughput (browser RAM disk via nbd-std bridge, WebSocket): ${rate.toFixed(1)} MiB/s`);

  // qemu-io writes; a second read shows the write, and the rest is unchanged.
  const wrote = await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "flush", bridge.uri]);
  assert.match(wrote.stdout, /wrote 65536\/65536 bytes at offset 1048576/);
  const check = await runOk("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x5a 1M 64k", bridge.uri]);
  assert.match(check.stdout, /read 65536\/65536 bytes at offset 1048576/);
  assert.doesNotMatch(check.stdout + check.stderr, /verification failed/);
  await runOk("nbdcopy", [bridge.uri, copy]);
  expected.fill(0x5a, MiB, MiB + 64 * 1024);
  assert.equal(await sha256(copy), await sha256(expected));

  // The page saw the clients' options and their requests.
  const options = await page.textContent("#client-options");
  assert.match(options, /GO export ""/);
  assert.match(options, /export "" selected \(64 MiB/);
  await page.waitForFunction(() => /64 KiB written/.test(document.querySelector("#totals").textContent));
  assert.match(await page.textContent("#request-log"), /read\s*\d+\s*262144\s*[\d.]+\s*ok/); // nbdcopy's 256 KiB reads
  assert.equal(await page.evaluate(() => document.body.dataset.state), "serving");
  await mkdir(SCREENSHOT_DIR, { recursive: true });
  const screenshot = join(SCREENSHOT_DIR, "serve.png");
  await page.screenshot({ path: screenshot });
  console.log(`serve screenshot: ${screenshot}`);
  passed = true;
});

test("serve: through stock websockify to the bridge's --providers port", async (t) => {
  if (!requireTools(t, [CHROMIUM, "nbdinfo", "nbdcopy", "websockify"])) return;
  const defer = cleanups(t);
  const bridge = await startBridge({ providers: true });
  defer(bridge.stop);
  const websockify = await startWebsockify(bridge.providersPort);
  defer(websockify.stop);
  const dir = await tempDir();
  defer(dir.remove);
  const { page } = await openPage(t, defer, `serve=ram&size=8M&pattern=1&name=ram&ws=${encodeURIComponent(websockify.url)}`);
  await waitForState(page, "serving");
  const info = await runOk("nbdinfo", [`${bridge.uri}ram`]);
  assert.match(info.stdout, /export-size: 8388608 \(8M\)/);
  const copy = join(dir.path, "copy.img");
  await runOk("nbdcopy", [`${bridge.uri}ram`, copy]);
  assert.equal(await sha256(copy), await sha256(pattern(8 * MiB)));
});
