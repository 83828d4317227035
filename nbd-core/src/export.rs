//! What a server offers: exports, their properties, and the catalog a shell
//! hands to the server state machine (spec: "Block size constraints",
//! "Transmission flags").
//!
//! Transmission flags are never set by hand: they follow from what an
//! export's storage can do ([`Capabilities`]) and from what the connection
//! negotiated, so a server cannot advertise a command it does not handle.

use crate::wire::{BlockSizeConstraints, HeaderStyle, TransmissionFlags};

/// The block size constraints a server assumes when none are advertised
/// (spec: minimum 1, preferred 4096, maximum 32 MiB for interoperability).
pub const DEFAULT_BLOCK_SIZES: BlockSizeConstraints = BlockSizeConstraints {
    minimum: 1,
    preferred: 4096,
    maximum: 32 * 1024 * 1024,
};

/// Largest minimum block size the spec allows (64 KiB).
pub const MAX_MINIMUM_BLOCK_SIZE: u32 = 1 << 16;

/// What the storage behind an export supports. Each field turns on the
/// commands and transmission flags that need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Capabilities {
    /// `NBD_CMD_FLUSH`: the storage can make written data durable.
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA`: the storage can make one request durable.
    pub fua: bool,
    /// `NBD_CMD_TRIM`
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` with `NO_HOLE`.
    pub write_zeroes: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: the storage can tell a fast zero from a slow one.
    pub fast_zero: bool,
    /// `NBD_CMD_CACHE`
    pub cache: bool,
    /// `NBD_CMD_RESIZE`
    pub resize: bool,
    /// Several connections see one another's writes, flushes and FUA at once.
    pub multi_conn: bool,
    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`.
    pub block_status: bool,
    /// The medium behaves like a spinning disk.
    pub rotational: bool,
}

impl Capabilities {
    /// Plain reads and writes only.
    pub const NONE: Self = Self {
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        fast_zero: false,
        cache: false,
        resize: false,
        multi_conn: false,
        block_status: false,
        rotational: false,
    };

    /// Every optional command (not rotational).
    pub const ALL: Self = Self {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        resize: true,
        multi_conn: true,
        block_status: true,
        rotational: false,
    };
}

/// Why an export description was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ExportError {
    /// The minimum block size is not a power of two of at most 64 KiB.
    BadMinimumBlockSize(u32),
    /// The preferred block size is not a power of two at least
    /// max(minimum, 512).
    BadPreferredBlockSize(u32),
    /// The maximum block size is below the preferred one (or the export
    /// size), or not a multiple of the minimum (and not 0xffffffff).
    BadMaximumBlockSize(u32),
    /// A name or description is longer than the spec's 4096 bytes.
    StringTooLong,
}

impl core::fmt::Display for ExportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMinimumBlockSize(v) => {
                write!(
                    f,
                    "minimum block size {v} must be a power of two no larger than 65536"
                )
            }
            Self::BadPreferredBlockSize(v) => write!(
                f,
                "preferred block size {v} must be a power of two at least the minimum and 512"
            ),
            Self::BadMaximumBlockSize(v) => write!(
                f,
                "maximum block size {v} must be a multiple of the minimum and at least the preferred size"
            ),
            Self::StringTooLong => {
                f.write_str("export name or description is longer than 4096 bytes")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ExportError {}

/// Checks block size constraints against the spec's rules ("Block size
/// constraints"): minimum a power of two ≤ 64 KiB; preferred a power of two
/// ≥ max(minimum, 512); maximum a multiple of the minimum (or 0xffffffff)
/// and ≥ min(preferred, export size).
pub fn validate_block_sizes(
    sizes: BlockSizeConstraints,
    export_size: u64,
) -> Result<(), ExportError> {
    let BlockSizeConstraints {
        minimum,
        preferred,
        maximum,
    } = sizes;
    if !minimum.is_power_of_two() || minimum > MAX_MINIMUM_BLOCK_SIZE {
        return Err(ExportError::BadMinimumBlockSize(minimum));
    }
    if !preferred.is_power_of_two() || preferred < minimum.max(512) {
        return Err(ExportError::BadPreferredBlockSize(preferred));
    }
    let floor = u64::from(preferred).min(export_size);
    if (maximum != u32::MAX && maximum % minimum != 0) || u64::from(maximum) < floor {
        return Err(ExportError::BadMaximumBlockSize(maximum));
    }
    Ok(())
}

/// One export as a catalog describes it. Strings are borrowed from the
/// catalog, so describing an export costs no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export<'a> {
    /// Name clients select it by (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`).
    pub name: &'a str,
    /// Text for humans (`NBD_INFO_DESCRIPTION`, `NBD_REP_SERVER` details); may be empty.
    pub description: &'a str,
    /// Size in bytes.
    pub size: u64,
    /// Block size constraints, enforced on every request and advertised
    /// with `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: BlockSizeConstraints,
    /// Whether writes are refused (`NBD_EPERM`).
    pub read_only: bool,
    /// What the storage supports.
    pub capabilities: Capabilities,
}

