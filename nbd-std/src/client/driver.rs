//! The connection task: owns the socket and the core's client state
//! machine, takes operations from callers over a channel, splits them into
//! NBD requests no larger than the server's maximum block size, keeps as
//! many in flight as the core allows, and answers each caller on its
//! oneshot when all of its requests are done.
//!
//! Reading and writing the socket are interleaved by readiness, never one
//! blocking the other: a large write payload goes out while read replies
//! come in, so neither side can wait on a full socket buffer forever.
//! Write payloads go out by vectored write straight from the caller's
//! buffer; read data is copied once, from the input buffer into the
//! caller's.
//!
//! Reconnecting: when the connection breaks (end of input, reset, TLS
//! closed) or the server answers `NBD_ESHUTDOWN`, the task opens a new
//! connection to the same URI with the same options, checks that the
//! export still takes the requests it was sent (same size, not turned
//! read-only, the same commands and features), and sends every
//! operation not yet answered again, whole, in the order they came: all
//! NBD commands may be repeated. Attempts back off from
//! [`FIRST_RETRY_DELAY`] to [`MAX_RETRY_DELAY`]; once operations have
//! waited the URI's `reconnect-timeout`, they fail with
//! [`Error::ReconnectFailed`] and so does everything after. While no
//! operation waits, attempts go on (so a restart of an idle client's
//! server goes unnoticed) until the client is dropped.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nbd_core::client::{
    Event, ExportInfo, Mode, Payload, ProtocolError, RequestId, StdConnection, UsageError,
};
use nbd_core::shape::RequestMap;
use nbd_core::wire::{Command, CommandFlags, ErrorCode, OptionReplyType};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::Extent;
use super::error::{Error, Result};
use super::negotiate::{self, Negotiated};
use super::transport::{TlsConfig, Transport};
use super::uri::NbdUri;

/// Bytes of server input read at once.
const INPUT_BYTES: usize = 1 << 20;

/// Most slices passed to one vectored write.
const MAX_SLICES: usize = 64;

/// Operations queued on a connection beyond which callers wait.
pub(crate) const CHANNEL_DEPTH: usize = 256;

/// Requests split off operations but not yet given to the core, beyond
/// which no more operations are taken from the channel.
const QUEUED_REQUESTS: usize = 4 * crate::client::MAX_REQUESTS;

/// Pause after the first failed reconnection attempt; it doubles after
/// each failure up to [`MAX_RETRY_DELAY`].
pub(crate) const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Longest pause between reconnection attempts: a restarted server is
/// found within this.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Answer channels.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// One caller operation.
#[derive(Debug)]
pub(crate) enum Op {
    /// Fill `buf` from `offset`; the filled buffer comes back.
    Read {
        offset: u64,
        buf: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    /// Write `data` at `offset`; the buffer comes back for reuse.
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
        reply: Reply<Vec<u8>>,
    },
    /// Flush, trim, zero or cache: a command without data.
    Command {
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
        reply: Reply<()>,
    },
    /// Block status of one request (the caller loops over a range).
    BlockStatus {
        offset: u64,
        length: u64,
        reply: Reply<Vec<Extent>>,
    },
    /// Finish what is in flight, send `NBD_CMD_DISC`, close.
    Disconnect { reply: Reply<()> },
}

/// The error that ended a connection, shared with its callers.
pub(crate) type FatalSlot = Arc<Mutex<Option<Error>>>;

pub(crate) fn fatal_error(slot: &FatalSlot) -> Option<Error> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// What the driver needs to know about the export.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Largest request for reads, writes, trims and zeroing.
    pub(crate) max_piece: u64,
    /// Id of the `base:allocation` context.
    pub(crate) base_allocation: Option<u32>,
}

impl Limits {
    /// The limits of a negotiated connection.
    pub(crate) fn of(export: &ExportInfo, negotiated: &Negotiated) -> Self {
        let sizes = export.block_sizes;
        let minimum = u64::from(sizes.minimum.max(1));
        let maximum = u64::from(sizes.maximum).max(minimum);
        Self {
            max_piece: maximum / minimum * minimum,
            base_allocation: negotiated.base_allocation(),
        }
    }
}

/// What reconnecting needs: where, with which TLS settings, for how long,
/// and what the export was when the client first connected.
#[derive(Debug)]
pub(crate) struct Resume {
    pub(crate) uri: NbdUri,
    pub(crate) tls: TlsConfig,
    pub(crate) export: ExportInfo,
    /// `base:allocation` was selected (block status in use).
    pub(crate) base_allocation: bool,
}

