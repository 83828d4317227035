//! The connection: its state, the `process` loop, completions and the
//! events that wait on ordering rules.

use super::inflight::{InFlight, Reason, Reply, RequestId, SlotState};
use super::negotiation::{Negotiation, NegotiationOutput};
use super::transmission::{ActiveExport, Transmission};
use super::{
    CloseReason, CompletionError, Config, Event, PayloadNotWanted, PayloadWanted, ProtocolError,
    ReadOutcome, Request, Step,
};
use crate::export::{Catalog, Features};
use crate::shape::Accumulator;
use crate::wire::{Command, ErrorCode, ExtDescriptor, HeaderStyle, WireError};

/// Bytes of encoded reply headers handed out by `poll_transmit` (the
/// longest is an extended ERROR_OFFSET chunk: 32 + 4 + 2 + 8).
pub(super) const SCRATCH_BYTES: usize = 48;

/// Where the session is. Each phase's own state lives in its variant and
/// is changed only by the file of that phase: negotiation.rs for
/// [`Negotiation`], transmission.rs for [`Transmission`].
#[derive(Clone, Copy, Debug)]
pub(super) enum Phase {
    /// Option haggling (spec: "Fixed newstyle negotiation").
    Negotiation(Negotiation),
    /// Requests and replies, from the export's selection on.
    Transmission(Transmission),
    /// The session ends once the replies still due are handed out:
    /// `NBD_OPT_ABORT` was acknowledged, or [`Connection::shutdown`] came
    /// during negotiation. No input is read any more.
    Closing(CloseReason),
    /// The session ended: a `Closed` event was returned.
    Closed,
}

/// One server-side NBD connection over a catalog of exports `C`.
///
/// `REQUESTS` bounds the requests in flight; `BUFFER` is the byte buffer for
/// option data and block-status replies (see the [module docs](super)).
/// Create one per accepted client with [`Connection::new`]; the greeting is
/// the first thing [`poll_transmit`](Self::poll_transmit) returns.
#[derive(Debug)]
pub struct Connection<C, const REQUESTS: usize = 64, const BUFFER: usize = 4352> {
    pub(super) catalog: C,
    pub(super) config: Config,
    pub(super) phase: Phase,
    /// Features negotiated (reset by `NBD_OPT_STARTTLS`).
    pub(super) features: Features,
    pub(super) tls_active: bool,
    /// Replies of the last option still to hand out; they may outlast
    /// negotiation (the replies to `NBD_OPT_GO`). Changed by negotiation.rs.
    pub(super) output: NegotiationOutput,
    /// The export negotiation selected; its size changes with a resize.
    pub(super) export: Option<ActiveExport>,
    pub(super) inflight: InFlight<REQUESTS>,
    /// A header split across inputs (option, request, block-status field).
    pub(super) header: Accumulator,
    /// Option data during negotiation; a FIFO of encoded block-status
    /// descriptors during transmission (each phase keeps its own indices).
    pub(super) buffer: [u8; BUFFER],
    pub(super) scratch: [u8; SCRATCH_BYTES],
}

impl<C: Catalog, const REQUESTS: usize, const BUFFER: usize> Connection<C, REQUESTS, BUFFER> {
    /// A connection to a client that just connected. The greeting is queued.
    pub fn new(catalog: C, config: Config) -> Self {
        Self {
            catalog,
            config,
            phase: Phase::Negotiation(Negotiation::new()),
            features: Features::default(),
            tls_active: false,
            output: NegotiationOutput::Greeting,
            export: None,
            inflight: InFlight::new(),
            header: Accumulator::new(),
            buffer: [0; BUFFER],
            scratch: [0; SCRATCH_BYTES],
        }
    }

    /// The catalog this connection serves.
    pub fn catalog(&self) -> &C {
        &self.catalog
    }

    /// Features negotiated so far.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Header style of the transmission phase.
    pub fn header_style(&self) -> HeaderStyle {
        self.features.header_style()
    }

    /// The export selected for transmission, by catalog index.
    pub fn selected_export(&self) -> Option<usize> {
        self.export.map(|e| e.index)
    }

    /// The selected export's current size (it changes with `NBD_CMD_RESIZE`).
    pub fn export_size(&self) -> Option<u64> {
        self.export.map(|e| e.size)
    }

