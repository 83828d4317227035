//! A smoltcp [`Device`] for the LM3S6965's Ethernet controller (QEMU's
//! `stellaris_enet`), register-level, polled, with the receive interrupt
//! used only to wake the core from `WFI`.
//!
//! The MAC moves frames through two FIFOs of 32-bit words (data sheet
//! chapter 15, base `0x4004_8000`):
//!
//! - receive: the first word holds the frame length in its low 16 bits
//!   (counting the 2 length bytes, the frame and its 4-byte FCS) and the
//!   first two bytes of the frame in its high half; the rest of the frame
//!   and the FCS follow, little-endian, padded to a whole word. `NP`
//!   counts the frames waiting (the chip's 2 KiB FIFO; QEMU's holds 31).
//! - transmit: the first word holds the payload length (frame length − 14)
//!   and the first two bytes; the rest follows the same way, then writing 1
//!   to `TR` sends it. The MAC pads short frames and appends the FCS.
//!
//! One frame buffer each way: smoltcp fills the transmit buffer and reads
//! the receive buffer through the tokens.

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::mmio::Reg;
use crate::sysctl::{self, Peripheral};

const BASE: usize = 0x4004_8000;
// SAFETY (all below): Ethernet controller registers of the LM3S6965.
/// Raw interrupt status (read) / acknowledge (write).
const RIS_IACK: Reg = unsafe {
    Reg::at(BASE) /* + 0x00 */
};
/// Interrupt mask.
const IM: Reg = unsafe { Reg::at(BASE + 0x04) };
/// Receive control.
const RCTL: Reg = unsafe { Reg::at(BASE + 0x08) };
/// Transmit control.
const TCTL: Reg = unsafe { Reg::at(BASE + 0x0C) };
/// The receive (read) and transmit (write) FIFOs.
const DATA: Reg = unsafe { Reg::at(BASE + 0x10) };
/// Individual address: MAC bytes 0–3 and 4–5.
const IA0: Reg = unsafe { Reg::at(BASE + 0x14) };
const IA1: Reg = unsafe { Reg::at(BASE + 0x18) };
/// MII management clock divider.
const MDV: Reg = unsafe { Reg::at(BASE + 0x24) };
/// Number of frames in the receive FIFO.
const NP: Reg = unsafe { Reg::at(BASE + 0x34) };
/// Transmission request: bit 0 starts sending, and reads 1 until sent.
const TR: Reg = unsafe { Reg::at(BASE + 0x38) };

const INT_RX: u32 = 1 << 0;
const INT_ALL: u32 = 0x7F;
const RCTL_RXEN: u32 = 1 << 0;
const RCTL_BADCRC: u32 = 1 << 3;
const RCTL_RSTFIFO: u32 = 1 << 4;
const TCTL_TXEN: u32 = 1 << 0;
const TCTL_PADEN: u32 = 1 << 1;
const TCTL_CRC: u32 = 1 << 2;
const TCTL_DUPLEX: u32 = 1 << 4;
const TR_NEWTX: u32 = 1 << 0;

/// Largest frame without FCS (the MTU smoltcp sees on Ethernet).
pub const MAX_FRAME: usize = 1514;
/// Bytes the length word counts besides the frame: itself and the FCS.
const RX_OVERHEAD: usize = 2 + 4;
/// Largest length word the FIFO can hold (2 KiB); a bigger one means the
/// FIFO is out of step.
const RX_FIFO_BYTES: usize = 2048;
/// Looks at `TR` before giving up on a transmission in progress (one
/// full frame takes about 120 µs at 100 Mbit/s: 6,000 cycles at 50 MHz).
const TX_IDLE_POLLS: u32 = 100_000;

/// Counters for the log.
#[derive(Clone, Copy, Debug, Default, defmt::Format)]
pub struct Stats {
    /// Frames received and handed to smoltcp.
    pub received: u32,
    /// Frames sent.
    pub sent: u32,
    /// Received frames too long for the buffer (dropped).
    pub oversized: u32,
    /// Times the receive FIFO was reset after a bad length word.
    pub fifo_resets: u32,
    /// Frames dropped because the transmitter stayed busy.
    pub tx_timeouts: u32,
}

/// The Ethernet controller, with one frame buffer each way.
#[derive(Debug)]
pub struct Ethernet {
    rx: [u8; MAX_FRAME],
    tx: [u8; MAX_FRAME],
    stats: Stats,
}

