//! Test harness for the client state machine.
//!
//! - [`Pair`] wires a client [`Connection`] to the core's own server, both
//!   sans-IO, in memory: it pumps bytes both ways, plays the server's shell
//!   (a `Vec<u8>` storage answering every storage request, or holding them
//!   for the test to complete in any order) and the client's shell (write
//!   payloads sent after their headers, read data reassembled per request).
//! - [`Script`] drives a client alone from hand-written server bytes built
//!   with the builders in [`messages`] ([`greeting`](messages::greeting),
//!   [`option_reply`](messages::option_reply), [`chunk`](messages::chunk),
//!   …), for conversations the core's server never produces.
//!
//! Client events are copied into [`Ev`] so tests can compare them.

#![allow(dead_code)] // Every test file uses a different part of the harness.

pub mod messages;

use std::collections::HashMap;

use nbd_core::client::{self, Connection, Event, ExportInfo, Payload, ProtocolError, RequestId};
use nbd_core::export::{Capabilities, Export};
use nbd_core::server;
use nbd_core::wire::{
    ErrorCode, ExtDescriptor, Info, OptionCode, OptionReplyType, RequestHeader, WireError,
};

/// A client event with its borrowed bytes copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Greeted(u16),
    StartTls,
    ListEntry {
        name: Vec<u8>,
        description: Vec<u8>,
    },
    MetaContext {
        id: u32,
        name: Vec<u8>,
    },
    InfoExport {
        size: u64,
        flags: u16,
    },
    InfoName(Vec<u8>),
    InfoDescription(Vec<u8>),
    InfoBlockSize(u32, u32, u32),
    InfoUnknown(u16, Vec<u8>),
    Export(ExportInfo),
    Ready,
    OptionRefused {
        option: OptionCode,
        reply_type: OptionReplyType,
        message: Vec<u8>,
    },
    ReadData {
        id: RequestId,
        offset: u64,
        data: Vec<u8>,
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
        descriptors: Vec<(u64, u64)>,
    },
    Done {
        id: RequestId,
        result: Result<(), ErrorCode>,
    },
    Closed,
}

impl Ev {
    pub fn from_event(event: Event<'_>) -> Self {
        match event {
            Event::Greeted { flags } => Self::Greeted(flags.bits()),
            Event::StartTls => Self::StartTls,
            Event::ListEntry { name, description } => Self::ListEntry {
                name: name.to_vec(),
                description: description.to_vec(),
            },
            Event::MetaContext { id, name } => Self::MetaContext {
                id,
                name: name.to_vec(),
            },
            Event::Info(info) => match info {
                Info::Export { size, flags } => Self::InfoExport {
                    size,
                    flags: flags.bits(),
                },
                Info::Name(name) => Self::InfoName(name.to_vec()),
                Info::Description(text) => Self::InfoDescription(text.to_vec()),
                Info::BlockSize(s) => Self::InfoBlockSize(s.minimum, s.preferred, s.maximum),
                Info::Unknown { info_type, data } => Self::InfoUnknown(info_type, data.to_vec()),
            },
            Event::Export(info) => Self::Export(info),
            Event::Ready => Self::Ready,
            Event::OptionRefused {
                option,
                reply_type,
                message,
            } => Self::OptionRefused {
                option,
                reply_type,
                message: message.to_vec(),
            },
            Event::ReadData { id, offset, data } => Self::ReadData {
                id,
                offset,
                data: data.to_vec(),
            },
            Event::ReadHole { id, offset, length } => Self::ReadHole { id, offset, length },
            Event::BlockStatus {
                id,
                context_id,
                offset,
                descriptors,
            } => Self::BlockStatus {
                id,
                context_id,
                offset,
                descriptors: descriptors.iter().map(|d| (d.length, d.status)).collect(),
            },
            Event::Done { id, result } => Self::Done { id, result },
            Event::Closed => Self::Closed,
            other => panic!("event the harness does not know: {other:?}"),
        }
    }
}

/// Appends a transmit's bytes (parts, then the write payload from `writes`).
fn append_client_transmit(
    out: &mut Vec<u8>,
    transmit: client::Transmit<'_>,
    writes: &mut HashMap<RequestId, Vec<u8>>,
) {
    for part in transmit.parts {
        out.extend_from_slice(part);
    }
    if let Some(Payload::Data { id, length, .. }) = transmit.payload {
        let data = writes
            .remove(&id)
            .expect("payload for a write the test issued");
        assert_eq!(data.len() as u64, length, "payload length");
        out.extend_from_slice(&data);
    }
}

// ---------------------------------------------------------------------------
// Client against the core's server
// ---------------------------------------------------------------------------

/// How the server's shell answers reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStyle {
    /// Always the data.
    Data,
    /// All-zero ranges as holes, the rest as data.
    Holes,
}

