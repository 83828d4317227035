// Types of disks.js: declared in index.d.ts.
export { DiskError, parseSize, formatSize, fillPattern, zeroExtents, RamDisk, FileDisk, OpfsDisk } from "./index.js";
