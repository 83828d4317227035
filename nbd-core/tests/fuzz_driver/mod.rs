//! Drives a server connection from arbitrary bytes: the client stream
//! (well-formed requests, garbage, raw options), how it is split across
//! `process` calls, the order and outcome of completions, and shutdowns.
//!
//! Shared by the `server_robustness` proptest and the `server` cargo-fuzz
//! target, so both check the same invariants:
//!
//! - nothing panics, whatever the bytes and completion order;
//! - every reply carries a cookie the client sent, and nothing follows a
//!   request's final reply;
//! - reply lengths agree with what is actually sent; replies use the
//!   negotiated header style; no structured reply unless negotiated;
//! - write payload slices are exactly the bytes the client sent;
//! - completing a request the shell holds never fails as unknown;
//! - on a well-formed stream, every request gets exactly one final reply.

#![allow(dead_code)]

#[path = "../fuzz_bytes/mod.rs"]
mod fuzz_bytes;

use std::collections::{HashMap, HashSet};

use fuzz_bytes::Bytes;

use nbd_core::export::{Capabilities, Export};
use nbd_core::server::{
    CompletionError, Config, Connection, Event, Payload, ReadOutcome, Request, RequestId, TlsPolicy,
};
use nbd_core::wire::{
    BlockSizeConstraints, ChunkType, ClientFlags, Command, CommandFlags, ErrorCode, ExtDescriptor,
    HeaderStyle, InfoRequest, MetaContextRequest, OptionRequest, ReplyFlags, ReplyHeader,
    RequestHeader, WireList,
};

const EXPORT_SIZE: u64 = 1 << 20;

/// The byte every write payload carries at export offset `offset`, so a
/// payload slice can be checked without knowing which request it is for.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) >> 3) as u8 ^ 0x5a
}

fn exports(setup: u8) -> [Export<'static>; 2] {
    let block_sizes = if setup & 0x10 != 0 {
        BlockSizeConstraints {
            minimum: 512,
            preferred: 4096,
            maximum: 64 * 1024,
        }
    } else {
        nbd_core::export::DEFAULT_BLOCK_SIZES
    };
    [
        Export::new("", EXPORT_SIZE)
            .with_description("fuzzed")
            .with_read_only(setup & 0x08 != 0)
            .with_block_sizes(block_sizes)
            .with_capabilities(Capabilities::ALL),
        Export::new("plain", EXPORT_SIZE / 2),
    ]
}

/// Runs one fuzz case.
pub fn run(data: &[u8]) {
    let mut bytes = Bytes(data);
    let setup = bytes.u8();
    if setup & 0x20 != 0 {
        Driver::<16, 320>::new(setup).run(bytes);
    } else {
        Driver::<64, 4096>::new(setup).run(bytes);
    }
}

struct Sent {
    offset: u64,
    length: u64,
    command: Command,
    /// Final reply seen.
    finished: bool,
}

struct Driver<const R: usize, const B: usize> {
    conn: Connection<[Export<'static>; 2], R, B>,
    /// Client bytes not yet fed.
    stream: Vec<u8>,
    /// Requests in the stream by cookie (only when the stream is well-formed).
    sent: HashMap<u64, Sent>,
    /// Garbage or raw options went into the stream: cookies are unknowable.
    untrusted: bool,
    /// A DISC or shutdown: later requests may legitimately go unanswered.
    ending: bool,
    next_cookie: u64,
    /// Requests the shell holds.
    held: Vec<Request>,
    /// Write payload received so far, by request id.
    write_received: HashMap<RequestId, u64>,
    /// Reads answered as streamed, waiting for their data to be sent.
    streamed: HashSet<RequestId>,
    /// Streamed reads whose data went out: the shell owes the ending.
    to_finish: Vec<(RequestId, u64)>,
    closed: bool,
}

impl<const R: usize, const B: usize> Driver<R, B> {
    fn new(setup: u8) -> Self {
        let config = Config {
            tls: if setup & 0x80 != 0 {
                TlsPolicy::Optional
            } else {
                TlsPolicy::Disabled
            },
            max_in_flight: if setup & 0x04 != 0 { 3 } else { usize::MAX },
            max_option_length: 1 << 16,
            max_discard: 1 << 20,
            require_block_size_request: setup & 0x02 != 0,
            max_request_length: 1 << 26,
        };
        Self {
            conn: Connection::new(exports(setup), config),
            stream: Vec::new(),
            sent: HashMap::new(),
            untrusted: false,
            ending: false,
            next_cookie: 1,
            held: Vec::new(),
            write_received: HashMap::new(),
            streamed: HashSet::new(),
            to_finish: Vec::new(),
            closed: false,
        }
    }

