//! The bounded table of requests in flight and the queue of request
//! headers waiting to be sent (spec: "Transmission").
//!
//! A request holds a slot from the call that issues it until its final
//! reply. Its cookie on the wire is its [`RequestId`] (slot index and
//! generation), so a reply is matched in constant time and a reply for a
//! request already answered, or never sent, is told apart.

use heapless::Deque;

use super::coverage::Coverage;
pub(super) use crate::shape::RequestId;
use crate::shape::SlotTable;
use crate::wire::{Command, CommandFlags, ErrorCode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    /// Issued; its header waits for `poll_transmit`.
    Queued,
    /// Sent; replies may come.
    Sent,
}

/// What a request's replies have delivered so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Progress {
    /// Nothing to track (commands without content).
    Nothing,
    /// Ranges of a read covered by content chunks.
    Read(Coverage),
    /// Metadata contexts answered, one bit per selected context.
    Status { seen: u8 },
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) command: Command,
    pub(super) flags: CommandFlags,
    pub(super) offset: u64,
    pub(super) length: u64,
    /// The first error the replies reported.
    pub(super) error: Option<ErrorCode>,
    pub(super) progress: Progress,
}

impl Slot {
    /// Export offset one past the request's range (saturating: ranges were
    /// checked when issued).
    pub(super) fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// Whether `[offset, offset + length)` lies inside the request's range.
    pub(super) fn contains(&self, offset: u64, length: u64) -> bool {
        offset >= self.offset
            && offset
                .checked_add(length)
                .is_some_and(|end| end <= self.end())
    }
}

/// Fields of a new request.
#[derive(Clone, Copy, Debug)]
pub(super) struct NewRequest {
    pub(super) command: Command,
    pub(super) flags: CommandFlags,
    pub(super) offset: u64,
    pub(super) length: u64,
}

#[derive(Debug)]
pub(super) struct InFlight<const N: usize> {
    slots: SlotTable<Slot, N>,
    /// Slots whose headers wait to be sent, in issue order.
    queue: Deque<u16, N>,
}

impl<const N: usize> InFlight<N> {
    pub(super) const fn new() -> Self {
        Self {
            slots: SlotTable::new(),
            queue: Deque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(super) fn is_full(&self) -> bool {
        self.slots.is_full()
    }

    /// Whether a header waits to be sent.
    pub(super) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Takes a free slot and queues its header; `None` when full.
    pub(super) fn insert(&mut self, request: NewRequest) -> Option<RequestId> {
        let progress = match request.command {
            // Reads never exceed the maximum block size, a 32-bit value.
            Command::Read => Progress::Read(Coverage::new()),
            Command::BlockStatus => Progress::Status { seen: 0 },
            _ => Progress::Nothing,
        };
        let id = self.slots.insert(Slot {
            state: SlotState::Queued,
            command: request.command,
            flags: request.flags,
            offset: request.offset,
            length: request.length,
            error: None,
            progress,
        })?;
        // Cannot overflow: each live slot is queued at most once.
        let _ = self.queue.push_back(id.index() as u16);
        Some(id)
    }

    /// The next header to send; the slot becomes `Sent`.
    pub(super) fn pop_queued(&mut self) -> Option<(RequestId, Slot)> {
        let index = usize::from(self.queue.pop_front()?);
        let (id, slot) = self.slots.at_mut(index)?;
        slot.state = SlotState::Sent;
        Some((id, *slot))
    }

    /// The request a reply's cookie names, and its slot, if it was sent
    /// and is not done.
    pub(super) fn by_cookie(&self, cookie: u64) -> Option<(RequestId, Slot)> {
        let id = RequestId::from_bits(u32::try_from(cookie).ok()?);
        let slot = self.get(id)?;
        (slot.state == SlotState::Sent).then_some((id, *slot))
    }

    /// The live slot `id` names.
    pub(super) fn get(&self, id: RequestId) -> Option<&Slot> {
        self.slots.get(id)
    }

    pub(super) fn get_mut(&mut self, id: RequestId) -> Option<&mut Slot> {
        self.slots.get_mut(id)
    }

    pub(super) fn free(&mut self, id: RequestId) {
        self.slots.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: Command) -> NewRequest {
        NewRequest {
            command,
            flags: CommandFlags::empty(),
            offset: 0,
            length: 512,
        }
    }

    #[test]
    fn cookies_name_sent_requests_only() {
        let mut table = InFlight::<2>::new();
        let a = table.insert(request(Command::Read)).expect("slot");
        let b = table.insert(request(Command::Write)).expect("slot");
        assert!(table.is_full());
        assert_eq!(table.insert(request(Command::Flush)), None);
        // Not sent yet: a reply for it cannot be real.
        assert_eq!(table.by_cookie(a.cookie()).map(|(id, _)| id), None);
        assert_eq!(table.pop_queued().map(|(id, _)| id), Some(a));
        assert_eq!(table.by_cookie(a.cookie()).map(|(id, _)| id), Some(a));
        assert_eq!(table.by_cookie(b.cookie()).map(|(id, _)| id), None);
        table.free(a);
        assert_eq!(table.by_cookie(a.cookie()).map(|(id, _)| id), None);
        // The slot is reused with a new generation: the old cookie stays dead.
        let c = table.insert(request(Command::Read)).expect("slot");
        assert_ne!(c, a);
        assert_eq!(table.pop_queued().map(|(id, _)| id), Some(b));
        assert_eq!(table.pop_queued().map(|(id, _)| id), Some(c));
        assert_eq!(table.by_cookie(a.cookie()).map(|(id, _)| id), None);
        assert_eq!(table.by_cookie(c.cookie()).map(|(id, _)| id), Some(c));
        assert_eq!(table.by_cookie(u64::MAX).map(|(id, _)| id), None);
    }
}
