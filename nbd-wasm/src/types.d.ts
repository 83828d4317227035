/** An NBD error name, as given to `complete` and reported by `done` events. */
export type NbdError =
  | "EPERM" | "EIO" | "ENOMEM" | "EINVAL" | "ENOSPC" | "EOVERFLOW" | "ENOTSUP" | "ESHUTDOWN";

/** Block size constraints (NBD_INFO_BLOCK_SIZE). */
export interface BlockSizes { minimum: number; preferred: number; maximum: number; }

/** What the JavaScript storage behind an export supports. */
export interface Capabilities {
  flush?: boolean; fua?: boolean; trim?: boolean; writeZeroes?: boolean;
  fastZero?: boolean; cache?: boolean; resize?: boolean; multiConn?: boolean;
  blockStatus?: boolean; rotational?: boolean;
}

/** One export of an `NbdServer`; the first is the default export. */
export interface ExportDescription {
  name?: string;
  /** Size in bytes (a number, or a bigint). */
  size: number | bigint;
  description?: string;
  readOnly?: boolean;
  blockSizes?: Partial<BlockSizes>;
  capabilities?: Capabilities;
}

export interface ServerOptions {
  /** Most requests handed out at once (default: 128, the table size). */
  maxInFlight?: number;
  /** Whether NBD_OPT_LIST may list the exports (default true). */
  listable?: boolean;
}

/** One extent of block status: `status` bits of base:allocation are 1 (hole) and 2 (zero). */
export interface Extent { length: number; status: number; }

export type ServerEvent =
  | { type: "exportSelected"; index: number; name: string; size: number; flags: number;
      structuredReplies: boolean; extendedHeaders: boolean }
  | { type: "startTls" }
  | { type: "read"; id: number; offset: number; length: number }
  | { type: "write"; id: number; offset: number; length: number; fua: boolean }
  | { type: "writeData"; id: number; offset: number; data: Uint8Array; remaining: number }
  | { type: "flush"; id: number }
  | { type: "trim"; id: number; offset: number; length: number; fua: boolean }
  | { type: "cache"; id: number; offset: number; length: number }
  | { type: "writeZeroes"; id: number; offset: number; length: number; fua: boolean;
      noHole: boolean; fastZero: boolean }
  | { type: "blockStatus"; id: number; offset: number; length: number; reqOne: boolean }
  | { type: "resize"; id: number; size: number }
  | { type: "close"; reason: "abort" | "disconnect" | "shutdown" }
  | { type: "error"; message: string }
  | { type: "unknown"; id?: number };

export interface ClientOptions {
  /** Export to select; "" for the server's default. */
  exportName?: string;
  mode?: "go" | "info" | "list";
  structuredReplies?: boolean;
  extendedHeaders?: boolean;
  /** Ask for the base:allocation context (default true); ignored when metaContexts is given. */
  blockStatus?: boolean;
  metaContexts?: string[];
  requestName?: boolean;
  requestDescription?: boolean;
  requestBlockSize?: boolean;
}

/** The export as negotiated. */
export interface ExportInfo {
  size: number; flags: number; readOnly: boolean; canFlush: boolean; canFua: boolean;
  canTrim: boolean; canWriteZeroes: boolean; canFastZero: boolean; canCache: boolean;
  canResize: boolean; canDf: boolean; canMultiConn: boolean; rotational: boolean;
  blockSizes: BlockSizes; blockSizesAdvertised: boolean;
  structuredReplies: boolean; extendedHeaders: boolean;
}

export type ClientEvent =
  | { type: "greeted"; flags: number }
  | { type: "tlsStart" }
  | { type: "listEntry"; name: string; description: string }
  | { type: "metaContext"; contextId: number; name: string }
  | { type: "info"; infoType: "export"; size: number; flags: number }
  | { type: "info"; infoType: "name"; name: string }
  | { type: "info"; infoType: "description"; description: string }
  | { type: "info"; infoType: "blockSize"; blockSizes: BlockSizes }
  | { type: "info"; infoType: "unknown"; code: number; data: Uint8Array }
  | ({ type: "export" } & ExportInfo)
  | { type: "ready" }
  | { type: "optionRefused"; option: string; replyType: string; message: string }
  | { type: "readData"; id: number; offset: number; data: Uint8Array }
  | { type: "readHole"; id: number; offset: number; length: number }
  | { type: "blockStatus"; id: number; contextId: number; offset: number; extents: Extent[] }
  | { type: "done"; id: number; error: NbdError | null }
  | { type: "close" }
  | { type: "error"; message: string }
  | { type: "unknown" };
