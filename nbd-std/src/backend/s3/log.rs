//! The write log: what makes a `FLUSH` durable without storing every dirty
//! object.
//!
//! Small writes are appended, as records, to a log segment in memory; a
//! segment is stored as `PREFIX/log/SEQUENCE` when it is full (in the
//! background, several at once) or when a `FLUSH` or `FUA` write needs it.
//! A `FLUSH` then costs the PUT of the last partial segment, not one PUT
//! per dirty object. The data objects are brought up to date later
//! ("folded", in `disk`), after which the segments they cover are deleted.
//! At open, the segments still in the store are replayed over the data
//! objects.
//!
//! A segment, all integers big-endian:
//!
//! ```text
//! "NBDS3LG1" sequence:u64          header (16 bytes)
//! 1 offset:u64 length:u32 data     bytes written at a disk offset
//! 2 offset:u64 length:u32          bytes zeroed
//! 3 index:u64 segment:u64 at:u32   object `index` is stored with every
//!                                  record before position (segment, at)
//! ```
//!
//! Records of one object are appended under that object's lock, so their
//! order in the log is the order they were applied in the cache. Record
//! 3 lets an object written with large, unlogged writes be made durable by
//! its own PUT: replay skips that object's records before the position.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::disk::{STORE_CALL_BOUND, bounded, store_error};
use super::layout::{log_folder, log_key, log_sequence};
use super::lease::Lease;

/// First bytes of every segment: what it is and its format.
const MAGIC: &[u8; 8] = b"NBDS3LG1";

/// Segment header: magic and sequence number.
const HEADER: usize = 16;

/// A segment is sealed and stored once its records reach this size.
const SEGMENT_TARGET: usize = 4 << 20;

/// Segments stored at once in the background.
const PARALLEL_SEGMENT_UPLOADS: usize = 8;

/// Wait before a failed background segment upload is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Bytes a data record takes besides its data.
pub(super) const DATA_RECORD_OVERHEAD: usize = 13;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_STORED: u8 = 3;

/// Where a record starts: its segment and its byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Position {
    pub(super) segment: u64,
    pub(super) at: u32,
}

/// One change of the disk, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Record<'a> {
    /// `data` written at disk offset `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// `length` bytes zeroed at disk offset `offset`.
    Zero { offset: u64, length: u32 },
    /// Object `index` is stored with every change before `since`.
    Stored { index: u64, since: Position },
}

impl Record<'_> {
    fn encode(&self, into: &mut Vec<u8>) {
        match self {
            Self::Data { offset, data } => {
                into.push(KIND_DATA);
                into.extend_from_slice(&offset.to_be_bytes());
                // Records are at most one object (16 MiB) long.
                into.extend_from_slice(&(data.len() as u32).to_be_bytes());
                into.extend_from_slice(data);
            }
            Self::Zero { offset, length } => {
                into.push(KIND_ZERO);
                into.extend_from_slice(&offset.to_be_bytes());
                into.extend_from_slice(&length.to_be_bytes());
            }
            Self::Stored { index, since } => {
                into.push(KIND_STORED);
                into.extend_from_slice(&index.to_be_bytes());
                into.extend_from_slice(&since.segment.to_be_bytes());
                into.extend_from_slice(&since.at.to_be_bytes());
            }
        }
    }
}

/// Takes `N` bytes from the front of `rest`.
fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = rest.split_first_chunk::<N>()?;
    *rest = tail;
    Some(*head)
}