impl Resume {
    fn enabled(&self) -> bool {
        !self.uri.reconnect_timeout.is_zero()
    }
}

/// How `export` differs from `before` in ways requests sent for `before`
/// depend on; gains (a larger block size, a new command) do not count.
fn changes(before: &ExportInfo, export: &ExportInfo) -> Vec<String> {
    let mut changes = Vec::new();
    if export.size != before.size {
        changes.push(format!(
            "its size went from {} to {} bytes",
            before.size, export.size
        ));
    }
    if export.is_read_only() && !before.is_read_only() {
        changes.push("it is read-only now".to_owned());
    }
    let commands = [
        ("flush", before.can_flush(), export.can_flush()),
        ("FUA", before.can_fua(), export.can_fua()),
        ("trim", before.can_trim(), export.can_trim()),
        (
            "write zeroes",
            before.can_write_zeroes(),
            export.can_write_zeroes(),
        ),
        (
            "fast zeroing",
            before.can_fast_zero(),
            export.can_fast_zero(),
        ),
        ("cache", before.can_cache(), export.can_cache()),
    ];
    for (name, had, has) in commands {
        if had && !has {
            changes.push(format!("{name} is no longer offered"));
        }
    }
    if export.features != before.features {
        changes.push(format!(
            "structured replies and extended headers were {:?}, now {:?}",
            before.features, export.features
        ));
    }
    let (was, is) = (
        before.block_sizes.minimum.max(1),
        export.block_sizes.minimum.max(1),
    );
    if was % is != 0 {
        changes.push(format!(
            "its minimum block size went from {was} to {is} bytes"
        ));
    }
    changes
}

