// The npm package as a user gets it: `npm pack` (its prepack runs
// build.sh), then each example in examples/npm-*/ is copied to a fresh
// directory outside the repository, installed from the tarball (no link
// back to the repository) and run:
//   npm-node-server  serves a file over node:net: nbdinfo, nbdcopy, qemu-io
//   npm-parser       records a qemu-io session and prints its events
//   npm-vite-page    type-checked (tsc), bundled with Vite, run in Debian's chromium
// Needs cargo, wasm-bindgen-cli, npm (registry access for vite and
// typescript), `npm ci` in nbd-wasm (playwright-core), chromium,
// libnbd-bin and qemu-utils.
// Run: node --test nbd-wasm/tests/package/
import { before, after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { cp, mkdtemp, readFile, readdir, realpath, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  CHROMIUM, COMMAND_TIMEOUT_MS, Child, PACKAGE_ROOT, REPO_ROOT, cleanups, freePort, launchBrowser, run, runOk, sha256,
  skipOrFail, staticServer,
} from "../browser/harness.mjs";

const MiB = 1024 * 1024;
/** Longest wait for `npm pack` (a release build of the wasm when it is not built yet) and `npm install`. */
const NPM_TIMEOUT_MS = 600000;

/** Shows a command's output in the test report, a diagnostic per line. */
const show = (t, text) => {
  for (const line of text.trimEnd().split("\n")) t.diagnostic(line);
};

/** Tools missing from this machine, by the name a user would install. */
function missingTools(tools) {
  return tools.filter((tool) => {
    if (tool.includes("/")) return spawnSync(tool, ["--version"]).error !== undefined;
    return spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0;
  });
}

const packaging = { dir: null, tarball: null, error: null };

before(async () => {
  const missing = missingTools(["npm", "cargo", "wasm-bindgen"]);
  if (missing.length) {
    packaging.error = `missing: ${missing.join(", ")} (npm pack runs nbd-wasm/build.sh)`;
    return;
  }
  packaging.dir = await mkdtemp(join(tmpdir(), "nbd-wasm-package-"));
  const packed = await runOk("npm", ["pack", "--json", "--pack-destination", packaging.dir], {
    timeoutMs: NPM_TIMEOUT_MS, cwd: PACKAGE_ROOT,
  });
  const [{ filename, files }] = JSON.parse(packed.stdout.slice(packed.stdout.search(/^\[/m)));
  packaging.tarball = join(packaging.dir, filename);
  packaging.files = files.map((file) => file.path);
});

after(async () => {
  if (packaging.dir) await rm(packaging.dir, { recursive: true, force: true });
});

/** Skips or fails the test when the package could not be packed or a tool is missing; true when it can run. */
function ready(t, tools = []) {
  const missing = missingTools(tools);
  if (packaging.error || missing.length) {
    skipOrFail(t, packaging.error ?? `missing: ${missing.join(", ")}`);
    return false;
  }
  return true;
}

/**
 * Copies examples/NAME to a fresh directory outside the repository, points
 * its nbd-wasm dependency at the packed tarball and installs; resolves to
 * the directory.
 */
async function installExample(defer, name) {
  const dir = await mkdtemp(join(tmpdir(), `nbd-wasm-${name}-`));
  defer(() => rm(dir, { recursive: true, force: true }));
  const source = join(REPO_ROOT, "examples", name);
  await cp(source, dir, { recursive: true, filter: (path) => !/\/(node_modules|dist)(\/|$)/.test(path.slice(source.length)) });
  const manifest = JSON.parse(await readFile(join(dir, "package.json"), "utf8"));
  assert.ok(manifest.dependencies["nbd-wasm"], `${name} depends on nbd-wasm`);
  manifest.dependencies["nbd-wasm"] = `file:${packaging.tarball}`;
  await writeFile(join(dir, "package.json"), JSON.stringify(manifest, null, 2));
  await runOk("npm", ["install", "--no-audit", "--no-fund"], { timeoutMs: NPM_TIMEOUT_MS, cwd: dir });
  // Installed from the tarball: a copy inside the example, not a link into the repository.
  const installed = await realpath(join(dir, "node_modules", "nbd-wasm"));
  assert.ok(installed.startsWith(await realpath(dir)), `nbd-wasm installed at ${installed}`);
  return dir;
}

/** Starts the node server example serving `file` as export `name` on a free port; resolves to {child, port, uri}. */
async function startNodeServer(defer, dir, file, name) {
  const port = await freePort();
  const child = new Child("npm-node-server", process.execPath, ["server.mjs", file, "--port", String(port), "--name", name], { cwd: dir });
  defer(child.stop);
  await child.waitForOutput(/serving .* on 127\.0\.0\.1:\d+/);
  return { child, port, uri: `nbd://127.0.0.1:${port}/${name}` };
}

test("the tarball holds the JavaScript layer, the built wasm and the types, and nothing of the tests", (t) => {
  if (!ready(t)) return;
  for (const path of ["js/index.js", "js/node.js", "js/index.d.ts", "pkg/web/nbd_wasm.js", "pkg/web/nbd_wasm_bg.wasm", "pkg/web/nbd_wasm.d.ts", "README.md"]) {
    assert.ok(packaging.files.includes(path), `${path} in ${packaging.files.join(" ")}`);
  }
  assert.deepEqual(packaging.files.filter((path) => /^(tests|www|src|pkg\/node)\//.test(path)), []);
});

test("npm-node-server: a file served over node:net, read by nbdinfo and nbdcopy, written by qemu-io", async (t) => {
  if (!ready(t, ["nbdinfo", "nbdcopy", "qemu-io"])) return;
  const defer = cleanups(t);
  const dir = await installExample(defer, "npm-node-server");
  const disk = join(dir, "disk.img");
  const content = randomBytes(8 * MiB);
  await writeFile(disk, content);
  const server = await startNodeServer(defer, dir, disk, "disk");

  const info = await runOk("nbdinfo", [server.uri]);
  show(t, info.stdout);
  assert.match(info.stdout, /export="disk":/);
  assert.match(info.stdout, /export-size: 8388608 \(8M\)/);
  assert.match(info.stdout, /description: .*disk\.img served from Node/);
  assert.match(info.stdout, /can_flush: true/);

  const copy = join(dir, "copy.img");
  const copied = await runOk("nbdcopy", [server.uri, copy]);
  assert.equal(await sha256(copy), await sha256(content));
  t.diagnostic(`nbdcopy read 8 MiB in ${copied.ms.toFixed(0)} ms`);

  const wrote = await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0xab 4096 512", "-c", "flush", server.uri]);
  assert.match(wrote.stdout, /wrote 512\/512 bytes at offset 4096/);
  content.fill(0xab, 4096, 4096 + 512);
  assert.equal(await sha256(disk), await sha256(content));
  assert.match(server.child.output, /export "disk" \(8388608 bytes\)/);
});

test("npm-parser: a qemu-io session recorded in front of the node server, then printed event by event", async (t) => {
  if (!ready(t, ["qemu-io"])) return;
  const defer = cleanups(t);
  const serverDir = await installExample(defer, "npm-node-server");
  const dir = await installExample(defer, "npm-parser");
  const disk = join(serverDir, "disk.img");
  await writeFile(disk, Buffer.alloc(4 * MiB));
  const server = await startNodeServer(defer, serverDir, disk, "scratch");
  const recordPort = await freePort();
  const session = join(dir, "session.bin");
  const recorder = new Child("npm-parser record.mjs", process.execPath,
    ["record.mjs", "--listen", String(recordPort), "--server", `127.0.0.1:${server.port}`, "--out", session], { cwd: dir });
  defer(recorder.stop);
  await recorder.waitForOutput(/recording clients on/);

  await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 8192 1024", "-c", "read 0 4096", "-c", "discard 1M 64k", "-c", "flush",
    `nbd://127.0.0.1:${recordPort}/scratch`]);
  await recorder.waitForOutput(/recorded \d+ bytes to/);

  const parsed = await runOk(process.execPath, ["parse.mjs", session], { cwd: dir });
  show(t, parsed.stdout);
  const lines = parsed.stdout.trim().split("\n");
  assert.match(lines[0], /^client flags 0x00000003$/);
  assert.ok(lines.includes('export "scratch" selected, extended headers') || lines.includes('export "scratch" selected, structured replies'), parsed.stdout);
  assert.match(parsed.stdout, /^option GO export "scratch"/m);
  assert.match(parsed.stdout, /^write offset 8192 length 1024/m);
  assert.match(parsed.stdout, /^ {2}data at 8192: 1024 bytes 5a 5a 5a 5a 5a 5a 5a 5a …$/m);
  assert.match(parsed.stdout, /^read offset 0 length 4096$/m);
  assert.match(parsed.stdout, /^trim offset 1048576 length 65536$/m);
  assert.match(parsed.stdout, /^flush$/m);
  assert.equal(lines.at(-1), "end: disconnect");

  // --json: the same events as objects; the write's payload byte for byte.
  const json = await runOk(process.execPath, ["parse.mjs", session, "--json"], { cwd: dir });
  const events = json.stdout.trim().split("\n").map((line) => JSON.parse(line));
  const data = events.filter((event) => event.type === "writeData").flatMap((event) => event.data);
  assert.deepEqual(data, Array(1024).fill(0x5a));

  // Bytes that are not NBD: the protocol error is the last line, exit status 1.
  const garbage = join(dir, "garbage.bin");
  await writeFile(garbage, Buffer.from("GET / HTTP/1.1\r\nHost: example\r\n\r\n"));
  const refused = await run(process.execPath, ["parse.mjs", garbage], { cwd: dir });
  assert.equal(refused.code, 1, refused.stdout + refused.stderr);
  assert.match(refused.stdout.trim().split("\n").at(-1), /^protocol error: /);

  // The session shipped with the example (npm start).
  const sample = await runOk("npm", ["start", "--silent"], { cwd: dir });
  assert.match(sample.stdout, /^export "disk" selected/m);
  assert.match(sample.stdout, /^end: disconnect$/m);
});

test("npm-vite-page: type-checked against the package's types, bundled by Vite, runs the core in headless chromium", async (t) => {
  if (!ready(t, [CHROMIUM])) return;
  try {
    await import("playwright-core");
  } catch {
    skipOrFail(t, "missing: npm playwright-core (run npm ci in nbd-wasm)");
    return;
  }
  const defer = cleanups(t);
  const dir = await installExample(defer, "npm-vite-page");
  // `npm run build` is `tsc && vite build`: main.ts must type-check against the package's .d.ts.
  const built = await runOk("npm", ["run", "build"], { timeoutMs: COMMAND_TIMEOUT_MS, cwd: dir });
  show(t, built.stdout);
  const assets = await readdir(join(dir, "dist", "assets"));
  assert.ok(assets.some((name) => /^nbd_wasm_bg-.*\.wasm$/.test(name)), `wasm among ${assets.join(" ")}`);

  const http = await staticServer(join(dir, "dist"));
  defer(http.close);
  const browser = await launchBrowser();
  defer(async () => {
    for (const line of browser.console) t.diagnostic(`browser console: ${line}`);
    await browser.close();
  });
  const fetched = [];
  browser.page.on("response", (response) => fetched.push(`${response.status()} ${new URL(response.url()).pathname}`));
  await browser.page.goto(`http://127.0.0.1:${http.port}/`);
  const state = await browser.page.waitForFunction(
    () => ["done", "error"].includes(document.body.dataset.state) && document.body.dataset.state,
    null,
    { timeout: 30000 },
  );
  const text = await browser.page.textContent("#log");
  show(t, text);
  assert.equal(await state.jsonValue(), "done", text);
  assert.match(text, /export "ram": 4194304 bytes/);
  assert.match(text, /wrote 65536 bytes at 1 MiB, read them back: equal/);
  assert.match(text, /block status: \d+ zero, 65536 data, \d+ zero/);
  assert.match(text, /disconnected: client closed, server closed/);
  assert.ok(fetched.some((line) => /^200 \/assets\/nbd_wasm_bg-.*\.wasm$/.test(line)), fetched.join("\n"));
});