/// Parses a stored segment into its sequence number and its records with
/// their positions. The error names what is wrong.
pub(super) fn decode_segment(bytes: &[u8]) -> Result<(u64, Vec<(Position, Record<'_>)>), String> {
    let mut rest = bytes;
    let magic = take::<8>(&mut rest).ok_or("shorter than its header")?;
    if &magic != MAGIC {
        return Err("not a log segment of this format".to_owned());
    }
    let sequence = u64::from_be_bytes(take::<8>(&mut rest).ok_or("shorter than its header")?);
    let mut records = Vec::new();
    while !rest.is_empty() {
        let at = u32::try_from(bytes.len() - rest.len()).map_err(|_| "segment over 4 GiB")?;
        let position = Position {
            segment: sequence,
            at,
        };
        let truncated = || format!("record at byte {at} is cut short");
        let kind = take::<1>(&mut rest).ok_or_else(truncated)?[0];
        let record = match kind {
            KIND_DATA | KIND_ZERO => {
                let offset = u64::from_be_bytes(take::<8>(&mut rest).ok_or_else(truncated)?);
                let length = u32::from_be_bytes(take::<4>(&mut rest).ok_or_else(truncated)?);
                if kind == KIND_ZERO {
                    Record::Zero { offset, length }
                } else {
                    let length = length as usize;
                    if rest.len() < length {
                        return Err(truncated());
                    }
                    let (data, tail) = rest.split_at(length);
                    rest = tail;
                    Record::Data { offset, data }
                }
            }
            KIND_STORED => Record::Stored {
                index: u64::from_be_bytes(take::<8>(&mut rest).ok_or_else(truncated)?),
                since: Position {
                    segment: u64::from_be_bytes(take::<8>(&mut rest).ok_or_else(truncated)?),
                    at: u32::from_be_bytes(take::<4>(&mut rest).ok_or_else(truncated)?),
                },
            },
            other => return Err(format!("record at byte {at} has unknown kind {other}")),
        };
        records.push((position, record));
    }
    Ok((sequence, records))
}

/// A sealed segment, kept until the store has it.
struct Segment {
    sequence: u64,
    bytes: Arc<Vec<u8>>,
    /// Log room its records hold; given back once stored.
    room: Mutex<Option<OwnedSemaphorePermit>>,
    /// Held during its PUT (one per key in flight); `true` once stored.
    stored: tokio::sync::Mutex<bool>,
}

struct LogState {
    /// The open segment: header, then records.
    pending: Vec<u8>,
    pending_room: Option<OwnedSemaphorePermit>,
    /// Sequence number of the open segment.
    sequence: u64,
    /// Sealed segments not stored yet.
    unstored: BTreeMap<u64, Arc<Segment>>,
    /// Stored segments not deleted yet, with their sizes.
    stored: BTreeMap<u64, usize>,
    last_append: Instant,
}

fn fresh_segment(sequence: u64) -> Vec<u8> {
    // Room for a full segment at once: appending never reallocates.
    let mut pending = Vec::with_capacity(SEGMENT_TARGET + HEADER + (64 << 10));
    pending.extend_from_slice(MAGIC);
    pending.extend_from_slice(&sequence.to_be_bytes());
    pending
}

/// The write log of one disk.
pub(super) struct WriteLog {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    lease: Option<Arc<Lease>>,
    /// Permits: bytes of records held in memory (open and unstored
    /// segments); an appender waits when they are all taken.
    room: Arc<Semaphore>,
    room_bytes: usize,
    state: Mutex<LogState>,
    sealed: mpsc::UnboundedSender<Arc<Segment>>,
    uploads: Arc<Semaphore>,
}

/// The receiver the background segment uploader reads.
pub(super) struct SealedSegments(mpsc::UnboundedReceiver<Arc<Segment>>);

impl WriteLog {
    /// A log whose next segment is `next_sequence`, with `stored` (sequence
    /// number and size) already in the store, holding at most `room_bytes`
    /// of records in memory.
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        lease: Option<Arc<Lease>>,
        room_bytes: usize,
        next_sequence: u64,
        stored: &[(u64, usize)],
    ) -> (Arc<Self>, SealedSegments) {
        let (sealed, receiver) = mpsc::unbounded_channel();
        let log = Arc::new(Self {
            store,
            prefix,
            lease,
            room: Arc::new(Semaphore::new(room_bytes)),
            room_bytes,
            state: Mutex::new(LogState {
                pending: fresh_segment(next_sequence),
                pending_room: None,
                sequence: next_sequence,
                unstored: BTreeMap::new(),
                stored: stored.iter().copied().collect(),
                last_append: Instant::now(),
            }),
            sealed,
            uploads: Arc::new(Semaphore::new(PARALLEL_SEGMENT_UPLOADS)),
        });
        (log, SealedSegments(receiver))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Room for a record of `bytes`, waiting for stored segments to give
    /// it back.
    pub(super) async fn reserve(&self, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes.min(self.room_bytes)).map_err(io::Error::other)?;
        Arc::clone(&self.room)
            .acquire_many_owned(bytes)
            .await
            .map_err(io::Error::other)
    }

    /// Room for a record of `bytes` if there is some now.
    pub(super) fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes.min(self.room_bytes)).ok()?;
        Arc::clone(&self.room).try_acquire_many_owned(bytes).ok()
    }

    /// Where the next record will be.
    pub(super) fn position(&self) -> Position {
        let state = self.state();
        Position {
            segment: state.sequence,
            at: u32::try_from(state.pending.len()).unwrap_or(u32::MAX),
        }
    }

    /// Appends a record (the caller holds the lock of the object it
    /// changes), with the room reserved for it; seals the segment when it
    /// is full.
    pub(super) fn append(&self, record: &Record<'_>, room: Option<OwnedSemaphorePermit>) {
        let mut state = self.state();
        record.encode(&mut state.pending);
        if let Some(room) = room {
            match &mut state.pending_room {
                Some(held) => held.merge(room),
                none => *none = Some(room),
            }
        }
        state.last_append = Instant::now();
        if state.pending.len() >= SEGMENT_TARGET {
            self.seal(&mut state);
        }
    }

    /// Seals the open segment if it has records, and hands it to the
    /// background uploader.
    fn seal(&self, state: &mut LogState) {
        if state.pending.len() <= HEADER {
            return;
        }
        let next = state.sequence + 1;
        let bytes = std::mem::replace(&mut state.pending, fresh_segment(next));
        let segment = Arc::new(Segment {
            sequence: state.sequence,
            bytes: Arc::new(bytes),
            room: Mutex::new(state.pending_room.take()),
            stored: tokio::sync::Mutex::new(false),
        });
        state.unstored.insert(state.sequence, Arc::clone(&segment));
        state.sequence = next;
        // The receiver lives as long as the runtime of this disk.
        let _ = self.sealed.send(segment);
    }

    /// Stores every record appended so far; returns the sequence number
    /// of the last segment that holds them.
    pub(super) async fn flush(&self) -> io::Result<u64> {
        let (through, waiting) = {
            let mut state = self.state();
            self.seal(&mut state);
            let waiting: Vec<Arc<Segment>> = state.unstored.values().cloned().collect();
            (state.sequence - 1, waiting)
        };
        join_all(waiting.iter().map(|segment| self.store_segment(segment)))
            .await
            .into_iter()
            .collect::<io::Result<Vec<()>>>()
            .map(|_| through)
    }

    async fn store_segment(&self, segment: &Segment) -> io::Result<()> {
        let mut stored = segment.stored.lock().await;
        if *stored {
            return Ok(());
        }
        if let Some(lease) = &self.lease
            && !lease.valid()
        {
            return Err(lease.lost_error());
        }
        let _uploading = self.uploads.acquire().await.map_err(io::Error::other)?;
        let key = log_key(&self.prefix, segment.sequence);
        let payload = PutPayload::from(bytes::Bytes::from_owner(SegmentBytes(Arc::clone(
            &segment.bytes,
        ))));
        bounded(self.store.put(&key, payload))
            .await
            .map_err(store_error)?;
        *stored = true;
        segment
            .room
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut state = self.state();
        state.unstored.remove(&segment.sequence);
        state.stored.insert(segment.sequence, segment.bytes.len());
        Ok(())
    }

    /// Stores sealed segments in the background, several at once, trying
    /// failed ones again until they are stored.
    pub(super) async fn upload_in_background(self: Arc<Self>, sealed: SealedSegments) {
        let SealedSegments(mut sealed) = sealed;
        while let Some(segment) = sealed.recv().await {
            let log = Arc::clone(&self);
            tokio::spawn(async move {
                while let Err(error) = log.store_segment(&segment).await {
                    tracing::warn!(
                        "log segment {:016x}: upload failed ({error}); retrying in {} s",
                        segment.sequence,
                        RETRY_DELAY.as_secs()
                    );
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            });
        }
    }

    /// Deletes the stored segments up to `through` (their records are in
    /// the data objects now).
    pub(super) async fn delete_through(&self, through: u64) -> io::Result<()> {
        use futures_util::StreamExt;
        let sequences: Vec<u64> = self
            .state()
            .stored
            .range(..=through)
            .map(|(&sequence, _)| sequence)
            .collect();
        if sequences.is_empty() {
            return Ok(());
        }
        let keys: Vec<Path> = sequences
            .iter()
            .map(|&sequence| log_key(&self.prefix, sequence))
            .collect();
        let stream = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
        let results = tokio::time::timeout(
            STORE_CALL_BOUND,
            self.store.delete_stream(stream).collect::<Vec<_>>(),
        )
        .await
        .map_err(|_| io::Error::other("object store: log segments not deleted in time"))?;
        let mut outcome = Ok(());
        let mut state = self.state();
        for result in results {
            let path = match result {
                Ok(path) => path,
                Err(object_store::Error::NotFound { path, .. }) => Path::from(path),
                Err(error) => {
                    if outcome.is_ok() {
                        outcome = Err(store_error(error));
                    }
                    continue;
                }
            };
            if let Some(sequence) = path.filename().and_then(log_sequence) {
                state.stored.remove(&sequence);
            }
        }
        outcome
    }

    /// Bytes of stored segments not yet deleted.
    pub(super) fn stored_bytes(&self) -> usize {
        self.state().stored.values().sum()
    }

    /// Whether any record is in the log (in memory or in the store), and
    /// how long ago the last one was appended.
    pub(super) fn holds_records(&self) -> Option<Duration> {
        let state = self.state();
        let empty =
            state.pending.len() <= HEADER && state.unstored.is_empty() && state.stored.is_empty();
        (!empty).then(|| state.last_append.elapsed())
    }
}

