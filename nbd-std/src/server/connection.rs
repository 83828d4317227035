//! Drives one client: bytes in to the core, storage work out to the
//! backend (inline for fast backends, on the blocking pool otherwise), and
//! every reply ready sent in one vectored write, read data straight from
//! the buffer it was read into.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use nbd_core::server::{
    CloseReason, Config, Event, Payload, ReadOutcome, Request, RequestId, StdConnection,
};
use nbd_core::shape::RequestMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::budget::{Budget, ServerBudget, WRITE_PIECE};
use super::gathering::Gathering;
use super::io_threads::ThreadShare;
use super::poll_window::PollWindow;
use super::read_ring::ReadRing;
use super::socket::{self, PlainSocket};
use super::storage::{Done, Job};
use crate::average::{EighthAverage, nanos};
use crate::backend::{Backend, FileMap, INLINE_BYTES, ReadPiece, ZeroFlags, error_code};
use crate::export::{ClientView, ExportSet, WriterPolicy};
use crate::metrics::{ConnectionMetrics, HandshakeFailure};

/// Most bytes of client input buffered: room for several 1 MiB writes, so
/// a burst of requests is handled in one pass.
const INPUT_BYTES: usize = 4 << 20;

/// The unit a write's payload is stored in whole when it arrives in parts
/// (see `store_whole_units_now`): no unit is left holding parts of two
/// overlapping writes, and none is written in two parts. A filesystem
/// block (4 KiB on common filesystems, a multiple of any disk's sector):
/// writing part of one that is not in the page cache makes the kernel
/// read it from the disk first, while the connection waits. Cut at
/// 512-byte sectors, a 1 GiB `nbdcopy` into a file on disk whose pages
/// were not cached read the disk six times as often and took 1.07 to
/// 1.47 s, nbdkit 0.64 to 1.18 (docs/BENCHMARKS.md).
const WRITE_UNIT: u64 = 4096;

/// Bytes of client input buffered at first. The buffer doubles (up to
/// `INPUT_BYTES`) each time a read fills it, so an idle or negotiating
/// connection costs 4 KiB, not 4 MiB (the core buffers options itself),
/// and a busy one has room for its bursts after a few reads.
const FIRST_INPUT_BYTES: usize = 4 << 10;

/// Fewest input bytes worth feeding a write-streaming connection when
/// the budget is tight (or all it has, when less).
const MIN_GRANT: usize = 256 << 10;

/// Longest wait for another connection to give bytes back before looking
/// again (a wake-up can be missed between the check and the wait).
const BUDGET_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Bytes a connection moves (received and sent) before the other
/// connections on its I/O thread get a turn. Tokio's cooperative budget
/// counts operations, not bytes: 128 passes of 4 MiB writes stored inline
/// held a small client on the same thread for 170 ms a request.
const TURN_BYTES: usize = 1 << 20;

/// Passes in a row with at most one request in flight after which a
/// client is taken to wait for each reply: its replies go out at once.
const ONE_IN_FLIGHT_BEFORE_SENDING_AT_ONCE: u32 = 32;

/// A write to storage that may block, done on the connection's thread,
/// is cheap under this many nanoseconds (on average, lately): then its
/// reply may be held like a read's. 4 KiB random writes at QD32 cost
/// the server 3 to 4 µs of CPU each, all told, into tmpfs or into ext4
/// pages not cached before, and 20 to 40 µs into a file on ext4 whose
/// pages were cached (read whole; why those are dear was not found).
const CHEAP_WRITE_NANOS: u64 = 10_000;

/// How long replies may be held for the requests the socket already
/// holds, before they go out anyway. At queue depth 32 on a memory
/// export, holding took the writes (`writev`) from 0.77 to 0.29 a
/// request and server CPU per 4 KiB write from 5.1 to 4.7 µs.
const LONGEST_HOLD: std::time::Duration = std::time::Duration::from_micros(20);

/// Read data above which replies go out at once rather than wait for
/// the next requests: the socket would sit idle while they are served.
const MOST_READ_DATA_HELD: usize = 64 << 10;

/// Most bytes taken from the socket by one read. A read of all the
/// input buffer's room (up to 4 MiB) had write payload copied into the
/// export long after the kernel copied it in, out of the CPU's cache by
/// then: 1 MiB writes at QD8 into a memory export, the server on one
/// CPU, 4,524 to 4,800 MiB/s in four alternating runs against 5,166 to
/// 5,442 reading 512 KiB at a time (1 MiB: 4,660 to 4,965).
const MOST_READ_AT_ONCE: usize = 512 << 10;

/// Data copied into read buffers after which the connection sends the
/// replies it holds before taking more requests from its input. A batch
/// of requests read at once was all copied before any reply went out:
/// ten 256 KiB reads (`nbdcopy` to `null:`, the server on one CPU) held
/// 2.5 MiB, more than this CPU's cache, so the copy into the socket read
/// them back from memory, and the buffers beyond the kept spares were
/// faulted in afresh every batch.
const COPIED_READ_DATA_BEFORE_SENDING: usize = 256 << 10;

/// Smallest read sent from the page cache with `sendfile`, where the
/// backend can (file exports over plain sockets): below it, copying the
/// data costs less than the extra system calls (`cachestat`, and a send
/// of its own for the reply header).
const SENDFILE_BYTES: u64 = 64 << 10;

/// Smallest write payload taken from the socket straight into storage
/// (a memory export's pages, a file in memory's pages through its
/// mapping) rather than read into the input buffer and stored from
/// there: below it the extra system calls (a header read alone, and a
/// step or two per page) cost more than the copy saved.
const DIRECT_PAYLOAD_BYTES: u64 = 64 << 10;

/// How long an idle connection keeps its spare read buffers.
const SPARE_IDLE: std::time::Duration = std::time::Duration::from_millis(10);

/// Zero bytes for simple replies to reads of holes.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Most slices one `writev` takes (Linux's `IOV_MAX`).
pub(super) const MAX_IOVECS: usize = 1024;

fn push_zeroes(slices: &mut Vec<IoSlice<'_>>, length: u64) {
    let mut left = length;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64) as usize;
        slices.push(IoSlice::new(&ZEROES[..n]));
        left -= n as u64;
    }
}

/// What one connection is allowed, from the server's limits.
pub(super) struct Settings {
    pub(super) server_memory: Arc<ServerBudget>,
    pub(super) connection_memory: usize,
    pub(super) idle_timeout: Option<std::time::Duration>,
    /// Who the client is for `writers=exclusive`: its IP address.
    pub(super) client: String,
    /// `--metrics`: this connection's counters.
    pub(super) metrics: Option<ConnectionMetrics>,
    /// `--poll-window`: how this connection waits for its next request
    /// (on an I/O thread only).
    pub(super) poll_window: Option<PollWindow>,
    /// `--gather-wait`: whether held replies wait for more requests (on
    /// an I/O thread only).
    pub(super) gathering: Option<Gathering>,
    /// Who else is on this connection's I/O thread (on one only).
    pub(super) thread_share: Option<ThreadShare>,
    /// That thread's ring for reads that wait for a disk, if it has one.
    pub(super) read_ring: Option<ReadRing>,
}

/// A writable connection to an exclusive export; given up when dropped.
struct WriterClaim {
    exports: Arc<ExportSet>,
    index: usize,
    client: String,
}

impl Drop for WriterClaim {
    fn drop(&mut self) {
        self.exports.release_writer(self.index, &self.client);
    }
}

/// How a pass of [`Driver::serve`] over one stream ended.
enum Ended {
    /// The session is over.
    Done,
    /// `NBD_OPT_STARTTLS` was acknowledged: go on over TLS.
    StartTls,
}

/// What answers the TLS handshake after `NBD_OPT_STARTTLS`: rustls's
/// acceptor with the `tls` feature. Without it there is none to have, so
/// a connection never holds one; the server's TLS policy then stays
/// [`TlsPolicy::Disabled`](nbd_core::server::TlsPolicy::Disabled) and the
/// core refuses `NBD_OPT_STARTTLS` with `NBD_REP_ERR_POLICY` itself.
#[cfg(feature = "tls")]
pub(super) type TlsAcceptor = tokio_rustls::TlsAcceptor;
/// Without the `tls` feature: no value, so no connection holds one.
#[cfg(not(feature = "tls"))]
pub(super) type TlsAcceptor = std::convert::Infallible;

