//! WebAssembly bindings of the NBD core, for browsers and Node.
//!
//! The server and client state machines of `nbd_core`, exported through
//! `wasm-bindgen` as the classes [`NbdServer`] and [`NbdClient`]. Both are
//! sans I/O, with one shape:
//!
//! - `push(bytes)` appends the peer's bytes to an input buffer held inside,
//!   processes what it can, and returns an array of plain event objects
//!   (`{type: "read", id, offset, length}`, `{type: "done", id, error}`,
//!   …); bytes not consumed yet stay buffered; `poll()` processes again
//!   without new bytes (after completions, or a client's disconnect);
//! - the server's `complete*` methods answer storage requests by id, in
//!   any order; the client's command methods return request ids;
//! - `takeOutput()` returns every byte due to the peer as one
//!   `Uint8Array` (headers the core encoded, plus read data or write
//!   payloads the JavaScript side supplied).
//!
//! Offsets and lengths are JavaScript numbers (exact up to 2^53 - 1);
//! request ids are 32-bit numbers; NBD errors are names (`"EIO"`).
//! `src/types.d.ts` (copied into the generated `.d.ts`) types the event
//! objects.

mod catalog;
mod client;
mod js;
mod server;

pub use catalog::{OwnedCatalog, OwnedExport};
pub use client::NbdClient;
pub use server::NbdServer;

use wasm_bindgen::prelude::wasm_bindgen;

/// TypeScript types of the options and event objects, added to the
/// generated `.d.ts`.
#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = include_str!("types.d.ts");

/// The IANA-assigned NBD TCP port (10809).
#[wasm_bindgen(js_name = defaultPort)]
#[must_use]
pub fn default_port() -> u16 {
    nbd_core::wire::DEFAULT_PORT
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_port_is_iana() {
        assert_eq!(super::default_port(), 10809);
    }
}
