//! Option requests and option replies (spec: "Fixed newstyle negotiation",
//! "Option types", "Option reply types").

use super::cursor::{Reader, Writer, len_u16, len_u32};
use super::{
    IHAVEOPT, Info, InfoType, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC,
    OptionCode, OptionReplyType, WireError, WireList,
};

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

impl OptionHeader {
    /// Parses an option request header from the front of `input`.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, OPTION_HEADER_LEN);
        r.magic_u64(IHAVEOPT)?;
        let code = OptionCode::from_wire(r.u32()?);
        let length = r.u32()?;
        Ok((r.rest(), Self { code, length }))
    }

    /// Bytes the header takes: 16.
    pub fn encoded_len(&self) -> usize {
        OPTION_HEADER_LEN
    }

    /// Writes the header to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, OPTION_HEADER_LEN)?;
        self.write(&mut w)?;
        Ok(w.finish())
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.u64(IHAVEOPT)?;
        w.u32(self.code.to_wire())?;
        w.u32(self.length)
    }
}

impl<'a> InfoRequest<'a> {
    /// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: 32-bit name length, name,
    /// 16-bit count, that many 16-bit types, and nothing after.
    fn parse_data(data: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::payload(data);
        // A name too long to leave room for the count (the spec's
        // "length - 6") makes the count read fail.
        let name_len = r.u32()?;
        let name = r.take_wire_len(name_len.into())?;
        let count = usize::from(r.u16()?);
        // `decode_exact` refuses a count that does not fill the rest exactly.
        let requests = WireList::decode_exact(count, r.rest()).ok_or(WireError::BadLength)?;
        Ok(Self { name, requests })
    }

    fn data_len(&self) -> usize {
        4usize
            .saturating_add(self.name.len())
            .saturating_add(2)
            .saturating_add(self.requests.encoded_len())
    }

    /// Bytes of the count and types after the name.
    fn after_name_len(&self) -> usize {
        2usize.saturating_add(self.requests.encoded_len())
    }

    /// Writes what follows the name, the 16-bit count and the types, to the
    /// front of `out`: for a sender that sends the name from where it is.
    pub fn encode_requests(
        types: impl Iterator<Item = u16> + Clone,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let count = len_u16(types.clone().count(), "info request count")?;
        let mut w = Writer::new(out, 2usize.saturating_add(usize::from(count) * 2))?;
        w.u16(count)?;
        for info_type in types {
            w.u16(info_type)?;
        }
        Ok(w.finish())
    }
}

impl<'a> MetaContextRequest<'a> {
    /// Parses `NBD_OPT_{LIST,SET}_META_CONTEXT` data: 32-bit export name
    /// length, name, 32-bit query count, queries (each a 32-bit length and
    /// the string), filling the data exactly.
    fn parse_data(data: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::payload(data);
        // A name too long to leave room for the query count makes the
        // count read fail.
        let name_len = r.u32()?;
        let export_name = r.take_wire_len(name_len.into())?;
        let count = usize::try_from(r.u32()?).map_err(|_| WireError::BadLength)?;
        let rest = r.rest();
        // Every query takes at least its 4-byte length: a count the data
        // cannot hold is refused before walking it.
        if count > rest.len() / 4 {
            return Err(WireError::BadLength);
        }
        let queries = WireList::decode_exact(count, rest).ok_or(WireError::BadLength)?;
        Ok(Self {
            export_name,
            queries,
        })
    }

    fn data_len(&self) -> usize {
        4usize
            .saturating_add(self.export_name.len())
            .saturating_add(4)
            .saturating_add(self.queries.encoded_len())
    }

    /// Bytes of the count and queries after the export name.
    pub fn queries_len<'q>(queries: impl Iterator<Item = &'q [u8]>) -> usize {
        queries.fold(4usize, |len, query| {
            len.saturating_add(4).saturating_add(query.len())
        })
    }

    /// Writes what follows the export name, the 32-bit query count and the
    /// queries (each a 32-bit length and the string), to the front of
    /// `out`: for a sender that keeps them apart from the name.
    pub fn encode_queries<'q>(
        queries: impl Iterator<Item = &'q [u8]> + Clone,
        out: &mut [u8],
    ) -> Result<usize, WireError> {
        let count = len_u32(queries.clone().count(), "query count")?;
        let mut w = Writer::new(out, Self::queries_len(queries.clone()))?;
        w.u32(count)?;
        for query in queries {
            w.u32(len_u32(query.len(), "query length")?)?;
            w.bytes(query)?;
        }
        Ok(w.finish())
    }
}

