// Harness of the browser tests: free ports, child processes killed by
// PID, a static HTTP server for nbd-wasm/, Debian's chromium through
// playwright-core, and the tools the tests need (skipped when missing
// unless NBD_REQUIRE_TOOLS=1, then failed).
import { spawn, spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { createServer } from "node:http";
import { createServer as createTcpServer, connect } from "node:net";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE_ROOT = fileURLToPath(new URL("../../", import.meta.url));
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
/** The nbd-std binary (cargo build -p nbd-std). */
export const NBD_STD = process.env.NBD_STD ?? join(REPO_ROOT, "target/debug/nbd-std");
export const SCREENSHOT_DIR = join(REPO_ROOT, "target/browser-screenshots");
/** Longest wait for a process to listen, a page state, a command. */
export const START_TIMEOUT_MS = 15000;
export const COMMAND_TIMEOUT_MS = 120000;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createTcpServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once something accepts TCP connections on `port`. */
export async function waitForPort(port, what, ms = START_TIMEOUT_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const socket = connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on port ${port} within ${ms} ms`);
    await sleep(50);
  }
}

/**
 * Whether the tools exist; when one is missing, skips the test (`t.skip`)
 * or, with NBD_REQUIRE_TOOLS=1, throws.
 */
export function requireTools(t, tools) {
  const missing = tools.filter((tool) => {
    if (tool.includes("/")) return spawnSync(tool, ["--version"]).error !== undefined;
    return spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0;
  });
  if (spawnSync(NBD_STD, ["bridge", "--help"]).status !== 0) missing.push(`${NBD_STD} bridge (cargo build -p nbd-std)`);
  try {
    createRequire(import.meta.url).resolve("playwright-core");
  } catch {
    missing.push("npm playwright-core (run npm ci in nbd-wasm)");
  }
  if (!missing.length) return true;
  skipOrFail(t, `missing: ${missing.join(", ")}`);
  return false;
}

/** Skips the test (`t.skip(message)`) or, with NBD_REQUIRE_TOOLS=1, throws `message`. */
export function skipOrFail(t, message) {
  if (process.env.NBD_REQUIRE_TOOLS === "1") throw new Error(message);
  t.skip(message);
}

/** A child process whose output is kept; `stop()` kills it by PID (SIGTERM, then SIGKILL). */
export class Child {
  constructor(name, command, args, options = {}) {
    this.name = name;
    this.output = "";
    this.stop = this.stop.bind(this); // usable as a bare cleanup function
    this.child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], ...options });
    this.exited = new Promise((resolve) => {
      this.child.once("exit", (code, signal) => resolve({ code, signal }));
      this.child.once("error", (error) => {
        this.output += `spawn failed: ${error.message}\n`;
        resolve({ code: -1, signal: null });
      });
    });
    const keep = (chunk) => {
      this.output += chunk;
      if (this.output.length > 200000) this.output = this.output.slice(-100000);
    };
    this.child.stdout.setEncoding("utf8").on("data", keep);
    this.child.stderr.setEncoding("utf8").on("data", keep);
  }

  get pid() {
    return this.child.pid;
  }

  /** Resolves once the output matches `pattern` (throws if the process exits first, or after `ms`). */
  async waitForOutput(pattern, ms = START_TIMEOUT_MS) {
    const deadline = Date.now() + ms;
    let exited = false;
    this.exited.then(() => (exited = true));
    while (!pattern.test(this.output)) {
      if (exited) throw new Error(`${this.name} exited before printing ${pattern}:\n${this.output}`);
      if (Date.now() > deadline) throw new Error(`${this.name} did not print ${pattern} within ${ms} ms:\n${this.output}`);
      await sleep(20);
    }
  }

  async stop() {
    if (this.child.exitCode !== null || this.child.signalCode !== null || this.pid === undefined) return this.exited;
    process.kill(this.pid, "SIGTERM");
    const timer = setTimeout(() => this.child.exitCode === null && process.kill(this.pid, "SIGKILL"), 5000);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

/** Runs a command to its end (bounded; in directory `cwd` if given); resolves to {code, stdout, stderr, ms}. */
export function run(command, args, { timeoutMs = COMMAND_TIMEOUT_MS, input, cwd } = {}) {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(command, args, { cwd, stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d) => (stderr += d));
    if (input !== undefined) child.stdin.end(input);
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${command} ${args.join(" ")}: no exit within ${timeoutMs} ms\n${stdout}${stderr}`));
    }, timeoutMs);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, ms: performance.now() - started });
    });
  });
}

/** Like `run`, but throws unless the exit status is 0. */
export async function runOk(command, args, options) {
  const result = await run(command, args, options);
  if (result.code !== 0) {
    throw new Error(`${command} ${args.join(" ")} exited ${result.code}\n${result.stdout}${result.stderr}`);
  }
  return result;
}

const TYPES = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
  ".css": "text/css", ".wasm": "application/wasm", ".json": "application/json", ".ts": "text/plain",
};

