//! `NBD_REP_INFO` payloads (spec: "Option reply types" → `NBD_REP_INFO`).

use super::TransmissionFlags;

/// Block size constraints of `NBD_INFO_BLOCK_SIZE` (spec: "Block size
/// constraints"). The wire form carries any values; `export` validates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockSizeConstraints {
    /// Smallest addressable length and alignment.
    pub minimum: u32,
    /// Smallest efficient length and alignment.
    pub preferred: u32,
    /// Largest payload of one request.
    pub maximum: u32,
}

/// One `NBD_REP_INFO` payload: a 16-bit type, then the type's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info<'a> {
    /// `NBD_INFO_EXPORT` (length 12): size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`: the canonical export name.
    Name(&'a [u8]),
    /// `NBD_INFO_DESCRIPTION`: text for humans.
    Description(&'a [u8]),
    /// `NBD_INFO_BLOCK_SIZE` (length 14).
    BlockSize(BlockSizeConstraints),
    /// A type this version does not know, with its raw payload.
    Unknown {
        /// Wire value of the information type.
        info_type: u16,
        /// Payload after the type.
        data: &'a [u8],
    },
}
