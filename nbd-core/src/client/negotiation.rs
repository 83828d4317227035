//! The handshake and option haggling (spec: "Newstyle negotiation", "Fixed
//! newstyle negotiation", "Option types", "Option reply types", "TLS
//! support", "Metadata querying").
//!
//! The client sends one option at a time and waits for its final reply.
//! Which option comes next follows from the [`Config`](super::Config) and
//! from the server's answers: STARTTLS, extended headers (or structured
//! replies), metadata contexts, then GO (or EXPORT_NAME), INFO or LIST.

use super::connection::{Connection, Phase, Raw, RawInfo, Span};
use super::{ExportInfo, Mode, ProtocolError, TlsPolicy};
use crate::export::{DEFAULT_BLOCK_SIZES, Features, validate_block_sizes};
use crate::wire::{
    BlockSizeConstraints, ExportNameReply, GREETING_LEN, Greeting, HELLO_MAGICS_LEN,
    HandshakeFlags, HelloStyle, Info, OPTION_REPLY_HEADER_LEN, OptionCode, OptionReply,
    OptionReplyHeader, OptionReplyType, ServerHello, TransmissionFlags, WireError,
};

/// An option the client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) enum OptionStep {
    StartTls,
    ExtendedHeaders,
    StructuredReply,
    SetMetaContext,
    ListMetaContext,
    List,
    Info,
    Go,
    ExportName,
    Abort,
}

impl OptionStep {
    pub(super) fn code(self) -> OptionCode {
        match self {
            Self::StartTls => OptionCode::StartTls,
            Self::ExtendedHeaders => OptionCode::ExtendedHeaders,
            Self::StructuredReply => OptionCode::StructuredReply,
            Self::SetMetaContext => OptionCode::SetMetaContext,
            Self::ListMetaContext => OptionCode::ListMetaContext,
            Self::List => OptionCode::List,
            Self::Info => OptionCode::Info,
            Self::Go => OptionCode::Go,
            Self::ExportName => OptionCode::ExportName,
            Self::Abort => OptionCode::Abort,
        }
    }
}

/// Where the reading of the current option's replies stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OptionRead {
    /// An option reply header.
    Header,
    /// Reply data, copied into the buffer after the queries.
    Data {
        header: OptionReplyHeader,
        filled: usize,
    },
    /// Reply data too long for the buffer that can be dropped.
    Skip {
        header: OptionReplyHeader,
        remaining: u32,
    },
    /// The `NBD_OPT_EXPORT_NAME` reply: size and flags.
    ExportName,
    /// The zeroes after it.
    Zeroes { remaining: usize },
}

/// The state of option haggling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Negotiation {
    /// The client flags wait for `poll_transmit`.
    pub(super) send_flags: bool,
    /// The option being negotiated.
    pub(super) current: Option<OptionStep>,
    /// Whether it went out.
    pub(super) sent: bool,
    pub(super) read: OptionRead,
    /// The shell asked to abort.
    pub(super) abort: bool,
    /// `NBD_INFO_EXPORT` of the current GO/INFO.
    info_export: Option<(u64, TransmissionFlags)>,
    /// `NBD_INFO_BLOCK_SIZE` of the current GO/INFO.
    info_sizes: Option<BlockSizeConstraints>,
}

impl Negotiation {
    pub(super) const fn new() -> Self {
        Self {
            send_flags: false,
            current: None,
            sent: false,
            read: OptionRead::Header,
            abort: false,
            info_export: None,
            info_sizes: None,
        }
    }

    /// Whether `NBD_OPT_ABORT` went out.
    pub(super) fn abort_sent(&self) -> bool {
        self.sent && self.current == Some(OptionStep::Abort)
    }

    /// The option that went out and waits for its reply.
    pub(super) fn sent_option(&self) -> Option<OptionCode> {
        self.current.filter(|_| self.sent).map(OptionStep::code)
    }
}

/// An option reply with its strings located in the buffer.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Ack,
    Server { name: Span, description: Span },
    Info(RawInfo),
    MetaContext { id: u32, name: Span },
    Error(OptionReplyType, Span),
    Unknown,
}

