// The demo page: Serve (a RAM, File or OPFS disk to NBD clients through
// nbd-std bridge) and Inspect (an NBD export through websockify). URL
// parameters start either without clicks; document.body.dataset.state
// tells tests where the page is: loading, ready, waiting-file,
// connecting, serving, inspecting, inspected, stopped, error.
import {
  FileDisk, OpfsDisk, RamDisk, connectExport, flagNames, formatSize, listExports, load, readPartitionTable,
  serveDisk,
} from "../js/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const LOG_ROWS = 200;
const OPTION_ROWS = 100;
const SECTOR = 512;

const setState = (state) => {
  document.body.dataset.state = state;
};

const escape = (text) => String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

// ---- Tabs -------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  $("serve").hidden = name !== "serve";
  $("inspect").hidden = name !== "inspect";
}
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));

// ---- Serve ------------------------------------------------------------------

const serve = {
  server: null,
  disk: null,
  log: [], // latest finished requests
  options: [],
  dirty: true,
  last: { time: 0, read: 0, written: 0 },
  timer: null,
};

function onServeEvent(event) {
  const s = event.session;
  switch (event.type) {
    case "idle":
      $("serve-state").textContent = "serving: waiting for a client";
      setState("serving");
      break;
    case "disconnected":
      $("serve-state").textContent = `bridge unreachable; retrying in ${event.retryMs} ms`;
      setState("connecting");
      break;
    case "attached":
      serve.options.push(`#${s}: client attached`);
      break;
    case "option":
      serve.options.push(`#${s}: ${event.name}${event.detail ? ` ${event.detail}` : ""}`);
      break;
    case "exportSelected":
      serve.options.push(`#${s}: export ${JSON.stringify(event.name)} selected (${formatSize(event.size)}, ` +
        `${event.extendedHeaders ? "extended headers" : event.structuredReplies ? "structured replies" : "simple replies"}, ` +
        `flags ${flagNames(event.flags).join(" ")})`);
      break;
    case "done":
      serve.log.push(event);
      if (serve.log.length > LOG_ROWS) serve.log.splice(0, serve.log.length - LOG_ROWS);
      break;
    case "closed":
      if (!event.wasIdle) serve.options.push(`#${s}: closed (${event.reason}; ${event.bytesIn} bytes in, ${event.bytesOut} out)`);
      break;
    case "error":
      serve.options.push(`#${s}: error: ${event.message}`);
      break;
    default:
      return;
  }
  if (serve.options.length > OPTION_ROWS) serve.options.splice(0, serve.options.length - OPTION_ROWS);
  serve.dirty = true;
}

function renderServe() {
  const { server } = serve;
  if (!server) return;
  const now = performance.now();
  const { stats } = server;
  const seconds = (now - serve.last.time) / 1000;
  if (seconds >= 0.5) {
    const mib = 1024 * 1024;
    const read = (stats.bytesRead - serve.last.read) / mib / seconds;
    const written = (stats.bytesWritten - serve.last.written) / mib / seconds;
    serve.peak = Math.max(serve.peak ?? 0, read, written);
    $("throughput").textContent = `read ${read.toFixed(1)} MiB/s, write ${written.toFixed(1)} MiB/s (peak ${serve.peak.toFixed(1)} MiB/s)`;
    serve.last = { time: now, read: stats.bytesRead, written: stats.bytesWritten };
  }
  const states = server.states;
  $("sessions").textContent = `${states.active} attached, ${states.idle} idle, ${states.connecting} connecting; ${stats.sessions} clients so far`;
  $("totals").textContent = `${stats.requests} requests (${stats.errors} failed), ` +
    `${formatSize(stats.bytesRead)} read, ${formatSize(stats.bytesWritten)} written`;
  if (!serve.dirty) return;
  serve.dirty = false;
  const options = $("client-options");
  options.innerHTML = serve.options.map((line) => `<li>${escape(line)}</li>`).join("");
  options.scrollTop = options.scrollHeight; // newest at the bottom, in view
  $("request-log").tBodies[0].innerHTML = serve.log.slice().reverse().map((e) =>
    `<tr><td class="num">${e.session}</td><td>${e.op}</td><td class="num">${e.offset}</td><td class="num">${e.length}</td>` +
    `<td class="num">${e.ms.toFixed(1)}</td><td class="${e.error ? "err" : ""}">${e.error ? escape(`${e.error}${e.message ? `: ${e.message}` : ""}`) : "ok"}</td></tr>`).join("");
}

