//! `nbd-std cp SRC DST`: copies between a local file (or block device),
//! standard input/output (`-`), a pipe or character device (read or
//! written in order) and NBD exports, in any combination.
//!
//! - Many requests are in flight at once (`requests`), spread over several
//!   connections when the server advertises multi-conn (`connections`).
//! - Holes are not transferred: a file source is mapped with
//!   `SEEK_DATA`/`SEEK_HOLE`, an NBD source with `NBD_CMD_BLOCK_STATUS`
//!   (`base:allocation`), and chunks read as all zeroes count as holes too.
//!   On an NBD destination a hole becomes `NBD_CMD_WRITE_ZEROES` (or zero
//!   buffers when the server cannot zero); a destination file is created
//!   (or truncated) and holes are left unwritten, so it comes out sparse; a
//!   block device is zeroed with `fallocate`; a stream gets zero bytes.
//! - The destination is flushed at the end (NBD `FLUSH` when advertised,
//!   `fdatasync` for files) unless `flush` is off.
//! - An NBD destination must be at least as large as the source; the rest
//!   of a larger export is left as it was.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read as _, Write as _};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nbd_core::wire::ExtDescriptor;
use tokio::task::{JoinHandle, JoinSet};

use crate::backend::{Backend, FileBackend, ZeroFlags};
use crate::client::{self, Client, NbdUri, UriError, ZeroOptions};

/// Bytes of the source mapped (for holes) at once.
const MAP_WINDOW: u64 = 1 << 30;

/// Zero bytes written at once where zeroes must be sent as data.
static ZEROES: [u8; 1 << 16] = [0; 1 << 16];

/// One end of a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// `-`: standard input as the source, standard output as destination.
    Stdio,
    /// A local regular file or block device.
    File(PathBuf),
    /// An NBD export.
    Nbd(NbdUri),
}

impl Location {
    /// `-`, an NBD URI (anything with `://`), or a local path.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        if text == "-" {
            Ok(Self::Stdio)
        } else if text.contains("://") {
            Ok(Self::Nbd(NbdUri::parse(text)?))
        } else {
            Ok(Self::File(PathBuf::from(text)))
        }
    }

    fn name(&self, source: bool) -> String {
        match self {
            Self::Stdio if source => "standard input".into(),
            Self::Stdio => "standard output".into(),
            Self::File(path) => path.display().to_string(),
            Self::Nbd(uri) => uri.to_string(),
        }
    }
}

/// How to copy.
#[derive(Clone, Copy, Debug)]
pub struct CopyOptions {
    /// Connections per NBD side, when the server advertises multi-conn.
    pub connections: usize,
    /// Requests (chunks) in flight at once.
    pub requests: usize,
    /// Bytes per chunk.
    pub chunk: usize,
    /// Flush the destination at the end.
    pub flush: bool,
    /// Draw a progress bar on standard error (only if it is a terminal).
    pub progress: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            requests: 32,
            chunk: 1 << 20,
            flush: true,
            progress: false,
        }
    }
}

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes copied (the source's size).
    pub total: u64,
    /// Bytes read from the source and written as data.
    pub transferred: u64,
    /// Bytes of zeroes written without reading them from the source
    /// (`NBD_CMD_WRITE_ZEROES`, `fallocate`, or zero bytes where the
    /// destination cannot do better).
    pub zeroed: u64,
    /// Bytes of zeroes left as holes in a new destination file.
    pub holes: u64,
    /// NBD connections used for the source and the destination.
    pub connections: (usize, usize),
}

impl CopyStats {
    /// Bytes not transferred as data.
    pub fn skipped(&self) -> u64 {
        self.zeroed + self.holes
    }
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// An NBD side failed.
    #[error("{location}: {error}")]
    Nbd {
        /// The URI.
        location: String,
        /// What happened.
        #[source]
        error: client::Error,
    },
    /// A local side failed.
    #[error("{location}: {error}")]
    Io {
        /// The path, or standard input/output.
        location: String,
        /// What happened.
        #[source]
        error: io::Error,
    },
    /// The source does not fit the destination export.
    #[error(
        "the source ({source_size} bytes) is larger than the destination export ({destination_size} bytes)"
    )]
    TooLarge {
        /// Source bytes (so far, for standard input).
        source_size: u64,
        /// Destination export size.
        destination_size: u64,
    },
    /// The destination export is read-only.
    #[error("{0}: the export is read-only")]
    ReadOnly(String),
    /// A worker task panicked or was cancelled.
    #[error("internal error: a copy task failed: {0}")]
    Task(String),
}

