//! Test harness for whole client–server conversations.
//!
//! A [`Harness`] owns a server [`Connection`] over a leaked `'static`
//! catalog and a fake storage (one `Vec<u8>` per export). It plays the part
//! of a shell: [`Harness::send`] feeds client bytes to `process` until
//! nothing more happens, records every event, answers storage requests
//! (automatically, in arrival order, or holds them for the test to complete
//! in any order), and [`Harness::received`] returns the bytes the server
//! sent, payloads included.
//!
//! The client side is plain byte building with the wire encoders
//! ([`client_flags`], [`option`], [`go`], [`request`], …) and the server
//! side is split back into messages with the wire parsers
//! ([`option_replies`], [`replies`]). Expected bytes of fixed messages are
//! written out independently of the encoders ([`expected_option_reply`],
//! [`GREETING`]) so the encoders are checked too.

#![allow(dead_code)] // Every test file uses a different part of the harness.

use std::collections::HashMap;

use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{
    CloseReason, CompletionError, Config, Connection, Event, Payload, ProtocolError, ReadOutcome,
    Request, RequestId,
};
use nbd_core::wire::{
    BlockSizeConstraints, Chunk, ChunkHeader, ClientFlags, Command, CommandFlags, ErrorCode,
    ExtDescriptor, HeaderStyle, InfoRequest, InfoType, MetaContextRequest, OptionCode,
    OptionHeader, OptionReply, OptionReplyHeader, OptionReplyType, OptionRequest, ReplyFlags,
    ReplyHeader, RequestHeader, WireList,
};

pub use nbd_core::export::Features;

/// The catalog type every harness connection serves.
pub type Catalog = &'static [Export<'static>];

/// The newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, FIXED_NEWSTYLE | NO_ZEROES.
pub const GREETING: [u8; 18] = [
    0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, // NBDMAGIC
    0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
    0x00, 0x03, // handshake flags
];

/// Option reply magic, written out by hand.
pub const OPTION_REPLY_MAGIC: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];

/// Client flags a modern client sends.
pub const MODERN: ClientFlags =
    ClientFlags(ClientFlags::FIXED_NEWSTYLE.0 | ClientFlags::NO_ZEROES.0);

/// Largest export the harness keeps storage for.
pub const MAX_STORAGE: u64 = 64 << 20;

/// Granularity of the extents the harness reports for block status.
pub const EXTENT_GRANULARITY: usize = 512;

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// An [`Event`] with its borrowed write data copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    /// `Event::ExportSelected`
    ExportSelected {
        index: usize,
        size: u64,
        flags: u16,
        features: Features,
    },
    /// `Event::StartTls`
    StartTls,
    /// `Event::Request`
    Request(Request),
    /// `Event::WriteData`
    WriteData {
        id: RequestId,
        offset: u64,
        data: Vec<u8>,
        remaining: u64,
    },
    /// `Event::Closed`
    Close(CloseReason),
}

impl Ev {
    fn from_event(event: Event<'_>) -> Self {
        match event {
            Event::ExportSelected {
                index,
                size,
                flags,
                features,
            } => Self::ExportSelected {
                index,
                size,
                flags: flags.bits(),
                features,
            },
            Event::StartTls => Self::StartTls,
            Event::Request(request) => Self::Request(request),
            Event::WriteData {
                id,
                offset,
                data,
                remaining,
            } => Self::WriteData {
                id,
                offset,
                data: data.to_vec(),
                remaining,
            },
            Event::Closed(reason) => Self::Close(reason),
            other => panic!("event the harness does not know: {other:?}"),
        }
    }

