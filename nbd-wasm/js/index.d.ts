// Types of the JavaScript layer of nbd-wasm (js/*.js), written by hand.
// The wasm classes and their event types come from the generated
// pkg/web/nbd_wasm.d.ts.
import type {
  BlockSizes, Capabilities, ClientEvent, ClientOptions, Extent, ExportInfo, NbdError, ServerEvent,
} from "../pkg/web/nbd_wasm.js";
import type { InitInput } from "../pkg/web/nbd_wasm.js";

export { NbdClient, NbdServer, defaultPort } from "../pkg/web/nbd_wasm.js";
export type {
  BlockSizes, Capabilities, ClientEvent, ClientOptions, Extent, ExportInfo, NbdError, ServerEvent,
} from "../pkg/web/nbd_wasm.js";

// ---- wasm.js ------------------------------------------------------------

/**
 * Instantiates the wasm module once (later calls return the same
 * promise). By default the `.wasm` next to pkg/web/nbd_wasm.js (fetched
 * in a browser, read from disk in Node).
 */
export function load(source?: InitInput | Promise<InitInput>): Promise<void>;

// ---- disks.js -----------------------------------------------------------

/** A disk `serveDisk` can serve. Methods may return values or promises; failures reject with an error whose `nbdError` names the NBD error (default "EIO"). */
export interface Disk {
  /** Size in bytes. */
  readonly size: number;
  /** Served with the read-only flag: the server answers writes with EPERM. */
  readonly readOnly: boolean;
  /** What the export advertises (flush, fua, trim, writeZeroes, blockStatus, …). */
  readonly capabilities?: Capabilities;
  readonly blockSizes?: Partial<BlockSizes>;
  /** "ram", "file", "opfs" for the disks here. */
  readonly kind?: string;
  read(offset: number, length: number): Uint8Array | Promise<Uint8Array>;
  write?(offset: number, data: Uint8Array): void | Promise<void>;
  /** Trim and write-zeroes: the range reads as zeroes afterwards. */
  zero?(offset: number, length: number): void | Promise<void>;
  flush?(): void | Promise<void>;
  /** base:allocation extents from `offset` (may cover less than `length`). */
  extents?(offset: number, length: number): Extent[] | Promise<Extent[]>;
  close?(): void | Promise<void>;
}

/** A disk failure that maps to an NBD error. */
export class DiskError extends Error {
  constructor(message: string, nbdError?: NbdError);
  readonly nbdError: NbdError;
}

/** "64M", "1G", "512K", "4096" (binary units, optional iB/B) to bytes. */
export function parseSize(text: string | number): number;
/** Bytes for people: "64 MiB", "1.5 KiB". */
export function formatSize(bytes: number): string;
/** Fills `bytes` (disk bytes from `offset`, 4-aligned) with the test pattern: LE u32 at byte o = (o/4 + 1) * 0x9E3779B1 mod 2^32. */
export function fillPattern(bytes: Uint8Array, offset?: number): Uint8Array;
/** Extents of `bytes` at disk offset `offset`: all-zero blocks have status 2. */
export function zeroExtents(bytes: Uint8Array, offset: number, blockSize?: number): Extent[];

export interface RamDiskOptions {
  /** A byte value, or "pattern" for the test pattern. */
  fill?: number | "pattern";
  /** Use this buffer (of exactly `size` bytes) instead of a new one. */
  buffer?: ArrayBuffer;
}

/** A writable disk in an ArrayBuffer. */
export class RamDisk implements Disk {
  constructor(size: number | string, options?: RamDiskOptions);
  readonly size: number;
  readonly readOnly: false;
  readonly kind: "ram";
  readonly capabilities: Capabilities;
  /** The disk's bytes. */
  readonly bytes: Uint8Array;
  read(offset: number, length: number): Uint8Array;
  write(offset: number, data: Uint8Array): void;
  zero(offset: number, length: number): void;
  flush(): void;
  extents(offset: number, length: number): Extent[];
  close(): void;
}

/** A read-only disk over a File or Blob. */
export class FileDisk implements Disk {
  constructor(blob: Blob);
  readonly blob: Blob;
  readonly size: number;
  /** The File's name ("" for a Blob). */
  readonly name: string;
  readonly readOnly: true;
  readonly kind: "file";
  readonly capabilities: Capabilities;
  read(offset: number, length: number): Promise<Uint8Array>;
  close(): void;
}