type Result<T, E = CopyError> = std::result::Result<T, E>;

fn task_error(error: tokio::task::JoinError) -> CopyError {
    CopyError::Task(error.to_string())
}

/// Counters shared by the workers.
#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    transferred: AtomicU64,
    zeroed: AtomicU64,
    holes: AtomicU64,
}

/// Buffers reused between chunks.
#[derive(Debug, Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
    }
}

/// Whether every byte is zero (checked 4 KiB at a time, vectorised).
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// A random-access source.
#[derive(Clone, Debug)]
enum Reader {
    File {
        backend: Arc<FileBackend>,
        name: String,
    },
    Nbd {
        client: Client,
        name: String,
    },
}

impl Reader {
    fn size(&self) -> u64 {
        match self {
            Self::File { backend, .. } => backend.size(),
            Self::Nbd { client, .. } => client.size(),
        }
    }

    async fn read(&self, mut buf: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
        match self {
            Self::File { backend, name } => {
                let backend = Arc::clone(backend);
                tokio::task::spawn_blocking(move || backend.read_at(&mut buf, offset).map(|()| buf))
                    .await
                    .map_err(task_error)?
                    .map_err(|error| CopyError::Io {
                        location: name.clone(),
                        error,
                    })
            }
            Self::Nbd { client, name } => {
                client
                    .read_owned(buf, offset)
                    .await
                    .map_err(|error| CopyError::Nbd {
                        location: name.clone(),
                        error,
                    })
            }
        }
    }

    /// `(length, reads as zero)` runs from `offset`, covering at least its
    /// first byte and at most `length` bytes.
    async fn map(&self, offset: u64, length: u64) -> Result<Vec<(u64, bool)>> {
        match self {
            Self::File { backend, name } => {
                let backend = Arc::clone(backend);
                let extents = tokio::task::spawn_blocking(move || {
                    let mut extents: Vec<ExtDescriptor> = Vec::new();
                    backend
                        .block_status(offset, length, &mut extents)
                        .map(|()| extents)
                })
                .await
                .map_err(task_error)?
                .map_err(|error| CopyError::Io {
                    location: name.clone(),
                    error,
                })?;
                Ok(extents
                    .into_iter()
                    .map(|e| (e.length, e.status & u64::from(client::STATE_ZERO) != 0))
                    .collect())
            }
            Self::Nbd { client, name } if client.can_block_status() => {
                let extents =
                    client
                        .block_status(offset, length)
                        .await
                        .map_err(|error| CopyError::Nbd {
                            location: name.clone(),
                            error,
                        })?;
                Ok(extents.iter().map(|e| (e.length, e.is_zero())).collect())
            }
            Self::Nbd { .. } => Ok(vec![(length, false)]),
        }
    }
}

/// A random-access destination.
#[derive(Clone, Debug)]
enum Writer {
    /// A regular file, created or truncated: holes are left unwritten.
    NewFile {
        file: Arc<File>,
        name: String,
    },
    /// A block device: zeroed by `fallocate` or zero buffers.
    Device {
        backend: Arc<FileBackend>,
        name: String,
    },
    Nbd {
        client: Client,
        name: String,
    },
}

impl Writer {
    fn io_error(&self, error: io::Error) -> CopyError {
        let location = match self {
            Self::NewFile { name, .. } | Self::Device { name, .. } | Self::Nbd { name, .. } => {
                name.clone()
            }
        };
        CopyError::Io { location, error }
    }