/// A client and the core's server in memory.
pub struct Pair<const R: usize, const B: usize> {
    pub client: Connection<R, B>,
    pub server: server::Connection<&'static [Export<'static>], 64, 4096>,
    /// The selected export's bytes, as the server's storage.
    pub storage: Vec<u8>,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// Write payloads the client's shell sends after their headers.
    writes: HashMap<RequestId, Vec<u8>>,
    /// Every client event, in order.
    pub events: Vec<Ev>,
    pub client_error: Option<ProtocolError>,
    pub server_error: Option<server::ProtocolError>,
    /// What `end_of_input` said once the server closed.
    pub eof: Option<Result<(), ProtocolError>>,
    pub server_closed: bool,
    /// Hold server storage requests for the test to complete.
    pub hold: bool,
    pub held: Vec<server::Request>,
    /// Writes whose payload is not whole yet (auto mode).
    writes_receiving: HashMap<server::RequestId, u64>,
    pub read_style: ReadStyle,
    /// Requests touching this offset fail with this error.
    pub fail_at: Option<(u64, ErrorCode)>,
    /// Bytes the client sent, in total.
    pub client_bytes: Vec<u8>,
    /// Most bytes handed to one client `process` call.
    pub client_piece: usize,
}

impl<const R: usize, const B: usize> Pair<R, B> {
    pub fn new(
        exports: Vec<Export<'static>>,
        server_config: server::Config,
        client_config: client::Config<'_>,
    ) -> Self {
        let catalog: &'static [Export<'static>] = Vec::leak(exports);
        Self {
            client: Connection::new(client_config).expect("client config"),
            server: server::Connection::new(catalog, server_config),
            storage: Vec::new(),
            to_server: Vec::new(),
            to_client: Vec::new(),
            writes: HashMap::new(),
            events: Vec::new(),
            client_error: None,
            server_error: None,
            eof: None,
            server_closed: false,
            hold: false,
            held: Vec::new(),
            writes_receiving: HashMap::new(),
            read_style: ReadStyle::Data,
            fail_at: None,
            client_bytes: Vec::new(),
            client_piece: usize::MAX,
        }
    }

    /// One writable 1 MiB export "disk" with every capability, default block
    /// sizes, and a second plain export "plain".
    pub fn standard(client_config: client::Config<'_>) -> Self {
        Self::new(
            vec![
                Export::new("disk", 1 << 20)
                    .with_description("a RAM disk")
                    .with_capabilities(Capabilities::ALL),
                Export::new("plain", 64 * 1024),
            ],
            server::Config::default(),
            client_config,
        )
    }

    /// Pumps bytes both ways until nothing moves.
    pub fn run(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            while let Some(transmit) = self.client.poll_transmit() {
                let start = self.to_server.len();
                append_client_transmit(&mut self.to_server, transmit, &mut self.writes);
                self.client_bytes
                    .extend_from_slice(&self.to_server[start..]);
                moved = true;
            }
            moved |= self.pump_server();
            while let Some(transmit) = self.server.poll_transmit() {
                for part in transmit.parts {
                    self.to_client.extend_from_slice(part);
                }
                match transmit.payload {
                    Some(server::Payload::Data { offset, length, .. }) => {
                        let (start, end) = (offset as usize, (offset + length) as usize);
                        self.to_client.extend_from_slice(&self.storage[start..end]);
                    }
                    Some(server::Payload::Zeroes { length }) => {
                        self.to_client
                            .extend(std::iter::repeat_n(0u8, length as usize));
                    }
                    None => {}
                }
                moved = true;
            }
            moved |= self.pump_client();
            if !moved {
                return;
            }
        }
        panic!("conversation does not settle");
    }

    fn pump_client(&mut self) -> bool {
        let mut moved = false;
        while self.client_error.is_none() && !self.client.is_closed() {
            let end = self.client_piece.min(self.to_client.len());
            let step = match self.client.process(&self.to_client[..end]) {
                Ok(step) => step,
                Err(error) => {
                    self.client_error = Some(error);
                    break;
                }
            };
            let consumed = step.consumed;
            let event = step.event.map(Ev::from_event);
            self.to_client.drain(..consumed);
            moved |= consumed > 0;
            match event {
                Some(event) => {
                    moved = true;
                    self.events.push(event);
                }
                None if consumed > 0 => {}
                None => break,
            }
        }
        let server_gone = self.server_closed || self.server_error.is_some();
        if server_gone && self.to_client.is_empty() && self.eof.is_none() {
            self.eof = Some(self.client.end_of_input());
            moved = true;
        }
        moved
    }

    fn pump_server(&mut self) -> bool {
        let mut moved = false;
        while self.server_error.is_none() && !self.server.is_closed() {
            let step = match self.server.process(&self.to_server) {
                Ok(step) => step,
                Err(error) => {
                    self.server_error = Some(error);
                    break;
                }
            };
            let consumed = step.consumed;
            let event = step.event;
            let mut had_event = event.is_some();
            match event {
                Some(server::Event::ExportSelected { size, .. }) => {
                    self.storage = vec![0; size as usize];
                }
                Some(server::Event::Request(request)) => {
                    if self.hold {
                        self.held.push(request);
                    } else {
                        self.serve(request);
                    }
                }
                Some(server::Event::WriteData {
                    id,
                    offset,
                    data,
                    remaining,
                }) => {
                    let start = offset as usize;
                    self.storage[start..start + data.len()].copy_from_slice(data);
                    if remaining == 0 && self.writes_receiving.remove(&id).is_some() {
                        let result = self.outcome(offset);
                        self.server.complete(id, result).expect("complete write");
                    }
                }
                Some(server::Event::Closed(_)) => self.server_closed = true,
                Some(_) => {}
                None => had_event = false,
            }
            self.to_server.drain(..consumed);
            moved |= consumed > 0 || had_event;
            if !had_event {
                // Replies may unblock input (negotiation, back-pressure):
                // `run` sends them and comes back.
                break;
            }
        }
        if self.server.is_closed() {
            self.server_closed = true;
        }
        moved
    }

    fn outcome(&self, offset: u64) -> Result<(), ErrorCode> {
        match self.fail_at {
            Some((at, error)) if at == offset => Err(error),
            _ => Ok(()),
        }
    }

    /// Carries out a storage request as the server's shell.
    pub fn serve(&mut self, request: server::Request) {
        use server::Request as Rq;
        let range = |offset: u64, length: u64| offset as usize..(offset + length) as usize;
        let done = match request {
            Rq::Read { id, offset, length } => {
                let outcome = if let Err(error) = self.outcome(offset) {
                    server::ReadOutcome::Error(error)
                } else if self.read_style == ReadStyle::Holes
                    && self.storage[range(offset, length)].iter().all(|&b| b == 0)
                {
                    server::ReadOutcome::Zeroes
                } else {
                    server::ReadOutcome::Data
                };
                self.server.complete_read(id, outcome)
            }
            Rq::Write { id, offset, .. } => {
                // Completed once its payload is whole (see WriteData).
                self.writes_receiving.insert(id, offset);
                return;
            }
            Rq::Trim {
                id, offset, length, ..
            }
            | Rq::WriteZeroes {
                id, offset, length, ..
            } => {
                let result = self.outcome(offset);
                if result.is_ok() {
                    self.storage[range(offset, length)].fill(0);
                }
                self.server.complete(id, result)
            }
            Rq::Flush { id } => self.server.complete(id, Ok(())),
            Rq::Cache { id, offset, .. } => self.server.complete(id, self.outcome(offset)),
            Rq::Resize { id, size } => {
                self.storage.resize(size as usize, 0);
                self.server.complete(id, Ok(()))
            }
            Rq::BlockStatus {
                id, offset, length, ..
            } => {
                let extents = extents(&self.storage, offset, length);
                self.server.complete_block_status(id, &extents)
            }
            other => panic!("request the harness does not know: {other:?}"),
        };
        done.expect("completion accepted");
    }

    /// Completes the held request at `index` (auto-serving it).
    pub fn complete_held(&mut self, index: usize) {
        let request = self.held.remove(index);
        if let server::Request::Write { id, offset, .. } = request {
            // The payload was stored as it arrived; the harness pumps first.
            let result = self.outcome(offset);
            self.server.complete(id, result).expect("complete write");
        } else {
            self.serve(request);
        }
    }

    /// Issues a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> RequestId {
        let id = self
            .client
            .write(offset, data.len() as u64, fua)
            .expect("write accepted");
        self.writes.insert(id, data.to_vec());
        id
    }

    /// The outcome of request `id`, if done.
    pub fn result(&self, id: RequestId) -> Option<Result<(), ErrorCode>> {
        let mut results = self.events.iter().filter_map(|e| match e {
            Ev::Done { id: done, result } if *done == id => Some(*result),
            _ => None,
        });
        let result = results.next();
        assert!(results.next().is_none(), "request {id:?} done twice");
        result
    }

    /// The data read by `id` (`length` bytes from `offset`), reassembled from
    /// its data and hole events; checks no byte came twice or was missed.
    pub fn read_data(&self, id: RequestId, offset: u64, length: u64) -> Vec<u8> {
        let mut data = vec![0u8; length as usize];
        let mut seen = vec![false; length as usize];
        let mut mark = |at: u64, len: u64| {
            for i in at - offset..at - offset + len {
                assert!(!seen[i as usize], "byte {i} of read {id:?} delivered twice");
                seen[i as usize] = true;
            }
        };
        for event in &self.events {
            match event {
                Ev::ReadData {
                    id: e,
                    offset: at,
                    data: bytes,
                } if *e == id => {
                    mark(*at, bytes.len() as u64);
                    let start = (*at - offset) as usize;
                    data[start..start + bytes.len()].copy_from_slice(bytes);
                }
                Ev::ReadHole {
                    id: e,
                    offset: at,
                    length: len,
                } if *e == id => mark(*at, *len),
                _ => {}
            }
        }
        assert!(seen.iter().all(|&s| s), "read {id:?} not covered");
        data
    }

    /// The descriptors block status `id` delivered, by context.
    pub fn descriptors(&self, id: RequestId) -> Vec<StatusEvent> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Ev::BlockStatus {
                    id: e,
                    context_id,
                    offset,
                    descriptors,
                } if *e == id => Some((*context_id, *offset, descriptors.clone())),
                _ => None,
            })
            .collect()
    }

    /// The client's events since the last call.
    pub fn take_events(&mut self) -> Vec<Ev> {
        std::mem::take(&mut self.events)
    }
}

