// The JavaScript layer of nbd-wasm: disks, serving them over WebSocket
// provider sessions (nbd-std bridge), an NBD client over WebSocket
// (websockify), and partition tables. Call `await load()` first.
export { load, NbdClient, NbdServer, defaultPort } from "./wasm.js";
export { DiskError, FileDisk, OpfsDisk, RamDisk, fillPattern, formatSize, parseSize, zeroExtents } from "./disks.js";
export { DiskServer, exportOf, serveDisk } from "./serve.js";
export { NbdConnection, NbdRequestError, TRANSMISSION_FLAGS, connectExport, flagNames, listExports } from "./client.js";
export { GPT_TYPES, MBR_TYPES, guidText, readPartitionTable } from "./partitions.js";
export { OPTION_NAMES, OptionReader, describeOption } from "./options.js";
