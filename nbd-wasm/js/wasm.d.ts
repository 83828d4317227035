// Types of wasm.js: declared in index.d.ts.
export { NbdClient, NbdServer, defaultPort, load } from "./index.js";
