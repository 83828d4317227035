//! Exports as the command line describes them, and the catalog the
//! protocol core serves from.
//!
//! A specification is `NAME=KIND[,OPTION]...` with `KIND` one of
//! `memory:SIZE`, `file:PATH`, `null:SIZE` (zeroes; writes dropped) or
//! `s3://BUCKET/PREFIX` (with its own options, see [`S3Options`]), and
//! options `ro` (read-only),
//! `fail=RULE` (fault injection, repeatable; see [`crate::backend::fault`]),
//! `fail-seed=N` (its random seed), `writers=shared|exclusive` (see
//! [`WriterPolicy`]) and `desc=TEXT` (a description; it runs to the end,
//! commas included).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use nbd_core::export::{Capabilities, Catalog, Export};

#[cfg(feature = "s3")]
use crate::backend::S3Backend;
use crate::backend::fault::{FaultRule, parse_seed};
#[cfg(feature = "s3")]
use crate::backend::s3::S3Options;
use crate::backend::{Backend, FaultBackend, FileBackend, MemoryBackend, NullBackend};
use crate::size::parse_size;

/// Where an export's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageSpec {
    /// A sparse RAM disk of `size` bytes; `huge_pages`: its pages in
    /// memory mapped for transparent huge pages (export option
    /// `huge-pages`).
    Memory { size: u64, huge_pages: bool },
    /// A raw image file or block device.
    File(PathBuf),
    /// Nothing stored: reads are zeroes, writes are dropped (measures
    /// the server without storage work).
    Null(u64),
    /// Objects in an S3-compatible store.
    #[cfg(feature = "s3")]
    S3(S3Options),
}