    async fn write(&self, buf: Vec<u8>, offset: u64) -> Result<Vec<u8>> {
        match self {
            Self::NewFile { file, .. } => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || file.write_all_at(&buf, offset).map(|()| buf))
                    .await
                    .map_err(task_error)?
                    .map_err(|e| self.io_error(e))
            }
            Self::Device { backend, .. } => {
                let backend = Arc::clone(backend);
                tokio::task::spawn_blocking(move || backend.write_at(&buf, offset).map(|()| buf))
                    .await
                    .map_err(task_error)?
                    .map_err(|e| self.io_error(e))
            }
            Self::Nbd { client, name } => {
                client
                    .write_owned(buf, offset)
                    .await
                    .map_err(|error| CopyError::Nbd {
                        location: name.clone(),
                        error,
                    })
            }
        }
    }

    /// Makes `[offset, offset + length)` read as zeroes, as cheaply as the
    /// destination allows.
    async fn zero(&self, offset: u64, length: u64, counters: &Counters) -> Result<()> {
        match self {
            Self::NewFile { .. } => {
                counters.holes.fetch_add(length, Ordering::Relaxed);
                Ok(())
            }
            Self::Device { backend, .. } => {
                let backend = Arc::clone(backend);
                tokio::task::spawn_blocking(move || {
                    backend.write_zeroes(offset, length, ZeroFlags::default())
                })
                .await
                .map_err(task_error)?
                .map_err(|e| self.io_error(e))?;
                counters.zeroed.fetch_add(length, Ordering::Relaxed);
                Ok(())
            }
            Self::Nbd { client, name } => {
                let failed = |error| CopyError::Nbd {
                    location: name.clone(),
                    error,
                };
                if client.info().export.can_write_zeroes() {
                    client
                        .zero(offset, length, ZeroOptions::default())
                        .await
                        .map_err(failed)?;
                    counters.zeroed.fetch_add(length, Ordering::Relaxed);
                } else {
                    let mut at = offset;
                    let end = offset + length;
                    while at < end {
                        let n = (end - at).min(ZEROES.len() as u64) as usize;
                        client.write_at(&ZEROES[..n], at).await.map_err(failed)?;
                        at += n as u64;
                    }
                    counters.zeroed.fetch_add(length, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        match self {
            Self::NewFile { file, .. } => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .map_err(task_error)?
                    .map_err(|e| self.io_error(e))
            }
            Self::Device { backend, .. } => {
                let backend = Arc::clone(backend);
                tokio::task::spawn_blocking(move || backend.flush())
                    .await
                    .map_err(task_error)?
                    .map_err(|e| self.io_error(e))
            }
            Self::Nbd { client, name } if client.info().export.can_flush() => {
                client.flush().await.map_err(|error| CopyError::Nbd {
                    location: name.clone(),
                    error,
                })
            }
            Self::Nbd { .. } => Ok(()),
        }
    }
}

/// The destination: random-access, or a stream written in order.
#[derive(Debug)]
enum Destination {
    Random(Writer),
    Stream(Stream),
}

/// A sequential end: standard input or output, or a pipe or character
/// device named by path (`/dev/null`, a FIFO). Blocking I/O runs off the
/// runtime's threads.
#[derive(Clone, Debug)]
enum Stream {
    Stdio { source: bool },
    File { file: Arc<File>, name: String },
}

impl Stream {
    fn name(&self) -> String {
        match self {
            Self::Stdio { source: true } => "standard input".into(),
            Self::Stdio { source: false } => "standard output".into(),
            Self::File { name, .. } => name.clone(),
        }
    }

    fn failed(&self, error: io::Error) -> CopyError {
        CopyError::Io {
            location: self.name(),
            error,
        }
    }

    /// Fills `buf`; returns it and the bytes read (fewer only at the end).
    async fn read(&self, mut buf: Vec<u8>) -> Result<(Vec<u8>, usize)> {
        let file = match self {
            Self::File { file, .. } => Some(Arc::clone(file)),
            Self::Stdio { .. } => None,
        };
        tokio::task::spawn_blocking(move || {
            let mut filled = 0;
            while filled < buf.len() {
                let read = match &file {
                    Some(file) => (&**file).read(&mut buf[filled..]),
                    None => io::stdin().lock().read(&mut buf[filled..]),
                };
                match read {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((buf, filled))
        })
        .await
        .map_err(task_error)?
        .map_err(|e| self.failed(e))
    }

    async fn write(&self, buf: Vec<u8>) -> Result<Vec<u8>> {
        let file = match self {
            Self::File { file, .. } => Some(Arc::clone(file)),
            Self::Stdio { .. } => None,
        };
        tokio::task::spawn_blocking(move || {
            match &file {
                Some(file) => (&**file).write_all(&buf),
                None => io::stdout().lock().write_all(&buf),
            }
            .map(|()| buf)
        })
        .await
        .map_err(task_error)?
        .map_err(|e| self.failed(e))
    }

    async fn flush(&self) -> Result<()> {
        if let Self::Stdio { source: false } = self {
            tokio::task::spawn_blocking(|| io::stdout().flush())
                .await
                .map_err(task_error)?
                .map_err(|e| self.failed(e))?;
        }
        Ok(())
    }
}

/// Whether `path` names a pipe, character device or socket: read or
/// written in order, never mapped or truncated.
fn is_stream(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| {
        let kind = meta.file_type();
        kind.is_fifo() || kind.is_char_device() || kind.is_socket()
    })
}

async fn open_stream(path: &Path, source: bool) -> Result<Stream> {
    let owned = path.to_owned();
    let file = tokio::task::spawn_blocking(move || {
        if source {
            File::open(&owned)
        } else {
            OpenOptions::new().write(true).open(&owned)
        }
    })
    .await
    .map_err(task_error)?
    .map_err(|error| CopyError::Io {
        location: path.display().to_string(),
        error,
    })?;
    Ok(Stream::File {
        file: Arc::new(file),
        name: path.display().to_string(),
    })
}

async fn connect(uri: &NbdUri, connections: usize) -> Result<Client> {
    Client::connect_uri(uri, connections)
        .await
        .map_err(|error| CopyError::Nbd {
            location: uri.to_string(),
            error,
        })
}

async fn open_reader(path: &Path) -> Result<Reader> {
    let owned = path.to_owned();
    let backend = tokio::task::spawn_blocking(move || FileBackend::open(&owned, true))
        .await
        .map_err(task_error)?
        .map_err(|error| CopyError::Io {
            location: path.display().to_string(),
            error,
        })?;
    Ok(Reader::File {
        backend: Arc::new(backend),
        name: path.display().to_string(),
    })
}

/// Opens a destination file: a block device as it is, anything else
/// created or truncated to `size` (holes throughout).
async fn open_file_writer(path: &Path, size: Option<u64>) -> Result<Writer> {
    let owned = path.to_owned();
    let name = path.display().to_string();
    let failed = |error| CopyError::Io {
        location: name.clone(),
        error,
    };
    let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if is_device {
        let backend = tokio::task::spawn_blocking(move || FileBackend::open(&owned, false))
            .await
            .map_err(task_error)?
            .map_err(failed)?;
        if let Some(size) = size
            && size > backend.size()
        {
            return Err(CopyError::TooLarge {
                source_size: size,
                destination_size: backend.size(),
            });
        }
        return Ok(Writer::Device {
            backend: Arc::new(backend),
            name,
        });
    }
    let file = tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&owned)?;
        file.set_len(size.unwrap_or(0))?;
        Ok(file)
    })
    .await
    .map_err(task_error)?
    .map_err(failed)?;
    Ok(Writer::NewFile {
        file: Arc::new(file),
        name,
    })
}

