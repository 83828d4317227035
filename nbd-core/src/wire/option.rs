//! Option requests and option replies (spec: "Fixed newstyle negotiation",
//! "Option types", "Option reply types").

use super::{Info, InfoType, OptionCode, OptionReplyType, WireList};

/// Header of an option request: `IHAVEOPT`, option code, data length (16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub code: OptionCode,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`: export name, then the
/// information types requested (16-bit count, 16-bit types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name; empty selects the default export.
    pub name: &'a [u8],
    /// Information types requested, as raw 16-bit values.
    pub requests: WireList<'a, u16>,
}

impl InfoRequest<'_> {
    /// The information types requested.
    pub fn info_types(&self) -> impl Iterator<Item = InfoType> + '_ {
        self.requests.iter().map(InfoType::from_wire)
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`:
/// export name, then queries (32-bit count, each a 32-bit-length string).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export the contexts are for.
    pub export_name: &'a [u8],
    /// Queries such as `base:allocation` or `base:`.
    pub queries: WireList<'a, &'a [u8]>,
}

/// An option request with its data parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptionRequest<'a> {
    /// `NBD_OPT_EXPORT_NAME`: the data is the name.
    ExportName {
        /// Export name; empty selects the default export.
        name: &'a [u8],
    },
    /// `NBD_OPT_ABORT`. Data, which the spec tells servers to ignore, is dropped.
    Abort,
    /// `NBD_OPT_LIST` (no data).
    List,
    /// `NBD_OPT_STARTTLS` (no data).
    StartTls,
    /// `NBD_OPT_INFO`
    Info(InfoRequest<'a>),
    /// `NBD_OPT_GO`
    Go(InfoRequest<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY` (no data).
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`
    ListMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_SET_META_CONTEXT`
    SetMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_EXTENDED_HEADERS` (no data).
    ExtendedHeaders,
    /// Any other option, `NBD_OPT_PEEK_EXPORT` included, with its raw data.
    Unknown {
        /// The option code.
        code: OptionCode,
        /// Its data.
        data: &'a [u8],
    },
}

/// Header of an option reply: magic, option, reply type, length (20 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: OptionCode,
    /// Reply type.
    pub reply_type: OptionReplyType,
    /// Length of the reply data that follows.
    pub length: u32,
}

/// An option reply's data, parsed according to its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK` (no data).
    Ack,
    /// `NBD_REP_SERVER`: 32-bit name length, name, then details for humans.
    Server {
        /// Export name.
        name: &'a [u8],
        /// Rest of the data: a description, possibly empty.
        details: &'a [u8],
    },
    /// `NBD_REP_INFO`
    Info(Info<'a>),
    /// `NBD_REP_META_CONTEXT`: 32-bit context id, then the context name.
    MetaContext {
        /// Context id (zero in `LIST_META_CONTEXT` replies).
        id: u32,
        /// Context name, e.g. `base:allocation`.
        name: &'a [u8],
    },
    /// An error reply type (bit 31 set), known or not, with its message.
    Error {
        /// The error reply type.
        reply_type: OptionReplyType,
        /// Optional message for humans.
        message: &'a [u8],
    },
    /// A non-error reply type this version does not know.
    Unknown {
        /// Wire value of the reply type.
        reply_type: u32,
        /// Raw data.
        data: &'a [u8],
    },
}
