// Virtual media: a VM boots from a disk the browser page serves. The page
// serves a RAM disk through `nbd-std bridge`; an ext4 root image (built
// by nbd-std/tests/scripts/guest.sh, like the kernel_guest test's) is
// written into it with nbdcopy; qemu-system-x86_64 (TCG) boots Debian's
// kernel with that disk as its root (a virtio disk QEMU opens as
// nbd://127.0.0.1:PORT/), the guest writes a file and powers off, and the
// file is in the image read back from the page.
// Needs what serve.test.mjs needs plus qemu-system-x86_64, busybox-static,
// nbd-client, e2fsprogs and Debian's kernel package (fetched by guest.sh
// with apt-get download on first use).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import {
  CHROMIUM, Child, REPO_ROOT, cleanups, openPage, requireTools, runOk, startBridge, tempDir, waitForState,
} from "./harness.mjs";

const GUEST_SCRIPT = join(REPO_ROOT, "nbd-std/tests/scripts/guest.sh");
const GUEST_DIR = join(REPO_ROOT, "target/kernel-guest");
const ROOT_SIZE = "32M";
/** Boot under TCG, init, power-off: about 20 s; room for a loaded machine. */
const BOOT_TIMEOUT_MS = 300000;

test("vm boot: QEMU boots a Linux guest whose root disk is a RAM disk served by the browser page", async (t) => {
  if (!requireTools(t, [CHROMIUM, "nbdcopy", "qemu-system-x86_64", "busybox", "nbd-client", "mkfs.ext4", "debugfs", "e2fsck"])) return;
  const defer = cleanups(t);
  const dir = await tempDir();
  defer(dir.remove);
  await runOk("bash", [GUEST_SCRIPT, "prepare", GUEST_DIR], { timeoutMs: 600000 });
  const root = join(dir.path, "root.img");
  await runOk("bash", [GUEST_SCRIPT, "rootfs", root, ROOT_SIZE]);
  // The initramfs' /init sources test/pid1.sh: mount /dev/vda, switch_root.
  const extra = join(dir.path, "extra");
  await mkdir(join(extra, "test"), { recursive: true });
  await writeFile(join(extra, "test/pid1.sh"), await readFile(join(REPO_ROOT, "nbd-std/tests/scripts/guest/boot-root.sh")));
  const appended = join(dir.path, "extra.cpio.gz");
  await runOk("bash", [GUEST_SCRIPT, "pack", extra, appended]);
  const initramfs = join(dir.path, "initramfs");
  await writeFile(initramfs, Buffer.concat([await readFile(join(GUEST_DIR, "initramfs.cpio.gz")), await readFile(appended)]));

  const bridge = await startBridge();
  let passed = false;
  defer(async () => {
    await bridge.stop();
    if (!passed) for (const line of bridge.child.output.trim().split("\n").slice(-20)) t.diagnostic(`bridge: ${line}`);
  });
  const { page } = await openPage(t, defer, `serve=ram&size=${ROOT_SIZE}&ws=${encodeURIComponent(bridge.wsUrl)}`);
  await waitForState(page, "serving");
  await runOk("nbdcopy", [root, bridge.uri]);

  const qemu = new Child("qemu-system-x86_64", "qemu-system-x86_64", [
    "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
    "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
    "-kernel", join(GUEST_DIR, "vmlinuz"), "-initrd", initramfs,
    "-append", "console=ttyS0 loglevel=2 panic=-1", "-nic", "none",
    "-drive", `file=nbd://127.0.0.1:${bridge.nbdPort}/,format=raw,if=virtio,cache=none`,
  ]);
  defer(qemu.stop);
  const started = performance.now();
  await qemu.waitForOutput(/nbd-root: wrote \/var\/log\/booted-from-nbd/, BOOT_TIMEOUT_MS);
  const timer = setTimeout(() => qemu.stop(), 60000);
  const exit = await qemu.exited;
  clearTimeout(timer);
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  assert.equal(exit.code, 0, `QEMU exit\n${qemu.output}`);
  assert.match(qemu.output, /nbd-root: mounted \/dev\/vda ext4 rw/);
  console.log(`VM booted from the browser RAM disk (via nbd-std bridge) and powered off in ${seconds} s`);
  for (const line of qemu.output.split(/\r?\n/)) if (line.startsWith("nbd-")) t.diagnostic(line.trim());

  // The guest's file, read back from the page's RAM disk.
  const back = join(dir.path, "back.img");
  await runOk("nbdcopy", [bridge.uri, back]);
  await runOk("e2fsck", ["-fn", back]);
  const file = await runOk("debugfs", ["-R", "cat /var/log/booted-from-nbd", back]);
  assert.match(file.stdout, /written by the guest booted from an NBD export/);
  assert.match(await page.textContent("#client-options"), /GO export ""/);
  passed = true;
});
