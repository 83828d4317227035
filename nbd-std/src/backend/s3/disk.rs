//! A disk made of fixed-size objects, with the write-back and read cache
//! all connections of the export share.
//!
//! Each object index has at most one [`Slot`] while it is cached or dirty.
//! Its state lock is the read-modify-write lock (two writes into one object
//! never lose each other); its upload lock keeps at most one PUT or DELETE
//! per key in flight. A slot is dirty while its `generation` (bumped by
//! every change) is ahead of `stored` (the generation the store has).
//! Dirty data objects hold a permit of `dirty_room`, so writers wait when
//! the cache is full of data not yet stored.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use nbd_core::wire::ExtDescriptor;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, mpsc};

use super::layout::data_key;
use super::lease::Lease;
use crate::backend::{ZeroFlags, push_extent};

/// Uploads (PUT or DELETE) in flight at once per export.
const PARALLEL_UPLOADS: usize = 32;

/// Fetches (GET) in flight at once per export.
const PARALLEL_FETCHES: usize = 32;

/// How long a background upload waits after an object turns dirty, so a
/// burst of small writes into one object costs one PUT, not many.
const WRITE_BACK_DELAY: Duration = Duration::from_millis(20);

/// The longest an object that keeps being written stays dirty before a
/// background upload stores it anyway (see [`Disk::store_when_quiet`]), as
/// the kernel's page cache does (`dirty_expire_centisecs`). Stored sooner,
/// it would be overwritten before the next FLUSH, which must store it
/// again: each such PUT costs the store and this server CPU and a copy of
/// the object, and saves no time at the FLUSH. A writer waiting for room,
/// or a FLUSH, stores it at once.
const HOT_OBJECT_BOUND: Duration = Duration::from_secs(30);

/// Wait before a failed background upload is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest one store call may take, retries included, before the request
/// that waits on it gets `EIO`.
pub(super) const STORE_CALL_BOUND: Duration = Duration::from_secs(30);

/// Longest a writer waits for room in a cache full of dirty data (the
/// store is down or slow) before its request gets `EIO`.
const ROOM_WAIT_BOUND: Duration = Duration::from_secs(60);

/// Most objects one background upload pass takes (its zero objects go in
/// batched deletes of up to 1,000 keys).
const UPLOAD_BATCH: usize = 4096;

/// Objects fetched ahead of a sequential reader.
const READ_AHEAD_OBJECTS: u64 = 8;

/// One cached or dirty object.
#[derive(Default)]
struct Slot {
    state: Arc<tokio::sync::Mutex<SlotState>>,
    upload: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct SlotState {
    /// The object's bytes: `None` when not cached, empty when all zeroes.
    content: Option<Arc<Vec<u8>>>,
    generation: u64,
    stored: u64,
    /// Held while dirty with data.
    room: Option<OwnedSemaphorePermit>,
    /// Removed from the slot table: look the index up again.
    retired: bool,
}

impl SlotState {
    fn dirty(&self) -> bool {
        self.generation != self.stored
    }
}

/// The disk of one export.
pub(super) struct Disk {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    size: u64,
    object_size: u64,
    /// Whether data object `i` exists in the store (filled by LIST at open,
    /// kept by uploads).
    existence: Vec<AtomicBool>,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Permits: objects of dirty data the cache may hold.
    dirty_room: Arc<Semaphore>,
    /// Writers waiting for a permit of `dirty_room`: while there are, the
    /// background uploads store hot objects too, to make room.
    room_wanted: AtomicUsize,
    /// Clean objects kept for reads beyond this many are dropped.
    cached_limit: usize,
    /// Slots whose content holds data (not `None`, not empty).
    cached: AtomicUsize,
    uploads: Semaphore,
    fetches: Semaphore,
    /// Objects that turned dirty, for the background uploader.
    queue: mpsc::UnboundedSender<u64>,
    lease: Option<Arc<Lease>>,
    /// Where the last read ended, to spot a sequential reader.
    last_read_end: AtomicU64,
}

/// One writer counted in [`Disk::room_wanted`] while it waits for room;
/// uncounted when dropped, also when the request's own bound drops the
/// wait (a count left raised would make every hot object be stored).
struct RoomWanted<'a>(&'a AtomicUsize);

impl<'a> RoomWanted<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for RoomWanted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn store_error(error: object_store::Error) -> io::Error {
    io::Error::other(format!("object store: {error}"))
}

/// Runs a store call with the bound every request relies on.
async fn bounded<T>(
    call: impl Future<Output = Result<T, object_store::Error>>,
) -> Result<T, object_store::Error> {
    match tokio::time::timeout(STORE_CALL_BOUND, call).await {
        Ok(result) => result,
        Err(_) => Err(object_store::Error::Generic {
            store: "S3",
            source: format!("no answer within {} s", STORE_CALL_BOUND.as_secs()).into(),
        }),
    }
}

