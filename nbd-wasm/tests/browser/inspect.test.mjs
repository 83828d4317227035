// Inspect mode in a real browser: the page opens an `nbd-std serve` file
// export (a sparse disk image with an MBR partition table made here)
// through stock websockify, lists the exports, and shows the size, the
// partitions, the block status map and sectors in hex. Saves a
// screenshot to target/browser-screenshots/inspect.png; then opens a
// second export, with a GPT, from the export list.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, open } from "node:fs/promises";
import { join } from "node:path";
import {
  CHROMIUM, Child, NBD_STD, SCREENSHOT_DIR, cleanups, freePort, openPage, requireTools, startWebsockify,
  tempDir, waitForState,
} from "./harness.mjs";

const MiB = 1024 * 1024;
const SECTOR = 512;

/** A 32 MiB sparse image: MBR with Linux (bootable), swap, and an extended partition holding one FAT32 logical partition. */
async function makeImage(path) {
  const file = await open(path, "w");
  await file.truncate(32 * MiB);
  const mbr = Buffer.alloc(SECTOR);
  const entry = (sector, slot, type, start, sectors, boot = false) => {
    const at = 446 + 16 * slot;
    sector[at] = boot ? 0x80 : 0;
    sector[at + 4] = type;
    sector.writeUInt32LE(start, at + 8);
    sector.writeUInt32LE(sectors, at + 12);
    sector[510] = 0x55;
    sector[511] = 0xaa;
  };
  mbr.writeUInt32LE(0x4e424421, 440); // disk identifier
  entry(mbr, 0, 0x83, 2048, 20480, true); // 1 MiB .. 11 MiB
  entry(mbr, 1, 0x82, 22528, 8192); // 11 MiB .. 15 MiB
  entry(mbr, 2, 0x0f, 30720, 32768); // extended: 15 MiB .. 31 MiB
  const ebr = Buffer.alloc(SECTOR);
  entry(ebr, 0, 0x0c, 2048, 30720); // logical 5, relative to its EBR at 30720
  await file.write(mbr, 0, SECTOR, 0);
  await file.write(ebr, 0, SECTOR, 30720 * SECTOR);
  // Data at the start of partition 1 (1 MiB, so block status shows data, then holes).
  const data = Buffer.alloc(MiB, 0x61);
  data.write("hello from partition 1", 0);
  await file.write(data, 0, data.length, 2048 * SECTOR);
  await file.close();
}

/** GPT GUID bytes from text (the first three fields little-endian). */
function guid(text) {
  const b = Buffer.from(text.replaceAll("-", ""), "hex");
  return Buffer.concat([b.subarray(0, 4).reverse(), b.subarray(4, 6).reverse(), b.subarray(6, 8).reverse(), b.subarray(8)]);
}