async function makeDisk(source) {
  switch (source) {
    case "ram":
      return new RamDisk($("ram-size").value, { fill: $("ram-pattern").checked ? "pattern" : 0 });
    case "file": {
      const file = $("file-input").files[0];
      if (!file) throw new Error("choose a file first");
      return new FileDisk(file);
    }
    case "opfs":
      return OpfsDisk.open($("opfs-name").value || "disk", { size: $("opfs-size").value || undefined });
    default:
      throw new Error(`unknown disk source ${source}`);
  }
}

async function startServing() {
  await stopServing();
  const source = document.querySelector('input[name="source"]:checked').value;
  $("serve-start").disabled = true;
  try {
    setState("connecting");
    $("serve-state").textContent = "opening the disk…";
    const disk = await makeDisk(source);
    serve.disk = disk;
    const label = { ram: "RAM disk", file: `file ${disk.name}`, opfs: `OPFS file ${disk.name}` }[disk.kind];
    $("disk-info").textContent = `${label}, ${formatSize(disk.size)} (${disk.size} bytes)${disk.readOnly ? ", read-only" : ", writable"}`;
    serve.log = [];
    serve.options = [];
    serve.last = { time: performance.now(), read: 0, written: 0 };
    serve.peak = 0;
    $("serve-state").textContent = `connecting to ${$("serve-ws").value}…`;
    serve.server = serveDisk($("serve-ws").value, disk, {
      name: $("export-name").value,
      description: `${label} served by nbd-wasm in a browser`,
      onEvent: onServeEvent,
      // ?log=0: no event per request (the request log stays empty; for benchmarks).
      logRequests: params.get("log") !== "0",
    });
    window.nbdApp.server = serve.server;
    serve.timer = setInterval(renderServe, 250);
    $("serve-stop").disabled = false;
  } catch (error) {
    $("serve-state").textContent = `error: ${error.message ?? error}`;
    setState("error");
    $("serve-start").disabled = false;
  }
}

async function stopServing() {
  if (serve.server) {
    serve.server.stop();
    renderServe();
    serve.server = null;
  }
  clearInterval(serve.timer);
  if (serve.disk) {
    await serve.disk.close?.();
    serve.disk = null;
  }
  $("serve-stop").disabled = true;
  $("serve-start").disabled = false;
  $("serve-state").textContent = "stopped";
  if (document.body.dataset.state !== "error") setState("stopped");
}

$("serve-form").addEventListener("submit", (event) => {
  event.preventDefault();
  startServing();
});
$("serve-stop").addEventListener("click", stopServing);
$("file-input").addEventListener("change", () => {
  document.querySelector('input[name="source"][value="file"]').checked = true;
  if (params.get("serve") === "file" && !serve.server) startServing();
});

// ---- Inspect ----------------------------------------------------------------

const inspect = { connection: null, table: null };

function inspectStatus(text, state) {
  $("inspect-status").textContent = text;
  if (state) setState(state);
}

async function showExportList() {
  const url = $("inspect-ws").value;
  const list = $("export-list");
  list.innerHTML = '<li class="note">listing…</li>';
  try {
    const exports = await listExports(url);
    list.innerHTML = exports.length
      ? exports.map((e) => `<li data-name="${escape(e.name)}"><code>${escape(e.name || "(default)")}</code>${e.description ? ` – ${escape(e.description)}` : ""}</li>`).join("")
      : '<li class="note">(the server lists no exports)</li>';
  } catch (error) {
    list.innerHTML = `<li class="err">${escape(error.message ?? error)}</li>`;
  }
}

$("export-list").addEventListener("click", (event) => {
  const item = event.target.closest("li[data-name]");
  if (!item) return;
  $("inspect-export").value = item.dataset.name;
  openExport();
});

function infoRows(connection) {
  const info = connection.export;
  const texts = Object.fromEntries(connection.negotiation.filter((e) => e.type === "info").map((e) => [e.infoType, e]));
  const contexts = connection.negotiation.filter((e) => e.type === "metaContext").map((e) => e.name);
  const sizes = info.blockSizes;
  const rows = [
    ["name", texts.name ? JSON.stringify(texts.name.name) : JSON.stringify($("inspect-export").value)],
    ["description", texts.description?.description || "–"],
    ["size", `${formatSize(info.size)} (${info.size} bytes, ${Math.floor(info.size / SECTOR)} sectors)`],
    ["flags", `0x${info.flags.toString(16).padStart(4, "0")}: ${flagNames(info.flags).join(" ")}`],
    ["block sizes", `minimum ${sizes.minimum}, preferred ${sizes.preferred}, maximum ${sizes.maximum}${info.blockSizesAdvertised ? "" : " (not advertised)"}`],
    ["replies", info.extendedHeaders ? "extended headers" : info.structuredReplies ? "structured replies" : "simple replies"],
    ["meta contexts", contexts.join(", ") || "none"],
  ];
  return rows.map(([k, v]) => `<tr><th>${k}</th><td>${escape(v)}</td></tr>`).join("");
}

