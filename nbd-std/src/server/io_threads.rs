//! Threads that run connections: each a single-threaded runtime with its
//! own event loop, a connection placed on the one serving the fewest.
//!
//! A connection's work then never changes threads: the thread woken by
//! the socket reads the request, serves it (fast storage, and file I/O
//! that cannot wait for a device, inline) and writes the reply. Each hop
//! to another thread is a wake-up that costs more than a small request
//! itself at queue depth 1 (docs/BENCHMARKS.md, "Where QD1 time went").

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::warn;

use super::read_ring::ReadRing;

/// One thread's runtime and how many connections it holds.
struct IoThread {
    handle: Handle,
    connections: Arc<AtomicUsize>,
    read_ring: Option<ReadRing>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The running threads; stopped (after their connections ended) by
/// [`IoThreads::stop`].
pub(super) struct IoThreads {
    threads: Vec<IoThread>,
}

/// A connection's place on a thread, given back when dropped.
pub(super) struct Placement {
    connections: Arc<AtomicUsize>,
    read_ring: Option<ReadRing>,
}

impl Placement {
    /// What the connection sees of the others on its thread.
    pub(super) fn share(&self) -> ThreadShare {
        ThreadShare(Arc::clone(&self.connections))
    }

    /// The thread's ring for reads that wait for a disk, if it has one.
    pub(super) fn read_ring(&self) -> Option<ReadRing> {
        self.read_ring.clone()
    }
}

/// How many connections share a connection's I/O thread, this one
/// included: work that holds the thread (polling, a `fdatasync`) is done
/// there only by a connection alone on it, as no other would wait.
#[derive(Clone, Debug)]
pub(super) struct ThreadShare(Arc<AtomicUsize>);

impl ThreadShare {
    pub(super) fn alone(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 1
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IoThreads {
    /// Starts `count` threads (at least one), each with a ring for reads
    /// that wait for a disk when `read_rings`.
    pub(super) fn start(count: usize, read_rings: bool) -> io::Result<Self> {
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let read_ring = read_rings.then(|| ReadRing::start(&handle)).flatten();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("nbd-io-{index}"))
                .spawn(move || {
                    // Runs the connections spawned onto it until told to
                    // stop (or the server is gone).
                    let _ = runtime.block_on(stopped);
                })?;
            threads.push(IoThread {
                handle,
                connections: Arc::new(AtomicUsize::new(0)),
                read_ring,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self { threads })
    }

    /// The runtime of the thread with the fewest connections, and the
    /// place taken there (hold it as long as the connection lives).
    pub(super) fn place(&self) -> Option<(&Handle, Placement)> {
        let least = self
            .threads
            .iter()
            .min_by_key(|t| t.connections.load(Ordering::Relaxed))?;
        least.connections.fetch_add(1, Ordering::Relaxed);
        Some((
            &least.handle,
            Placement {
                connections: Arc::clone(&least.connections),
                read_ring: least.read_ring.clone(),
            },
        ))
    }

    /// Stops every thread and waits for it (its blocking pool included).
    pub(super) async fn stop(mut self) {
        for thread in &mut self.threads {
            if let Some(stop) = thread.stop.take() {
                let _ = stop.send(());
            }
        }
        let joins: Vec<JoinHandle<()>> = self
            .threads
            .iter_mut()
            .filter_map(|t| t.thread.take())
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            joins
                .into_iter()
                .map(JoinHandle::join)
                .filter(Result::is_err)
                .count()
        })
        .await;
        if !matches!(joined, Ok(0)) {
            warn!("an I/O thread ended with a panic");
        }
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        // Not stopped through `stop` (the server's future was dropped):
        // let the threads end on their own.
        for thread in &mut self.threads {
            if let Some(stop) = thread.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_thread_holding_fewest() {
        let threads = IoThreads::start(2, false).expect("start the threads");
        let (_, first) = threads.place().expect("a thread");
        let (_, second) = threads.place().expect("a thread");
        assert!(!Arc::ptr_eq(&first.connections, &second.connections));
        let freed = Arc::clone(&first.connections);
        drop(first);
        assert_eq!(freed.load(Ordering::Relaxed), 0);
        let (_, third) = threads.place().expect("a thread");
        assert!(Arc::ptr_eq(&third.connections, &freed));
        assert_eq!(second.connections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_connection_is_alone_until_another_shares_its_thread() {
        let threads = IoThreads::start(1, false).expect("start the thread");
        let (_, first) = threads.place().expect("a thread");
        assert!(first.share().alone());
        let (_, second) = threads.place().expect("a thread");
        assert!(!first.share().alone());
        drop(second);
        assert!(first.share().alone());
    }
}