/// One block status event: context id, offset, (length, status) pairs.
pub type StatusEvent = (u32, u64, Vec<(u64, u64)>);

/// `base:allocation` extents of `storage` from `offset`, 512-byte granular:
/// all-zero blocks are `HOLE | ZERO`, others data.
pub fn extents(storage: &[u8], offset: u64, length: u64) -> Vec<ExtDescriptor> {
    let mut extents: Vec<ExtDescriptor> = Vec::new();
    let end = (offset + length.max(1)).min(storage.len() as u64);
    let mut at = offset;
    while at < end {
        let block_end = ((at / 512 + 1) * 512).min(storage.len() as u64);
        let zero = storage[at as usize..block_end as usize]
            .iter()
            .all(|&b| b == 0);
        let status = if zero { 3 } else { 0 };
        let len = block_end - at;
        match extents.last_mut() {
            Some(last) if last.status == status => last.length += len,
            _ => extents.push(ExtDescriptor {
                length: len,
                status,
            }),
        }
        at = block_end;
    }
    if extents.is_empty() {
        extents.push(ExtDescriptor {
            length: 512,
            status: 0,
        });
    }
    extents
}

// ---------------------------------------------------------------------------
// Client against hand-written server bytes
// ---------------------------------------------------------------------------

/// A client fed hand-written server bytes.
pub struct Script<const R: usize, const B: usize> {
    pub client: Connection<R, B>,
    /// Bytes the client sent so far.
    pub sent: Vec<u8>,
    pub events: Vec<Ev>,
    writes: HashMap<RequestId, Vec<u8>>,
}

