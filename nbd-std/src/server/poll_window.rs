//! Polling a connection's socket for a short while before its thread
//! sleeps, when the client is sending one request at a time.
//!
//! At queue depth 1 the next request comes a few microseconds after the
//! reply. A thread that went to sleep meanwhile has to be woken for it,
//! and on an idle virtual machine waking a thread on another CPU costs
//! about as much as serving the request several times over
//! (docs/BENCHMARKS.md, "Where QD1 time went"). Polling keeps the thread
//! awake through that gap; the window adapts, so a client that pauses
//! costs a few short polls and then none.
//!
//! Polling holds the I/O thread, so only a connection alone on its thread
//! polls: the others on a shared thread would wait for it.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Default longest poll in microseconds (`--poll-window`): the next
/// request at queue depth 1 came 15 to 30 µs after the reply on this
/// project's machines, 50 to 60 µs when the thread had to be woken.
pub const DEFAULT_POLL_WINDOW_MICROS: u64 = 100;

/// A window shorter than this is not worth a poll: it stops.
const SHORTEST_POLL: Duration = Duration::from_micros(5);

/// A stream whose socket may be read directly, without waiting and
/// without a trip through the event loop (which only sees readiness).
pub(super) trait SocketInput {
    /// The socket; `None` when input must go through the stream.
    fn input_fd(&self) -> Option<BorrowedFd<'_>>;
}

impl SocketInput for tokio::net::TcpStream {
    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl SocketInput for tokio::net::UnixStream {
    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

#[cfg(feature = "tls")]
impl<S> SocketInput for tokio_rustls::server::TlsStream<S> {
    /// The socket carries records for the TLS session to decrypt.
    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// One connection's poll window.
pub(super) struct PollWindow {
    /// The longest poll.
    longest: Duration,
    /// The next poll's length, adapted to how soon requests came.
    current: Duration,
    /// Connections on this connection's I/O thread.
    thread_connections: Arc<AtomicUsize>,
}

impl PollWindow {
    /// A window of at most `longest` for a connection on the I/O thread
    /// whose connection count is `thread_connections`; `None` when
    /// `longest` is zero (polling off).
    pub(super) fn new(longest: Duration, thread_connections: Arc<AtomicUsize>) -> Option<Self> {
        (!longest.is_zero()).then_some(Self {
            longest,
            current: longest,
            thread_connections,
        })
    }

    /// Whether the connection is alone on its thread, so may poll (and
    /// its waits count for the window).
    pub(super) fn alone(&self) -> bool {
        self.thread_connections.load(Ordering::Relaxed) == 1
    }

    /// Tries `read` (which must not wait) until it gives something or the
    /// window has passed; a closed window tries once. Yields the CPU
    /// between tries, so a client on the same CPU goes on.
    pub(super) fn poll<T>(&self, mut read: impl FnMut() -> Option<T>) -> Option<T> {
        let began = Instant::now();
        loop {
            if let Some(got) = read() {
                return Some(got);
            }
            if began.elapsed() >= self.current {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Adapts the window to how long the connection waited for its next
    /// request (from the moment it was idle): input within the longest
    /// window opens it fully; a longer wait halves it, and it closes once
    /// too short to matter (a client that paused costs a few polls).
    pub(super) fn waited(&mut self, waited: Duration) {
        self.current = if waited <= self.longest {
            self.longest
        } else if self.current / 2 < SHORTEST_POLL {
            Duration::ZERO
        } else {
            self.current / 2
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn window(longest_micros: u64, connections: usize) -> PollWindow {
        PollWindow::new(
            Duration::from_micros(longest_micros),
            Arc::new(AtomicUsize::new(connections)),
        )
        .expect("a window")
    }

    /// One read that does not wait: the bytes, or `None` for none yet.
    fn read_now(socket: &mut UnixStream) -> Option<Vec<u8>> {
        let mut buf = [0u8; 16];
        match socket.read(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(error) => panic!("read: {error}"),
        }
    }

    #[test]
    fn zero_turns_polling_off() {
        assert!(PollWindow::new(Duration::ZERO, Arc::new(AtomicUsize::new(1))).is_none());
    }

    #[test]
    fn only_a_connection_alone_on_its_thread_polls() {
        assert!(window(100, 1).alone());
        assert!(!window(100, 2).alone());
    }

    #[test]
    fn a_pausing_client_closes_the_window_and_a_quick_one_reopens_it() {
        let mut polling = window(100, 1);
        let pause = Duration::from_millis(5);
        let mut polls = 0;
        while !polling.current.is_zero() {
            polls += 1;
            polling.waited(pause);
        }
        // 100, 50, 25, 12.5, 6.25 µs: five polls wasted, then none.
        assert_eq!(polls, 5);
        let mut tries = 0;
        assert_eq!(
            polling.poll(|| {
                tries += 1;
                None::<()>
            }),
            None
        );
        assert_eq!(tries, 1, "a closed window tries once");
        polling.waited(Duration::from_micros(60));
        assert_eq!(polling.current, Duration::from_micros(100));
    }

    #[test]
    fn a_poll_ends_with_input_or_with_its_window() {
        let (mut client, mut server) = UnixStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("non-blocking");
        let polling = window(2_000, 1);
        let began = Instant::now();
        assert_eq!(polling.poll(|| read_now(&mut server)), None);
        assert!(began.elapsed() >= Duration::from_millis(2));

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(300));
            client.write_all(b"x").expect("write");
            client
        });
        let long = window(5_000_000, 1);
        assert_eq!(long.poll(|| read_now(&mut server)), Some(b"x".to_vec()));
        drop(sender.join().expect("sender"));
        // The client's close is input too (end of stream).
        assert_eq!(long.poll(|| read_now(&mut server)), Some(Vec::new()));
    }
}
