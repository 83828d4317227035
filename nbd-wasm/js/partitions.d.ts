// Types of partitions.js: declared in index.d.ts.
export { MBR_TYPES, GPT_TYPES, guidText, readPartitionTable } from "./index.js";
