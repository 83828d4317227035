//! An async NBD client over the core's client state machine.
//!
//! ```no_run
//! # async fn demo() -> nbd_std::client::Result<()> {
//! use nbd_std::client::Client;
//!
//! let client = Client::connect("nbd://127.0.0.1:10809/disk").await?;
//! let mut buf = vec![0u8; 4096];
//! client.read_at(&mut buf, 0).await?;
//! client.write_at(b"hello", 512).await?;
//! client.flush().await?;
//! println!("{} bytes", client.size());
//! client.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! - [`Client::connect`] opens one connection (TCP with `TCP_NODELAY`, or
//!   a unix socket; see [`uri`] for the URI forms), and negotiates
//!   extended headers (or structured replies), `base:allocation` and
//!   block sizes, as the server offers them.
//! - [`Client::connect_many`] opens several connections when the server
//!   advertises multi-conn (`NBD_FLAG_CAN_MULTI_CONN`), one otherwise;
//!   operations are spread over them in turn.
//! - A [`Client`] is cheap to clone and usable from many tasks at once:
//!   each connection is a task owning the socket and the core; callers'
//!   operations reach it over a channel and are answered on a oneshot,
//!   with up to 128 requests in flight per connection, completing in any
//!   order.
//! - Reads and writes larger than the server's maximum block size are
//!   split into several requests. Offsets and lengths must be multiples
//!   of the server's minimum block size (1 for most servers), except at
//!   the end of the export; [`Error::Misaligned`] otherwise.
//! - [`Client::read_owned`] and [`Client::write_owned`] move the buffer to
//!   the connection and back: read data is copied once, from the socket
//!   input into it, and write data goes to the socket straight from it.
//!   [`Client::read_at`]/[`Client::write_at`] take slices and copy once
//!   more through a pooled buffer.
//! - [`list_exports`] and [`export_info`] query the server without
//!   entering transmission (`NBD_OPT_LIST`, `NBD_OPT_INFO`).
//!
//! - A connection that breaks (end of input, reset, TLS closed, or the
//!   server shutting down with `NBD_ESHUTDOWN`) is opened again to the
//!   same URI with the same options, and the operations not yet answered
//!   are sent again, whole (every NBD command may be repeated). The new
//!   session must offer the export as before: same size, still writable
//!   if it was, the same commands, header style and `base:allocation`;
//!   else they fail with [`Error::ExportChanged`]. Attempts back off from
//!   50 ms to 2 s; once operations have waited the URI's
//!   `reconnect-timeout` ([`DEFAULT_RECONNECT_TIMEOUT`] by default), they
//!   fail with [`Error::ReconnectFailed`]. `reconnect-timeout=0` turns
//!   reconnecting off. Only a connection that was once up is reopened:
//!   [`Client::connect`] fails at once if the server cannot be reached.
//!
//! Errors are [`Error`]s: the server's errors carry the NBD error name
//! ([`Error::Server`]); a connection that breaks for good fails every
//! request in flight on it, and later ones, with the same error.

mod driver;
mod error;
mod negotiate;
mod transport;
pub mod uri;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nbd_core::client::{ExportInfo, Mode};
use nbd_core::wire::{Command, CommandFlags, HeaderStyle};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use error::{Error, Result, error_meaning};
pub use nbd_core::client::BASE_ALLOCATION;
pub use uri::{DEFAULT_RECONNECT_TIMEOUT, Endpoint, NbdUri, UriError};

use driver::{FatalSlot, Limits, Op, Resume};
use transport::TlsConfig;

/// Requests in flight per connection (the core's `StdConnection`).
pub const MAX_REQUESTS: usize = 128;

/// Buffers kept for reuse by [`Client::read_at`] and [`Client::write_at`].
const POOLED_BUFFERS: usize = 32;

/// Largest pooled buffer kept.
const POOLED_BUFFER_BYTES: usize = 4 << 20;

