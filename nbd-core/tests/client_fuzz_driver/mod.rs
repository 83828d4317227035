//! Drives a client connection from arbitrary bytes: the server stream
//! (raw garbage, and messages shaped after what the client asked so the
//! conversation gets deep), how it is split across `process` calls, the
//! commands the shell issues with any arguments, disconnects and the end
//! of input.
//!
//! Shared by the `client_robustness` proptest and the `client` cargo-fuzz
//! target, so both check the same invariants, which hold whatever the
//! server sends:
//!
//! - nothing panics;
//! - a command is accepted only inside the export, aligned, within the
//!   maximum, with flags the server advertised; a refused one queues nothing;
//! - a write's payload is announced with the write's own offset and length;
//! - every event names a request that was issued and is not done; each
//!   request is done at most once; read pieces lie inside the read and
//!   never repeat a byte; a successful read covered every byte;
//! - block status descriptors are nonzero, inside the export, for a
//!   selected context, and only for block status requests;
//! - after a protocol error, the connection sends nothing and refuses input.

#![allow(dead_code)]

#[path = "../fuzz_bytes/mod.rs"]
mod fuzz_bytes;
#[path = "../client_harness/messages.rs"]
mod messages;
mod server;

use std::collections::HashMap;

use fuzz_bytes::Bytes;

use nbd_core::client::{
    Config, Connection, Event, Mode, Payload, ProtocolError, RequestId, TlsPolicy, UsageError,
};
use nbd_core::wire::{Command, CommandFlags, OptionHeader, RequestHeader};

const EXTENDED_REQUEST_MAGIC: [u8; 4] = 0x21e4_1c71u32.to_be_bytes();
const REQUEST_MAGIC: [u8; 4] = 0x2560_9513u32.to_be_bytes();
/// Reads up to this length have every byte tracked.
const TRACKED: u64 = 1 << 17;

const QUERIES: [&str; 2] = ["base:allocation", "x-fuzz:other"];

/// How deep one case went, for checking the driver itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Transmission was reached.
    pub ready: bool,
    /// Requests accepted by the core.
    pub issued: usize,
    /// Requests done, successfully or not.
    pub done: usize,
    /// Read pieces and block status events.
    pub content: usize,
    /// The case ended with a protocol error.
    pub failed: bool,
    /// Which one.
    pub error: Option<ProtocolError>,
}

/// Runs one fuzz case.
pub fn run(data: &[u8]) {
    run_with_stats(data);
}

/// Runs one fuzz case and tells how deep it went.
pub fn run_with_stats(data: &[u8]) -> Stats {
    let mut bytes = Bytes(data);
    let setup = bytes.u8();
    let config = Config {
        export_name: if setup & 0x40 != 0 { "" } else { "disk" },
        mode: match setup & 7 {
            6 => Mode::Info,
            7 => Mode::List,
            _ => Mode::Go,
        },
        tls: match (setup >> 4) & 3 {
            1 => TlsPolicy::Optional,
            2 => TlsPolicy::Required,
            _ => TlsPolicy::Disabled,
        },
        structured_replies: setup & 0x01 != 0,
        extended_headers: setup & 0x08 != 0,
        meta_contexts: if setup & 0x20 != 0 {
            &QUERIES
        } else {
            &QUERIES[..1]
        },
        request_name: true,
        request_description: true,
        request_block_size: setup & 0x10 == 0,
    };
    if setup & 0x80 != 0 {
        Driver::<4, 128>::new(config).run(bytes)
    } else {
        Driver::<16, 1024>::new(config).run(bytes)
    }
}

/// What the driver knows of a request it issued.
struct Issued {
    command: Command,
    flags: CommandFlags,
    offset: u64,
    length: u64,
    /// The header went out: the generator may answer it.
    sent: bool,
    /// Bytes of a tracked read delivered so far.
    seen: Option<Vec<bool>>,
}

struct Driver<const R: usize, const B: usize> {
    client: Connection<R, B>,
    /// Server bytes not yet fed.
    stream: Vec<u8>,
    issued: HashMap<RequestId, Issued>,
    /// The last option the client sent.
    last_option: u32,
    /// Metadata context ids the client reported.
    contexts: Vec<u32>,
    failed: bool,
    closed: bool,
    stats: Stats,
    /// The client agreed to drop the zeroes after `NBD_OPT_EXPORT_NAME`.
    no_zeroes: bool,
    /// The client took a greeting.
    greeted: bool,
}

