//! Replies in the transmission phase (spec: "Simple reply message",
//! "Structured reply chunk message", "Structured reply types", "Request
//! types", extended headers).
//!
//! Every reply header is checked against the negotiated style and the
//! request its cookie names; chunk payloads are read as they arrive: read
//! data and block status descriptors are handed out as slices of the input,
//! small fixed fields are collected in the accumulator, error messages are
//! skipped.

use super::ProtocolError;
use super::connection::{Connection, Ending, Raw, Span};
use super::event::parse_descriptor;
use super::inflight::{Progress, RequestId, Slot};
use super::negotiation::wire_error;
use crate::wire::{
    ChunkHeader, ChunkPrefix, ChunkType, Command, CommandFlags, ERROR_OFFSET_TRAILER_LEN,
    ErrorCode, HeaderStyle, REPLY_MAGIC_LEN, ReplyFlags, ReplyHeader, ReplyKind, SimpleReply,
};

/// What the next input bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Receive {
    /// A reply header; its magic gives its length.
    Header,
    /// Data of a successful simple reply to a read.
    SimpleData {
        id: RequestId,
        offset: u64,
        remaining: u64,
    },
    /// A chunk's payload.
    Chunk(ChunkRead),
}

/// A chunk whose payload is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChunkRead {
    id: RequestId,
    chunk_type: ChunkType,
    done: bool,
    /// Payload bytes still to come.
    remaining: u64,
    part: Part,
}

/// Which field of the payload comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The type's fixed fields ([`ChunkPrefix`]).
    Prefix,
    /// The data, for export offset `offset`.
    Data { offset: u64 },
    /// The message, skipped; then the offset of `ERROR_OFFSET`, or the rest.
    ErrorMessage { left: u16, then_offset: bool },
    /// The offset of `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset,
    /// Descriptors, the next one starting at export offset `offset`.
    Descriptors { context_id: u32, offset: u64 },
    /// The rest of an unknown error chunk.
    Skip,
}

impl<const REQUESTS: usize, const BUFFER: usize> Connection<REQUESTS, BUFFER> {
    pub(super) fn process_reply(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        if input.is_empty() {
            return Ok((0, None));
        }
        match self.receive {
            Receive::Header => self.read_header(input),
            Receive::SimpleData {
                id,
                offset,
                remaining,
            } => {
                let take = remaining.min(input.len() as u64);
                let remaining = remaining - take;
                let data = Raw::ReadData {
                    id,
                    offset,
                    data: Span::Input(0, take as usize),
                };
                if remaining > 0 {
                    self.receive = Receive::SimpleData {
                        id,
                        offset: offset + take,
                        remaining,
                    };
                    return Ok((take as usize, Some(data)));
                }
                self.receive = Receive::Header;
                self.pending = Some(self.finish(id)?);
                Ok((take as usize, Some(data)))
            }
            Receive::Chunk(chunk) => self.read_chunk(chunk, input),
        }
    }

    /// A reply header, checked against the negotiated style.
    fn read_header(&mut self, input: &[u8]) -> Result<(usize, Option<Raw>), ProtocolError> {
        let mut used = 0;
        if self.accumulator.len() < REPLY_MAGIC_LEN {
            let (taken, ready) = self.accumulator.fill(input, REPLY_MAGIC_LEN);
            used += taken;
            if !ready {
                return Ok((used, None));
            }
        }
        let kind = ReplyHeader::parse_kind(self.accumulator.bytes())
            .map_err(wire_error)?
            .1;
        let features = self.features;
        let allowed = match kind {
            ReplyKind::Simple => !features.extended_headers,
            ReplyKind::Structured => features.structured_replies && !features.extended_headers,
            ReplyKind::Extended => features.extended_headers,
        };
        let len = kind.header_len();
        if !allowed {
            return Err(ProtocolError::WrongHeaderStyle);
        }
        let (taken, ready) = self.accumulator.fill(&input[used..], len);
        used += taken;
        if !ready {
            return Ok((used, None));
        }
        let header = ReplyHeader::parse(self.accumulator.bytes())
            .map_err(wire_error)?
            .1;
        self.accumulator.clear();
        let raw = match header {
            ReplyHeader::Simple(reply) => self.on_simple(reply)?,
            ReplyHeader::Structured(chunk) => self.on_chunk(chunk, HeaderStyle::Compact)?,
            ReplyHeader::Extended(chunk) => self.on_chunk(chunk, HeaderStyle::Extended)?,
        };
        Ok((used, raw))
    }

    /// The request a reply's cookie names.
    fn replied(&self, cookie: u64) -> Result<(RequestId, Slot), ProtocolError> {
        self.inflight
            .by_cookie(cookie)
            .ok_or(ProtocolError::UnknownCookie { cookie })
    }

