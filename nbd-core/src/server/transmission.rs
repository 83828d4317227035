//! The transmission phase: request headers, validation against the export,
//! write payloads, block status (spec: "Transmission", "Request types",
//! "Block size constraints", "Error values", extended headers).

use super::connection::{Connection, Phase, framing_error};
use super::inflight::{NewRequest, Reason, Reply, RequestId, Slot, SlotState};
use super::negotiation::BASE_ALLOCATION_ID;
use super::{CloseReason, CompletionError, Event, ProtocolError, Request};
use crate::export::Catalog;
use crate::wire::{
    BlockSizeConstraints, BlockStatusPayload, Command, CommandFlags, Descriptor, ErrorCode,
    ExtDescriptor, HeaderStyle, ListItem, RequestHeader, STATUS_CONTEXT_ID_LEN, STATUS_EFFECT_LEN,
    TransmissionFlags,
};

/// Most context ids accepted in a block-status payload.
const MAX_STATUS_PAYLOAD: u64 = 8 + 4 * 64;

/// The export being served, as selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ActiveExport {
    pub(super) index: usize,
    pub(super) size: u64,
    pub(super) flags: TransmissionFlags,
    pub(super) block_sizes: BlockSizeConstraints,
    /// Longest read or write accepted: the advertised maximum for clients
    /// that asked for it, [`Config::max_request_length`](super::Config)
    /// for the others.
    pub(super) max_request_length: u32,
    pub(super) read_only: bool,
    /// `base:allocation` was selected for this export.
    pub(super) meta_selected: bool,
}

/// The transmission phase's own state; only this file changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Transmission {
    input: RequestInput,
    /// [`Connection::shutdown`] was called: new requests get
    /// `NBD_ESHUTDOWN`, and the session closes once nothing is in flight.
    shutting_down: bool,
    /// The block-status descriptors queued in the connection's buffer and
    /// not yet handed out: `status_start..status_end`.
    status_start: usize,
    status_end: usize,
}

/// What the next input bytes are, or why none is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestInput {
    /// `ExportSelected` is due: no request is read before the shell has it.
    Announcing,
    /// Request headers.
    Headers,
    /// A request's payload.
    Payload(Receiving),
    /// A resize is in flight: no request is read until it completes.
    ResizeBarrier,
    /// `NBD_CMD_DISC` arrived: input is dropped, what is in flight is
    /// finished, then the session closes.
    Draining,
}

impl Transmission {
    /// Transmission on a just-selected export.
    pub(super) const fn new() -> Self {
        Self {
            input: RequestInput::Announcing,
            shutting_down: false,
            status_start: 0,
            status_end: 0,
        }
    }

    pub(super) fn is_announcing(&self) -> bool {
        matches!(self.input, RequestInput::Announcing)
    }

    pub(super) fn is_draining(&self) -> bool {
        matches!(self.input, RequestInput::Draining)
    }

    pub(super) fn shut_down(&mut self) {
        if !self.shutting_down {
            info!("shutting down: refusing new requests");
        }
        self.shutting_down = true;
    }

    /// How the session ends now, if it does: after `NBD_CMD_DISC` once
    /// nothing is in flight; after a shutdown once, in addition, no payload
    /// is being read and the negotiation replies are out.
    pub(super) fn close_due(
        &self,
        nothing_in_flight: bool,
        replies_out: bool,
    ) -> Option<CloseReason> {
        let receiving = matches!(self.input, RequestInput::Payload(_));
        if self.is_draining() && nothing_in_flight {
            Some(CloseReason::Disconnect)
        } else if self.shutting_down && replies_out && nothing_in_flight && !receiving {
            Some(CloseReason::Shutdown)
        } else {
            None
        }
    }
}

/// A request payload being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Receiving {
    pub(super) id: RequestId,
    /// Export offset of the next write byte.
    pub(super) offset: u64,
    pub(super) remaining: u64,
    pub(super) mode: ReceiveMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReceiveMode {
    /// Handed to the shell as `WriteData`.
    Store,
    /// Read and dropped (a rejected or failed request).
    Discard,
    /// A block-status payload: effect length, then context ids.
    StatusPayload {
        effect_length: Option<u64>,
        bad_id: bool,
    },
}