impl<const R: usize, const B: usize> Driver<R, B> {
    fn new(config: Config<'_>) -> Self {
        Self {
            client: Connection::new(config).expect("fuzz configurations fit"),
            stream: Vec::new(),
            issued: HashMap::new(),
            last_option: 0,
            contexts: Vec::new(),
            failed: false,
            closed: false,
            stats: Stats::default(),
            no_zeroes: false,
            greeted: false,
        }
    }

    fn run(mut self, mut bytes: Bytes<'_>) -> Stats {
        // Most cases start with a valid greeting.
        if bytes.u8() & 0x80 == 0 {
            self.stream
                .extend_from_slice(&messages::greeting(u16::from(bytes.u8() & 3 | 1)));
        }
        while !bytes.is_empty() {
            match bytes.u8() % 12 {
                // Garbage, rarely: it ends most conversations.
                0 if bytes.u8() < 4 => {
                    let n = usize::from(bytes.u8() % 48);
                    self.stream.extend_from_slice(bytes.take(n));
                }
                0..=4 => self.generate(&mut bytes),
                5 | 6 => {
                    let n = usize::from(bytes.u16() % 4096);
                    let piece = usize::from(bytes.u8()).max(1);
                    self.feed(n, piece);
                }
                7 | 8 => self.issue(&mut bytes),
                9 => self.drain(),
                10 if bytes.u8() < 8 => {
                    let result = if bytes.u8() & 1 == 0 {
                        self.client.disconnect()
                    } else {
                        self.client.abort()
                    };
                    if result.is_err() {
                        assert!(self.client.is_closed() || self.failed);
                    }
                }
                10 => self.issue(&mut bytes),
                _ => {
                    if bytes.u8() == 0xff {
                        let _ = self.client.end_of_input();
                        self.closed = true;
                    }
                }
            }
        }
        self.drain();
        self.feed(usize::MAX, usize::MAX);
        self.drain();
        self.stats.failed = self.stats.error.is_some();
        self.stats
    }

    /// Feeds up to `n` stream bytes, `piece` at a time, checking events;
    /// sends what becomes due after each event, as a shell does.
    fn feed(&mut self, n: usize, piece: usize) {
        let mut stream = std::mem::take(&mut self.stream);
        let end = n.min(stream.len());
        let mut start = 0usize;
        while !self.failed {
            let stop = end.min(start.saturating_add(piece));
            let size = self.client.export_size();
            let step = match self.client.process(&stream[start..stop]) {
                Ok(step) => step,
                Err(error) => {
                    if error != ProtocolError::Closed {
                        self.stats.error.get_or_insert(error);
                    }
                    self.fail();
                    break;
                }
            };
            let consumed = step.consumed;
            assert!(consumed <= stop - start);
            let had_event = step.event.is_some();
            match &step.event {
                Some(Event::Ready) => self.stats.ready = true,
                Some(Event::Greeted { .. }) => self.greeted = true,
                Some(Event::Done { .. }) => self.stats.done += 1,
                Some(
                    Event::ReadData { .. } | Event::ReadHole { .. } | Event::BlockStatus { .. },
                ) => self.stats.content += 1,
                _ => {}
            }
            if let Some(event) = step.event {
                on_event(
                    &mut self.issued,
                    &mut self.contexts,
                    self.last_option,
                    event,
                    size,
                );
            }
            start += consumed;
            if had_event {
                self.drain();
                continue;
            }
            // Without an event the client takes all it is given.
            assert_eq!(start, stop, "input left without an event");
            if stop == end {
                break;
            }
        }
        stream.drain(..start);
        self.stream = stream;
    }

    fn fail(&mut self) {
        self.failed = true;
        assert!(self.client.is_closed(), "an error closes the connection");
        assert!(
            self.client.poll_transmit().is_none(),
            "nothing after an error"
        );
        assert_eq!(
            self.client.process(&[0]).map(|s| s.consumed),
            Err(ProtocolError::Closed)
        );
    }

