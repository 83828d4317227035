//! Option haggling (spec: "Fixed newstyle negotiation", "Option types",
//! "Option reply types", "TLS support", "Metadata querying").
//!
//! The client sends one option and waits for its final reply, so the
//! connection handles one option at a time: its data is buffered (or, when
//! too long or unwanted, skipped), a decision is taken, and the replies are
//! produced one by one by `poll_transmit` while input waits.

use super::connection::{Connection, Phase, framing_error};
use super::output::{Out, Tail};
use super::transmission::{ActiveExport, Transmission};
use super::{CloseReason, Event, ProtocolError, TlsPolicy};
use crate::export::{Catalog, Features};
use crate::wire::{
    BlockSizeConstraints, ClientFlags, ExportNameReply, Greeting, HandshakeFlags, Info, InfoType,
    OPTION_HEADER_LEN, OptionCode, OptionHeader, OptionReply, OptionReplyType, OptionRequest,
};

/// The only metadata context the core serves.
pub(crate) const BASE_ALLOCATION: &[u8] = b"base:allocation";
/// Its id on every connection (ids are opaque to clients).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// The zero bytes after an `NBD_OPT_EXPORT_NAME` reply.
static EXPORT_NAME_ZEROES: [u8; crate::wire::EXPORT_NAME_ZEROES] =
    [0; crate::wire::EXPORT_NAME_ZEROES];

/// The negotiation phase's own state; only this file changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Negotiation {
    input: OptionInput,
    client_flags: ClientFlags,
    /// Export for which `base:allocation` was selected by the last
    /// `NBD_OPT_SET_META_CONTEXT`.
    meta_export: Option<usize>,
}

impl Negotiation {
    /// A session that just started: the client flags come first.
    pub(super) const fn new() -> Self {
        Self {
            input: OptionInput::ClientFlags,
            client_flags: ClientFlags::empty(),
            meta_export: None,
        }
    }
}

/// What the next input bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OptionInput {
    /// The client flags.
    ClientFlags,
    /// An option header.
    OptionHeader,
    /// `length` bytes of option data, `received` of them in the buffer.
    OptionData {
        code: OptionCode,
        length: usize,
        received: usize,
    },
    /// Option data read past, not buffered; `refusal` answers it.
    OptionSkip {
        code: OptionCode,
        remaining: u32,
        refusal: Refusal,
    },
}

/// How to answer an option whose data is skipped rather than buffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// One error reply.
    Reply {
        reply_type: OptionReplyType,
        message: &'static str,
    },
    /// `NBD_OPT_ABORT` (its data is ignored): acknowledge, then close.
    AbortAck,
}

/// What happens once a single reply was handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) enum AfterReply {
    Continue,
    Close,
    StartTls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InfoStep {
    Export,
    Name,
    Description,
    BlockSize,
    Final,
}

/// Replies still to hand out for the current option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NegotiationOutput {
    Idle,
    /// The `NBD_OPT_STARTTLS` acknowledgement was handed out: nothing more
    /// is sent or read before `process` returns `StartTls`.
    TlsHandover,
    Greeting,
    Reply {
        option: OptionCode,
        reply_type: OptionReplyType,
        message: &'static str,
        then: AfterReply,
    },
    List {
        next: usize,
    },
    Info {
        option: OptionCode,
        export: usize,
        step: InfoStep,
        want_name: bool,
        want_description: bool,
        refuse: bool,
    },
    MetaContext {
        option: OptionCode,
        context: Option<u32>,
    },
    /// The `NBD_OPT_EXPORT_NAME` reply, with its 124 zero bytes unless the
    /// client set `NBD_FLAG_C_NO_ZEROES`.
    ExportName {
        zeroes: bool,
    },
}

impl NegotiationOutput {
    /// Whether the replies of the last option are all out.
    pub(super) fn is_idle(&self) -> bool {
        matches!(self, Self::Idle)
    }

    /// Whether a reply is ready for `poll_transmit`.
    pub(super) fn has_message(&self) -> bool {
        !matches!(self, Self::Idle | Self::TlsHandover)
    }
}

/// What an option asks for, decided from its data.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Action {
    Reply {
        reply_type: OptionReplyType,
        message: &'static str,
        then: AfterReply,
    },
    ExportName {
        export: usize,
    },
    List,
    Info {
        export: usize,
        go: bool,
        want_name: bool,
        want_description: bool,
        want_block_size: bool,
    },
    StructuredReply,
    ExtendedHeaders,
    MetaContext {
        export: usize,
        set: bool,
        matched: bool,
    },
}

