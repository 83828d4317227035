//! Bounds on the request payload bytes the server holds: write data not
//! yet stored, read data not yet sent, and grown input buffers. A connection that cannot get room stops feeding the protocol
//! core (and so stops reading from its client) until bytes are given back;
//! it never allocates past the budgets.
//!
//! The per-connection budget lets one request through when the connection
//! holds nothing else, so a read larger than the per-connection budget
//! still completes; the per-server budget is never exceeded, which is why
//! it must hold the largest request (checked by
//! [`ServerLimits::check`](super::ServerLimits::check)).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Default per-connection budget: room to stream large writes to a file
/// at full speed (a dozen 1 MiB pieces on the thread pool at once).
pub const DEFAULT_CONNECTION_MEMORY: usize = 16 << 20;

/// Default per-server budget: small next to a small machine's memory, and
/// above the largest request (64 MiB by default).
pub const DEFAULT_SERVER_MEMORY: usize = 256 << 20;

/// Bytes of write payload stored per call to a blocking backend.
pub const WRITE_PIECE: usize = 1 << 20;

/// What a connection may hold and still take more while another
/// connection waits for budget: a client with little in flight is served
/// before those holding a lot take again, so bulk clients cannot starve
/// a small one.
const FAIR_SHARE: usize = WRITE_PIECE;

/// Read buffers a busy connection keeps for its next reads once their
/// replies are sent. Freeing several MiB buffers together had glibc give
/// their pages back to the kernel, and the next reads faulted them in
/// again: 20 to 140 page faults a 1 MiB read at QD8, a quarter of the
/// server's CPU time pinned to one CPU. Kept buffers stay held in the
/// connection's budget, and are the first bytes it gives back when it
/// needs room: eight of them can hold all of it.
const SPARE_READ_BUFFERS: usize = 8;

/// Smallest read buffer kept: smaller ones come from the allocator's
/// free lists without faults.
const SPARE_MIN_BYTES: usize = 128 << 10;

/// The bytes held by every connection of a server.
#[derive(Debug)]
pub struct ServerBudget {
    limit: usize,
    used: AtomicUsize,
    /// Connections that wait for budget.
    starving: AtomicUsize,
    freed: Notify,
}

impl ServerBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            starving: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes up to `wanted` bytes, as many as fit; returns how many.
    fn take_up_to(&self, wanted: usize) -> usize {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let granted = wanted.min(self.limit.saturating_sub(used));
            if granted == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + granted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return granted,
                Err(now) => used = now,
            }
        }
    }

    /// Takes exactly `wanted` bytes, or nothing.
    fn take(&self, wanted: usize) -> bool {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            if used.saturating_add(wanted) > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + wanted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// Resolves when some connection gives bytes back.
    pub(super) async fn freed(&self) {
        self.freed.notified().await;
    }
}

/// One connection's share. Dropping it gives everything back.
#[derive(Debug)]
pub(super) struct Budget {
    server: Arc<ServerBudget>,
    limit: usize,
    /// Payload bytes held (write pieces, read data).
    held: usize,
    /// Taken from the server for the input fed to the core by one pass,
    /// drawn by the writes it carries.
    reserved: usize,
    /// Input-buffer growth (counts against the server only).
    input: usize,
    /// Counted in the server's `starving`.
    starving: bool,
    /// Empty read buffers kept for the next reads of their exact size
    /// (see [`SPARE_READ_BUFFERS`]), each held at its capacity.
    spare_reads: Vec<Vec<u8>>,
}

impl Budget {
    pub(super) fn new(server: Arc<ServerBudget>, limit: usize) -> Self {
        Self {
            server,
            limit,
            held: 0,
            reserved: 0,
            input: 0,
            starving: false,
            spare_reads: Vec::new(),
        }
    }

    /// Whether this connection may take budget now (see [`FAIR_SHARE`]).
    fn may_take(&self) -> bool {
        !self.others_starving() || self.held + self.reserved < FAIR_SHARE
    }

    /// Whether another connection waits for budget.
    pub(super) fn others_starving(&self) -> bool {
        self.server.starving.load(Ordering::Acquire) > usize::from(self.starving)
    }