    /// Takes every message the client wants to send and checks it.
    fn drain(&mut self) {
        while let Some(transmit) = self.client.poll_transmit() {
            assert!(!self.failed, "transmit after an error");
            let head = transmit.parts[0];
            if head.len() >= 16 && head[..8] == messages::IHAVEOPT.to_be_bytes() {
                let (_, header) = OptionHeader::parse(head).expect("option header");
                let data: usize = transmit.parts[1..].iter().map(|p| p.len()).sum();
                assert_eq!(header.length as usize, head.len() - 16 + data);
                self.last_option = header.code.to_wire();
                if self.last_option == 10 {
                    self.contexts.clear();
                }
            } else if head.len() >= 28
                && (head[..4] == REQUEST_MAGIC || head[..4] == EXTENDED_REQUEST_MAGIC)
            {
                let (_, (_, header)) = RequestHeader::parse_any(head).expect("request header");
                let payload = transmit.payload;
                self.on_request(header, payload);
            } else {
                assert_eq!(head.len(), 4, "client flags");
                self.no_zeroes = head[3] & 2 != 0;
            }
        }
    }

    fn on_request(&mut self, header: RequestHeader, payload: Option<Payload>) {
        if header.command == Command::Disconnect {
            assert!(payload.is_none());
            return;
        }
        let id = RequestId::from_bits(u32::try_from(header.cookie).expect("cookie"));
        let r = self
            .issued
            .get_mut(&id)
            .expect("header for an issued request");
        assert!(!r.sent, "header sent twice");
        r.sent = true;
        assert_eq!(
            (header.command, header.offset, header.length),
            (r.command, r.offset, r.length)
        );
        assert_eq!(header.flags.without(CommandFlags::PAYLOAD_LEN), r.flags);
        match payload {
            Some(Payload::Data {
                id: p,
                offset,
                length,
            }) => {
                assert_eq!(header.command, Command::Write);
                assert_eq!((p, offset, length), (id, r.offset, r.length));
            }
            Some(_) => panic!("unknown payload"),
            None => assert_ne!(header.command, Command::Write, "write without payload"),
        }
    }

    /// Issues a command with arguments from the fuzzer, checking the
    /// core's verdict against the export.
    fn issue(&mut self, bytes: &mut Bytes<'_>) {
        let choice = bytes.u8();
        let shape = bytes.u8();
        let offset = match shape & 3 {
            0 => u64::from(bytes.u16()) * 512,
            1 => u64::from(bytes.u32()),
            2 => self
                .client
                .export_size()
                .unwrap_or(0)
                .wrapping_sub(u64::from(bytes.u16())),
            _ => bytes.u64(),
        };
        let length = match (shape >> 2) & 3 {
            0 => u64::from(bytes.u8() % 64 + 1) * 512,
            1 => u64::from(bytes.u16()),
            2 => 0,
            _ => bytes.u64(),
        };
        let flags = match bytes.u8() {
            0..128 => CommandFlags::empty(),
            bits => CommandFlags(u16::from(bits) & 0x1f),
        };
        let before = self.client.in_flight();
        let (command, result) = match choice % 10 {
            0 | 1 => (Command::Read, self.client.read(offset, length, flags)),
            2 => (
                Command::Write,
                self.client
                    .write(offset, length, flags.contains(CommandFlags::FUA)),
            ),
            3 => (Command::Flush, self.client.flush()),
            4 => (
                Command::Trim,
                self.client
                    .trim(offset, length, flags.contains(CommandFlags::FUA)),
            ),
            5 => (Command::Cache, self.client.cache(offset, length)),
            6 => (
                Command::WriteZeroes,
                self.client.write_zeroes(offset, length, flags),
            ),
            7 | 8 => (
                Command::BlockStatus,
                self.client
                    .block_status(offset, length, flags.contains(CommandFlags::REQ_ONE)),
            ),
            _ => (Command::Resize, self.client.resize(offset)),
        };
        let id = match result {
            Ok(id) => id,
            Err(error) => {
                assert_eq!(
                    self.client.in_flight(),
                    before,
                    "refused {error:?} but queued"
                );
                if error == UsageError::Full {
                    assert_eq!(before, R);
                }
                return;
            }
        };
        assert_eq!(self.client.in_flight(), before + 1);
        self.stats.issued += 1;
        let export = self.client.export().expect("accepted without an export");
        let (flags, offset, length) = match command {
            Command::Flush => (CommandFlags::empty(), 0, 0),
            Command::Resize => (CommandFlags::empty(), offset, 0),
            Command::Write | Command::Trim => (only(flags, CommandFlags::FUA), offset, length),
            Command::Cache => (CommandFlags::empty(), offset, length),
            Command::BlockStatus => (only(flags, CommandFlags::REQ_ONE), offset, length),
            _ => (flags, offset, length),
        };
        if !matches!(command, Command::Flush | Command::Resize) {
            assert!(length > 0);
            assert!(
                offset
                    .checked_add(length)
                    .is_some_and(|end| end <= export.size)
            );
            let minimum = u64::from(export.block_sizes.minimum);
            assert_eq!(offset % minimum, 0, "misaligned offset accepted");
        }
        if matches!(command, Command::Read | Command::Write | Command::Cache) {
            assert!(length <= u64::from(export.block_sizes.maximum));
        }
        assert!(!flags.contains(CommandFlags::FUA) || export.can_fua());
        assert!(!flags.contains(CommandFlags::DF) || export.can_df());
        assert!(!flags.contains(CommandFlags::FAST_ZERO) || export.can_fast_zero());
        assert!(command != Command::BlockStatus || !self.contexts.is_empty());
        let seen =
            (command == Command::Read && length <= TRACKED).then(|| vec![false; length as usize]);
        let previous = self.issued.insert(
            id,
            Issued {
                command,
                flags,
                offset,
                length,
                sent: false,
                seen,
            },
        );
        assert!(previous.is_none(), "id {id:?} reused while in flight");
    }
}

