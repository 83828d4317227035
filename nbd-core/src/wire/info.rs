//! `NBD_REP_INFO` payloads (spec: "Option reply types" → `NBD_REP_INFO`).

use super::cursor::{Reader, Writer};
use super::{InfoType, TransmissionFlags, WireError};

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

impl<'a> Info<'a> {
    /// The information type.
    pub fn info_type(&self) -> InfoType {
        match self {
            Self::Export { .. } => InfoType::Export,
            Self::Name(_) => InfoType::Name,
            Self::Description(_) => InfoType::Description,
            Self::BlockSize(_) => InfoType::BlockSize,
            Self::Unknown { info_type, .. } => InfoType::Unknown(*info_type),
        }
    }

    /// Parses a complete `NBD_REP_INFO` payload. `NBD_INFO_EXPORT` must be
    /// exactly 12 bytes and `NBD_INFO_BLOCK_SIZE` exactly 14; any payload
    /// shorter than its type is [`WireError::BadLength`].
    pub fn parse(data: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::payload(data);
        let info = match InfoType::from_wire(r.u16()?) {
            InfoType::Export => {
                let size = r.u64()?;
                let flags = TransmissionFlags(r.u16()?);
                r.finish()?;
                Self::Export { size, flags }
            }
            InfoType::Name => Self::Name(r.rest()),
            InfoType::Description => Self::Description(r.rest()),
            InfoType::BlockSize => {
                let minimum = r.u32()?;
                let preferred = r.u32()?;
                let maximum = r.u32()?;
                r.finish()?;
                Self::BlockSize(BlockSizeConstraints {
                    minimum,
                    preferred,
                    maximum,
                })
            }
            InfoType::Unknown(info_type) => Self::Unknown {
                info_type,
                data: r.rest(),
            },
        };
        Ok(info)
    }

    /// Bytes the payload takes, type included.
    pub fn encoded_len(&self) -> usize {
        2 + match self {
            Self::Export { .. } => 10,
            Self::Name(name) => name.len(),
            Self::Description(text) => text.len(),
            Self::BlockSize(_) => 12,
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Writes the payload, type included, to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.encoded_len())?;
        self.encode_prefix(w.slot(self.prefix_len())?)?;
        w.bytes(self.tail())?;
        Ok(w.finish())
    }

    /// The string sent after the fixed fields as it is: a name,
    /// description or unknown data; empty for fixed-size types.
    pub fn tail(&self) -> &'a [u8] {
        match *self {
            Self::Name(bytes) | Self::Description(bytes) | Self::Unknown { data: bytes, .. } => {
                bytes
            }
            Self::Export { .. } | Self::BlockSize(_) => &[],
        }
    }

    /// Bytes of the type and fixed fields before [`tail`](Self::tail).
    pub fn prefix_len(&self) -> usize {
        self.encoded_len() - self.tail().len()
    }

    /// Writes the type and fixed fields (all but [`tail`](Self::tail)) to
    /// the front of `out`.
    pub fn encode_prefix(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.prefix_len())?;
        w.u16(self.info_type().to_wire())?;
        match self {
            Self::Export { size, flags } => {
                w.u64(*size)?;
                w.u16(flags.bits())?;
            }
            Self::Name(_) | Self::Description(_) | Self::Unknown { .. } => {}
            Self::BlockSize(constraints) => {
                w.u32(constraints.minimum)?;
                w.u32(constraints.preferred)?;
                w.u32(constraints.maximum)?;
            }
        }
        Ok(w.finish())
    }
}
