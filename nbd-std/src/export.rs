//! Exports as the command line describes them, and the catalog the
//! protocol core serves from.
//!
//! A specification is `NAME=KIND[,OPTION]...` with `KIND` one of
//! `memory:SIZE` or `file:PATH`, and options `ro` (read-only) and
//! `desc=TEXT` (a description; it runs to the end, commas included).

use std::path::PathBuf;
use std::sync::Arc;

use nbd_core::export::{Capabilities, Catalog, Export};

use crate::backend::{Backend, FileBackend, MemoryBackend};
use crate::size::parse_size;

/// Where an export's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageSpec {
    /// A sparse RAM disk of this size.
    Memory(u64),
    /// A raw image file or block device.
    File(PathBuf),
}

/// One `--export NAME=SPEC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Name clients select the export by.
    pub name: String,
    /// Its storage.
    pub storage: StorageSpec,
    /// Writes refused.
    pub read_only: bool,
    /// Text for humans.
    pub description: String,
}

impl ExportSpec {
    /// Parses `NAME=KIND[,ro][,desc=TEXT]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, spec) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected NAME=memory:SIZE or NAME=file:PATH"))?;
        let (storage, mut options) = match spec.split_once(',') {
            Some((storage, options)) => (storage, Some(options)),
            None => (spec, None),
        };
        let storage = match storage.split_once(':') {
            Some(("memory", size)) => {
                StorageSpec::Memory(parse_size(size).map_err(|e| e.to_string())?)
            }
            Some(("file", path)) if !path.is_empty() => StorageSpec::File(PathBuf::from(path)),
            _ => {
                return Err(format!(
                    "`{spec}`: unknown storage (expected memory:SIZE or file:PATH)"
                ));
            }
        };
        let mut read_only = false;
        let mut description = String::new();
        while let Some(rest) = options {
            if let Some(text) = rest.strip_prefix("desc=") {
                description = text.to_owned();
                break;
            }
            let (option, next) = match rest.split_once(',') {
                Some((option, next)) => (option, Some(next)),
                None => (rest, None),
            };
            match option {
                "ro" => read_only = true,
                other => {
                    return Err(format!(
                        "`{other}`: unknown export option (expected ro or desc=TEXT)"
                    ));
                }
            }
            options = next;
        }
        let exported = Self {
            name: name.to_owned(),
            storage,
            read_only,
            description,
        };
        if name.len() > nbd_core::wire::MAX_STRING_LEN
            || exported.description.len() > nbd_core::wire::MAX_STRING_LEN
        {
            return Err(format!(
                "`{name}`: names and descriptions are limited to 4096 bytes"
            ));
        }
        Ok(exported)
    }

    /// Opens the storage. Errors name the export and the path.
    pub fn open(&self) -> Result<ServedExport, String> {
        let backend: Arc<dyn Backend> = match &self.storage {
            StorageSpec::Memory(size) => Arc::new(MemoryBackend::new(*size)),
            StorageSpec::File(path) => {
                Arc::new(FileBackend::open(path, self.read_only).map_err(|e| {
                    format!(
                        "export `{}`: cannot open {}: {e}",
                        self.name,
                        path.display()
                    )
                })?)
            }
        };
        if backend.size() == 0 {
            return Err(format!("export `{}`: storage is empty (size 0)", self.name));
        }
        Ok(ServedExport {
            name: self.name.clone(),
            description: self.description.clone(),
            read_only: self.read_only,
            backend,
        })
    }
}

/// An export being served.
#[derive(Clone)]
pub struct ServedExport {
    /// Name clients select it by.
    pub name: String,
    /// Text for humans.
    pub description: String,
    /// Writes refused.
    pub read_only: bool,
    /// Its storage.
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for ServedExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedExport")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("size", &self.backend.size())
            .finish()
    }
}

/// The exports of a server; the first is the default (empty name).
#[derive(Debug, Default)]
pub struct ExportSet {
    exports: Vec<ServedExport>,
}

impl ExportSet {
    /// A catalog of `exports`, the first being the default.
    pub fn new(exports: Vec<ServedExport>) -> Self {
        Self { exports }
    }

    /// The exports, in order.
    pub fn exports(&self) -> &[ServedExport] {
        &self.exports
    }

    /// The export at `index`.
    pub fn get(&self, index: usize) -> Option<&ServedExport> {
        self.exports.get(index)
    }
}

impl Catalog for ExportSet {
    fn len(&self) -> usize {
        self.exports.len()
    }

    fn get(&self, index: usize) -> Option<Export<'_>> {
        let served = self.exports.get(index)?;
        let backend = &served.backend;
        let capabilities = if served.read_only {
            Capabilities {
                trim: false,
                write_zeroes: false,
                fast_zero: false,
                resize: false,
                ..backend.capabilities()
            }
        } else {
            backend.capabilities()
        };
        Some(
            Export::new(&served.name, backend.size())
                .with_description(&served.description)
                .with_read_only(served.read_only)
                .with_block_sizes(backend.block_sizes())
                .with_capabilities(capabilities),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let memory = ExportSpec::parse("scratch=memory:64M").expect("memory");
        assert_eq!(memory.storage, StorageSpec::Memory(64 << 20));
        assert!(!memory.read_only);
        let file = ExportSpec::parse("disk=file:/tmp/disk.img,ro,desc=the disk, with commas")
            .expect("file");
        assert_eq!(file.storage, StorageSpec::File("/tmp/disk.img".into()));
        assert!(file.read_only);
        assert_eq!(file.description, "the disk, with commas");
        assert_eq!(
            ExportSpec::parse("=memory:1G").map(|e| e.name),
            Ok(String::new())
        );
    }

    #[test]
    fn refuses_bad_specs() {
        for bad in [
            "nameonly",
            "a=bogus:1",
            "a=memory:0",
            "a=memory:1G,rw",
            "a=file:",
            "a=memory",
        ] {
            assert!(ExportSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
