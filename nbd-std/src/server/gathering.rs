//! Waiting, with replies ready, for requests the client has not sent yet.
//!
//! A client keeping many requests in flight (fio at queue depth 32)
//! sends each request as it takes each reply. The server, quicker than
//! the client, found about two requests each time it read its socket,
//! and answered them in one `writev` of about 5 µs on loopback, most of
//! it per call, not per byte (the segment's delivery to the client). When
//! the held replies also wait a few microseconds for more requests (the
//! thread sleeps in `poll(2)` on the socket), about ten go out together:
//! server CPU per 4 KiB read at queue depth 32 fell from 4.8 to 4.0 µs
//! and the client's requests a second rose from 195k to 240k
//! (docs/BENCHMARKS.md).
//!
//! A client with fewer requests in flight idles while the server waits,
//! though: at queue depth 8 the same waits took reads from 131k to 47k
//! to 72k a second. The server sees neither the client's queue depth nor
//! how busy it is, so the connection measures instead: it serves
//! [`TRIAL_REPLIES`] replies with waits and as many without, keeps
//! waiting only if that served them quicker for hardly more of the
//! thread's CPU, or for less of it hardly slower
//! ([`WAITING_MAY_LOSE`]), and tries both again every
//! [`EPOCHS_BETWEEN_TRIALS`] epochs.
//!
//! Replies carrying read data wait with the thread, held, and go out
//! together after it; the others (to writes, say) go out before it, so
//! the client works through them meanwhile (the caller decides, and
//! says why: `Driver::sends_before_waiting`).
//!
//! A wait does not end at the first request that comes, though: it asks
//! for the bytes of several requests (at the size of the client's latest
//! ones), and the thread sleeps until the socket holds them or the wait
//! ends (see [`socket::readable_within`]). Woken by each request, the
//! thread read about one at a time, and each such read made Linux
//! acknowledge it with a segment of its own (a read that empties the
//! socket after two small segments or one full one acknowledges at once;
//! a reply would have carried it): 0.3 to 0.5 bare acknowledgements and
//! 0.25 sleeps a request at queue depth 32. Woken by the batch, the
//! server spent 0.5 to 0.8 of the CPU a request at queue depths 16 and
//! 32 (docs/BENCHMARKS.md). How many requests: one more after a wait
//! they all came within, half as many after one they did not, and never
//! more than half of what the client may still send (the most it was
//! seen to keep in flight, less those in flight now): waiting for all of
//! it left a client keeping 8 in flight idle, up to 17 % of its rate
//! lost.
//!
//! Waiting holds the I/O thread, so only a connection alone on its thread
//! waits (the caller asks
//! [`ThreadShare::alone`](super::io_threads::ThreadShare::alone)).
//!
//! [`socket::readable_within`]: super::socket::readable_within

use std::time::{Duration, Instant};

use super::socket::Arrival;
use crate::average::EighthAverage;

/// Default longest wait in microseconds (`--gather-wait`). On the
/// project's virtual machines a sleeping thread woke 20 to 40 µs after
/// the request came, whatever the timeout: a longer one only adds to the
/// waits that find nothing. A wait that finds nothing ends up to 50 µs
/// later than asked (Linux's timer slack for a normal thread; 64 µs
/// measured for 10): keeping the thread's timers exact served QD32 reads
/// with more CPU, not less.
pub const DEFAULT_GATHER_WAIT_MICROS: u64 = 10;

/// Replies in one epoch of a trial: about 10 ms at 200k a second, enough
/// to even out one slow wake-up. Epochs of 1,024 replies (5 ms) measured
/// the same way of serving 4 KiB writes at queue depth 32 up to 10 %
/// apart in time a reply.
const TRIAL_REPLIES: u32 = 2048;

/// Epochs served the chosen way between two trials (about 320 ms at
/// 200k replies a second): a wrong choice lasts that long, and a trial's
/// epoch served the worse way costs a thirtieth of the time at most.
const EPOCHS_BETWEEN_TRIALS: u32 = 32;

/// How much better an epoch with waits must serve its replies, quicker
/// or cheaper in the thread's CPU per reply, to be chosen (and hardly
/// worse by the other measure, [`WAITING_MAY_LOSE`]): waiting is the
/// riskier way, so a tie goes to sending at once. Over a `null:` export
/// waits served 10 % more replies a second but cost 40 % more CPU each
/// (the thread's sleeps and wake-ups): not chosen. At queue depth 32 on a memory export reads were
/// 15 to 25 % quicker and 5 to 10 % cheaper; writes 3 to 7 % quicker and
/// 10 to 14 % cheaper (when the margin was asked of the time alone, a
/// quarter to a half of a write run's trials sent at once).
const WAITING_MUST_GAIN: f64 = 0.95;