    fn run(mut self, mut bytes: Bytes<'_>) {
        let raw = bytes.u8();
        if raw & 0x80 == 0 {
            self.handshake(raw);
        }
        while !bytes.is_empty() && !self.closed {
            match bytes.u8() % 10 {
                0 | 1 => self.push_request(&mut bytes),
                2 => {
                    let n = usize::from(bytes.u8() % 40);
                    self.stream.extend_from_slice(bytes.take(n));
                    self.untrusted = true;
                }
                3 | 4 => {
                    let n = usize::from(bytes.u16() % 2048);
                    self.feed(n);
                }
                5 | 6 => self.complete_one(&mut bytes),
                7 => self.drain_output(),
                8 => self.push_option(&mut bytes),
                _ => {
                    if bytes.u8() == 0xff {
                        self.conn.shutdown();
                        self.ending = true;
                    }
                }
            }
        }
        self.finish();
    }

    /// A valid negotiation chosen by `choice`: flags, optional structured
    /// replies, extended headers, meta context, then GO.
    fn handshake(&mut self, choice: u8) {
        let flags = ClientFlags::FIXED_NEWSTYLE.with_if(ClientFlags::NO_ZEROES, choice & 1 != 0);
        self.stream.extend_from_slice(&flags.bits().to_be_bytes());
        let mut options = Vec::new();
        if choice & 0x02 != 0 {
            options.push(OptionRequest::StructuredReply);
        }
        if choice & 0x04 != 0 {
            options.push(OptionRequest::ExtendedHeaders);
        }
        let queries = [&b"base:allocation"[..]];
        if choice & 0x08 != 0 {
            options.push(OptionRequest::SetMetaContext(MetaContextRequest {
                export_name: b"",
                queries: WireList::Items(&queries),
            }));
        }
        let info = [3u16];
        let requests = if choice & 0x10 != 0 {
            &info[..]
        } else {
            &[][..]
        };
        options.push(OptionRequest::Go(InfoRequest {
            name: b"",
            requests: WireList::Items(requests),
        }));
        for option in options {
            let mut buf = vec![0; option.encoded_len()];
            let len = option.encode(&mut buf).expect("encode option");
            self.stream.extend_from_slice(&buf[..len]);
            // Options are answered one at a time: feed, then take replies.
            self.feed(usize::MAX);
            self.drain_output();
        }
    }

    fn push_option(&mut self, bytes: &mut Bytes<'_>) {
        let code = u32::from(bytes.u8() % 14);
        let length = u32::from(bytes.u8());
        self.stream
            .extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        self.stream.extend_from_slice(&code.to_be_bytes());
        self.stream.extend_from_slice(&length.to_be_bytes());
        self.stream.extend_from_slice(bytes.take(length as usize));
        self.untrusted = true;
    }

