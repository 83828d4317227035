//! Reads that must wait for a disk, through an `io_uring` of the I/O
//! thread's own.
//!
//! A read the page cache cannot answer now (`RWF_NOWAIT` refused it)
//! went to the blocking pool: a wake-up of a pool thread, which then
//! slept in `pread`, and another wake-up back to the connection's
//! thread. At QD32 on a cold file that cost about 9 µs of server CPU a
//! read more than nbdkit, whose thread reads the request, the file and
//! sends the reply itself (docs/BENCHMARKS.md, "Cold reads"). Through
//! the ring the kernel starts the read and finishes it on this thread
//! (buffered reads wait on the page, not in a worker), and the
//! completion wakes the thread's event loop through an `eventfd`: no
//! thread of the server's own sleeps for it.
//!
//! One ring per I/O thread, for the connections on it; without one
//! (`io_uring` refused by the kernel or a sandbox, or no I/O threads)
//! such reads go to the pool as before.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};

use io_uring::{IoUring, opcode, types};
use nbd_core::server::RequestId;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::warn;

use super::storage::{Done, Job};
use crate::backend::Backend;

/// Submission queue entries; the kernel keeps completions beyond its
/// completion queue (twice this) rather than drop them.
const ENTRIES: u32 = 256;

/// A read handed to the kernel, kept until it completes: the kernel
/// writes into `buffer`, and `backend` keeps the file open.
struct InFlight {
    id: RequestId,
    offset: u64,
    length: usize,
    /// `buffer.len()` when the read was handed over: its data goes after.
    start: usize,
    buffer: Vec<u8>,
    backend: Arc<dyn Backend>,
    done: mpsc::UnboundedSender<Done>,
}

impl InFlight {
    /// Bytes still to read.
    fn left(&self) -> usize {
        self.length - (self.buffer.len() - self.start)
    }

    fn finish(mut self, result: io::Result<()>) {
        if result.is_err() {
            self.buffer.truncate(self.start);
        }
        // The receiver is gone only when the connection ended.
        let _ = self.done.send(Done::Read {
            id: self.id,
            length: self.length,
            buffer: self.buffer,
            result,
        });
    }
}

struct Ring {
    uring: IoUring,
    /// Reads in flight, by the slot their completion names.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Takes reads (until its completions can no longer be collected).
    usable: bool,
    /// Completions taken off the queue, kept for the next collection.
    completed: Vec<(u64, i32)>,
    /// The `eventfd` the kernel signals completions on; signalled by the
    /// ring itself to try a refused submission again.
    wake: Arc<OwnedFd>,
    /// The last submission was refused (said once until one succeeds).
    refused: bool,
}

/// An I/O thread's ring, shared by its connections (a clone each).
#[derive(Clone)]
pub(super) struct ReadRing {
    ring: Arc<Mutex<Ring>>,
}

