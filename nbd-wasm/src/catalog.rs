//! The server's exports as JavaScript describes them, owned by the server.

use nbd_core::export::{Capabilities, Catalog, DEFAULT_BLOCK_SIZES, Export};
use nbd_core::wire::BlockSizeConstraints;
use wasm_bindgen::{JsError, JsValue};

use crate::js::{array, get, get_bool, get_string, get_u64};

/// One export with owned strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedExport {
    /// Name clients select it by.
    pub name: String,
    /// Text for humans.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Block size constraints.
    pub block_sizes: BlockSizeConstraints,
    /// Writes refused.
    pub read_only: bool,
    /// What the JavaScript storage supports.
    pub capabilities: Capabilities,
}

impl OwnedExport {
    /// The borrowed description the core works with.
    pub fn export(&self) -> Export<'_> {
        Export {
            name: &self.name,
            description: &self.description,
            size: self.size,
            block_sizes: self.block_sizes,
            read_only: self.read_only,
            capabilities: self.capabilities,
        }
    }
}

/// The exports of one server, owned (strings included).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedCatalog {
    /// The exports; the first is the default one.
    pub exports: Vec<OwnedExport>,
    /// Whether `NBD_OPT_LIST` may reveal them.
    pub listable: bool,
}

impl Catalog for OwnedCatalog {
    fn len(&self) -> usize {
        self.exports.len()
    }
    fn get(&self, index: usize) -> Option<Export<'_>> {
        self.exports.get(index).map(OwnedExport::export)
    }
    fn listable(&self) -> bool {
        self.listable
    }
}

impl OwnedCatalog {
    /// From `[{name, size, description?, readOnly?, blockSizes?, capabilities?}]`.
    pub(crate) fn from_js(exports: &JsValue, listable: bool) -> Result<Self, JsError> {
        let exports = array(exports, "exports")?
            .iter()
            .map(export_from_js)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { exports, listable })
    }
}

fn export_from_js(value: &JsValue) -> Result<OwnedExport, JsError> {
    let name = get_string(value, "name")?.unwrap_or_default();
    let size = get_u64(value, "size")?.ok_or_else(|| JsError::new("export without size"))?;
    let sizes = get(value, "blockSizes");
    let block_sizes = BlockSizeConstraints {
        minimum: block_size(&sizes, "minimum", DEFAULT_BLOCK_SIZES.minimum)?,
        preferred: block_size(&sizes, "preferred", DEFAULT_BLOCK_SIZES.preferred)?,
        maximum: block_size(&sizes, "maximum", DEFAULT_BLOCK_SIZES.maximum)?,
    };
    let caps = get(value, "capabilities");
    let capabilities = Capabilities {
        flush: get_bool(&caps, "flush", false)?,
        fua: get_bool(&caps, "fua", false)?,
        trim: get_bool(&caps, "trim", false)?,
        write_zeroes: get_bool(&caps, "writeZeroes", false)?,
        fast_zero: get_bool(&caps, "fastZero", false)?,
        cache: get_bool(&caps, "cache", false)?,
        resize: get_bool(&caps, "resize", false)?,
        multi_conn: get_bool(&caps, "multiConn", false)?,
        block_status: get_bool(&caps, "blockStatus", false)?,
        rotational: get_bool(&caps, "rotational", false)?,
    };
    let export = OwnedExport {
        name,
        description: get_string(value, "description")?.unwrap_or_default(),
        size,
        block_sizes,
        read_only: get_bool(value, "readOnly", false)?,
        capabilities,
    };
    export
        .export()
        .validate()
        .map_err(|e| JsError::new(&format!("export {:?}: {e}", export.name)))?;
    Ok(export)
}

fn block_size(sizes: &JsValue, key: &str, default: u32) -> Result<u32, JsError> {
    match get_u64(sizes, key)? {
        None => Ok(default),
        Some(v) => {
            u32::try_from(v).map_err(|_| JsError::new(&format!("{key} block size too large")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_catalog_finds_by_name() {
        let export = |name: &str| OwnedExport {
            name: name.into(),
            description: String::new(),
            size: 4096,
            block_sizes: DEFAULT_BLOCK_SIZES,
            read_only: false,
            capabilities: Capabilities::NONE,
        };
        let catalog = OwnedCatalog {
            exports: vec![export("a"), export("b")],
            listable: true,
        };
        assert_eq!(catalog.find(b""), Some(0));
        assert_eq!(catalog.find(b"b"), Some(1));
        assert_eq!(catalog.find(b"c"), None);
        assert_eq!(Catalog::get(&catalog, 1).map(|e| e.name), Some("b"));
    }
}