    /// The request, if this is one.
    pub fn request(&self) -> Option<Request> {
        match self {
            Self::Request(request) => Some(*request),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

/// A server connection, its fake storage, and a shell's driving loop.
#[derive(Debug)]
pub struct Harness<const REQUESTS: usize = 16, const BUFFER: usize = 4096> {
    /// The connection under test.
    pub conn: Connection<Catalog, REQUESTS, BUFFER>,
    /// The catalog.
    pub exports: Catalog,
    /// One storage per export, filled with [`pattern`] at the start.
    pub storage: Vec<Vec<u8>>,
    /// Answer storage requests as they come (reads with [`ReadOutcome::Data`],
    /// writes once their payload is whole, block status from the storage).
    /// When false, requests are kept in [`held`](Self::held).
    pub auto_complete: bool,
    /// When `process` stalls with input left or a close pending, take what
    /// the server wants to send (into the received bytes) and go on, as a
    /// shell that writes between reads does. When false, the test polls
    /// with [`received`](Self::received) itself.
    pub auto_transmit: bool,
    /// Every event, in order.
    pub events: Vec<Ev>,
    /// Requests waiting for the test (when `auto_complete` is off).
    pub held: Vec<Request>,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Read data captured at completion: id bits → (offset, bytes).
    reads: HashMap<u32, (u64, Vec<u8>)>,
    selected: Option<usize>,
}

/// The byte at `offset` of export `index` when the harness starts: never
/// zero, so block status sees data until something writes zeroes.
pub fn pattern(index: usize, offset: usize) -> u8 {
    ((offset * 7 + index * 13) % 251) as u8 + 1
}

/// Leaks `exports` into a `'static` catalog.
pub fn catalog(exports: Vec<Export<'static>>) -> Catalog {
    Box::leak(exports.into_boxed_slice())
}

/// A 1 MiB export with every optional command and default block sizes.
pub fn full_export(name: &'static str) -> Export<'static> {
    Export::new(name, 1 << 20).with_capabilities(Capabilities {
        rotational: false,
        ..Capabilities::ALL
    })
}

impl<const REQUESTS: usize, const BUFFER: usize> Harness<REQUESTS, BUFFER> {
    /// A fresh connection over `exports`, greeting not yet taken.
    pub fn new(exports: Vec<Export<'static>>, config: Config) -> Self {
        let exports = catalog(exports);
        // Exports too big to hold get no storage: tests using them answer
        // requests by hand.
        let storage = exports
            .iter()
            .enumerate()
            .map(|(index, e)| match e.size {
                size if size <= MAX_STORAGE => {
                    (0..size as usize).map(|o| pattern(index, o)).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        Self {
            conn: Connection::new(exports, config),
            exports,
            storage,
            auto_complete: true,
            auto_transmit: true,
            events: Vec::new(),
            held: Vec::new(),
            input: Vec::new(),
            output: Vec::new(),
            reads: HashMap::new(),
            selected: None,
        }
    }

    /// Feeds `bytes` (after any input left over from earlier calls) and
    /// drives the connection until nothing more happens. Panics on a
    /// protocol error.
    pub fn send(&mut self, bytes: &[u8]) {
        if let Err(error) = self.try_send(bytes) {
            panic!("unexpected protocol error: {error:?}");
        }
    }

    /// Drives the connection without new input.
    pub fn pump(&mut self) {
        self.send(&[]);
    }

    /// As [`send`](Self::send), returning the protocol error.
    pub fn try_send(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.conn.is_closed() && !bytes.is_empty() {
            // Input after the end is an error the test may want to see.
            return self.conn.process(bytes).map(drop);
        }
        self.input.extend_from_slice(bytes);
        loop {
            if self.conn.is_closed() {
                return Ok(());
            }
            let step = self.conn.process(&self.input)?;
            let consumed = step.consumed;
            assert!(consumed <= self.input.len(), "consumed more than given");
            let event = step.event.map(Ev::from_event);
            self.input.drain(..consumed);
            match event {
                Some(event) => self.handle(event),
                None if self.auto_transmit && self.drain_transmit() => {}
                None => return Ok(()),
            }
        }
    }

    /// Feeds `bytes` one byte at a time.
    pub fn send_bytewise(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.send(core::slice::from_ref(byte));
        }
    }

    /// Feeds `bytes` in pieces of 1 to `max_piece` bytes chosen by a small
    /// deterministic generator seeded with `seed`.
    pub fn send_in_pieces(&mut self, bytes: &[u8], seed: u64, max_piece: usize) {
        for piece in pieces(bytes, seed, max_piece) {
            self.send(piece);
        }
    }

    /// Input given but not consumed yet (back-pressure).
    pub fn pending_input(&self) -> usize {
        self.input.len()
    }

    /// Everything the server sent since the last call, payloads included.
    pub fn received(&mut self) -> Vec<u8> {
        self.drain_transmit();
        core::mem::take(&mut self.output)
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<Ev> {
        core::mem::take(&mut self.events)
    }

    /// The storage requests among the recorded events, ids zeroed
    /// ([`anonymous`]).
    pub fn anonymous_requests(&self) -> Vec<Request> {
        self.events
            .iter()
            .filter_map(Ev::request)
            .map(anonymous)
            .collect()
    }

    /// The held requests since the last call.
    pub fn take_held(&mut self) -> Vec<Request> {
        core::mem::take(&mut self.held)
    }

    /// The one held request; panics unless exactly one is held.
    pub fn take_one_held(&mut self) -> Request {
        let held = self.take_held();
        assert_eq!(held.len(), 1, "expected one held request, got {held:?}");
        held[0]
    }

    /// Index of the export selected for transmission.
    pub fn selected(&self) -> usize {
        self.selected.expect("no export selected")
    }

    /// Storage of the selected export.
    pub fn disk(&self) -> &[u8] {
        &self.storage[self.selected()]
    }

    /// Mutable storage of the selected export.
    pub fn disk_mut(&mut self) -> &mut Vec<u8> {
        let index = self.selected();
        &mut self.storage[index]
    }

    /// Header style of the connection.
    pub fn style(&self) -> HeaderStyle {
        self.conn.header_style()
    }

    fn handle(&mut self, event: Ev) {
        self.events.push(event.clone());
        match event {
            Ev::ExportSelected { index, size, .. } => {
                self.selected = Some(index);
                if size <= MAX_STORAGE {
                    assert_eq!(self.storage[index].len() as u64, size, "export size");
                }
            }
            Ev::Request(request) if self.auto_complete => self.answer(request),
            Ev::Request(request) => self.held.push(request),
            Ev::WriteData {
                id,
                offset,
                data,
                remaining,
            } => {
                let start = offset as usize;
                self.disk_mut()[start..start + data.len()].copy_from_slice(&data);
                if remaining == 0 && self.auto_complete {
                    self.conn.complete(id, Ok(())).expect("complete write");
                }
            }
            Ev::StartTls | Ev::Close(_) => {}
        }
    }

    /// Answers `request` as a well-behaved storage.
    pub fn answer(&mut self, request: Request) {
        let result = match request {
            Request::Read { id, .. } => self.complete_read(id, ReadOutcome::Data),
            Request::Write { .. } => Ok(()),
            Request::Flush { id } | Request::Cache { id, .. } => self.conn.complete(id, Ok(())),
            Request::Trim {
                id, offset, length, ..
            }
            | Request::WriteZeroes {
                id, offset, length, ..
            } => {
                self.disk_mut()[offset as usize..(offset + length) as usize].fill(0);
                self.conn.complete(id, Ok(()))
            }
            Request::BlockStatus { id, offset, .. } => {
                let extents = self.extents(offset);
                self.conn.complete_block_status(id, &extents)
            }
            Request::Resize { id, size } => {
                self.disk_mut().resize(size as usize, 0);
                self.conn.complete(id, Ok(()))
            }
            other => panic!("request the harness does not know: {other:?}"),
        };
        result.expect("automatic completion refused");
    }

    /// `complete_read`, capturing the read's data from storage first when
    /// the outcome sends data.
    pub fn complete_read(
        &mut self,
        id: RequestId,
        outcome: ReadOutcome,
    ) -> Result<(), CompletionError> {
        self.capture(id, outcome);
        self.conn.complete_read(id, outcome)
    }

    /// `complete`, capturing a read's data from storage on success.
    pub fn complete(
        &mut self,
        id: RequestId,
        result: Result<(), ErrorCode>,
    ) -> Result<(), CompletionError> {
        if result.is_ok() {
            self.capture(id, ReadOutcome::Data);
        }
        self.conn.complete(id, result)
    }

    fn capture(&mut self, id: RequestId, outcome: ReadOutcome) {
        if !matches!(outcome, ReadOutcome::Data | ReadOutcome::Streamed) {
            return;
        }
        // Find the read among the events to know its range.
        let range = self.events.iter().rev().find_map(|e| match e {
            Ev::Request(Request::Read {
                id: read,
                offset,
                length,
            }) if *read == id => Some((*offset, *length)),
            _ => None,
        });
        if let Some((offset, length)) = range {
            let data = self.disk()[offset as usize..(offset + length) as usize].to_vec();
            self.reads.insert(id.to_bits(), (offset, data));
        }
    }

    /// Extents of the selected export from `offset` to its end: runs of
    /// [`EXTENT_GRANULARITY`]-byte blocks that are all zero (status
    /// HOLE | ZERO = 3) or not (status 0).
    pub fn extents(&self, offset: u64) -> Vec<ExtDescriptor> {
        let disk = self.disk();
        let mut extents: Vec<ExtDescriptor> = Vec::new();
        let mut at = offset as usize;
        while at < disk.len() {
            let end = ((at / EXTENT_GRANULARITY + 1) * EXTENT_GRANULARITY).min(disk.len());
            let status = if disk[at..end].iter().all(|&b| b == 0) {
                3
            } else {
                0
            };
            match extents.last_mut() {
                Some(last) if last.status == status => last.length += (end - at) as u64,
                _ => extents.push(ExtDescriptor {
                    length: (end - at) as u64,
                    status,
                }),
            }
            at = end;
        }
        extents
    }

    /// Takes every message the server wants to send; whether there was any.
    fn drain_transmit(&mut self) -> bool {
        let mut any = false;
        while let Some(transmit) = self.conn.poll_transmit() {
            any = true;
            for part in transmit.parts {
                self.output.extend_from_slice(part);
            }
            match transmit.payload {
                Some(Payload::Data { id, offset, length }) => {
                    let (read_offset, data) = self
                        .reads
                        .remove(&id.to_bits())
                        .expect("payload of a read the harness did not complete with data");
                    assert_eq!(read_offset, offset, "payload offset");
                    assert_eq!(data.len() as u64, length, "payload length");
                    self.output.extend_from_slice(&data);
                }
                Some(Payload::Zeroes { length }) => {
                    self.output.resize(self.output.len() + length as usize, 0);
                }
                None => {}
            }
        }
        any
    }

    // -- Conversation steps -------------------------------------------------

    /// Checks the greeting and sends client flags.
    pub fn start(&mut self, flags: ClientFlags) {
        assert_eq!(self.received(), GREETING, "greeting");
        self.send(&client_flags(flags));
    }

    /// Sends one option and returns the replies it got.
    pub fn option(&mut self, bytes: &[u8]) -> Vec<OptReply> {
        self.send(bytes);
        option_replies(&self.received())
    }

    /// Sends one option that must be answered with a lone `NBD_REP_ACK`.
    pub fn option_ack(&mut self, bytes: &[u8]) {
        let replies = self.option(bytes);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].reply_type, OptionReplyType::Ack, "{replies:?}");
    }

    /// Negotiates structured replies.
    pub fn structured_replies(&mut self) {
        self.option_ack(&option(OptionCode::StructuredReply, &[]));
    }

    /// Negotiates extended headers.
    pub fn extended_headers(&mut self) {
        self.option_ack(&option(OptionCode::ExtendedHeaders, &[]));
    }

    /// Selects `base:allocation` on `export`; returns its context id.
    pub fn set_base_allocation(&mut self, export: &str) -> u32 {
        let replies = self.option(&set_meta(export, &["base:allocation"]));
        assert_eq!(replies.len(), 2, "{replies:?}");
        assert_eq!(replies[1].reply_type, OptionReplyType::Ack);
        match replies[0].parsed() {
            OptionReply::MetaContext { id, name } => {
                assert_eq!(name, b"base:allocation");
                id
            }
            other => panic!("expected a META_CONTEXT reply, got {other:?}"),
        }
    }

    /// Sends `NBD_OPT_GO` for `name`, which must succeed; returns the
    /// `ExportSelected` event's transmission flags.
    pub fn go(&mut self, name: &str) -> u16 {
        let replies = self.option(&go(name, &[]));
        assert_eq!(
            replies.last().map(|r| r.reply_type),
            Some(OptionReplyType::Ack),
            "{replies:?}"
        );
        match self.events.last() {
            Some(Ev::ExportSelected { flags, .. }) => *flags,
            other => panic!("expected ExportSelected, got {other:?}"),
        }
    }

    /// A connection in transmission on export 0 of `exports`: greeting,
    /// modern client flags, optionally structured replies and
    /// `base:allocation`, then `NBD_OPT_GO`. Events are cleared.
    pub fn transmission(exports: Vec<Export<'static>>, config: Config, structured: bool) -> Self {
        let mut h = Self::new(exports, config);
        h.start(MODERN);
        let name = h.exports[0].name;
        if structured {
            h.structured_replies();
            if h.exports[0].capabilities.block_status {
                h.set_base_allocation(name);
            }
        }
        h.go(name);
        h.events.clear();
        h
    }

    /// As [`transmission`](Self::transmission) with extended headers.
    pub fn extended(exports: Vec<Export<'static>>, config: Config) -> Self {
        let mut h = Self::new(exports, config);
        h.start(MODERN);
        h.extended_headers();
        let name = h.exports[0].name;
        if h.exports[0].capabilities.block_status {
            h.set_base_allocation(name);
        }
        h.go(name);
        h.events.clear();
        h
    }

    /// Sends a request in this connection's header style.
    pub fn request(
        &mut self,
        command: Command,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        let bytes = request(self.style(), command, flags, cookie, offset, length);
        self.send(&bytes);
    }

    /// Sends a read and returns the replies received.
    pub fn read(&mut self, cookie: u64, offset: u64, length: u64) -> Vec<Reply> {
        self.request(Command::Read, CommandFlags::empty(), cookie, offset, length);
        let bytes = self.received();
        replies(&bytes, &[(cookie, length)])
    }

    /// Sends a read that must succeed with the storage's data.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, length: u64) {
        let expected = self.disk()[offset as usize..(offset + length) as usize].to_vec();
        let got = self.read(cookie, offset, length);
        assert_read_data(&got, cookie, offset, &expected);
    }

    /// Sends a write (header and payload together).
    pub fn write(&mut self, flags: CommandFlags, cookie: u64, offset: u64, data: &[u8]) {
        let bytes = write_request(self.style(), flags, cookie, offset, data);
        self.send(&bytes);
    }
}

/// `request` with its id zeroed, to compare requests across runs that
/// reuse slots differently.
pub fn anonymous(request: Request) -> Request {
    let zero = RequestId::from_bits(0);
    match request {
        Request::Read { offset, length, .. } => Request::Read {
            id: zero,
            offset,
            length,
        },
        Request::Write {
            offset,
            length,
            fua,
            ..
        } => Request::Write {
            id: zero,
            offset,
            length,
            fua,
        },
        Request::Flush { .. } => Request::Flush { id: zero },
        Request::Trim {
            offset,
            length,
            fua,
            ..
        } => Request::Trim {
            id: zero,
            offset,
            length,
            fua,
        },
        Request::Cache { offset, length, .. } => Request::Cache {
            id: zero,
            offset,
            length,
        },
        Request::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
            ..
        } => Request::WriteZeroes {
            id: zero,
            offset,
            length,
            fua,
            no_hole,
            fast,
        },
        Request::BlockStatus {
            offset,
            length,
            req_one,
            ..
        } => Request::BlockStatus {
            id: zero,
            offset,
            length,
            req_one,
        },
        Request::Resize { size, .. } => Request::Resize { id: zero, size },
        other => other,
    }
}

/// What a whole conversation produced: bytes sent, storage requests (ids
/// zeroed, as they depend on when slots are freed), bytes handed out as
/// write data, final storage. Feeding the same conversation in different
/// pieces must not change any of it.
pub type Outcome = (Vec<u8>, Vec<Request>, Vec<u8>, Vec<Vec<u8>>);

/// Runs `conversation`, which must end the session with a disconnect,
/// against a fresh connection made by `connect`, fed by `feed`.
pub fn run_conversation(
    connect: &dyn Fn() -> Harness,
    conversation: &[u8],
    feed: &dyn Fn(&mut Harness, &[u8]),
) -> Outcome {
    let mut h = connect();
    let mut sent = h.received();
    feed(&mut h, conversation);
    sent.extend(h.received());
    let written = h
        .events
        .iter()
        .filter_map(|e| match e {
            Ev::WriteData { data, .. } => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(
        h.events.last(),
        Some(&Ev::Close(CloseReason::Disconnect)),
        "session did not end"
    );
    assert_eq!(h.pending_input(), 0);
    (sent, h.anonymous_requests(), written, h.storage.clone())
}

/// A harness with a 320-byte buffer, as [`nbd_core::server::SmallConnection`].
pub type SmallHarness = Harness<16, 320>;

/// Splits `bytes` into pieces of 1 to `max_piece` bytes (xorshift64).
pub fn pieces(bytes: &[u8], seed: u64, max_piece: usize) -> Vec<&[u8]> {
    let mut state = seed | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % max_piece as u64) as usize + 1;
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

// ---------------------------------------------------------------------------
// Client bytes
// ---------------------------------------------------------------------------

/// The client's flags.
pub fn client_flags(flags: ClientFlags) -> Vec<u8> {
    let mut out = vec![0; ClientFlags::ENCODED_LEN];
    let len = flags.encode(&mut out).expect("encode client flags");
    out.truncate(len);
    out
}

/// An option request with raw data.
pub fn option(code: OptionCode, data: &[u8]) -> Vec<u8> {
    let header = OptionHeader {
        code,
        length: data.len() as u32,
    };
    let mut out = vec![0; header.encoded_len()];
    header.encode(&mut out).expect("encode option header");
    out.extend_from_slice(data);
    out
}

fn encode_option(request: OptionRequest<'_>) -> Vec<u8> {
    let mut out = vec![0; request.encoded_len()];
    let len = request.encode(&mut out).expect("encode option");
    assert_eq!(len, out.len());
    out
}

fn info_types(infos: &[InfoType]) -> Vec<u16> {
    infos.iter().map(|t| t.to_wire()).collect()
}

/// `NBD_OPT_GO` for `name` asking for `infos`.
pub fn go(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let types = info_types(infos);
    encode_option(OptionRequest::Go(InfoRequest {
        name: name.as_bytes(),
        requests: WireList::Items(&types),
    }))
}

/// `NBD_OPT_INFO` for `name` asking for `infos`.
pub fn info(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let types = info_types(infos);
    encode_option(OptionRequest::Info(InfoRequest {
        name: name.as_bytes(),
        requests: WireList::Items(&types),
    }))
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let queries: Vec<&[u8]> = queries.iter().map(|q| q.as_bytes()).collect();
    let request = MetaContextRequest {
        export_name: export.as_bytes(),
        queries: WireList::Items(&queries),
    };
    encode_option(OptionRequest::ListMetaContext(request))
}

/// `NBD_OPT_LIST_META_CONTEXT`.
pub fn list_meta(export: &str, queries: &[&str]) -> Vec<u8> {
    meta_request(export, queries)
}

/// `NBD_OPT_SET_META_CONTEXT`.
pub fn set_meta(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut bytes = meta_request(export, queries);
    bytes[8..12].copy_from_slice(&OptionCode::SetMetaContext.to_wire().to_be_bytes());
    bytes
}

/// `NBD_OPT_EXPORT_NAME`.
pub fn export_name(name: &str) -> Vec<u8> {
    encode_option(OptionRequest::ExportName {
        name: name.as_bytes(),
    })
}

/// A request header.
pub fn request(
    style: HeaderStyle,
    command: Command,
    flags: CommandFlags,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    let header = RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    };
    let mut out = vec![0; RequestHeader::encoded_len(style)];
    header.encode(style, &mut out).expect("encode request");
    out
}

/// A write request and its payload; with extended headers `PAYLOAD_LEN`
/// is added, as the spec requires.
pub fn write_request(
    style: HeaderStyle,
    flags: CommandFlags,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> Vec<u8> {
    let flags = flags.with_if(CommandFlags::PAYLOAD_LEN, style == HeaderStyle::Extended);
    let mut out = request(
        style,
        Command::Write,
        flags,
        cookie,
        offset,
        data.len() as u64,
    );
    out.extend_from_slice(data);
    out
}

// ---------------------------------------------------------------------------
// Server bytes
// ---------------------------------------------------------------------------

/// An option reply with its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptReply {
    pub option: OptionCode,
    pub reply_type: OptionReplyType,
    pub data: Vec<u8>,
}

impl OptReply {
    /// The data parsed according to the reply type.
    pub fn parsed(&self) -> OptionReply<'_> {
        OptionReply::parse_payload(self.reply_type, &self.data).expect("parse option reply data")
    }
}

/// Splits server bytes into option replies; every byte must belong to one.
pub fn option_replies(mut bytes: &[u8]) -> Vec<OptReply> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, header) = OptionReplyHeader::parse(bytes).expect("option reply header");
        let length = header.length as usize;
        assert!(rest.len() >= length, "option reply data cut short");
        out.push(OptReply {
            option: header.option,
            reply_type: header.reply_type,
            data: rest[..length].to_vec(),
        });
        bytes = &rest[length..];
    }
    out
}

