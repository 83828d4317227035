//! What `poll_transmit` hands out: the client flags, options (spec: "Fixed
//! newstyle negotiation", "Option types") and request headers (spec:
//! "Request message", extended headers).
//!
//! Each message is described first as an [`Out`] (header bytes in the
//! scratch, tails in the scratch or the buffer, the shell's payload) while
//! the state advances, then resolved into borrowed slices.

use super::RequestId;
use super::connection::{Connection, Ending, Phase, SECOND_PART};
use super::negotiation::OptionStep;
use crate::wire::{
    ClientFlags, Command, CommandFlags, InfoType, OptionHeader, RequestHeader, WireError,
    encode_u16, encode_u32,
};

/// One message to send: `parts` in order (empty ones skipped), then the
/// shell-owned `payload`, if any. The core counts it as sent once returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Bytes the core encoded, and strings copied from the [`Config`](super::Config).
    pub parts: [&'a [u8]; 3],
    /// What the shell appends after the parts.
    pub payload: Option<Payload>,
}

impl Transmit<'_> {
    /// Total bytes of `parts`.
    pub fn parts_len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }
}

/// Shell-owned bytes that follow a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Payload {
    /// The data of write `id`: `length` bytes for export offset `offset`.
    Data {
        /// The write.
        id: RequestId,
        /// Export offset of the first byte.
        offset: u64,
        /// Bytes to send.
        length: u64,
    },
}

/// Bytes sent after the scratch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tail {
    Empty,
    /// `start..end` of the buffer (export name, queries).
    Buffer(usize, usize),
    /// `start..end` of the scratch.
    Scratch(usize, usize),
}

/// One message: `head` bytes of scratch, then the tails, then the payload.
#[derive(Clone, Copy, Debug)]
struct Out {
    head: usize,
    tails: [Tail; 2],
    payload: Option<Payload>,
}

/// Cookie of `NBD_CMD_DISC`, which gets no reply: above every request's.
const DISCONNECT_COOKIE: u64 = u64::MAX;

