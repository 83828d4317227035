//! The bounded table of requests in flight and the queue of replies ready
//! to send (spec: "Transmission", "Ordering of messages and writes").
//!
//! A request holds a slot from its header until its final reply is handed
//! to the shell, so a reply can only ever carry a cookie the client sent,
//! and a completion for a slot that was freed and reused is told apart by
//! the generation in its [`RequestId`].

use heapless::Deque;

pub(super) use crate::shape::RequestId;
use crate::shape::SlotTable;
use crate::wire::{Command, CommandFlags, ErrorCode};

/// Why the core answered a request with an error itself; gives the human
/// message of a structured error chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) enum Reason {
    Storage,
    UnknownCommand,
    BadFlags,
    NotAdvertised,
    ReadOnly,
    OutOfRange,
    Misaligned,
    TooLarge,
    TooLongForOneChunk,
    NonZeroFlushRange,
    NoMetaContext,
    BadPayload,
    ShuttingDown,
}

impl Reason {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Storage => "",
            Self::UnknownCommand => "unknown command",
            Self::BadFlags => "command flags not valid for this command or connection",
            Self::NotAdvertised => "command not supported by this export",
            Self::ReadOnly => "export is read-only",
            Self::OutOfRange => "request extends past the end of the export",
            Self::Misaligned => "request not aligned to the minimum block size",
            Self::TooLarge => "request longer than the maximum block size",
            Self::TooLongForOneChunk => "read too long for one structured reply chunk",
            Self::NonZeroFlushRange => "flush must have offset and length zero",
            Self::NoMetaContext => "no metadata context was selected for this export",
            Self::BadPayload => "request payload not valid for this command",
            Self::ShuttingDown => "server is shutting down",
        }
    }
}

/// A reply waiting for `poll_transmit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) enum Reply {
    /// The final reply: success or error.
    Done { error: Option<(ErrorCode, Reason)> },
    /// The whole read range as data; `last` ends the reply with it.
    Data { last: bool },
    /// The whole read range reads as zeroes.
    Zeroes,
    /// `bytes` of encoded descriptors (`count` of them) at the front of the
    /// block-status queue.
    BlockStatus { bytes: usize, count: u32 },
    /// A streamed read failed at `offset` after its data chunk was sent.
    ErrorAt { error: ErrorCode, offset: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Waiting for an ordering barrier before its event goes out.
    Deferred,
    /// The shell has the request.
    Issued,
    /// A reply is queued.
    Replying(Reply),
    /// The reply is decided but waits until the request's payload has been
    /// read: a client still sending it may not expect a reply yet (libnbd
    /// 1.14 drops the connection on one).
    AwaitingPayload(Reply),
    /// A streamed read's data chunk was sent; the shell owes the ending.
    Streaming,
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) state: SlotState,
    pub(crate) command: Command,
    pub(crate) flags: CommandFlags,
    /// Write payload fully received (always true for other commands).
    pub(crate) payload_complete: bool,
    /// Arrival order, for flush barriers.
    pub(crate) sequence: u32,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) length: u64,
}

/// Fields of a new request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NewRequest {
    pub(crate) command: Command,
    pub(crate) flags: CommandFlags,
    pub(crate) cookie: u64,
    pub(crate) offset: u64,
    pub(crate) length: u64,
}

#[derive(Debug)]
pub(crate) struct InFlight<const N: usize> {
    slots: SlotTable<Slot, N>,
    ready: Deque<u16, N>,
    /// Slots in [`SlotState::Deferred`].
    deferred: usize,
    next_sequence: u32,
}