/// How much worse by the other measure waits that gain may be: no more
/// than epochs served the same way differ. Asked to be no worse at all,
/// waits that sent write replies first (0.75 of the CPU a reply, as
/// quick within 1 %) were kept after a third of the trials.
const WAITING_MAY_LOSE: f64 = 1.03;

/// Most bytes a wait asks for: sixteen 4 KiB writes. Larger writes are
/// worth a wake-up a request or two.
const MOST_GATHERED_BYTES: usize = 64 << 10;

/// A pause between two transmissions longer than this is the client
/// stopping, not the way replies are sent: the epoch starts again rather
/// than count it.
const LONGEST_GAP: Duration = Duration::from_millis(1);

/// One connection's choice whether held replies wait for more requests.
#[derive(Debug)]
pub(super) struct Gathering {
    /// The longest wait.
    longest: Duration,
    /// Whether waits happen now.
    waiting: bool,
    /// The epoch being served, from its first replies on.
    epoch: Option<Epoch>,
    /// When the last replies were sent.
    last_replies: Option<Instant>,
    /// What the connection is doing with its epochs.
    phase: Phase,
    /// Requests in flight when a wait last found nothing: the client had
    /// probably sent all it would (its queue depth), and waiting with as
    /// many is futile.
    futile_at: usize,
    /// The most requests seen in flight since the trial began: the
    /// client's queue depth, as far as it showed it.
    deepest: usize,
    /// Requests a wait asks for, at most (see the module's comment).
    asked: usize,
    /// The bytes a request took on the wire lately (header and payload).
    request_bytes: EighthAverage,
}

/// How long held replies may wait for the client's next requests, and
/// for how many of their bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Wait {
    /// The longest the thread sleeps.
    pub(super) within: Duration,
    /// Bytes the socket should hold before the thread wakes; 1: any.
    pub(super) at_least: usize,
}

#[derive(Debug)]
struct Epoch {
    began: Instant,
    /// The thread's CPU time then.
    cpu_began: Duration,
    replies: u32,
}

/// What an epoch's replies cost each, on average.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cost {
    /// Time between replies.
    wall: Duration,
    /// The thread's CPU time.
    cpu: Duration,
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Comparing: the first epoch served one way, then one the other way.
    Trial { first: Option<(bool, Cost)> },
    /// Serving the chosen way; a trial after this many epochs.
    Settled { epochs_left: u32 },
}

impl Gathering {
    /// Waits of at most `longest`; `None` when `longest` is zero (never
    /// wait). A connection starts with a trial.
    pub(super) fn new(longest: Duration) -> Option<Self> {
        (!longest.is_zero()).then_some(Self {
            longest,
            waiting: false,
            epoch: None,
            last_replies: None,
            phase: Phase::Trial { first: None },
            futile_at: usize::MAX,
            deepest: 0,
            asked: 1,
            request_bytes: EighthAverage::empty(),
        })
    }

    /// Notes a request taken from the client, `wire_bytes` long, with
    /// `in_flight` in flight now (itself included).
    pub(super) fn took(&mut self, wire_bytes: usize, in_flight: usize) {
        self.deepest = self.deepest.max(in_flight);
        self.request_bytes
            .note(u64::try_from(wire_bytes).unwrap_or(u64::MAX));
    }

    /// Whether waits happen now (the last trial chose them).
    pub(super) fn waits(&self) -> bool {
        self.waiting
    }

    /// How long replies held for `held_for`, with `in_flight` requests
    /// in flight and none more in the socket, may wait for the next
    /// requests, and for how many bytes of them; `None`: send them now.
    pub(super) fn wait(&mut self, in_flight: usize, held_for: Duration) -> Option<Wait> {
        if in_flight > self.futile_at {
            // The client keeps more in flight than when a wait last
            // found nothing.
            self.futile_at = in_flight;
        }
        (self.waiting && in_flight < self.futile_at && held_for < self.longest).then(|| Wait {
            within: self.longest - held_for,
            at_least: ((self.deepest.saturating_sub(in_flight) / 2).min(self.asked))
                .saturating_mul(usize::try_from(self.request_bytes.value()).unwrap_or(usize::MAX))
                .clamp(1, MOST_GATHERED_BYTES),
        })
    }