impl<const REQUESTS: usize, const BUFFER: usize> Connection<REQUESTS, BUFFER> {
    /// The next message to send, or `None` when nothing is due. The core
    /// counts the message as sent: the shell must send all of it (parts,
    /// then payload) before the next one.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        let out = match self.phase {
            Phase::Negotiating => self.next_option()?,
            Phase::Transmission => self.next_request()?,
            Phase::Greeting | Phase::Closed => return None,
        };
        Some(self.resolve_out(out))
    }

    /// Whether `poll_transmit` would return a message.
    pub fn wants_transmit(&self) -> bool {
        match self.phase {
            Phase::Negotiating => {
                self.negotiation.send_flags
                    || (self.negotiation.current.is_some() && !self.negotiation.sent)
            }
            Phase::Transmission => self.inflight.has_queued() || self.disconnect_due(),
            Phase::Greeting | Phase::Closed => false,
        }
    }

    fn resolve_out(&self, out: Out) -> Transmit<'_> {
        let tail = |tail: Tail| -> &[u8] {
            let bytes = match tail {
                Tail::Empty => None,
                Tail::Buffer(start, end) => self.buffer.get(start..end),
                Tail::Scratch(start, end) => self.scratch.get(start..end),
            };
            bytes.unwrap_or(&[])
        };
        Transmit {
            parts: [
                &self.scratch[..out.head],
                tail(out.tails[0]),
                tail(out.tails[1]),
            ],
            payload: out.payload,
        }
    }

    /// Encodes a header into the scratch, which fits every header the
    /// client sends.
    fn head(&mut self, encode: impl FnOnce(&mut [u8]) -> Result<usize, WireError>) -> Out {
        let head = encode(&mut self.scratch[..SECOND_PART]);
        debug_assert!(head.is_ok(), "scratch too small: {head:?}");
        Out {
            head: head.unwrap_or(0),
            tails: [Tail::Empty; 2],
            payload: None,
        }
    }

    /// The client flags, then the current option once.
    fn next_option(&mut self) -> Option<Out> {
        if self.negotiation.send_flags {
            self.negotiation.send_flags = false;
            let flags = ClientFlags::FIXED_NEWSTYLE.with_if(ClientFlags::NO_ZEROES, self.no_zeroes);
            debug!("client flags {:?}", flags);
            return Some(self.head(|out| flags.encode(out)));
        }
        let step = self.negotiation.current?;
        if self.negotiation.sent {
            return None;
        }
        self.negotiation.sent = true;
        let code = step.code();
        info!("sending option {:?}", code);
        let name_len = self.settings.name_len;
        let name = Tail::Buffer(0, name_len);
        let out = match step {
            OptionStep::StartTls
            | OptionStep::ExtendedHeaders
            | OptionStep::StructuredReply
            | OptionStep::List
            | OptionStep::Abort => self.option_header(code, 0),
            OptionStep::ExportName => {
                let mut out = self.option_header(code, name_len);
                out.tails[0] = name;
                out
            }
            OptionStep::Info | OptionStep::Go => {
                let requests = self.encode_info_requests();
                let mut out = self.option_header(code, 4 + name_len + requests);
                out.head += encode_u32(&mut self.scratch[out.head..], name_len as u32);
                out.tails = [name, Tail::Scratch(SECOND_PART, SECOND_PART + requests)];
                out
            }
            OptionStep::SetMetaContext | OptionStep::ListMetaContext => {
                let queries_end = self.settings.queries_end;
                let mut out = self.option_header(code, 4 + queries_end);
                out.head += encode_u32(&mut self.scratch[out.head..], name_len as u32);
                out.tails = [name, Tail::Buffer(name_len, queries_end)];
                out
            }
        };
        Some(out)
    }

    fn option_header(&mut self, code: crate::wire::OptionCode, length: usize) -> Out {
        let header = OptionHeader {
            code,
            // Strings are at most 4096 bytes each (checked in `new`).
            length: length as u32,
        };
        self.head(|out| header.encode(out))
    }

    /// Writes the count and types of `NBD_INFO_*` wanted at the scratch's
    /// second part; returns their length.
    fn encode_info_requests(&mut self) -> usize {
        let wanted = [
            (self.settings.request_name, InfoType::Name),
            (self.settings.request_description, InfoType::Description),
            (self.settings.request_block_size, InfoType::BlockSize),
        ];
        let mut at = SECOND_PART + 2;
        let mut count = 0u16;
        for (_, info_type) in wanted.iter().filter(|(on, _)| *on) {
            at += encode_u16(&mut self.scratch[at..], info_type.to_wire());
            count += 1;
        }
        encode_u16(&mut self.scratch[SECOND_PART..], count);
        at - SECOND_PART
    }

    /// Whether `NBD_CMD_DISC` goes out now: asked for, every header sent,
    /// and (unless aborting) every request answered.
    pub(super) fn disconnect_due(&self) -> bool {
        !self.disc_sent
            && !self.inflight.has_queued()
            && match self.ending {
                Ending::Open => false,
                Ending::Disconnect => self.inflight.is_empty(),
                Ending::Abort => true,
            }
    }

    /// The next request header, then `NBD_CMD_DISC` when due.
    fn next_request(&mut self) -> Option<Out> {
        let style = self.header_style();
        if let Some((id, slot)) = self.inflight.pop_queued() {
            debug!(
                "request {:?} cookie {:#x} offset {} length {}",
                slot.command,
                id.cookie(),
                slot.offset,
                slot.length
            );
            let header = RequestHeader {
                flags: slot.flags,
                command: slot.command,
                cookie: id.cookie(),
                offset: slot.offset,
                length: slot.length,
            };
            let mut out = self.head(|out| header.encode(style, out));
            if slot.command == Command::Write {
                out.payload = Some(Payload::Data {
                    id,
                    offset: slot.offset,
                    length: slot.length,
                });
            }
            return Some(out);
        }
        if !self.disconnect_due() {
            return None;
        }
        info!("sending NBD_CMD_DISC");
        self.disc_sent = true;
        let header = RequestHeader {
            flags: CommandFlags::empty(),
            command: Command::Disconnect,
            cookie: DISCONNECT_COOKIE,
            offset: 0,
            length: 0,
        };
        Some(self.head(|out| header.encode(style, out)))
    }
}
