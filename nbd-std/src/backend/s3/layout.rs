//! Where a disk's pieces live under its prefix, and its manifest.
//!
//! ```text
//! PREFIX/manifest.json        format version, size, object size, uuid
//! PREFIX/lease.json           the writing server (see `lease`)
//! PREFIX/data/0000000000000000  object 0: bytes [0, object size)
//! PREFIX/data/0000000000000001  ...
//! ```
//! Data keys are fixed-width hex so a LIST returns them in block order; a
//! missing data object reads as zeroes.

use object_store::path::Path;
use serde_json::{Value, json};

/// The manifest format this code writes and reads.
pub(super) const FORMAT_VERSION: u64 = 1;

/// The key of the manifest object.
pub(super) fn manifest_key(prefix: &Path) -> Path {
    prefix.clone().join("manifest.json")
}

/// The key of the lease object.
pub(super) fn lease_key(prefix: &Path) -> Path {
    prefix.clone().join("lease.json")
}

/// The folder of the data objects.
pub(super) fn data_folder(prefix: &Path) -> Path {
    prefix.clone().join("data")
}

/// The key of data object `index`.
pub(super) fn data_key(prefix: &Path, index: u64) -> Path {
    data_folder(prefix).join(format!("{index:016x}"))
}

/// The index of a data key's last part, if it is one.
pub(super) fn data_index(name: &str) -> Option<u64> {
    if name.len() != 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
}

/// What the manifest says about a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Manifest {
    pub(super) size: u64,
    pub(super) object_size: u64,
    pub(super) uuid: String,
}

impl Manifest {
    pub(super) fn encode(&self) -> Vec<u8> {
        let value = json!({
            "format": FORMAT_VERSION,
            "size": self.size,
            "object_size": self.object_size,
            "uuid": self.uuid,
        });
        let mut bytes = value.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// Parses a manifest; the error says what is wrong with it.
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let number = |field: &str| {
            value
                .get(field)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("manifest has no number `{field}`"))
        };
        let format = number("format")?;
        if format != FORMAT_VERSION {
            return Err(format!(
                "manifest format {format} is not the supported {FORMAT_VERSION}"
            ));
        }
        let manifest = Self {
            size: number("size")?,
            object_size: number("object_size")?,
            uuid: value
                .get("uuid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        };
        check_object_size(manifest.object_size)?;
        if manifest.size == 0 {
            return Err("manifest says size 0".to_owned());
        }
        Ok(manifest)
    }
}

/// Smallest and largest object sizes (`object-size=`).
pub(super) const MIN_OBJECT_SIZE: u64 = 64 << 10;
pub(super) const MAX_OBJECT_SIZE: u64 = 16 << 20;

/// Object sizes are powers of two from 64 KiB to 16 MiB.
pub(super) fn check_object_size(object_size: u64) -> Result<(), String> {
    if object_size.is_power_of_two() && (MIN_OBJECT_SIZE..=MAX_OBJECT_SIZE).contains(&object_size) {
        Ok(())
    } else {
        Err(format!(
            "object size {object_size} is not a power of two from 64K to 16M"
        ))
    }
}

/// A fresh random identifier for a disk or a lease holder.
pub(super) fn fresh_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let now = std::time::SystemTime::now();
    let high = RandomState::new().hash_one(now);
    let low = RandomState::new().hash_one((now, std::process::id()));
    format!("{high:016x}{low:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_sort_in_block_order() {
        let prefix = Path::from("disks/vm1");
        let keys: Vec<String> = [0u64, 9, 10, 255, 4096]
            .iter()
            .map(|&i| data_key(&prefix, i).to_string())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys[2], "disks/vm1/data/000000000000000a");
        assert_eq!(data_index("000000000000000a"), Some(10));
        assert_eq!(data_index("a"), None);
        assert_eq!(data_index("000000000000000g"), None);
    }

    #[test]
    fn manifest_round_trips_and_rejects_nonsense() {
        let manifest = Manifest {
            size: 1 << 30,
            object_size: 1 << 20,
            uuid: fresh_id(),
        };
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
        assert!(Manifest::decode(b"{}").is_err());
        assert!(
            Manifest::decode(br#"{"format":2,"size":1,"object_size":65536}"#)
                .expect_err("format 2 refused")
                .contains("format 2")
        );
        assert!(Manifest::decode(br#"{"format":1,"size":1,"object_size":1000}"#).is_err());
    }
}