/// `base:allocation` status bit: the range is a hole (not allocated).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status bit: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// One `base:allocation` extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Export offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Status bits: [`STATE_HOLE`], [`STATE_ZERO`].
    pub flags: u32,
}

impl Extent {
    /// Not allocated (`NBD_STATE_HOLE`).
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }

    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }

    /// Offset one past the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// How [`Client::zero`] zeroes (`NBD_CMD_WRITE_ZEROES` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroOptions {
    /// Fail with `NBD_ENOTSUP` unless zeroing is fast (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast: bool,
    /// Keep the range allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub no_hole: bool,
    /// Durable on return (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// One export as `NBD_OPT_LIST` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedExport {
    /// Export name.
    pub name: String,
    /// Description for humans (may be empty).
    pub description: String,
}

/// What the server told about an export.
#[derive(Clone, Debug)]
pub struct ExportDetails {
    /// The name asked for.
    pub name: String,
    /// The server's name for it (`NBD_INFO_NAME`), if sent.
    pub canonical_name: Option<String>,
    /// Description (`NBD_INFO_DESCRIPTION`), if sent.
    pub description: Option<String>,
    /// Size, transmission flags, block sizes and negotiated features.
    pub export: ExportInfo,
    /// Metadata contexts: those selected for block status (after
    /// [`Client::connect`]), or every one the server lists (after
    /// [`export_info`]).
    pub meta_contexts: Vec<String>,
}

impl ExportDetails {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// Structured replies were negotiated (implied by extended headers).
    pub fn structured_replies(&self) -> bool {
        self.export.features.structured_replies
    }

    /// Extended headers were negotiated.
    pub fn extended_headers(&self) -> bool {
        self.export.features.extended_headers
    }
}

/// Lists the server's exports (`NBD_OPT_LIST`). The export in the URI is
/// ignored.
pub async fn list_exports(uri: &NbdUri) -> Result<Vec<ListedExport>> {
    let (_, _, negotiated) = negotiate::open(uri, Mode::List, &TlsConfig::default()).await?;
    Ok(negotiated.list)
}

/// Describes the URI's export without entering transmission
/// (`NBD_OPT_INFO`, with every metadata context the server lists by
/// `NBD_OPT_LIST_META_CONTEXT`).
///
/// A server without `NBD_OPT_INFO` (it answers `NBD_REP_ERR_UNSUP`) is
/// asked with `NBD_OPT_GO` instead, as nbdinfo does; the metadata contexts
/// are then those selected (`base:allocation`).
pub async fn export_info(uri: &NbdUri) -> Result<ExportDetails> {
    let tls = TlsConfig::default();
    match negotiate::open(uri, Mode::Info, &tls).await {
        Ok((_, _, negotiated)) => negotiated.details(&uri.export),
        Err(Error::OptionRefused {
            option: nbd_core::wire::OptionCode::Info,
            reply: nbd_core::wire::OptionReplyType::ErrUnsupported,
            ..
        }) => {
            let (mut transport, mut conn, negotiated) =
                negotiate::open(uri, Mode::Go, &tls).await?;
            negotiate::hang_up(&mut transport, &mut conn).await;
            negotiated.details(&uri.export)
        }
        Err(error) => Err(error),
    }
}

/// One connection's handle.
#[derive(Debug)]
struct Handle {
    ops: mpsc::Sender<Op>,
    fatal: FatalSlot,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// The error that ended the connection.
    fn error(&self) -> Error {
        driver::fatal_error(&self.fatal).unwrap_or(Error::Closed {
            reason: String::new(),
        })
    }

    async fn call<T>(&self, op: Op, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        if self.ops.send(op).await.is_err() {
            return Err(self.error());
        }
        answer.await.unwrap_or_else(|_| Err(self.error()))
    }
}

