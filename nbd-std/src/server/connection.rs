//! Drives one client: bytes in to the core, storage work out to the
//! backend (inline for fast backends, on the blocking pool otherwise), and
//! every reply ready sent in one vectored write, read data straight from
//! the buffer it was read into.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::Arc;

use nbd_core::server::{
    CloseReason, Config, Event, Payload, ReadOutcome, Request, RequestId, StdConnection,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::storage::{Done, Job};
use crate::backend::{Backend, ReadPiece, ZeroFlags, error_code};
use crate::export::ExportSet;
use crate::metrics::{ConnectionMetrics, HandshakeFailure};

/// Most bytes of client input buffered: room for several 1 MiB writes, so
/// a burst of requests is handled in one pass.
const INPUT_BYTES: usize = 4 << 20;

/// Bytes of client input buffered at first. The buffer doubles (up to
/// `INPUT_BYTES`) each time a read fills it, so an idle or negotiating
/// connection costs 4 KiB, not 4 MiB (the core buffers options itself),
/// and a busy one has room for its bursts after a few reads.
const FIRST_INPUT_BYTES: usize = 4 << 10;

/// Zero bytes for simple replies to reads of holes.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Most slices one `writev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

fn push_zeroes(slices: &mut Vec<IoSlice<'_>>, length: u64) {
    let mut left = length;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64) as usize;
        slices.push(IoSlice::new(&ZEROES[..n]));
        left -= n as u64;
    }
}

/// How a pass of [`Driver::serve`] over one stream ended.
enum Ended {
    /// The session is over.
    Done,
    /// `NBD_OPT_STARTTLS` was acknowledged: go on over TLS.
    StartTls,
}