impl<'a> OptionRequest<'a> {
    /// The option code.
    pub fn code(&self) -> OptionCode {
        match self {
            Self::ExportName { .. } => OptionCode::ExportName,
            Self::Abort => OptionCode::Abort,
            Self::List => OptionCode::List,
            Self::StartTls => OptionCode::StartTls,
            Self::Info(_) => OptionCode::Info,
            Self::Go(_) => OptionCode::Go,
            Self::StructuredReply => OptionCode::StructuredReply,
            Self::ListMetaContext(_) => OptionCode::ListMetaContext,
            Self::SetMetaContext(_) => OptionCode::SetMetaContext,
            Self::ExtendedHeaders => OptionCode::ExtendedHeaders,
            Self::Unknown { code, .. } => *code,
        }
    }

    /// Parses the complete data of option `code` (the `length` bytes after
    /// its header). Data that does not fill the option's layout exactly is
    /// [`WireError::BadLength`]; `NBD_OPT_ABORT` accepts and drops any data;
    /// `NBD_OPT_PEEK_EXPORT` and unknown options keep their raw data.
    pub fn parse_payload(code: OptionCode, data: &'a [u8]) -> Result<Self, WireError> {
        let no_data = |option: Self| {
            if data.is_empty() {
                Ok(option)
            } else {
                Err(WireError::BadLength)
            }
        };
        match code {
            OptionCode::ExportName => Ok(Self::ExportName { name: data }),
            OptionCode::Abort => Ok(Self::Abort),
            OptionCode::List => no_data(Self::List),
            OptionCode::StartTls => no_data(Self::StartTls),
            OptionCode::StructuredReply => no_data(Self::StructuredReply),
            OptionCode::ExtendedHeaders => no_data(Self::ExtendedHeaders),
            OptionCode::Info => InfoRequest::parse_data(data).map(Self::Info),
            OptionCode::Go => InfoRequest::parse_data(data).map(Self::Go),
            OptionCode::ListMetaContext => {
                MetaContextRequest::parse_data(data).map(Self::ListMetaContext)
            }
            OptionCode::SetMetaContext => {
                MetaContextRequest::parse_data(data).map(Self::SetMetaContext)
            }
            OptionCode::PeekExport | OptionCode::Unknown(_) => Ok(Self::Unknown { code, data }),
        }
    }

    /// Parses an option request, header and data, from the front of `input`.
    pub fn parse(input: &'a [u8]) -> Result<(&'a [u8], Self), WireError> {
        let (rest, header) = OptionHeader::parse(input)?;
        let mut r = Reader::streaming(rest, 0);
        let data = r.take_wire_len(header.length.into())?;
        let option = Self::parse_payload(header.code, data)?;
        Ok((r.rest(), option))
    }

    /// Bytes of option data (the header's `length`).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::ExportName { name } => name.len(),
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => 0,
            Self::Info(request) | Self::Go(request) => request.data_len(),
            Self::ListMetaContext(request) | Self::SetMetaContext(request) => request.data_len(),
            Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Bytes the option takes, header included.
    pub fn encoded_len(&self) -> usize {
        OPTION_HEADER_LEN.saturating_add(self.payload_len())
    }