impl<const N: usize> InFlight<N> {
    pub(crate) const fn new() -> Self {
        Self {
            slots: SlotTable::new(),
            ready: Deque::new(),
            deferred: 0,
            next_sequence: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether a reply is queued.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub(crate) fn is_full(&self, limit: usize) -> bool {
        self.slots.len() >= limit.min(N)
    }

    /// Takes a free slot; `None` when the table is full.
    pub(crate) fn insert(&mut self, request: NewRequest, state: SlotState) -> Option<RequestId> {
        let id = self.slots.insert(Slot {
            state,
            command: request.command,
            flags: request.flags,
            payload_complete: request.command != Command::Write || request.length == 0,
            sequence: self.next_sequence,
            cookie: request.cookie,
            offset: request.offset,
            length: request.length,
        })?;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Some(id)
    }

    /// The live slot `id` names.
    pub(crate) fn get(&self, id: RequestId) -> Option<&Slot> {
        self.slots.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: RequestId) -> Option<&mut Slot> {
        self.slots.get_mut(id)
    }

    /// Queues `reply` for the slot; the slot must not have one queued.
    pub(crate) fn queue_reply(&mut self, id: RequestId, reply: Reply) {
        if let Some(slot) = self.get_mut(id) {
            slot.state = SlotState::Replying(reply);
            // Cannot overflow: each live slot is queued at most once.
            let _ = self.ready.push_back(id.index() as u16);
        }
    }

    /// Queues `reply` once the request's payload has been read
    /// ([`finish_payload`](Self::finish_payload)).
    pub(crate) fn reply_after_payload(&mut self, id: RequestId, reply: Reply) {
        if let Some(slot) = self.get_mut(id) {
            slot.state = SlotState::AwaitingPayload(reply);
        }
    }

    /// The request's payload has been read: queue a reply waiting on it.
    pub(crate) fn finish_payload(&mut self, id: RequestId) {
        let Some(slot) = self.get_mut(id) else { return };
        slot.payload_complete = true;
        if let SlotState::AwaitingPayload(reply) = slot.state {
            self.queue_reply(id, reply);
        }
    }

    /// Takes the next queued reply, leaving the slot in `Issued` state for
    /// the caller to free or move on.
    pub(crate) fn pop_ready(&mut self) -> Option<(RequestId, Slot, Reply)> {
        let index = usize::from(self.ready.pop_front()?);
        let (id, slot) = self.slots.at_mut(index)?;
        let SlotState::Replying(reply) = slot.state else {
            return None;
        };
        slot.state = SlotState::Issued;
        Some((id, *slot, reply))
    }

    /// A streamed read's data chunk was handed out; its ending is owed.
    pub(crate) fn start_streaming(&mut self, id: RequestId) {
        if let Some(slot) = self.get_mut(id) {
            slot.state = SlotState::Streaming;
        }
    }

    pub(crate) fn free(&mut self, id: RequestId) {
        self.slots.remove(id);
    }

    /// Whether any data-changing request that arrived before `sequence`
    /// is still waiting for the shell.
    pub(crate) fn writes_pending_before(&self, sequence: u32) -> bool {
        self.slots.iter().any(|(_, s)| {
            matches!(s.state, SlotState::Issued | SlotState::Deferred)
                && s.command.changes_data()
                && (sequence.wrapping_sub(s.sequence) as i32) > 0
        })
    }

    /// Whether anything other than `id` is in flight.
    pub(crate) fn others_in_flight(&self, id: RequestId) -> bool {
        self.slots
            .iter()
            .any(|(other, _)| other.index() != id.index())
    }

    /// Holds the request back until an ordering barrier clears.
    pub(crate) fn defer(&mut self, id: RequestId) {
        if let Some(slot) = self.get_mut(id)
            && slot.state == SlotState::Issued
        {
            slot.state = SlotState::Deferred;
            self.deferred += 1;
        }
    }

    /// The deferred request goes to the shell.
    pub(crate) fn release_deferred(&mut self, id: RequestId) {
        if let Some(slot) = self.get_mut(id)
            && slot.state == SlotState::Deferred
        {
            slot.state = SlotState::Issued;
            self.deferred -= 1;
        }
    }

    /// Whether a request waits for an ordering barrier.
    pub(crate) fn has_deferred(&self) -> bool {
        self.deferred > 0
    }

    /// Deferred requests, in table order.
    pub(crate) fn deferred(&self) -> impl Iterator<Item = (RequestId, &Slot)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.state == SlotState::Deferred)
    }
}