async function showPartitions(connection) {
  const size = connection.export.size;
  const table = await readPartitionTable((o, l) => connection.read(o, l), size);
  const box = $("partitions");
  if (!table.scheme) {
    box.innerHTML = '<p class="note">no MBR or GPT partition table</p>';
    return table;
  }
  const gpt = table.scheme === "gpt";
  const head = ["#", "start", "end", "sectors", "size", "type", gpt ? "name" : "boot"];
  box.innerHTML = `<p>${table.scheme.toUpperCase()}, disk id ${escape(table.diskId)}, ${table.partitions.length} partitions</p>` +
    `<table id="partition-table"><thead><tr>${head.map((h) => `<th>${h}</th>`).join("")}</tr></thead><tbody>` +
    table.partitions.map((p) => `<tr><td>${p.number}</td><td class="num">${p.start}</td><td class="num">${p.end}</td>` +
      `<td class="num">${p.sectors}</td><td class="num">${formatSize(p.size)}</td><td>${escape(`${p.typeName} (${p.type})`)}</td>` +
      `<td>${escape(gpt ? p.name : p.bootable ? "*" : "")}</td></tr>`).join("") +
    `</tbody></table>${table.warnings.map((w) => `<p class="err">${escape(w)}</p>`).join("")}`;
  return table;
}

/** Partitions as a band under the block map, numbered where there is room. */
function drawPartitions(context, canvas, size) {
  const table = inspect.table;
  if (!table?.scheme) return;
  const band = 12;
  context.fillStyle = "#fff";
  context.fillRect(0, canvas.height - band, canvas.width, band);
  context.font = "10px system-ui, sans-serif";
  context.textBaseline = "middle";
  table.partitions.forEach((p, i) => {
    const x0 = ((p.start * table.sectorSize) / size) * canvas.width;
    const x1 = (((p.end + 1) * table.sectorSize) / size) * canvas.width;
    context.fillStyle = i % 2 ? "#8c959f" : "#57606a";
    context.fillRect(x0, canvas.height - band + 1, Math.max(1, x1 - x0 - 1), band - 2);
    if (x1 - x0 > 14) {
      context.fillStyle = "#fff";
      context.fillText(String(p.number), x0 + 3, canvas.height - band / 2);
    }
  });
}

/** Most block-status requests one map may take. */
const MAX_MAP_REQUESTS = 256;

async function showBlockMap(connection) {
  const canvas = $("block-map");
  const context = canvas.getContext("2d");
  const size = connection.export.size;
  const legend = $("block-legend");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!connection.contexts.size || ![...connection.contexts.values()].includes("base:allocation")) {
    legend.textContent = "the server offers no base:allocation block status";
    return;
  }
  const colors = { 0: getComputedStyle(document.body).getPropertyValue("--data"), 2: "#9ccaf5", 1: "#e6e9ec", 3: "#e6e9ec" };
  const totals = { data: 0, zero: 0, hole: 0 };
  let offset = 0;
  let requests = 0;
  const chunk = connection.export.extendedHeaders ? 2 ** 40 : 2 ** 31 - 2 ** 20;
  while (offset < size && requests++ < MAX_MAP_REQUESTS) {
    const extents = await connection.blockStatus(offset, Math.min(chunk, size - offset));
    if (!extents.length) break;
    for (const extent of extents) {
      const length = Math.min(extent.length, size - extent.offset);
      if (length <= 0) continue;
      const kind = extent.status & 1 ? "hole" : extent.status & 2 ? "zero" : "data";
      totals[kind] += length;
      const x0 = (extent.offset / size) * canvas.width;
      const x1 = ((extent.offset + length) / size) * canvas.width;
      context.fillStyle = colors[extent.status & 3];
      context.fillRect(x0, 0, Math.max(1, x1 - x0), canvas.height);
      offset = extent.offset + length;
    }
  }
  drawPartitions(context, canvas, size);
  const pct = (n) => `${((100 * n) / size).toFixed(1)}%`;
  legend.innerHTML = `<span class="swatch" style="background:${colors[0]}"></span>data ${pct(totals.data)}` +
    `<span class="swatch" style="background:${colors[2]}"></span>zero ${pct(totals.zero)}` +
    `<span class="swatch" style="background:${colors[1]}"></span>hole ${pct(totals.hole)}` +
    (offset < size ? ` (first ${formatSize(offset)} mapped)` : "") +
    (inspect.table?.scheme ? '<span class="swatch" style="background:#57606a"></span>partitions (band below)' : "");
}