    /// Writes the option, header and data, to the front of `out`.
    /// `Abort` is sent without data. A name, list or whole option too long
    /// for its length field is [`WireError::InvalidValue`]. `Unknown` is
    /// written as given, whatever its code.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.encoded_len())?;
        let prefix = self.prefix_len();
        self.encode_prefix(w.slot(prefix)?)?;
        match self {
            Self::ExportName { name: data } | Self::Unknown { data, .. } => w.bytes(data)?,
            Self::Abort
            | Self::List
            | Self::StartTls
            | Self::StructuredReply
            | Self::ExtendedHeaders => {}
            Self::Info(request) | Self::Go(request) => {
                w.bytes(request.name)?;
                let len = request.after_name_len();
                InfoRequest::encode_requests(request.requests.iter(), w.slot(len)?)?;
            }
            Self::ListMetaContext(request) | Self::SetMetaContext(request) => {
                w.bytes(request.export_name)?;
                let len = 4usize.saturating_add(request.queries.encoded_len());
                MetaContextRequest::encode_queries(request.queries.iter(), w.slot(len)?)?;
            }
        }
        Ok(w.finish())
    }

    /// Bytes of the header and, for options that carry an export name
    /// with more after it, the name's length field.
    pub fn prefix_len(&self) -> usize {
        match self {
            Self::Info(_) | Self::Go(_) | Self::ListMetaContext(_) | Self::SetMetaContext(_) => {
                OPTION_HEADER_LEN + 4
            }
            _ => OPTION_HEADER_LEN,
        }
    }

    /// Writes the header (its length covers the whole data) and, for
    /// `INFO`, `GO` and the meta context options, the export name's
    /// length to the front of `out`: for a sender that sends the name from
    /// where it is, then what follows it
    /// ([`InfoRequest::encode_requests`],
    /// [`MetaContextRequest::encode_queries`]).
    pub fn encode_prefix(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let length = len_u32(self.payload_len(), "option length")?;
        let mut w = Writer::new(out, self.prefix_len())?;
        OptionHeader {
            code: self.code(),
            length,
        }
        .write(&mut w)?;
        match self {
            Self::Info(request) | Self::Go(request) => {
                w.u32(len_u32(request.name.len(), "name length")?)?;
            }
            Self::ListMetaContext(request) | Self::SetMetaContext(request) => {
                w.u32(len_u32(request.export_name.len(), "name length")?)?;
            }
            _ => {}
        }
        Ok(w.finish())
    }
}

impl OptionReplyHeader {
    /// Parses an option reply header from the front of `input`.
    pub fn parse(input: &[u8]) -> Result<(&[u8], Self), WireError> {
        let mut r = Reader::streaming(input, OPTION_REPLY_HEADER_LEN);
        r.magic_u64(OPTION_REPLY_MAGIC)?;
        let option = OptionCode::from_wire(r.u32()?);
        let reply_type = OptionReplyType::from_wire(r.u32()?);
        let length = r.u32()?;
        Ok((
            r.rest(),
            Self {
                option,
                reply_type,
                length,
            },
        ))
    }

    /// Bytes the header takes: 20.
    pub fn encoded_len(&self) -> usize {
        OPTION_REPLY_HEADER_LEN
    }

    /// Writes the header to the front of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, OPTION_REPLY_HEADER_LEN)?;
        self.write(&mut w)?;
        Ok(w.finish())
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), WireError> {
        w.u64(OPTION_REPLY_MAGIC)?;
        w.u32(self.option.to_wire())?;
        w.u32(self.reply_type.to_wire())?;
        w.u32(self.length)
    }
}

impl<'a> OptionReply<'a> {
    /// The reply type.
    pub fn reply_type(&self) -> OptionReplyType {
        match self {
            Self::Ack => OptionReplyType::Ack,
            Self::Server { .. } => OptionReplyType::Server,
            Self::Info(_) => OptionReplyType::Info,
            Self::MetaContext { .. } => OptionReplyType::MetaContext,
            Self::Error { reply_type, .. } => *reply_type,
            Self::Unknown { reply_type, .. } => OptionReplyType::from_wire(*reply_type),
        }
    }

    /// Parses the complete data of a reply of type `reply_type` (the
    /// `length` bytes after its header). Any error type (bit 31 set) keeps
    /// its data as the message; data that does not fit the type's layout
    /// is [`WireError::BadLength`].
    pub fn parse_payload(reply_type: OptionReplyType, data: &'a [u8]) -> Result<Self, WireError> {
        if reply_type.is_error() {
            return Ok(Self::Error {
                reply_type,
                message: data,
            });
        }
        let mut r = Reader::payload(data);
        match reply_type {
            OptionReplyType::Ack => {
                r.finish()?;
                Ok(Self::Ack)
            }
            OptionReplyType::Server => {
                let name_len = r.u32()?;
                let name = r.take_wire_len(name_len.into())?;
                Ok(Self::Server {
                    name,
                    details: r.rest(),
                })
            }
            OptionReplyType::Info => Info::parse(data).map(Self::Info),
            OptionReplyType::MetaContext => {
                let id = r.u32()?;
                Ok(Self::MetaContext { id, name: r.rest() })
            }
            other => Ok(Self::Unknown {
                reply_type: other.to_wire(),
                data,
            }),
        }
    }