/// Runs the connection until the client leaves or the session ends.
///
/// With `tls`, a STARTTLS the core acknowledged upgrades the stream and the
/// same driver (and core connection) goes on over the TLS stream; plain
/// connections never touch TLS types.
pub(super) async fn run<S>(
    mut stream: S,
    exports: Arc<ExportSet>,
    config: Config,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    negotiated: oneshot::Sender<()>,
    settings: Settings,
) where
    S: AsyncRead + AsyncWrite + Unpin + PlainSocket,
{
    info!("client connected");
    let mut shutdown = shutdown;
    // Until the client answers the greeting it holds no protocol state:
    // a silent client costs this task, not a request table and buffers.
    let greeting = greeting(&exports, &settings.client, config);
    if let Err(error) = stream.write_all(&greeting).await {
        warn!("connection closed before the greeting was sent ({error})");
        return;
    }
    let mut first = [0u8; FIRST_READ_BYTES];
    let first_len = tokio::select! {
        read = stream.read(&mut first) => match read {
            Ok(0) => {
                info!("client left after the greeting");
                return;
            }
            Ok(n) => n,
            Err(error) => {
                warn!("connection closed ({error}) before the client answered the greeting");
                return;
            }
        },
        () = stopped(&mut shutdown) => {
            info!("closing for server shutdown");
            return;
        }
    };
    let budget = Budget::new(settings.server_memory, settings.connection_memory);
    let mut driver = Driver::new(exports, config, budget, settings.client);
    driver.idle_timeout = settings.idle_timeout;
    driver.negotiated = Some(negotiated);
    driver.metrics = settings.metrics;
    driver.poll_window = settings.poll_window;
    driver.gathering = settings.gathering;
    driver.thread_share = settings.thread_share;
    driver.read_ring = settings.read_ring;
    let first_pass = match driver.skip_greeting(&greeting) {
        Ok(()) => {
            driver
                .serve(&mut stream, shutdown.clone(), &first[..first_len])
                .await
        }
        Err(error) => Err(error),
    };
    let (outcome, tls_failed) = match first_pass {
        Ok(Ended::Done) => (Ok(()), false),
        Ok(Ended::StartTls) => match tls {
            #[cfg(feature = "tls")]
            Some(acceptor) => serve_over_tls(&mut driver, stream, acceptor, shutdown).await,
            #[cfg(not(feature = "tls"))]
            Some(never) => match never {},
            None => (
                Err(io::Error::other(
                    "TLS requested but this server has no TLS configured",
                )),
                false,
            ),
        },
        Err(error) => (Err(error), false),
    };
    if let (Err(error), Some(metrics)) = (&outcome, &driver.metrics)
        && !metrics.has_selected()
    {
        metrics.server().handshake_failed(if tls_failed {
            HandshakeFailure::Tls
        } else if error.kind() == io::ErrorKind::InvalidData {
            HandshakeFailure::Protocol
        } else {
            HandshakeFailure::Io
        });
    }
    match outcome {
        Ok(()) => info!("client disconnected; requests served: {}", driver.requests),
        Err(error) => warn!(
            "connection closed ({error}); requests served: {}",
            driver.requests
        ),
    }
}