impl Disk {
    /// A disk whose objects listed by `existing` are in the store.
    /// Returns it with the receiver the background uploader reads.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        size: u64,
        object_size: u64,
        cache_bytes: u64,
        existing: &[u64],
        lease: Option<Arc<Lease>>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<u64>) {
        let objects = size.div_ceil(object_size);
        let existence: Vec<AtomicBool> = (0..objects).map(|_| AtomicBool::new(false)).collect();
        for &index in existing {
            if let Some(flag) = existence.get(index as usize) {
                flag.store(true, Ordering::Relaxed);
            }
        }
        // Half for dirty data, and reads may fill the rest.
        let cache_objects = usize::try_from(cache_bytes / object_size)
            .unwrap_or(usize::MAX)
            .max(4);
        let (queue, uploader) = mpsc::unbounded_channel();
        let disk = Arc::new(Self {
            store,
            prefix,
            size,
            object_size,
            existence,
            slots: Mutex::new(HashMap::new()),
            dirty_room: Arc::new(Semaphore::new(cache_objects / 2)),
            room_wanted: AtomicUsize::new(0),
            cached_limit: cache_objects,
            cached: AtomicUsize::new(0),
            uploads: Semaphore::new(PARALLEL_UPLOADS),
            fetches: Semaphore::new(PARALLEL_FETCHES),
            queue,
            lease,
            last_read_end: AtomicU64::new(u64::MAX),
        });
        (disk, uploader)
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// The objects a byte range touches, as `(index, start in object,
    /// length)`.
    fn pieces(&self, offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let object_size = self.object_size;
        let end = offset + length;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = at / object_size;
            let start = at % object_size;
            let n = (object_size - start).min(end - at);
            at += n;
            Some((index, start as usize, n as usize))
        })
    }

    fn exists(&self, index: u64) -> bool {
        self.existence
            .get(index as usize)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The slot of `index`, locked; made when there is none.
    async fn lock(&self, index: u64) -> (Arc<Slot>, OwnedMutexGuard<SlotState>) {
        loop {
            let slot = Arc::clone(self.table().entry(index).or_default());
            let state = Arc::clone(&slot.state).lock_owned().await;
            if !state.retired {
                return (slot, state);
            }
        }
    }

    /// The slot of `index`, locked, if there is one.
    async fn lock_existing(&self, index: u64) -> Option<(Arc<Slot>, OwnedMutexGuard<SlotState>)> {
        loop {
            let slot = self.table().get(&index).cloned()?;
            let state = Arc::clone(&slot.state).lock_owned().await;
            if !state.retired {
                return Some((slot, state));
            }
        }
    }

    /// Sets a slot's content, keeping the count of cached objects.
    fn set_content(&self, state: &mut SlotState, content: Option<Arc<Vec<u8>>>) {
        let held = |c: &Option<Arc<Vec<u8>>>| c.as_ref().is_some_and(|c| !c.is_empty());
        match (held(&state.content), held(&content)) {
            (false, true) => {
                self.cached.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.cached.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        state.content = content;
    }

    /// Makes sure the slot holds the object's bytes, fetching them if the
    /// store has the object.
    async fn load(&self, index: u64, state: &mut SlotState) -> io::Result<()> {
        if state.content.is_some() {
            return Ok(());
        }
        let content = if self.exists(index) {
            let _fetching = self.fetches.acquire().await.map_err(io::Error::other)?;
            let key = data_key(&self.prefix, index);
            let fetched = bounded(async { self.store.get(&key).await?.bytes().await }).await;
            match fetched {
                // The body's own buffer when nothing else holds it: no
                // second copy of the object in memory.
                Ok(bytes) if bytes.len() as u64 == self.object_size => match bytes.try_into_mut() {
                    Ok(unique) => Vec::from(unique),
                    Err(shared) => shared.to_vec(),
                },
                Ok(bytes) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "object {key} has {} bytes, the disk's objects have {}",
                            bytes.len(),
                            self.object_size
                        ),
                    ));
                }
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(error) => return Err(store_error(error)),
            }
        } else {
            Vec::new()
        };
        self.set_content(state, Some(Arc::new(content)));
        Ok(())
    }

    /// Drops clean cached objects while more than the cache holds are
    /// there, and forgets slots that carry nothing.
    fn evict(&self) {
        if self.cached.load(Ordering::Relaxed) <= self.cached_limit {
            return;
        }
        let mut table = self.table();
        table.retain(|_, slot| {
            if self.cached.load(Ordering::Relaxed) <= self.cached_limit {
                return true;
            }
            let Ok(mut state) = slot.state.try_lock() else {
                return true;
            };
            if state.dirty() {
                return true;
            }
            self.set_content(&mut state, None);
            state.retired = true;
            false
        });
    }

    fn check_lease(&self) -> io::Result<()> {
        match &self.lease {
            Some(lease) if !lease.valid() => Err(lease.lost_error()),
            _ => Ok(()),
        }
    }

    /// Marks a locked slot changed; queues its upload when it just turned
    /// dirty.
    fn changed(&self, index: u64, state: &mut SlotState) {
        let was_dirty = state.dirty();
        state.generation += 1;
        if !was_dirty {
            // The receiver lives as long as the runtime of this disk.
            let _ = self.queue.send(index);
        }
    }

    /// Writes `data` at `start` of object `index`.
    async fn write_object(&self, index: u64, start: usize, data: &[u8]) -> io::Result<()> {
        let (_slot, mut state) = self.lock(index).await;
        if state.room.is_none() {
            // Wait for room without holding the object, so its upload
            // (which frees room) is never blocked behind this writer.
            drop(state);
            let wanting = RoomWanted::new(&self.room_wanted);
            let room = tokio::time::timeout(
                ROOM_WAIT_BOUND,
                Arc::clone(&self.dirty_room).acquire_owned(),
            )
            .await;
            drop(wanting);
            let room = room
                .map_err(|_| {
                    io::Error::other(format!(
                        "write-back cache full for {} s: the object store is not taking uploads",
                        ROOM_WAIT_BOUND.as_secs()
                    ))
                })?
                .map_err(io::Error::other)?;
            let (_slot, relocked) = self.lock(index).await;
            state = relocked;
            if state.room.is_none() {
                state.room = Some(room);
            }
        }
        let whole = start == 0 && data.len() as u64 == self.object_size;
        if whole {
            self.set_content(&mut state, Some(Arc::new(data.to_vec())));
        } else {
            if let Err(error) = self.load(index, &mut state).await {
                if !state.dirty() {
                    state.room = None;
                }
                return Err(error);
            }
            let object_size = self.object_size as usize;
            let mut content = state.content.take().unwrap_or_default();
            let bytes = Arc::make_mut(&mut content);
            if bytes.is_empty() {
                self.cached.fetch_add(1, Ordering::Relaxed);
                bytes.resize(object_size, 0);
            }
            bytes[start..start + data.len()].copy_from_slice(data);
            state.content = Some(content);
        }
        self.changed(index, &mut state);
        Ok(())
    }

    /// Makes a whole object zeroes (deleted from the store on upload).
    async fn zero_object(&self, index: u64) {
        let locked = if self.exists(index) {
            Some(self.lock(index).await)
        } else {
            self.lock_existing(index).await
        };
        let Some((_slot, mut state)) = locked else {
            // Neither stored nor cached: already zeroes.
            return;
        };
        if state.content.as_ref().is_some_and(|c| c.is_empty()) && !self.exists(index) {
            return;
        }
        self.set_content(&mut state, Some(Arc::new(Vec::new())));
        self.changed(index, &mut state);
    }

    pub(super) async fn write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_lease()?;
        let mut at = 0usize;
        for (index, start, n) in self.pieces(offset, data.len() as u64) {
            self.write_object(index, start, &data[at..at + n]).await?;
            at += n;
        }
        self.evict();
        Ok(())
    }

    /// Writes in place, waiting on nothing, when the range lies in one
    /// object that is dirty and cached (it holds its cache room already);
    /// `false`, having changed nothing, otherwise. Random writes into hot
    /// objects then cost a copy, not a trip to the export's runtime.
    pub(super) fn write_cached(&self, data: &[u8], offset: u64) -> bool {
        let mut pieces = self.pieces(offset, data.len() as u64);
        let (Some((index, start, n)), None) = (pieces.next(), pieces.next()) else {
            return false;
        };
        if self.check_lease().is_err() {
            return false;
        }
        let slot = self.table().get(&index).cloned();
        let Some(slot) = slot else {
            return false;
        };
        let Ok(mut state) = slot.state.try_lock() else {
            return false;
        };
        if state.retired || state.room.is_none() {
            return false;
        }
        let Some(content) = state.content.as_mut().filter(|c| !c.is_empty()) else {
            return false;
        };
        Arc::make_mut(content)[start..start + n].copy_from_slice(data);
        self.changed(index, &mut state);
        true
    }

    /// Zeroes the range: whole objects deleted, partial ones rewritten.
    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> io::Result<()> {
        self.check_lease()?;
        let pieces: Vec<_> = self.pieces(offset, length).collect();
        let whole =
            |&(_, start, n): &(u64, usize, usize)| start == 0 && n as u64 == self.object_size;
        if flags.fast && !pieces.iter().all(whole) {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let longest_partial = pieces
            .iter()
            .filter(|piece| !whole(piece))
            .map(|piece| piece.2)
            .max();
        let zeroes = vec![0u8; longest_partial.unwrap_or(0)];
        for piece in &pieces {
            let (index, start, n) = *piece;
            if whole(piece) {
                self.zero_object(index).await;
            } else if self.exists(index) || self.table().contains_key(&index) {
                self.write_object(index, start, &zeroes[..n]).await?;
            }
        }
        self.evict();
        Ok(())
    }

    /// Copies object `index` from `start` into `into`.
    async fn read_object(&self, index: u64, start: usize, into: &mut [u8]) -> io::Result<()> {
        let locked = if self.exists(index) {
            Some(self.lock(index).await)
        } else {
            self.lock_existing(index).await
        };
        let Some((_slot, mut state)) = locked else {
            into.fill(0);
            return Ok(());
        };
        self.load(index, &mut state).await?;
        match state.content.as_deref() {
            Some(bytes) if !bytes.is_empty() => {
                into.copy_from_slice(&bytes[start..start + into.len()]);
            }
            _ => into.fill(0),
        }
        Ok(())
    }

    /// Serves a read from the cache alone, waiting on nothing: `false`
    /// (the buffer partly filled, to be filled again) as soon as one of its
    /// objects is not cached or is locked. A cached read then costs a copy,
    /// not a trip to the export's runtime and back, which at QD1 costs
    /// more than the copy.
    pub(super) fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        let length = buf.len() as u64;
        let mut rest = buf;
        for (index, start, n) in self.pieces(offset, length) {
            let (part, tail) = rest.split_at_mut(n);
            rest = tail;
            let slot = self.table().get(&index).cloned();
            let Some(slot) = slot else {
                if self.exists(index) {
                    return false;
                }
                part.fill(0);
                continue;
            };
            let Ok(state) = slot.state.try_lock() else {
                return false;
            };
            match state.content.as_deref() {
                _ if state.retired => return false,
                Some(bytes) if bytes.is_empty() => part.fill(0),
                Some(bytes) => part.copy_from_slice(&bytes[start..start + n]),
                None => return false,
            }
        }
        true
    }

    pub(super) async fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let length = buf.len() as u64;
        let mut parts = Vec::new();
        let mut rest = buf;
        for (index, start, n) in self.pieces(offset, length) {
            let (part, tail) = rest.split_at_mut(n);
            rest = tail;
            parts.push(self.read_object(index, start, part));
        }
        let results = join_all(parts).await;
        self.evict();
        results
            .into_iter()
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    }

    /// Fetches the objects of the range into the read cache (`CACHE`,
    /// read-ahead), as far as the cache holds.
    pub(super) async fn prefetch(&self, offset: u64, length: u64) -> io::Result<()> {
        let most = self.cached_limit as u64 * self.object_size / 2;
        let loads = self
            .pieces(offset, length.min(most))
            .map(|(index, _, _)| async move {
                if !self.exists(index) {
                    return Ok(());
                }
                let (_slot, mut state) = self.lock(index).await;
                self.load(index, &mut state).await
            });
        let results = join_all(loads).await;
        self.evict();
        results
            .into_iter()
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    }

    /// Starts fetching what a sequential reader will want next.
    pub(super) fn read_ahead(self: &Arc<Self>, offset: u64, length: u64) {
        let end = offset + length;
        let previous = self.last_read_end.swap(end, Ordering::Relaxed);
        if previous != offset || end >= self.size {
            return;
        }
        let next = end.div_ceil(self.object_size) * self.object_size;
        if next >= self.size || (!end.is_multiple_of(self.object_size) && next - end > length) {
            return;
        }
        let ahead = (READ_AHEAD_OBJECTS * self.object_size).min(self.size - next);
        let disk = Arc::clone(self);
        tokio::spawn(async move {
            let _ = disk.prefetch(next, ahead).await;
        });
    }

    /// Stores object `index` if it is dirty: a PUT of its bytes, or a
    /// DELETE when they are all zeroes.
    pub(super) async fn upload(&self, index: u64) -> io::Result<()> {
        let Some(slot) = self.table().get(&index).cloned() else {
            return Ok(());
        };
        let _one_at_a_time = slot.upload.lock().await;
        let (content, generation) = {
            let state = slot.state.lock().await;
            if !state.dirty() || state.retired {
                return Ok(());
            }
            match &state.content {
                Some(content) => (Arc::clone(content), state.generation),
                None => return Ok(()),
            }
        };
        self.check_lease()?;
        let _uploading = self.uploads.acquire().await.map_err(io::Error::other)?;
        let key = data_key(&self.prefix, index);
        let zeroes = content.iter().all(|&b| b == 0);
        if zeroes {
            match bounded(self.store.delete(&key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(store_error(error)),
            }
        } else {
            let payload = PutPayload::from(bytes::Bytes::from_owner(ArcBytes(content)));
            bounded(self.store.put(&key, payload))
                .await
                .map_err(store_error)?;
        }
        if let Some(flag) = self.existence.get(index as usize) {
            flag.store(!zeroes, Ordering::Release);
        }
        let mut state = slot.state.lock().await;
        self.stored(index, &mut state, generation, zeroes);
        Ok(())
    }

    /// Records that the store has generation `generation` of a locked slot.
    fn stored(&self, index: u64, state: &mut SlotState, generation: u64, zeroes: bool) {
        state.stored = state.stored.max(generation);
        if state.dirty() {
            // Changed while it was uploaded: `changed` queued nothing (it
            // was dirty), so queue it here or only a FLUSH would store it.
            let _ = self.queue.send(index);
        } else {
            state.room = None;
            if zeroes {
                // Nothing worth keeping: the store's answer is zeroes now.
                self.set_content(state, Some(Arc::new(Vec::new())));
            }
        }
    }

    /// Stores the dirty zero objects of `indices` with batched deletes
    /// (`DeleteObjects`, 1,000 keys a request): a whole-disk `TRIM` costs
    /// a few requests, not one per object. Objects that got data meanwhile
    /// are uploaded one by one.
    async fn delete_all(&self, mut indices: Vec<u64>) -> io::Result<()> {
        use futures_util::StreamExt;
        indices.sort_unstable();
        indices.dedup();
        // Upload locks taken in index order: two batches never deadlock.
        let mut held = Vec::new();
        let mut with_data = Vec::new();
        for index in indices {
            let slot = self.table().get(&index).cloned();
            let Some(slot) = slot else { continue };
            let guard = Arc::clone(&slot.upload).lock_owned().await;
            let state = slot.state.lock().await;
            if !state.dirty() || state.retired {
                continue;
            }
            if state.content.as_ref().is_some_and(|c| c.is_empty()) {
                let generation = state.generation;
                drop(state);
                held.push((index, slot, guard, generation));
            } else {
                with_data.push(index);
            }
        }
        let mut outcome = Ok(());
        if !held.is_empty() {
            self.check_lease()?;
            let keys: Vec<Path> = held
                .iter()
                .map(|(index, ..)| data_key(&self.prefix, *index))
                .collect();
            let stream = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
            let results: Vec<_> = match tokio::time::timeout(
                STORE_CALL_BOUND,
                self.store.delete_stream(stream).collect::<Vec<_>>(),
            )
            .await
            {
                Ok(results) => results,
                Err(_) => {
                    return Err(io::Error::other(format!(
                        "object store: deletes not done within {} s",
                        STORE_CALL_BOUND.as_secs()
                    )));
                }
            };
            let mut deleted = std::collections::HashSet::new();
            for result in results {
                match result {
                    Ok(path) => {
                        deleted.insert(path);
                    }
                    Err(object_store::Error::NotFound { path, .. }) => {
                        deleted.insert(Path::from(path));
                    }
                    Err(error) => {
                        if outcome.is_ok() {
                            outcome = Err(store_error(error));
                        }
                    }
                }
            }
            for (index, slot, _guard, generation) in held {
                if !deleted.contains(&data_key(&self.prefix, index)) {
                    continue;
                }
                if let Some(flag) = self.existence.get(index as usize) {
                    flag.store(false, Ordering::Release);
                }
                let mut state = slot.state.lock().await;
                self.stored(index, &mut state, generation, true);
            }
        }
        let uploads = join_all(with_data.into_iter().map(|index| self.upload(index))).await;
        outcome.and(
            uploads
                .into_iter()
                .collect::<io::Result<Vec<()>>>()
                .map(drop),
        )
    }

    /// Stores every object of `indices` that is dirty now; the first
    /// failure is the answer, and failed objects stay dirty.
    async fn store_all(&self, indices: Vec<u64>) -> io::Result<()> {
        let mut zeroes = Vec::new();
        let mut data = Vec::new();
        for index in indices {
            let slot = self.table().get(&index).cloned();
            let Some(slot) = slot else { continue };
            let zero = slot
                .state
                .lock()
                .await
                .content
                .as_ref()
                .is_some_and(|c| c.is_empty());
            if zero {
                zeroes.push(index);
            } else {
                data.push(index);
            }
        }
        let (deleted, uploaded) = futures_util::future::join(
            self.delete_all(zeroes),
            join_all(data.into_iter().map(|index| self.upload(index))),
        )
        .await;
        let outcome = deleted.and(
            uploaded
                .into_iter()
                .collect::<io::Result<Vec<()>>>()
                .map(drop),
        );
        self.forget_zero_slots();
        outcome
    }

    /// Stores the batch's objects once each has gone quiet: a writer
    /// filling one in pieces (nbdcopy's 256K requests, from several
    /// connections) is done before the PUT, so the object is stored once,
    /// not once per piece. The quiet an object needs is
    /// [`WRITE_BACK_DELAY`], or a quarter of how long it has been written
    /// to if longer: objects under random writes (rewritten long before a
    /// PUT could finish) wait, up to [`HOT_OBJECT_BOUND`] from the batch's
    /// start, unless writers wait for room. Failed uploads are retried
    /// until they succeed.
    async fn store_when_quiet(&self, batch: Vec<u64>) {
        struct Watched {
            index: u64,
            generation: Option<u64>,
            first_change: tokio::time::Instant,
            last_change: tokio::time::Instant,
        }
        impl Watched {
            fn quiet_needed(&self) -> Duration {
                ((self.last_change - self.first_change) / 4).max(WRITE_BACK_DELAY)
            }
        }
        let started = tokio::time::Instant::now();
        let mut watched = Vec::with_capacity(batch.len());
        for index in batch {
            watched.push(Watched {
                index,
                generation: self.generation(index).await,
                first_change: started,
                last_change: started,
            });
        }
        while !watched.is_empty() {
            tokio::time::sleep(WRITE_BACK_DELAY).await;
            let now = tokio::time::Instant::now();
            let overdue =
                now - started >= HOT_OBJECT_BOUND || self.room_wanted.load(Ordering::Relaxed) > 0;
            let mut ready = Vec::new();
            let mut still_hot = Vec::with_capacity(watched.len());
            for mut object in watched {
                let generation = self.generation(object.index).await;
                if generation != object.generation {
                    object.generation = generation;
                    object.last_change = now;
                }
                if overdue || now - object.last_change >= object.quiet_needed() {
                    ready.push(object.index);
                } else {
                    still_hot.push(object);
                }
            }
            if !ready.is_empty() {
                self.store_retrying(&ready).await;
            }
            watched = still_hot;
        }
    }

    async fn store_retrying(&self, batch: &[u64]) {
        loop {
            match self.store_all(batch.to_vec()).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(
                        "{} objects from {:016x}: upload failed ({error}); retrying in {} s",
                        batch.len(),
                        batch[0],
                        RETRY_DELAY.as_secs()
                    );
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    }

    async fn generation(&self, index: u64) -> Option<u64> {
        let slot = self.table().get(&index).cloned()?;
        Some(slot.state.lock().await.generation)
    }

    #[cfg(test)]
    async fn is_dirty(&self, index: u64) -> bool {
        let slot = self.table().get(&index).cloned();
        match slot {
            Some(slot) => slot.state.lock().await.dirty(),
            None => false,
        }
    }

    /// Dirty object indices among the slots `filter` accepts.
    async fn dirty(&self, filter: impl Fn(u64) -> bool) -> Vec<u64> {
        let slots: Vec<(u64, Arc<Slot>)> = self
            .table()
            .iter()
            .filter(|(index, _)| filter(**index))
            .map(|(index, slot)| (*index, Arc::clone(slot)))
            .collect();
        let mut dirty = Vec::new();
        for (index, slot) in slots {
            if slot.state.lock().await.dirty() {
                dirty.push(index);
            }
        }
        dirty
    }

    /// `NBD_CMD_FLUSH`: every object dirty now is stored before the reply.
    pub(super) async fn flush(&self) -> io::Result<()> {
        let dirty = self.dirty(|_| true).await;
        self.store_all(dirty).await
    }

    /// `FUA`: the range's objects are stored before the reply.
    pub(super) async fn flush_range(&self, offset: u64, length: u64) -> io::Result<()> {
        let first = offset / self.object_size;
        let last = (offset + length.max(1) - 1) / self.object_size;
        let dirty = self.dirty(|index| (first..=last).contains(&index)).await;
        self.store_all(dirty).await
    }

    /// Forgets clean slots of zero objects (their state is in `existence`),
    /// so a whole-disk trim leaves no table behind.
    fn forget_zero_slots(&self) {
        let mut table = self.table();
        table.retain(|_, slot| {
            let Ok(mut state) = slot.state.try_lock() else {
                return true;
            };
            if state.dirty() || state.content.as_ref().is_some_and(|c| !c.is_empty()) {
                return true;
            }
            state.retired = true;
            false
        });
    }

    /// Background uploads: each object that turned dirty is stored after a
    /// short delay; failures are retried until they succeed.
    pub(super) async fn upload_in_background(
        self: Arc<Self>,
        mut dirtied: mpsc::UnboundedReceiver<u64>,
    ) {
        while let Some(first) = dirtied.recv().await {
            // Everything queued by now goes in one pass, so a whole-disk
            // trim's objects are deleted in batches.
            let mut batch = vec![first];
            while batch.len() < UPLOAD_BATCH {
                match dirtied.try_recv() {
                    Ok(index) => batch.push(index),
                    Err(_) => break,
                }
            }
            let disk = Arc::clone(&self);
            tokio::spawn(async move {
                disk.store_when_quiet(batch).await;
                disk.forget_zero_slots_soon();
                disk.evict();
            });
        }
    }

    fn forget_zero_slots_soon(&self) {
        if self.table().len() > self.cached_limit * 2 {
            self.forget_zero_slots();
        }
    }

    /// `base:allocation`: holes where no object is stored or cached with
    /// data.
    pub(super) async fn block_status(
        &self,
        offset: u64,
        length: u64,
        extents: &mut Vec<ExtDescriptor>,
    ) -> io::Result<()> {
        const HOLE_AND_ZERO: u64 = 3;
        let first = extents.len();
        for (index, _, n) in self.pieces(offset, length) {
            let data = match self.lock_existing(index).await {
                Some((_slot, state)) => match &state.content {
                    Some(content) if state.dirty() => !content.is_empty(),
                    Some(content) if !content.is_empty() => true,
                    _ => self.exists(index),
                },
                None => self.exists(index),
            };
            let status = if data { 0 } else { HOLE_AND_ZERO };
            if !push_extent(extents, first, n as u64, status) {
                break;
            }
        }
        Ok(())
    }
}

/// An object's bytes lent to a PUT without copying them.
struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    use tokio::time::Instant;

    use super::*;

    const OBJECT: u64 = 64 << 10;
    const SIZE: u64 = 16 * OBJECT;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A disk on `store` as a server opening it would see it, with a
    /// cache of 16 objects (8 dirty at most), and with background uploads
    /// when `background`.
    async fn open_with(store: &Arc<InMemory>, background: bool) -> Arc<Disk> {
        let store: Arc<dyn ObjectStore> = Arc::clone(store) as Arc<dyn ObjectStore>;
        let prefix = Path::from("disks/vm1");
        let existing = super::super::list_objects(&*store, &prefix)
            .await
            .expect("list");
        let (disk, dirtied) = Disk::new(store, prefix, SIZE, OBJECT, 1 << 20, &existing, None);
        if background {
            tokio::spawn(Arc::clone(&disk).upload_in_background(dirtied));
        }
        disk
    }

    async fn open(store: &Arc<InMemory>) -> Arc<Disk> {
        open_with(store, false).await
    }

    async fn data_objects(store: &InMemory) -> usize {
        use futures_util::StreamExt;
        store
            .list(Some(&Path::from("disks/vm1/data")))
            .collect::<Vec<_>>()
            .await
            .len()
    }

    #[test]
    fn concurrent_writes_into_one_object_lose_nothing() {
        let rt = runtime();
        let store = Arc::new(InMemory::new());
        rt.block_on(async {
            let disk = open(&store).await;
            // 128 writes of 512 bytes into object 1 at once, each a
            // read-modify-write of the same object.
            let writes = (0..128u64).map(|sector| {
                let disk = Arc::clone(&disk);
                tokio::spawn(async move {
                    let data = vec![sector as u8 + 1; 512];
                    disk.write(&data, OBJECT + sector * 512).await
                })
            });
            for done in join_all(writes).await {
                done.expect("task").expect("write");
            }
            disk.flush().await.expect("flush");
        });
        assert_eq!(rt.block_on(data_objects(&store)), 1, "one object stored");
        rt.block_on(async {
            let disk = open(&store).await;
            let mut back = vec![0u8; OBJECT as usize];
            disk.read(&mut back, OBJECT).await.expect("read");
            for (sector, bytes) in back.chunks(512).enumerate() {
                assert!(
                    bytes.iter().all(|&b| b == sector as u8 + 1),
                    "sector {sector} lost its write"
                );
            }
        });
    }

    #[test]
    fn zeroed_objects_are_deleted_and_read_as_holes() {
        let rt = runtime();
        let store = Arc::new(InMemory::new());
        rt.block_on(async {
            // Twice the dirty room: the write waits for background
            // uploads to make room.
            let disk = open_with(&store, true).await;
            disk.write(&vec![7u8; SIZE as usize], 0)
                .await
                .expect("write");
            disk.flush().await.expect("flush");
        });
        assert_eq!(rt.block_on(data_objects(&store)), 16);
        rt.block_on(async {
            let disk = open(&store).await;
            // A partial zeroing keeps the object; whole ones go.
            disk.write_zeroes(100, SIZE - 100, ZeroFlags::default())
                .await
                .expect("zeroes");
            disk.flush().await.expect("flush");
            let mut extents = Vec::new();
            disk.block_status(0, SIZE, &mut extents)
                .await
                .expect("block status");
            assert_eq!(extents.len(), 2, "{extents:?}");
            assert_eq!((extents[0].length, extents[0].status), (OBJECT, 0));
            assert_eq!((extents[1].length, extents[1].status), (SIZE - OBJECT, 3));
        });
        assert_eq!(
            rt.block_on(data_objects(&store)),
            1,
            "whole zero objects deleted"
        );
        rt.block_on(async {
            let disk = open(&store).await;
            let mut back = vec![1u8; SIZE as usize];
            disk.read(&mut back, 0).await.expect("read");
            assert!(back[..100].iter().all(|&b| b == 7));
            assert!(back[100..].iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn cache_and_read_ahead_fetch_into_the_cache() {
        let rt = runtime();
        let store = Arc::new(InMemory::new());
        rt.block_on(async {
            let disk = open_with(&store, true).await;
            for index in 0..SIZE / OBJECT {
                let data = vec![index as u8 + 1; OBJECT as usize];
                disk.write(&data, index * OBJECT).await.expect("write");
            }
            disk.flush().await.expect("flush");
            let disk = open(&store).await;
            // CACHE of object 1; a sequential reader of objects 4 and 5
            // (read-ahead: the 8 objects after them).
            disk.prefetch(OBJECT, OBJECT).await.expect("cache");
            disk.read_ahead(4 * OBJECT, OBJECT);
            disk.read_ahead(5 * OBJECT, OBJECT);
            let fetched = |index: u64| {
                let disk = Arc::clone(&disk);
                async move {
                    let slot = disk.table().get(&index).cloned();
                    match slot {
                        Some(slot) => slot.state.lock().await.content.is_some(),
                        None => false,
                    }
                }
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !fetched(13).await {
                assert!(Instant::now() < deadline, "read-ahead fetched nothing");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Gone from the store, still read: they came from the cache.
            for index in [1, 6, 13] {
                store
                    .delete(&data_key(&Path::from("disks/vm1"), index))
                    .await
                    .expect("delete");
                let mut back = vec![0u8; 512];
                disk.read(&mut back, index * OBJECT).await.expect("read");
                assert!(back.iter().all(|&b| b == index as u8 + 1), "object {index}");
            }
            assert!(!fetched(14).await && !fetched(0).await, "fetched beyond");
        });
    }

    #[test]
    fn fua_stores_its_range_and_flush_the_rest() {
        let rt = runtime();
        let store = Arc::new(InMemory::new());
        rt.block_on(async {
            let disk = open(&store).await;
            disk.write(&[1; 4096], 0).await.expect("write");
            disk.write(&[2; 4096], 5 * OBJECT).await.expect("write");
            disk.flush_range(5 * OBJECT, 4096).await.expect("fua");
            // The background uploader is not running: only the FUA range
            // is in the store.
            assert_eq!(data_objects(&store).await, 1);
            disk.flush().await.expect("flush");
            assert_eq!(data_objects(&store).await, 2);
        });
    }

    /// A disk of four objects on a store whose PUTs take `put`.
    fn disk(put: Duration) -> (Arc<Disk>, mpsc::UnboundedReceiver<u64>) {
        disk_with_cache(put, 1 << 20)
    }

    fn disk_with_cache(put: Duration, cache: u64) -> (Arc<Disk>, mpsc::UnboundedReceiver<u64>) {
        let config = ThrottleConfig {
            wait_put_per_call: put,
            ..ThrottleConfig::default()
        };
        let store = Arc::new(ThrottledStore::new(InMemory::new(), config));
        Disk::new(store, Path::from("d"), 4 * OBJECT, OBJECT, cache, &[], None)
    }

    #[tokio::test]
    async fn rewritten_during_its_upload_is_stored_again_without_a_flush() {
        let (disk, dirtied) = disk(Duration::from_millis(300));
        tokio::spawn(Arc::clone(&disk).upload_in_background(dirtied));
        disk.write(&[1; 4096], 0).await.expect("write");
        // The first upload is in flight (queued after 20 ms, PUT 300 ms).
        tokio::time::sleep(Duration::from_millis(150)).await;
        disk.write(&[2; 4096], 0).await.expect("write");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while disk.is_dirty(0).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an object written during its upload stayed dirty"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stored = disk.store.get(&data_key(&disk.prefix, 0)).await;
        let stored = stored
            .expect("object 0 stored")
            .bytes()
            .await
            .expect("bytes");
        assert_eq!(&stored[..4096], &[2; 4096][..]);
    }

    /// Writes 4 KiB at a different place of `index` every 5 ms for `busy`.
    async fn write_hot(disk: &Disk, index: u64, busy: Duration) {
        let until = tokio::time::Instant::now() + busy;
        let mut at = 0u64;
        while tokio::time::Instant::now() < until {
            at = (at + 7 * 4096) % OBJECT;
            disk.write(&[at as u8 | 1; 4096], index * OBJECT + at)
                .await
                .expect("write");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stored(disk: &Disk, index: u64) -> bool {
        disk.store
            .head(&data_key(&disk.prefix, index))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_object_still_written_is_stored_once_quiet_or_when_room_is_wanted() {
        // Four objects of cache: two may be dirty.
        let (disk, dirtied) = disk_with_cache(Duration::ZERO, 4 * OBJECT);
        tokio::spawn(Arc::clone(&disk).upload_in_background(dirtied));
        // Rewritten for longer than the old one-second bound: no PUT yet.
        write_hot(&disk, 0, Duration::from_millis(1300)).await;
        assert!(
            !stored(&disk, 0).await,
            "a hot object was stored while written"
        );
        // Quiet for a quarter of its busy time: stored without a FLUSH.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while disk.is_dirty(0).await || !stored(&disk, 0).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a quiet object stayed dirty"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The cache holds two dirty objects: with both hot, a writer into
        // a third waits for room, and the hot ones are stored to make it.
        let hot = {
            let disk = Arc::clone(&disk);
            tokio::spawn(async move {
                tokio::join!(
                    write_hot(&disk, 1, Duration::from_secs(4)),
                    write_hot(&disk, 2, Duration::from_secs(4))
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = tokio::time::Instant::now();
        disk.write(&[9; 4096], 3 * OBJECT).await.expect("write");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a writer waited {:?} for room held by hot objects",
            started.elapsed()
        );
        hot.await.expect("hot writers");
    }

    #[tokio::test]
    async fn a_writer_given_up_while_waiting_for_room_is_no_longer_counted() {
        // Two objects of dirty room, both taken, nothing uploading them.
        let (disk, _dirtied) = disk_with_cache(Duration::ZERO, 4 * OBJECT);
        disk.write(&[1; 4096], 0).await.expect("write");
        disk.write(&[2; 4096], OBJECT).await.expect("write");
        let waiting = tokio::time::timeout(
            Duration::from_millis(50),
            disk.write(&[3; 4096], 2 * OBJECT),
        )
        .await;
        assert!(waiting.is_err(), "a write found room in a full cache");
        assert_eq!(disk.room_wanted.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn cached_reads_and_writes_are_done_in_place_as_the_slow_path_does() {
        let (disk, _dirtied) = disk(Duration::ZERO);
        let mut buffer = vec![0xff; 3 * OBJECT as usize];
        // Nothing stored, nothing cached: zeroes, in place.
        assert!(disk.read_cached(&mut buffer, 1000));
        assert!(buffer.iter().all(|&b| b == 0));
        let data: Vec<u8> = (0..OBJECT + 100).map(|i| (i % 251) as u8).collect();
        disk.write(&data, OBJECT - 50).await.expect("write");
        let mut fast = vec![0; data.len() + 100];
        assert!(disk.read_cached(&mut fast, OBJECT - 100));
        let mut slow = vec![0; fast.len()];
        disk.read(&mut slow, OBJECT - 100).await.expect("read");
        assert_eq!(fast, slow);
        assert_eq!(&fast[50..50 + data.len()], &data[..]);
        // Written (dirty, cached): a write into it is done in place.
        assert!(disk.write_cached(&[7; 100], OBJECT + 10));
        assert!(disk.read_cached(&mut fast[..100], OBJECT + 10));
        assert_eq!(&fast[..100], &[7; 100][..]);
        // Across two objects, or into one never written: the slow path.
        assert!(!disk.write_cached(&[7; 100], 2 * OBJECT - 50));
        assert!(!disk.write_cached(&[7; 100], 3 * OBJECT));
        // An object in the store but not in the cache needs the slow path.
        disk.existence[3].store(true, Ordering::Release);
        assert!(!disk.read_cached(&mut buffer[..10], 3 * OBJECT));
    }
}
