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
    ClientFlags, Command, CommandFlags, InfoRequest, InfoType, MetaContextRequest, OptionRequest,
    RequestHeader, WireError, WireList,
};

/// One message to send: bytes the core encoded and strings copied from
/// the [`Config`](super::Config), then the shell's [`Payload`].
pub type Transmit<'a> = crate::shape::Transmit<'a, Payload>;

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Tail {
    #[default]
    Empty,
    /// `start..end` of the buffer (export name, queries).
    Buffer(usize, usize),
    /// `start..end` of the scratch.
    Scratch(usize, usize),
}

/// One message: `head` bytes of scratch, then the tails, then the payload.
type Out = crate::shape::Out<Tail, Payload>;

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
        Out::encode_head(&mut self.scratch[..SECOND_PART], encode)
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
        info!("sending option {:?}", step.code());
        let settings = self.settings;
        let name_len = settings.name_len;
        let name = &self.buffer[..name_len];
        let name_tail = Tail::Buffer(0, name_len);
        let (head, second) = self.scratch.split_at_mut(SECOND_PART);
        let wanted = [
            (settings.request_name, InfoType::Name),
            (settings.request_description, InfoType::Description),
            (settings.request_block_size, InfoType::BlockSize),
        ];
        let mut types = [0u16; 3];
        let mut count = 0;
        for (_, info_type) in wanted.iter().filter(|(on, _)| *on) {
            types[count] = info_type.to_wire();
            count += 1;
        }
        let info = InfoRequest {
            name,
            requests: WireList::Items(&types[..count]),
        };
        let meta = MetaContextRequest {
            export_name: name,
            // The query count and queries `new` encoded after the name.
            queries: WireList::Encoded {
                count: settings.query_count,
                bytes: self
                    .buffer
                    .get(name_len + 4..settings.queries_end)
                    .unwrap_or(&[]),
            },
        };
        let (request, tails) = match step {
            OptionStep::StartTls => (OptionRequest::StartTls, [Tail::Empty; 2]),
            OptionStep::ExtendedHeaders => (OptionRequest::ExtendedHeaders, [Tail::Empty; 2]),
            OptionStep::StructuredReply => (OptionRequest::StructuredReply, [Tail::Empty; 2]),
            OptionStep::List => (OptionRequest::List, [Tail::Empty; 2]),
            OptionStep::Abort => (OptionRequest::Abort, [Tail::Empty; 2]),
            OptionStep::ExportName => {
                (OptionRequest::ExportName { name }, [name_tail, Tail::Empty])
            }
            OptionStep::Info | OptionStep::Go => {
                // The count and types go after the name, from the scratch's
                // second part; three types fit.
                let len = InfoRequest::encode_requests(info.requests.iter(), second);
                debug_assert!(len.is_ok(), "info requests: {len:?}");
                let len = len.unwrap_or(0);
                let request = if step == OptionStep::Go {
                    OptionRequest::Go(info)
                } else {
                    OptionRequest::Info(info)
                };
                (
                    request,
                    [name_tail, Tail::Scratch(SECOND_PART, SECOND_PART + len)],
                )
            }
            OptionStep::SetMetaContext | OptionStep::ListMetaContext => {
                let request = if step == OptionStep::SetMetaContext {
                    OptionRequest::SetMetaContext(meta)
                } else {
                    OptionRequest::ListMetaContext(meta)
                };
                (
                    request,
                    [name_tail, Tail::Buffer(name_len, settings.queries_end)],
                )
            }
        };
        // Strings are at most 4096 bytes each (checked in `new`), so the
        // option's length fits its field.
        let mut out = Out::encode_head(head, |out| request.encode_prefix(out));
        out.tails = tails;
        Some(out)
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