/// Runs the TLS handshake on `stream` after the core acknowledged
/// `NBD_OPT_STARTTLS`, then the rest of the session over TLS with the same
/// driver. Also says whether the handshake itself failed (for metrics).
#[cfg(feature = "tls")]
async fn serve_over_tls<S>(
    driver: &mut Driver,
    stream: S,
    acceptor: TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) -> (io::Result<()>, bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Sync,
{
    match acceptor.accept(stream).await {
        Ok(mut tls_stream) => {
            info!("TLS established");
            let outcome = match driver.serve(&mut tls_stream, shutdown, &[]).await {
                Ok(Ended::Done) => Ok(()),
                // The core refuses a second STARTTLS itself.
                Ok(Ended::StartTls) => Err(io::Error::other("STARTTLS inside TLS")),
                Err(error) => Err(error),
            };
            (outcome, false)
        }
        Err(error) => (
            Err(io::Error::new(
                error.kind(),
                format!("TLS handshake failed: {}", crate::tls::tls_reason(&error)),
            )),
            true,
        ),
    }
}

/// Bytes read from the client before its connection state is created:
/// client flags and the first options fit.
const FIRST_READ_BYTES: usize = 512;

/// The server greeting, from a core connection too small to serve (one
/// request slot, a one-byte buffer): the full one is made once the client
/// answers, and its greeting checked against this one.
fn greeting(exports: &Arc<ExportSet>, client: &str, config: Config) -> Vec<u8> {
    let catalog = ClientView::new(Arc::clone(exports), client.to_owned());
    let mut conn = nbd_core::server::Connection::<_, 1, 1>::new(catalog, config);
    let mut bytes = Vec::new();
    if let Some(transmit) = conn.poll_transmit() {
        for part in transmit.parts {
            bytes.extend_from_slice(part);
        }
    }
    bytes
}

/// Resolves once `shutdown` turns true (never, if its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A write to a fast backend that must be made durable once stored (FUA).
struct PendingWrite {
    offset: u64,
}

/// A write to a blocking backend, stored in pieces of at most
/// [`WRITE_PIECE`] bytes as its payload arrives.
struct StreamingWrite {
    offset: u64,
    length: u64,
    fua: bool,
    /// Payload gathered for the next piece, and where it goes.
    piece: Vec<u8>,
    piece_offset: u64,
    /// Bytes the piece takes before it is sent to storage.
    piece_limit: usize,
    /// Pieces on the pool.
    outstanding: usize,
    /// The whole payload arrived.
    received: bool,
    /// The backend stores this write's payload at once, as it arrives (its
    /// `try_write_now`); cleared the first time it does not.
    inline: bool,
    /// The first storage error.
    failed: Option<io::Error>,
    /// The core already has the failure (sent before the payload was whole).
    answered: bool,
}

impl StreamingWrite {
    /// Keeps the first storage error: the reply reports that one.
    fn keep_first_error(&mut self, result: io::Result<()>) {
        if let Err(error) = result
            && self.failed.is_none()
        {
            self.failed = Some(error);
        }
    }
}

/// What taking payload straight from the socket did
/// ([`Driver::payload_from_socket`]).
enum Direct {
    /// Moved payload from the socket into storage.
    Moved,
    /// The socket holds nothing yet: wait until it is readable.
    SocketEmpty,
    /// The client's input ended.
    End,
    /// Not for this input: read it the usual way.
    No,
}

/// A read's data waiting for its reply header.
enum ReadData {
    /// Copied into a buffer of ours.
    Owned(Vec<u8>),
    /// Lent by the backend (`Backend::read_shared`), never copied.
    Lent(Vec<ReadPiece>),
    /// In the page cache of the backend's file at `offset`
    /// (`Backend::page_cache_file`), sent from there.
    Cached { offset: u64, length: usize },
    /// In the page cache of the backend's file at `offset`, copied by the
    /// kernel into the socket from the file's mapping (`Backend::file_map`).
    Mapped {
        map: Arc<FileMap>,
        offset: u64,
        length: usize,
    },
}

impl ReadData {
    fn len(&self) -> usize {
        match self {
            Self::Owned(buffer) => buffer.len(),
            Self::Lent(pieces) => pieces.iter().map(ReadPiece::len).sum(),
            Self::Cached { length, .. } | Self::Mapped { length, .. } => *length,
        }
    }
}

/// One piece of a vectored write.
enum Segment {
    /// `out[range]`: reply headers the core encoded.
    Head(std::ops::Range<usize>),
    /// Read data.
    Data(ReadData),
    /// Zero bytes.
    Zeroes(u64),
}

struct Driver {
    /// Boxed: the task holding a driver stays small.
    conn: Box<StdConnection<ClientView>>,
    exports: Arc<ExportSet>,
    /// Held while writing to a `writers=exclusive` export.
    writer: Option<WriterClaim>,
    backend: Option<Arc<dyn Backend>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Jobs on the blocking pool.
    pending: usize,
    /// Read data waiting for its reply header.
    read_data: RequestMap<ReadData>,
    /// Bytes in `read_data`.
    read_data_bytes: usize,
    /// Bytes in `read_data` copied into buffers of ours (`ReadData::Owned`).
    copied_read_data_bytes: usize,
    writes: RequestMap<PendingWrite>,
    streams: RequestMap<StreamingWrite>,
    /// A payload just came straight into storage: the next read takes
    /// one request header, so a large write's payload after it stays in
    /// the socket to come the same way.
    header_only_read: bool,
    /// Reads waiting for budget, in arrival order; while any wait, no
    /// input is fed to the core.
    waiting_reads: VecDeque<(RequestId, u64, u64)>,
    budget: Budget,
    /// Completions refused as `Busy` (block-status buffer full), retried
    /// after the next transmit.
    retry: Vec<Done>,
    out: Vec<u8>,
    segments: Vec<Segment>,
    requests: u64,
    /// Input waits for budget (set by each pass).
    starved: bool,
    /// Transmission-phase silence after which the client is dropped.
    idle_timeout: Option<std::time::Duration>,
    closed: bool,
    /// The core handed over for TLS: the stream must be upgraded.
    start_tls: bool,
    /// Told when an export is selected (the handshake deadline stops).
    negotiated: Option<oneshot::Sender<()>>,
    /// `--metrics`: this connection's counters.
    metrics: Option<ConnectionMetrics>,
    poll_window: Option<PollWindow>,
    /// See [`Gathering`].
    gathering: Option<Gathering>,
    thread_share: Option<ThreadShare>,
    read_ring: Option<ReadRing>,
    /// The stream is a plain socket: file data may be sent to it from
    /// the page cache.
    sendfile: bool,
    /// The input being served came alone while the connection was idle:
    /// one request header at most, the client waiting for each reply
    /// (queue depth 1), rather than a batch of requests sent together.
    came_alone: bool,
    /// When the client last sent something (`--idle-timeout`).
    last_input: tokio::time::Instant,
    /// Bytes moved since the connection last gave its thread a turn
    /// (see [`TURN_BYTES`]).
    turn_bytes: usize,
    /// Passes in a row that ended with at most one request in flight
    /// (saturating): a client that keeps several in flight has its
    /// replies held while the socket holds more requests.
    one_in_flight_passes: u32,
    /// Since when replies ready to go have waited for input the socket
    /// held.
    holding_since: Option<std::time::Instant>,
    /// A write came since replies last went out (see
    /// [`may_hold_replies`](Self::may_hold_replies)).
    writes_since_sent: bool,
    /// A request other than a read or a write came since replies last
    /// went out.
    others_since_sent: bool,
    /// The time a write done on this thread took lately, in nanoseconds
    /// (see [`CHEAP_WRITE_NANOS`]); cheap until writes show otherwise.
    write_nanos: EighthAverage,
}

impl Driver {
    fn new(exports: Arc<ExportSet>, config: Config, budget: Budget, client: String) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            conn: Box::new(StdConnection::new(
                ClientView::new(Arc::clone(&exports), client),
                config,
            )),
            exports,
            writer: None,
            backend: None,
            done_tx,
            done_rx,
            pending: 0,
            read_data: RequestMap::new(),
            read_data_bytes: 0,
            copied_read_data_bytes: 0,
            writes: RequestMap::new(),
            streams: RequestMap::new(),
            header_only_read: false,
            waiting_reads: VecDeque::new(),
            budget,
            retry: Vec::new(),
            out: Vec::new(),
            segments: Vec::new(),
            requests: 0,
            starved: false,
            idle_timeout: None,
            closed: false,
            start_tls: false,
            negotiated: None,
            metrics: None,
            poll_window: None,
            gathering: None,
            thread_share: None,
            read_ring: None,
            sendfile: false,
            came_alone: false,
            last_input: tokio::time::Instant::now(),
            turn_bytes: 0,
            one_in_flight_passes: ONE_IN_FLIGHT_BEFORE_SENDING_AT_ONCE,
            holding_since: None,
            writes_since_sent: false,
            others_since_sent: false,
            write_nanos: EighthAverage::starting_at(0),
        }
    }

    /// Takes the core's greeting, already sent as `sent`.
    fn skip_greeting(&mut self, sent: &[u8]) -> io::Result<()> {
        let mut greeting = Vec::new();
        if let Some(transmit) = self.conn.poll_transmit() {
            for part in transmit.parts {
                greeting.extend_from_slice(part);
            }
        }
        if greeting == sent {
            Ok(())
        } else {
            Err(io::Error::other(
                "the protocol core's greeting differs from the one sent",
            ))
        }
    }

    /// Serves over `stream`, starting with `initial`, bytes the client
    /// already sent.
    async fn serve<S>(
        &mut self,
        stream: &mut S,
        mut shutdown: watch::Receiver<bool>,
        initial: &[u8],
    ) -> io::Result<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin + PlainSocket,
    {
        let mut input = vec![0u8; FIRST_INPUT_BYTES.max(initial.len())];
        input[..initial.len()].copy_from_slice(initial);
        // A previous pass (before STARTTLS) dropped its buffer.
        self.budget.release_input();
        self.sendfile = stream.plain_fd().is_some();
        let (mut start, mut end) = (0usize, initial.len());
        let mut eof = false;
        // Stop watching once told (or once the sender is gone), so a closed
        // channel cannot wake the loop forever.
        let mut watching = true;
        if *shutdown.borrow() {
            self.conn.shutdown();
            watching = false;
        }
        let server_budget = Arc::clone(self.budget.server());
        self.last_input = tokio::time::Instant::now();
        // When the connection went idle, if it polled for its next request.
        let mut idle_since = None;
        loop {
            if self.turn_bytes >= TURN_BYTES {
                self.turn_bytes = 0;
                tokio::task::yield_now().await;
            }
            while let Ok(done) = self.done_rx.try_recv() {
                self.pending -= 1;
                self.apply(done);
            }
            // Spares first: `others_starving` reads an atomic every
            // connection writes, not worth it on each pass without them.
            if self.budget.keeps_spares() && self.budget.others_starving() {
                self.budget.drop_spares();
            }
            self.start_waiting_reads();
            let fed = self.feedable(end - start);
            start += self.pump(&input[start..start + fed])?;
            if let Some(window) = &mut self.poll_window {
                window.in_flight(self.conn.in_flight());
            }
            self.one_in_flight_passes = if self.conn.in_flight() > 1 {
                0
            } else {
                self.one_in_flight_passes.saturating_add(1)
            };
            self.budget.unreserve();
            // Reads that arrived in this pass may fit now the reservation
            // is back; those that do not wait for bytes to be freed.
            self.start_waiting_reads();
            self.starved |= !self.waiting_reads.is_empty();
            if self.start_tls {
                self.start_tls = false;
                if start != end {
                    // The client may only start its handshake after the
                    // acknowledgement: these bytes came too early.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "client sent data between STARTTLS and its TLS handshake",
                    ));
                }
                return Ok(Ended::StartTls);
            }
            // Replies to a client that keeps several requests in flight
            // wait while its socket holds more requests: they then go out
            // together, and the client's next requests come together too.
            let mut socket_empty = false;
            if self.may_hold_replies()
                && start == end
                && !eof
                && !(watching && shutdown.has_changed().unwrap_or(true))
            {
                (start, end) = nbd_core::shape::make_room(&mut input, start, end);
                let read_end = self.read_end(end, input.len());
                match self.read_now(stream, &mut input[end..read_end], false, &mut idle_since) {
                    Some(read) => {
                        let n = read?;
                        eof |=
                            self.received(n, &mut input, (&mut start, &mut end), &mut idle_since);
                        self.holding_since
                            .get_or_insert_with(std::time::Instant::now);
                        tokio::task::consume_budget().await;
                        continue;
                    }
                    None => {
                        let held_for = self
                            .holding_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed();
                        if self.sends_before_waiting() {
                            self.send_replies(stream).await?;
                        }
                        if !self.closed && self.more_came_within_wait(stream, held_for)? {
                            continue;
                        }
                        socket_empty = true;
                    }
                }
            }
            let sent = self.send_replies(stream).await?;
            if self.closed {
                return stream.shutdown().await.map(|()| Ended::Done);
            }
            (start, end) = nbd_core::shape::make_room(&mut input, start, end);
            if sent > 0 && (start < end || self.conn.in_flight() == 0) {
                // Replies went out; input that waited on them may go on now.
                // While negotiating, a reply sent may also release an event
                // (the TLS hand-over after the STARTTLS acknowledgement),
                // which must be seen before the client's handshake is read.
                // Once the last reply in flight is out, the core may be due
                // to close (NBD_CMD_DISC with requests in flight): ask it
                // before waiting for input that will not come.
                continue;
            }
            if eof && self.pending == 0 && !self.starved {
                return Ok(Ended::Done);
            }
            let room = !eof && end < input.len();
            // Nothing in flight and no input: the client's turn.
            let idle = start == end && self.pending == 0 && self.conn.in_flight() == 0;
            self.came_alone = idle;
            // Input the socket already holds is read at once, without a
            // trip through the event loop; unless a shutdown is waiting to
            // be seen there.
            // Just found empty: the event loop waits for it (an idle
            // connection may still poll through its window).
            let mut read_again = idle || !socket_empty;
            // A large write's payload goes from the socket into storage
            // without the input buffer, where the backend can take it.
            let mut await_payload = false;
            if start == end && !eof && !(watching && shutdown.has_changed().unwrap_or(true)) {
                match self.payload_from_socket(stream)? {
                    Direct::Moved => {
                        tokio::task::consume_budget().await;
                        continue;
                    }
                    Direct::SocketEmpty => {
                        await_payload = true;
                        read_again = false;
                    }
                    Direct::End => {
                        eof |=
                            self.received(0, &mut input, (&mut start, &mut end), &mut idle_since);
                        continue;
                    }
                    Direct::No => {}
                }
            }
            let read_end = self.read_end(end, input.len());
            if room
                && read_again
                && !(watching && shutdown.has_changed().unwrap_or(true))
                && let Some(read) =
                    self.read_now(stream, &mut input[end..read_end], idle, &mut idle_since)
            {
                let n = read?;
                eof |= self.received(n, &mut input, (&mut start, &mut end), &mut idle_since);
                // Other connections on this thread get their turn.
                tokio::task::consume_budget().await;
                continue;
            }
            // Input is waiting but no budget: another connection must give
            // some back (our own completions wake the loop anyway).
            let starved = self.starved;
            // Only a client with nothing in flight is idle: a slow backend
            // or a client reading slowly is not silence.
            let idle_deadline = self
                .idle_timeout
                .filter(|_| self.backend.is_some() && idle)
                .map(|timeout| self.last_input + timeout);
            tokio::select! {
                done = self.done_rx.recv(), if self.pending > 0 => {
                    if let Some(done) = done {
                        self.pending -= 1;
                        self.apply(done);
                    }
                }
                read = async {
                    if await_payload {
                        // Left in the socket for `payload_from_socket`.
                        stream.wait_readable().await.map(|()| None)
                    } else {
                        stream.read(&mut input[end..read_end]).await.map(Some)
                    }
                }, if room || await_payload => {
                    if let Some(n) = read? {
                        eof |= self.received(n, &mut input, (&mut start, &mut end), &mut idle_since);
                    }
                },
                () = server_budget.freed(), if starved => {}
                () = tokio::time::sleep(SPARE_IDLE), if idle && self.budget.keeps_spares() => {
                    self.budget.drop_spares();
                }
                () = tokio::time::sleep_until(idle_deadline.unwrap_or(self.last_input)), if idle_deadline.is_some() => {
                    info!(
                        "client idle for {:?} (--idle-timeout): disconnecting",
                        self.idle_timeout.unwrap_or_default()
                    );
                    return stream.shutdown().await.map(|()| Ended::Done);
                }
                () = tokio::time::sleep(BUDGET_RECHECK), if starved => {}
                changed = shutdown.changed(), if watching => {
                    watching = false;
                    if changed.is_ok() && *shutdown.borrow() {
                        self.conn.shutdown();
                    }
                }
                else => return Err(io::Error::other("connection stalled: input buffer full and nothing in flight")),
            }
        }
    }

    /// Reads what the socket holds into `buf` without waiting: `None`
    /// when it holds nothing (or the stream is not read this way). An
    /// `idle` connection (nothing in flight, no input) first polls for
    /// its next request through its [`PollWindow`], noting in
    /// `idle_since` when it began.
    fn read_now<S: PlainSocket>(
        &self,
        stream: &S,
        buf: &mut [u8],
        idle: bool,
        idle_since: &mut Option<std::time::Instant>,
    ) -> Option<io::Result<usize>> {
        let fd = stream.plain_fd()?;
        // Whether the last read found the socket empty.
        let mut empty = false;
        let mut read = || {
            let result = rustix::net::recv(fd, &mut *buf, rustix::net::RecvFlags::DONTWAIT);
            empty = result == Err(rustix::io::Errno::AGAIN);
            match result {
                Ok((n, _)) => Some(Ok(n)),
                // Nothing yet (or interrupted): the event loop waits for it.
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => None,
                Err(error) => Some(Err(error.into())),
            }
        };
        let read = match self
            .poll_window
            .as_ref()
            .filter(|_| idle && self.alone_on_thread())
        {
            Some(window) => {
                *idle_since = Some(std::time::Instant::now());
                window.poll(&mut read)
            }
            None => read(),
        };
        if read.is_none() && empty {
            stream.found_empty();
        }
        read
    }

    /// Takes a read of `n` bytes into `input` at `end`; says whether it
    /// was the end of the client's input (`n` = 0: the core finishes what
    /// is in flight). Otherwise notes when input came and how long an idle
    /// connection waited for it, and grows a buffer the bytes filled
    /// (within the budget).
    fn received(
        &mut self,
        n: usize,
        input: &mut Vec<u8>,
        (start, end): (&mut usize, &mut usize),
        idle_since: &mut Option<std::time::Instant>,
    ) -> bool {
        if n == 0 {
            match self.conn.end_of_input() {
                Ok(()) => debug!("client closed its side"),
                Err(error) => debug!("client closed its side: {error}"),
            }
            return true;
        }
        self.last_input = tokio::time::Instant::now();
        self.turn_bytes += n;
        self.header_only_read = false;
        if let (Some(since), Some(window)) = (idle_since.take(), &mut self.poll_window) {
            window.waited(since.elapsed());
        }
        *end += n;
        // Several requests read at once (a client keeping more in
        // flight, sending them in batches) are not a client waiting for
        // each reply.
        self.came_alone &= *end - *start <= nbd_core::wire::EXTENDED_REQUEST_HEADER_LEN;
        let grown_len = (input.len() * 2).min(INPUT_BYTES);
        if *end == input.len()
            && grown_len > input.len()
            && self.budget.try_grow_input(grown_len - input.len())
        {
            // A fresh zeroed allocation, not `resize`: large ones are
            // mapped zero pages, resident only once written.
            let mut grown = vec![0u8; grown_len];
            grown[..*end - *start].copy_from_slice(&input[*start..*end]);
            (*start, *end) = (0, *end - *start);
            *input = grown;
        }
        false
    }

    /// How many of `available` input bytes may be fed to the core now.
    /// Writes to a blocking backend copy their payload into pieces, so the
    /// input fed is reserved from the budget first.
    fn feedable(&mut self, available: usize) -> usize {
        let fed = if available == 0 || !self.waiting_reads.is_empty() {
            0
        } else if !self.may_block() {
            available
        } else {
            let granted = self.budget.reserve(available, MIN_GRANT.min(available));
            if granted == 0 {
                // A piece waiting for payload that cannot come in would
                // hold its bytes forever (and every connection might):
                // store what it has.
                self.store_partial_pieces();
            }
            granted
        };
        self.starved = available > 0 && fed == 0;
        fed
    }

    /// Sends every partly gathered piece to storage as it is.
    fn store_partial_pieces(&mut self) {
        let partial: Vec<RequestId> = self
            .streams
            .iter()
            .filter(|(_, w)| !w.piece.is_empty())
            .map(|(id, _)| id)
            .collect();
        for id in partial {
            if let Some(mut write) = self.streams.remove(id) {
                self.store_piece(id, &mut write);
                self.streams.insert(id, write);
            }
        }
    }

    /// Stores the gathered piece of `write` at once when the backend can
    /// without blocking (a small buffered write): no trip to the pool and
    /// back. False, the piece kept, when it cannot.
    fn store_piece_now(&mut self, write: &mut StreamingWrite) -> bool {
        let Some(result) = self
            .backend
            .as_ref()
            .and_then(|backend| backend.try_write_now(&write.piece, write.piece_offset))
        else {
            return false;
        };
        write.piece_limit = 0;
        self.budget.release(std::mem::take(&mut write.piece).len());
        write.keep_first_error(result);
        true
    }

    /// Sends the gathered piece of `write` to storage: at once when the
    /// backend can, on the pool otherwise.
    fn store_piece(&mut self, id: RequestId, write: &mut StreamingWrite) {
        if !self.store_piece_now(write) {
            self.piece_to_pool(id, write);
        }
    }

    /// Sends the gathered piece of `write` to the pool.
    fn piece_to_pool(&mut self, id: RequestId, write: &mut StreamingWrite) {
        write.piece_limit = 0;
        let Some(backend) = self.backend.clone() else {
            return;
        };
        let data = std::mem::take(&mut write.piece);
        write.outstanding += 1;
        self.send_to_storage(
            backend,
            Job::Write {
                id,
                offset: write.piece_offset,
                data,
                fua: false,
            },
        );
    }

    /// Feeds input to the core and handles every event; returns the bytes consumed.
    fn pump(&mut self, input: &[u8]) -> io::Result<usize> {
        let mut consumed = 0;
        loop {
            let step = self.conn.process(&input[consumed..]).map_err(|error| {
                warn!("protocol error: {error}");
                io::Error::new(io::ErrorKind::InvalidData, error)
            })?;
            consumed += step.consumed;
            let Some(event) = step.event else {
                return Ok(consumed);
            };
            match event {
                Event::ExportSelected {
                    index,
                    size,
                    flags,
                    features,
                } => {
                    let served = self
                        .exports
                        .get(index)
                        .ok_or_else(|| io::Error::other("export vanished"))?;
                    info!(
                        "export `{}` selected: {size} bytes, flags {flags:?}, structured replies {}, extended headers {}",
                        served.name, features.structured_replies, features.extended_headers
                    );
                    let writable = !flags.contains(nbd_core::wire::TransmissionFlags::READ_ONLY);
                    if served.writers == WriterPolicy::Exclusive && writable {
                        let client = self.conn.catalog().client().to_owned();
                        if !self.exports.claim_writer(index, &client) {
                            // Another client claimed it since this one was
                            // told the export is writable.
                            warn!(
                                "export `{}` is exclusive and another client now writes to it: closing",
                                served.name
                            );
                            return Err(io::Error::other(
                                "exclusive export taken by another client",
                            ));
                        }
                        info!(
                            "export `{}`: writer {client} (writers=exclusive)",
                            served.name
                        );
                        self.writer = Some(WriterClaim {
                            exports: Arc::clone(&self.exports),
                            index,
                            client,
                        });
                    }
                    self.backend = Some(Arc::clone(&served.backend));
                    if let Some(metrics) = &mut self.metrics {
                        metrics.selected(index);
                    }
                    if let Some(negotiated) = self.negotiated.take() {
                        // The deadline task is gone only if it dropped us.
                        let _ = negotiated.send(());
                    }
                }
                Event::Request(request) => {
                    self.requests += 1;
                    if let Some(gathering) = &mut self.gathering {
                        let payload = match request {
                            Request::Write { length, .. } => length,
                            _ => 0,
                        };
                        let header =
                            nbd_core::wire::RequestHeader::encoded_len(self.conn.header_style());
                        gathering.took(
                            header.saturating_add(usize::try_from(payload).unwrap_or(usize::MAX)),
                            self.conn.in_flight(),
                        );
                    }
                    if let Some(metrics) = &mut self.metrics {
                        metrics.request(&request);
                    }
                    self.request(request);
                    if self.copied_read_data_bytes >= COPIED_READ_DATA_BEFORE_SENDING
                        && self.conn.wants_transmit()
                    {
                        // Sent while the copies are still in the cache;
                        // the rest of the input waits for the next pass.
                        return Ok(consumed);
                    }
                }
                Event::WriteData {
                    id,
                    offset,
                    data,
                    remaining,
                } => self.write_data(id, offset, data, remaining),
                Event::Closed(reason) => {
                    if reason == CloseReason::Shutdown {
                        info!("closing for server shutdown");
                    }
                    self.closed = true;
                    return Ok(consumed);
                }
                Event::StartTls => {
                    self.start_tls = true;
                    return Ok(consumed);
                }
                _ => {}
            }
        }
    }

    fn request(&mut self, request: Request) {
        debug!("request {request:?}");
        match request {
            Request::Read { .. } => {}
            Request::Write { .. } => self.writes_since_sent = true,
            _ => self.others_since_sent = true,
        }
        let job = match request {
            Request::Read { id, offset, length } => {
                self.waiting_reads.push_back((id, offset, length));
                self.start_waiting_reads();
                return;
            }
            Request::Write {
                id,
                offset,
                length,
                fua,
            } => {
                if self.may_block() {
                    self.streams.insert(
                        id,
                        StreamingWrite {
                            offset,
                            length,
                            fua,
                            piece: Vec::new(),
                            piece_offset: offset,
                            piece_limit: 0,
                            outstanding: 0,
                            received: false,
                            inline: true,
                            failed: None,
                            answered: false,
                        },
                    );
                } else if fua {
                    self.writes.insert(id, PendingWrite { offset });
                }
                return;
            }
            Request::Flush { id } => Job::Flush { id },
            Request::Trim {
                id,
                offset,
                length,
                fua,
            } => Job::Trim {
                id,
                offset,
                length,
                fua,
            },
            Request::WriteZeroes {
                id,
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => Job::Zero {
                id,
                offset,
                length,
                fua,
                flags: ZeroFlags { no_hole, fast },
            },
            Request::Cache { id, offset, length } => Job::Cache { id, offset, length },
            Request::BlockStatus {
                id, offset, length, ..
            } => Job::BlockStatus {
                id,
                offset,
                length,
                extents: Vec::new(),
            },
            Request::Resize { id, size } => Job::Resize { id, size },
            _ => return,
        };
        self.dispatch(job);
    }

    /// Starts the reads that wait for budget, in order, as far as the
    /// budget allows.
    fn start_waiting_reads(&mut self) {
        while let Some(&(id, offset, length)) = self.waiting_reads.front() {
            // Lengths are capped by the core (at most 4 GiB).
            let bytes = usize::try_from(length).unwrap_or(usize::MAX);
            // A spare buffer of the size already holds its bytes.
            let spare = self.budget.take_spare_read_buffer(bytes);
            if spare.is_none() && !self.budget.try_hold(bytes) {
                return;
            }
            self.waiting_reads.pop_front();
            self.start_read(id, offset, length, spare);
        }
    }

    /// Whether the replies ready to go may wait while the socket is read
    /// for more requests (see [`LONGEST_HOLD`]). Not for a
    /// client that waits for each reply: the wait would be all its
    /// latency. For storage that may block (files), only while the
    /// client sends reads, and writes this thread stored cheaply (see
    /// [`CHEAP_WRITE_NANOS`]): 4 KiB random reads at QD32 from a file's
    /// page cache took a median of 7 % less server CPU with replies held,
    /// and writes into tmpfs 3.3 to 3.7 µs of it against 6.3 to 6.7;
    /// writes that cost ext4 tens of µs each lost up to 30 % of their
    /// rate held (why was not found). A flush or a trim goes to the pool,
    /// whose outcome a thread waiting on the socket would not see.
    fn may_hold_replies(&self) -> bool {
        self.conn.wants_transmit()
            && (!self.may_block()
                || (!self.others_since_sent
                    && (!self.writes_since_sent || self.write_nanos.value() < CHEAP_WRITE_NANOS)))
            && self.one_in_flight_passes < ONE_IN_FLIGHT_BEFORE_SENDING_AT_ONCE
            && self
                .holding_since
                .is_none_or(|since| since.elapsed() < LONGEST_HOLD)
            && self.read_data_bytes < MOST_READ_DATA_HELD
    }

    /// Sends the replies ready, held or not, and notes it; returns how
    /// many went.
    async fn send_replies<S: AsyncWrite + Unpin + PlainSocket>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<usize> {
        self.holding_since = None;
        let sent = self.transmit(stream).await?;
        if sent > 0 {
            self.writes_since_sent = false;
            self.others_since_sent = false;
            if let Some(gathering) = &mut self.gathering {
                gathering.replied(sent, std::time::Instant::now(), thread_cpu_time);
            }
        }
        Ok(sent)
    }

    /// Whether the replies held go out before the wait for the client's
    /// next requests rather than after it: those that carry no data (of
    /// writes, say). Held through the wait, they left the client with
    /// nothing to do: at queue depth 32, 4 KiB writes into a memory
    /// export came 10 % slower with waits than without, and waiting
    /// (for 1.2 µs less server CPU each) was not chosen. Sent first, the
    /// client works through them while the server sleeps: as quick as
    /// without waits, for 0.75 of the server CPU. Replies carrying read
    /// data are better held: sent together they cost the client less
    /// (4 KiB reads at queue depth 32 came 3 % slower sent first).
    fn sends_before_waiting(&self) -> bool {
        self.read_data_bytes == 0 && self.gathering.as_ref().is_some_and(Gathering::waits)
    }

    /// Whether the client's next requests came while the replies held
    /// for `held_for` waited for them, the socket holding none (see
    /// [`Gathering`]).
    fn more_came_within_wait<S: PlainSocket>(
        &mut self,
        stream: &S,
        held_for: std::time::Duration,
    ) -> io::Result<bool> {
        let in_flight = self.conn.in_flight();
        let alone = self.alone_on_thread();
        let (Some(gathering), Some(fd)) = (self.gathering.as_mut(), stream.plain_fd()) else {
            return Ok(false);
        };
        let Some(wait) = gathering.wait(in_flight, held_for).filter(|_| alone) else {
            return Ok(false);
        };
        let arrival = socket::readable_within(fd, wait.within, wait.at_least)?;
        gathering.waited(arrival, in_flight);
        Ok(arrival != socket::Arrival::Nothing)
    }

    /// Keeps a read's data until its reply header is sent.
    fn keep_read_data(&mut self, id: RequestId, data: ReadData) {
        self.read_data_bytes += data.len();
        if let ReadData::Owned(buffer) = &data {
            self.copied_read_data_bytes += buffer.len();
        }
        self.read_data.insert(id, data);
    }

    /// A read whose `length` bytes are held in the budget (by `spare`, a
    /// buffer of that size, when given).
    fn start_read(&mut self, id: RequestId, offset: u64, length: u64, spare: Option<Vec<u8>>) {
        if let Some(uncopied) = self.read_uncopied(offset, length) {
            let outcome = match uncopied {
                Ok(data) => {
                    self.keep_read_data(id, data);
                    ReadOutcome::Data
                }
                Err(error) => {
                    error!("storage error: {error}");
                    self.budget.release(length as usize);
                    ReadOutcome::Error(error_code(&error))
                }
            };
            if let Some(metrics) = &mut self.metrics {
                let error = match outcome {
                    ReadOutcome::Error(code) => Some(code),
                    _ => None,
                };
                metrics.answered(id, error);
            }
            if let Err(error) = self.conn.complete_read(id, outcome) {
                error!("completion refused by the protocol core: {error}");
            }
            return;
        }
        // Not pooled: the budget, not a pool, bounds read buffers. Not
        // zeroed either: the backend reads into the room (or zeroes it
        // first where it cannot).
        let length = length as usize;
        let buffer = spare.unwrap_or_else(|| Vec::with_capacity(length));
        self.dispatch(Job::Read {
            id,
            offset,
            length,
            buffer,
        });
    }

    /// A piece of a write's payload: stored at once by fast backends,
    /// gathered into pieces for the pool otherwise.
    fn write_data(&mut self, id: RequestId, offset: u64, data: &[u8], remaining: u64) {
        if self.may_block() {
            if remaining == 0
                && self
                    .streams
                    .get(id)
                    .is_some_and(|write| write.length >= DIRECT_PAYLOAD_BYTES)
            {
                self.large_payload_ended();
            }
            self.stream_write_data(id, offset, data, remaining);
            return;
        }
        let Some(backend) = self.backend.clone() else {
            return;
        };
        if let Err(error) = backend.write_at(data, offset) {
            self.write_failed(id, error);
            return;
        }
        if remaining == 0 {
            self.payload_stored(&*backend, id, offset + data.len() as u64);
        }
    }

    /// Answers a write to a fast backend that storage refused; the core
    /// drops the rest of its payload from now on.
    fn write_failed(&mut self, id: RequestId, error: io::Error) {
        self.writes.remove(id);
        self.apply(Done::Other {
            id,
            result: Err(error),
        });
    }

    /// Answers a write to a fast backend whose payload, ending at `end`,
    /// is all stored: made durable first if it asked (FUA).
    fn payload_stored(&mut self, backend: &dyn Backend, id: RequestId, end: u64) {
        let result = match self.writes.remove(id) {
            Some(write) => backend.flush_range(write.offset, end - write.offset),
            None => Ok(()),
        };
        self.apply(Done::Other { id, result });
    }

    /// Stores write payload straight from the input buffer when the
    /// backend can without blocking; otherwise gathers it into pieces of
    /// at most [`WRITE_PIECE`] bytes and sends each full piece to storage.
    fn stream_write_data(&mut self, id: RequestId, offset: u64, data: &[u8], remaining: u64) {
        let Some(mut write) = self.streams.remove(id) else {
            return;
        };
        let (mut data, mut offset) = (data, offset);
        while !data.is_empty() {
            if write.inline && write.piece.is_empty() {
                let stored = self.store_whole_units_now(&mut write, data, offset, remaining);
                data = &data[stored..];
                offset += stored as u64;
                if data.is_empty() {
                    break;
                }
            }
            if write.piece_limit == 0 {
                let left = data.len() as u64 + remaining;
                // Stored at once, a piece only completes a partial unit;
                // otherwise it gathers up to WRITE_PIECE for the pool.
                let limit = if write.inline {
                    left.min(WRITE_UNIT - offset % WRITE_UNIT)
                } else {
                    left.min(WRITE_PIECE as u64)
                };
                write.piece_limit = usize::try_from(limit).unwrap_or(WRITE_PIECE);
                // Capacity is address space; only the bytes copied in
                // become resident, and those are what the budget counts.
                write.piece = Vec::with_capacity(write.piece_limit);
                write.piece_offset = offset;
            }
            let n = data.len().min(write.piece_limit - write.piece.len());
            write.piece.extend_from_slice(&data[..n]);
            self.budget.draw(n);
            data = &data[n..];
            offset += n as u64;
            if write.piece.len() == write.piece_limit {
                if self.store_piece_now(&mut write) {
                    continue;
                }
                // The backend cannot store at once: the rest of the
                // payload goes to the pool in pieces.
                let left = data.len() as u64 + remaining;
                if write.inline && left > 0 {
                    // A partial unit (an object store without the object
                    // cached) goes on gathering with that rest rather
                    // than go there alone (a partial object, fetched
                    // first: with the store down, a write of a whole
                    // object failed).
                    write.inline = false;
                    let more = left.min((WRITE_PIECE - write.piece.len()) as u64);
                    write.piece_limit += usize::try_from(more).unwrap_or(0);
                    continue;
                }
                write.inline = false;
                self.piece_to_pool(id, &mut write);
            }
        }
        if remaining == 0 {
            write.received = true;
        }
        self.settle_write(id, write);
    }

    /// Takes payload of the write being received from the socket straight
    /// into storage, when the input buffer is empty: into the backend's
    /// own memory (`Backend::receive_at`: a memory export's pages, a file
    /// in memory's page cache) while [`DIRECT_PAYLOAD_BYTES`] or more are
    /// still to come. Payload for other backends is read into the input
    /// buffer and stored from there: moved into a file through a pipe
    /// (`splice`, one copy instead of two) it cost a client on the same
    /// machine a third more CPU a MiB, for 7 % less of the server's
    /// (docs/BENCHMARKS.md).
    fn payload_from_socket<S: PlainSocket>(&mut self, stream: &S) -> io::Result<Direct> {
        let (Some(_), Some(wanted)) = (stream.plain_fd(), self.conn.payload_wanted()) else {
            return Ok(Direct::No);
        };
        // Payload read into the input buffer ended inside a unit: the
        // rest of that unit comes from the socket here, and the write's
        // piece stores it as usual; the payload after it then comes
        // straight into storage. Without this, the rest of a 1 MiB write
        // into a file in `/dev/shm` came through the input buffer: at QD8
        // pinned 2,944 to 3,876 MiB/s at 256 to 329 µs a MiB, with it
        // 5,544 to 7,185 at 129 to 151 (nbdkit 1,706 to 4,289).
        if let Some(need) = self
            .streams
            .get(wanted.id)
            .filter(|write| {
                !write.piece.is_empty()
                    && write.inline
                    && write.outstanding == 0
                    && write.failed.is_none()
            })
            .map(|write| write.piece_limit - write.piece.len())
            .filter(|&need| {
                wanted.remaining >= DIRECT_PAYLOAD_BYTES + need as u64
                    && self.backend.as_ref().is_some_and(|b| b.receives_payloads())
            })
        {
            return self.complete_piece_from(stream, wanted, need);
        }
        // A write to a file whose pieces are already under way (a partial
        // unit to complete, pieces on the pool, a failure) goes on the
        // way it started.
        let started_otherwise = self.streams.get(wanted.id).is_some_and(|write| {
            !write.piece.is_empty() || write.outstanding > 0 || write.failed.is_some()
        });
        if wanted.remaining < DIRECT_PAYLOAD_BYTES || started_otherwise {
            return Ok(Direct::No);
        }
        let Some(backend) = self.backend.clone() else {
            return Ok(Direct::No);
        };
        let want = usize::try_from(wanted.remaining)
            .unwrap_or(usize::MAX)
            .min(MOST_READ_AT_ONCE);
        // What the socket said when it gave less than asked.
        let mut ended = None;
        // A write to a file goes on through its stream (`streams`), which
        // takes the received bytes of a unit left incomplete (see below).
        let streamed = self.streams.get(wanted.id).is_some();
        let mut partial_unit = Vec::new();
        let mut receive = |place: &mut [u8]| {
            let mut filled = 0;
            while filled < place.len() && ended.is_none() {
                match self.read_now(stream, &mut place[filled..], false, &mut None) {
                    // Nothing yet (or interrupted): wait for the socket.
                    None => ended = Some(Ok(Direct::SocketEmpty)),
                    Some(Ok(0)) => ended = Some(Ok(Direct::End)),
                    Some(Ok(n)) => filled += n,
                    // A page the storage cannot back: the payload comes
                    // the usual way, and storing it reports why.
                    Some(Err(error)) if error.raw_os_error() == Some(libc::EFAULT) => {
                        ended = Some(Ok(Direct::No));
                    }
                    Some(Err(error)) => ended = Some(Err(error)),
                }
            }
            if streamed {
                let end = wanted.offset + filled as u64;
                let unit_start = (end - end % WRITE_UNIT).max(wanted.offset);
                partial_unit
                    .extend_from_slice(&place[(unit_start - wanted.offset) as usize..filled]);
            }
            filled
        };
        let stored = match backend.receive_at(wanted.offset, want, &mut receive) {
            None => return Ok(Direct::No),
            Some(Ok(stored)) => stored,
            Some(Err(error)) => {
                // Its payload stays in the socket, for the core to drop.
                match self.streams.remove(wanted.id) {
                    Some(mut write) => {
                        write.keep_first_error(Err(error));
                        self.settle_write(wanted.id, write);
                    }
                    None => self.write_failed(wanted.id, error),
                }
                return Ok(Direct::No);
            }
        };
        if stored == 0 {
            // Nothing was asked for if nothing ended it (cannot be: enough
            // payload remains).
            return ended.unwrap_or(Ok(Direct::No));
        }
        self.took_payload(stored)?;
        let end = wanted.offset + stored as u64;
        let remaining = wanted.remaining - stored as u64;
        if streamed {
            // A unit never holds halves of two overlapping writes (see
            // `store_whole_units_now`): the part of one received goes
            // through the write's stream again, as a piece that the rest
            // of the unit completes and that is stored whole.
            let again: &[u8] = if remaining == 0 { &[] } else { &partial_unit };
            self.stream_write_data(wanted.id, end - again.len() as u64, again, remaining);
        } else if remaining == 0 {
            self.payload_stored(&*backend, wanted.id, end);
        }
        if remaining == 0 {
            self.large_payload_ended();
        }
        Ok(Direct::Moved)
    }

    /// Reads up to `need` (less than a unit) payload bytes of `wanted`
    /// from the socket into the write's partial unit.
    fn complete_piece_from<S: PlainSocket>(
        &mut self,
        stream: &S,
        wanted: nbd_core::server::PayloadWanted,
        need: usize,
    ) -> io::Result<Direct> {
        let mut bytes = [0u8; WRITE_UNIT as usize];
        let Some(bytes) = bytes.get_mut(..need) else {
            return Err(io::Error::other("a write's partial unit is over a unit"));
        };
        let n = match self.read_now(stream, bytes, false, &mut None) {
            // Nothing yet (or interrupted): wait for the socket.
            None => return Ok(Direct::SocketEmpty),
            Some(read) => read?,
        };
        if n == 0 {
            return Ok(Direct::End);
        }
        self.took_payload(n)?;
        self.stream_write_data(
            wanted.id,
            wanted.offset,
            &bytes[..n],
            wanted.remaining - n as u64,
        );
        Ok(Direct::Moved)
    }

    /// Tells the core that `n` payload bytes came straight from the
    /// socket, and notes them as input.
    fn took_payload(&mut self, n: usize) -> io::Result<()> {
        self.conn
            .payload_taken(n as u64)
            .map_err(io::Error::other)?;
        self.turn_bytes += n;
        self.last_input = tokio::time::Instant::now();
        Ok(())
    }

    /// A large write's payload came whole. The next request may be
    /// another large write: its header alone is read, and its payload
    /// left in the socket for `payload_from_socket`.
    fn large_payload_ended(&mut self) {
        self.header_only_read = true;
    }

    /// Where a read into the input buffer (`len` bytes, filled to `end`)
    /// stops: after one request header when a large payload just came
    /// whole (`header_only_read`), else [`MOST_READ_AT_ONCE`] on or at
    /// its end.
    fn read_end(&self, end: usize, len: usize) -> usize {
        if self.header_only_read {
            let header = nbd_core::wire::RequestHeader::encoded_len(self.conn.header_style());
            (end + header).min(len)
        } else {
            (end + MOST_READ_AT_ONCE).min(len)
        }
    }

    /// Stores the whole units at the start of `data` (all of it when it is
    /// the payload's end) straight from the input buffer, when the backend
    /// can without blocking: one copy (input buffer to storage) instead of
    /// two, and no trip to the pool. Payload arrives split wherever the
    /// socket split it, so a partial unit is left for a piece to
    /// complete: a unit never holds halves of two overlapping writes.
    /// Returns the bytes stored.
    fn store_whole_units_now(
        &mut self,
        write: &mut StreamingWrite,
        data: &[u8],
        offset: u64,
        remaining: u64,
    ) -> usize {
        let Some(backend) = &self.backend else {
            return 0;
        };
        let end = offset + data.len() as u64;
        let whole_end = if remaining == 0 {
            end
        } else {
            end - end % WRITE_UNIT
        };
        let Ok(n) = usize::try_from(whole_end.saturating_sub(offset)) else {
            return 0;
        };
        if n == 0 {
            return 0;
        }
        let started = std::time::Instant::now();
        let stored = backend.try_write_now(&data[..n], offset);
        let took = started.elapsed();
        match stored {
            Some(result) => {
                self.wrote_in(took);
                write.keep_first_error(result);
                n
            }
            None => {
                // It would wait for the device: dear.
                self.wrote_in(std::time::Duration::from_nanos(4 * CHEAP_WRITE_NANOS));
                write.inline = false;
                0
            }
        }
    }

    /// Answers a streamed write once everything about it is known, or puts
    /// it back to wait for more payload or pieces.
    fn settle_write(&mut self, id: RequestId, mut write: StreamingWrite) {
        if write.failed.is_some() && !write.answered && !write.received {
            // Answer now: the core reads and drops the rest of the payload.
            write.answered = true;
            let error = write
                .failed
                .as_ref()
                .map_or(nbd_core::wire::ErrorCode::Io, error_code);
            if let Some(metrics) = &mut self.metrics {
                metrics.answered(id, Some(error));
            }
            if let Err(error) = self.conn.complete(id, Err(error)) {
                error!("completion refused by the protocol core: {error}");
            }
        }
        if write.outstanding > 0 || !(write.received || write.answered) {
            self.streams.insert(id, write);
            return;
        }
        self.budget.release(std::mem::take(&mut write.piece).len());
        if write.answered {
            return;
        }
        match write.failed {
            Some(error) => self.apply(Done::Other {
                id,
                result: Err(error),
            }),
            None if write.fua => self.dispatch(Job::Durable {
                id,
                offset: write.offset,
                length: write.length,
            }),
            None => self.apply(Done::Other { id, result: Ok(()) }),
        }
    }

    /// Read data the server need not copy: lent by the backend, or in its
    /// file's page cache, to be sent from there.
    fn read_uncopied(&self, offset: u64, length: u64) -> Option<io::Result<ReadData>> {
        if let Some(lent) = self.read_lent(offset, length) {
            return Some(lent.map(ReadData::Lent));
        }
        let backend = self.backend.as_ref()?;
        // Only from the kernel's copy: a plain socket, not TLS (see
        // `FileMap`). Alone on its thread too: `cachestat` counts pages
        // still being read from the disk, and both the copy and `sendfile`
        // wait for them, which other connections on the thread would feel.
        if !(self.sendfile
            && length >= SENDFILE_BYTES
            && self.alone_on_thread()
            && backend.page_cache_file().is_some()
            && backend.in_page_cache(offset, length))
        {
            return None;
        }
        let length = length as usize;
        // `sendfile` only for a client waiting for each reply: with others
        // in flight, on loopback, it lost throughput (1 MiB QD8 reads 2.1k
        // against 3.0k MiB/s copied).
        if self.came_alone && self.nothing_else_in_flight() {
            return Some(Ok(ReadData::Cached { offset, length }));
        }
        let map = backend.file_map(offset + length as u64)?;
        Some(Ok(ReadData::Mapped {
            map,
            offset,
            length,
        }))
    }

    /// Read data lent by a non-blocking backend, when it can lend it. Pieces
    /// that do not cover the range exactly are an error, never padded.
    fn read_lent(&self, offset: u64, length: u64) -> Option<io::Result<Vec<ReadPiece>>> {
        let backend = self.backend.as_ref().filter(|b| !b.may_block())?;
        let mut pieces = Vec::new();
        backend
            .read_shared(offset, length, &mut pieces)
            .map(|result| {
                result.and_then(|()| {
                    let lent: u64 = pieces.iter().map(|p| p.len() as u64).sum();
                    if lent == length {
                        Ok(pieces)
                    } else {
                        Err(io::Error::other(format!(
                            "backend lent {lent} bytes for a read of {length}"
                        )))
                    }
                })
            })
    }

    fn may_block(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.may_block())
    }

    /// Carries `job` out: inline when the backend cannot block, or can do
    /// this job without blocking; elsewhere otherwise.
    fn dispatch(&mut self, job: Job) {
        let Some(backend) = self.backend.clone() else {
            return;
        };
        if !backend.may_block() {
            self.apply(job.run(&*backend));
            return;
        }
        let holds_the_thread = self.holds_the_thread_for(&job, &*backend);
        let job = if holds_the_thread && matches!(job, Job::Read { .. }) {
            // Read as the pool would, into the buffer's room (no zeroing
            // for `RWF_NOWAIT`), waiting for the disk if it must.
            Ok(job.run(&*backend))
        } else if Self::large_read(&job) && !self.nothing_else_in_flight() && several_cpus() {
            // Untried, to the pool: its copy overlaps this thread's work
            // on another CPU. Also when it misses the page cache: through
            // the ring the kernel copies on this thread, and 1 MiB cold
            // reads at QD8 fell from 2.25k to 1.86k MiB/s.
            self.send_to_storage(backend, job);
            return;
        } else {
            // A trip to the pool (or another task) and back costs two
            // thread wake-ups, more than a page-cache copy of a small
            // request. A large read is copied here only when nothing
            // else is in flight, or when the process has one CPU: then
            // the pool has nothing to overlap it with, and its data would
            // cross to another CPU's cache before being sent (pinned to
            // one CPU, 1 MiB QD8 reads went from 2.49k to 2.63k MiB/s).
            // Tried first also for what the thread holds on to: a flush
            // on tmpfs needs no device.
            job.run_now(&*backend)
        };
        match job {
            Ok(done) => self.apply(done),
            Err(job) if holds_the_thread => {
                self.waited_on_storage();
                self.apply(job.run(&*backend));
            }
            Err(job) => self.wait_for_storage(backend, job),
        }
    }

    /// Notes how long a write took on this thread.
    fn wrote_in(&mut self, took: std::time::Duration) {
        self.write_nanos.note(nanos(took));
    }

    /// Runs `job`, which was tried here and would have waited for a
    /// device: a read through the thread's ring when it has one (no pool
    /// thread sleeps for it), anything else on the pool.
    fn wait_for_storage(&mut self, backend: Arc<dyn Backend>, job: Job) {
        let job = match &self.read_ring {
            Some(ring) => match ring.read(Arc::clone(&backend), job, &self.done_tx) {
                Ok(()) => {
                    self.handed_over();
                    return;
                }
                Err(job) => job,
            },
            None => job,
        };
        self.send_to_storage(backend, job);
    }

    /// A job went elsewhere; its outcome will come through `done_rx`.
    fn handed_over(&mut self) {
        self.pending += 1;
        self.waited_on_storage();
    }

    /// Polling stops for a client whose request waited on storage: on the
    /// pool, or a `fdatasync` on this thread (polling between durable
    /// writes competed with the filesystem's own threads for the CPUs:
    /// 4.2k write+FLUSH pairs a second against 5.3k without).
    fn waited_on_storage(&mut self) {
        if let Some(window) = &mut self.poll_window {
            window.waited_on_storage();
        }
    }

    fn large_read(job: &Job) -> bool {
        matches!(job, Job::Read { length, .. } if *length > INLINE_BYTES)
    }

    /// Whether the request being started is the client's only one.
    fn nothing_else_in_flight(&self) -> bool {
        self.pending == 0 && self.conn.in_flight() <= 1
    }

    fn alone_on_thread(&self) -> bool {
        self.thread_share.as_ref().is_some_and(ThreadShare::alone)
    }

    /// Whether `job` is done on this thread even if it waits for a disk
    /// (a read, or making writes durable): when the client waits for it
    /// alone and no other connection shares the thread, nobody else
    /// would wait, and the pool's two wake-ups are saved (pinned to one
    /// CPU, FUA writes to a disk file went from 3.2k to 3.4k a second).
    /// Never for network storage, whose calls wait on round trips.
    fn holds_the_thread_for(&self, job: &Job, backend: &dyn Backend) -> bool {
        matches!(
            job,
            Job::Read { .. } | Job::Durable { .. } | Job::Flush { .. }
        ) && self.nothing_else_in_flight()
            && self.alone_on_thread()
            && backend.async_form().is_none()
    }

    /// Runs `job` off the connection's thread: as a task for storage with
    /// an asynchronous form, on the blocking pool otherwise. Its outcome
    /// comes back through `done_rx`.
    fn send_to_storage(&mut self, backend: Arc<dyn Backend>, job: Job) {
        let done_tx = self.done_tx.clone();
        self.handed_over();
        if let Some(storage) = backend.async_form() {
            // Network storage: a task per request, no pool thread held
            // while it waits on round trips.
            let work = job.run_async(storage);
            tokio::spawn(async move {
                let _ = done_tx.send(work.await);
            });
        } else {
            tokio::task::spawn_blocking(move || {
                // The receiver is gone only when the connection ended.
                let _ = done_tx.send(job.run(&*backend));
            });
        }
    }

    /// Hands a finished job's outcome to the core.
    fn apply(&mut self, done: Done) {
        if let Err(error) = done.result() {
            error!("storage error: {error}");
        }
        if let Some(metrics) = &mut self.metrics {
            metrics.answered(done.id(), done.result().as_ref().err().map(error_code));
        }
        let code = |result: io::Result<()>| result.map_err(|e| error_code(&e));
        let outcome = match done {
            Done::Read {
                id,
                length,
                buffer,
                result,
            } => match result {
                Ok(()) => {
                    self.keep_read_data(id, ReadData::Owned(buffer));
                    self.conn.complete_read(id, ReadOutcome::Data)
                }
                Err(error) => {
                    self.budget.release(length);
                    self.conn
                        .complete_read(id, ReadOutcome::Error(error_code(&error)))
                }
            },
            Done::Write { id, data, result } => {
                self.budget.release(data.len());
                if let Some(mut write) = self.streams.remove(id) {
                    write.outstanding -= 1;
                    write.keep_first_error(result);
                    self.settle_write(id, write);
                }
                Ok(())
            }
            Done::Other { id, result } => self.conn.complete(id, code(result)),
            Done::BlockStatus {
                id,
                extents,
                result: Ok(()),
            } => match self.conn.complete_block_status(id, &extents) {
                Err(nbd_core::server::CompletionError::Busy) => {
                    self.retry.push(Done::BlockStatus {
                        id,
                        extents,
                        result: Ok(()),
                    });
                    Ok(())
                }
                other => other,
            },
            Done::BlockStatus { id, result, .. } => self.conn.complete(id, code(result)),
        };
        if let Err(error) = outcome {
            error!("completion refused by the protocol core: {error}");
        }
    }

    /// Sends every reply ready in one vectored write; returns the replies sent.
    async fn transmit<S: AsyncWrite + Unpin + PlainSocket>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<usize> {
        self.out.clear();
        let mut messages = 0;
        while let Some(transmit) = self.conn.poll_transmit() {
            messages += 1;
            let start = self.out.len();
            for part in transmit.parts {
                self.out.extend_from_slice(part);
            }
            match self.segments.last_mut() {
                Some(Segment::Head(range)) if range.end == start => range.end = self.out.len(),
                _ => self.segments.push(Segment::Head(start..self.out.len())),
            }
            match transmit.payload {
                Some(Payload::Data { id, length, .. }) => {
                    // The header is encoded: without the data the only
                    // honest answer is to end the connection.
                    let data = self.read_data.remove(id);
                    if let Some(data) = &data {
                        self.read_data_bytes -= data.len();
                        if let ReadData::Owned(buffer) = data {
                            self.copied_read_data_bytes -= buffer.len();
                        }
                    }
                    let data = data.filter(|data| data.len() as u64 == length);
                    let Some(data) = data else {
                        error!(
                            "read data for request {} missing or short: closing the connection",
                            id.to_bits()
                        );
                        return Err(io::Error::other(
                            "read data missing: connection closed rather than send data the server does not have",
                        ));
                    };
                    self.segments.push(Segment::Data(data));
                }
                Some(Payload::Zeroes { length }) => self.segments.push(Segment::Zeroes(length)),
                _ => {}
            }
        }
        if messages > 0 {
            self.write_segments(stream).await?;
        }
        for done in std::mem::take(&mut self.retry) {
            self.apply(done);
        }
        Ok(messages)
    }

    async fn write_segments<S: AsyncWrite + Unpin + PlainSocket>(
        &mut self,
        stream: &mut S,
    ) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.segments.len());
        for segment in &self.segments {
            match segment {
                Segment::Head(range) => slices.push(IoSlice::new(&self.out[range.clone()])),
                Segment::Data(ReadData::Owned(data)) => slices.push(IoSlice::new(data)),
                Segment::Data(ReadData::Lent(pieces)) => {
                    for piece in pieces {
                        match piece.bytes() {
                            Some(bytes) => slices.push(IoSlice::new(bytes)),
                            None => push_zeroes(&mut slices, piece.len() as u64),
                        }
                    }
                }
                Segment::Data(ReadData::Cached { offset, length }) => {
                    // What comes before (the reply's header) goes out
                    // first, held back by the kernel to leave with the data.
                    self.turn_bytes += socket::send_all_more(&*stream, &mut slices).await?;
                    slices.clear();
                    let file = self
                        .backend
                        .as_ref()
                        .and_then(|backend| backend.page_cache_file())
                        .ok_or_else(|| io::Error::other("read data's file is gone"))?;
                    socket::send_file(&*stream, file, *offset, *length as u64).await?;
                    self.turn_bytes += length;
                }
                Segment::Data(ReadData::Mapped {
                    map,
                    offset,
                    length,
                }) => slices.push(
                    map.io_slice(*offset, *length)
                        .ok_or_else(|| io::Error::other("read data past the file's mapping"))?,
                ),
                Segment::Zeroes(length) => push_zeroes(&mut slices, *length),
            }
        }
        let mut remaining: &mut [IoSlice<'_>] = &mut slices;
        while !remaining.is_empty() {
            let batch = remaining.len().min(MAX_IOVECS);
            let written = stream
                .write_vectored(&remaining[..batch])
                .await
                .map_err(|error| {
                    if error.raw_os_error() == Some(libc::EFAULT) {
                        // The one memory a write here can fault on.
                        io::Error::other(
                            "the export's file shrank while read data from it was being sent",
                        )
                    } else {
                        error
                    }
                })?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut remaining, written);
            self.turn_bytes += written;
        }
        // A TLS stream may hold records back until flushed (a no-op for
        // plain sockets).
        stream.flush().await?;
        drop(slices);
        let mut data_bytes = 0;
        for segment in self.segments.drain(..) {
            if let Segment::Data(data) = segment {
                data_bytes += data.len();
                match data {
                    ReadData::Owned(buffer) => self.budget.release_read_buffer(buffer),
                    data => self.budget.release(data.len()),
                }
            }
        }
        if let Some(window) = &mut self.poll_window {
            window.replied(data_bytes);
        }
        Ok(())
    }
}

/// The CPU time the calling thread has used.
fn thread_cpu_time() -> std::time::Duration {
    let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

/// Whether the process may run on more than one CPU (its affinity and CPU
/// quota, looked at once): on one, the blocking pool overlaps nothing and
/// each trip to it is two context switches on that CPU.
fn several_cpus() -> bool {
    static SEVERAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}