/// An option reply's bytes written out by hand: magic, option, type,
/// length, data.
pub fn expected_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = OPTION_REPLY_MAGIC.to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// One transmission reply message: a simple reply (with its read data, if
/// any) or one structured/extended chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        extended: bool,
        header: ChunkHeader,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } => *cookie,
            Self::Chunk { header, .. } => header.cookie,
        }
    }

    /// Whether this ends its request's reply.
    pub fn is_final(&self) -> bool {
        match self {
            Self::Simple { .. } => true,
            Self::Chunk { header, .. } => header.flags.contains(ReplyFlags::DONE),
        }
    }

    /// The chunk header; panics on a simple reply.
    pub fn header(&self) -> ChunkHeader {
        match self {
            Self::Chunk { header, .. } => *header,
            Self::Simple { .. } => panic!("expected a chunk, got {self:?}"),
        }
    }

    /// The chunk's payload parsed; panics on a simple reply.
    pub fn chunk(&self) -> Chunk<'_> {
        match self {
            Self::Chunk {
                header, payload, ..
            } => Chunk::parse_payload(header.chunk_type, payload).expect("parse chunk payload"),
            Self::Simple { .. } => panic!("expected a chunk, got {self:?}"),
        }
    }

    /// The error this reply reports, zero for success (data chunks and
    /// block status count as success).
    pub fn error(&self) -> u32 {
        match self {
            Self::Simple { error, .. } => *error,
            Self::Chunk { .. } => match self.chunk() {
                Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => error,
                _ => 0,
            },
        }
    }
}

