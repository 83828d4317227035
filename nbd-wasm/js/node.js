// The package's entry point in Node (the "node" condition of its exports
// map): the same API as index.js, with the wasm module already loaded
// (read from the file shipped beside it), so Node code needs no
// `await load()`; calling it anyway returns at once.
import { load } from "./wasm.js";

await load();

export * from "./index.js";