/// Checks one event against what the driver issued.
fn on_event(
    issued: &mut HashMap<RequestId, Issued>,
    contexts: &mut Vec<u32>,
    last_option: u32,
    event: Event<'_>,
    export_size: Option<u64>,
) {
    fn request(issued: &mut HashMap<RequestId, Issued>, id: RequestId) -> &mut Issued {
        issued
            .get_mut(&id)
            .unwrap_or_else(|| panic!("event for {id:?}, not in flight"))
    }
    match event {
        Event::ReadData { id, offset, data } => mark(
            request(issued, id),
            Command::Read,
            offset,
            data.len() as u64,
        ),
        Event::ReadHole { id, offset, length } => {
            mark(request(issued, id), Command::Read, offset, length)
        }
        Event::BlockStatus {
            id,
            context_id,
            offset,
            descriptors,
        } => {
            let r = request(issued, id);
            assert_eq!(r.command, Command::BlockStatus);
            assert!(contexts.contains(&context_id), "unselected context");
            let size = export_size.expect("block status without an export");
            let mut at = offset;
            assert!(!descriptors.is_empty());
            for d in descriptors.iter() {
                assert!(d.length > 0, "empty descriptor");
                at = at.checked_add(d.length).expect("descriptor overflows");
                assert!(at <= size, "descriptor past the export");
            }
        }
        Event::Done { id, result } => {
            let r = issued
                .remove(&id)
                .unwrap_or_else(|| panic!("{id:?} done twice or never issued"));
            assert!(r.sent, "done before its header went out");
            if let (Ok(()), Some(seen)) = (result, &r.seen) {
                assert!(seen.iter().all(|&s| s), "successful read not covered");
            }
        }
        Event::MetaContext { id, .. } if last_option == 10 => contexts.push(id),
        Event::StartTls => contexts.clear(),
        _ => {}
    }
}

fn only(flags: CommandFlags, flag: CommandFlags) -> CommandFlags {
    CommandFlags::empty().with_if(flag, flags.contains(flag))
}

/// Marks a read piece delivered: inside the read, never twice.
fn mark(r: &mut Issued, command: Command, offset: u64, length: u64) {
    assert_eq!(r.command, command, "read data for a {:?}", r.command);
    assert!(length > 0, "empty read piece");
    let start = offset.checked_sub(r.offset).expect("piece before the read");
    let end = start.checked_add(length).expect("piece overflows");
    assert!(end <= r.length, "piece past the read");
    if let Some(seen) = r.seen.as_mut() {
        for byte in &mut seen[start as usize..end as usize] {
            assert!(!*byte, "read byte delivered twice");
            *byte = true;
        }
    }
}
