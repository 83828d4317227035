//! Big-endian field readers and writers shared by the message parsers and
//! encoders. Neither panics: every access is length-checked and a short
//! input or output becomes a [`WireError`].
//!
//! Fields are read with `nom`'s streaming parsers; the reader adds what nom
//! cannot know: how long the whole message is, so `Incomplete` says how
//! many bytes the message still needs, and whether running out means "wait
//! for more" (a stream) or "malformed" (a payload whose length is fixed).

use nom::Parser;
use nom::number::streaming::{be_u16, be_u32, be_u64};

use super::WireError;

type NomResult<'a, T> = nom::IResult<&'a [u8], T, nom::error::Error<&'a [u8]>>;

/// Reads fields from the front of a byte slice.
///
/// A *streaming* reader works on a prefix of the byte stream: running out
/// gives [`WireError::Incomplete`], counting toward the message's known
/// minimum length. A *payload* reader works on data whose length a header
/// already fixed: running out gives [`WireError::BadLength`].
#[derive(Debug)]
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    consumed: usize,
    /// Length the message is known to have at least (streaming only).
    min_len: usize,
    streaming: bool,
}

impl<'a> Reader<'a> {
    /// A reader over a prefix of the stream holding a message of at least
    /// `min_len` bytes.
    pub(super) fn streaming(input: &'a [u8], min_len: usize) -> Self {
        Self {
            bytes: input,
            consumed: 0,
            min_len,
            streaming: true,
        }
    }

    /// A reader over a complete payload.
    pub(super) fn payload(data: &'a [u8]) -> Self {
        Self {
            bytes: data,
            consumed: 0,
            min_len: 0,
            streaming: false,
        }
    }

    /// The error for a read of `len` bytes that does not fit.
    fn short(&self, len: usize) -> WireError {
        if self.streaming {
            let field = len.saturating_sub(self.bytes.len());
            let whole = self
                .min_len
                .saturating_sub(self.consumed.saturating_add(self.bytes.len()));
            WireError::Incomplete {
                needed: field.max(whole).max(1),
            }
        } else {
            WireError::BadLength
        }
    }

    /// Runs a nom parser for a field of `len` bytes.
    fn field<T>(
        &mut self,
        len: usize,
        parser: impl FnOnce(&'a [u8]) -> NomResult<'a, T>,
    ) -> Result<T, WireError> {
        match parser(self.bytes) {
            Ok((rest, value)) => {
                self.consumed = self.consumed.saturating_add(self.bytes.len() - rest.len());
                self.bytes = rest;
                Ok(value)
            }
            Err(_) => Err(self.short(len)),
        }
    }

    /// Reads `len` bytes.
    pub(super) fn take(&mut self, len: usize) -> Result<&'a [u8], WireError> {
        self.field(len, |input| nom::bytes::streaming::take(len).parse(input))
    }

    /// Reads a length given by a wire field; a length that does not fit
    /// `usize` is treated as running out of input.
    pub(super) fn take_wire_len(&mut self, len: u64) -> Result<&'a [u8], WireError> {
        match usize::try_from(len) {
            Ok(len) => self.take(len),
            Err(_) => Err(self.short(usize::MAX)),
        }
    }

    pub(super) fn u16(&mut self) -> Result<u16, WireError> {
        self.field(2, be_u16)
    }

    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        self.field(4, be_u32)
    }

    pub(super) fn u64(&mut self) -> Result<u64, WireError> {
        self.field(8, be_u64)
    }

    /// Reads a 64-bit magic number and checks it.
    pub(super) fn magic_u64(&mut self, expected: u64) -> Result<(), WireError> {
        let found = self.u64()?;
        if found == expected {
            Ok(())
        } else {
            Err(WireError::BadMagic { found })
        }
    }

    /// Reads a 32-bit magic number and checks it.
    pub(super) fn magic_u32(&mut self, expected: u32) -> Result<(), WireError> {
        let found = self.u32()?;
        if found == expected {
            Ok(())
        } else {
            Err(WireError::BadMagic {
                found: found.into(),
            })
        }
    }

    /// Everything not read yet.
    pub(super) fn rest(self) -> &'a [u8] {
        self.bytes
    }

    /// Ends a payload: fails with [`WireError::BadLength`] if bytes remain.
    pub(super) fn finish(self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(WireError::BadLength)
        }
    }
}

/// Writes fields to the front of an output buffer checked up front to hold
/// the whole message.
#[derive(Debug)]
pub(super) struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
    needed: usize,
}

impl<'a> Writer<'a> {
    /// A writer for a message of `needed` bytes; fails with
    /// [`WireError::BufferTooSmall`] when `out` is shorter.
    pub(super) fn new(out: &'a mut [u8], needed: usize) -> Result<Self, WireError> {
        if out.len() < needed {
            return Err(WireError::BufferTooSmall { needed });
        }
        Ok(Self { out, at: 0, needed })
    }

    /// The next `len` bytes of the output, for a caller to fill.
    pub(super) fn slot(&mut self, len: usize) -> Result<&mut [u8], WireError> {
        let end = self.at.checked_add(len).filter(|&end| end <= self.needed);
        let Some(end) = end else {
            // Only reachable if a message's `encoded_len` undercounts.
            return Err(WireError::BufferTooSmall {
                needed: self.at.saturating_add(len),
            });
        };
        let slot = self
            .out
            .get_mut(self.at..end)
            .ok_or(WireError::BufferTooSmall { needed: end })?;
        self.at = end;
        Ok(slot)
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.slot(bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    pub(super) fn zeroes(&mut self, len: usize) -> Result<(), WireError> {
        self.slot(len)?.fill(0);
        Ok(())
    }

    pub(super) fn u16(&mut self, value: u16) -> Result<(), WireError> {
        self.bytes(&value.to_be_bytes())
    }

    pub(super) fn u32(&mut self, value: u32) -> Result<(), WireError> {
        self.bytes(&value.to_be_bytes())
    }

    pub(super) fn u64(&mut self, value: u64) -> Result<(), WireError> {
        self.bytes(&value.to_be_bytes())
    }

    /// Ends the message and returns its length.
    pub(super) fn finish(self) -> usize {
        debug_assert_eq!(self.at, self.needed, "encoded_len disagrees with encode");
        self.at
    }
}

/// A length as a 16-bit wire field, or `InvalidValue(field)`.
pub(super) fn len_u16(len: usize, field: &'static str) -> Result<u16, WireError> {
    u16::try_from(len).map_err(|_| WireError::InvalidValue(field))
}

/// A length as a 32-bit wire field, or `InvalidValue(field)`.
pub(super) fn len_u32(len: usize, field: &'static str) -> Result<u32, WireError> {
    u32::try_from(len).map_err(|_| WireError::InvalidValue(field))
}
