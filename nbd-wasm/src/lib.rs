//! WebAssembly bindings of the NBD core, for browsers and Node.
//!
//! Not implemented yet: the server and client state machines of `nbd_core`
//! will be exported here through `wasm-bindgen`. For now the crate exports
//! one constant, so the toolchain (build for `wasm32-unknown-unknown`,
//! `wasm-bindgen` CLI) can be exercised.

use wasm_bindgen::prelude::wasm_bindgen;

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