/// Copies `source` to `destination`.
pub async fn copy(
    source: &Location,
    destination: &Location,
    options: CopyOptions,
) -> Result<CopyStats> {
    let options = CopyOptions {
        connections: options.connections.max(1),
        requests: options.requests.max(1),
        chunk: options.chunk.max(4096),
        ..options
    };
    let (reader, input) = match source {
        Location::Stdio => (None, Some(Stream::Stdio { source: true })),
        Location::File(path) if is_stream(path) => (None, Some(open_stream(path, true).await?)),
        Location::File(path) => (Some(open_reader(path).await?), None),
        Location::Nbd(uri) => {
            let reader = Reader::Nbd {
                client: connect(uri, options.connections).await?,
                name: uri.to_string(),
            };
            (Some(reader), None)
        }
    };
    let size = reader.as_ref().map(Reader::size);
    let destination_name = destination.name(false);
    let output = match destination {
        Location::Stdio => Destination::Stream(Stream::Stdio { source: false }),
        Location::File(path) if is_stream(path) => {
            Destination::Stream(open_stream(path, false).await?)
        }
        Location::File(path) => Destination::Random(open_file_writer(path, size).await?),
        Location::Nbd(uri) => {
            let client = connect(uri, options.connections).await?;
            if client.info().export.is_read_only() {
                return Err(CopyError::ReadOnly(destination_name));
            }
            if let Some(size) = size
                && size > client.size()
            {
                return Err(CopyError::TooLarge {
                    source_size: size,
                    destination_size: client.size(),
                });
            }
            Destination::Random(Writer::Nbd {
                client,
                name: destination_name.clone(),
            })
        }
    };
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(options.progress, size, Arc::clone(&counters));
    let result = match (&reader, &input) {
        (Some(reader), _) => copy_random(reader, &output, options, &counters).await,
        (None, Some(input)) => copy_stream(input, &output, options, &counters).await,
        (None, None) => Ok(0),
    };
    progress.finish(result.is_ok());
    let total = result?;
    if let Destination::Random(writer) = &output {
        if let (Writer::NewFile { file, name }, None) = (writer, size) {
            // From standard input: the file ends where the input did.
            file.set_len(total).map_err(|error| CopyError::Io {
                location: name.clone(),
                error,
            })?;
        }
        if options.flush {
            writer.flush().await?;
        }
    }
    if let Destination::Stream(stream) = &output {
        stream.flush().await?;
    }
    let mut connections = (0, 0);
    if let Some(Reader::Nbd { client, name }) = &reader {
        connections.0 = client.connections();
        client.disconnect().await.map_err(|error| CopyError::Nbd {
            location: name.clone(),
            error,
        })?;
    }
    if let Destination::Random(Writer::Nbd { client, name }) = &output {
        connections.1 = client.connections();
        client.disconnect().await.map_err(|error| CopyError::Nbd {
            location: name.clone(),
            error,
        })?;
    }
    Ok(CopyStats {
        total,
        transferred: counters.transferred.load(Ordering::Relaxed),
        zeroed: counters.zeroed.load(Ordering::Relaxed),
        holes: counters.holes.load(Ordering::Relaxed),
        connections,
    })
}

