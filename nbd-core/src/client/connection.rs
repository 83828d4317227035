//! The connection: its state, the `process` loop, the events it hands out
//! and the accessors of what was negotiated.

use heapless::Vec;

use super::config::Settings;
use super::inflight::{InFlight, RequestId};
use super::negotiation::Negotiation;
use super::replies::Receive;
use super::{
    Config, ConfigError, Descriptors, Event, ExportInfo, MAX_META_CONTEXTS, MIN_REPLY_SPACE,
    ProtocolError, Step,
};
use crate::export::Features;
use crate::shape::Accumulator;
use crate::wire::{
    BlockSizeConstraints, ErrorCode, HandshakeFlags, HeaderStyle, Info, MAX_STRING_LEN,
    MetaContextRequest, OptionCode, OptionReplyType, TransmissionFlags,
};

/// Bytes of encoded headers handed out by `poll_transmit`: an option header
/// and name length (20) and, from [`SECOND_PART`], the info request list
/// (8); or a 32-byte request header.
pub(super) const SCRATCH_BYTES: usize = 40;

/// Where the second encoded part of a message starts in the scratch.
pub(super) const SECOND_PART: usize = 32;

/// Bytes an event borrows: from the caller's input, the connection's
/// buffer, or the accumulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Span {
    Input(usize, usize),
    Buffer(usize, usize),
    Accumulator(usize),
}

/// An `NBD_REP_INFO` payload with its strings as spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RawInfo {
    Export { size: u64, flags: TransmissionFlags },
    Name(Span),
    Description(Span),
    BlockSize(BlockSizeConstraints),
    Unknown { info_type: u16, data: Span },
}

/// An event before its spans are resolved into borrowed slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Raw {
    Greeted(HandshakeFlags),
    StartTls,
    ListEntry {
        name: Span,
        description: Span,
    },
    MetaContext {
        id: u32,
        name: Span,
    },
    Info(RawInfo),
    Export(ExportInfo),
    Ready,
    OptionRefused {
        option: OptionCode,
        reply_type: OptionReplyType,
        message: Span,
    },
    ReadData {
        id: RequestId,
        offset: u64,
        data: Span,
    },
    ReadHole {
        id: RequestId,
        offset: u64,
        length: u64,
    },
    BlockStatus {
        id: RequestId,
        context_id: u32,
        offset: u64,
        descriptors: Span,
    },
    Done {
        id: RequestId,
        result: Result<(), ErrorCode>,
    },
    Closed,
}

impl Raw {
    /// Moves input spans from a sub-slice starting at `base` to the whole input.
    fn shift(self, base: usize) -> Self {
        let shift = |span: Span| match span {
            Span::Input(start, end) => Span::Input(start + base, end + base),
            other => other,
        };
        match self {
            Self::ReadData { id, offset, data } => Self::ReadData {
                id,
                offset,
                data: shift(data),
            },
            Self::BlockStatus {
                id,
                context_id,
                offset,
                descriptors,
            } => Self::BlockStatus {
                id,
                context_id,
                offset,
                descriptors: shift(descriptors),
            },
            other => other,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) enum Phase {
    /// Waiting for the server's greeting.
    Greeting,
    /// Option haggling.
    Negotiating,
    /// Requests and replies.
    Transmission,
    /// The session ended, cleanly or not.
    Closed,
}

/// How the transmission phase ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) enum Ending {
    /// Not asked to.
    Open,
    /// `NBD_CMD_DISC` once every request is answered.
    Disconnect,
    /// `NBD_CMD_DISC` once every queued header is sent.
    Abort,
}

/// One client-side NBD connection.
///
/// `REQUESTS` bounds the requests in flight; `BUFFER` holds the export
/// name, the metadata context queries and one option reply (see the
/// [module docs](super)). Create one per connection with
/// [`Connection::new`]; the server speaks first.
#[derive(Debug)]
pub struct Connection<const REQUESTS: usize = 16, const BUFFER: usize = 1024> {
    pub(super) phase: Phase,
    pub(super) settings: Settings,
    pub(super) negotiation: Negotiation,
    pub(super) features: Features,
    pub(super) tls_active: bool,
    /// Both sides agreed to drop the zeroes after `NBD_OPT_EXPORT_NAME`.
    pub(super) no_zeroes: bool,
    /// Ids of the selected metadata contexts.
    pub(super) contexts: Vec<u32, MAX_META_CONTEXTS>,
    pub(super) export: Option<ExportInfo>,
    pub(super) inflight: InFlight<REQUESTS>,
    pub(super) receive: Receive,
    pub(super) accumulator: Accumulator,
    /// Export name, queries, then option reply data.
    pub(super) buffer: [u8; BUFFER],
    pub(super) scratch: [u8; SCRATCH_BYTES],
    /// An event to hand out before reading more input.
    pub(super) pending: Option<Raw>,
    pub(super) ending: Ending,
    pub(super) disc_sent: bool,
    /// The resize in flight, if any.
    pub(super) resizing: Option<RequestId>,
}

impl<const REQUESTS: usize, const BUFFER: usize> Connection<REQUESTS, BUFFER> {
    /// A connection about to receive the server's greeting. The export name
    /// and queries are copied into the buffer.
    pub fn new(config: Config<'_>) -> Result<Self, ConfigError> {
        let name = config.export_name.as_bytes();
        if name.len() > MAX_STRING_LEN
            || config
                .meta_contexts
                .iter()
                .any(|q| q.len() > MAX_STRING_LEN)
        {
            return Err(ConfigError::StringTooLong);
        }
        let queries = || config.meta_contexts.iter().map(|q| q.as_bytes());
        let queries_end = name.len() + MetaContextRequest::queries_len(queries());
        let needed = queries_end + MIN_REPLY_SPACE;
        if needed > BUFFER {
            return Err(ConfigError::BufferTooSmall { needed });
        }
        let mut buffer = [0; BUFFER];
        buffer[..name.len()].copy_from_slice(name);
        // The room was checked above and each query's length bounded.
        let encoded = MetaContextRequest::encode_queries(queries(), &mut buffer[name.len()..]);
        debug_assert_eq!(encoded, Ok(queries_end - name.len()));
        Ok(Self {
            phase: Phase::Greeting,
            settings: Settings::new(&config, name.len(), queries_end),
            negotiation: Negotiation::new(),
            features: Features::default(),
            tls_active: false,
            no_zeroes: false,
            contexts: Vec::new(),
            export: None,
            inflight: InFlight::new(),
            receive: Receive::Header,
            accumulator: Accumulator::new(),
            buffer,
            scratch: [0; SCRATCH_BYTES],
            pending: None,
            ending: Ending::Open,
            disc_sent: false,
            resizing: None,
        })
    }