impl StorageSpec {
    /// Takes an export option that only this kind of storage knows
    /// (`size=`, `cache=`, … for S3); `false` if it is not one of them.
    #[cfg_attr(not(feature = "s3"), allow(unused_variables))]
    fn takes_option(&mut self, option: &str) -> Result<bool, String> {
        match self {
            #[cfg(feature = "s3")]
            StorageSpec::S3(s3) => s3.option(option),
            StorageSpec::Memory { huge_pages, .. } if option == "huge-pages" => {
                *huge_pages = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
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
    /// Faults injected (`fail=`), tried in order; none for a plain export.
    pub faults: Vec<FaultRule>,
    /// Seed of the random faults (`fail-seed=`); a fresh one, logged, when
    /// absent.
    pub fault_seed: Option<u64>,
    /// Who may write at once (`writers=`).
    pub writers: WriterPolicy,
}

/// Who may write to an export at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WriterPolicy {
    /// Every client may write (`writers=shared`, the default).
    #[default]
    Shared,
    /// One client at a time (`writers=exclusive`): the first client to
    /// open the export writable holds it until its last writable
    /// connection to it closes; meanwhile other clients get the export
    /// read-only. A client is its IP address (every unix-socket client
    /// counts as the same one), so several connections from one client
    /// (multi-conn) all write.
    Exclusive,
}

impl ExportSpec {
    /// Parses `NAME=KIND[,ro][,fail=RULE]...[,fail-seed=N][,desc=TEXT]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, spec) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected NAME=memory:SIZE or NAME=file:PATH"))?;
        let (storage, mut options) = match spec.split_once(',') {
            Some((storage, options)) => (storage, Some(options)),
            None => (spec, None),
        };
        let mut storage = match storage.split_once(':') {
            #[cfg(feature = "s3")]
            Some(("s3", location)) if location.starts_with("//") => {
                StorageSpec::S3(S3Options::new(&location[2..])?)
            }
            #[cfg(not(feature = "s3"))]
            Some(("s3", _)) => {
                return Err(format!(
                    "`{spec}`: this nbd-std was built without S3 exports (cargo feature `s3`)"
                ));
            }
            Some(("memory", size)) => StorageSpec::Memory {
                size: parse_size(size).map_err(|e| e.to_string())?,
                huge_pages: false,
            },
            Some(("file", path)) if !path.is_empty() => StorageSpec::File(PathBuf::from(path)),
            Some(("null", size)) => StorageSpec::Null(parse_size(size).map_err(|e| e.to_string())?),
            _ => {
                return Err(format!(
                    "`{spec}`: unknown storage (expected memory:SIZE, file:PATH, null:SIZE or s3://BUCKET/PREFIX)"
                ));
            }
        };
        let mut read_only = false;
        let mut description = String::new();
        let mut faults = Vec::new();
        let mut fault_seed = None;
        let mut writers = WriterPolicy::Shared;
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
                "writers=shared" => writers = WriterPolicy::Shared,
                "writers=exclusive" => writers = WriterPolicy::Exclusive,
                _ if option.starts_with("fail=") => {
                    faults.push(FaultRule::parse(&option[5..]).map_err(|e| e.to_string())?);
                }
                _ if option.starts_with("fail-seed=") => {
                    fault_seed = Some(parse_seed(&option[10..]).map_err(|e| e.to_string())?);
                }
                _ if storage.takes_option(option)? => {}
                other => {
                    return Err(format!(
                        "`{other}`: unknown export option (memory exports also take huge-pages; S3 exports size=, object-size=, cache=, endpoint=, region=, lease=SECONDS, no-fencing) (expected ro, writers=shared|exclusive, fail=RULE, fail-seed=N or desc=TEXT)"
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
            faults,
            fault_seed,
            writers,
        };
        if exported.fault_seed.is_some() && exported.faults.is_empty() {
            return Err(format!("`{name}`: fail-seed= without any fail= rule"));
        }
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
            StorageSpec::Memory { size, huge_pages } => {
                Arc::new(MemoryBackend::new(*size).with_huge_pages(*huge_pages))
            }
            StorageSpec::Null(size) => Arc::new(NullBackend::new(*size)),
            #[cfg(feature = "s3")]
            StorageSpec::S3(s3) => Arc::new(
                S3Backend::open(s3, self.read_only)
                    .map_err(|e| format!("export `{}`: {e}", self.name))?,
            ),
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
        let backend: Arc<dyn Backend> = if self.faults.is_empty() {
            backend
        } else {
            let seed = self.fault_seed.unwrap_or_else(fresh_seed);
            let rules: Vec<String> = self.faults.iter().map(ToString::to_string).collect();
            tracing::info!(
                "export `{}`: injecting faults {} (fail-seed={seed})",
                self.name,
                rules.join(", ")
            );
            Arc::new(FaultBackend::new(backend, self.faults.clone(), seed))
        };
        Ok(ServedExport {
            name: self.name.clone(),
            description: self.description.clone(),
            read_only: self.read_only,
            writers: self.writers,
            backend,
        })
    }
}

/// A seed for random faults when none is given: differs run to run, and
/// is logged so a run can be replayed.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
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
    /// Who may write at once.
    pub writers: WriterPolicy,
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

/// The client writing to an exclusive export, and through how many
/// connections.
#[derive(Debug, Default)]
struct Writer {
    client: Option<String>,
    connections: usize,
}

/// The exports of a server; the first is the default (empty name).
#[derive(Debug, Default)]
pub struct ExportSet {
    exports: Vec<ServedExport>,
    writers: Vec<Mutex<Writer>>,
}

impl ExportSet {
    /// A catalog of `exports`, the first being the default.
    pub fn new(exports: Vec<ServedExport>) -> Self {
        let writers = exports.iter().map(|_| Mutex::default()).collect();
        Self { exports, writers }
    }

    /// Whether `client` gets export `index` read-only because the export
    /// is exclusive and another client writes to it.
    pub fn locked_out(&self, index: usize, client: &str) -> bool {
        let exclusive = self
            .exports
            .get(index)
            .is_some_and(|e| e.writers == WriterPolicy::Exclusive && !e.read_only);
        exclusive
            && self.writers.get(index).is_some_and(|writer| {
                let writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                writer.client.as_deref().is_some_and(|c| c != client)
            })
    }

    /// Makes `client` a writer of export `index` (a no-op for shared
    /// exports); false when another client holds it.
    pub fn claim_writer(&self, index: usize, client: &str) -> bool {
        let Some(writer) = self.writers.get(index) else {
            return false;
        };
        let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
        match writer.client.as_deref() {
            Some(holder) if holder != client => false,
            _ => {
                writer.client = Some(client.to_owned());
                writer.connections += 1;
                true
            }
        }
    }

    /// One writable connection of `client` to export `index` closed.
    pub fn release_writer(&self, index: usize, client: &str) {
        if let Some(writer) = self.writers.get(index) {
            let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
            if writer.client.as_deref() == Some(client) {
                writer.connections = writer.connections.saturating_sub(1);
                if writer.connections == 0 {
                    writer.client = None;
                }
            }
        }
    }

    /// The export as `client` sees it (`None`: as nobody in particular).
    fn describe(&self, index: usize, client: Option<&str>) -> Option<Export<'_>> {
        let served = self.exports.get(index)?;
        let read_only = served.read_only || client.is_some_and(|c| self.locked_out(index, c));
        let backend = &served.backend;
        let capabilities = if read_only {
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
                .with_read_only(read_only)
                .with_block_sizes(backend.block_sizes())
                .with_capabilities(capabilities),
        )
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
        self.describe(index, None)
    }
}

/// The exports as one client sees them: exclusive exports another client
/// writes to are read-only.
#[derive(Debug)]
pub struct ClientView {
    exports: Arc<ExportSet>,
    client: String,
}

impl ClientView {
    /// `exports` as seen by `client` (an IP address, or `unix`).
    pub fn new(exports: Arc<ExportSet>, client: String) -> Self {
        Self { exports, client }
    }

    /// The client.
    pub fn client(&self) -> &str {
        &self.client
    }
}

impl Catalog for ClientView {
    fn len(&self) -> usize {
        self.exports.exports.len()
    }

    fn get(&self, index: usize) -> Option<Export<'_>> {
        self.exports.describe(index, Some(&self.client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let memory = ExportSpec::parse("scratch=memory:64M").expect("memory");
        assert_eq!(
            memory.storage,
            StorageSpec::Memory {
                size: 64 << 20,
                huge_pages: false
            }
        );
        let huge = ExportSpec::parse("ram=memory:1G,huge-pages,ro").expect("huge pages");
        assert_eq!(
            huge.storage,
            StorageSpec::Memory {
                size: 1 << 30,
                huge_pages: true
            }
        );
        assert!(huge.read_only);
        assert!(ExportSpec::parse("f=file:/tmp/x,huge-pages").is_err());
        assert!(!memory.read_only);
        let file = ExportSpec::parse("disk=file:/tmp/disk.img,ro,desc=the disk, with commas")
            .expect("file");
        assert_eq!(file.storage, StorageSpec::File("/tmp/disk.img".into()));
        assert!(file.read_only);
        assert_eq!(file.description, "the disk, with commas");
        let null = ExportSpec::parse("floor=null:1G").expect("null");
        assert_eq!(null.storage, StorageSpec::Null(1 << 30));
        assert_eq!(
            ExportSpec::parse("=memory:1G").map(|e| e.name),
            Ok(String::new())
        );
        let faulty =
            ExportSpec::parse("f=memory:1G,fail=eio:0.01,fail=enospc@1M-2M/write,fail-seed=7,ro")
                .expect("faults");
        assert_eq!(
            faulty
                .faults
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["eio:0.01", "enospc@1048576-2097152/write"]
        );
        assert_eq!(faulty.fault_seed, Some(7));
        assert_eq!(memory.writers, WriterPolicy::Shared);
        let exclusive = ExportSpec::parse("x=memory:1M,writers=exclusive").expect("exclusive");
        assert_eq!(exclusive.writers, WriterPolicy::Exclusive);
        assert!(faulty.read_only);
        assert!(memory.faults.is_empty());
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
            "a=memory:1G,fail=eio",
            "a=memory:1G,fail=eio:2",
            "a=memory:1G,fail-seed=3",
            "a=memory:1G,fail=eio:0.5,fail-seed=x",
            "a=memory:1G,writers=one",
        ] {
            assert!(ExportSpec::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn exclusive_exports_are_read_only_to_other_clients() {
        let spec = ExportSpec::parse("x=memory:1M,writers=exclusive").expect("spec");
        let exports = Arc::new(ExportSet::new(vec![spec.open().expect("open")]));
        let first = ClientView::new(Arc::clone(&exports), "10.0.0.1".into());
        let second = ClientView::new(Arc::clone(&exports), "10.0.0.2".into());
        assert!(!second.get(0).expect("export").read_only);
        assert!(exports.claim_writer(0, first.client()));
        assert!(exports.claim_writer(0, first.client()), "multi-conn");
        assert!(second.get(0).expect("export").read_only);
        assert!(!first.get(0).expect("export").read_only);
        assert!(!exports.claim_writer(0, second.client()));
        exports.release_writer(0, first.client());
        assert!(second.get(0).expect("export").read_only, "one still open");
        exports.release_writer(0, first.client());
        assert!(!second.get(0).expect("export").read_only);
    }
}