impl<C: Catalog, const REQUESTS: usize, const BUFFER: usize> Connection<C, REQUESTS, BUFFER> {
    fn transmission(&self) -> Option<&Transmission> {
        match &self.phase {
            Phase::Transmission(transmission) => Some(transmission),
            _ => None,
        }
    }

    fn transmission_mut(&mut self) -> Option<&mut Transmission> {
        match &mut self.phase {
            Phase::Transmission(transmission) => Some(transmission),
            _ => None,
        }
    }

    fn request_input(&self) -> Option<RequestInput> {
        self.transmission().map(|t| t.input)
    }

    fn set_request_input(&mut self, input: RequestInput) {
        if let Some(transmission) = self.transmission_mut() {
            transmission.input = input;
        }
    }

    fn shutting_down(&self) -> bool {
        self.transmission().is_some_and(|t| t.shutting_down)
    }

    /// Whether a request's payload is partly read.
    pub(super) fn receiving_payload(&self) -> bool {
        matches!(self.request_input(), Some(RequestInput::Payload(_)))
    }

    /// `ExportSelected`, once, before any request is read.
    pub(super) fn announce_export(&mut self) -> Option<Event<'static>> {
        match &mut self.phase {
            Phase::Transmission(transmission) if transmission.is_announcing() => {
                transmission.input = RequestInput::Headers;
            }
            _ => return None,
        }
        let export = self.export?;
        Some(Event::ExportSelected {
            index: export.index,
            size: export.size,
            flags: export.flags,
            features: self.features,
        })
    }

    /// A write failed before its payload was whole: read the rest and
    /// drop it.
    pub(super) fn discard_rest_of_payload(&mut self, id: RequestId) {
        if let Some(RequestInput::Payload(mut receiving)) = self.request_input()
            && receiving.id == id
        {
            receiving.mode = ReceiveMode::Discard;
            self.set_request_input(RequestInput::Payload(receiving));
        }
    }

    /// The resize in flight completed, with the new size if it succeeded:
    /// requests are read again.
    pub(super) fn finish_resize(&mut self, new_size: Option<u64>) {
        if let Some(size) = new_size
            && let Some(export) = self.export.as_mut()
        {
            info!("export resized from {} to {} bytes", export.size, size);
            export.size = size;
        }
        if let Some(transmission) = self.transmission_mut()
            && matches!(transmission.input, RequestInput::ResizeBarrier)
        {
            transmission.input = RequestInput::Headers;
        }
    }

    /// Hands out the first `bytes` of the queued block-status descriptors:
    /// their place in the buffer, where they stay until the next append
    /// (after this message was sent).
    pub(super) fn take_status_descriptors(&mut self, bytes: usize) -> (usize, usize) {
        match self.transmission_mut() {
            Some(transmission) => {
                let start = transmission.status_start;
                transmission.status_start += bytes;
                (start, start + bytes)
            }
            None => (0, 0),
        }
    }

    pub(super) fn process_transmission<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        match self.request_input() {
            Some(RequestInput::Payload(receiving)) => {
                return Ok(self.receive_payload(receiving, input));
            }
            // The client must send nothing after NBD_CMD_DISC; drop it.
            Some(RequestInput::Draining) => return Ok((input.len(), None)),
            Some(RequestInput::Headers) => {}
            Some(RequestInput::Announcing | RequestInput::ResizeBarrier) | None => {
                return Ok((0, None));
            }
        }
        if input.is_empty() || self.inflight.is_full(self.config.max_in_flight) {
            return Ok((0, None));
        }
        let style = self.header_style();
        let (used, header) = match self
            .header
            .take_field(input, RequestHeader::encoded_len(style))
        {
            (used, Some(bytes)) => (
                used,
                Some(RequestHeader::parse(bytes, style).map(|(_, h)| h)),
            ),
            (used, None) => (used, None),
        };
        let Some(header) = header else {
            return Ok((used, None));
        };
        let header = header.map_err(|e| {
            warn!("bad request magic: closing");
            framing_error(e)
        })?;
        Ok((used, self.handle_request(header)?.map(Event::Request)))
    }

    fn handle_request(&mut self, header: RequestHeader) -> Result<Option<Request>, ProtocolError> {
        let Some(export) = self.export else {
            return Err(ProtocolError::Closed);
        };
        let RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        } = header;
        debug!(
            "request {:?} flags {:?} cookie {:#x} offset {} length {}",
            command, flags, cookie, offset, length
        );
        if command == Command::Disconnect {
            info!(
                "client sent NBD_CMD_DISC: finishing {} requests in flight",
                self.inflight.len()
            );
            self.set_request_input(RequestInput::Draining);
            return Ok(None);
        }
        let extended = self.header_style() == HeaderStyle::Extended;
        let payload = if command == Command::Write
            || (extended && flags.contains(CommandFlags::PAYLOAD_LEN))
        {
            length
        } else {
            0
        };
        let status_payload = command == Command::BlockStatus && payload > 0;
        let effect_length = if status_payload { 0 } else { length };
        let new = NewRequest {
            command,
            flags,
            cookie,
            offset,
            length: effect_length,
        };
        let id = self
            .inflight
            .insert(new, SlotState::Issued)
            .ok_or(ProtocolError::TooManyRequests)?;
        let verdict = self.validate(&export, command, flags, offset, effect_length, payload);
        if let Err((error, reason)) = verdict {
            warn!(
                "request {:?} cookie {:#x} refused: {} ({})",
                command,
                cookie,
                error,
                reason.message()
            );
            let reply = Reply::Done {
                error: Some((error, reason)),
            };
            if payload > 0 {
                self.discard_payload(id, offset, payload)?;
                self.inflight.reply_after_payload(id, reply);
            } else {
                self.inflight.queue_reply(id, reply);
            }
            return Ok(None);
        }
        if length == 0 && !matches!(command, Command::Flush | Command::Resize) {
            // Spec: zero lengths are unspecified but must not disconnect;
            // there is nothing for storage to do.
            self.inflight.queue_reply(id, Reply::Done { error: None });
            return Ok(None);
        }
        let fua = flags.contains(CommandFlags::FUA);
        Ok(match command {
            Command::Read => Some(Request::Read { id, offset, length }),
            Command::Write => {
                self.set_request_input(RequestInput::Payload(Receiving {
                    id,
                    offset,
                    remaining: length,
                    mode: ReceiveMode::Store,
                }));
                Some(Request::Write {
                    id,
                    offset,
                    length,
                    fua,
                })
            }
            Command::Flush => {
                let sequence = self.inflight.get(id).map_or(0, |s| s.sequence);
                if self.inflight.writes_pending_before(sequence) {
                    self.defer(id);
                    None
                } else {
                    Some(Request::Flush { id })
                }
            }
            Command::Trim => Some(Request::Trim {
                id,
                offset,
                length,
                fua,
            }),
            Command::Cache => Some(Request::Cache { id, offset, length }),
            Command::WriteZeroes => Some(Request::WriteZeroes {
                id,
                offset,
                length,
                fua,
                no_hole: flags.contains(CommandFlags::NO_HOLE),
                fast: flags.contains(CommandFlags::FAST_ZERO),
            }),
            Command::BlockStatus if status_payload => {
                let mode = ReceiveMode::StatusPayload {
                    effect_length: None,
                    bad_id: false,
                };
                self.set_request_input(RequestInput::Payload(Receiving {
                    id,
                    offset,
                    remaining: payload,
                    mode,
                }));
                None
            }
            Command::BlockStatus => Some(Request::BlockStatus {
                id,
                offset,
                length,
                req_one: flags.contains(CommandFlags::REQ_ONE),
            }),
            Command::Resize => {
                self.set_request_input(RequestInput::ResizeBarrier);
                if self.inflight.others_in_flight(id) {
                    self.defer(id);
                    None
                } else {
                    Some(Request::Resize { id, size: offset })
                }
            }
            Command::Disconnect | Command::Unknown(_) => None,
        })
    }

    fn defer(&mut self, id: RequestId) {
        self.inflight.defer(id);
    }

    /// Reads and drops a rejected request's payload so the stream stays in sync.
    fn discard_payload(
        &mut self,
        id: RequestId,
        offset: u64,
        payload: u64,
    ) -> Result<(), ProtocolError> {
        if payload > self.config.max_discard {
            warn!(
                "rejected request carries {} bytes of payload: closing",
                payload
            );
            return Err(ProtocolError::PayloadTooLong { length: payload });
        }
        self.set_request_input(RequestInput::Payload(Receiving {
            id,
            offset,
            remaining: payload,
            mode: ReceiveMode::Discard,
        }));
        Ok(())
    }

    /// Checks a request against the spec and the export; the error to
    /// answer with otherwise.
    fn validate(
        &self,
        export: &ActiveExport,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
        payload: u64,
    ) -> Result<(), (ErrorCode, Reason)> {
        use ErrorCode::{Invalid, NoSpace, Perm, Shutdown};
        let advertised = |flag| export.flags.contains(flag);
        let extended = self.header_style() == HeaderStyle::Extended;
        let command_flags = match command {
            Command::Read if advertised(TransmissionFlags::SEND_DF) => CommandFlags::DF,
            Command::Write if extended => CommandFlags::PAYLOAD_LEN,
            Command::WriteZeroes => CommandFlags::NO_HOLE.with_if(
                CommandFlags::FAST_ZERO,
                advertised(TransmissionFlags::SEND_FAST_ZERO),
            ),
            Command::BlockStatus => CommandFlags::REQ_ONE.with_if(
                CommandFlags::PAYLOAD_LEN,
                extended && advertised(TransmissionFlags::BLOCK_STATUS_PAYLOAD),
            ),
            Command::Unknown(_) => return Err((Invalid, Reason::UnknownCommand)),
            _ => CommandFlags::empty(),
        };
        let allowed =
            command_flags.with_if(CommandFlags::FUA, advertised(TransmissionFlags::SEND_FUA));
        if flags.without(allowed) != CommandFlags::empty() {
            return Err((Invalid, Reason::BadFlags));
        }
        if self.shutting_down() {
            return Err((Shutdown, Reason::ShuttingDown));
        }
        if command.changes_data() && export.read_only {
            return Err((Perm, Reason::ReadOnly));
        }
        if command
            .required_flag()
            .is_some_and(|flag| !advertised(flag))
        {
            return Err((Invalid, Reason::NotAdvertised));
        }
        match command {
            Command::Flush if offset != 0 || length != 0 => {
                return Err((Invalid, Reason::NonZeroFlushRange));
            }
            Command::Flush | Command::Resize => return Ok(()),
            Command::BlockStatus if !export.meta_selected => {
                return Err((Invalid, Reason::NoMetaContext));
            }
            Command::BlockStatus if payload > 0 && !valid_status_payload(payload) => {
                return Err((Invalid, Reason::BadPayload));
            }
            Command::BlockStatus if payload == 0 && length == 0 => {
                return Err((Invalid, Reason::OutOfRange));
            }
            _ => {}
        }
        let end = offset.checked_add(length).filter(|&end| end <= export.size);
        if end.is_none() {
            let error = if matches!(command, Command::Write | Command::WriteZeroes) {
                NoSpace
            } else {
                Invalid
            };
            return Err((error, Reason::OutOfRange));
        }
        let minimum = u64::from(export.block_sizes.minimum);
        let reaches_end = end == Some(export.size);
        if !offset.is_multiple_of(minimum) || (!length.is_multiple_of(minimum) && !reaches_end) {
            return Err((Invalid, Reason::Misaligned));
        }
        if command.capped_by_maximum_block_size() && length > u64::from(export.max_request_length) {
            return Err((Invalid, Reason::TooLarge));
        }
        // A structured chunk's 32-bit length holds the 8-byte offset and
        // the data; the core sends a read as one chunk.
        let compact_chunk = self.features.structured_replies && !extended;
        if command == Command::Read && compact_chunk && length > u64::from(u32::MAX - 8) {
            return Err((ErrorCode::Overflow, Reason::TooLongForOneChunk));
        }
        Ok(())
    }

    /// Takes payload bytes of the request being received.
    fn receive_payload<'a>(
        &mut self,
        mut receiving: Receiving,
        input: &'a [u8],
    ) -> (usize, Option<Event<'a>>) {
        if let ReceiveMode::StatusPayload { .. } = receiving.mode {
            return self.receive_status_payload(receiving, input);
        }
        let take = receiving.remaining.min(input.len() as u64) as usize;
        if take == 0 {
            return (0, None);
        }
        let offset = receiving.offset;
        let id = receiving.id;
        receiving = self.advance_payload(receiving, take as u64);
        match receiving.mode {
            ReceiveMode::Store => {
                let remaining = receiving.remaining;
                (
                    take,
                    Some(Event::WriteData {
                        id,
                        offset,
                        data: &input[..take],
                        remaining,
                    }),
                )
            }
            _ => (take, None),
        }
    }

    /// Notes `taken` (at most what remains) more bytes of the payload
    /// being received; the payload's state after them.
    fn advance_payload(&mut self, mut receiving: Receiving, taken: u64) -> Receiving {
        // A discarded payload's offset may run past 2^64: it is never used.
        receiving.offset = receiving.offset.wrapping_add(taken);
        receiving.remaining -= taken;
        if receiving.remaining == 0 {
            self.set_request_input(RequestInput::Headers);
            self.inflight.finish_payload(receiving.id);
        } else {
            self.set_request_input(RequestInput::Payload(receiving));
        }
        receiving
    }

    /// The payload being received for the shell to store, if that is what
    /// the next input bytes are.
    pub(super) fn payload_to_store(&self) -> Option<Receiving> {
        match self.request_input() {
            Some(RequestInput::Payload(receiving)) if receiving.mode == ReceiveMode::Store => {
                Some(receiving)
            }
            _ => None,
        }
    }

    /// Takes `taken` bytes of the payload being received as stored by the
    /// shell; `false` (nothing noted) when none is, or fewer remain.
    pub(super) fn take_stored_payload(&mut self, taken: u64) -> bool {
        match self.payload_to_store() {
            Some(receiving) if taken <= receiving.remaining => {
                self.advance_payload(receiving, taken);
                true
            }
            _ => false,
        }
    }

    /// Reads a block-status payload (effect length, then the context ids
    /// wanted) and issues or refuses the request once it is whole.
    fn receive_status_payload<'a>(
        &mut self,
        mut receiving: Receiving,
        input: &'a [u8],
    ) -> (usize, Option<Event<'a>>) {
        let ReceiveMode::StatusPayload {
            mut effect_length,
            mut bad_id,
        } = receiving.mode
        else {
            return (0, None);
        };
        let need = if effect_length.is_none() {
            STATUS_EFFECT_LEN
        } else {
            STATUS_CONTEXT_ID_LEN
        };
        let (used, field) = match self.header.take_field(input, need) {
            // The accumulator holds the `need` bytes each parse reads.
            (used, Some(bytes)) if need == STATUS_EFFECT_LEN => (
                used,
                BlockStatusPayload::parse_effect_length(bytes)
                    .ok()
                    .map(|(_, length)| length),
            ),
            (used, Some(bytes)) => (
                used,
                BlockStatusPayload::parse_context_id(bytes)
                    .ok()
                    .map(|(_, id)| u64::from(id)),
            ),
            (used, None) => (used, None),
        };
        receiving.remaining -= used as u64;
        match (field, effect_length) {
            (Some(value), None) => effect_length = Some(value),
            (Some(value), Some(_)) => bad_id |= value != u64::from(BASE_ALLOCATION_ID),
            (None, _) => {}
        }
        receiving.mode = ReceiveMode::StatusPayload {
            effect_length,
            bad_id,
        };
        if receiving.remaining > 0 {
            self.set_request_input(RequestInput::Payload(receiving));
            return (used, None);
        }
        self.set_request_input(RequestInput::Headers);
        let id = receiving.id;
        let length = effect_length.unwrap_or(0);
        let Some(slot) = self.inflight.get_mut(id) else {
            return (used, None);
        };
        slot.length = length;
        let slot = *slot;
        // The effect length is known only now: check it as the normal form is.
        let verdict = match self.export {
            Some(export) if !bad_id => self.validate(
                &export,
                Command::BlockStatus,
                slot.flags,
                slot.offset,
                length,
                0,
            ),
            _ => Err((ErrorCode::Invalid, Reason::BadPayload)),
        };
        if let Err(error) = verdict {
            self.inflight
                .queue_reply(id, Reply::Done { error: Some(error) });
            return (used, None);
        }
        let req_one = slot.flags.contains(CommandFlags::REQ_ONE);
        (
            used,
            Some(Event::Request(Request::BlockStatus {
                id,
                offset: slot.offset,
                length,
                req_one,
            })),
        )
    }

    /// Encodes the extents of a block-status reply into the buffer FIFO;
    /// returns the bytes and count kept.
    pub(super) fn encode_extents(
        &mut self,
        slot: &Slot,
        size: u64,
        extents: &[ExtDescriptor],
    ) -> Result<(usize, u32), CompletionError> {
        let extended = self.header_style() == HeaderStyle::Extended;
        let item_len = if extended { 16 } else { 8 };
        let Some(&Transmission {
            status_start: mut start,
            status_end: mut end,
            ..
        }) = self.transmission()
        else {
            return Err(CompletionError::UnknownRequest);
        };
        if start == end {
            start = 0;
            end = 0;
        }
        if BUFFER - end < item_len && start > 0 {
            self.buffer.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if let Some(transmission) = self.transmission_mut() {
            transmission.status_start = start;
            transmission.status_end = end;
        }
        let room = (BUFFER - end) / item_len;
        if room == 0 {
            return Err(CompletionError::Busy);
        }
        let req_one = slot.flags.contains(CommandFlags::REQ_ONE);
        let minimum = self.export.map_or(1, |e| u64::from(e.block_sizes.minimum));
        // Compact descriptors hold 32-bit lengths: keep them block-aligned.
        let longest = if extended {
            u64::MAX
        } else {
            u64::from(u32::MAX) / minimum * minimum
        };
        let available = size.saturating_sub(slot.offset);
        let mut covered = 0u64;
        let mut count = 0usize;
        for extent in extents {
            if count == room || covered >= slot.length || covered >= available || extent.length == 0
            {
                break;
            }
            let mut length = extent.length.min(longest).min(available - covered);
            if req_one {
                length = length.min(slot.length);
            }
            let at = end + count * item_len;
            let out = &mut self.buffer[at..at + item_len];
            if extended {
                ExtDescriptor {
                    length,
                    status: extent.status,
                }
                .encode_into(out);
            } else {
                // base:allocation defines 32-bit status flags.
                Descriptor {
                    length: length as u32,
                    status: extent.status as u32,
                }
                .encode_into(out);
            }
            covered += length;
            count += 1;
            if req_one || length < extent.length {
                break;
            }
        }
        if count == 0 {
            return Err(CompletionError::EmptyExtents);
        }
        let bytes = count * item_len;
        if let Some(transmission) = self.transmission_mut() {
            transmission.status_end += bytes;
        }
        Ok((bytes, count as u32))
    }
}

fn valid_status_payload(payload: u64) -> bool {
    (8..=MAX_STATUS_PAYLOAD).contains(&payload) && (payload - 8).is_multiple_of(4)
}