#[derive(Debug)]
struct Inner {
    uri: NbdUri,
    details: ExportDetails,
    handles: Vec<Handle>,
    next: AtomicUsize,
    can_block_status: bool,
    extended: bool,
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// A connected NBD client; see the [module docs](self). Clones share the
/// connections; the last one dropped disconnects them.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Connects to the export `uri` names (one connection).
    pub async fn connect(uri: &str) -> Result<Self> {
        Self::connect_uri(&NbdUri::parse(uri)?, 1).await
    }

    /// Connects with up to `connections` connections: that many when the
    /// server advertises multi-conn, one otherwise.
    pub async fn connect_many(uri: &str, connections: usize) -> Result<Self> {
        Self::connect_uri(&NbdUri::parse(uri)?, connections).await
    }

    /// [`connect_many`](Self::connect_many) with a parsed URI.
    pub async fn connect_uri(uri: &NbdUri, connections: usize) -> Result<Self> {
        let tls = TlsConfig::default();
        let (first, details, can_block_status) = Self::open_one(uri, &tls).await?;
        let wanted = if details.export.can_multi_conn() {
            connections.max(1)
        } else {
            1
        };
        let mut handles = vec![first];
        let mut opening = Vec::new();
        for _ in 1..wanted {
            let (uri, tls) = (uri.clone(), tls.clone());
            opening.push(tokio::spawn(
                async move { Self::open_one(&uri, &tls).await },
            ));
        }
        for task in opening {
            let (handle, ..) = task
                .await
                .map_err(|e| Error::io(std::io::Error::other(e)))??;
            handles.push(handle);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                uri: uri.clone(),
                extended: details.extended_headers(),
                can_block_status,
                details,
                handles,
                next: AtomicUsize::new(0),
                buffers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Opens and negotiates one connection and starts its task.
    async fn open_one(uri: &NbdUri, tls: &TlsConfig) -> Result<(Handle, ExportDetails, bool)> {
        let (transport, conn, negotiated) = negotiate::open(uri, Mode::Go, tls).await?;
        let details = negotiated.details(&uri.export)?;
        let limits = Limits::of(&details.export, &negotiated);
        let can_block_status = limits.base_allocation.is_some() && conn.can_block_status();
        let resume = Resume {
            uri: uri.clone(),
            tls: tls.clone(),
            export: details.export,
            base_allocation: limits.base_allocation.is_some(),
        };
        let (ops, receiver) = mpsc::channel(driver::CHANNEL_DEPTH);
        let fatal = FatalSlot::default();
        let task = tokio::spawn(driver::run(
            transport,
            conn,
            negotiated.leftover,
            limits,
            resume,
            receiver,
            Arc::clone(&fatal),
        ));
        let handle = Handle {
            ops,
            fatal,
            task: Mutex::new(Some(task)),
        };
        Ok((handle, details, can_block_status))
    }

    /// The URI connected to.
    pub fn uri(&self) -> &NbdUri {
        &self.inner.uri
    }

    /// What the server told about the export.
    pub fn info(&self) -> &ExportDetails {
        &self.inner.details
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.details.export.size
    }

    /// Connections open.
    pub fn connections(&self) -> usize {
        self.inner.handles.len()
    }

    /// Whether [`block_status`](Self::block_status) works (structured
    /// replies and `base:allocation` negotiated).
    pub fn can_block_status(&self) -> bool {
        self.inner.can_block_status
    }

    fn export(&self) -> &ExportInfo {
        &self.inner.details.export
    }

    /// The next connection in turn.
    fn handle(&self) -> &Handle {
        let handles = &self.inner.handles;
        let index = self.inner.next.fetch_add(1, Ordering::Relaxed) % handles.len();
        &handles[index]
    }

    /// Checks a range against the export's size and minimum block size.
    fn check_range(&self, command: &'static str, offset: u64, length: u64) -> Result<()> {
        let size = self.size();
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                command,
                offset,
                length,
                size,
            });
        }
        let minimum = self.export().block_sizes.minimum.max(1);
        let unaligned = |value: u64| !value.is_multiple_of(u64::from(minimum));
        if unaligned(offset) || (unaligned(length) && end != Some(size)) {
            return Err(Error::Misaligned {
                command,
                offset,
                length,
                minimum,
            });
        }
        Ok(())
    }

    fn check_writable(&self, command: &'static str) -> Result<()> {
        if self.export().is_read_only() {
            return Err(Error::ReadOnly(command));
        }
        Ok(())
    }

    /// A buffer of `len` bytes (contents unspecified) from the pool.
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let pooled = self
            .inner
            .buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut buf = pooled.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn return_buffer(&self, buf: Vec<u8>) {
        if buf.capacity() > POOLED_BUFFER_BYTES {
            return;
        }
        let mut pool = self
            .inner
            .buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return self.check_range("read", offset, 0);
        }
        let tmp = self.take_buffer(buf.len());
        let tmp = self.read_owned(tmp, offset).await?;
        buf.copy_from_slice(&tmp);
        self.return_buffer(tmp);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, which travels to the
    /// connection task and back: the data is copied into it straight from
    /// the socket input.
    pub async fn read_owned(&self, buf: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
        self.check_range("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(buf);
        }
        let (reply, answer) = oneshot::channel();
        self.handle()
            .call(Op::Read { offset, buf, reply }, answer)
            .await
    }

    /// Writes `data` at `offset`.
    pub async fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut tmp = self.take_buffer(0);
        tmp.extend_from_slice(data);
        let tmp = self.write_owned(tmp, offset).await?;
        self.return_buffer(tmp);
        Ok(())
    }

    /// Writes `data` at `offset`, sending it to the socket straight from
    /// the buffer; the buffer comes back for reuse.
    pub async fn write_owned(&self, data: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
        self.write_with(data, offset, false).await
    }

    /// [`write_owned`](Self::write_owned) with `NBD_CMD_FLAG_FUA`: durable
    /// on return (the server must advertise FUA).
    pub async fn write_fua(&self, data: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
        if !self.export().can_fua() {
            return Err(Error::Unsupported("FUA (forced unit access)"));
        }
        self.write_with(data, offset, true).await
    }

    async fn write_with(&self, data: Vec<u8>, offset: u64, fua: bool) -> Result<Vec<u8>> {
        self.check_writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(data);
        }
        let (reply, answer) = oneshot::channel();
        self.handle()
            .call(
                Op::Write {
                    offset,
                    data,
                    fua,
                    reply,
                },
                answer,
            )
            .await
    }

    async fn command(
        &self,
        handle: &Handle,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        handle
            .call(
                Op::Command {
                    command,
                    flags,
                    offset,
                    length,
                    reply,
                },
                answer,
            )
            .await
    }

    /// Makes every completed write durable (`NBD_CMD_FLUSH`, on every
    /// connection).
    pub async fn flush(&self) -> Result<()> {
        if !self.export().can_flush() {
            return Err(Error::Unsupported("flush"));
        }
        let mut answers = Vec::with_capacity(self.inner.handles.len());
        for handle in &self.inner.handles {
            let (reply, answer) = oneshot::channel();
            let op = Op::Command {
                command: Command::Flush,
                flags: CommandFlags::empty(),
                offset: 0,
                length: 0,
                reply,
            };
            if handle.ops.send(op).await.is_err() {
                return Err(handle.error());
            }
            answers.push((handle, answer));
        }
        for (handle, answer) in answers {
            answer.await.unwrap_or_else(|_| Err(handle.error()))?;
        }
        Ok(())
    }

    /// Discards the range (`NBD_CMD_TRIM`); it reads as anything after.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable("trim")?;
        if !self.export().can_trim() {
            return Err(Error::Unsupported("trim"));
        }
        self.check_range("trim", offset, length)?;
        if length == 0 {
            return Ok(());
        }
        self.command(
            self.handle(),
            Command::Trim,
            CommandFlags::empty(),
            offset,
            length,
        )
        .await
    }

    /// Zeroes the range (`NBD_CMD_WRITE_ZEROES`).
    pub async fn zero(&self, offset: u64, length: u64, options: ZeroOptions) -> Result<()> {
        self.check_writable("zero")?;
        if !self.export().can_write_zeroes() {
            return Err(Error::Unsupported("write zeroes"));
        }
        if options.fast && !self.export().can_fast_zero() {
            return Err(Error::Unsupported("fast zeroing"));
        }
        if options.fua && !self.export().can_fua() {
            return Err(Error::Unsupported("FUA (forced unit access)"));
        }
        self.check_range("zero", offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let flags = CommandFlags::empty()
            .with_if(CommandFlags::FAST_ZERO, options.fast)
            .with_if(CommandFlags::NO_HOLE, options.no_hole)
            .with_if(CommandFlags::FUA, options.fua);
        self.command(self.handle(), Command::WriteZeroes, flags, offset, length)
            .await
    }

    /// Asks the server to prefetch the range (`NBD_CMD_CACHE`).
    pub async fn cache(&self, offset: u64, length: u64) -> Result<()> {
        if !self.export().can_cache() {
            return Err(Error::Unsupported("cache"));
        }
        self.check_range("cache", offset, length)?;
        if length == 0 {
            return Ok(());
        }
        self.command(
            self.handle(),
            Command::Cache,
            CommandFlags::empty(),
            offset,
            length,
        )
        .await
    }

    /// The `base:allocation` extents covering `[offset, offset + length)`,
    /// in order, merged where adjacent ones have the same status, the last
    /// one cut at the end of the range. Several requests are made when
    /// the server answers for less than the range.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        if !self.can_block_status() {
            return Err(Error::Unsupported(
                "block status (the server did not agree to base:allocation)",
            ));
        }
        self.check_range("block status", offset, length)?;
        let minimum = u64::from(self.export().block_sizes.minimum.max(1));
        let cap = if self.inner.extended {
            1 << 40
        } else {
            u64::from(u32::MAX) / minimum * minimum
        };
        let end = offset + length;
        let mut extents: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let chunk = (end - at).min(cap);
            let (reply, answer) = oneshot::channel();
            let op = Op::BlockStatus {
                offset: at,
                length: chunk,
                reply,
            };
            let reply = self.handle().call(op, answer).await?;
            let before = at;
            for extent in reply {
                if extent.offset >= end {
                    break;
                }
                let extent = Extent {
                    length: extent.length.min(end - extent.offset),
                    ..extent
                };
                at = extent.end();
                match extents.last_mut() {
                    Some(last) if last.flags == extent.flags && last.end() == extent.offset => {
                        last.length += extent.length;
                    }
                    _ => extents.push(extent),
                }
            }
            if at == before {
                return Err(Error::Protocol(
                    nbd_core::client::ProtocolError::MissingBlockStatus,
                ));
            }
        }
        Ok(extents)
    }

    /// Ends every connection gracefully: requests in flight finish, then
    /// `NBD_CMD_DISC`. Operations after it fail with
    /// [`Error::Disconnected`].
    pub async fn disconnect(&self) -> Result<()> {
        let mut result = Ok(());
        for handle in &self.inner.handles {
            let (reply, answer) = oneshot::channel();
            let outcome = handle.call(Op::Disconnect { reply }, answer).await;
            match outcome {
                Ok(()) | Err(Error::Disconnected) => {}
                Err(error) if result.is_ok() => result = Err(error),
                Err(_) => {}
            }
            let task = handle
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        result
    }

    /// Header style in use (compact, or extended with 64-bit lengths).
    pub fn header_style(&self) -> HeaderStyle {
        if self.inner.extended {
            HeaderStyle::Extended
        } else {
            HeaderStyle::Compact
        }
    }
}