/// Splits server bytes into transmission replies. `simple_reads` lists
/// `(cookie, length)` of reads whose successful simple reply carries data.
pub fn replies(mut bytes: &[u8], simple_reads: &[(u64, u64)]) -> Vec<Reply> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, header) = ReplyHeader::parse(bytes).expect("reply header");
        let reply = match header {
            ReplyHeader::Simple(simple) => {
                let length = simple_reads
                    .iter()
                    .find(|(cookie, _)| *cookie == simple.cookie)
                    .filter(|_| simple.error == 0)
                    .map_or(0, |(_, length)| *length as usize);
                assert!(rest.len() >= length, "read data cut short");
                bytes = &rest[length..];
                Reply::Simple {
                    error: simple.error,
                    cookie: simple.cookie,
                    data: rest[..length].to_vec(),
                }
            }
            ReplyHeader::Structured(chunk) | ReplyHeader::Extended(chunk) => {
                let length = chunk.length as usize;
                assert!(rest.len() >= length, "chunk payload cut short");
                bytes = &rest[length..];
                Reply::Chunk {
                    extended: matches!(header, ReplyHeader::Extended(_)),
                    header: chunk,
                    payload: rest[..length].to_vec(),
                }
            }
        };
        out.push(reply);
    }
    out
}

/// Asserts a complete successful read reply for `cookie`: simple with the
/// data, or one `OFFSET_DATA` chunk with DONE (possibly followed by a
/// `NONE` chunk).
pub fn assert_read_data(replies: &[Reply], cookie: u64, offset: u64, expected: &[u8]) {
    assert!(!replies.is_empty(), "no reply");
    for reply in replies {
        assert_eq!(reply.cookie(), cookie, "{reply:?}");
    }
    match &replies[0] {
        Reply::Simple { error, data, .. } => {
            assert_eq!(replies.len(), 1);
            assert_eq!(*error, 0);
            assert!(data == expected, "read data differs");
        }
        chunk @ Reply::Chunk { .. } => match chunk.chunk() {
            Chunk::OffsetData { offset: at, data } => {
                assert_eq!(at, offset);
                assert!(data == expected, "read data differs");
                assert!(replies.last().is_some_and(Reply::is_final));
                assert_eq!(replies.iter().filter(|r| r.is_final()).count(), 1);
            }
            other => panic!("expected OFFSET_DATA, got {other:?}"),
        },
    }
}