    /// Whether TLS was started on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Requests in flight (issued, deferred, or with replies not yet sent).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether the session ended (a `Closed` event was returned).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Tells the core the client closed its side: no more input comes.
    /// `Ok` when the client had ended the session itself (`NBD_OPT_ABORT`,
    /// or `NBD_CMD_DISC` with no message cut short) or it was over; the
    /// replies still due may be sent, as a client may half-close after
    /// `NBD_CMD_DISC`. Otherwise the client went away mid-session:
    /// [`ProtocolError::UnexpectedEof`], which the shell reports. The same
    /// call as the client side's, which is told the server closed.
    pub fn end_of_input(&self) -> Result<(), ProtocolError> {
        let whole = self.header.is_empty() && !self.receiving_payload();
        let ended = match &self.phase {
            Phase::Closed | Phase::Closing(CloseReason::Abort) => true,
            Phase::Transmission(transmission) => transmission.is_draining(),
            Phase::Negotiation(_) | Phase::Closing(_) => false,
        };
        if ended && whole {
            Ok(())
        } else {
            warn!("client closed the connection with the session unfinished");
            Err(ProtocolError::UnexpectedEof)
        }
    }

    /// Starts a graceful stop (spec: "Terminating the transmission phase").
    /// During negotiation the session ends at once: `process` returns
    /// [`Event::Closed`]`(`[`CloseReason::Shutdown`]`)` once the current
    /// option's replies are out. During transmission, new requests get
    /// `NBD_ESHUTDOWN` and the close comes once nothing is in flight.
    pub fn shutdown(&mut self) {
        match &mut self.phase {
            Phase::Negotiation(_) => {
                info!("shutting down: no further option is read");
                self.phase = Phase::Closing(CloseReason::Shutdown);
            }
            Phase::Transmission(transmission) => transmission.shut_down(),
            Phase::Closing(_) | Phase::Closed => {}
        }
    }

    /// Consumes bytes the client sent; see the [module docs](super).
    ///
    /// Returns an error when the connection must end at once (hard
    /// disconnect); the shell then closes the transport.
    pub fn process<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, ProtocolError> {
        if matches!(self.phase, Phase::Closed) {
            return Err(ProtocolError::Closed);
        }
        if let Some(event) = self.take_event() {
            return Ok(Step {
                consumed: 0,
                event: Some(event),
            });
        }
        let mut consumed = 0;
        while !self.input_paused() {
            let rest = &input[consumed..];
            let (used, event) = match self.phase {
                Phase::Transmission(_) => self.process_transmission(rest)?,
                Phase::Negotiation(negotiation) => self.process_negotiation(negotiation, rest)?,
                Phase::Closing(_) | Phase::Closed => break,
            };
            consumed += used;
            if event.is_some() {
                return Ok(Step { consumed, event });
            }
            if used == 0 {
                break;
            }
        }
        Ok(Step {
            consumed,
            event: self.take_event(),
        })
    }

    /// Whether input must wait: replies of the current option are still to
    /// be sent (or the TLS hand-over is due), the shell has not been told
    /// of the selected export yet, or the session is ending.
    fn input_paused(&self) -> bool {
        !self.output.is_idle()
            || match &self.phase {
                Phase::Negotiation(_) => false,
                Phase::Transmission(transmission) => transmission.is_announcing(),
                Phase::Closing(_) | Phase::Closed => true,
            }
    }