    /// Features negotiated so far.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Header style of the transmission phase.
    pub fn header_style(&self) -> HeaderStyle {
        self.features.header_style()
    }

    /// The export, once described ([`Event::Export`]).
    pub fn export(&self) -> Option<ExportInfo> {
        self.export
    }

    /// The export's current size (it changes with a successful resize).
    pub fn export_size(&self) -> Option<u64> {
        self.export.map(|e| e.size)
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> Option<TransmissionFlags> {
        self.export.map(|e| e.flags)
    }

    /// The block size constraints requests honour.
    pub fn block_sizes(&self) -> Option<BlockSizeConstraints> {
        self.export.map(|e| e.block_sizes)
    }

    /// Ids of the metadata contexts selected for block status.
    pub fn meta_contexts(&self) -> &[u32] {
        &self.contexts
    }

    /// Whether TLS was started on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether commands may be issued.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Transmission && self.ending == Ending::Open
    }

    /// Whether the session ended ([`Event::Closed`], or a protocol error).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Requests in flight (queued or sent, not yet done).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// `NBD_CMD_FLUSH` may be sent.
    pub fn can_flush(&self) -> bool {
        self.export.is_some_and(|e| e.can_flush())
    }

    /// `NBD_CMD_FLAG_FUA` may be set.
    pub fn can_fua(&self) -> bool {
        self.export.is_some_and(|e| e.can_fua())
    }

    /// `NBD_CMD_TRIM` may be sent.
    pub fn can_trim(&self) -> bool {
        self.export.is_some_and(|e| e.can_trim())
    }

    /// `NBD_CMD_WRITE_ZEROES` may be sent.
    pub fn can_write_zeroes(&self) -> bool {
        self.export.is_some_and(|e| e.can_write_zeroes())
    }

    /// `NBD_CMD_FLAG_FAST_ZERO` may be set.
    pub fn can_fast_zero(&self) -> bool {
        self.export.is_some_and(|e| e.can_fast_zero())
    }

    /// `NBD_CMD_CACHE` may be sent.
    pub fn can_cache(&self) -> bool {
        self.export.is_some_and(|e| e.can_cache())
    }

    /// `NBD_CMD_RESIZE` may be sent.
    pub fn can_resize(&self) -> bool {
        self.export.is_some_and(|e| e.can_resize())
    }

    /// `NBD_CMD_FLAG_DF` may be set on reads.
    pub fn can_df(&self) -> bool {
        self.export.is_some_and(|e| e.can_df())
    }

    /// `NBD_CMD_BLOCK_STATUS` may be sent: structured replies and at least
    /// one metadata context.
    pub fn can_block_status(&self) -> bool {
        self.features.structured_replies && !self.contexts.is_empty()
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.export.is_some_and(|e| e.is_read_only())
    }

    /// Consumes bytes the server sent; see the [module docs](super).
    ///
    /// Returns an error when the connection must end at once (hard
    /// disconnect); the shell then closes the transport. Once the session
    /// ended, calls return no event, and any byte is an error
    /// ([`ProtocolError::Closed`]). Events borrow the
    /// input (read data, descriptors) or the connection (negotiation
    /// strings) until the next call.
    pub fn process<'a>(&'a mut self, input: &'a [u8]) -> Result<Step<'a>, ProtocolError> {
        match self.process_raw(input) {
            Ok((consumed, raw)) => {
                let event = raw.map(|raw| self.resolve(raw, input));
                Ok(Step { consumed, event })
            }
            Err(error) => {
                if error != ProtocolError::Closed {
                    warn!("protocol error from server: {}", error);
                }
                self.phase = Phase::Closed;
                Err(error)
            }
        }
    }