impl ReadRing {
    /// A ring whose completions are collected by a task on `runtime`;
    /// `None` where the kernel (or a sandbox) refuses `io_uring`.
    pub(super) fn start(runtime: &Handle) -> Option<Self> {
        match Self::try_start(runtime) {
            Ok(ring) => Some(ring),
            Err(error) => {
                // Once, not once for each I/O thread.
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    warn!(
                        "reads that wait for a disk go to the blocking pool: no io_uring ({error})"
                    );
                });
                None
            }
        }
    }

    fn try_start(runtime: &Handle) -> io::Result<Self> {
        let uring = IoUring::new(ENTRIES)?;
        let completed = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        uring.submitter().register_eventfd(completed.as_raw_fd())?;
        let ring = Self {
            ring: Arc::new(Mutex::new(Ring {
                uring,
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                usable: true,
                completed: Vec::new(),
                wake: Arc::clone(&completed),
                refused: false,
            })),
        };
        let collector = ring.clone();
        runtime.spawn(async move {
            if let Err(error) = collector.wait_for_completions(completed).await {
                warn!("io_uring completions can no longer be waited for, reads go to the pool: {error}");
                collector.lock().wait_for_all();
            }
        });
        Ok(ring)
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the slots consistent:
        // each change to them is a single step.
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `job`, a read, to the kernel; its outcome comes through
    /// `done`. The job comes back when this ring cannot take it (not a
    /// read, not of a file, too long for one request, the queue is full
    /// even after submitting, or completions can no longer be collected).
    pub(super) fn read(
        &self,
        backend: Arc<dyn Backend>,
        job: Job,
        done: &mpsc::UnboundedSender<Done>,
    ) -> Result<(), Job> {
        let Job::Read {
            id,
            offset,
            length,
            mut buffer,
        } = job
        else {
            return Err(job);
        };
        if buffer.len().checked_add(length).is_none() {
            return Err(Job::Read {
                id,
                offset,
                length,
                buffer,
            });
        }
        // Whether the backend has a file and the length fits one request
        // is `hand_over`'s to tell.
        buffer.reserve_exact(length);
        let read = InFlight {
            id,
            offset,
            length,
            start: buffer.len(),
            buffer,
            backend,
            done: done.clone(),
        };
        let mut ring = self.lock();
        let handed_over = if ring.usable {
            ring.hand_over(read)
        } else {
            Err(read)
        };
        match handed_over {
            Ok(()) => {
                ring.submit();
                Ok(())
            }
            Err(read) => Err(Job::Read {
                id: read.id,
                offset: read.offset,
                length: read.length,
                buffer: read.buffer,
            }),
        }
    }

    /// Waits for completions (the kernel signals `completed`) and
    /// answers them, for as long as the runtime runs.
    async fn wait_for_completions(&self, completed: Arc<OwnedFd>) -> io::Result<()> {
        // SAFETY: the `OwnedFd` (in an `Arc`, the ring holds another
        // handle) keeps its descriptor open, and the same one, for as long
        // as the `AsyncFd` owns it.
        #[allow(unsafe_code)]
        let completed = unsafe { AsyncFd::register_with_interest(completed, Interest::READABLE) }
            .map_err(|refused| refused.into_parts().1)?;
        loop {
            let mut ready = completed.readable().await?;
            // Reset the count before collecting: a completion posted
            // after this read signals again.
            match ready.try_io(|fd| {
                let mut count = [0u8; 8];
                rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => continue,
            }
            self.lock().answer_completed();
        }
    }
}

impl Ring {
    /// Queues `read` for its next (or first) part; gives it back if
    /// the submission queue stays full.
    fn hand_over(&mut self, mut read: InFlight) -> Result<(), InFlight> {
        let Some(fd) = read.backend.page_cache_file().map(|fd| fd.as_raw_fd()) else {
            return Err(read);
        };
        let done = read.buffer.len() - read.start;
        let left = read.left();
        let (Ok(len), Some(at)) = (u32::try_from(left), read.offset.checked_add(done as u64))
        else {
            return Err(read);
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let room = read.buffer.spare_capacity_mut()[..left]
            .as_mut_ptr()
            .cast::<u8>();
        let entry = opcode::Read::new(types::Fd(fd), room, len)
            .offset(at)
            .build()
            .user_data(slot as u64);
        // SAFETY: the entry points into `read.buffer`'s spare capacity
        // (`left` bytes reserved past its length) and at the backend's
        // file; both are kept in `slots` until the kernel says it is done
        // with them (`answer_completed`, or `wait_for_all`).
        #[allow(unsafe_code)]
        let queued = unsafe {
            let mut queue = self.uring.submission();
            queue.push(&entry).is_ok() || {
                drop(queue);
                self.submit();
                self.uring.submission().push(&entry).is_ok()
            }
        };
        if !queued {
            self.free.push(slot);
            return Err(read);
        }
        self.slots[slot] = Some(read);
        self.in_flight += 1;
        Ok(())
    }

    /// Submits what is queued. A refusal (the kernel short of memory,
    /// or of room for completions) leaves it queued, and the event loop
    /// tries again at its next turn.
    fn submit(&mut self) {
        loop {
            match self.uring.submit() {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    if !self.refused {
                        warn!("io_uring submission refused, trying again: {error}");
                        self.refused = true;
                    }
                    // Wakes the collector, which answers what completed
                    // and submits again. A full count means a wake-up is
                    // already due.
                    let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
                    return;
                }
                Ok(_) => {
                    self.refused = false;
                    return;
                }
            }
        }
    }

    /// Answers every completed read, and queues the rest of a short one.
    fn answer_completed(&mut self) {
        let mut completed = std::mem::take(&mut self.completed);
        completed.extend(
            self.uring
                .completion()
                .map(|entry| (entry.user_data(), entry.result())),
        );
        for (slot, result) in completed.drain(..) {
            let Ok(slot) = usize::try_from(slot) else {
                continue;
            };
            let Some(read) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            let read = match Self::advance(read, result) {
                Ok(read) => read,
                Err((read, outcome)) => {
                    read.finish(outcome);
                    continue;
                }
            };
            if let Err(read) = self.hand_over(read) {
                read.finish(Err(io::Error::other(
                    "the rest of a short read could not be queued",
                )));
            }
        }
        self.completed = completed;
        self.submit();
    }

    /// Waits on this thread until every read in flight is answered (the
    /// ring is going, or its completions can no longer be waited for in
    /// the event loop); takes no new reads after.
    fn wait_for_all(&mut self) {
        self.usable = false;
        while self.in_flight > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => self.answer_completed(),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    warn!("cannot wait for reads in flight: {error}");
                    // Leak their buffers rather than free memory the
                    // kernel may still write.
                    for read in self.slots.drain(..).flatten() {
                        std::mem::forget(read.buffer);
                    }
                    self.in_flight = 0;
                }
            }
        }
    }

    /// What a completion means for `read`: more to read (the read
    /// again), or its outcome.
    fn advance(mut read: InFlight, result: i32) -> Result<InFlight, (InFlight, io::Result<()>)> {
        match usize::try_from(result) {
            Ok(0) => Err((read, Err(io::ErrorKind::UnexpectedEof.into()))),
            Ok(n) if n <= read.left() => {
                // SAFETY: the kernel wrote `n` bytes of the spare
                // capacity the entry pointed at.
                #[allow(unsafe_code)]
                unsafe {
                    read.buffer.set_len(read.buffer.len() + n);
                }
                if read.left() == 0 {
                    Err((read, Ok(())))
                } else {
                    Ok(read)
                }
            }
            Ok(_) => Err((
                read,
                Err(io::Error::other("the kernel read more than asked")),
            )),
            Err(_) => {
                let error = io::Error::from_raw_os_error(-result);
                match error.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => Ok(read),
                    _ => Err((read, Err(error))),
                }
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers in flight.
        self.wait_for_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FileBackend;
    use crate::backend::test_support::pattern;
    use std::time::Duration;

    /// A current-thread runtime, a ring on it, and a file of `data`.
    fn setup(
        data: &[u8],
    ) -> (
        tokio::runtime::Runtime,
        ReadRing,
        Arc<dyn Backend>,
        tempfile::TempDir,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let ring = ReadRing::start(runtime.handle()).expect("io_uring on this kernel");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, data).expect("write the file");
        // Out of the page cache (where the filesystem lets it go), so the
        // reads wait for the disk in the kernel rather than finish when
        // submitted.
        let file = std::fs::File::open(&path).expect("open the file");
        file.sync_all().expect("write the file back");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("evict the file");
        let backend: Arc<dyn Backend> =
            Arc::new(FileBackend::open(&path, true).expect("open the file"));
        (runtime, ring, backend, dir)
    }

    fn read_job(index: u32, offset: u64, length: usize, buffer: Vec<u8>) -> Job {
        Job::Read {
            id: RequestId::from_bits(index),
            offset,
            length,
            buffer,
        }
    }

    async fn next(
        done: &mut mpsc::UnboundedReceiver<Done>,
    ) -> (RequestId, Vec<u8>, io::Result<()>) {
        match tokio::time::timeout(Duration::from_secs(10), done.recv()).await {
            Ok(Some(Done::Read {
                id, buffer, result, ..
            })) => (id, buffer, result),
            other => panic!("expected a read's outcome, got {other:?}"),
        }
    }

    #[test]
    fn reads_in_flight_together_each_get_their_own_bytes() {
        let data = pattern(1 << 20, 7);
        let (runtime, ring, backend, _dir) = setup(&data);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        runtime.block_on(async {
            for index in 0..64u32 {
                let offset = u64::from(index) * 12_288 + 512;
                let job = read_job(index, offset, 8_192, Vec::new());
                assert!(ring.read(Arc::clone(&backend), job, &done_tx).is_ok());
            }
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..64 {
                let (id, buffer, result) = next(&mut done_rx).await;
                result.expect("the read succeeds");
                let index = id.to_bits();
                let offset = index as usize * 12_288 + 512;
                assert_eq!(buffer, &data[offset..offset + 8_192], "read {index}");
                assert!(seen.insert(index));
            }
        });
        assert_eq!(ring.lock().in_flight, 0);
    }

    #[test]
    fn data_goes_after_what_the_buffer_held() {
        let data = pattern(64 * 1024, 3);
        let (runtime, ring, backend, _dir) = setup(&data);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        runtime.block_on(async {
            let job = read_job(1, 4096, 4096, b"head".to_vec());
            assert!(ring.read(Arc::clone(&backend), job, &done_tx).is_ok());
            let (_, buffer, result) = next(&mut done_rx).await;
            result.expect("the read succeeds");
            assert_eq!(&buffer[..4], b"head");
            assert_eq!(&buffer[4..], &data[4096..8192]);
        });
    }

    #[test]
    fn a_read_past_the_end_is_an_error_and_leaves_the_buffer_as_it_was() {
        let data = pattern(10_000, 5);
        let (runtime, ring, backend, _dir) = setup(&data);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        runtime.block_on(async {
            // 1,808 bytes are there, then the end of the file: the first
            // part is read, the next finds nothing.
            let job = read_job(1, 8192, 4096, b"kept".to_vec());
            assert!(ring.read(Arc::clone(&backend), job, &done_tx).is_ok());
            let (_, buffer, result) = next(&mut done_rx).await;
            let error = result.expect_err("past the end");
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
            assert_eq!(buffer, b"kept");
        });
    }

    #[test]
    fn what_is_not_a_read_of_a_file_comes_back() {
        let (_runtime, ring, backend, _dir) = setup(&[0; 4096]);
        let (done_tx, _done_rx) = mpsc::unbounded_channel();
        let flush = Job::Flush {
            id: RequestId::from_bits(1),
        };
        assert!(matches!(
            ring.read(Arc::clone(&backend), flush, &done_tx),
            Err(Job::Flush { .. })
        ));
        let memory: Arc<dyn Backend> = Arc::new(crate::backend::MemoryBackend::new(4096));
        let job = read_job(2, 0, 4096, Vec::new());
        assert!(matches!(
            ring.read(memory, job, &done_tx),
            Err(Job::Read { .. })
        ));
    }

    #[test]
    fn dropping_the_ring_waits_for_reads_in_flight() {
        let data = pattern(4 << 20, 9);
        let (runtime, ring, backend, _dir) = setup(&data);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        for index in 0..16u32 {
            let job = read_job(index, u64::from(index) << 18, 1 << 18, Vec::new());
            assert!(ring.read(Arc::clone(&backend), job, &done_tx).is_ok());
        }
        // The runtime never ran the collector: dropping it and the last
        // handle on the ring must wait for the kernel and answer each read.
        drop(runtime);
        drop(ring);
        let mut answered = 0;
        while let Ok(Done::Read {
            id, buffer, result, ..
        }) = done_rx.try_recv()
        {
            result.expect("the read succeeds");
            let offset = (id.to_bits() as usize) << 18;
            assert_eq!(buffer, &data[offset..offset + (1 << 18)]);
            answered += 1;
        }
        assert_eq!(answered, 16);
    }
}