    fn push_request(&mut self, bytes: &mut Bytes<'_>) {
        let command = Command::from_wire(u16::from(bytes.u8() % 10));
        let flags = CommandFlags(u16::from(bytes.u8()) & 0x3f);
        let shape = bytes.u8();
        let offset = match shape & 3 {
            0 => u64::from(bytes.u16()) * 512,
            1 => u64::from(bytes.u32()),
            2 => EXPORT_SIZE - u64::from(bytes.u8()) * 512,
            // Ranges ending at or past 2^64.
            _ if shape & 0x80 != 0 => u64::MAX - u64::from(bytes.u16()),
            _ => u64::from(bytes.u32()) << 32,
        };
        let length = match (shape >> 2) & 3 {
            0 => u64::from(bytes.u16() % 64 + 1) * 512,
            1 => u64::from(bytes.u16()),
            2 => 0,
            _ => u64::from(bytes.u32()),
        };
        let style = self.conn.header_style();
        let length = if style == HeaderStyle::Compact {
            length & 0xffff_ffff
        } else {
            length
        };
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut buf = [0u8; 32];
        let len = header.encode(style, &mut buf).expect("encode request");
        self.stream.extend_from_slice(&buf[..len]);
        let extended = style == HeaderStyle::Extended;
        let payload =
            command == Command::Write || (extended && flags.contains(CommandFlags::PAYLOAD_LEN));
        if payload {
            // Huge payloads make the server disconnect; keep the rest small.
            let sent = length.min(1 << 17);
            self.stream
                .extend((0..sent).map(|i| pattern(offset.wrapping_add(i))));
            if sent < length || command != Command::Write {
                self.untrusted = true;
            }
        }
        if command == Command::Disconnect {
            self.ending = true;
        }
        // Requests after a DISC are never read; after a shutdown they get
        // ESHUTDOWN. Either way their cookies were sent.
        self.sent.insert(
            cookie,
            Sent {
                offset,
                length,
                command,
                finished: false,
            },
        );
    }

    /// Feeds up to `n` stream bytes, handling every event.
    fn feed(&mut self, n: usize) {
        // Events borrow the stream; take it out of `self` meanwhile.
        let mut stream = std::mem::take(&mut self.stream);
        let mut budget = n.min(stream.len());
        let mut start = 0;
        loop {
            let step = match self.conn.process(&stream[start..start + budget]) {
                Ok(step) => step,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            };
            start += step.consumed;
            budget -= step.consumed;
            let had_event = step.event.is_some();
            if let Some(event) = step.event {
                self.on_event(event);
            }
            if self.closed {
                break;
            }
            if !had_event {
                // Replies may unblock input (back-pressure, negotiation).
                if self.conn.wants_transmit() && budget > 0 {
                    self.drain_output();
                    continue;
                }
                break;
            }
        }
        stream.drain(..start);
        self.stream = stream;
    }

    fn on_event(&mut self, event: Event<'_>) {
        match event {
            Event::Request(request) => {
                // RESIZE changes the size the server validates against.
                let size = self.conn.export_size().unwrap_or(0);
                match request {
                    Request::Read { offset, length, .. }
                    | Request::Write { offset, length, .. }
                    | Request::Cache { offset, length, .. }
                    | Request::WriteZeroes { offset, length, .. } => {
                        assert!(
                            length > 0 && offset + length <= size,
                            "unvalidated range in {request:?}"
                        );
                    }
                    Request::Trim { offset, length, .. } => assert!(offset + length <= size),
                    _ => {}
                }
                self.held.push(request);
            }
            Event::WriteData {
                id,
                offset,
                data,
                remaining,
            } => {
                // Once garbage or a truncated payload entered the stream,
                // later bytes may legitimately be taken as payload.
                let checkable = if self.untrusted { &[][..] } else { data };
                for (i, byte) in checkable.iter().enumerate() {
                    assert_eq!(
                        *byte,
                        pattern(offset + i as u64),
                        "write payload byte {i} at {offset} corrupted"
                    );
                }
                *self.write_received.entry(id).or_default() += data.len() as u64;
                let held = self.held.iter().find(|r| r.id() == id);
                if let (Some(Request::Write { length, .. }), false) = (held, self.untrusted) {
                    assert_eq!(
                        self.write_received[&id] + remaining,
                        *length,
                        "write payload accounting"
                    );
                }
            }
            Event::Closed(_) => self.closed = true,
            Event::StartTls => {
                // No TLS engine here: the stream goes on in clear, which is
                // what a shell that forgot TLS would do.
            }
            _ => {}
        }
    }