/// A piece of the source.
#[derive(Clone, Copy, Debug)]
enum Chunk {
    Data { offset: u64, length: u64 },
    Zero { offset: u64, length: u64 },
}

/// What an ordered (standard output) chunk produced.
enum Produced {
    Data(Vec<u8>),
    Zero(u64),
}

/// Copies a random-access source: maps it, then reads and writes chunks,
/// `requests` at a time.
async fn copy_random(
    reader: &Reader,
    output: &Destination,
    options: CopyOptions,
    counters: &Arc<Counters>,
) -> Result<u64> {
    let size = reader.size();
    let pool = Arc::new(Pool::default());
    let mut unordered: JoinSet<Result<()>> = JoinSet::new();
    let mut ordered: VecDeque<JoinHandle<Result<Produced>>> = VecDeque::new();
    let mut offset = 0;
    while offset < size {
        let window = (size - offset).min(MAP_WINDOW);
        let runs = reader.map(offset, window).await?;
        if runs.is_empty() {
            // Never for a correct map; treat the rest as data.
            return Err(CopyError::Task("empty block status".into()));
        }
        for (length, zero) in runs {
            let length = length.min(size - offset);
            if length == 0 {
                continue;
            }
            let mut chunks = Vec::new();
            if zero {
                chunks.push(Chunk::Zero { offset, length });
            } else {
                let mut at = offset;
                while at < offset + length {
                    let n = (offset + length - at).min(options.chunk as u64);
                    chunks.push(Chunk::Data {
                        offset: at,
                        length: n,
                    });
                    at += n;
                }
            }
            for chunk in chunks {
                match output {
                    Destination::Random(writer) => {
                        while unordered.len() >= options.requests {
                            if let Some(done) = unordered.join_next().await {
                                done.map_err(task_error)??;
                            }
                        }
                        let (reader, writer) = (reader.clone(), writer.clone());
                        let (pool, counters) = (Arc::clone(&pool), Arc::clone(counters));
                        unordered.spawn(async move {
                            copy_chunk(&reader, &writer, chunk, &pool, &counters).await
                        });
                    }
                    Destination::Stream(stream) => {
                        while ordered.len() >= options.requests {
                            if let Some(front) = ordered.pop_front() {
                                let produced = front.await.map_err(task_error)??;
                                emit(stream, produced, &pool, counters).await?;
                            }
                        }
                        let reader = reader.clone();
                        let pool = Arc::clone(&pool);
                        ordered.push_back(tokio::spawn(async move {
                            produce(&reader, chunk, &pool).await
                        }));
                    }
                }
            }
            offset += length;
        }
    }
    while let Some(done) = unordered.join_next().await {
        done.map_err(task_error)??;
    }
    if let Destination::Stream(stream) = output {
        while let Some(front) = ordered.pop_front() {
            let produced = front.await.map_err(task_error)??;
            emit(stream, produced, &pool, counters).await?;
        }
    }
    Ok(size)
}