    /// Events that do not come from input: negotiation milestones, the end
    /// of the session, requests released by an ordering barrier.
    fn take_event(&mut self) -> Option<Event<'static>> {
        if matches!(self.output, NegotiationOutput::TlsHandover) {
            return Some(self.hand_over_tls());
        }
        if let Some(event) = self.announce_export() {
            return Some(event);
        }
        if let Some(reason) = self.close_due() {
            info!("session over: {:?}", reason);
            self.phase = Phase::Closed;
            return Some(Event::Closed(reason));
        }
        if self.inflight.has_deferred() {
            return self.release_deferred().map(Event::Request);
        }
        None
    }

    fn close_due(&self) -> Option<CloseReason> {
        match &self.phase {
            Phase::Closing(reason) if self.output.is_idle() => Some(*reason),
            Phase::Transmission(transmission) => {
                transmission.close_due(self.inflight.is_empty(), self.output.is_idle())
            }
            _ => None,
        }
    }

    /// Issues the first deferred request whose barrier has cleared: a flush
    /// once the writes before it completed, a resize once it is alone.
    fn release_deferred(&mut self) -> Option<Request> {
        let (id, slot) = self
            .inflight
            .deferred()
            .find(|(id, slot)| match slot.command {
                Command::Flush => !self.inflight.writes_pending_before(slot.sequence),
                _ => !self.inflight.others_in_flight(*id),
            })?;
        let request = match slot.command {
            Command::Flush => Request::Flush { id },
            _ => Request::Resize {
                id,
                size: slot.offset,
            },
        };
        self.inflight.release_deferred(id);
        debug!("releasing deferred request {}", id.to_bits());
        Some(request)
    }

    /// The write whose payload the next input bytes are, when the shell
    /// may store them straight from its transport (a socket spliced into
    /// a file) rather than pass them through [`process`](Self::process):
    /// then it calls [`payload_taken`](Self::payload_taken) with what it
    /// stored. `None` when the next bytes are anything else. A flush
    /// deferred behind earlier writes may come due meanwhile; `process`
    /// hands it out at its next call (the write is later than the flush,
    /// so storing its bytes first is allowed).
    pub fn payload_wanted(&self) -> Option<PayloadWanted> {
        self.payload_to_store().map(|receiving| PayloadWanted {
            id: receiving.id,
            offset: receiving.offset,
            remaining: receiving.remaining,
        })
    }

    /// Notes that the shell stored the next `taken` bytes of the payload
    /// [`payload_wanted`](Self::payload_wanted) named, as if `process` had
    /// handed them out in [`Event::WriteData`]. At zero remaining the
    /// payload is whole: the shell completes the write once it is stored.
    pub fn payload_taken(&mut self, taken: u64) -> Result<(), PayloadNotWanted> {
        if taken == 0 || !self.take_stored_payload(taken) {
            return Err(PayloadNotWanted);
        }
        Ok(())
    }

    /// Answers a request other than a block-status success: `Ok` for
    /// success, or the error to report. A read's `Ok` means its data is
    /// ready ([`ReadOutcome::Data`]). A write may fail before its payload
    /// is whole; the rest of the payload is then read and dropped.
    pub fn complete(
        &mut self,
        id: RequestId,
        result: Result<(), ErrorCode>,
    ) -> Result<(), CompletionError> {
        let slot = *self.issued(id)?;
        match slot.command {
            Command::Read => {
                let outcome = match result {
                    Ok(()) => ReadOutcome::Data,
                    Err(error) => ReadOutcome::Error(error),
                };
                return self.complete_read(id, outcome);
            }
            Command::BlockStatus if result.is_ok() => return Err(CompletionError::WrongKind),
            Command::Write if !slot.payload_complete => {
                if result.is_ok() {
                    return Err(CompletionError::PayloadIncomplete);
                }
                self.discard_rest_of_payload(id);
                self.log_completion(id, result);
                let error = result.err().map(|e| (e, Reason::Storage));
                self.inflight.reply_after_payload(id, Reply::Done { error });
                return Ok(());
            }
            Command::Resize => self.finish_resize(result.is_ok().then_some(slot.offset)),
            _ => {}
        }
        self.log_completion(id, result);
        self.inflight.queue_reply(
            id,
            Reply::Done {
                error: result.err().map(|e| (e, Reason::Storage)),
            },
        );
        Ok(())
    }

    /// Answers a read.
    pub fn complete_read(
        &mut self,
        id: RequestId,
        outcome: ReadOutcome,
    ) -> Result<(), CompletionError> {
        let slot = *self.issued(id)?;
        if slot.command != Command::Read {
            return Err(CompletionError::WrongKind);
        }
        let reply = match outcome {
            ReadOutcome::Data => Reply::Data { last: true },
            ReadOutcome::Streamed => Reply::Data { last: false },
            ReadOutcome::Zeroes => Reply::Zeroes,
            ReadOutcome::Error(error) => Reply::Done {
                error: Some((error, Reason::Storage)),
            },
        };
        self.log_completion(
            id,
            if let ReadOutcome::Error(e) = outcome {
                Err(e)
            } else {
                Ok(())
            },
        );
        self.inflight.queue_reply(id, reply);
        Ok(())
    }

    /// Ends a read answered with [`ReadOutcome::Streamed`], after the shell
    /// sent its data: `Ok`, or the error and the export offset where it
    /// happened (the shell pads the rest of the data with zeroes first, as
    /// the spec requires). With simple replies an error cannot be reported
    /// after the data started: that gives `NotRepresentable`, and the shell
    /// must close the connection (hard disconnect).
    pub fn finish_streamed_read(
        &mut self,
        id: RequestId,
        result: Result<(), (ErrorCode, u64)>,
    ) -> Result<(), CompletionError> {
        let slot = self
            .inflight
            .get(id)
            .ok_or(CompletionError::UnknownRequest)?;
        if slot.state != SlotState::Streaming {
            return Err(CompletionError::WrongKind);
        }
        let offset_in_range =
            |offset: u64| offset >= slot.offset && offset - slot.offset < slot.length;
        match result {
            Ok(()) if self.features.structured_replies => {
                self.inflight.queue_reply(id, Reply::Done { error: None });
            }
            Ok(()) => self.inflight.free(id),
            Err((error, offset)) if self.features.structured_replies && offset_in_range(offset) => {
                self.inflight
                    .queue_reply(id, Reply::ErrorAt { error, offset });
            }
            Err(_) => {
                self.inflight.free(id);
                return Err(CompletionError::NotRepresentable);
            }
        }
        Ok(())
    }

    /// Answers a block-status request for `base:allocation` with the
    /// extents from the request's offset, in order. The core keeps what the
    /// spec allows: with `REQ_ONE` one extent clipped to the request; else
    /// extents until the request's length is covered, clipped to the
    /// export's end and to the space left in the buffer (at least one).
    pub fn complete_block_status(
        &mut self,
        id: RequestId,
        extents: &[ExtDescriptor],
    ) -> Result<(), CompletionError> {
        let slot = *self.issued(id)?;
        if slot.command != Command::BlockStatus {
            return Err(CompletionError::WrongKind);
        }
        if extents.first().is_none_or(|e| e.length == 0) {
            return Err(CompletionError::EmptyExtents);
        }
        let size = self.export.map_or(0, |e| e.size);
        let (bytes, count) = self.encode_extents(&slot, size, extents)?;
        debug!("request {} block status: {} extents", id.to_bits(), count);
        self.inflight
            .queue_reply(id, Reply::BlockStatus { bytes, count });
        Ok(())
    }

    /// The slot of a request the shell holds.
    fn issued(&self, id: RequestId) -> Result<&super::inflight::Slot, CompletionError> {
        let slot = self
            .inflight
            .get(id)
            .ok_or(CompletionError::UnknownRequest)?;
        match slot.state {
            SlotState::Issued => Ok(slot),
            SlotState::Replying(_) | SlotState::AwaitingPayload(_) => Err(CompletionError::Busy),
            SlotState::Streaming => Err(CompletionError::WrongKind),
            SlotState::Deferred => Err(CompletionError::UnknownRequest),
        }
    }

    fn log_completion(&self, id: RequestId, result: Result<(), ErrorCode>) {
        match result {
            Ok(()) => debug!("request {} completed", id.to_bits()),
            Err(error) => warn!("request {} failed: {}", id.to_bits(), error),
        }
    }
}

/// The protocol error for a message the wire layer refused.
pub(super) fn framing_error(error: WireError) -> ProtocolError {
    match error {
        WireError::BadMagic { found } => ProtocolError::BadMagic { found },
        other => ProtocolError::Malformed(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_errors_keep_the_wire_reason() {
        assert_eq!(
            framing_error(WireError::BadMagic { found: 7 }),
            ProtocolError::BadMagic { found: 7 }
        );
        assert_eq!(
            framing_error(WireError::InvalidValue("length")),
            ProtocolError::Malformed(WireError::InvalidValue("length"))
        );
        assert_eq!(
            framing_error(WireError::BadLength),
            ProtocolError::Malformed(WireError::BadLength)
        );
    }
}