function hexDump(bytes, base) {
  const lines = [];
  for (let at = 0; at < bytes.length; at += 16) {
    const row = bytes.subarray(at, at + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${(base + at).toString(16).padStart(10, "0")}  ${hex.slice(0, 23)}  ${hex.slice(24)}  |${ascii}|`);
  }
  return lines.join("\n");
}

async function showSector() {
  const connection = inspect.connection;
  if (!connection) return;
  const sectors = Math.ceil(connection.export.size / SECTOR);
  const sector = Math.max(0, Math.min(sectors - 1, Math.floor(Number($("hex-sector").value) || 0)));
  $("hex-sector").value = sector;
  const offset = sector * SECTOR;
  const length = Math.min(SECTOR, connection.export.size - offset);
  try {
    $("hex-view").textContent = `sector ${sector} (offset ${offset})\n${hexDump(await connection.read(offset, length), offset)}`;
  } catch (error) {
    $("hex-view").textContent = `sector ${sector}: ${error.message ?? error}`;
  }
}

async function closeExport() {
  const connection = inspect.connection;
  inspect.connection = null;
  $("close-button").disabled = true;
  if (connection) await connection.close();
}

async function openExport() {
  await closeExport();
  inspect.table = null;
  const url = $("inspect-ws").value;
  const name = $("inspect-export").value;
  inspectStatus(`connecting to ${url}, export ${JSON.stringify(name)}…`, "inspecting");
  try {
    const connection = await connectExport(url, { exportName: name });
    inspect.connection = connection;
    window.nbdApp.connection = connection;
    connection.onClose = (error) => {
      if (inspect.connection === connection) {
        inspect.connection = null;
        $("close-button").disabled = true;
        inspectStatus(`connection closed${error ? `: ${error.message}` : ""}`);
      }
    };
    $("close-button").disabled = false;
    $("export-info").tBodies[0].innerHTML = infoRows(connection);
    inspectStatus(`connected to ${url}, export ${JSON.stringify(name)}: reading…`);
    inspect.table = await showPartitions(connection);
    await showSector();
    await showBlockMap(connection);
    inspectStatus(`connected to ${url}, export ${JSON.stringify(name)}`, "inspected");
  } catch (error) {
    inspectStatus(`error: ${error.message ?? error}`, "error");
  }
}

$("inspect-form").addEventListener("submit", (event) => {
  event.preventDefault();
  openExport();
});
$("list-button").addEventListener("click", showExportList);
$("close-button").addEventListener("click", async () => {
  await closeExport();
  inspectStatus("closed");
});
$("hex-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showSector();
});
$("hex-prev").addEventListener("click", () => {
  $("hex-sector").value = Math.max(0, Number($("hex-sector").value) - 1);
  showSector();
});
$("hex-next").addEventListener("click", () => {
  $("hex-sector").value = Number($("hex-sector").value) + 1;
  showSector();
});

// ---- Start ------------------------------------------------------------------

window.nbdApp = { serve, inspect, server: null, connection: null };

async function main() {
  try {
    const started = performance.now();
    await load();
    $("page-status").textContent = `wasm loaded in ${(performance.now() - started).toFixed(0)} ms`;
  } catch (error) {
    $("page-status").textContent = `cannot load the wasm module: ${error.message ?? error}`;
    setState("error");
    return;
  }
  setState("ready");
  const mode = params.get("serve");
  if (mode) {
    showTab("serve");
    if (params.has("ws")) $("serve-ws").value = params.get("ws");
    if (params.has("name")) {
      $("export-name").value = params.get("name");
      $("opfs-name").value = params.get("name");
    }
    document.querySelector(`input[name="source"][value="${mode}"]`)?.click();
    if (mode === "ram") {
      if (params.has("size")) $("ram-size").value = params.get("size");
      $("ram-pattern").checked = ["1", "true", "yes"].includes(params.get("pattern"));
      startServing();
    } else if (mode === "opfs") {
      if (params.has("size")) $("opfs-size").value = params.get("size");
      startServing();
    } else if (mode === "file") {
      $("serve-state").textContent = "choose a file to serve";
      setState("waiting-file");
    }
  } else if (params.has("inspect")) {
    showTab("inspect");
    $("inspect-ws").value = params.get("inspect");
    $("inspect-export").value = params.get("export") ?? "";
    await showExportList();
    await openExport();
  }
}

main();