/// Asserts one reply to `cookie` reporting success without data: a simple
/// reply with error zero, or a `NONE` chunk with DONE.
pub fn assert_success(reply: &Reply, cookie: u64) {
    assert_eq!(reply.cookie(), cookie, "{reply:?}");
    match reply {
        Reply::Simple { error, data, .. } => {
            assert_eq!(*error, 0, "{reply:?}");
            assert!(data.is_empty());
        }
        Reply::Chunk { header, .. } => {
            assert!(header.flags.contains(ReplyFlags::DONE), "{reply:?}");
            assert_eq!(reply.chunk(), Chunk::None, "{reply:?}");
        }
    }
}

/// Asserts one final reply to `cookie` reporting `error`: a simple reply,
/// or an `ERROR` chunk with DONE.
pub fn assert_error(reply: &Reply, cookie: u64, error: ErrorCode) {
    assert_eq!(reply.cookie(), cookie, "{reply:?}");
    assert!(reply.is_final(), "{reply:?}");
    match reply {
        Reply::Simple {
            error: got, data, ..
        } => {
            assert_eq!(*got, error.to_wire(), "{reply:?}");
            assert!(data.is_empty());
        }
        Reply::Chunk { .. } => match reply.chunk() {
            Chunk::Error { error: got, .. } => assert_eq!(got, error.to_wire(), "{reply:?}"),
            other => panic!("expected an ERROR chunk, got {other:?}"),
        },
    }
}

/// Block sizes 512 / 4096 / 64 KiB.
pub const ALIGNED: BlockSizeConstraints = BlockSizeConstraints {
    minimum: 512,
    preferred: 4096,
    maximum: 64 * 1024,
};
