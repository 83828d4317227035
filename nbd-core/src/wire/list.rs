//! Lists of fixed- or length-prefixed items inside a message (info
//! requests, meta context queries, context ids, block descriptors), kept
//! either as the received bytes or as a caller's slice, so parsing borrows
//! and encoding needs no allocation.

/// An item of a [`WireList`].
pub trait ListItem<'a>: Sized + Copy {
    /// Decodes one item from the front of `input` and advances it, or
    /// returns `None` when `input` does not start with a whole item.
    fn decode(input: &mut &'a [u8]) -> Option<Self>;
    /// Bytes this item takes on the wire.
    fn encoded_len(&self) -> usize;
    /// Writes the item to the front of `out`, which holds at least
    /// [`encoded_len`](Self::encoded_len) bytes.
    fn encode_into(&self, out: &mut [u8]);
}

/// A list inside a message: the bytes received (validated when parsed, so
/// iteration cannot fail) or items given by an encoder.
#[derive(Clone, Copy, Debug)]
pub enum WireList<'a, T> {
    /// As received: `count` well-formed items filling `bytes` exactly.
    Encoded {
        /// Number of items.
        count: usize,
        /// Their encoding.
        bytes: &'a [u8],
    },
    /// Items to encode.
    Items(&'a [T]),
}

impl<'a, T: ListItem<'a>> WireList<'a, T> {
    /// Checks that `bytes` holds exactly `count` items and wraps it.
    /// Returns `None` when it holds fewer, more, or a broken item.
    pub fn decode_exact(count: usize, bytes: &'a [u8]) -> Option<Self> {
        let mut rest = bytes;
        for _ in 0..count {
            T::decode(&mut rest)?;
        }
        rest.is_empty().then_some(Self::Encoded { count, bytes })
    }

    /// Wraps `bytes` as a list of as many items as fill it exactly.
    pub fn decode_all(bytes: &'a [u8]) -> Option<Self> {
        let mut rest = bytes;
        let mut count = 0;
        while !rest.is_empty() {
            T::decode(&mut rest)?;
            count += 1;
        }
        Some(Self::Encoded { count, bytes })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            Self::Encoded { count, .. } => *count,
            Self::Items(items) => items.len(),
        }
    }

    /// Whether the list has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items, in order.
    pub fn iter(&self) -> WireListIter<'a, T> {
        match *self {
            Self::Encoded { bytes, .. } => WireListIter::Encoded(bytes),
            Self::Items(items) => WireListIter::Items(items.iter()),
        }
    }

    /// Bytes the items take on the wire.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Encoded { bytes, .. } => bytes.len(),
            Self::Items(items) => items.iter().map(ListItem::encoded_len).sum(),
        }
    }

    /// Writes the items to the front of `out` (at least `encoded_len` bytes)
    /// and returns the length written.
    pub fn encode_into(&self, out: &mut [u8]) -> usize {
        match self {
            Self::Encoded { bytes, .. } => {
                out[..bytes.len()].copy_from_slice(bytes);
                bytes.len()
            }
            Self::Items(items) => {
                let mut at = 0;
                for item in items.iter() {
                    let len = item.encoded_len();
                    item.encode_into(&mut out[at..at + len]);
                    at += len;
                }
                at
            }
        }
    }
}

impl<'a, T: ListItem<'a> + PartialEq> PartialEq for WireList<'a, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<'a, T: ListItem<'a> + Eq> Eq for WireList<'a, T> {}

/// Iterator over a [`WireList`].
#[derive(Clone, Debug)]
pub enum WireListIter<'a, T> {
    /// Decoding validated bytes.
    Encoded(&'a [u8]),
    /// Walking a slice.
    Items(core::slice::Iter<'a, T>),
}

impl<'a, T: ListItem<'a>> Iterator for WireListIter<'a, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Self::Encoded(bytes) => T::decode(bytes),
            Self::Items(items) => items.next().copied(),
        }
    }
}

impl<'a> ListItem<'a> for u16 {
    fn decode(input: &mut &'a [u8]) -> Option<Self> {
        let (head, rest) = input.split_first_chunk::<2>()?;
        *input = rest;
        Some(u16::from_be_bytes(*head))
    }
    fn encoded_len(&self) -> usize {
        2
    }
    fn encode_into(&self, out: &mut [u8]) {
        out[..2].copy_from_slice(&self.to_be_bytes());
    }
}

impl<'a> ListItem<'a> for u32 {
    fn decode(input: &mut &'a [u8]) -> Option<Self> {
        let (head, rest) = input.split_first_chunk::<4>()?;
        *input = rest;
        Some(u32::from_be_bytes(*head))
    }
    fn encoded_len(&self) -> usize {
        4
    }
    fn encode_into(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_be_bytes());
    }
}

/// A string prefixed by its 32-bit length (meta context queries).
impl<'a> ListItem<'a> for &'a [u8] {
    fn decode(input: &mut &'a [u8]) -> Option<Self> {
        let (head, rest) = input.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*head)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (string, rest) = rest.split_at(len);
        *input = rest;
        Some(string)
    }
    fn encoded_len(&self) -> usize {
        4 + self.len()
    }
    fn encode_into(&self, out: &mut [u8]) {
        let len = u32::try_from(self.len()).unwrap_or(u32::MAX);
        out[..4].copy_from_slice(&len.to_be_bytes());
        out[4..4 + self.len()].copy_from_slice(self);
    }
}