    fn on_simple(&mut self, reply: SimpleReply) -> Result<Option<Raw>, ProtocolError> {
        let (id, slot) = self.replied(reply.cookie)?;
        if slot.command == Command::Read && self.features.structured_replies {
            return Err(ProtocolError::SimpleReplyToRead);
        }
        match ErrorCode::from_wire(reply.error) {
            Some(error) => {
                self.record_error(id, error);
                self.finish(id).map(Some)
            }
            None if slot.command == Command::Read => {
                self.receive = Receive::SimpleData {
                    id,
                    offset: slot.offset,
                    remaining: slot.length,
                };
                Ok(None)
            }
            // Block status needs a structured reply with descriptors.
            None if slot.command == Command::BlockStatus => Err(ProtocolError::MissingBlockStatus),
            None => self.finish(id).map(Some),
        }
    }

    /// A chunk header: which payload follows, and whether the request
    /// allows it.
    fn on_chunk(
        &mut self,
        header: ChunkHeader,
        style: HeaderStyle,
    ) -> Result<Option<Raw>, ProtocolError> {
        let (id, slot) = self.replied(header.cookie)?;
        if style == HeaderStyle::Extended && header.offset != slot.offset {
            return Err(ProtocolError::OffsetMismatch {
                expected: slot.offset,
                found: header.offset,
            });
        }
        let ChunkHeader {
            flags,
            chunk_type,
            length,
            ..
        } = header;
        let done = flags.contains(ReplyFlags::DONE);
        let extended = style == HeaderStyle::Extended;
        let command = slot.command;
        let bad = ProtocolError::BadChunk { chunk_type };
        let check = |ok: bool| if ok { Ok(()) } else { Err(bad) };
        let allowed = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ProtocolError::UnexpectedChunk {
                    chunk_type,
                    command,
                })
            }
        };
        // What the length alone tells; the fields are checked as they come.
        let shape = ChunkPrefix::check_length(chunk_type, length).is_ok();
        match chunk_type {
            ChunkType::None => {
                check(shape && done)?;
                return self.finish(id).map(Some);
            }
            ChunkType::OffsetData => {
                allowed(command == Command::Read)?;
                check(shape && length - 8 <= slot.length)?;
            }
            ChunkType::OffsetHole => {
                allowed(command == Command::Read)?;
                check(shape)?;
            }
            ChunkType::BlockStatus => {
                allowed(command == Command::BlockStatus && !extended)?;
                check(shape)?;
            }
            ChunkType::BlockStatusExt => {
                allowed(command == Command::BlockStatus && extended)?;
                check(shape)?;
            }
            ChunkType::ErrorOffset => {
                allowed(slot.length > 0)?;
                check(shape)?;
            }
            other if other.is_error() => check(shape)?,
            _ => {
                return Err(ProtocolError::UnexpectedChunk {
                    chunk_type,
                    command,
                });
            }
        }
        let part = Part::Prefix;
        self.receive = Receive::Chunk(ChunkRead {
            id,
            chunk_type,
            done,
            remaining: length,
            part,
        });
        Ok(None)
    }

    /// Collects the `need` bytes of `chunk`'s fixed fields, which may
    /// arrive split across inputs; `None` until whole, then what `parse`
    /// reads from them.
    fn fields<T>(
        &mut self,
        chunk: &mut ChunkRead,
        input: &[u8],
        need: usize,
        parse: impl FnOnce(&[u8]) -> T,
    ) -> (usize, Option<T>) {
        let (used, ready) = self.accumulator.fill(input, need);
        chunk.remaining -= used as u64;
        if !ready {
            return (used, None);
        }
        let value = parse(self.accumulator.bytes());
        self.accumulator.clear();
        (used, Some(value))
    }

    fn read_chunk(
        &mut self,
        mut chunk: ChunkRead,
        input: &[u8],
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        let (used, event) = match chunk.part {
            Part::Prefix => self.read_prefix(&mut chunk, input)?,
            Part::Data { offset } => {
                let take = chunk.remaining.min(input.len() as u64);
                chunk.remaining -= take;
                chunk.part = Part::Data {
                    offset: offset + take,
                };
                let data = Raw::ReadData {
                    id: chunk.id,
                    offset,
                    data: Span::Input(0, take as usize),
                };
                (take as usize, Some(data))
            }
            Part::ErrorMessage { left, then_offset } => {
                let take = usize::from(left).min(input.len());
                let left = left - take as u16;
                chunk.remaining -= take as u64;
                chunk.part = match left {
                    0 if then_offset => Part::ErrorOffset,
                    0 => Part::Skip,
                    _ => Part::ErrorMessage { left, then_offset },
                };
                (take, None)
            }
            Part::ErrorOffset => {
                match self.fields(&mut chunk, input, ERROR_OFFSET_TRAILER_LEN, |bytes| {
                    ChunkPrefix::parse_error_offset(bytes).map(|(_, offset)| offset)
                }) {
                    (used, Some(offset)) => {
                        // The accumulator held all the bytes the parse needs.
                        let offset = offset.map_err(|_| ProtocolError::BadChunk {
                            chunk_type: chunk.chunk_type,
                        })?;
                        let in_range = self
                            .inflight
                            .get(chunk.id)
                            .is_some_and(|slot| slot.contains(offset, 1));
                        if !in_range {
                            return Err(ProtocolError::ChunkOutOfRange);
                        }
                        debug!("error at offset {}", offset);
                        (used, None)
                    }
                    (used, None) => (used, None),
                }
            }
            Part::Descriptors { context_id, offset } => {
                self.read_descriptors(&mut chunk, input, context_id, offset)?
            }
            Part::Skip => {
                let take = chunk.remaining.min(input.len() as u64);
                chunk.remaining -= take;
                (take as usize, None)
            }
        };
        if chunk.remaining > 0 {
            self.receive = Receive::Chunk(chunk);
            return Ok((used, event));
        }
        // The chunk is whole.
        self.receive = Receive::Header;
        let done = if chunk.done {
            Some(self.finish(chunk.id)?)
        } else {
            None
        };
        Ok(match event {
            Some(event) => {
                self.pending = done;
                (used, Some(event))
            }
            None => (used, done),
        })
    }

    /// The fixed fields of a chunk, checked against the length its header
    /// announced; what follows them decides the next part.
    fn read_prefix(
        &mut self,
        chunk: &mut ChunkRead,
        input: &[u8],
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        let chunk_type = chunk.chunk_type;
        let bad = ProtocolError::BadChunk { chunk_type };
        // `on_chunk` let only types of known layout through.
        let need = ChunkPrefix::fixed_len(chunk_type).ok_or(bad)?;
        let payload_len = chunk.remaining + self.accumulator.len() as u64;
        let (used, prefix) = self.fields(chunk, input, need, |bytes| {
            ChunkPrefix::parse(chunk_type, payload_len, bytes).map(|(_, prefix)| prefix)
        });
        let Some(prefix) = prefix else {
            return Ok((used, None));
        };
        match prefix.map_err(|_| bad)? {
            ChunkPrefix::OffsetData { offset, data_len } => {
                self.cover(chunk.id, offset, data_len)?;
                chunk.part = Part::Data { offset };
                Ok((used, None))
            }
            ChunkPrefix::OffsetHole { offset, size } => {
                let size = u64::from(size);
                self.cover(chunk.id, offset, size)?;
                let hole = Raw::ReadHole {
                    id: chunk.id,
                    offset,
                    length: size,
                };
                Ok((used, Some(hole)))
            }
            ChunkPrefix::BlockStatus { context_id, count }
            | ChunkPrefix::BlockStatusExt { context_id, count } => {
                self.status_head(chunk, context_id, count)?;
                Ok((used, None))
            }
            ChunkPrefix::Error {
                error, message_len, ..
            } => {
                let code = ErrorCode::from_wire(error).ok_or(bad)?;
                self.record_error(chunk.id, code);
                chunk.part = match (message_len, chunk_type) {
                    (0, ChunkType::ErrorOffset) => Part::ErrorOffset,
                    (0, _) => Part::Skip,
                    (left, chunk_type) => Part::ErrorMessage {
                        left,
                        then_offset: chunk_type == ChunkType::ErrorOffset,
                    },
                };
                Ok((used, None))
            }
            ChunkPrefix::None => Err(bad),
        }
    }

    /// A block status chunk for `context_id` with `count` descriptors:
    /// one per selected context per request, one descriptor under
    /// `REQ_ONE`.
    fn status_head(
        &mut self,
        chunk: &mut ChunkRead,
        context_id: u32,
        count: u32,
    ) -> Result<(), ProtocolError> {
        let index = self
            .contexts
            .iter()
            .position(|&id| id == context_id)
            .ok_or(ProtocolError::UnknownMetaContext(context_id))?;
        let slot = self
            .inflight
            .get_mut(chunk.id)
            .ok_or(ProtocolError::MissingBlockStatus)?;
        if slot.flags.contains(CommandFlags::REQ_ONE) && count != 1 {
            return Err(ProtocolError::BadChunk {
                chunk_type: chunk.chunk_type,
            });
        }
        let Progress::Status { seen } = &mut slot.progress else {
            return Err(ProtocolError::MissingBlockStatus);
        };
        if *seen & (1 << index) != 0 {
            return Err(ProtocolError::DuplicateBlockStatus(context_id));
        }
        *seen |= 1 << index;
        chunk.part = Part::Descriptors {
            context_id,
            offset: slot.offset,
        };
        Ok(())
    }

    /// Hands out whole descriptors from the input; one split across inputs
    /// is collected in the accumulator and handed out from there.
    fn read_descriptors(
        &mut self,
        chunk: &mut ChunkRead,
        input: &[u8],
        context_id: u32,
        offset: u64,
    ) -> Result<(usize, Option<Raw>), ProtocolError> {
        let extended = self.features.extended_headers;
        let item = if extended { 16 } else { 8 };
        let (used, span, bytes) = if !self.accumulator.is_empty() || input.len() < item {
            let (used, ready) = self.accumulator.fill(input, item);
            chunk.remaining -= used as u64;
            if !ready {
                return Ok((used, None));
            }
            self.accumulator.clear();
            (used, Span::Accumulator(item), self.accumulator.held(item))
        } else {
            let whole = (chunk.remaining.min(input.len() as u64) as usize) / item * item;
            chunk.remaining -= whole as u64;
            (whole, Span::Input(0, whole), &input[..whole])
        };
        let slot = self
            .inflight
            .get(chunk.id)
            .ok_or(ProtocolError::MissingBlockStatus)?;
        let size = self.export.map_or(0, |e| e.size);
        let req_one = slot.flags.contains(CommandFlags::REQ_ONE);
        let mut next = offset;
        for item in bytes.chunks_exact(item) {
            let descriptor = parse_descriptor(item, extended);
            if descriptor.length == 0 {
                return Err(ProtocolError::EmptyDescriptor);
            }
            let end = next
                .checked_add(descriptor.length)
                .filter(|&end| end <= size && (!req_one || descriptor.length <= slot.length));
            next = end.ok_or(ProtocolError::ChunkOutOfRange)?;
        }
        chunk.part = Part::Descriptors {
            context_id,
            offset: next,
        };
        let event = Raw::BlockStatus {
            id: chunk.id,
            context_id,
            offset,
            descriptors: span,
        };
        Ok((used, Some(event)))
    }

    /// Records a content chunk of a read: inside the request, not
    /// overlapping, at most one with `DF`.
    fn cover(&mut self, id: RequestId, offset: u64, length: u64) -> Result<(), ProtocolError> {
        let slot = self
            .inflight
            .get_mut(id)
            .ok_or(ProtocolError::ChunkOutOfRange)?;
        if !slot.contains(offset, length) {
            return Err(ProtocolError::ChunkOutOfRange);
        }
        let df = slot.flags.contains(CommandFlags::DF);
        let start = offset - slot.offset;
        let Progress::Read(coverage) = &mut slot.progress else {
            return Err(ProtocolError::ChunkOutOfRange);
        };
        if df && coverage.chunks() > 0 {
            return Err(ProtocolError::Fragmented);
        }
        // Reads are at most the maximum block size: relative offsets fit.
        let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(start + length)) else {
            return Err(ProtocolError::ChunkOutOfRange);
        };
        coverage.add(start, end)
    }

    fn record_error(&mut self, id: RequestId, error: ErrorCode) {
        warn!("request {} failed: {}", id.to_bits(), error);
        if let Some(slot) = self.inflight.get_mut(id) {
            slot.error.get_or_insert(error);
        }
    }

    /// Ends request `id` at its final reply: checks that a successful read
    /// was covered and a block status answered for every context.
    fn finish(&mut self, id: RequestId) -> Result<Raw, ProtocolError> {
        let Some(slot) = self.inflight.get(id).copied() else {
            return Err(ProtocolError::UnknownCookie {
                cookie: id.cookie(),
            });
        };
        let result = match slot.error {
            Some(error) => Err(error),
            None => {
                match slot.progress {
                    Progress::Read(coverage)
                        if self.features.structured_replies
                            && !coverage.covers(slot.length as u32) =>
                    {
                        return Err(ProtocolError::IncompleteRead);
                    }
                    Progress::Status { seen }
                        if u32::from(seen) != (1 << self.contexts.len()) - 1 =>
                    {
                        return Err(ProtocolError::MissingBlockStatus);
                    }
                    _ => {}
                }
                Ok(())
            }
        };
        if self.resizing == Some(id) {
            self.resizing = None;
            if result.is_ok()
                && let Some(export) = self.export.as_mut()
            {
                info!(
                    "export resized from {} to {} bytes",
                    export.size, slot.offset
                );
                export.size = slot.offset;
            }
        }
        if result == Err(ErrorCode::Shutdown) && self.ending == Ending::Open {
            // Spec: a client receiving ESHUTDOWN must disconnect softly.
            info!("server is shutting down: disconnecting");
            self.ending = Ending::Disconnect;
        }
        debug!("request {} done: {:?}", id.to_bits(), result);
        self.inflight.free(id);
        Ok(Raw::Done { id, result })
    }
}
