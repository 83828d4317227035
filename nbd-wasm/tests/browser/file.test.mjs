// Serve mode with a file picked in the page (playwright's file chooser):
// served read-only through `nbd-std bridge`; reads match the file, and a
// write sent anyway (libnbd with strict mode off) gets EPERM from the
// page's server; qemu-io refuses to write to the read-only export.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import {
  CHROMIUM, cleanups, openPage, requireTools, run, runOk, sha256, skipOrFail, startBridge, tempDir, waitForState,
} from "./harness.mjs";

/** Python with libnbd: Debian's (python3-libnbd), not whatever python3 comes first in PATH. */
const PYTHON = "/usr/bin/python3";

const WRITE_ANYWAY = `
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # send the write although the export is read-only
h.connect_uri(sys.argv[1])
print("read_only", h.is_read_only())
try:
    h.pwrite(b"x" * 4096, 0)
    print("write succeeded")
except nbd.Error as e:
    print("write failed:", nbd.errno_name(e.errno) if hasattr(nbd, "errno_name") else e.errno, e.string)
h.shutdown()
`;

test("serve: a file from the file chooser, read-only: reads match, writes get EPERM", async (t) => {
  if (!requireTools(t, [CHROMIUM, "nbdinfo", "nbdcopy", "qemu-io", PYTHON])) return;
  if ((await run(PYTHON, ["-c", "import nbd"])).code !== 0) {
    skipOrFail(t, "python3-libnbd is missing");
    return;
  }
  const defer = cleanups(t);
  const bridge = await startBridge();
  defer(bridge.stop);
  const dir = await tempDir();
  defer(dir.remove);
  const image = join(dir.path, "disk image.img");
  const content = randomBytes(3 * 1024 * 1024 + 4096);
  await writeFile(image, content);

  const { page } = await openPage(t, defer, `serve=file&name=file&ws=${encodeURIComponent(bridge.wsUrl)}`);
  await waitForState(page, "waiting-file");
  await page.setInputFiles("#file-input", image);
  await waitForState(page, "serving");
  assert.match(await page.textContent("#disk-info"), /file disk image\.img, .*3149824 bytes.*read-only/);

  const uri = `${bridge.uri}file`;
  const info = await runOk("nbdinfo", [uri]);
  assert.match(info.stdout, /export-size: 3149824/);
  assert.match(info.stdout, /is_read_only: true/);
  const copy = join(dir.path, "copy.img");
  await runOk("nbdcopy", [uri, copy]);
  assert.equal(await sha256(copy), await sha256(content));

  // The page's server answers the write itself: EPERM (Operation not permitted).
  const anyway = await runOk(PYTHON, ["-c", WRITE_ANYWAY, uri]);
  assert.match(anyway.stdout, /read_only True/);
  assert.match(anyway.stdout, /write failed: .*Operation not permitted/);
  // qemu-io sees the read-only flag and refuses before sending.
  const qemu = await run("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 4k", uri]);
  assert.notEqual(qemu.code, 0);
  assert.match(qemu.stderr, /read-only|Permission denied|Operation not permitted/);
  // Nothing changed.
  await runOk("nbdcopy", [uri, copy]);
  assert.equal(await sha256(copy), await sha256(content));
});