const fn reply(reply_type: OptionReplyType, message: &'static str) -> Action {
    Action::Reply {
        reply_type,
        message,
        then: AfterReply::Continue,
    }
}

impl<C: Catalog, const REQUESTS: usize, const BUFFER: usize> Connection<C, REQUESTS, BUFFER> {
    fn negotiation_mut(&mut self) -> Option<&mut Negotiation> {
        match &mut self.phase {
            Phase::Negotiation(negotiation) => Some(negotiation),
            _ => None,
        }
    }

    fn set_option_input(&mut self, input: OptionInput) {
        if let Some(negotiation) = self.negotiation_mut() {
            negotiation.input = input;
        }
    }

    /// Forgets the metadata context selection (spec: it is replaced even
    /// when `NBD_OPT_SET_META_CONTEXT` fails).
    fn clear_meta_context(&mut self, code: OptionCode) {
        if code == OptionCode::SetMetaContext
            && let Some(negotiation) = self.negotiation_mut()
        {
            negotiation.meta_export = None;
        }
    }

    pub(super) fn process_negotiation<'a>(
        &mut self,
        negotiation: Negotiation,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        match negotiation.input {
            OptionInput::ClientFlags => {
                let (used, flags) = match self.header.take_field(input, 4) {
                    (used, Some(bytes)) => (used, Some(ClientFlags::parse(bytes).map(|(_, f)| f))),
                    (used, None) => (used, None),
                };
                if let Some(flags) = flags {
                    self.accept_client_flags(flags.map_err(framing_error)?)?;
                }
                Ok((used, None))
            }
            OptionInput::OptionHeader => {
                let (used, header) = match self.header.take_field(input, OPTION_HEADER_LEN) {
                    (used, Some(bytes)) => (used, Some(OptionHeader::parse(bytes).map(|(_, h)| h))),
                    (used, None) => (used, None),
                };
                if let Some(header) = header {
                    self.begin_option(header.map_err(framing_error)?)?;
                }
                Ok((used, None))
            }
            OptionInput::OptionData {
                code,
                length,
                received,
            } => {
                let take = (length - received).min(input.len());
                self.buffer[received..received + take].copy_from_slice(&input[..take]);
                let received = received + take;
                if received == length {
                    self.set_option_input(OptionInput::OptionHeader);
                    self.handle_option(code, length)?;
                } else {
                    self.set_option_input(OptionInput::OptionData {
                        code,
                        length,
                        received,
                    });
                }
                Ok((take, None))
            }
            OptionInput::OptionSkip {
                code,
                remaining,
                refusal,
            } => {
                let take = (remaining as usize).min(input.len());
                let remaining = remaining - take as u32;
                if remaining == 0 {
                    self.set_option_input(OptionInput::OptionHeader);
                    self.refuse(code, refusal);
                } else {
                    self.set_option_input(OptionInput::OptionSkip {
                        code,
                        remaining,
                        refusal,
                    });
                }
                Ok((take, None))
            }
        }
    }

    /// Client flags, the first thing the client sends.
    fn accept_client_flags(&mut self, flags: ClientFlags) -> Result<(), ProtocolError> {
        if flags.unknown_bits() != 0 {
            warn!(
                "client sent unknown client flags {:#x}",
                flags.unknown_bits()
            );
            return Err(ProtocolError::UnknownClientFlags(flags.unknown_bits()));
        }
        if !flags.contains(ClientFlags::FIXED_NEWSTYLE) && self.config.tls == TlsPolicy::Required {
            // Spec: TLS needs fixed newstyle; without it this server cannot serve.
            return Err(ProtocolError::TlsRequired);
        }
        debug!("client flags {:#x}", flags.bits());
        if let Some(negotiation) = self.negotiation_mut() {
            negotiation.client_flags = flags;
            negotiation.input = OptionInput::OptionHeader;
        }
        Ok(())
    }

    /// The STARTTLS acknowledgement is out: TLS starts, and no negotiation
    /// state survives (spec: `NBD_OPT_STARTTLS`).
    pub(super) fn hand_over_tls(&mut self) -> Event<'static> {
        self.output = NegotiationOutput::Idle;
        self.tls_active = true;
        self.features = Features::default();
        if let Some(negotiation) = self.negotiation_mut() {
            negotiation.meta_export = None;
        }
        info!("TLS hand-over: negotiation state reset");
        Event::StartTls
    }

    /// An option header arrived: decide whether its data is buffered,
    /// skipped, or ends the connection.
    fn begin_option(&mut self, header: OptionHeader) -> Result<(), ProtocolError> {
        let OptionHeader { code, length } = header;
        debug!("option {:?} with {} bytes of data", code, length);
        if length > self.config.max_option_length {
            warn!("option {:?} announces {} bytes: closing", code, length);
            return Err(ProtocolError::OptionTooLong { length });
        }
        let tls_missing = self.config.tls == TlsPolicy::Required && !self.tls_active;
        let refusal = match code {
            OptionCode::ExportName if tls_missing => return Err(ProtocolError::TlsRequired),
            // No error reply exists for EXPORT_NAME: a name that cannot be
            // buffered names no export this connection can serve.
            OptionCode::ExportName if length as usize > BUFFER => {
                return Err(ProtocolError::UnknownExport);
            }
            OptionCode::StartTls | OptionCode::Abort => None,
            _ if tls_missing => Some(Refusal::Reply {
                reply_type: OptionReplyType::ErrTlsRequired,
                message: "this server requires TLS: send NBD_OPT_STARTTLS first",
            }),
            _ => None,
        };
        let refusal = refusal.or_else(|| self.refusal_without_data(code, length));
        match refusal {
            Some(refusal) if length == 0 => self.refuse(code, refusal),
            Some(refusal) => self.set_option_input(OptionInput::OptionSkip {
                code,
                remaining: length,
                refusal,
            }),
            None if length == 0 => self.handle_option(code, 0)?,
            None => self.set_option_input(OptionInput::OptionData {
                code,
                length: length as usize,
                received: 0,
            }),
        }
        Ok(())
    }

    /// Options answered without reading their data: unknown options, and
    /// data too long for the buffer. (During shutdown no option is read:
    /// the session closes.)
    fn refusal_without_data(&self, code: OptionCode, length: u32) -> Option<Refusal> {
        match code {
            OptionCode::Unknown(_) | OptionCode::PeekExport => Some(Refusal::Reply {
                reply_type: OptionReplyType::ErrUnsupported,
                message: "option not supported by this server",
            }),
            _ if (length as usize) <= BUFFER => None,
            OptionCode::Abort => Some(Refusal::AbortAck),
            OptionCode::List
            | OptionCode::StartTls
            | OptionCode::StructuredReply
            | OptionCode::ExtendedHeaders => Some(Refusal::Reply {
                reply_type: OptionReplyType::ErrInvalid,
                message: "option takes no data",
            }),
            _ => Some(Refusal::Reply {
                reply_type: OptionReplyType::ErrTooBig,
                message: "option data longer than this server accepts",
            }),
        }
    }

    fn refuse(&mut self, code: OptionCode, refusal: Refusal) {
        self.clear_meta_context(code);
        self.output = match refusal {
            Refusal::Reply {
                reply_type,
                message,
            } => {
                debug!("option {:?} refused: {}", code, message);
                NegotiationOutput::Reply {
                    option: code,
                    reply_type,
                    message,
                    then: AfterReply::Continue,
                }
            }
            Refusal::AbortAck => NegotiationOutput::Reply {
                option: code,
                reply_type: OptionReplyType::Ack,
                message: "",
                then: AfterReply::Close,
            },
        };
    }

    /// The option's data (`length` bytes at the front of the buffer) is in.
    fn handle_option(&mut self, code: OptionCode, length: usize) -> Result<(), ProtocolError> {
        self.clear_meta_context(code);
        let Phase::Negotiation(negotiation) = self.phase else {
            return Ok(());
        };
        let action = self.decide(negotiation.client_flags, code, length)?;
        self.apply(negotiation, code, action);
        Ok(())
    }

    fn decide(
        &self,
        client_flags: ClientFlags,
        code: OptionCode,
        length: usize,
    ) -> Result<Action, ProtocolError> {
        use OptionReplyType as R;
        let data = &self.buffer[..length];
        let Ok(request) = OptionRequest::parse_payload(code, data) else {
            if code == OptionCode::ExportName {
                return Err(ProtocolError::UnknownExport);
            }
            return Ok(reply(R::ErrInvalid, "malformed option data"));
        };
        let structured = self.features.structured_replies;
        Ok(match request {
            OptionRequest::ExportName { name } => {
                let export = self
                    .catalog
                    .find(name)
                    .ok_or(ProtocolError::UnknownExport)?;
                if self.features.extended_headers {
                    return Err(ProtocolError::ExportNameWithExtendedHeaders);
                }
                Action::ExportName { export }
            }
            OptionRequest::Abort => Action::Reply {
                reply_type: R::Ack,
                message: "",
                then: AfterReply::Close,
            },
            OptionRequest::List if !self.catalog.listable() => {
                reply(R::ErrPolicy, "export listing is disabled")
            }
            OptionRequest::List => Action::List,
            OptionRequest::StartTls if self.tls_active => {
                reply(R::ErrInvalid, "TLS is already active")
            }
            OptionRequest::StartTls
                if self.config.tls == TlsPolicy::Disabled
                    || !client_flags.contains(ClientFlags::FIXED_NEWSTYLE) =>
            {
                reply(R::ErrPolicy, "TLS is not available on this server")
            }
            OptionRequest::StartTls => Action::Reply {
                reply_type: R::Ack,
                message: "",
                then: AfterReply::StartTls,
            },
            OptionRequest::Info(info) | OptionRequest::Go(info) => {
                let Some(export) = self.catalog.find(info.name) else {
                    return Ok(reply(R::ErrUnknownExport, "no such export"));
                };
                let wants = |wanted: InfoType| info.info_types().any(|t| t == wanted);
                Action::Info {
                    export,
                    go: code == OptionCode::Go,
                    want_name: wants(InfoType::Name),
                    want_description: wants(InfoType::Description),
                    want_block_size: wants(InfoType::BlockSize),
                }
            }
            OptionRequest::StructuredReply if self.features.extended_headers => reply(
                R::ErrExtendedHeaderRequired,
                "extended headers are already negotiated",
            ),
            OptionRequest::StructuredReply => Action::StructuredReply,
            OptionRequest::ExtendedHeaders => Action::ExtendedHeaders,
            OptionRequest::ListMetaContext(_) | OptionRequest::SetMetaContext(_) if !structured => {
                reply(
                    R::ErrInvalid,
                    "negotiate structured replies before metadata contexts",
                )
            }
            OptionRequest::ListMetaContext(request) | OptionRequest::SetMetaContext(request) => {
                let set = code == OptionCode::SetMetaContext;
                let Some(export) = self.catalog.find(request.export_name) else {
                    return Ok(reply(R::ErrUnknownExport, "no such export"));
                };
                let mut matched = false;
                for query in request.queries.iter() {
                    if query.len() > crate::wire::MAX_STRING_LEN {
                        return Ok(reply(R::ErrTooBig, "metadata context query too long"));
                    }
                    if !query.contains(&b':') {
                        return Ok(reply(
                            R::ErrInvalid,
                            "query must start with a namespace and a colon",
                        ));
                    }
                    // `base:` is a wildcard when listing and is ignored when setting.
                    matched |= query == BASE_ALLOCATION || (!set && query == b"base:");
                }
                let supported = self
                    .catalog
                    .get(export)
                    .is_some_and(|e| e.capabilities.block_status);
                let matched = supported && (matched || (!set && request.queries.is_empty()));
                Action::MetaContext {
                    export,
                    set,
                    matched,
                }
            }
            OptionRequest::Unknown { .. } => {
                reply(R::ErrUnsupported, "option not supported by this server")
            }
        })
    }

    fn apply(&mut self, negotiation: Negotiation, option: OptionCode, action: Action) {
        info!("option {:?}: {:?}", option, action);
        self.output = match action {
            Action::Reply {
                reply_type,
                message,
                then,
            } => {
                if reply_type.is_error() {
                    debug!("option {:?} refused: {}", option, message);
                }
                NegotiationOutput::Reply {
                    option,
                    reply_type,
                    message,
                    then,
                }
            }
            Action::ExportName { export } => {
                self.select_export(negotiation, export, false);
                NegotiationOutput::ExportName {
                    zeroes: !negotiation.client_flags.contains(ClientFlags::NO_ZEROES),
                }
            }
            Action::List => NegotiationOutput::List { next: 0 },
            Action::Info {
                export,
                go,
                want_name,
                want_description,
                want_block_size,
            } => {
                let minimum_above_one = self
                    .catalog
                    .get(export)
                    .is_some_and(|e| e.block_sizes.minimum > 1);
                let refuse = go
                    && self.config.require_block_size_request
                    && minimum_above_one
                    && !want_block_size;
                if go && !refuse {
                    self.select_export(negotiation, export, want_block_size);
                }
                NegotiationOutput::Info {
                    option,
                    export,
                    step: InfoStep::Export,
                    want_name,
                    want_description,
                    refuse,
                }
            }
            Action::StructuredReply => {
                self.features.structured_replies = true;
                debug!("structured replies negotiated");
                NegotiationOutput::Reply {
                    option,
                    reply_type: OptionReplyType::Ack,
                    message: "",
                    then: AfterReply::Continue,
                }
            }
            Action::ExtendedHeaders => {
                self.features.structured_replies = true;
                self.features.extended_headers = true;
                debug!("extended headers negotiated");
                NegotiationOutput::Reply {
                    option,
                    reply_type: OptionReplyType::Ack,
                    message: "",
                    then: AfterReply::Continue,
                }
            }
            Action::MetaContext {
                export,
                set,
                matched,
            } => {
                if set
                    && matched
                    && let Some(negotiation) = self.negotiation_mut()
                {
                    negotiation.meta_export = Some(export);
                    debug!("metadata context base:allocation selected");
                }
                NegotiationOutput::MetaContext {
                    option,
                    context: matched.then_some(if set { BASE_ALLOCATION_ID } else { 0 }),
                }
            }
        };
    }

    /// Enters transmission on `export` once the current replies are out.
    /// `block_sizes_requested`: the client asked for `NBD_INFO_BLOCK_SIZE`,
    /// so it knows the advertised maximum and is held to it.
    fn select_export(
        &mut self,
        negotiation: Negotiation,
        index: usize,
        block_sizes_requested: bool,
    ) {
        let Some(export) = self.catalog.get(index) else {
            return;
        };
        let flags = export.transmission_flags(self.features);
        debug!(
            "export {} selected: {} bytes, flags {:?}",
            index, export.size, flags
        );
        self.export = Some(ActiveExport {
            index,
            size: export.size,
            flags,
            block_sizes: export.block_sizes,
            max_request_length: if block_sizes_requested {
                export.block_sizes.maximum
            } else {
                export
                    .block_sizes
                    .maximum
                    .max(self.config.max_request_length)
            },
            read_only: export.read_only,
            meta_selected: self.features.structured_replies
                && negotiation.meta_export == Some(index),
        });
        self.phase = Phase::Transmission(Transmission::new());
        self.header.clear();
    }

    /// The next negotiation message, if any.
    pub(super) fn next_negotiation_output(&mut self) -> Option<Out> {
        let (out, next) = match self.output {
            NegotiationOutput::Idle | NegotiationOutput::TlsHandover => return None,
            NegotiationOutput::Greeting => {
                let greeting = Greeting {
                    flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
                };
                (
                    self.head(|out| greeting.encode(out)),
                    NegotiationOutput::Idle,
                )
            }
            NegotiationOutput::Reply {
                option,
                reply_type,
                message,
                then,
            } => {
                let reply = if reply_type.is_error() {
                    OptionReply::Error {
                        reply_type,
                        message: message.as_bytes(),
                    }
                } else {
                    // The only non-error reply sent this way carries no data.
                    debug_assert!(reply_type == OptionReplyType::Ack && message.is_empty());
                    OptionReply::Ack
                };
                let tails = [Tail::Static(message.as_bytes()), Tail::Empty];
                let out = option_reply(&mut self.scratch, option, &reply, tails);
                let next = match then {
                    AfterReply::Continue => NegotiationOutput::Idle,
                    AfterReply::Close => {
                        self.phase = Phase::Closing(CloseReason::Abort);
                        NegotiationOutput::Idle
                    }
                    AfterReply::StartTls => NegotiationOutput::TlsHandover,
                };
                (out, next)
            }
            NegotiationOutput::List { next } => match self.catalog.get(next) {
                Some(export) => {
                    let reply = OptionReply::Server {
                        name: export.name.as_bytes(),
                        details: export.description.as_bytes(),
                    };
                    let tails = [Tail::ExportName(next), Tail::ExportDescription(next)];
                    let out = option_reply(&mut self.scratch, OptionCode::List, &reply, tails);
                    (out, NegotiationOutput::List { next: next + 1 })
                }
                None => (self.ack(OptionCode::List), NegotiationOutput::Idle),
            },
            NegotiationOutput::Info {
                option,
                export,
                step,
                want_name,
                want_description,
                refuse,
            } => {
                let next_step = |step| NegotiationOutput::Info {
                    option,
                    export,
                    step,
                    want_name,
                    want_description,
                    refuse,
                };
                let entry = self.catalog.get(export);
                match step {
                    InfoStep::Export => {
                        let (size, flags) = entry
                            .map(|e| (e.size, e.transmission_flags(self.features)))
                            .unwrap_or_default();
                        let reply = OptionReply::Info(Info::Export { size, flags });
                        let out = option_reply(&mut self.scratch, option, &reply, [Tail::Empty; 2]);
                        (out, next_step(InfoStep::Name))
                    }
                    InfoStep::Name if want_name => {
                        let name = entry.map_or(&[][..], |e| e.name.as_bytes());
                        let reply = OptionReply::Info(Info::Name(name));
                        let tails = [Tail::ExportName(export), Tail::Empty];
                        let out = option_reply(&mut self.scratch, option, &reply, tails);
                        (out, next_step(InfoStep::Description))
                    }
                    InfoStep::Description
                        if want_description && entry.is_some_and(|e| !e.description.is_empty()) =>
                    {
                        let description = entry.map_or(&[][..], |e| e.description.as_bytes());
                        let reply = OptionReply::Info(Info::Description(description));
                        let tails = [Tail::ExportDescription(export), Tail::Empty];
                        let out = option_reply(&mut self.scratch, option, &reply, tails);
                        (out, next_step(InfoStep::BlockSize))
                    }
                    InfoStep::Name => return self.advance_info(next_step(InfoStep::Description)),
                    InfoStep::Description => {
                        return self.advance_info(next_step(InfoStep::BlockSize));
                    }
                    InfoStep::BlockSize => {
                        // Always sent: it costs 34 bytes and tells every client
                        // the constraints this server enforces.
                        let sizes: BlockSizeConstraints =
                            entry.map_or(crate::export::DEFAULT_BLOCK_SIZES, |e| e.block_sizes);
                        let reply = OptionReply::Info(Info::BlockSize(sizes));
                        let out = option_reply(&mut self.scratch, option, &reply, [Tail::Empty; 2]);
                        (out, next_step(InfoStep::Final))
                    }
                    InfoStep::Final if refuse => {
                        let message =
                            "request NBD_INFO_BLOCK_SIZE: this export needs aligned requests";
                        let reply = OptionReply::Error {
                            reply_type: OptionReplyType::ErrBlockSizeRequired,
                            message: message.as_bytes(),
                        };
                        let tails = [Tail::Static(message.as_bytes()), Tail::Empty];
                        let out = option_reply(&mut self.scratch, option, &reply, tails);
                        (out, NegotiationOutput::Idle)
                    }
                    InfoStep::Final => (self.ack(option), NegotiationOutput::Idle),
                }
            }
            NegotiationOutput::MetaContext {
                option,
                context: Some(id),
            } => {
                let reply = OptionReply::MetaContext {
                    id,
                    name: BASE_ALLOCATION,
                };
                let tails = [Tail::Static(BASE_ALLOCATION), Tail::Empty];
                let out = option_reply(&mut self.scratch, option, &reply, tails);
                (
                    out,
                    NegotiationOutput::MetaContext {
                        option,
                        context: None,
                    },
                )
            }
            NegotiationOutput::MetaContext {
                option,
                context: None,
            } => (self.ack(option), NegotiationOutput::Idle),
            NegotiationOutput::ExportName { zeroes } => {
                let size = self.export.map_or(0, |e| e.size);
                let flags = self
                    .export
                    .map_or(crate::wire::TransmissionFlags::HAS_FLAGS, |e| e.flags);
                let reply = ExportNameReply {
                    size,
                    flags,
                    zeroes: false,
                };
                let mut out = self.head(|out| reply.encode(out));
                if zeroes {
                    out.tails[0] = Tail::Static(&EXPORT_NAME_ZEROES);
                }
                (out, NegotiationOutput::Idle)
            }
        };
        self.output = next;
        Some(out)
    }

    fn advance_info(&mut self, next: NegotiationOutput) -> Option<Out> {
        self.output = next;
        self.next_negotiation_output()
    }

    fn ack(&mut self, option: OptionCode) -> Out {
        option_reply(
            &mut self.scratch,
            option,
            &OptionReply::Ack,
            [Tail::Empty; 2],
        )
    }
}

/// Encodes the header and fixed fields of `reply` into the scratch; `tails`
/// name where the strings of [`OptionReply::tails`] stay until sent.
fn option_reply(
    scratch: &mut [u8],
    option: OptionCode,
    reply: &OptionReply<'_>,
    tails: [Tail; 2],
) -> Out {
    let mut out = Out::encode_head(scratch, |out| reply.encode_prefix(option, out));
    out.tails = tails;
    out
}