/** A static HTTP server for nbd-wasm/ (the page is /www/); resolves to {port, close()}. */
export function staticServer(root = PACKAGE_ROOT) {
  const server = createServer(async (request, response) => {
    const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
    const file = join(root, path.endsWith("/") ? `${path}index.html` : path);
    if (!file.startsWith(root) || file.includes("node_modules")) {
      response.writeHead(403).end();
      return;
    }
    try {
      if (!(await stat(file)).isFile()) throw new Error("not a file");
      const body = await readFile(file);
      response.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      response.end(body);
    } catch {
      response.writeHead(404).end("not found");
    }
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve({ port: server.address().port, close: () => new Promise((r) => server.close(r)) });
    });
  });
}

/** Chromium (headless, fresh profile) through playwright-core; resolves to {context, page, close()}. */
export async function launchBrowser() {
  const { chromium } = await import("playwright-core");
  const profile = await mkdtemp(join(tmpdir(), "nbd-wasm-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1200, height: 1000 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const console = [];
  page.on("console", (message) => console.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => console.push(`pageerror: ${error.message}`));
  return {
    context,
    page,
    console,
    close: async () => {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Waits until the page's document.body.dataset.state is one of `states` (throws on "error"). */
export async function waitForState(page, states, ms = START_TIMEOUT_MS) {
  const wanted = [].concat(states);
  const state = await page.waitForFunction(
    (w) => (w.includes(document.body.dataset.state) || document.body.dataset.state === "error") && document.body.dataset.state,
    wanted,
    { timeout: ms },
  );
  const value = await state.jsonValue();
  if (!wanted.includes(value)) {
    const text = await page.evaluate(() => `${document.getElementById("serve-state").textContent} / ${document.getElementById("inspect-status").textContent}`);
    throw new Error(`page state ${value}: ${text}`);
  }
  return value;
}

/** The test pattern of nbd-wasm's RamDisk, computed here on its own: LE u32 at byte o = (o/4 + 1) * 0x9E3779B1. */
export function pattern(length, offset = 0) {
  const out = Buffer.alloc(length);
  for (let at = 0; at < length; at += 4) out.writeUInt32LE(Math.imul((offset + at) / 4 + 1, 0x9e3779b1) >>> 0, at);
  return out;
}

/** A fresh temporary directory, and its removal. */
export async function tempDir() {
  const path = await mkdtemp(join(tmpdir(), "nbd-wasm-test-"));
  return { path, remove: () => rm(path, { recursive: true, force: true }) };
}

/**
 * Starts `nbd-std bridge` on free ports (NBD clients on `nbdPort`,
 * WebSocket providers on `wsPort`, TCP providers on `providersPort` when
 * `providers` is set); `stop()` ends it.
 */
export async function startBridge({ providers = false, wait = 5 } = {}) {
  const nbdPort = await freePort();
  const wsPort = await freePort();
  const providersPort = providers ? await freePort() : null;
  const args = ["bridge", "--port", String(nbdPort), "--ws", `127.0.0.1:${wsPort}`, "--wait", String(wait)];
  if (providers) args.push("--providers", `127.0.0.1:${providersPort}`);
  const child = new Child("nbd-std bridge", NBD_STD, args, { env: { ...process.env, NO_COLOR: "1" } });
  await child.waitForOutput(/bridge: NBD clients on/);
  return { nbdPort, wsPort, providersPort, child, uri: `nbd://127.0.0.1:${nbdPort}/`, wsUrl: `ws://127.0.0.1:${wsPort}/`, stop: () => child.stop() };
}

/** Starts stock websockify on a free port in front of TCP `target`; resolves to {port, url, child, stop()}. */
export async function startWebsockify(target) {
  const port = await freePort();
  const child = new Child("websockify", "websockify", ["127.0.0.1:" + port, `127.0.0.1:${target}`]);
  await waitForPort(port, "websockify");
  return { port, url: `ws://127.0.0.1:${port}/`, child, stop: () => child.stop() };
}

/** Runs `cleanup` functions in reverse order of registration when the test ends (also on failure). */
export function cleanups(t) {
  const list = [];
  t.after(async () => {
    for (const cleanup of list.reverse()) {
      try {
        await cleanup();
      } catch (error) {
        console.error("cleanup failed:", error);
      }
    }
  });
  return (cleanup) => list.push(cleanup);
}

/** SHA-256 of a file or buffer, hex. */
export async function sha256(source) {
  const { createHash } = await import("node:crypto");
  return createHash("sha256").update(typeof source === "string" ? await readFile(source) : source).digest("hex");
}

/**
 * Serves nbd-wasm/ over HTTP, starts chromium, opens /www/?`query`;
 * both end with the test (`defer` from `cleanups`). Resolves to
 * {page, context, console, url}.
 */
export async function openPage(t, defer, query) {
  const http = await staticServer();
  defer(http.close);
  const browser = await launchBrowser();
  defer(async () => {
    for (const line of browser.console) t.diagnostic(`browser console: ${line}`);
    await browser.close();
  });
  const url = `http://127.0.0.1:${http.port}/www/?${query}`;
  await browser.page.goto(url);
  return { ...browser, url };
}
