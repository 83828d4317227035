//! Polling a connection's socket for a short while before its thread
//! sleeps, when the client is sending one request at a time.
//!
//! At queue depth 1 the next request comes a few microseconds after the
//! reply. A thread that went to sleep meanwhile has to be woken for it,
//! and on an idle virtual machine waking a thread on another CPU costs
//! about as much as serving the request several times over
//! (docs/BENCHMARKS.md, "QD1 without a wake-up"). Polling keeps the thread
//! awake through that gap; the window adapts, so a client that pauses
//! costs a few short polls and then none.
//!
//! Only a client that waits for each reply is polled for; one that keeps
//! several requests in flight is served better by sleeping. Polling holds
//! the I/O thread, so only a connection alone on its thread polls: the
//! others on a shared thread would wait for it.

use std::time::{Duration, Instant};

/// Default longest poll in microseconds (`--poll-window`): the next
/// request at queue depth 1 came 15 to 30 µs after the reply on this
/// project's machines, 50 to 60 µs when the thread had to be woken.
pub const DEFAULT_POLL_WINDOW_MICROS: u64 = 100;

/// A window shorter than this is not worth a poll: it stops.
const SHORTEST_POLL: Duration = Duration::from_micros(5);

/// Requests a client must have sent strictly one at a time before the
/// window is used. A client that keeps several in flight is better
/// served by sleeping: its requests gather meanwhile and are read, served
/// and answered together, where polling would take them one by one at a
/// higher cost each (measured at queue depth 32: 5.9 µs of server CPU per
/// request polling, 4.2 sleeping).
const ONE_AT_A_TIME_BEFORE_POLLING: u32 = 32;

/// Requests that follow one another closer than this, on average, come
/// from a client that does not wait for each reply (it sends as it
/// likes; queue depth 32 here: about 6 µs apart), not from one waiting
/// for each reply (15 µs and more when it runs on another CPU): those are
/// not polled for either, for the reason above.
const SHORTEST_TURNAROUND: Duration = Duration::from_micros(10);

/// Waits a closed window lets pass before it polls once more, fully, to
/// see whether the client is quick again. A wait measured without polling
/// includes waking the thread, which on a virtual machine can itself take
/// longer than the window: a closed window would otherwise never see a
/// quick client again (a few slow replies in a row closed it for good).
const PROBE_AFTER_CLOSED_WAITS: u32 = 64;

/// Bytes of read data a client is taken to copy out of its socket per
/// microsecond (4 GiB/s; 1 MiB took 120 to 150 µs on this project's
/// machines). At queue depth 1 the next request cannot come before the
/// client has read the reply: a reply sent from the page cache leaves
/// the server at once, and its whole copy lies ahead of the client.
const CLIENT_COPY_BYTES_PER_MICRO: u64 = 4096;

/// One connection's poll window.
pub(super) struct PollWindow {
    /// The longest poll.
    longest: Duration,
    /// The next poll's length, adapted to how soon requests came.
    current: Duration,
    /// Requests in a row the client sent with none other in flight.
    one_at_a_time: u32,
    /// Moving average of the waits for the next request (weight 1/8).
    recent_wait: Duration,
    /// What the next wait may take longer than the window, for the
    /// client to copy the data of the reply before it.
    copying: Duration,
    /// Waits since the window closed (or since its last probe).
    closed_waits: u32,
}

impl PollWindow {
    /// A window of at most `longest`; `None` when `longest` is zero
    /// (polling off). Only a connection alone on its I/O thread polls
    /// (the caller asks [`ThreadShare::alone`](super::io_threads::ThreadShare::alone)).
    pub(super) fn new(longest: Duration) -> Option<Self> {
        (!longest.is_zero()).then_some(Self {
            longest,
            current: longest,
            one_at_a_time: 0,
            recent_wait: Duration::ZERO,
            copying: Duration::ZERO,
            closed_waits: 0,
        })
    }

    /// Notes how many requests the client has in flight: two or more
    /// mean it does not wait for each reply, and polling stops until it
    /// sends one at a time again.
    pub(super) fn in_flight(&mut self, requests: usize) {
        if requests > 1 {
            self.one_at_a_time = 0;
        }
    }

