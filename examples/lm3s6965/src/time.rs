//! Time from SysTick: a 1 ms interrupt counts milliseconds, the counter
//! in between gives microseconds. Feeds smoltcp's `Instant`, defmt's
//! timestamps and the SD card driver's delays.
//!
//! SysTick runs from the core clock (QEMU does not wire the external
//! reference clock of this SoC, and the chip's is the slow internal
//! oscillator / 4), so [`start`] must be told the frequency that
//! [`crate::sysctl::configure_clock`] set.

use core::cell::Cell;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{SCB, SYST};
use cortex_m_rt::exception;
use critical_section::Mutex;

/// Milliseconds since [`start`], counted by the SysTick interrupt.
static MILLIS: Mutex<Cell<u64>> = Mutex::new(Cell::new(0));
/// Core clock cycles per millisecond (SysTick reload + 1); 0 until started.
static CYCLES_PER_MS: AtomicU32 = AtomicU32::new(0);

/// Proof that the clock runs: only [`start`] makes one, and the delays
/// that rely on it take it.
#[derive(Clone, Copy, Debug)]
pub struct Clock(());

/// Starts SysTick: an interrupt every millisecond of a core clock of
/// `core_hz`.
pub fn start(mut syst: SYST, core_hz: u32) -> Clock {
    let per_ms = core_hz / 1000;
    syst.disable_counter();
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(per_ms - 1);
    syst.clear_current();
    CYCLES_PER_MS.store(per_ms, Ordering::Relaxed);
    syst.enable_interrupt();
    syst.enable_counter();
    Clock(())
}

#[exception]
fn SysTick() {
    critical_section::with(|cs| {
        let millis = MILLIS.borrow(cs);
        millis.set(millis.get() + 1);
    });
}

/// Microseconds since [`start`] (0 before). Correct inside critical
/// sections too, up to one missed millisecond interrupt.
pub fn now_micros() -> u64 {
    let per_ms = CYCLES_PER_MS.load(Ordering::Relaxed);
    if per_ms == 0 {
        return 0;
    }
    critical_section::with(|cs| {
        let mut millis = MILLIS.borrow(cs).get();
        let mut current = SYST::get_current();
        if SCB::is_pendst_pending() {
            // The counter wrapped and its interrupt has not run (we hold
            // it off): count that millisecond, and read the counter again
            // in case the wrap came after the first read.
            millis += 1;
            current = SYST::get_current();
        }
        // The counter runs down from per_ms - 1 to 0.
        let into = (per_ms - 1).saturating_sub(current);
        millis * 1000 + u64::from(into * 1000 / per_ms)
    })
}

/// The time for smoltcp.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now_micros() as i64)
}

/// A delay on the SysTick clock, microsecond resolution (the SD card
/// driver's retry pauses are 10 µs).
#[derive(Clone, Copy, Debug)]
pub struct Delay(Clock);

impl Delay {
    /// A delay on the running clock.
    pub fn new(clock: Clock) -> Self {
        Self(clock)
    }
}

impl embedded_hal::delay::DelayNs for Delay {
    fn delay_ns(&mut self, ns: u32) {
        let start = now_micros();
        let wait = u64::from(ns.div_ceil(1000));
        while now_micros().wrapping_sub(start) < wait {
            core::hint::spin_loop();
        }
    }
}

defmt::timestamp!("{=u64:us}", now_micros());