impl<'a> Export<'a> {
    /// A writable export with default block sizes, no description and no
    /// optional commands.
    pub const fn new(name: &'a str, size: u64) -> Self {
        Self {
            name,
            description: "",
            size,
            block_sizes: DEFAULT_BLOCK_SIZES,
            read_only: false,
            capabilities: Capabilities::NONE,
        }
    }

    /// With a description.
    #[must_use]
    pub const fn with_description(mut self, description: &'a str) -> Self {
        self.description = description;
        self
    }

    /// Read-only (or not).
    #[must_use]
    pub const fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// With the given capabilities.
    #[must_use]
    pub const fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// With the given block sizes.
    #[must_use]
    pub const fn with_block_sizes(mut self, block_sizes: BlockSizeConstraints) -> Self {
        self.block_sizes = block_sizes;
        self
    }

    /// Checks the description against the spec: block size rules and
    /// string lengths.
    pub fn validate(&self) -> Result<(), ExportError> {
        if self.name.len() > crate::wire::MAX_STRING_LEN
            || self.description.len() > crate::wire::MAX_STRING_LEN
        {
            return Err(ExportError::StringTooLong);
        }
        validate_block_sizes(self.block_sizes, self.size)
    }

    /// The transmission flags for this export on a connection that
    /// negotiated `features` (spec: "Transmission flags").
    pub fn transmission_flags(&self, features: Features) -> TransmissionFlags {
        let caps = self.capabilities;
        let writable = !self.read_only;
        let write_zeroes = caps.write_zeroes && writable;
        TransmissionFlags::HAS_FLAGS
            .with_if(TransmissionFlags::READ_ONLY, self.read_only)
            .with_if(TransmissionFlags::SEND_FLUSH, caps.flush)
            .with_if(TransmissionFlags::SEND_FUA, caps.fua)
            .with_if(TransmissionFlags::ROTATIONAL, caps.rotational)
            .with_if(TransmissionFlags::SEND_TRIM, caps.trim && writable)
            .with_if(TransmissionFlags::SEND_WRITE_ZEROES, write_zeroes)
            .with_if(
                TransmissionFlags::SEND_FAST_ZERO,
                write_zeroes && caps.fast_zero,
            )
            .with_if(TransmissionFlags::SEND_DF, features.structured_replies)
            .with_if(TransmissionFlags::CAN_MULTI_CONN, caps.multi_conn)
            .with_if(TransmissionFlags::SEND_RESIZE, caps.resize && writable)
            .with_if(TransmissionFlags::SEND_CACHE, caps.cache)
            .with_if(
                TransmissionFlags::BLOCK_STATUS_PAYLOAD,
                features.extended_headers && caps.block_status,
            )
    }
}

/// Protocol features a connection negotiated that change what it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Features {
    /// `NBD_OPT_STRUCTURED_REPLY` (or extended headers, which imply it).
    pub structured_replies: bool,
    /// `NBD_OPT_EXTENDED_HEADERS`
    pub extended_headers: bool,
}

impl Features {
    /// Header style of the transmission phase: extended headers once
    /// negotiated, compact otherwise.
    pub fn header_style(self) -> HeaderStyle {
        if self.extended_headers {
            HeaderStyle::Extended
        } else {
            HeaderStyle::Compact
        }
    }
}

/// The exports a server offers, as the shell describes them.
///
/// Implemented for slices and arrays of [`Export`], for references to any
/// catalog and, with `alloc`, for `Vec<Export>`.
pub trait Catalog {
    /// Number of exports.
    fn len(&self) -> usize;

    /// Whether there is no export at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The export at `index`, for `index < len()`.
    fn get(&self, index: usize) -> Option<Export<'_>>;

    /// Index of the default export, selected by the empty name.
    fn default_index(&self) -> Option<usize> {
        (!self.is_empty()).then_some(0)
    }

    /// Index of the export a client's `name` selects.
    fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return self.default_index();
        }
        (0..self.len()).find(|&i| self.get(i).is_some_and(|e| e.name.as_bytes() == name))
    }

    /// Whether `NBD_OPT_LIST` may reveal the exports (else `NBD_REP_ERR_POLICY`).
    fn listable(&self) -> bool {
        true
    }
}

impl Catalog for [Export<'_>] {
    fn len(&self) -> usize {
        <[Export<'_>]>::len(self)
    }
    fn get(&self, index: usize) -> Option<Export<'_>> {
        <[Export<'_>]>::get(self, index).copied()
    }
}

impl<const N: usize> Catalog for [Export<'_>; N] {
    fn len(&self) -> usize {
        N
    }
    fn get(&self, index: usize) -> Option<Export<'_>> {
        self.as_slice().get(index).copied()
    }
}

