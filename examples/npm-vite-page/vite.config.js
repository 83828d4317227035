import { defineConfig } from "vite";

export default defineConfig({
  // The dev server's dependency pre-bundling moves nbd-wasm's modules away
  // from its .wasm file; served as they are, `load()` finds it beside them.
  // (`vite build` needs nothing: it copies the .wasm into dist/assets.)
  optimizeDeps: { exclude: ["nbd-wasm"] },
});
