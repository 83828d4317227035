// Types of serve.js: declared in index.d.ts.
export { exportOf, DiskServer, serveDisk } from "./index.js";