/// Who waits for an operation, and its buffer.
#[derive(Debug)]
enum Waiter {
    Read {
        buf: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    Write {
        data: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    Unit {
        reply: Reply<()>,
    },
    Status {
        extents: Vec<Extent>,
        reply: Reply<Vec<Extent>>,
    },
}

impl Waiter {
    fn fail(self, error: Error) {
        // A caller that gave up (dropped its future) is not an error.
        match self {
            Self::Read { reply, .. } | Self::Write { reply, .. } => drop(reply.send(Err(error))),
            Self::Unit { reply } => drop(reply.send(Err(error))),
            Self::Status { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    fn succeed(self) {
        // A caller that gave up (dropped its future) is not an error.
        match self {
            Self::Read { buf, reply } => drop(reply.send(Ok(buf))),
            Self::Write { data, reply } => drop(reply.send(Ok(data))),
            Self::Unit { reply } => drop(reply.send(Ok(()))),
            Self::Status { extents, reply } => drop(reply.send(Ok(extents))),
        }
    }
}

/// An operation being served.
#[derive(Debug)]
struct Pending {
    waiter: Waiter,
    command: Command,
    flags: CommandFlags,
    /// Export offset of the operation's first byte.
    offset: u64,
    length: u64,
    /// Requests not yet done.
    parts_left: usize,
    /// Payload pieces not yet written to the socket.
    unsent: usize,
    error: Option<Error>,
}

/// Where an operation is kept in [`Operations`]: its slot, and its number,
/// which orders operations and tells a reused slot apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpKey {
    slot: usize,
    number: u64,
}

/// The operations being served, by slot: a request's [`Part`] (found by
/// the request's dense id) leads to its operation without hashing. Slots
/// of answered operations are reused; the table grows to the most
/// operations served at once.
#[derive(Debug, Default)]
struct Operations {
    slots: Vec<Option<(u64, Pending)>>,
    free: Vec<usize>,
    len: usize,
}

impl Operations {
    fn insert(&mut self, number: u64, pending: Pending) -> OpKey {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some((number, pending));
        self.len += 1;
        OpKey { slot, number }
    }

    fn get(&self, key: OpKey) -> Option<&Pending> {
        match self.slots.get(key.slot) {
            Some(Some((number, pending))) if *number == key.number => Some(pending),
            _ => None,
        }
    }

    fn get_mut(&mut self, key: OpKey) -> Option<&mut Pending> {
        match self.slots.get_mut(key.slot) {
            Some(Some((number, pending))) if *number == key.number => Some(pending),
            _ => None,
        }
    }

    fn remove(&mut self, key: OpKey) -> Option<Pending> {
        let slot = self.slots.get_mut(key.slot)?;
        if !matches!(slot, Some((number, _)) if *number == key.number) {
            return None;
        }
        self.len -= 1;
        self.free.push(key.slot);
        slot.take().map(|(_, pending)| pending)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The operations' keys in the order the operations came.
    fn keys_in_order(&self) -> Vec<OpKey> {
        let mut keys: Vec<OpKey> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| {
                entry.as_ref().map(|(number, _)| OpKey {
                    slot,
                    number: *number,
                })
            })
            .collect();
        keys.sort_unstable_by_key(|key| key.number);
        keys
    }

    /// Takes every operation out.
    fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.free.clear();
        self.len = 0;
        self.slots.drain(..).flatten().map(|(_, pending)| pending)
    }
}

/// One NBD request of an operation.
#[derive(Clone, Copy, Debug)]
struct Part {
    op: OpKey,
    command: Command,
    flags: CommandFlags,
    offset: u64,
    length: u64,
}

fn command_name(command: Command) -> &'static str {
    match command {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::Cache => "cache",
        Command::WriteZeroes => "write zeroes",
        Command::BlockStatus => "block status",
        Command::Resize => "resize",
        _ => "request",
    }
}

/// A piece of output: encoded headers, or a slice of a write's data.
#[derive(Clone, Copy, Debug)]
enum Segment {
    Head { start: usize, end: usize },
    Payload { op: OpKey, start: usize, end: usize },
}

impl Segment {
    fn len(&self) -> usize {
        match *self {
            Self::Head { start, end } | Self::Payload { start, end, .. } => end - start,
        }
    }
}

/// Operation bookkeeping, apart from the core so that events borrowing
/// the core can be handled.
#[derive(Debug)]
struct State {
    limits: Limits,
    next_op: u64,
    pending: Operations,
    /// Requests not yet accepted by the core (it was full).
    queue: VecDeque<Part>,
    inflight: RequestMap<Part>,
    out: Vec<u8>,
    segments: VecDeque<Segment>,
    /// Bytes of the first segment already written.
    written: usize,
    /// The session ended (`NBD_CMD_DISC` sent and everything answered).
    closed: bool,
    /// A fatal error found while handling events.
    fatal: Option<Error>,
    /// Requests the server refuses with `NBD_ESHUTDOWN` stay pending,
    /// to be sent again after reconnecting.
    resend_refused: bool,
}

/// Runs one connection until it is disconnected or fails (after
/// reconnecting failed, when `resume` allows reconnecting).
pub(crate) async fn run(
    transport: Transport,
    conn: Box<StdConnection>,
    leftover: Vec<u8>,
    limits: Limits,
    resume: Resume,
    ops: mpsc::Receiver<Op>,
    fatal: FatalSlot,
) {
    let mut driver = Driver {
        transport,
        conn,
        input: vec![0u8; INPUT_BYTES.max(leftover.len())],
        end: leftover.len(),
        state: State {
            limits,
            next_op: 0,
            pending: Operations::default(),
            queue: VecDeque::new(),
            inflight: RequestMap::new(),
            out: Vec::new(),
            segments: VecDeque::new(),
            written: 0,
            closed: false,
            fatal: None,
            resend_refused: resume.enabled(),
        },
        resume,
        ops,
        closing: false,
        disconnect_sent: false,
        disconnect_waiters: Vec::new(),
        eof: false,
    };
    driver.input[..leftover.len()].copy_from_slice(&leftover);
    let error = loop {
        let error = match driver.serve().await {
            Ok(()) => break Error::Disconnected,
            // A broken TLS relay: name the TLS error, not the broken pipe.
            Err(error) => driver.transport.explain(error, "the server"),
        };
        if !driver.may_reconnect(&error) {
            warn!("NBD connection failed: {error}");
            break error;
        }
        warn!(
            "NBD connection to {} broke ({error}): reconnecting, for up to {:?}",
            driver.resume.uri.address(),
            driver.resume.uri.reconnect_timeout
        );
        match driver.reconnect(error).await {
            Ok(true) => info!(
                "reconnected to {}: sending {} operations again",
                driver.resume.uri.address(),
                driver.state.pending.len()
            ),
            Ok(false) => break Error::Disconnected,
            Err(error) => {
                warn!("{error}");
                break error;
            }
        }
    };
    *fatal.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.clone());
    for pending in driver.state.pending.drain() {
        pending.waiter.fail(error.clone());
    }
    let outcome = match error {
        Error::Disconnected => Ok(()),
        other => Err(other),
    };
    for waiter in driver.disconnect_waiters {
        let _ = waiter.send(outcome.clone());
    }
    // Operations sent meanwhile: answered with the same error.
    driver.ops.close();
    while let Some(op) = driver.ops.recv().await {
        refuse(op, outcome.clone().err().unwrap_or(Error::Disconnected));
    }
}

fn refuse(op: Op, error: Error) {
    match op {
        Op::Read { reply, .. } | Op::Write { reply, .. } => drop(reply.send(Err(error))),
        Op::Command { reply, .. } | Op::Disconnect { reply } => drop(reply.send(Err(error))),
        Op::BlockStatus { reply, .. } => drop(reply.send(Err(error))),
    }
}

struct Driver {
    transport: Transport,
    conn: Box<StdConnection>,
    input: Vec<u8>,
    /// Bytes of `input` not yet processed (from 0).
    end: usize,
    state: State,
    resume: Resume,
    ops: mpsc::Receiver<Op>,
    /// No more operations are taken; disconnect once the queue drains.
    closing: bool,
    disconnect_sent: bool,
    disconnect_waiters: Vec<Reply<()>>,
    eof: bool,
}

impl Driver {
    async fn serve(&mut self) -> Result<()> {
        // Input that came with the end of negotiation.
        self.process()?;
        loop {
            self.issue();
            if self.closing && self.state.queue.is_empty() && !self.disconnect_sent {
                // The core sends NBD_CMD_DISC once every request is answered.
                self.disconnect_sent = true;
                let _ = self.conn.disconnect();
            }
            self.collect_output();
            // Pending events (the end of the session after DISC).
            self.process()?;
            if let Some(error) = self.state.fatal.take() {
                return Err(error);
            }
            if self.state.closed && self.state.segments.is_empty() {
                let _ = self.transport.shutdown().await;
                if !self.closing {
                    // Only NBD_ESHUTDOWN makes the core end a session
                    // this client did not ask to end.
                    return Err(Error::Closed {
                        reason: "it is shutting down: NBD_ESHUTDOWN".into(),
                    });
                }
                return Ok(());
            }
            if self.eof {
                return match self.conn.end_of_input() {
                    Ok(()) if self.closing => Ok(()),
                    Ok(()) => Err(Error::Closed {
                        reason: String::new(),
                    }),
                    Err(ProtocolError::UnexpectedEof) => Err(Error::Closed {
                        reason: format!("with {} requests in flight", self.state.inflight.len()),
                    }),
                    Err(error) => Err(Error::Protocol(error)),
                };
            }
            let mut interest = Interest::READABLE;
            if !self.state.segments.is_empty() {
                interest = interest.add(Interest::WRITABLE);
            }
            let take_ops = !self.closing && self.state.queue.is_empty();
            tokio::select! {
                ready = self.transport.ready(interest) => {
                    let ready = ready.map_err(Error::io)?;
                    if ready.is_writable() {
                        self.write()?;
                    }
                    if ready.is_readable() || ready.is_read_closed() {
                        self.read()?;
                    }
                }
                op = self.ops.recv(), if take_ops => match op {
                    Some(op) => {
                        self.accept(op);
                        while self.state.queue.len() < QUEUED_REQUESTS {
                            match self.ops.try_recv() {
                                Ok(op) => self.accept(op),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: leave politely.
                    None => self.closing = true,
                },
            }
        }
    }

    /// Takes an operation: splits it into requests and queues them.
    fn accept(&mut self, op: Op) {
        let state = &mut self.state;
        let id = state.next_op;
        state.next_op += 1;
        let (waiter, command, flags, offset, length) = match op {
            Op::Read { offset, buf, reply } => {
                let length = buf.len() as u64;
                (
                    Waiter::Read { buf, reply },
                    Command::Read,
                    CommandFlags::empty(),
                    offset,
                    length,
                )
            }
            Op::Write {
                offset,
                data,
                fua,
                reply,
            } => {
                let length = data.len() as u64;
                let flags = CommandFlags::empty().with_if(CommandFlags::FUA, fua);
                (
                    Waiter::Write { data, reply },
                    Command::Write,
                    flags,
                    offset,
                    length,
                )
            }
            Op::Command {
                command,
                flags,
                offset,
                length,
                reply,
            } => (Waiter::Unit { reply }, command, flags, offset, length),
            Op::BlockStatus {
                offset,
                length,
                reply,
            } => (
                Waiter::Status {
                    extents: Vec::new(),
                    reply,
                },
                Command::BlockStatus,
                CommandFlags::empty(),
                offset,
                length,
            ),
            Op::Disconnect { reply } => {
                self.closing = true;
                self.disconnect_waiters.push(reply);
                return;
            }
        };
        if length == 0 && !matches!(command, Command::Flush | Command::BlockStatus) {
            waiter.succeed();
            return;
        }
        let key = state.pending.insert(
            id,
            Pending {
                waiter,
                command,
                flags,
                offset,
                length,
                parts_left: 0,
                unsent: 0,
                error: None,
            },
        );
        state.enqueue(key);
    }

    /// Whether `error` ended the connection in a way a new connection
    /// can mend, and reconnecting is wanted.
    fn may_reconnect(&self, error: &Error) -> bool {
        let broken = matches!(
            error,
            Error::Io(_) | Error::Closed { .. } | Error::TlsHandshake { .. }
        );
        // A client disconnecting with nothing left to do is done.
        let work_left = !self.closing || !self.state.pending.is_empty();
        broken && work_left && self.resume.enabled()
    }

    /// Opens a new connection after `cause` broke the last one, retrying
    /// until it works or operations have waited the reconnect timeout.
    /// `Ok(false)`: nothing is left to do (the client disconnected).
    async fn reconnect(&mut self, cause: Error) -> Result<bool> {
        let (uri, tls) = (self.resume.uri.clone(), self.resume.tls.clone());
        let bound = uri.reconnect_timeout;
        let mut waiting_since = (!self.state.pending.is_empty()).then(Instant::now);
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let attempt = negotiate::open(&uri, Mode::Go, &tls);
            let last = match self.meanwhile(attempt, &mut waiting_since).await {
                Some(Ok((transport, conn, negotiated))) => {
                    self.resume_on(transport, conn, negotiated).await?;
                    return Ok(true);
                }
                // The server answered, and said no: waiting will not help.
                // (A TLS handshake is only reached once a live server
                // sent its greeting, so its failure is a refusal too: a
                // client certificate refused, say.)
                Some(Err(
                    error @ (Error::NoSuchExport { .. }
                    | Error::TlsRequired { .. }
                    | Error::TlsHandshake { .. }
                    | Error::NameTooLong(_)),
                )) => return Err(error),
                #[cfg(feature = "tls")]
                Some(Err(error @ Error::TlsSetup(_))) => return Err(error),
                Some(Err(error @ Error::OptionRefused { reply, .. }))
                    if reply != OptionReplyType::ErrShutdown =>
                {
                    return Err(error);
                }
                Some(Err(error)) => error,
                None => Error::Timeout {
                    address: uri.address(),
                },
            };
            debug!("reconnecting to {}: {last}", uri.address());
            if waiting_since.is_none_or(|since| since.elapsed() < bound) {
                self.meanwhile(tokio::time::sleep(delay), &mut waiting_since)
                    .await;
            }
            if self.closing && self.state.pending.is_empty() {
                return Ok(false);
            }
            if let Some(since) = waiting_since
                && since.elapsed() >= bound
            {
                return Err(Error::ReconnectFailed {
                    address: uri.address(),
                    cause: Arc::new(cause),
                    seconds: since.elapsed().as_secs(),
                    last: Arc::new(last),
                });
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    /// Runs `work` while taking operations, which wait with the others
    /// (the first one starts the reconnect clock, `waiting_since`).
    /// `None`: operations waited the reconnect timeout first, or the
    /// client disconnected with nothing waiting.
    async fn meanwhile<F: Future>(
        &mut self,
        work: F,
        waiting_since: &mut Option<Instant>,
    ) -> Option<F::Output> {
        let bound = self.resume.uri.reconnect_timeout;
        tokio::pin!(work);
        loop {
            if self.closing && self.state.pending.is_empty() {
                return None;
            }
            let deadline = waiting_since.map(|since| since + bound);
            let take_ops = !self.closing && self.state.queue.len() < QUEUED_REQUESTS;
            let timer = tokio::time::Instant::from_std(deadline.unwrap_or_else(Instant::now));
            tokio::select! {
                output = &mut work => return Some(output),
                () = tokio::time::sleep_until(timer), if deadline.is_some() => return None,
                op = self.ops.recv(), if take_ops => match op {
                    Some(op) => self.accept(op),
                    None => self.closing = true,
                },
            }
            if !self.state.pending.is_empty() {
                waiting_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Goes on over a new connection, if the export still takes the
    /// operations waiting: every one is sent again, whole.
    async fn resume_on(
        &mut self,
        mut transport: Transport,
        mut conn: Box<StdConnection>,
        negotiated: Negotiated,
    ) -> Result<()> {
        let uri = &self.resume.uri;
        let export = match negotiated.details(&uri.export) {
            Ok(details) => details.export,
            Err(error) => {
                negotiate::hang_up(&mut transport, &mut conn).await;
                return Err(error);
            }
        };
        let limits = Limits::of(&export, &negotiated);
        let mut changes = changes(&self.resume.export, &export);
        if self.resume.base_allocation && limits.base_allocation.is_none() {
            changes.push("base:allocation is no longer offered".to_owned());
        }
        if !changes.is_empty() {
            negotiate::hang_up(&mut transport, &mut conn).await;
            return Err(Error::ExportChanged {
                address: uri.address(),
                change: changes.join(", "),
            });
        }
        self.transport = transport;
        self.conn = conn;
        self.input
            .resize(INPUT_BYTES.max(negotiated.leftover.len()), 0);
        self.input[..negotiated.leftover.len()].copy_from_slice(&negotiated.leftover);
        self.end = negotiated.leftover.len();
        self.eof = false;
        self.disconnect_sent = false;
        let state = &mut self.state;
        state.limits = limits;
        state.inflight.clear();
        state.queue.clear();
        state.segments.clear();
        state.out.clear();
        state.written = 0;
        state.closed = false;
        state.fatal = None;
        for key in state.pending.keys_in_order() {
            state.enqueue(key);
        }
        Ok(())
    }

    /// Hands queued requests to the core while it has room.
    fn issue(&mut self) {
        while let Some(&part) = self.state.queue.front() {
            let result = match part.command {
                Command::Read => self.conn.read(part.offset, part.length, part.flags),
                Command::Write => self.conn.write(
                    part.offset,
                    part.length,
                    part.flags.contains(CommandFlags::FUA),
                ),
                Command::Flush => self.conn.flush(),
                Command::Trim => self.conn.trim(
                    part.offset,
                    part.length,
                    part.flags.contains(CommandFlags::FUA),
                ),
                Command::WriteZeroes => {
                    self.conn.write_zeroes(part.offset, part.length, part.flags)
                }
                Command::Cache => self.conn.cache(part.offset, part.length),
                Command::BlockStatus => self.conn.block_status(part.offset, part.length, false),
                other => Err(UsageError::NotAdvertised(other)),
            };
            match result {
                Ok(id) => {
                    self.state.queue.pop_front();
                    self.state.inflight.insert(id, part);
                }
                Err(UsageError::Full) => return,
                // The server is shutting down: sent again after reconnecting.
                Err(UsageError::Closing) if self.state.resend_refused && !self.closing => return,
                Err(error) => {
                    self.state.queue.pop_front();
                    let error = Error::Usage {
                        command: command_name(part.command),
                        error,
                    };
                    self.state.part_done(part, Some(error));
                }
            }
        }
    }

    /// Moves the core's messages into the output queue.
    fn collect_output(&mut self) {
        let state = &mut self.state;
        if state.segments.is_empty() {
            state.out.clear();
            state.written = 0;
        }
        while let Some(transmit) = self.conn.poll_transmit() {
            let start = state.out.len();
            for part in transmit.parts {
                state.out.extend_from_slice(part);
            }
            let end = state.out.len();
            match state.segments.back_mut() {
                Some(Segment::Head { end: last, .. }) if *last == start => *last = end,
                _ => state.segments.push_back(Segment::Head { start, end }),
            }
            if let Some(Payload::Data { id, offset, length }) = transmit.payload {
                let Some(part) = state.inflight.get(id) else {
                    state.fatal = Some(Error::io(io::Error::other(
                        "internal error: payload for an unknown request",
                    )));
                    return;
                };
                let op = part.op;
                let Some(pending) = state.pending.get_mut(op) else {
                    continue;
                };
                pending.unsent += 1;
                let start = (offset - pending.offset) as usize;
                state.segments.push_back(Segment::Payload {
                    op,
                    start,
                    end: start + length as usize,
                });
            }
        }
    }

    /// Writes as much output as the socket takes now.
    fn write(&mut self) -> Result<()> {
        let state = &mut self.state;
        while !state.segments.is_empty() {
            let mut slices = Vec::with_capacity(MAX_SLICES);
            for (i, segment) in state.segments.iter().take(MAX_SLICES).enumerate() {
                let skip = if i == 0 { state.written } else { 0 };
                let bytes: &[u8] = match *segment {
                    Segment::Head { start, end } => &state.out[start..end],
                    Segment::Payload { op, start, end } => match state.pending.get(op) {
                        Some(Pending {
                            waiter: Waiter::Write { data, .. },
                            ..
                        }) => &data[start..end],
                        _ => {
                            return Err(Error::io(io::Error::other(
                                "internal error: write payload gone before it was sent",
                            )));
                        }
                    },
                };
                slices.push(IoSlice::new(&bytes[skip..]));
            }
            let written = match self.transport.try_write_vectored(&slices) {
                Ok(0) => return Err(Error::io(io::ErrorKind::WriteZero.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(e)),
            };
            drop(slices);
            state.advance(written);
        }
        Ok(())
    }

    /// Reads what the socket has and processes it.
    fn read(&mut self) -> Result<()> {
        loop {
            if self.end == self.input.len() {
                // The core consumes all input it is given: cannot happen.
                return Err(Error::io(io::Error::other(
                    "internal error: input buffer full",
                )));
            }
            match self.transport.try_read(&mut self.input[self.end..]) {
                Ok(0) => {
                    debug!("server closed the connection");
                    self.eof = true;
                    return self.process();
                }
                Ok(n) => {
                    self.end += n;
                    self.process()?;
                    if self.end == 0 && n < self.input.len() {
                        // Short read: the socket is drained for now.
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(e)),
            }
        }
    }

    /// Feeds the input to the core and handles every event.
    fn process(&mut self) -> Result<()> {
        let mut start = 0;
        loop {
            let step = self
                .conn
                .process(&self.input[start..self.end])
                .map_err(Error::Protocol)?;
            start += step.consumed;
            match step.event {
                Some(event) => self.state.handle(event),
                None => break,
            }
        }
        self.input.copy_within(start..self.end, 0);
        self.end -= start;
        match self.state.fatal.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl State {
    fn handle(&mut self, event: Event<'_>) {
        match event {
            Event::ReadData { id, offset, data } => {
                if let Some((pending, _)) = self.pending_of(id)
                    && let Waiter::Read { buf, .. } = &mut pending.waiter
                {
                    let at = (offset - pending.offset) as usize;
                    buf[at..at + data.len()].copy_from_slice(data);
                }
            }
            Event::ReadHole { id, offset, length } => {
                if let Some((pending, _)) = self.pending_of(id)
                    && let Waiter::Read { buf, .. } = &mut pending.waiter
                {
                    let at = (offset - pending.offset) as usize;
                    buf[at..at + length as usize].fill(0);
                }
            }
            Event::BlockStatus {
                id,
                context_id,
                offset,
                descriptors,
            } => {
                let wanted = self.limits.base_allocation == Some(context_id);
                if wanted
                    && let Some((pending, _)) = self.pending_of(id)
                    && let Waiter::Status { extents, .. } = &mut pending.waiter
                {
                    let mut at = offset;
                    for descriptor in descriptors.iter() {
                        extents.push(Extent {
                            offset: at,
                            length: descriptor.length,
                            flags: (descriptor.status & 0xffff_ffff) as u32,
                        });
                        at += descriptor.length;
                    }
                }
            }
            Event::Done { id, result } => {
                let Some(part) = self.inflight.remove(id) else {
                    return;
                };
                if result == Err(ErrorCode::Shutdown) && self.resend_refused {
                    // Left pending: the core now ends the session, and
                    // the operation starts over on the next one.
                    return;
                }
                let error = result.err().map(|code| Error::Server {
                    command: command_name(part.command),
                    offset: part.offset,
                    length: part.length,
                    code,
                });
                self.part_done(part, error);
            }
            Event::Closed => self.closed = true,
            _ => {}
        }
    }

    /// Splits operation `key` into requests no larger than the maximum
    /// and queues them.
    fn enqueue(&mut self, key: OpKey) {
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        if let Waiter::Status { extents, .. } = &mut pending.waiter {
            extents.clear();
        }
        pending.unsent = 0;
        pending.error = None;
        let (command, flags) = (pending.command, pending.flags);
        let part = |offset, length| Part {
            op: key,
            command,
            flags,
            offset,
            length,
        };
        if matches!(command, Command::Flush | Command::BlockStatus) {
            self.queue.push_back(part(pending.offset, pending.length));
            pending.parts_left = 1;
            return;
        }
        let max = self.limits.max_piece.max(1);
        let end = pending.offset + pending.length;
        let mut at = pending.offset;
        pending.parts_left = 0;
        while at < end {
            let piece = (end - at).min(max);
            self.queue.push_back(part(at, piece));
            at += piece;
            pending.parts_left += 1;
        }
    }

    fn pending_of(&mut self, id: RequestId) -> Option<(&mut Pending, Part)> {
        let part = *self.inflight.get(id)?;
        Some((self.pending.get_mut(part.op)?, part))
    }

    /// One request of an operation ended; answers the caller after the last.
    fn part_done(&mut self, part: Part, error: Option<Error>) {
        let Some(pending) = self.pending.get_mut(part.op) else {
            return;
        };
        if pending.error.is_none() {
            pending.error = error;
        }
        pending.parts_left -= 1;
        if pending.parts_left > 0 {
            return;
        }
        if pending.unsent > 0 {
            // The server answered a write it cannot have received whole.
            self.fatal = Some(Error::Protocol(ProtocolError::UnsolicitedData));
            return;
        }
        if let Some(pending) = self.pending.remove(part.op) {
            match pending.error {
                Some(error) => pending.waiter.fail(error),
                None => pending.waiter.succeed(),
            }
        }
    }

    /// Drops `written` bytes of output.
    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(&first) = self.segments.front() else {
                return;
            };
            let left = first.len() - self.written;
            if written < left {
                self.written += written;
                return;
            }
            written -= left;
            self.written = 0;
            self.segments.pop_front();
            if let Segment::Payload { op, .. } = first
                && let Some(pending) = self.pending.get_mut(op)
            {
                pending.unsent -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nbd_core::export::{DEFAULT_BLOCK_SIZES, Features};
    use nbd_core::wire::{BlockSizeConstraints, TransmissionFlags as F};

    use super::*;

    fn export(flags: F, minimum: u32, extended_headers: bool) -> ExportInfo {
        ExportInfo {
            size: 1 << 20,
            flags: F::HAS_FLAGS | flags,
            block_sizes: BlockSizeConstraints {
                minimum,
                ..DEFAULT_BLOCK_SIZES
            },
            block_sizes_advertised: true,
            features: Features {
                structured_replies: true,
                extended_headers,
            },
        }
    }

    #[test]
    fn changes_that_break_requests_are_named() {
        let before = export(F::SEND_FLUSH | F::SEND_TRIM, 512, true);
        assert!(changes(&before, &before).is_empty());
        // Gains and a smaller minimum dividing the old one are fine.
        let gained = export(F::SEND_FLUSH | F::SEND_TRIM | F::SEND_CACHE, 1, true);
        assert!(changes(&before, &gained).is_empty());

        let after = ExportInfo {
            size: 1 << 21,
            ..export(F::READ_ONLY | F::SEND_FLUSH, 4096, false)
        };
        let found = changes(&before, &after);
        for wanted in [
            "its size went from 1048576 to 2097152 bytes",
            "it is read-only now",
            "trim is no longer offered",
            "structured replies and extended headers were",
            "its minimum block size went from 512 to 4096 bytes",
        ] {
            assert!(
                found.iter().any(|change| change.starts_with(wanted)),
                "{wanted:?} not in {found:?}"
            );
        }
        assert_eq!(found.len(), 5, "{found:?}");
    }

    fn unit_operation() -> Pending {
        let (reply, _) = oneshot::channel();
        Pending {
            waiter: Waiter::Unit { reply },
            command: Command::Flush,
            flags: CommandFlags::empty(),
            offset: 0,
            length: 0,
            parts_left: 0,
            unsent: 0,
            error: None,
        }
    }

    #[test]
    fn operations_reuse_slots_without_reaching_old_keys() {
        let mut operations = Operations::default();
        let first = operations.insert(0, unit_operation());
        let second = operations.insert(1, unit_operation());
        assert!(operations.remove(first).is_some());
        assert!(operations.remove(first).is_none(), "removed twice");
        let third = operations.insert(2, unit_operation());
        assert_eq!(third.slot, first.slot, "the freed slot is reused");
        assert!(
            operations.get(first).is_none(),
            "an old key reached a new operation"
        );
        assert!(operations.get_mut(third).is_some());
        assert_eq!(operations.len(), 2);
        assert_eq!(operations.keys_in_order(), [second, third]);
        assert_eq!(operations.drain().count(), 2);
        assert!(operations.is_empty());
    }
}