    /// Notes what came within the wait.
    pub(super) fn waited(&mut self, arrival: Arrival, in_flight: usize) {
        match arrival {
            Arrival::Enough => self.asked = self.asked.saturating_add(1),
            Arrival::Fewer => self.asked = (self.asked / 2).max(1),
            Arrival::Nothing => {
                self.asked = (self.asked / 2).max(1);
                self.futile_at = in_flight;
            }
        }
    }

    /// Counts `replies` sent at `now`, ending an epoch after
    /// [`TRIAL_REPLIES`] of them. `thread_cpu` tells the thread's CPU
    /// time; it is asked when an epoch begins and ends only.
    pub(super) fn replied(
        &mut self,
        replies: usize,
        now: Instant,
        mut thread_cpu: impl FnMut() -> Duration,
    ) {
        let paused = self
            .last_replies
            .is_some_and(|last| now.duration_since(last) > LONGEST_GAP);
        self.last_replies = Some(now);
        if paused {
            self.epoch = None;
        }
        let epoch = self.epoch.get_or_insert_with(|| Epoch {
            began: now,
            cpu_began: thread_cpu(),
            replies: 0,
        });
        epoch.replies = epoch
            .replies
            .saturating_add(u32::try_from(replies).unwrap_or(u32::MAX));
        if epoch.replies < TRIAL_REPLIES {
            return;
        }
        // Per reply, so an epoch's last batch going past the count does
        // not tilt the comparison.
        let cost = Cost {
            wall: now.duration_since(epoch.began) / epoch.replies,
            cpu: thread_cpu().saturating_sub(epoch.cpu_began) / epoch.replies,
        };
        self.epoch = None;
        self.phase = match self.phase {
            Phase::Settled { epochs_left: 0 | 1 } => {
                // The next trial serves its first epoch the way chosen
                // last time, and may find the client's depth anew.
                self.futile_at = usize::MAX;
                self.deepest = 0;
                Phase::Trial { first: None }
            }
            Phase::Settled { epochs_left } => Phase::Settled {
                epochs_left: epochs_left - 1,
            },
            Phase::Trial { first: None } => {
                let first = (self.waiting, cost);
                self.waiting = !self.waiting;
                Phase::Trial { first: Some(first) }
            }
            Phase::Trial {
                first: Some((first_waiting, first_cost)),
            } => {
                let (with, without) = if first_waiting {
                    (first_cost, cost)
                } else {
                    (cost, first_cost)
                };
                let gains = |with: Duration, without: Duration| {
                    with.as_secs_f64() < without.as_secs_f64() * WAITING_MUST_GAIN
                };
                let no_worse = |with: Duration, without: Duration| {
                    with.as_secs_f64() <= without.as_secs_f64() * WAITING_MAY_LOSE
                };
                self.waiting = (gains(with.wall, without.wall) && no_worse(with.cpu, without.cpu))
                    || (gains(with.cpu, without.cpu) && no_worse(with.wall, without.wall));
                tracing::debug!(
                    "replies a client keeps in flight {} (a reply every {:?} and {:?} of CPU with waits, {:?} and {:?} without)",
                    if self.waiting {
                        "wait for more"
                    } else {
                        "go out at once"
                    },
                    with.wall,
                    with.cpu,
                    without.wall,
                    without.cpu,
                );
                Phase::Settled {
                    epochs_left: EPOCHS_BETWEEN_TRIALS,
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_micros(10);

    /// A client and a thread: the wall clock and the thread's CPU time.
    struct Clocks {
        now: Instant,
        cpu: Duration,
    }

    impl Clocks {
        fn new() -> Self {
            Self {
                now: Instant::now(),
                cpu: Duration::ZERO,
            }
        }

        /// Sends one epoch's replies in batches of `batch`, each batch
        /// taking `wall` and `cpu` microseconds.
        fn epoch(&mut self, gathering: &mut Gathering, batch: usize, wall: u64, cpu: u64) {
            let mut sent = 0;
            while sent < TRIAL_REPLIES as usize {
                let cpu_now = self.cpu;
                gathering.replied(batch, self.now, || cpu_now);
                self.now += Duration::from_micros(wall);
                self.cpu += Duration::from_micros(cpu);
                sent += batch;
            }
        }
    }

    #[test]
    fn zero_never_waits() {
        assert!(Gathering::new(Duration::ZERO).is_none());
    }

    #[test]
    fn a_trial_keeps_waiting_if_quicker_for_no_more_cpu_until_the_next_one() {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        let mut clocks = Clocks::new();
        assert_eq!(
            gathering.wait(4, Duration::ZERO),
            None,
            "starts sending at once"
        );
        // Without waits: 2 replies every 10 µs, 9 µs of CPU; with: 10
        // every 40 µs, 40 µs of CPU.
        clocks.epoch(&mut gathering, 2, 10, 9);
        assert_eq!(
            gathering
                .wait(4, Duration::from_micros(3))
                .map(|wait| wait.within),
            Some(Duration::from_micros(7))
        );
        clocks.epoch(&mut gathering, 10, 40, 40);
        assert!(matches!(gathering.phase, Phase::Settled { .. }));
        assert!(
            gathering.wait(4, Duration::ZERO).is_some(),
            "waiting was better"
        );
        for _ in 0..EPOCHS_BETWEEN_TRIALS {
            clocks.epoch(&mut gathering, 10, 40, 40);
            assert!(gathering.wait(4, Duration::ZERO).is_some());
        }
        assert!(matches!(gathering.phase, Phase::Trial { first: None }));
        // The next trial: its first epoch waits (the way chosen), and
        // now the client is slower with waits.
        clocks.epoch(&mut gathering, 10, 40, 40);
        assert!(matches!(
            gathering.phase,
            Phase::Trial {
                first: Some((true, _))
            }
        ));
        clocks.epoch(&mut gathering, 8, 10, 30);
        assert_eq!(
            gathering.wait(4, Duration::ZERO),
            None,
            "sending at once was quicker"
        );
    }

    /// Whether a new connection waits after a trial whose epoch without
    /// waits and whose epoch with them each send batches of
    /// (replies, µs apart, µs of CPU).
    fn waits_after_a_trial(without: (usize, u64, u64), with: (usize, u64, u64)) -> bool {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        let mut clocks = Clocks::new();
        clocks.epoch(&mut gathering, without.0, without.1, without.2);
        clocks.epoch(&mut gathering, with.0, with.1, with.2);
        gathering.wait(4, Duration::ZERO).is_some()
    }

    #[test]
    fn waits_quicker_but_dearer_are_not_kept() {
        assert!(!waits_after_a_trial((2, 10, 6), (10, 45, 40)));
    }

    #[test]
    fn waits_cheaper_and_no_slower_are_kept() {
        // Without waits 5 µs a reply and 4.5 of CPU; with them 4.9 µs
        // (2 % quicker) and 4 of CPU (11 % cheaper).
        assert!(waits_after_a_trial((2, 10, 9), (10, 49, 40)));
    }

    #[test]
    fn waits_much_cheaper_and_hardly_slower_are_kept() {
        // 5.1 µs a reply against 5 (2 % slower, as epochs served the
        // same way differ) for 3.4 of CPU against 4.5.
        assert!(waits_after_a_trial((2, 10, 9), (10, 51, 34)));
    }

    #[test]
    fn waits_cheaper_but_slower_are_not_kept() {
        // 4 % slower: more than epochs served the same way differ.
        assert!(!waits_after_a_trial((2, 10, 9), (10, 52, 34)));
    }

    #[test]
    fn a_tie_goes_to_sending_at_once() {
        assert!(!waits_after_a_trial((2, 10, 8), (2, 10, 8)));
    }

    #[test]
    fn a_pause_starts_the_epoch_again() {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        let mut clocks = Clocks::new();
        clocks.epoch(&mut gathering, 2, 10, 9);
        // The epoch with waits: the client stops for a second halfway.
        for _ in 0..TRIAL_REPLIES / 20 {
            let cpu_now = clocks.cpu;
            gathering.replied(10, clocks.now, || cpu_now);
            clocks.now += Duration::from_micros(40);
            clocks.cpu += Duration::from_micros(40);
        }
        clocks.now += Duration::from_secs(1);
        assert!(matches!(gathering.phase, Phase::Trial { first: Some(_) }));
        clocks.epoch(&mut gathering, 10, 40, 40);
        assert!(
            gathering.wait(4, Duration::ZERO).is_some(),
            "the pause was not counted"
        );
    }

    #[test]
    fn a_wait_asks_for_one_request_more_after_each_that_came_and_half_after_one_that_did_not() {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        gathering.waiting = true;
        let at_least = |gathering: &mut Gathering, in_flight| {
            gathering
                .wait(in_flight, Duration::ZERO)
                .map(|wait| wait.at_least)
        };
        assert_eq!(
            at_least(&mut gathering, 3),
            Some(1),
            "nothing known: any byte"
        );
        // Reads (28-byte headers), up to 32 in flight.
        for in_flight in 1..=32 {
            gathering.took(28, in_flight);
        }
        assert_eq!(at_least(&mut gathering, 8), Some(28), "one at first");
        gathering.waited(Arrival::Enough, 8);
        assert_eq!(at_least(&mut gathering, 8), Some(2 * 28));
        for _ in 0..20 {
            gathering.waited(Arrival::Enough, 8);
        }
        assert_eq!(
            at_least(&mut gathering, 8),
            Some(12 * 28),
            "half of what the client may still send"
        );
        assert_eq!(at_least(&mut gathering, 30), Some(28));
        assert_eq!(at_least(&mut gathering, 31), Some(1));
        assert_eq!(at_least(&mut gathering, 0), Some(16 * 28));
        gathering.waited(Arrival::Fewer, 0);
        assert_eq!(
            at_least(&mut gathering, 0),
            Some(11 * 28),
            "22 asked, then 11"
        );
        gathering.waited(Arrival::Nothing, 8);
        assert_eq!(
            at_least(&mut gathering, 8),
            None,
            "nothing came with 8 in flight"
        );
        assert_eq!(at_least(&mut gathering, 4), Some(5 * 28));
        // Then 4 KiB writes: the size follows them.
        gathering.took(28 + 4096, 8);
        let after_one = at_least(&mut gathering, 4).expect("a wait");
        assert!(after_one > 5 * 28 && after_one < 5 * (28 + 4096));
        for _ in 0..100 {
            gathering.took(28 + 4096, 8);
        }
        assert_eq!(at_least(&mut gathering, 4), Some(5 * (28 + 4096)));
        for in_flight in 33..=64 {
            gathering.took(28 + 4096, in_flight);
        }
        for _ in 0..40 {
            gathering.waited(Arrival::Enough, 4);
        }
        assert_eq!(
            at_least(&mut gathering, 4),
            Some(MOST_GATHERED_BYTES),
            "capped"
        );
    }

    #[test]
    fn the_depth_is_found_anew_at_each_trial() {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        let mut clocks = Clocks::new();
        for in_flight in 1..=32 {
            gathering.took(28, in_flight);
        }
        // A trial that keeps waiting, then the epochs until the next one.
        clocks.epoch(&mut gathering, 2, 10, 9);
        clocks.epoch(&mut gathering, 10, 40, 40);
        for _ in 0..EPOCHS_BETWEEN_TRIALS {
            clocks.epoch(&mut gathering, 10, 40, 40);
        }
        assert!(matches!(gathering.phase, Phase::Trial { first: None }));
        // The client now keeps 4 in flight.
        for in_flight in 1..=4 {
            gathering.took(28, in_flight);
        }
        for _ in 0..10 {
            gathering.waited(Arrival::Enough, 2);
        }
        assert_eq!(
            gathering.wait(2, Duration::ZERO).map(|wait| wait.at_least),
            Some(28),
            "half of the two it may still send"
        );
    }

    #[test]
    fn no_wait_once_as_many_are_in_flight_as_when_one_found_nothing() {
        let mut gathering = Gathering::new(WAIT).expect("a wait");
        gathering.waiting = true;
        assert!(gathering.wait(8, Duration::ZERO).is_some());
        gathering.waited(Arrival::Nothing, 8);
        assert_eq!(gathering.wait(8, Duration::ZERO), None);
        assert!(gathering.wait(7, Duration::ZERO).is_some());
        gathering.waited(Arrival::Enough, 7);
        assert!(gathering.wait(7, Duration::ZERO).is_some());
        // More in flight than then: the client's depth grew.
        assert_eq!(gathering.wait(9, Duration::ZERO), None);
        assert!(gathering.wait(8, Duration::ZERO).is_some());
        assert_eq!(
            gathering.wait(8, WAIT),
            None,
            "held for the whole wait already"
        );
    }
}