    fn process_raw(&mut self, input: &[u8]) -> Result<(usize, Option<Raw>), ProtocolError> {
        if let Some(raw) = self.take_event() {
            return Ok((0, Some(raw)));
        }
        if self.phase == Phase::Closed {
            // Nothing may follow the end of the session.
            return if input.is_empty() {
                Ok((0, None))
            } else {
                Err(ProtocolError::Closed)
            };
        }
        let mut consumed = 0;
        loop {
            let rest = &input[consumed..];
            let (used, raw) = match self.phase {
                Phase::Greeting => self.process_greeting(rest)?,
                Phase::Negotiating => self.process_option_reply(rest)?,
                Phase::Transmission => self.process_reply(rest)?,
                Phase::Closed => (0, None),
            };
            let base = consumed;
            consumed += used;
            if let Some(raw) = raw {
                return Ok((consumed, Some(raw.shift(base))));
            }
            if used == 0 {
                break;
            }
        }
        Ok((consumed, self.take_event()))
    }

    /// Events that do not come from input: the second event of one
    /// message, and the end of the session.
    fn take_event(&mut self) -> Option<Raw> {
        if let Some(raw) = self.pending.take() {
            return Some(raw);
        }
        if self.phase == Phase::Transmission && self.disc_sent && self.inflight.is_empty() {
            info!("session over: NBD_CMD_DISC sent, every request answered");
            self.phase = Phase::Closed;
            return Some(Raw::Closed);
        }
        None
    }

    /// Tells the core the server closed the connection. `Ok` when the
    /// session had ended (or was ending with nothing left to receive); the
    /// error otherwise, which the shell reports.
    pub fn end_of_input(&mut self) -> Result<(), ProtocolError> {
        let clean = match self.phase {
            Phase::Closed => true,
            // The spec lets a server close instead of acknowledging ABORT.
            Phase::Negotiating => self.negotiation.abort_sent(),
            Phase::Transmission => self.disc_sent && self.inflight.is_empty(),
            Phase::Greeting => false,
        };
        let export_name_sent = self.phase == Phase::Negotiating
            && self.negotiation.sent_option() == Some(OptionCode::ExportName);
        self.phase = Phase::Closed;
        if clean {
            Ok(())
        } else if export_name_sent {
            warn!("server closed after NBD_OPT_EXPORT_NAME: export refused");
            Err(ProtocolError::ExportRefused)
        } else {
            warn!("server closed the connection with the session unfinished");
            Err(ProtocolError::UnexpectedEof)
        }
    }

    fn span<'a>(&'a self, input: &'a [u8], span: Span) -> &'a [u8] {
        let bytes = match span {
            Span::Input(start, end) => input.get(start..end),
            Span::Buffer(start, end) => self.buffer.get(start..end),
            Span::Accumulator(len) => Some(self.accumulator.held(len)),
        };
        bytes.unwrap_or(&[])
    }

    fn resolve<'a>(&'a self, raw: Raw, input: &'a [u8]) -> Event<'a> {
        let span = |span| self.span(input, span);
        match raw {
            Raw::Greeted(flags) => Event::Greeted { flags },
            Raw::StartTls => Event::StartTls,
            Raw::ListEntry { name, description } => Event::ListEntry {
                name: span(name),
                description: span(description),
            },
            Raw::MetaContext { id, name } => Event::MetaContext {
                id,
                name: span(name),
            },
            Raw::Info(info) => Event::Info(match info {
                RawInfo::Export { size, flags } => Info::Export { size, flags },
                RawInfo::Name(name) => Info::Name(span(name)),
                RawInfo::Description(text) => Info::Description(span(text)),
                RawInfo::BlockSize(sizes) => Info::BlockSize(sizes),
                RawInfo::Unknown { info_type, data } => Info::Unknown {
                    info_type,
                    data: span(data),
                },
            }),
            Raw::Export(info) => Event::Export(info),
            Raw::Ready => Event::Ready,
            Raw::OptionRefused {
                option,
                reply_type,
                message,
            } => Event::OptionRefused {
                option,
                reply_type,
                message: span(message),
            },
            Raw::ReadData { id, offset, data } => Event::ReadData {
                id,
                offset,
                data: span(data),
            },
            Raw::ReadHole { id, offset, length } => Event::ReadHole { id, offset, length },
            Raw::BlockStatus {
                id,
                context_id,
                offset,
                descriptors,
            } => Event::BlockStatus {
                id,
                context_id,
                offset,
                descriptors: Descriptors::new(span(descriptors), self.features.extended_headers),
            },
            Raw::Done { id, result } => Event::Done { id, result },
            Raw::Closed => Event::Closed,
        }
    }
}