    /// Records whether the last attempt to take budget failed.
    fn starve(&mut self, starving: bool) {
        if starving != self.starving {
            self.starving = starving;
            if starving {
                self.server.starving.fetch_add(1, Ordering::AcqRel);
            } else {
                self.server.starving.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    pub(super) fn server(&self) -> &Arc<ServerBudget> {
        &self.server
    }

    /// Room under the per-connection limit; unlimited while the connection
    /// holds nothing, so one request larger than the limit goes through.
    fn connection_room(&self) -> usize {
        if self.held == 0 {
            usize::MAX
        } else {
            self.limit.saturating_sub(self.held + self.reserved)
        }
    }

    /// Takes `bytes` for one request's data, or nothing.
    pub(super) fn try_hold(&mut self, bytes: usize) -> bool {
        self.take_held(bytes) || (self.drop_spares() && self.take_held(bytes))
    }

    fn take_held(&mut self, bytes: usize) -> bool {
        if !self.may_take() || bytes > self.connection_room() || !self.server.take(bytes) {
            self.starve(true);
            return false;
        }
        self.starve(false);
        self.held += bytes;
        true
    }

    /// Reserves up to `wanted` bytes for input about to be fed to the
    /// core, and at least `floor` (or nothing): granting crumbs would have
    /// every starved connection wake, store a few bytes and wake the
    /// others again. Returns how many were granted.
    pub(super) fn reserve(&mut self, wanted: usize, floor: usize) -> usize {
        match self.take_reserved(wanted, floor) {
            0 if self.drop_spares() => self.take_reserved(wanted, floor),
            granted => granted,
        }
    }

    fn take_reserved(&mut self, wanted: usize, floor: usize) -> usize {
        let wanted = wanted.min(self.connection_room());
        if wanted < floor || !self.may_take() {
            self.starve(true);
            return 0;
        }
        let granted = self.server.take_up_to(wanted);
        if granted < floor {
            self.server.give(granted);
            self.starve(true);
            return 0;
        }
        self.starve(false);
        self.reserved += granted;
        granted
    }

    /// Moves `bytes` of the reservation to what is held. Past the
    /// reservation (input fed before the export was known) the server's
    /// count grows anyway: the bytes are already allocated.
    pub(super) fn draw(&mut self, bytes: usize) {
        let from_reserve = bytes.min(self.reserved);
        self.reserved -= from_reserve;
        if bytes > from_reserve {
            self.server
                .used
                .fetch_add(bytes - from_reserve, Ordering::AcqRel);
        }
        self.held += bytes;
    }

    /// Gives back what the last reservation did not use.
    pub(super) fn unreserve(&mut self) {
        self.server.give(std::mem::take(&mut self.reserved));
    }

    /// Gives back `bytes` that were held.
    pub(super) fn release(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.server.give(bytes);
    }

    /// Gives back a read buffer whose bytes were held at its length:
    /// kept for the next read of its size when it is large enough and
    /// room is left among the spares, freed otherwise.
    pub(super) fn release_read_buffer(&mut self, mut buffer: Vec<u8>) {
        if buffer.len() == buffer.capacity()
            && buffer.len() >= SPARE_MIN_BYTES
            && self.spare_reads.len() < SPARE_READ_BUFFERS
        {
            buffer.clear();
            self.spare_reads.push(buffer);
        } else {
            self.release(buffer.len());
        }
    }

    /// A kept read buffer of exactly `bytes`; its hold becomes the read's.
    pub(super) fn take_spare_read_buffer(&mut self, bytes: usize) -> Option<Vec<u8>> {
        let at = self
            .spare_reads
            .iter()
            .position(|buffer| buffer.capacity() == bytes)?;
        Some(self.spare_reads.swap_remove(at))
    }

    /// Whether read buffers are kept (see [`Budget::drop_spares`]).
    pub(super) fn keeps_spares(&self) -> bool {
        !self.spare_reads.is_empty()
    }

    /// Frees the kept read buffers and gives their bytes back; says
    /// whether there were any.
    pub(super) fn drop_spares(&mut self) -> bool {
        let kept = self.keeps_spares();
        for buffer in std::mem::take(&mut self.spare_reads) {
            self.release(buffer.capacity());
        }
        kept
    }

    /// Takes `bytes` more for the input buffer, up to a quarter of the
    /// per-connection limit in all.
    pub(super) fn try_grow_input(&mut self, bytes: usize) -> bool {
        if self.input + bytes > self.limit / 4 || !self.server.take(bytes) {
            return false;
        }
        self.input += bytes;
        true
    }

    /// Gives back the input buffer's growth (the buffer was dropped).
    pub(super) fn release_input(&mut self) {
        self.server.give(std::mem::take(&mut self.input));
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.starve(false);
        self.server.give(self.held + self.reserved + self.input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_budget_is_never_exceeded() {
        let server = Arc::new(ServerBudget::new(10 << 20));
        let mut a = Budget::new(Arc::clone(&server), 4 << 20);
        let mut b = Budget::new(Arc::clone(&server), 4 << 20);
        // Alone, a connection may hold one request above its own limit.
        assert!(a.try_hold(8 << 20));
        assert!(!a.try_hold(1));
        assert!(!b.try_hold(4 << 20), "only 2 MiB left on the server");
        assert_eq!(b.reserve(8 << 20, 4 << 20), 0, "below the floor");
        assert_eq!(b.reserve(8 << 20, 1 << 20), 2 << 20);
        b.draw(1 << 20);
        b.unreserve();
        assert_eq!(server.used(), 9 << 20);
        a.release(8 << 20);
        // `a` waited last; once served, `b` may take past its fair share.
        assert!(a.try_hold(1));
        a.release(1);
        assert!(b.try_hold(3 << 20));
        assert!(!b.try_hold(1), "b is at its own limit");
        drop(b);
        drop(a);
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn a_connection_holding_little_goes_first() {
        let server = Arc::new(ServerBudget::new(4 << 20));
        let mut bulk = Budget::new(Arc::clone(&server), 4 << 20);
        let mut small = Budget::new(Arc::clone(&server), 4 << 20);
        assert!(bulk.try_hold(3 << 20));
        assert!(!small.try_hold(2 << 20), "not enough left");
        assert!(!bulk.try_hold(1 << 20), "bulk holds a lot and small waits");
        bulk.release(3 << 20);
        assert!(small.try_hold(2 << 20));
        assert!(bulk.try_hold(1 << 20), "nobody waits any more");
        drop(small);
        drop(bulk);
        assert_eq!(server.starving.load(Ordering::Acquire), 0);
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn kept_read_buffers_give_their_bytes_back_when_room_is_needed() {
        let server = Arc::new(ServerBudget::new(64 << 20));
        let mut budget = Budget::new(Arc::clone(&server), 2 << 20);
        let buffer = 256 << 10;
        for _ in 0..SPARE_READ_BUFFERS {
            assert!(budget.try_hold(buffer));
        }
        for _ in 0..SPARE_READ_BUFFERS {
            budget.release_read_buffer(vec![0; buffer]);
        }
        assert!(budget.keeps_spares());
        assert_eq!(server.used(), 2 << 20, "the spares hold all of the budget");
        // A read of another size, then input for the next request: each
        // gets the room the spares held.
        assert!(budget.try_hold(128 << 10));
        assert!(!budget.keeps_spares());
        budget.release(128 << 10);
        for _ in 0..SPARE_READ_BUFFERS {
            assert!(budget.try_hold(buffer));
            budget.release_read_buffer(vec![0; buffer]);
        }
        assert_eq!(budget.reserve(1 << 20, 64 << 10), 1 << 20);
        assert!(!budget.keeps_spares());
        budget.unreserve();
        // A spare of the size read next keeps its hold for that read.
        assert!(budget.try_hold(buffer));
        budget.release_read_buffer(vec![0; buffer]);
        let spare = budget.take_spare_read_buffer(buffer).expect("kept");
        assert_eq!(spare.capacity(), buffer);
        assert_eq!(server.used(), buffer);
        budget.release(buffer);
        // Small or partly filled buffers are freed, not kept.
        assert!(budget.try_hold(4096));
        budget.release_read_buffer(vec![0; 4096]);
        assert!(!budget.keeps_spares());
        drop(budget);
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn input_growth_is_capped_at_a_quarter() {
        let server = Arc::new(ServerBudget::new(1 << 30));
        let mut budget = Budget::new(Arc::clone(&server), 16 << 20);
        assert!(budget.try_grow_input(4 << 20));
        assert!(!budget.try_grow_input(1));
        budget.release_input();
        assert_eq!(server.used(), 0);
    }
}