/// A segment's bytes lent to a PUT without copying them.
struct SegmentBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SegmentBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The log segments in the store, oldest first, with their sizes.
pub(super) async fn list_segments(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Vec<(u64, usize)>, object_store::Error> {
    use futures_util::StreamExt;
    let folder = log_folder(prefix);
    let mut listing = store.list(Some(&folder));
    let mut segments = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        if let Some(sequence) = meta.location.filename().and_then(log_sequence) {
            segments.push((sequence, usize::try_from(meta.size).unwrap_or(usize::MAX)));
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Reads stored segment `sequence`.
pub(super) async fn read_segment(
    store: &dyn ObjectStore,
    prefix: &Path,
    sequence: u64,
) -> io::Result<bytes::Bytes> {
    let key = log_key(prefix, sequence);
    bounded(async { store.get(&key).await?.bytes().await })
        .await
        .map_err(store_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_positions() {
        let mut segment = fresh_segment(7);
        let records = [
            Record::Data {
                offset: 4096,
                data: &[1, 2, 3],
            },
            Record::Zero {
                offset: 1 << 40,
                length: 65536,
            },
            Record::Stored {
                index: 3,
                since: Position { segment: 6, at: 99 },
            },
        ];
        let mut positions = Vec::new();
        for record in &records {
            positions.push(segment.len() as u32);
            record.encode(&mut segment);
        }
        let (sequence, decoded) = decode_segment(&segment).expect("decoded");
        assert_eq!(sequence, 7);
        let expected: Vec<_> = positions
            .iter()
            .zip(records.iter().cloned())
            .map(|(&at, record)| (Position { segment: 7, at }, record))
            .collect();
        assert_eq!(decoded, expected);
        // Cut anywhere inside a record: an error, never a short record.
        for cut in HEADER + 1..segment.len() {
            if positions.contains(&(cut as u32)) {
                continue;
            }
            assert!(decode_segment(&segment[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_segment(b"NBDS3LG2\0\0\0\0\0\0\0\0").is_err());
    }
}