/// Runs the connection until the client leaves or the session ends.
///
/// With `tls`, a STARTTLS the core acknowledged upgrades the stream and the
/// same driver (and core connection) goes on over the TLS stream; plain
/// connections never touch TLS types.
pub(super) async fn run<S>(
    mut stream: S,
    exports: Arc<ExportSet>,
    config: Config,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    negotiated: oneshot::Sender<()>,
    metrics: Option<ConnectionMetrics>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    info!("client connected");
    let mut driver = Driver::new(exports, config);
    driver.negotiated = Some(negotiated);
    driver.metrics = metrics;
    let mut tls_failed = false;
    let outcome = match driver.serve(&mut stream, shutdown.clone()).await {
        Ok(Ended::Done) => Ok(()),
        Ok(Ended::StartTls) => match tls {
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(mut tls_stream) => {
                    info!("TLS established");
                    match driver.serve(&mut tls_stream, shutdown).await {
                        Ok(Ended::Done) => Ok(()),
                        // The core refuses a second STARTTLS itself.
                        Ok(Ended::StartTls) => Err(io::Error::other("STARTTLS inside TLS")),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => {
                    tls_failed = true;
                    Err(io::Error::new(
                        error.kind(),
                        format!("TLS handshake failed: {}", crate::tls::tls_reason(&error)),
                    ))
                }
            },
            None => Err(io::Error::other(
                "TLS requested but this server has no TLS configured",
            )),
        },
        Err(error) => Err(error),
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

/// A write whose payload is being gathered for the blocking pool.
struct PendingWrite {
    offset: u64,
    fua: bool,
    data: Vec<u8>,
}

/// A read's data waiting for its reply header.
enum ReadData {
    /// Copied into a buffer of ours.
    Owned(Vec<u8>),
    /// Lent by the backend (`Backend::read_shared`), never copied.
    Lent(Vec<ReadPiece>),
}

impl ReadData {
    fn len(&self) -> usize {
        match self {
            Self::Owned(buffer) => buffer.len(),
            Self::Lent(pieces) => pieces.iter().map(ReadPiece::len).sum(),
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
    conn: StdConnection<Arc<ExportSet>>,
    exports: Arc<ExportSet>,
    backend: Option<Arc<dyn Backend>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Jobs on the blocking pool.
    pending: usize,
    /// Read data waiting for its reply header.
    read_data: HashMap<RequestId, ReadData>,
    writes: HashMap<RequestId, PendingWrite>,
    /// Completions refused as `Busy` (block-status buffer full), retried
    /// after the next transmit.
    retry: Vec<Done>,
    buffers: Vec<Vec<u8>>,
    out: Vec<u8>,
    segments: Vec<Segment>,
    requests: u64,
    closed: bool,
    /// The core handed over for TLS: the stream must be upgraded.
    start_tls: bool,
    /// Told when an export is selected (the handshake deadline stops).
    negotiated: Option<oneshot::Sender<()>>,
    /// `--metrics`: this connection's counters.
    metrics: Option<ConnectionMetrics>,
}

impl Driver {
    fn new(exports: Arc<ExportSet>, config: Config) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            conn: StdConnection::new(Arc::clone(&exports), config),
            exports,
            backend: None,
            done_tx,
            done_rx,
            pending: 0,
            read_data: HashMap::new(),
            writes: HashMap::new(),
            retry: Vec::new(),
            buffers: Vec::new(),
            out: Vec::new(),
            segments: Vec::new(),
            requests: 0,
            closed: false,
            start_tls: false,
            negotiated: None,
            metrics: None,
        }
    }

    async fn serve<S>(
        &mut self,
        stream: &mut S,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<Ended>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut input = vec![0u8; FIRST_INPUT_BYTES];
        let (mut start, mut end) = (0usize, 0usize);
        let mut eof = false;
        // Stop watching once told (or once the sender is gone), so a closed
        // channel cannot wake the loop forever.
        let mut watching = true;
        if *shutdown.borrow() {
            self.conn.shutdown();
            watching = false;
        }
        loop {
            while let Ok(done) = self.done_rx.try_recv() {
                self.pending -= 1;
                self.apply(done);
            }
            start += self.pump(&input[start..end])?;
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
            let sent = self.transmit(stream).await?;
            if self.closed {
                return stream.shutdown().await.map(|()| Ended::Done);
            }
            if start == end {
                (start, end) = (0, 0);
            } else if end == input.len() {
                input.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
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
            if eof && self.pending == 0 {
                return Ok(Ended::Done);
            }
            let room = !eof && end < input.len();
            tokio::select! {
                done = self.done_rx.recv(), if self.pending > 0 => {
                    if let Some(done) = done {
                        self.pending -= 1;
                        self.apply(done);
                    }
                }
                read = stream.read(&mut input[end..]), if room => match read? {
                    0 => {
                        debug!("client closed its side");
                        eof = true;
                    }
                    n => {
                        end += n;
                        if end == input.len() && input.len() < INPUT_BYTES {
                            // A fresh zeroed allocation, not `resize`:
                            // large ones are mapped zero pages, resident
                            // only once written.
                            let mut grown = vec![0u8; (input.len() * 2).min(INPUT_BYTES)];
                            grown[..end - start].copy_from_slice(&input[start..end]);
                            (start, end) = (0, end - start);
                            input = grown;
                        }
                    }
                },
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
                    if let Some(metrics) = &mut self.metrics {
                        metrics.request(&request);
                    }
                    self.request(request);
                }
                Event::WriteData {
                    id,
                    offset,
                    data,
                    remaining,
                } => self.write_data(id, offset, data, remaining),
                Event::Close(reason) => {
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
        let job = match request {
            Request::Read { id, offset, length } => {
                if let Some(lent) = self.read_lent(offset, length) {
                    let outcome = match lent {
                        Ok(pieces) => {
                            self.read_data.insert(id, ReadData::Lent(pieces));
                            ReadOutcome::Data
                        }
                        Err(error) => {
                            error!("storage error: {error}");
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
                let buffer = self.buffer(length as usize);
                Job::Read { id, offset, buffer }
            }
            Request::Write {
                id,
                offset,
                length,
                fua,
            } => {
                if self.may_block() {
                    let mut data = self.buffer(0);
                    data.reserve(length as usize);
                    self.writes.insert(id, PendingWrite { offset, fua, data });
                } else if fua {
                    self.writes.insert(
                        id,
                        PendingWrite {
                            offset,
                            fua,
                            data: Vec::new(),
                        },
                    );
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

    /// A piece of a write's payload: stored at once by fast backends,
    /// gathered for the pool otherwise.
    fn write_data(&mut self, id: RequestId, offset: u64, data: &[u8], remaining: u64) {
        if self.may_block() {
            let Some(write) = self.writes.get_mut(&id) else {
                return;
            };
            write.data.extend_from_slice(data);
            if remaining == 0
                && let Some(write) = self.writes.remove(&id)
            {
                self.dispatch(Job::Write {
                    id,
                    offset: write.offset,
                    data: write.data,
                    fua: write.fua,
                });
            }
            return;
        }
        let Some(backend) = self.backend.clone() else {
            return;
        };
        if let Err(error) = backend.write_at(data, offset) {
            // The core drops the rest of this write's payload from now on.
            self.writes.remove(&id);
            self.apply(Done::Other {
                id,
                result: Err(error),
            });
            return;
        }
        if remaining == 0 {
            let result = match self.writes.remove(&id) {
                Some(write) => {
                    backend.flush_range(write.offset, offset + data.len() as u64 - write.offset)
                }
                None => Ok(()),
            };
            self.apply(Done::Other { id, result });
        }
    }

    /// Read data lent by a non-blocking backend, when it can lend it.
    fn read_lent(&self, offset: u64, length: u64) -> Option<io::Result<Vec<ReadPiece>>> {
        let backend = self.backend.as_ref().filter(|b| !b.may_block())?;
        let mut pieces = Vec::new();
        backend
            .read_shared(offset, length, &mut pieces)
            .map(|result| result.map(|()| pieces))
    }

    fn may_block(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.may_block())
    }

    fn dispatch(&mut self, job: Job) {
        let Some(backend) = self.backend.clone() else {
            return;
        };
        if backend.may_block() {
            let done_tx = self.done_tx.clone();
            self.pending += 1;
            tokio::task::spawn_blocking(move || {
                // The receiver is gone only when the connection ended.
                let _ = done_tx.send(job.run(&*backend));
            });
        } else {
            let done = job.run(&*backend);
            self.apply(done);
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
            Done::Read { id, buffer, result } => match result {
                Ok(()) => {
                    self.read_data.insert(id, ReadData::Owned(buffer));
                    self.conn.complete_read(id, ReadOutcome::Data)
                }
                Err(error) => {
                    self.buffers.push(buffer);
                    self.conn
                        .complete_read(id, ReadOutcome::Error(error_code(&error)))
                }
            },
            Done::Write { id, data, result } => {
                self.buffers.push(data);
                self.conn.complete(id, code(result))
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

    /// A buffer of `len` bytes, reused when possible.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.buffers.pop().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    /// Sends every reply ready in one vectored write; returns the replies sent.
    async fn transmit<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> io::Result<usize> {
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
                    let data = self.read_data.remove(&id).unwrap_or_else(|| {
                        error!(
                            "read data for request {} missing: sending zeroes",
                            id.to_bits()
                        );
                        ReadData::Owned(Vec::new())
                    });
                    if data.len() as u64 == length {
                        self.segments.push(Segment::Data(data));
                    } else {
                        self.segments.push(Segment::Zeroes(length));
                    }
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

    async fn write_segments<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> io::Result<()> {
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
                Segment::Zeroes(length) => push_zeroes(&mut slices, *length),
            }
        }
        let mut remaining: &mut [IoSlice<'_>] = &mut slices;
        while !remaining.is_empty() {
            let batch = remaining.len().min(MAX_IOVECS);
            let written = stream.write_vectored(&remaining[..batch]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut remaining, written);
        }
        // A TLS stream may hold records back until flushed (a no-op for
        // plain sockets).
        stream.flush().await?;
        drop(slices);
        for segment in self.segments.drain(..) {
            if let Segment::Data(ReadData::Owned(buffer)) = segment {
                self.buffers.push(buffer);
            }
        }
        Ok(())
    }
}
