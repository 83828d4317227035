// Disks a page (or Node) can serve: RAM (ArrayBuffer), File/Blob (read
// only), and the Origin Private File System (through a Worker holding a
// sync access handle). Every method returns a promise or a value; the
// serving layer awaits either, and answers requests in whatever order
// they finish.

/** An error that maps to an NBD error name (`nbdError`) when it fails a request. */
export class DiskError extends Error {
  constructor(message, nbdError = "EIO") {
    super(message);
    this.name = "DiskError";
    this.nbdError = nbdError;
  }
}

/** Parses "64M", "1G", "512K", "4096" (binary units, optional iB/B). */
export function parseSize(text) {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$/i.exec(String(text));
  if (!match) throw new DiskError(`size ${JSON.stringify(text)}: use bytes or a number with K, M, G or T`, "EINVAL");
  const unit = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[match[2].toLowerCase()];
  const size = Math.round(Number(match[1]) * unit);
  if (!Number.isSafeInteger(size) || size <= 0) throw new DiskError(`size ${text} is out of range`, "EINVAL");
  return size;
}

/** "64 MiB", "1.5 GiB", "512 B". */
export function formatSize(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : +value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/**
 * Fills `bytes` (the disk's bytes from `offset`, a multiple of 4) with the
 * test pattern: the little-endian 32-bit word at byte offset `o` holds
 * `(o / 4 + 1) * 0x9E3779B1 mod 2^32`, so every word differs from its
 * neighbours and no 4 KiB block is zero.
 */
export function fillPattern(bytes, offset = 0) {
  if (offset % 4 !== 0 || bytes.length % 4 !== 0) throw new DiskError("pattern needs 4-byte alignment", "EINVAL");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const first = offset / 4 + 1;
  for (let i = 0; i < bytes.length / 4; i++) view.setUint32(i * 4, Math.imul(first + i, 0x9e3779b1) >>> 0, true);
  return bytes;
}

function checkRange(disk, offset, length) {
  if (offset < 0 || length < 0 || offset + length > disk.size) {
    throw new DiskError(`range ${offset}+${length} is outside the disk (${disk.size} bytes)`, "EINVAL");
  }
}

/** Base-allocation extents of `bytes` (starting at disk offset `offset`): all-zero 4 KiB blocks have status 2 (zero). */
export function zeroExtents(bytes, offset, blockSize = 4096) {
  const extents = [];
  for (let at = 0; at < bytes.length; ) {
    const next = Math.min(bytes.length, at - ((offset + at) % blockSize) + blockSize);
    let zero = true;
    if ((bytes.byteOffset + at) % 4 === 0 && (next - at) % 4 === 0) {
      // Whole words at once: about four times faster on large disks.
      const view = new Uint32Array(bytes.buffer, bytes.byteOffset + at, (next - at) / 4);
      for (let i = 0; i < view.length && zero; i++) zero = view[i] === 0;
    } else {
      for (let i = at; i < next && zero; i++) zero = bytes[i] === 0;
    }
    const status = zero ? 2 : 0;
    const last = extents[extents.length - 1];
    if (last && last.status === status) last.length += next - at;
    else extents.push({ length: next - at, status });
    at = next;
  }
  return extents;
}

/** Most bytes one block-status answer describes (a reply may cover less than asked). */
const EXTENT_SCAN_LIMIT = 64 * 1024 * 1024;

/** A writable disk in memory (an ArrayBuffer). */
export class RamDisk {
  /**
   * `size` in bytes (or "64M"); `fill`: a byte value, or "pattern" for
   * the test pattern (see `fillPattern`); `buffer`: an existing
   * ArrayBuffer to use instead.
   */
  constructor(size, { fill = 0, buffer } = {}) {
    this.size = typeof size === "string" ? parseSize(size) : size;
    if (!Number.isSafeInteger(this.size) || this.size <= 0) throw new DiskError(`size ${size} is out of range`, "EINVAL");
    this.bytes = new Uint8Array(buffer ?? new ArrayBuffer(this.size));
    if (this.bytes.length !== this.size) throw new DiskError("buffer and size differ", "EINVAL");
    if (fill === "pattern") fillPattern(this.bytes.subarray(0, this.size - (this.size % 4)));
    else if (fill) this.bytes.fill(fill);
    this.readOnly = false;
    this.kind = "ram";
    this.capabilities = {
      flush: true, fua: true, trim: true, writeZeroes: true, fastZero: true,
      cache: true, multiConn: true, blockStatus: true,
    };
  }

  read(offset, length) {
    checkRange(this, offset, length);
    return this.bytes.subarray(offset, offset + length);
  }

  write(offset, data) {
    checkRange(this, offset, data.length);
    this.bytes.set(data, offset);
  }

  zero(offset, length) {
    checkRange(this, offset, length);
    this.bytes.fill(0, offset, offset + length);
  }

  flush() {}

  extents(offset, length) {
    checkRange(this, offset, length);
    return zeroExtents(this.bytes.subarray(offset, offset + Math.min(length, EXTENT_SCAN_LIMIT)), offset);
  }

  close() {}
}

/** A read-only disk over a File or Blob; writes are refused (EPERM) by the export's read-only flag. */
export class FileDisk {
  constructor(blob) {
    this.blob = blob;
    this.size = blob.size;
    this.name = blob.name ?? "";
    this.readOnly = true;
    this.kind = "file";
    this.capabilities = { cache: true, multiConn: true };
  }

  async read(offset, length) {
    checkRange(this, offset, length);
    return new Uint8Array(await this.blob.slice(offset, offset + length).arrayBuffer());
  }

  close() {}
}

/**
 * A writable disk in the Origin Private File System, persistent across
 * reloads. The file is opened by a dedicated Worker (js/opfs-worker.js)
 * with a sync access handle, the fast OPFS API, which exists only in
 * workers. Open with `await OpfsDisk.open(name, {size})`.
 */
export class OpfsDisk {
  constructor(worker, name, size) {
    this.worker = worker;
    this.name = name;
    this.size = size;
    this.readOnly = false;
    this.kind = "opfs";
    this.capabilities = { flush: true, fua: true, trim: true, writeZeroes: true, cache: true, multiConn: true };
    this.next = 1;
    this.waiting = new Map();
    worker.onmessage = ({ data }) => {
      const waiter = this.waiting.get(data.id);
      if (!waiter) return;
      this.waiting.delete(data.id);
      if (data.error) waiter.reject(new DiskError(data.error, data.nbdError ?? "EIO"));
      else waiter.resolve(data.data);
    };
    worker.onerror = (event) => {
      const error = new DiskError(`OPFS worker: ${event.message ?? "failed"}`);
      for (const waiter of this.waiting.values()) waiter.reject(error);
      this.waiting.clear();
    };
  }

  /**
   * Opens (or creates) OPFS file `name`. `size` (bytes or "64M"): the
   * disk's size; an existing file of another size is resized to it
   * (grown with zeroes). Without `size` an existing file keeps its size.
   */
  static async open(name, { size } = {}) {
    if (typeof Worker !== "function" || !globalThis.navigator?.storage?.getDirectory) {
      throw new DiskError("the Origin Private File System needs a browser with Worker and navigator.storage", "ENOTSUP");
    }
    const bytes = size === undefined ? undefined : typeof size === "string" ? parseSize(size) : size;
    const worker = new Worker(new URL("./opfs-worker.js", import.meta.url), { type: "module" });
    const disk = new OpfsDisk(worker, name, 0);
    try {
      disk.size = await disk.call({ op: "open", name, size: bytes });
    } catch (error) {
      worker.terminate();
      throw error;
    }
    return disk;
  }

  call(message, transfer = []) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ ...message, id }, transfer);
    });
  }

  async read(offset, length) {
    checkRange(this, offset, length);
    return new Uint8Array(await this.call({ op: "read", offset, length }));
  }

  async write(offset, data) {
    checkRange(this, offset, data.length);
    // The event's bytes are ours (a copy out of wasm memory): transfer them.
    const owned = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
    await this.call({ op: "write", offset, data: owned }, [owned.buffer]);
  }

  async zero(offset, length) {
    checkRange(this, offset, length);
    await this.call({ op: "zero", offset, length });
  }

  async flush() {
    await this.call({ op: "flush" });
  }

  async close() {
    try {
      await this.call({ op: "close" });
    } finally {
      this.worker.terminate();
    }
  }
}