    fn complete_one(&mut self, bytes: &mut Bytes<'_>) {
        if let Some((id, size)) = self.to_finish.pop() {
            let result = if bytes.u8() & 1 == 0 {
                Ok(())
            } else {
                Err((ErrorCode::Io, size))
            };
            let outcome = self.conn.finish_streamed_read(id, result);
            if outcome == Err(CompletionError::NotRepresentable) {
                // Simple replies: the shell must hard-disconnect now.
                self.closed = true;
            } else {
                assert_eq!(outcome, Ok(()), "finishing a streamed read");
            }
            return;
        }
        if self.held.is_empty() {
            return;
        }
        let index = usize::from(bytes.u8()) % self.held.len();
        let choice = bytes.u8();
        let request = self.held.swap_remove(index);
        let id = request.id();
        let fail = choice & 0x80 != 0;
        let result = match request {
            Request::Read { .. } => {
                let outcome = match choice % 4 {
                    0 => ReadOutcome::Data,
                    1 => ReadOutcome::Zeroes,
                    2 => {
                        self.streamed.insert(id);
                        ReadOutcome::Streamed
                    }
                    _ => ReadOutcome::Error(ErrorCode::Io),
                };
                self.conn.complete_read(id, outcome)
            }
            Request::Write { length, .. } => {
                let whole = self.write_received.get(&id).copied().unwrap_or(0) == length;
                if whole || fail {
                    self.write_received.remove(&id);
                    self.conn.complete(
                        id,
                        if fail {
                            Err(ErrorCode::NoSpace)
                        } else {
                            Ok(())
                        },
                    )
                } else {
                    let early = self.conn.complete(id, Ok(()));
                    assert_eq!(early, Err(CompletionError::PayloadIncomplete));
                    self.held.push(request);
                    return;
                }
            }
            Request::BlockStatus { .. } if !fail => {
                let extents: Vec<ExtDescriptor> = (0..1 + choice % 3)
                    .map(|_| ExtDescriptor {
                        length: u64::from(bytes.u16()) * 512,
                        status: u64::from(bytes.u8() % 4),
                    })
                    .collect();
                let outcome = self.conn.complete_block_status(id, &extents);
                if extents[0].length == 0 {
                    assert_eq!(outcome, Err(CompletionError::EmptyExtents));
                    self.held.push(request);
                    return;
                }
                if outcome == Err(CompletionError::Busy) {
                    self.held.push(request);
                    return;
                }
                outcome
            }
            _ => self
                .conn
                .complete(id, if fail { Err(ErrorCode::Io) } else { Ok(()) }),
        };
        assert_eq!(result, Ok(()), "completing held request {request:?}");
    }