impl Ethernet {
    /// Clocks and configures the MAC with address `mac`: transmit with
    /// padding, FCS and full duplex; receive with frames of bad FCS
    /// rejected; every interrupt masked (see [`sleep_until_frame`]).
    pub fn new(mac: [u8; 6], core_hz: u32) -> Self {
        sysctl::enable(Peripheral::Ethernet);
        IM.write(0);
        RCTL.write(0);
        TCTL.write(0);
        // MII clock at most 2.5 MHz: core / (2 * (MDV + 1)).
        MDV.write((core_hz / (2 * 2_500_000)).saturating_sub(1).min(0xFF));
        IA0.write(u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        IA1.write(u32::from_le_bytes([mac[4], mac[5], 0, 0]));
        TCTL.write(TCTL_TXEN | TCTL_PADEN | TCTL_CRC | TCTL_DUPLEX);
        RCTL.write(RCTL_RSTFIFO);
        RCTL.write(RCTL_RXEN | RCTL_BADCRC);
        RIS_IACK.write(INT_ALL);
        Self {
            rx: [0; MAX_FRAME],
            tx: [0; MAX_FRAME],
            stats: Stats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Reads the next frame from the receive FIFO into the buffer; returns
    /// its length, or `None` if there is none or it was dropped.
    fn read_frame(&mut self) -> Option<usize> {
        if !frame_waiting() {
            return None;
        }
        let first = DATA.read();
        let total = (first & 0xFFFF) as usize;
        if !(RX_OVERHEAD + 14..=RX_FIFO_BYTES).contains(&total) {
            // Not a length word: start over with an empty FIFO.
            RCTL.write(RCTL_RSTFIFO | RCTL_RXEN | RCTL_BADCRC);
            RCTL.write(RCTL_RXEN | RCTL_BADCRC);
            self.stats.fifo_resets += 1;
            return None;
        }
        let len = total - RX_OVERHEAD;
        let words = total.div_ceil(4);
        let keep = len <= self.rx.len();
        let [_, _, b0, b1] = first.to_le_bytes();
        if keep {
            self.rx[0] = b0;
            self.rx[1] = b1;
        }
        // Frame bytes 2.. start at word 1; the FCS and padding are read
        // and dropped.
        for word in 1..words {
            let bytes = DATA.read().to_le_bytes();
            let at = word * 4 - 2;
            if keep && at < len {
                let n = (len - at).min(4);
                self.rx[at..at + n].copy_from_slice(&bytes[..n]);
            }
        }
        if !keep {
            self.stats.oversized += 1;
            return None;
        }
        self.stats.received += 1;
        Some(len)
    }
}

/// Whether a received frame waits in the FIFO.
pub fn frame_waiting() -> bool {
    NP.read() & 0x3F != 0
}

/// Waits (in `WFI`) until a frame arrives or another interrupt fires,
/// such as the 1 ms SysTick. Interrupts are held off between the check
/// and the `WFI`, so a frame arriving in between still wakes the core.
pub fn sleep_until_frame() {
    cortex_m::interrupt::free(|_| {
        // Forget frames already read, then ask for the next one.
        RIS_IACK.write(INT_RX);
        IM.write(INT_RX);
        if !frame_waiting() {
            cortex_m::asm::wfi();
        }
    });
}

/// The interrupt handler's work: mask the controller's interrupts (the
/// main loop polls; it unmasks the receive interrupt only to sleep).
pub fn on_interrupt() {
    IM.write(0);
}

/// Sends the frame, once the transmitter is free. Returns whether it was
/// sent.
fn send(frame: &[u8]) -> bool {
    if !(0..TX_IDLE_POLLS).any(|_| TR.read() & TR_NEWTX == 0) {
        return false;
    }
    let (head, rest) = frame.split_at(2.min(frame.len()));
    let mut first = [0u8; 4];
    first[..2].copy_from_slice(&(frame.len().saturating_sub(14) as u16).to_le_bytes());
    first[2..2 + head.len()].copy_from_slice(head);
    DATA.write(u32::from_le_bytes(first));
    for chunk in rest.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        DATA.write(u32::from_le_bytes(word));
    }
    TR.write(TR_NEWTX);
    true
}

impl Device for Ethernet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let len = self.read_frame()?;
        Some((
            RxToken {
                frame: &self.rx[..len],
            },
            TxToken {
                buffer: &mut self.tx,
                stats: &mut self.stats,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        if TR.read() & TR_NEWTX != 0 {
            return None;
        }
        Some(TxToken {
            buffer: &mut self.tx,
            stats: &mut self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // No burst limit: the chip's FIFO holds about one full frame, but a
        // 50 MHz core empties it far faster than 100 Mbit/s fills it (a
        // limit of 1 would shrink smoltcp's receive window to one segment).
        caps.max_burst_size = None;
        caps
    }
}

/// A received frame, borrowed from the receive buffer.
#[derive(Debug)]
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

/// Room for one frame to send.
#[derive(Debug)]
pub struct TxToken<'a> {
    buffer: &'a mut [u8; MAX_FRAME],
    stats: &'a mut Stats,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // smoltcp never asks for more than `max_transmission_unit`.
        let frame = &mut self.buffer[..len];
        let result = f(frame);
        if send(frame) {
            self.stats.sent += 1;
        } else {
            self.stats.tx_timeouts += 1;
        }
        result
    }
}