pub(super) fn wire_error(error: WireError) -> ProtocolError {
    match error {
        WireError::BadMagic { found } => ProtocolError::BadMagic { found },
        other => ProtocolError::Malformed(other),
    }
}

impl<const REQUESTS: usize, const BUFFER: usize> Connection<REQUESTS, BUFFER> {
    /// The server's greeting: fixed newstyle, or refused.
    pub(super) fn process_greeting(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        let mut used = 0;
        if self.accumulator.len() < HELLO_MAGICS_LEN {
            let (taken, ready) = self.accumulator.fill(input, HELLO_MAGICS_LEN);
            used += taken;
            if !ready {
                return Ok((used, None));
            }
            match ServerHello::parse_style(self.accumulator.bytes())
                .map_err(wire_error)?
                .1
            {
                HelloStyle::Newstyle => {}
                HelloStyle::Oldstyle => {
                    warn!("server uses oldstyle negotiation: refused");
                    return Err(ProtocolError::Oldstyle);
                }
            }
        }
        let (taken, ready) = self.accumulator.fill(&input[used..], GREETING_LEN);
        used += taken;
        if !ready {
            return Ok((used, None));
        }
        let greeting = Greeting::parse(self.accumulator.bytes())
            .map_err(wire_error)?
            .1;
        self.accumulator.clear();
        let flags = greeting.flags;
        if !flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
            warn!("server lacks fixed newstyle negotiation: refused");
            return Err(ProtocolError::NotFixedNewstyle);
        }
        self.no_zeroes = flags.contains(HandshakeFlags::NO_ZEROES);
        debug!("greeting with handshake flags {:?}", flags);
        self.phase = Phase::Negotiating;
        self.negotiation.send_flags = true;
        self.advance(self.first_option());
        Ok((used, Some(Raw::Greeted(flags))))
    }

    /// Option replies (and the `NBD_OPT_EXPORT_NAME` reply).
    pub(super) fn process_option_reply(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        if input.is_empty() {
            return Ok((0, None));
        }
        let Some(step) = self.negotiation.current.filter(|_| self.negotiation.sent) else {
            warn!("server sent data with no option outstanding");
            return Err(ProtocolError::UnsolicitedData);
        };
        let reply_start = self.settings.queries_end;
        match self.negotiation.read {
            OptionRead::Header => {
                let (used, ready) = self.accumulator.fill(input, OPTION_REPLY_HEADER_LEN);
                if !ready {
                    return Ok((used, None));
                }
                let header = OptionReplyHeader::parse(self.accumulator.bytes())
                    .map_err(wire_error)?
                    .1;
                self.accumulator.clear();
                if header.option != step.code() {
                    return Err(ProtocolError::UnexpectedOptionReply {
                        option: header.option,
                    });
                }
                let length = header.length as usize;
                if length == 0 {
                    return Ok((used, self.handle_reply(step, header, None)?));
                }
                self.negotiation.read = if length <= BUFFER - reply_start {
                    OptionRead::Data { header, filled: 0 }
                } else if header.reply_type.is_error() || header.reply_type == OptionReplyType::Info
                {
                    // An error message or an info string: dropped.
                    OptionRead::Skip {
                        header,
                        remaining: header.length,
                    }
                } else {
                    return Err(ProtocolError::ReplyTooLong {
                        length: header.length,
                    });
                };
                Ok((used, None))
            }
            OptionRead::Data { header, filled } => {
                let length = header.length as usize;
                let take = (length - filled).min(input.len());
                let at = reply_start + filled;
                self.buffer[at..at + take].copy_from_slice(&input[..take]);
                if filled + take < length {
                    self.negotiation.read = OptionRead::Data {
                        header,
                        filled: filled + take,
                    };
                    return Ok((take, None));
                }
                Ok((take, self.handle_reply(step, header, Some(length))?))
            }
            OptionRead::Skip { header, remaining } => {
                let take = (remaining as usize).min(input.len());
                let remaining = remaining - take as u32;
                if remaining > 0 {
                    self.negotiation.read = OptionRead::Skip { header, remaining };
                    return Ok((take, None));
                }
                debug!(
                    "dropped {} bytes of {:?} reply",
                    header.length, header.reply_type
                );
                let raw = if header.reply_type.is_error() {
                    self.handle_reply(step, header, None)?
                } else {
                    self.negotiation.read = OptionRead::Header;
                    None
                };
                Ok((take, raw))
            }
            OptionRead::ExportName => {
                let (used, ready) = self.accumulator.fill(input, 10);
                if !ready {
                    return Ok((used, None));
                }
                let reply = ExportNameReply::parse(self.accumulator.bytes(), false)
                    .map_err(wire_error)?
                    .1;
                self.accumulator.clear();
                self.export = Some(self.describe_export(reply.size, reply.flags, None)?);
                if self.no_zeroes {
                    return Ok((used, self.enter_transmission()));
                }
                self.negotiation.read = OptionRead::Zeroes {
                    remaining: crate::wire::EXPORT_NAME_ZEROES,
                };
                Ok((used, None))
            }
            OptionRead::Zeroes { remaining } => {
                let take = remaining.min(input.len());
                if take < remaining {
                    self.negotiation.read = OptionRead::Zeroes {
                        remaining: remaining - take,
                    };
                    return Ok((take, None));
                }
                Ok((take, self.enter_transmission()))
            }
        }
    }

    /// A whole reply: `length` bytes of data at the reply start, or none.
    fn handle_reply(
        &mut self,
        step: OptionStep,
        header: OptionReplyHeader,
        length: Option<usize>,
    ) -> Result<Option<Raw>, ProtocolError> {
        self.negotiation.read = OptionRead::Header;
        let option = step.code();
        let reply = self.locate_reply(header, length)?;
        debug!("option {:?}: reply {:?}", option, header.reply_type);
        match (step, reply) {
            (_, Reply::Error(reply_type, message)) => self.refused(step, reply_type, message),
            (_, Reply::Ack) => self.acknowledged(step),
            (OptionStep::List, Reply::Server { name, description }) => {
                Ok(Some(Raw::ListEntry { name, description }))
            }
            (OptionStep::Info | OptionStep::Go, Reply::Info(info)) => {
                match info {
                    RawInfo::Export { size, flags } => {
                        self.negotiation.info_export = Some((size, flags));
                    }
                    RawInfo::BlockSize(sizes) => self.negotiation.info_sizes = Some(sizes),
                    _ => {}
                }
                Ok(Some(Raw::Info(info)))
            }
            (OptionStep::SetMetaContext, Reply::MetaContext { id, name }) => {
                if self.contexts.contains(&id) {
                    return Err(ProtocolError::DuplicateMetaContext(id));
                }
                self.contexts
                    .push(id)
                    .map_err(|_| ProtocolError::TooManyMetaContexts)?;
                debug!("metadata context {} selected", id);
                Ok(Some(Raw::MetaContext { id, name }))
            }
            (OptionStep::ListMetaContext, Reply::MetaContext { id, name }) => {
                Ok(Some(Raw::MetaContext { id, name }))
            }
            _ => Err(ProtocolError::UnexpectedReplyType {
                option,
                reply_type: header.reply_type,
            }),
        }
    }

    /// Checks a reply's data against its type and locates its strings.
    fn locate_reply(
        &self,
        header: OptionReplyHeader,
        length: Option<usize>,
    ) -> Result<Reply, ProtocolError> {
        let start = self.settings.queries_end;
        let end = start + length.unwrap_or(0);
        let data = self.buffer.get(start..end).unwrap_or(&[]);
        let whole = Span::Buffer(start, end);
        let after = |skip: usize| Span::Buffer((start + skip).min(end), end);
        let bad = ProtocolError::BadOptionReply {
            option: header.option,
        };
        Ok(
            match OptionReply::parse_payload(header.reply_type, data).map_err(|_| bad)? {
                OptionReply::Ack => Reply::Ack,
                OptionReply::Server { name, .. } => Reply::Server {
                    name: Span::Buffer(start + 4, start + 4 + name.len()),
                    description: after(4 + name.len()),
                },
                OptionReply::Info(info) => Reply::Info(match info {
                    Info::Export { size, flags } => RawInfo::Export { size, flags },
                    Info::Name(_) => RawInfo::Name(after(2)),
                    Info::Description(_) => RawInfo::Description(after(2)),
                    Info::BlockSize(sizes) => RawInfo::BlockSize(sizes),
                    Info::Unknown { info_type, .. } => RawInfo::Unknown {
                        info_type,
                        data: after(2),
                    },
                }),
                OptionReply::MetaContext { id, .. } => Reply::MetaContext { id, name: after(4) },
                OptionReply::Error { reply_type, .. } => Reply::Error(reply_type, whole),
                _ => Reply::Unknown,
            },
        )
    }

    fn acknowledged(&mut self, step: OptionStep) -> Result<Option<Raw>, ProtocolError> {
        info!("option {:?} acknowledged", step.code());
        let raw = match step {
            OptionStep::StartTls => {
                // Spec (NBD_OPT_STARTTLS): no negotiation state survives.
                self.tls_active = true;
                self.features = Features::default();
                self.contexts.clear();
                self.advance(self.after_tls());
                Raw::StartTls
            }
            OptionStep::ExtendedHeaders => {
                self.features = Features {
                    structured_replies: true,
                    extended_headers: true,
                };
                self.advance(self.after_features());
                return Ok(None);
            }
            OptionStep::StructuredReply => {
                self.features.structured_replies = true;
                self.advance(self.after_features());
                return Ok(None);
            }
            OptionStep::SetMetaContext | OptionStep::ListMetaContext => {
                self.advance(self.final_option());
                return Ok(None);
            }
            OptionStep::List => {
                self.advance(OptionStep::Abort);
                return Ok(None);
            }
            OptionStep::Info | OptionStep::Go => {
                let (size, flags) = self
                    .negotiation
                    .info_export
                    .ok_or(ProtocolError::MissingExportInfo)?;
                let export = self.describe_export(size, flags, self.negotiation.info_sizes)?;
                self.export = Some(export);
                if step == OptionStep::Go {
                    return Ok(self.enter_transmission());
                }
                self.advance(OptionStep::Abort);
                Raw::Export(export)
            }
            OptionStep::Abort => {
                self.phase = Phase::Closed;
                Raw::Closed
            }
            OptionStep::ExportName => {
                return Err(ProtocolError::UnexpectedReplyType {
                    option: OptionCode::ExportName,
                    reply_type: OptionReplyType::Ack,
                });
            }
        };
        Ok(Some(raw))
    }

    fn refused(
        &mut self,
        step: OptionStep,
        reply_type: OptionReplyType,
        message: Span,
    ) -> Result<Option<Raw>, ProtocolError> {
        let option = step.code();
        info!("option {:?} refused: {:?}", option, reply_type);
        if step == OptionStep::Abort {
            // The spec wants an ACK; the session is over either way.
            self.phase = Phase::Closed;
            return Ok(Some(Raw::Closed));
        }
        if step == OptionStep::Go
            && reply_type == OptionReplyType::ErrUnsupported
            && self.features.extended_headers
        {
            return Err(ProtocolError::GoUnsupported);
        }
        let fatal = reply_type == OptionReplyType::ErrShutdown
            || match step {
                OptionStep::StartTls => self.settings.tls == TlsPolicy::Required,
                OptionStep::List | OptionStep::Info => true,
                OptionStep::Go => reply_type != OptionReplyType::ErrUnsupported,
                _ => false,
            };
        if fatal {
            self.advance(OptionStep::Abort);
            return Ok(Some(Raw::OptionRefused {
                option,
                reply_type,
                message,
            }));
        }
        let next = match step {
            OptionStep::StartTls => self.after_tls(),
            OptionStep::ExtendedHeaders => OptionStep::StructuredReply,
            OptionStep::StructuredReply => self.after_features(),
            OptionStep::SetMetaContext => {
                self.contexts.clear();
                self.final_option()
            }
            OptionStep::ListMetaContext => self.final_option(),
            // NBD_REP_ERR_UNSUP: an old server; EXPORT_NAME cannot fail politely.
            OptionStep::Go => OptionStep::ExportName,
            _ => OptionStep::Abort,
        };
        self.advance(next);
        Ok(None)
    }

    /// Moves to the next option (or to ABORT when the shell asked for it).
    pub(super) fn advance(&mut self, next: OptionStep) {
        let next = if self.negotiation.abort {
            OptionStep::Abort
        } else {
            next
        };
        if matches!(next, OptionStep::Info | OptionStep::Go) {
            self.negotiation.info_export = None;
            self.negotiation.info_sizes = None;
        }
        self.negotiation.current = Some(next);
        self.negotiation.sent = false;
        self.negotiation.read = if next == OptionStep::ExportName {
            OptionRead::ExportName
        } else {
            OptionRead::Header
        };
    }

    fn first_option(&self) -> OptionStep {
        if self.settings.tls != TlsPolicy::Disabled && !self.tls_active {
            OptionStep::StartTls
        } else {
            self.after_tls()
        }
    }

    fn after_tls(&self) -> OptionStep {
        match self.settings.mode {
            Mode::List => OptionStep::List,
            _ if self.settings.extended => OptionStep::ExtendedHeaders,
            _ if self.settings.structured => OptionStep::StructuredReply,
            _ => self.after_features(),
        }
    }

    fn after_features(&self) -> OptionStep {
        match self.settings.mode {
            _ if !self.features.structured_replies => self.final_option(),
            Mode::Go if self.settings.query_count > 0 => OptionStep::SetMetaContext,
            Mode::Info => OptionStep::ListMetaContext,
            _ => self.final_option(),
        }
    }

    fn final_option(&self) -> OptionStep {
        match self.settings.mode {
            Mode::Info => OptionStep::Info,
            _ => OptionStep::Go,
        }
    }

    /// The export as the server described it, checked.
    fn describe_export(
        &self,
        size: u64,
        flags: TransmissionFlags,
        sizes: Option<BlockSizeConstraints>,
    ) -> Result<ExportInfo, ProtocolError> {
        if !flags.contains(TransmissionFlags::HAS_FLAGS) {
            return Err(ProtocolError::BadTransmissionFlags(flags));
        }
        if let Some(sizes) = sizes {
            validate_block_sizes(sizes, size).map_err(|_| ProtocolError::BadBlockSizes(sizes))?;
        }
        info!("export: {} bytes, flags {:?}", size, flags);
        Ok(ExportInfo {
            size,
            flags,
            block_sizes: sizes.unwrap_or(DEFAULT_BLOCK_SIZES),
            block_sizes_advertised: sizes.is_some(),
            features: self.features,
        })
    }

    /// Transmission begins; returns the `Export` event of an
    /// `NBD_OPT_EXPORT_NAME` reply, `Ready` following it.
    fn enter_transmission(&mut self) -> Option<Raw> {
        self.phase = Phase::Transmission;
        self.negotiation.current = None;
        self.negotiation.read = OptionRead::Header;
        self.accumulator.clear();
        if self.negotiation.abort {
            self.ending = super::connection::Ending::Abort;
        }
        info!("transmission begins");
        let export = self.export?;
        self.pending = Some(Raw::Ready);
        Some(Raw::Export(export))
    }

    /// Asks to end the negotiation with `NBD_OPT_ABORT` as soon as the
    /// current option's replies are in.
    pub(super) fn abort_negotiation(&mut self) {
        self.negotiation.abort = true;
        if self.phase == Phase::Negotiating
            && !self.negotiation.sent
            && self.negotiation.current.is_some()
        {
            self.advance(OptionStep::Abort);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_errors_keep_their_reason() {
        assert_eq!(
            wire_error(WireError::BadMagic { found: 7 }),
            ProtocolError::BadMagic { found: 7 }
        );
        assert_eq!(
            wire_error(WireError::BadLength),
            ProtocolError::Malformed(WireError::BadLength)
        );
        assert_eq!(
            wire_error(WireError::InvalidValue("chunk type")),
            ProtocolError::Malformed(WireError::InvalidValue("chunk type"))
        );
    }
}