    /// Takes every message and checks it.
    fn drain_output(&mut self) {
        while let Some(transmit) = self.conn.poll_transmit() {
            let header = transmit.parts[0];
            let total = transmit.parts_len() as u64
                + match transmit.payload {
                    Some(Payload::Data { length, .. }) | Some(Payload::Zeroes { length }) => length,
                    None => 0,
                };
            let payload = transmit.payload;
            let Ok((_, reply)) = ReplyHeader::parse(header) else {
                continue;
            };
            let features = self.conn.features();
            let (cookie, final_reply) = match reply {
                ReplyHeader::Simple(simple) => {
                    assert!(
                        !features.extended_headers,
                        "simple reply with extended headers"
                    );
                    if let Some(Payload::Data { length, .. } | Payload::Zeroes { length }) = payload
                    {
                        assert_eq!(simple.error, 0, "data after an error");
                        assert_eq!(total, 16 + length);
                    } else {
                        assert_eq!(total, 16, "simple reply length");
                    }
                    (simple.cookie, true)
                }
                ReplyHeader::Structured(chunk) | ReplyHeader::Extended(chunk) => {
                    assert!(
                        features.structured_replies,
                        "structured reply not negotiated"
                    );
                    let extended = matches!(reply, ReplyHeader::Extended(_));
                    assert_eq!(extended, features.extended_headers, "reply header style");
                    let header_len = if extended { 32 } else { 20 };
                    assert_eq!(
                        total - header_len,
                        chunk.length,
                        "chunk length disagrees with bytes sent"
                    );
                    if let (Some(sent), false) = (self.sent.get(&chunk.cookie), self.untrusted) {
                        if extended {
                            assert_eq!(
                                chunk.offset, sent.offset,
                                "extended reply must echo the offset"
                            );
                        }
                        if chunk.chunk_type == ChunkType::OffsetData {
                            assert_eq!(chunk.length, 8 + sent.length, "data chunk covers the read");
                        }
                        if chunk.chunk_type == ChunkType::OffsetData
                            || chunk.chunk_type == ChunkType::OffsetHole
                        {
                            assert_eq!(sent.command, Command::Read, "content chunk for a non-read");
                        }
                    }
                    (chunk.cookie, chunk.flags.contains(ReplyFlags::DONE))
                }
            };
            // A streamed read stays in flight until the shell ends it, even
            // when its simple reply is final on the wire.
            if let Some(Payload::Data { id, offset, length }) = payload
                && self.streamed.remove(&id)
            {
                self.to_finish.push((id, offset + length - 1));
            }
            if self.untrusted {
                continue;
            }
            let sent = self
                .sent
                .get_mut(&cookie)
                .unwrap_or_else(|| panic!("reply for cookie {cookie} never sent"));
            assert!(
                !sent.finished,
                "reply after the final reply for cookie {cookie}"
            );
            assert_ne!(
                sent.command,
                Command::Disconnect,
                "NBD_CMD_DISC must not be answered"
            );
            sent.finished = final_reply;
        }
    }

    /// Feeds the rest, answers everything, and checks every request was
    /// answered exactly once when the stream was well-formed.
    fn finish(mut self) {
        for _ in 0..10_000 {
            if self.closed {
                break;
            }
            self.feed(usize::MAX);
            while let Some((id, _)) = self.to_finish.pop() {
                if self.conn.finish_streamed_read(id, Ok(())).is_err() {
                    self.closed = true;
                }
            }
            if let Some(request) = self.held.pop() {
                let id = request.id();
                let result = match request {
                    Request::Read { .. } => self.conn.complete_read(id, ReadOutcome::Data),
                    Request::BlockStatus { length, .. } => self
                        .conn
                        .complete_block_status(id, &[ExtDescriptor { length, status: 0 }]),
                    Request::Write { length, .. }
                        if self.write_received.get(&id).copied().unwrap_or(0) < length =>
                    {
                        self.conn.complete(id, Err(ErrorCode::Io))
                    }
                    _ => self.conn.complete(id, Ok(())),
                };
                if result == Err(CompletionError::Busy) {
                    self.held.push(request);
                } else {
                    assert_eq!(result, Ok(()), "completing {request:?} at the end");
                }
            }
            self.drain_output();
            if self.held.is_empty()
                && self.to_finish.is_empty()
                && self.stream.is_empty()
                && !self.conn.wants_transmit()
            {
                // One more pass lets deferred requests (flush, resize) out.
                self.feed(0);
                if self.held.is_empty() {
                    break;
                }
            }
        }
        if self.untrusted || self.ending || self.closed || !self.stream.is_empty() {
            return;
        }
        for (cookie, sent) in &self.sent {
            assert!(
                sent.finished,
                "request with cookie {cookie} ({:?}) never got its final reply",
                sent.command
            );
        }
    }
}
