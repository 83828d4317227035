//! What `poll_transmit` hands out: negotiation replies and transmission
//! replies (spec: "Simple reply message", "Structured reply chunk
//! message", "Structured reply types", extended headers).
//!
//! Each message is described first as an [`Out`] (header bytes in the
//! scratch, borrowed tails, the shell's payload) while the state advances,
//! then resolved into borrowed slices.

use super::connection::Connection;
use super::inflight::{Reply, RequestId, Slot};
use super::negotiation::BASE_ALLOCATION_ID;
use super::{Payload, Transmit};
use crate::export::Catalog;
use crate::wire::{ChunkPrefix, ChunkType, Command, ErrorCode, ReplyFlags, SimpleReply, WireError};

/// Bytes sent after the scratch header that the core does not copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Tail {
    #[default]
    Empty,
    Static(&'static [u8]),
    ExportName(usize),
    ExportDescription(usize),
    /// `start..end` of the connection's buffer.
    Buffer(usize, usize),
}

/// One message: `head` bytes of scratch, then the tails, then the payload.
pub(super) type Out = crate::shape::Out<Tail, Payload>;

impl<C: Catalog, const REQUESTS: usize, const BUFFER: usize> Connection<C, REQUESTS, BUFFER> {
    /// The next message to send, or `None` when nothing is due. The core
    /// counts the message as sent: the shell must send all of it (parts,
    /// then payload) before the next one.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        let out = match self.next_negotiation_output() {
            Some(out) => out,
            None => self.next_reply_output()?,
        };
        Some(self.resolve(out))
    }

    /// Whether `poll_transmit` would return a message.
    pub fn wants_transmit(&self) -> bool {
        self.output.has_message() || self.inflight.has_ready()
    }

    fn resolve(&self, out: Out) -> Transmit<'_> {
        let tail = |tail: Tail| -> &[u8] {
            match tail {
                Tail::Empty => &[],
                Tail::Static(bytes) => bytes,
                Tail::ExportName(index) => self
                    .catalog
                    .get(index)
                    .map_or(&[][..], |e| e.name.as_bytes()),
                Tail::ExportDescription(index) => self
                    .catalog
                    .get(index)
                    .map_or(&[][..], |e| e.description.as_bytes()),
                Tail::Buffer(start, end) => &self.buffer[start..end],
            }
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

    /// Encodes a header into the scratch.
    pub(super) fn head(
        &mut self,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, WireError>,
    ) -> Out {
        Out::encode_head(&mut self.scratch, encode)
    }

    /// The next transmission reply, freeing its slot when it is the last.
    fn next_reply_output(&mut self) -> Option<Out> {
        let (id, slot, reply) = self.inflight.pop_ready()?;
        debug!(
            "reply to cookie {:#x} ({:?}): {:?}",
            slot.cookie, slot.command, reply
        );
        let structured = self.features.structured_replies;
        let mut last = true;
        let out = match reply {
            Reply::Done { error: None }
                if structured && (slot.command == Command::Read || self.extended()) =>
            {
                self.chunk(&slot, ReplyFlags::DONE, ChunkPrefix::None)
            }
            Reply::Done {
                error: Some((error, reason)),
            } if structured => {
                let message = reason.message().as_bytes();
                let prefix = ChunkPrefix::Error {
                    chunk_type: ChunkType::Error,
                    error: error.to_wire(),
                    // Reasons are short constant sentences.
                    message_len: message.len() as u16,
                };
                let mut out = self.chunk(&slot, ReplyFlags::DONE, prefix);
                out.tails[0] = Tail::Static(message);
                out
            }
            Reply::Done { error } => self.simple(&slot, error.map(|(e, _)| e)),
            Reply::Data { last: data_last } => {
                last = data_last;
                let mut out = if structured {
                    let flags = if data_last {
                        ReplyFlags::DONE
                    } else {
                        ReplyFlags::empty()
                    };
                    let prefix = ChunkPrefix::OffsetData {
                        offset: slot.offset,
                        data_len: slot.length,
                    };
                    self.chunk(&slot, flags, prefix)
                } else {
                    self.simple(&slot, None)
                };
                out.payload = Some(Payload::Data {
                    id,
                    offset: slot.offset,
                    length: slot.length,
                });
                out
            }
            Reply::Zeroes if structured => {
                let prefix = ChunkPrefix::OffsetHole {
                    offset: slot.offset,
                    // Reads never exceed the maximum block size, a 32-bit value.
                    size: slot.length as u32,
                };
                self.chunk(&slot, ReplyFlags::DONE, prefix)
            }
            Reply::Zeroes => {
                let mut out = self.simple(&slot, None);
                out.payload = Some(Payload::Zeroes {
                    length: slot.length,
                });
                out
            }
            Reply::BlockStatus { bytes, count } => {
                let prefix = if self.extended() {
                    ChunkPrefix::BlockStatusExt {
                        context_id: BASE_ALLOCATION_ID,
                        count,
                    }
                } else {
                    ChunkPrefix::BlockStatus {
                        context_id: BASE_ALLOCATION_ID,
                        count,
                    }
                };
                debug_assert_eq!(prefix.tail_len(), bytes as u64);
                let mut out = self.chunk(&slot, ReplyFlags::DONE, prefix);
                let (start, end) = self.take_status_descriptors(bytes);
                out.tails[0] = Tail::Buffer(start, end);
                out
            }
            Reply::ErrorAt { error, offset } => {
                // No message: the trailing offset follows the fixed fields.
                let prefix = ChunkPrefix::Error {
                    chunk_type: ChunkType::ErrorOffset,
                    error: error.to_wire(),
                    message_len: 0,
                };
                let style = self.header_style();
                self.head(|out| {
                    let head = prefix.encode_with_header(
                        ReplyFlags::DONE,
                        slot.cookie,
                        slot.offset,
                        style,
                        out,
                    )?;
                    let trailer = ChunkPrefix::encode_error_offset(
                        offset,
                        out.get_mut(head..).unwrap_or_default(),
                    )?;
                    Ok(head + trailer)
                })
            }
        };
        self.after_reply(id, last);
        Some(out)
    }

    fn after_reply(&mut self, id: RequestId, last: bool) {
        if last {
            self.inflight.free(id);
        } else {
            self.inflight.start_streaming(id);
        }
    }

    fn extended(&self) -> bool {
        self.features.extended_headers
    }

    /// A simple reply (16 bytes).
    fn simple(&mut self, slot: &Slot, error: Option<ErrorCode>) -> Out {
        let reply = SimpleReply {
            error: error.map_or(0, ErrorCode::to_wire),
            cookie: slot.cookie,
        };
        self.head(|out| reply.encode(out))
    }

    /// A structured or extended chunk header and the fixed fields of
    /// `prefix`; the caller adds its tail.
    fn chunk(&mut self, slot: &Slot, flags: ReplyFlags, prefix: ChunkPrefix) -> Out {
        let style = self.header_style();
        self.head(|out| prefix.encode_with_header(flags, slot.cookie, slot.offset, style, out))
    }
}
