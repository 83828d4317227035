// Serve mode with an OPFS disk: qemu-io writes through `nbd-std bridge`,
// the page reloads (same browser profile), and the data is still there.
import { test } from "node:test";
import assert from "node:assert/strict";
import { CHROMIUM, cleanups, openPage, requireTools, runOk, startBridge, waitForState } from "./harness.mjs";

test("serve: an OPFS disk keeps its data across a reload", async (t) => {
  if (!requireTools(t, [CHROMIUM, "nbdinfo", "qemu-io"])) return;
  const defer = cleanups(t);
  const bridge = await startBridge();
  defer(bridge.stop);
  const { page, url } = await openPage(t, defer, `serve=opfs&name=persist&size=4M&ws=${encodeURIComponent(bridge.wsUrl)}`);
  await waitForState(page, "serving");
  assert.match(await page.textContent("#disk-info"), /OPFS file persist, 4 MiB \(4194304 bytes\), writable/);
  const uri = `${bridge.uri}persist`;
  assert.match((await runOk("nbdinfo", [uri])).stdout, /export-size: 4194304/);
  // A new OPFS file reads as zeroes; write a pattern, with a flush.
  await runOk("qemu-io", ["-f", "raw", "-c", "read -P 0 64k 64k", uri]);
  await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x33 64k 64k", "-c", "flush", uri]);

  await page.goto(url); // the same profile: the same origin private file system
  await waitForState(page, "serving");
  const check = await runOk("qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x33 64k 64k", "-c", "read -P 0 0 64k", uri]);
  assert.match(check.stdout, /read 65536\/65536 bytes at offset 65536/);
  assert.doesNotMatch(check.stdout + check.stderr, /verification failed/);
});