/// Copies one chunk to a random-access destination.
async fn copy_chunk(
    reader: &Reader,
    writer: &Writer,
    chunk: Chunk,
    pool: &Pool,
    counters: &Counters,
) -> Result<()> {
    match chunk {
        Chunk::Zero { offset, length } => writer.zero(offset, length, counters).await?,
        Chunk::Data { offset, length } => {
            let buf = reader.read(pool.take(length as usize), offset).await?;
            store(writer, buf, offset, pool, counters).await?;
        }
    }
    let length = match chunk {
        Chunk::Zero { length, .. } | Chunk::Data { length, .. } => length,
    };
    counters.done.fetch_add(length, Ordering::Relaxed);
    Ok(())
}

/// Writes a chunk of data, or zeroes it cheaply when it is all zeroes.
async fn store(
    writer: &Writer,
    buf: Vec<u8>,
    offset: u64,
    pool: &Pool,
    counters: &Counters,
) -> Result<()> {
    let length = buf.len() as u64;
    if is_zero(&buf) {
        pool.give(buf);
        return writer.zero(offset, length, counters).await;
    }
    let buf = writer.write(buf, offset).await?;
    pool.give(buf);
    counters.transferred.fetch_add(length, Ordering::Relaxed);
    Ok(())
}

/// Reads one chunk for standard output.
async fn produce(reader: &Reader, chunk: Chunk, pool: &Pool) -> Result<Produced> {
    match chunk {
        Chunk::Zero { length, .. } => Ok(Produced::Zero(length)),
        Chunk::Data { offset, length } => {
            let buf = reader.read(pool.take(length as usize), offset).await?;
            Ok(Produced::Data(buf))
        }
    }
}

/// Writes one chunk to a stream, in order.
async fn emit(stream: &Stream, produced: Produced, pool: &Pool, counters: &Counters) -> Result<()> {
    let length = match produced {
        Produced::Data(buf) => {
            let length = buf.len() as u64;
            let buf = stream.write(buf).await?;
            pool.give(buf);
            counters.transferred.fetch_add(length, Ordering::Relaxed);
            length
        }
        Produced::Zero(length) => {
            let mut left = length;
            while left > 0 {
                let n = left.min(1 << 20) as usize;
                let mut buf = pool.take(n);
                buf.fill(0);
                let buf = stream.write(buf).await?;
                pool.give(buf);
                left -= n as u64;
            }
            counters.zeroed.fetch_add(length, Ordering::Relaxed);
            length
        }
    };
    counters.done.fetch_add(length, Ordering::Relaxed);
    Ok(())
}