    /// Notes a request that waited on storage (a `fdatasync`, a read of
    /// the disk, an object store): the client waits for storage
    /// more than for the server, and polling stops until 32 requests in a
    /// row are served without it. On a disk file, polling between FUA
    /// writes took them from 5.7k to 4.4k a second.
    pub(super) fn waited_on_storage(&mut self) {
        self.one_at_a_time = 0;
    }

    /// Notes the bytes of read data in the replies just sent: the next
    /// poll is longer by the time the client takes to copy them.
    pub(super) fn replied(&mut self, data_bytes: usize) {
        self.copying = Duration::from_micros(data_bytes as u64 / CLIENT_COPY_BYTES_PER_MICRO);
    }

    /// Tries `read` (which must not wait) until it gives something or the
    /// window has passed; a closed window (unless due to probe), or a
    /// client not sending one request at a time, tries once. Yields the
    /// CPU between tries, so a client on the same CPU goes on.
    pub(super) fn poll<T>(&self, mut read: impl FnMut() -> Option<T>) -> Option<T> {
        let window = if !self.current.is_zero() {
            self.current
        } else if self.closed_waits >= PROBE_AFTER_CLOSED_WAITS {
            self.longest
        } else {
            Duration::ZERO
        };
        let polling = self.one_at_a_time >= ONE_AT_A_TIME_BEFORE_POLLING
            && self.recent_wait >= SHORTEST_TURNAROUND
            && !window.is_zero();
        if !polling {
            // One try, without reading the clock: the path of every
            // request at queue depth 32.
            return read();
        }
        let window = window + self.copying;
        let began = Instant::now();
        loop {
            if let Some(got) = read() {
                return Some(got);
            }
            if began.elapsed() >= window {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Adapts the window to how long the connection waited for its next
    /// request (from the moment it was idle): input within the longest
    /// window opens it fully; a longer wait halves it, and it closes once
    /// too short to matter (a client that paused costs a few polls, and
    /// a probe every 64 waits after that).
    pub(super) fn waited(&mut self, waited: Duration) {
        self.one_at_a_time = self.one_at_a_time.saturating_add(1);
        self.recent_wait = (self.recent_wait * 7 + waited) / 8;
        self.current = if waited <= self.longest + self.copying {
            self.longest
        } else if self.current / 2 < SHORTEST_POLL {
            Duration::ZERO
        } else {
            self.current / 2
        };
        // Counted while closed; a probe that missed starts again.
        self.closed_waits =
            if self.current.is_zero() && self.closed_waits < PROBE_AFTER_CLOSED_WAITS {
                self.closed_waits + 1
            } else {
                0
            };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A window whose client has sent requests one at a time, each 20 µs
    /// after the reply before it.
    fn window(longest_micros: u64) -> PollWindow {
        let mut window = PollWindow::new(Duration::from_micros(longest_micros)).expect("a window");
        for _ in 0..ONE_AT_A_TIME_BEFORE_POLLING {
            window.waited(Duration::from_micros(20));
        }
        window
    }

    /// How many times `window` tries a read that never gives anything.
    fn tries(window: &PollWindow) -> usize {
        let mut tries = 0;
        assert!(
            window
                .poll(|| {
                    tries += 1;
                    None::<()>
                })
                .is_none()
        );
        tries
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

    const MIB_OF_DATA: usize = 1 << 20;

    #[test]
    fn zero_turns_polling_off() {
        assert!(PollWindow::new(Duration::ZERO).is_none());
    }

    #[test]
    fn a_pausing_client_closes_the_window_and_a_quick_one_reopens_it() {
        let mut polling = window(100);
        let pause = Duration::from_millis(5);
        let mut polls = 0;
        while !polling.current.is_zero() {
            polls += 1;
            polling.waited(pause);
        }
        // 100, 50, 25, 12.5, 6.25 µs: five polls wasted, then none.
        assert_eq!(polls, 5);
        assert_eq!(tries(&polling), 1, "a closed window tries once");
        polling.waited(Duration::from_micros(60));
        assert_eq!(polling.current, Duration::from_micros(100));
    }

    #[test]
    fn a_closed_window_probes_now_and_then() {
        let mut polling = window(100);
        let pause = Duration::from_millis(5);
        while !polling.current.is_zero() {
            polling.waited(pause);
        }
        for round in 0..2 {
            // The wait that closed the window counts as the first.
            for _ in polling.closed_waits..PROBE_AFTER_CLOSED_WAITS {
                assert_eq!(tries(&polling), 1, "round {round}: closed, not yet probing");
                polling.waited(pause);
            }
            assert!(tries(&polling) > 1, "round {round}: a probe polls");
            // Missed: closed again, counting anew.
            polling.waited(pause);
            assert!(polling.current.is_zero());
            assert_eq!(tries(&polling), 1);
        }
        for _ in 0..PROBE_AFTER_CLOSED_WAITS {
            polling.waited(pause);
        }
        // Input within the probe reopens the window.
        polling.waited(Duration::from_micros(30));
        assert_eq!(polling.current, Duration::from_micros(100));
    }

    #[test]
    fn a_reply_with_data_lengthens_the_next_poll() {
        let mut polling = window(100);
        polling.replied(MIB_OF_DATA);
        let began = Instant::now();
        assert!(polling.poll(|| None::<()>).is_none());
        assert!(began.elapsed() >= Duration::from_micros(356));
        // The client took 300 µs to copy the MiB and ask again: quick.
        polling.waited(Duration::from_micros(300));
        assert_eq!(polling.current, Duration::from_micros(100));
        polling.replied(0);
        polling.waited(Duration::from_micros(300));
        assert_eq!(
            polling.current,
            Duration::from_micros(50),
            "without data, slow"
        );
    }

    #[test]
    fn a_client_keeping_several_requests_in_flight_is_not_polled_for() {
        let mut polling = window(1_000);
        assert!(tries(&polling) > 1);
        polling.in_flight(1);
        assert!(tries(&polling) > 1, "one in flight is one at a time");
        polling.in_flight(2);
        assert_eq!(tries(&polling), 1);
        for _ in 1..ONE_AT_A_TIME_BEFORE_POLLING {
            polling.waited(Duration::from_micros(20));
        }
        assert_eq!(tries(&polling), 1, "not yet one at a time for long enough");
        polling.waited(Duration::from_micros(20));
        assert!(tries(&polling) > 1);
    }

    #[test]
    fn a_client_waiting_on_storage_is_not_polled_for() {
        let mut polling = window(1_000);
        polling.waited_on_storage();
        assert_eq!(tries(&polling), 1);
        for _ in 0..ONE_AT_A_TIME_BEFORE_POLLING {
            polling.waited(Duration::from_micros(20));
        }
        assert!(tries(&polling) > 1);
    }

    #[test]
    fn requests_closer_together_than_a_turnaround_are_not_polled_for() {
        let mut polling = window(1_000);
        for _ in 0..32 {
            polling.waited(Duration::from_micros(4));
        }
        assert_eq!(tries(&polling), 1);
        for _ in 0..32 {
            polling.waited(Duration::from_micros(30));
        }
        assert!(tries(&polling) > 1);
    }

    #[test]
    fn a_poll_ends_with_input_or_with_its_window() {
        let (mut client, mut server) = UnixStream::pair().expect("a socket pair");
        server.set_nonblocking(true).expect("non-blocking");
        let polling = window(2_000);
        let began = Instant::now();
        assert_eq!(polling.poll(|| read_now(&mut server)), None);
        assert!(began.elapsed() >= Duration::from_millis(2));

        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(300));
            client.write_all(b"x").expect("write");
            client
        });
        let long = window(5_000_000);
        assert_eq!(long.poll(|| read_now(&mut server)), Some(b"x".to_vec()));
        drop(sender.join().expect("sender"));
        // The client's close is input too (end of stream).
        assert_eq!(long.poll(|| read_now(&mut server)), Some(Vec::new()));
    }
}