/** A writable disk in the Origin Private File System (persistent), through a Worker with a sync access handle. */
export class OpfsDisk implements Disk {
  /** Opens or creates OPFS file `name`; `size` resizes it (grows with zeroes); without it an existing file keeps its size. */
  static open(name: string, options?: { size?: number | string }): Promise<OpfsDisk>;
  readonly name: string;
  readonly size: number;
  readonly readOnly: false;
  readonly kind: "opfs";
  readonly capabilities: Capabilities;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  zero(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Flushes, releases the file and ends the worker. */
  close(): Promise<void>;
}

// ---- serve.js -----------------------------------------------------------

/** What `serveDisk` reports; `session` numbers provider sessions from 1. */
export type ServeEvent =
  | { type: "connecting"; session: number; url: string }
  /** Greeting sent; waiting for the bridge to pair a client. */
  | { type: "idle"; session: number }
  /** The first client bytes arrived: a client uses this session (a new idle one opens). */
  | { type: "attached"; session: number }
  /** An option the client sent during negotiation (e.g. name "GO", detail 'export "disk", info BLOCK_SIZE'). */
  | { type: "option"; session: number; code: number; name: string; detail: string }
  | (Extract<ServerEvent, { type: "exportSelected" }> & { session: number })
  /** A storage request began (only with logRequests). */
  | { type: "request"; session: number; id: number; op: string; offset: number; length: number }
  /** A storage request ended (every failure; successes only with logRequests). */
  | { type: "done"; session: number; id: number; op: string; offset: number; length: number;
      error: NbdError | null; ms: number; message?: string }
  | { type: "closed"; session: number; reason: string; bytesIn: number; bytesOut: number; wasIdle: boolean }
  | { type: "error"; session: number; message: string }
  /** An idle session could not open or was dropped: the bridge is unreachable; retrying after `retryMs`. */
  | { type: "disconnected"; retryMs: number }
  | { type: "stopped" };

export interface ServeOptions {
  /** Export name (default ""), description. */
  name?: string;
  description?: string;
  onEvent?: (event: ServeEvent) => void;
  /** An event per request (default true). */
  logRequests?: boolean;
  /** Most requests in flight per session (default 128). */
  maxInFlight?: number;
  /** WebSocket subprotocols (default ["binary"]). */
  protocols?: string[];
  /** WebSocket constructor (default the global one). */
  WebSocket?: typeof WebSocket;
}

export interface ServeStats {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  /** Clients attached so far. */
  sessions: number;
}

/** The NbdServer export description for a disk. */
export function exportOf(disk: Disk, options?: { name?: string; description?: string }): import("../pkg/web/nbd_wasm.js").ExportDescription;

/** Serves one disk over provider sessions, keeping one idle session open. */
export class DiskServer {
  constructor(url: string, disk: Disk, options?: ServeOptions);
  readonly url: string;
  readonly disk: Disk;
  readonly stats: ServeStats;
  /** Sessions per state. */
  readonly states: { connecting: number; idle: number; active: number };
  /** Closes every session (clients see their connection end); no reconnecting. */
  stop(): void;
}

/** Serves `disk` through `nbd-std bridge` at `url` (e.g. "ws://127.0.0.1:8081/"). */
export function serveDisk(url: string, disk: Disk, options?: ServeOptions): DiskServer;

// ---- client.js ----------------------------------------------------------

export class NbdRequestError extends Error {
  constructor(message: string, nbdError?: NbdError | null);
  /** The NBD error of a failed request, or null. */
  readonly nbdError: NbdError | null;
}

/** NBD_FLAG_* transmission flags: [bit, name]. */
export const TRANSMISSION_FLAGS: ReadonlyArray<readonly [number, string]>;
export function flagNames(flags: number): string[];

export interface ConnectOptions extends ClientOptions {
  /** WebSocket constructor (default the global one). */
  WebSocket?: typeof WebSocket;
  /** Default ["binary"], as websockify expects. */
  protocols?: string[];
  /** Connecting and negotiating (default 10000 ms). */
  timeoutMs?: number;
}

/** One block-status extent with its offset. */
export interface PlacedExtent { offset: number; length: number; status: number; }

/** An NBD client session over one WebSocket (e.g. websockify in front of an NBD server). */
export class NbdConnection {
  /** Connects and negotiates; resolves when ready (mode "go") or done (modes "info", "list"). */
  static open(url: string, options?: ConnectOptions): Promise<NbdConnection>;
  /** The export as negotiated. */
  readonly export: ExportInfo | null;
  /** Negotiation events: greeted, info, metaContext, optionRefused, listEntry, export. */
  readonly negotiation: ClientEvent[];
  /** Metadata context ids to names. */
  readonly contexts: Map<number, string>;
  readonly closed: boolean;
  /** Called once when the session ends (with the error, if any). */
  onClose: ((error: Error | null) => void) | null;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array, options?: { fua?: boolean }): Promise<void>;
  flush(): Promise<void>;
  /** Extents of the first metadata context (base:allocation by default). */
  blockStatus(offset: number, length: number): Promise<PlacedExtent[]>;
  /** NBD_CMD_DISC once every request is answered, then the WebSocket closes. */
  close(): Promise<void>;
}

export function connectExport(url: string, options?: ConnectOptions): Promise<NbdConnection>;
export function listExports(url: string, options?: ConnectOptions): Promise<{ name: string; description: string }[]>;

// ---- partitions.js ------------------------------------------------------

export const MBR_TYPES: Readonly<Record<number, string>>;
export const GPT_TYPES: Readonly<Record<string, string>>;
/** A GPT GUID (16 bytes, mixed endian) as text. */
export function guidText(bytes: Uint8Array): string;

export interface Partition {
  /** 1-4 primary, 5+ logical (MBR); entry index + 1 (GPT). */
  number: number;
  /** First and last sector (LBA), inclusive. */
  start: number;
  end: number;
  sectors: number;
  size: number;
  /** "0x83" (MBR) or a type GUID (GPT). */
  type: string;
  typeName: string;
  bootable?: boolean;
  name?: string;
  guid?: string;
}

export interface PartitionTable {
  scheme: "mbr" | "gpt" | null;
  diskId?: string;
  sectorSize: number;
  partitions: Partition[];
  warnings: string[];
}

export function readPartitionTable(
  read: (offset: number, length: number) => Uint8Array | Promise<Uint8Array>,
  size: number,
  sectorSize?: number,
): Promise<PartitionTable>;

// ---- options.js ---------------------------------------------------------

export const OPTION_NAMES: Readonly<Record<number, string>>;
export interface OptionDescription { code: number; name: string; detail: string; }
export function describeOption(code: number, data: Uint8Array): OptionDescription;
/** Reads a client's option requests from its bytes (for display). */
export class OptionReader {
  readonly clientFlags: number | null;
  readonly stopped: boolean;
  push(bytes: Uint8Array): OptionDescription[];
  /** After a refused GO or EXPORT_NAME: read the options that follow. */
  resume(): void;
  /** An export was selected: read nothing more. */
  finish(): void;
}