    /// Parses an option reply, header and data, from the front of `input`;
    /// gives the option it answers with it.
    pub fn parse(input: &'a [u8]) -> Result<(&'a [u8], (OptionCode, Self)), WireError> {
        let (rest, header) = OptionReplyHeader::parse(input)?;
        let mut r = Reader::streaming(rest, 0);
        let data = r.take_wire_len(header.length.into())?;
        let reply = Self::parse_payload(header.reply_type, data)?;
        Ok((r.rest(), (header.option, reply)))
    }

    /// Bytes of reply data (the header's `length`).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Ack => 0,
            Self::Server { name, details } => 4usize
                .saturating_add(name.len())
                .saturating_add(details.len()),
            Self::Info(info) => info.encoded_len(),
            Self::MetaContext { name, .. } => 4usize.saturating_add(name.len()),
            Self::Error { message: data, .. } | Self::Unknown { data, .. } => data.len(),
        }
    }

    /// Bytes the reply takes, header included.
    pub fn encoded_len(&self) -> usize {
        OPTION_REPLY_HEADER_LEN.saturating_add(self.payload_len())
    }

    /// Writes the reply to `option`, header and data, to the front of
    /// `out`. An `Error` whose type lacks bit 31, or data too long for its
    /// length field, is [`WireError::InvalidValue`]. `Unknown` is written as
    /// given, whatever its type.
    pub fn encode(&self, option: OptionCode, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out, self.encoded_len())?;
        let prefix = self.prefix_len();
        self.encode_prefix(option, w.slot(prefix)?)?;
        for tail in self.tails() {
            w.bytes(tail)?;
        }
        Ok(w.finish())
    }

    /// Bytes of the header and the fixed fields before [`tails`](Self::tails).
    pub fn prefix_len(&self) -> usize {
        let tails: usize = self.tails().iter().map(|tail| tail.len()).sum();
        self.encoded_len().saturating_sub(tails)
    }

    /// The strings sent after the prefix as they are, borrowed: name and
    /// details of `Server`, the string of an `Info` name or description,
    /// the context name, an error message or unknown data.
    pub fn tails(&self) -> [&'a [u8]; 2] {
        match *self {
            Self::Ack => [&[], &[]],
            Self::Server { name, details } => [name, details],
            Self::Info(info) => [info.tail(), &[]],
            Self::MetaContext { name, .. } => [name, &[]],
            Self::Error { message: data, .. } | Self::Unknown { data, .. } => [data, &[]],
        }
    }

    /// Writes the header (its length covers the tails) and the fixed
    /// fields to the front of `out`, for a sender that sends the
    /// [`tails`](Self::tails) from where they are. Errors as
    /// [`encode`](Self::encode).
    pub fn encode_prefix(&self, option: OptionCode, out: &mut [u8]) -> Result<usize, WireError> {
        if let Self::Error { reply_type, .. } = self
            && !reply_type.is_error()
        {
            return Err(WireError::InvalidValue("reply type"));
        }
        let length = len_u32(self.payload_len(), "option reply length")?;
        let mut w = Writer::new(out, self.prefix_len())?;
        OptionReplyHeader {
            option,
            reply_type: self.reply_type(),
            length,
        }
        .write(&mut w)?;
        match self {
            Self::Ack | Self::Error { .. } | Self::Unknown { .. } => {}
            Self::Server { name, .. } => w.u32(len_u32(name.len(), "name length")?)?,
            Self::Info(info) => {
                let len = info.prefix_len();
                info.encode_prefix(w.slot(len)?)?;
            }
            Self::MetaContext { id, .. } => w.u32(*id)?,
        }
        Ok(w.finish())
    }
}