/// Copies a stream, read in order, to the destination.
async fn copy_stream(
    input: &Stream,
    output: &Destination,
    options: CopyOptions,
    counters: &Arc<Counters>,
) -> Result<u64> {
    let pool = Arc::new(Pool::default());
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut offset = 0u64;
    loop {
        let (mut buf, filled) = input.read(pool.take(options.chunk)).await?;
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        let length = filled as u64;
        match output {
            Destination::Stream(stream) => {
                emit(stream, Produced::Data(buf), &pool, counters).await?;
            }
            Destination::Random(writer) => {
                if let Writer::Nbd { client, .. } = writer
                    && offset + length > client.size()
                {
                    return Err(CopyError::TooLarge {
                        source_size: offset + length,
                        destination_size: client.size(),
                    });
                }
                while tasks.len() >= options.requests {
                    if let Some(done) = tasks.join_next().await {
                        done.map_err(task_error)??;
                    }
                }
                let writer = writer.clone();
                let (pool, counters) = (Arc::clone(&pool), Arc::clone(counters));
                let at = offset;
                tasks.spawn(async move {
                    store(&writer, buf, at, &pool, &counters).await?;
                    counters.done.fetch_add(length, Ordering::Relaxed);
                    Ok(())
                });
            }
        }
        offset += length;
        if filled < options.chunk {
            // The reads above stop short only at the end of the input.
            break;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(task_error)??;
    }
    Ok(offset)
}

/// A progress bar on standard error, redrawn a few times a second.
struct Progress {
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    total: Option<u64>,
    started: Instant,
}

impl Progress {
    fn start(enabled: bool, total: Option<u64>, counters: Arc<Counters>) -> Self {
        let started = Instant::now();
        let mut progress = Self {
            task: None,
            counters,
            total,
            started,
        };
        if enabled && io::stderr().is_terminal() {
            let counters = Arc::clone(&progress.counters);
            progress.task = Some(tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_millis(250));
                loop {
                    interval.tick().await;
                    let done = counters.done.load(Ordering::Relaxed);
                    draw(done, total, started.elapsed());
                }
            }));
        }
        progress
    }

    fn finish(self, success: bool) {
        let Some(task) = self.task else {
            return;
        };
        task.abort();
        let mut stderr = io::stderr();
        if success {
            // The last bar stays, on its own line.
            let done = self.counters.done.load(Ordering::Relaxed);
            draw(done, self.total, self.started.elapsed());
            let _ = writeln!(stderr);
        } else {
            let _ = write!(stderr, "\r\x1b[K");
        }
    }
}

fn draw(done: u64, total: Option<u64>, elapsed: Duration) {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let line = match total {
        Some(total) if total > 0 => {
            let fraction = (done as f64 / total as f64).min(1.0);
            let width = 30;
            let filled = (fraction * width as f64) as usize;
            format!(
                "\r{:3.0}% [{}{}] {} / {}, {}/s\x1b[K",
                fraction * 100.0,
                "#".repeat(filled),
                " ".repeat(width - filled),
                human(done as f64),
                human(total as f64),
                human(rate)
            )
        }
        _ => format!("\r{} copied, {}/s\x1b[K", human(done as f64), human(rate)),
    };
    let mut stderr = io::stderr();
    let _ = stderr.write_all(line.as_bytes());
    let _ = stderr.flush();
}

/// Bytes for people: `1.5 GiB`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(Location::parse("-"), Ok(Location::Stdio));
        assert_eq!(
            Location::parse("disk.img"),
            Ok(Location::File(PathBuf::from("disk.img")))
        );
        assert!(matches!(Location::parse("nbd://h/x"), Ok(Location::Nbd(_))));
        assert!(matches!(
            Location::parse("nbds://h/x"),
            Ok(Location::Nbd(_))
        ));
        assert!(Location::parse("nbd://h/x?tls-verify-peer=false").is_err());
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 10_000];
        assert!(is_zero(&buf));
        buf[9_999] = 1;
        assert!(!is_zero(&buf));
        assert!(is_zero(&[]));
    }

    #[test]
    fn human_units() {
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