/** A 16 MiB image with a protective MBR and a GPT of two named partitions (header CRCs are not checked by the page). */
async function makeGptImage(path) {
  const file = await open(path, "w");
  await file.truncate(16 * MiB);
  const head = Buffer.alloc(3 * SECTOR + 128 * 128);
  head[446 + 4] = 0xee;
  head.writeUInt32LE(1, 446 + 8);
  head.writeUInt32LE(32767, 446 + 12);
  head[510] = 0x55;
  head[511] = 0xaa;
  head.write("EFI PART", SECTOR);
  guid("01234567-89ab-cdef-0123-456789abcdef").copy(head, SECTOR + 56);
  head.writeBigUInt64LE(2n, SECTOR + 72);
  head.writeUInt32LE(128, SECTOR + 80);
  head.writeUInt32LE(128, SECTOR + 84);
  const entry = (i, type, first, last, name) => {
    const at = 2 * SECTOR + i * 128;
    guid(type).copy(head, at);
    guid(`00000000-0000-0000-0000-00000000000${i + 1}`).copy(head, at + 16);
    head.writeBigUInt64LE(BigInt(first), at + 32);
    head.writeBigUInt64LE(BigInt(last), at + 40);
    head.write(name, at + 56, "utf16le");
  };
  entry(0, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", 2048, 10239, "EFI system");
  entry(1, "0fc63daf-8483-4772-8e79-3d69d8477de4", 10240, 32734, "root");
  await file.write(head, 0, head.length, 0);
  await file.close();
}

test("inspect: an nbd-std serve export through websockify: exports, size, MBR partitions, block status, hex", async (t) => {
  if (!requireTools(t, [CHROMIUM, "websockify"])) return;
  const defer = cleanups(t);
  const dir = await tempDir();
  defer(dir.remove);
  const image = join(dir.path, "mbr.img");
  await makeImage(image);
  const gptImage = join(dir.path, "gpt.img");
  await makeGptImage(gptImage);
  const port = await freePort();
  const server = new Child("nbd-std serve", NBD_STD, [
    "serve", "--port", String(port), "--export", `disk=file:${image},desc=MBR test disk`, "--export", `gpt=file:${gptImage}`, "--export", "scratch=memory:1M",
  ]);
  defer(server.stop);
  await server.waitForOutput(/listening|127\.0\.0\.1:\d+/i);
  const websockify = await startWebsockify(port);
  defer(websockify.stop);

  const { page } = await openPage(t, defer, `inspect=${encodeURIComponent(websockify.url)}&export=disk`);
  await waitForState(page, "inspected", 30000);

  const exportsText = await page.textContent("#export-list");
  assert.match(exportsText, /disk – MBR test disk/);
  assert.match(exportsText, /scratch/);
  const info = await page.textContent("#export-info");
  assert.match(info, /32 MiB \(33554432 bytes, 65536 sectors\)/);
  assert.match(info, /READ_ONLY|SEND_FLUSH/);
  assert.match(info, /block sizes\s*minimum \d+, preferred \d+, maximum \d+/);

  const rows = await page.$$eval("#partition-table tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent).join(" | ")));
  for (const row of rows) t.diagnostic(`partition: ${row}`);
  assert.deepEqual(rows, [
    "1 | 2048 | 22527 | 20480 | 10 MiB | Linux (0x83) | *",
    "2 | 22528 | 30719 | 8192 | 4 MiB | Linux swap (0x82) | ",
    "3 | 30720 | 63487 | 32768 | 16 MiB | W95 Extended (LBA) (0x0f) | ",
    "5 | 32768 | 63487 | 30720 | 15 MiB | W95 FAT32 (LBA) (0x0c) | ",
  ]);
  assert.match(await page.textContent("#partitions"), /MBR, disk id 4e424421, 4 partitions/);

  // Sector 0 in hex ends with the boot signature; sector 2048 holds our text.
  const hex = await page.textContent("#hex-view");
  assert.match(hex, /^sector 0 \(offset 0\)/);
  assert.match(hex, /00000001f0 .* 55 aa {2}\|/);
  await page.fill("#hex-sector", "2048");
  await page.click("#hex-show");
  await page.waitForFunction(() => document.querySelector("#hex-view").textContent.startsWith("sector 2048"));
  assert.match(await page.textContent("#hex-view"), /\|hello from parti\|/);

  const legend = await page.textContent("#block-legend");
  t.diagnostic(`block status: ${legend}`);
  assert.match(legend, /data \d/);

  await mkdir(SCREENSHOT_DIR, { recursive: true });
  const screenshot = join(SCREENSHOT_DIR, "inspect.png");
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`inspect screenshot: ${screenshot}`);

  // Another export from the list: GPT partitions with their names.
  await page.click('#export-list li[data-name="gpt"]');
  await page.waitForFunction(() => /GPT, disk id/.test(document.querySelector("#partitions").textContent));
  await waitForState(page, "inspected", 30000);
  const gptRows = await page.$$eval("#partition-table tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent).join(" | ")));
  assert.deepEqual(gptRows, [
    "1 | 2048 | 10239 | 8192 | 4 MiB | EFI System (c12a7328-f81f-11d2-ba4b-00a0c93ec93b) | EFI system",
    "2 | 10240 | 32734 | 22495 | 11 MiB | Linux filesystem (0fc63daf-8483-4772-8e79-3d69d8477de4) | root",
  ]);
  assert.match(await page.textContent("#partitions"), /GPT, disk id 01234567-89ab-cdef-0123-456789abcdef, 2 partitions/);
  assert.match(await page.textContent("#export-info"), /16 MiB \(16777216 bytes/);
});
