// Loads the wasm module once, in a browser (fetch next to pkg/web) or in
// Node (read from disk: Node's fetch cannot read file: URLs).
import init, { NbdClient, NbdServer, defaultPort } from "../pkg/web/nbd_wasm.js";

export { NbdClient, NbdServer, defaultPort };

let loading = null;

/**
 * Instantiates the wasm module (once; later calls return the same promise).
 * `source`: anything wasm-bindgen's `init` takes (URL, Response, bytes,
 * WebAssembly.Module); by default the `.wasm` next to `pkg/web/nbd_wasm.js`.
 */
export function load(source) {
  loading ??= (async () => {
    let input = source;
    if (input === undefined && typeof process === "object" && process.versions?.node) {
      // A specifier in a variable, so bundlers do not try to resolve a Node
      // module for the browser (this branch never runs there).
      const nodeFs = "node:fs/promises";
      const { readFile } = await import(/* @vite-ignore */ /* webpackIgnore: true */ nodeFs);
      input = await readFile(new URL("../pkg/web/nbd_wasm_bg.wasm", import.meta.url));
    }
    await init(input === undefined ? undefined : { module_or_path: input });
  })();
  return loading;
}
