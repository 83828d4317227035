//! What `process` hands the shell: events, the export as negotiated, and
//! block status descriptors borrowed from the input.

use super::RequestId;
use crate::export::Features;
use crate::wire::{
    BlockSizeConstraints, Descriptor, ErrorCode, ExtDescriptor, HandshakeFlags, Info, ListItem,
    OptionCode, OptionReplyType, TransmissionFlags,
};

/// The result of one [`Connection::process`](super::Connection::process) call.
pub type Step<'a> = crate::shape::Step<Event<'a>>;

/// What the export offers, as negotiated. Block sizes are the server's
/// (`NBD_INFO_BLOCK_SIZE`) or the spec's defaults (1, 4096, 32 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExportInfo {
    /// Size in bytes (it changes with `NBD_CMD_RESIZE`).
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints the client honours.
    pub block_sizes: BlockSizeConstraints,
    /// Whether the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes_advertised: bool,
    /// Features negotiated.
    pub features: Features,
}

impl ExportInfo {
    fn has(&self, flag: TransmissionFlags) -> bool {
        self.flags.contains(flag)
    }
    /// `NBD_FLAG_READ_ONLY`: writes, trims, zeroing and resizing are refused.
    pub fn is_read_only(&self) -> bool {
        self.has(TransmissionFlags::READ_ONLY)
    }
    /// `NBD_CMD_FLUSH` may be sent.
    pub fn can_flush(&self) -> bool {
        self.has(TransmissionFlags::SEND_FLUSH)
    }
    /// `NBD_CMD_FLAG_FUA` may be set.
    pub fn can_fua(&self) -> bool {
        self.has(TransmissionFlags::SEND_FUA)
    }
    /// `NBD_CMD_TRIM` may be sent.
    pub fn can_trim(&self) -> bool {
        self.has(TransmissionFlags::SEND_TRIM) && !self.is_read_only()
    }
    /// `NBD_CMD_WRITE_ZEROES` may be sent.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(TransmissionFlags::SEND_WRITE_ZEROES) && !self.is_read_only()
    }
    /// `NBD_CMD_FLAG_FAST_ZERO` may be set on `NBD_CMD_WRITE_ZEROES`.
    pub fn can_fast_zero(&self) -> bool {
        self.can_write_zeroes() && self.has(TransmissionFlags::SEND_FAST_ZERO)
    }
    /// `NBD_CMD_CACHE` may be sent.
    pub fn can_cache(&self) -> bool {
        self.has(TransmissionFlags::SEND_CACHE)
    }
    /// `NBD_CMD_RESIZE` may be sent.
    pub fn can_resize(&self) -> bool {
        self.has(TransmissionFlags::SEND_RESIZE) && !self.is_read_only()
    }
    /// `NBD_CMD_FLAG_DF` may be set on reads.
    pub fn can_df(&self) -> bool {
        self.has(TransmissionFlags::SEND_DF) && self.features.structured_replies
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`: several connections may share the export.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TransmissionFlags::CAN_MULTI_CONN)
    }
    /// `NBD_FLAG_ROTATIONAL`
    pub fn is_rotational(&self) -> bool {
        self.has(TransmissionFlags::ROTATIONAL)
    }
}

/// Block status descriptors of one [`Event::BlockStatus`], as received
/// (compact 8-byte or extended 16-byte ones), already checked: nonzero
/// lengths, inside the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptors<'a> {
    bytes: &'a [u8],
    extended: bool,
}

impl<'a> Descriptors<'a> {
    pub(crate) fn new(bytes: &'a [u8], extended: bool) -> Self {
        Self { bytes, extended }
    }

    /// Bytes one descriptor takes: 8, or 16 with extended headers.
    pub fn item_len(&self) -> usize {
        if self.extended { 16 } else { 8 }
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.item_len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The descriptors in export order, widened to 64 bits.
    pub fn iter(&self) -> impl Iterator<Item = ExtDescriptor> + 'a {
        let extended = self.extended;
        let len = self.item_len();
        self.bytes
            .chunks_exact(len)
            .map(move |item| parse_descriptor(item, extended))
    }
}

/// One descriptor from exactly 8 or 16 bytes (zero length if shorter).
pub(crate) fn parse_descriptor(mut item: &[u8], extended: bool) -> ExtDescriptor {
    let descriptor = if extended {
        ExtDescriptor::decode(&mut item)
    } else {
        Descriptor::decode(&mut item).map(|d| ExtDescriptor {
            length: d.length.into(),
            status: d.status.into(),
        })
    };
    descriptor.unwrap_or(ExtDescriptor {
        length: 0,
        status: 0,
    })
}

/// What the shell must act on.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The server greeted with fixed newstyle negotiation; the client flags
    /// and the first option are ready in `poll_transmit`.
    Greeted {
        /// Handshake flags the server offered.
        flags: HandshakeFlags,
    },
    /// `NBD_OPT_STARTTLS` was acknowledged: the shell runs the TLS handshake
    /// now, before sending anything else, and from then on feeds the core
    /// decrypted bytes and encrypts what `poll_transmit` returns. Bytes
    /// after the acknowledgement in the same input were not consumed.
    /// Negotiation starts afresh, as the spec requires.
    StartTls,
    /// One `NBD_REP_SERVER` reply to `NBD_OPT_LIST`.
    ListEntry {
        /// Export name.
        name: &'a [u8],
        /// Description for humans (possibly empty).
        description: &'a [u8],
    },
    /// One `NBD_REP_META_CONTEXT` reply: a context selected by
    /// `NBD_OPT_SET_META_CONTEXT` (with the id block status replies use),
    /// or listed by `NBD_OPT_LIST_META_CONTEXT` (id 0).
    MetaContext {
        /// Context id.
        id: u32,
        /// Context name.
        name: &'a [u8],
    },
    /// One `NBD_REP_INFO` reply to `NBD_OPT_GO`/`NBD_OPT_INFO`, as received
    /// (unknown types included).
    Info(Info<'a>),
    /// The export is described: after `NBD_OPT_GO` or `NBD_OPT_INFO` was
    /// acknowledged, or `NBD_OPT_EXPORT_NAME` answered.
    Export(ExportInfo),
    /// Transmission began: commands may be issued.
    Ready,
    /// The server refused an option the session cannot go on without
    /// (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, a required
    /// `NBD_OPT_STARTTLS`, or any option with `NBD_REP_ERR_SHUTDOWN`). The
    /// core sends `NBD_OPT_ABORT` next and then reports [`Event::Closed`].
    OptionRefused {
        /// The option.
        option: OptionCode,
        /// The error reply type.
        reply_type: OptionReplyType,
        /// The server's message for humans (empty if it did not fit).
        message: &'a [u8],
    },
    /// A piece of a read's data, as a slice of the caller's input, for
    /// export offset `offset`. Pieces of one read may come in any order.
    ReadData {
        /// The read.
        id: RequestId,
        /// Export offset of `data`.
        offset: u64,
        /// The bytes read.
        data: &'a [u8],
    },
    /// A range of a read that reads as zeroes (`NBD_REPLY_TYPE_OFFSET_HOLE`).
    ReadHole {
        /// The read.
        id: RequestId,
        /// Export offset.
        offset: u64,
        /// Bytes of zeroes.
        length: u64,
    },
    /// Block status descriptors for one metadata context, starting at
    /// export offset `offset`. One chunk may come as several events.
    BlockStatus {
        /// The request.
        id: RequestId,
        /// Metadata context id (see [`Event::MetaContext`]).
        context_id: u32,
        /// Export offset of the first descriptor.
        offset: u64,
        /// The descriptors.
        descriptors: Descriptors<'a>,
    },
    /// The request ended: successfully, or with the server's error. Its
    /// id may be reused from now on. For a read, success means every byte
    /// of the range came as [`Event::ReadData`] or [`Event::ReadHole`].
    Done {
        /// The request.
        id: RequestId,
        /// Its outcome.
        result: Result<(), ErrorCode>,
    },
    /// The session ended cleanly (`NBD_OPT_ABORT` acknowledged, or
    /// `NBD_CMD_DISC` sent and every request answered). The shell shuts
    /// TLS down if running and closes.
    Closed,
}