/// Forwards every method, so a catalog shared between connections behaves
/// exactly like the catalog itself.
macro_rules! forward_catalog {
    ($($pointer:ty),*) => {$(
        impl<C: Catalog + ?Sized> Catalog for $pointer {
            fn len(&self) -> usize {
                (**self).len()
            }
            fn get(&self, index: usize) -> Option<Export<'_>> {
                (**self).get(index)
            }
            fn default_index(&self) -> Option<usize> {
                (**self).default_index()
            }
            fn find(&self, name: &[u8]) -> Option<usize> {
                (**self).find(name)
            }
            fn listable(&self) -> bool {
                (**self).listable()
            }
        }
    )*};
}

forward_catalog!(&C);

#[cfg(feature = "alloc")]
forward_catalog!(alloc::sync::Arc<C>, alloc::rc::Rc<C>, alloc::boxed::Box<C>);

#[cfg(feature = "alloc")]
impl Catalog for alloc::vec::Vec<Export<'_>> {
    fn len(&self) -> usize {
        alloc::vec::Vec::len(self)
    }
    fn get(&self, index: usize) -> Option<Export<'_>> {
        self.as_slice().get(index).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_sizes_are_valid() {
        assert_eq!(validate_block_sizes(DEFAULT_BLOCK_SIZES, 1 << 30), Ok(()));
    }

    #[test]
    fn block_size_rules() {
        let ok = BlockSizeConstraints {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 20,
        };
        assert_eq!(validate_block_sizes(ok, 1 << 30), Ok(()));
        let bad_min = BlockSizeConstraints { minimum: 3, ..ok };
        assert_eq!(
            validate_block_sizes(bad_min, 1 << 30),
            Err(ExportError::BadMinimumBlockSize(3))
        );
        let too_big_min = BlockSizeConstraints {
            minimum: 1 << 17,
            preferred: 1 << 17,
            maximum: 1 << 20,
        };
        assert!(matches!(
            validate_block_sizes(too_big_min, 1 << 30),
            Err(ExportError::BadMinimumBlockSize(_))
        ));
        let small_pref = BlockSizeConstraints {
            preferred: 256,
            ..ok
        };
        assert_eq!(
            validate_block_sizes(small_pref, 1 << 30),
            Err(ExportError::BadPreferredBlockSize(256))
        );
        let odd_max = BlockSizeConstraints {
            maximum: 4097 * 512 + 1,
            ..ok
        };
        assert!(matches!(
            validate_block_sizes(odd_max, 1 << 30),
            Err(ExportError::BadMaximumBlockSize(_))
        ));
        let unlimited = BlockSizeConstraints {
            maximum: u32::MAX,
            ..ok
        };
        assert_eq!(validate_block_sizes(unlimited, 1 << 30), Ok(()));
        // A tiny export may advertise a maximum below the preferred size.
        let tiny = BlockSizeConstraints {
            minimum: 1,
            preferred: 4096,
            maximum: 1024,
        };
        assert_eq!(validate_block_sizes(tiny, 1024), Ok(()));
    }

    #[test]
    fn flags_follow_capabilities() {
        let export = Export::new("a", 1 << 20).with_capabilities(Capabilities::ALL);
        let compact = export.transmission_flags(Features::default());
        assert!(compact.contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH));
        assert!(!compact.contains(TransmissionFlags::SEND_DF));
        assert!(!compact.contains(TransmissionFlags::BLOCK_STATUS_PAYLOAD));
        let extended = export.transmission_flags(Features {
            structured_replies: true,
            extended_headers: true,
        });
        assert!(
            extended.contains(TransmissionFlags::SEND_DF | TransmissionFlags::BLOCK_STATUS_PAYLOAD)
        );

        let read_only = export
            .with_read_only(true)
            .transmission_flags(Features::default());
        assert!(read_only.contains(TransmissionFlags::READ_ONLY));
        assert!(!read_only.intersects(
            TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
                | TransmissionFlags::SEND_RESIZE
        ));

        let plain = Export::new("b", 1).transmission_flags(Features::default());
        assert_eq!(plain, TransmissionFlags::HAS_FLAGS);
    }

    #[test]
    fn find_by_name_and_default() {
        let exports = [Export::new("first", 1), Export::new("second", 2)];
        assert_eq!(exports.find(b""), Some(0));
        assert_eq!(exports.find(b"second"), Some(1));
        assert_eq!(exports.find(b"third"), None);
        let none: [Export<'_>; 0] = [];
        assert_eq!(none.find(b""), None);
    }
}
