// Types of client.js: declared in index.d.ts.
export { NbdRequestError, TRANSMISSION_FLAGS, flagNames, NbdConnection, listExports, connectExport } from "./index.js";