impl<const R: usize, const B: usize> Script<R, B> {
    pub fn new(config: client::Config<'_>) -> Self {
        Self {
            client: Connection::new(config).expect("client config"),
            sent: Vec::new(),
            events: Vec::new(),
            writes: HashMap::new(),
        }
    }

    /// Takes everything the client wants to send.
    pub fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(transmit) = self.client.poll_transmit() {
            append_client_transmit(&mut out, transmit, &mut self.writes);
        }
        self.sent.extend_from_slice(&out);
        out
    }

    /// Feeds server bytes (all at once), collecting events and draining the
    /// client's output after each; returns the first error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.feed_split(bytes, usize::MAX)
    }

    /// Feeds server bytes in pieces of at most `piece` bytes.
    pub fn feed_split(&mut self, bytes: &[u8], piece: usize) -> Result<(), ProtocolError> {
        let mut buffer = Vec::new();
        let mut rest = bytes;
        loop {
            let take = piece.min(rest.len());
            buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            loop {
                let step = self.client.process(&buffer)?;
                let consumed = step.consumed;
                let event = step.event.map(Ev::from_event);
                buffer.drain(..consumed);
                self.drain();
                match event {
                    Some(event) => self.events.push(event),
                    None => break,
                }
            }
            if rest.is_empty() {
                assert!(buffer.is_empty(), "client left input unconsumed");
                return Ok(());
            }
        }
    }

    /// Issues a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> RequestId {
        let id = self
            .client
            .write(offset, data.len() as u64, false)
            .expect("write accepted");
        self.writes.insert(id, data.to_vec());
        id
    }

    pub fn take_events(&mut self) -> Vec<Ev> {
        std::mem::take(&mut self.events)
    }
}

/// Parses the request headers in `bytes` (no payloads), extended or not.
pub fn requests(bytes: &[u8]) -> Vec<RequestHeader> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        match RequestHeader::parse_any(rest) {
            Ok((tail, (_, header))) => {
                out.push(header);
                rest = tail;
            }
            Err(WireError::Incomplete { .. }) | Err(_) => break,
        }
    }
    out
}
