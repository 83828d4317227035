//! The SD card's SPI bus: an `embedded-hal` [`SpiDevice`] over the SSI0
//! controller (an ARM PL022), with the card's chip select on GPIO port D
//! pin 0, for `embedded_sdmmc::SdCard`.
//!
//! Wiring on the evaluation board (and in QEMU's model): PA2 = SSI0Clk,
//! PA4 = SSI0Rx (card DO), PA5 = SSI0Tx (card DI), PD0 = card CS (active
//! low; the OLED display shares the bus and its own select).
//!
//! Transfers keep the controller's 8-entry FIFOs busy: up to 8 bytes are in
//! flight, so the bus is clocked back to back instead of byte by byte.
//!
//! # Emulator quirks
//!
//! QEMU's `ssi-sd` model differs from SD cards in these ways, handled here
//! so that `embedded-sdmmc` works unchanged. Each fix is a no-op on a real
//! card, and on a QEMU version without the quirk:
//!
//! - **CMD58 R1.** The model answers READ_OCR (CMD58) with R1 = `0x01`
//!   ("idle") even after initialisation, and `embedded-sdmmc` then fails
//!   with `Cmd58Error`. This driver watches the command bytes it sends:
//!   once ACMD41 has answered R1 = `0x00` (the card left the idle state),
//!   a CMD58 answer of exactly `0x01` is read as `0x00`. A real card answers
//!   `0x00` there, so nothing is rewritten.
//! - **No byte between a response and the next token.** After the last
//!   response byte the model needs one more byte clocked before it looks for
//!   a command or data token; `embedded-sdmmc` sends the data start token of
//!   a block write right after the R1 of CMD24, which the model then drops.
//!   The SD specification asks for that gap anyway (N_WR ≥ 1 byte), so when
//!   the card answered and the next byte sent is not `0xFF`, one `0xFF` is
//!   clocked first. Cards ignore `0xFF` between commands. (QEMU 7.2, 10.0.)
//! - **CMD13 status lost (QEMU 9.1 to 10.0).** The model's SEND_STATUS
//!   answer in SPI mode has the wrong length, which `ssi-sd` turns into
//!   R1 = `0x04` (illegal command) with no second status byte, so every
//!   block write (`embedded-sdmmc` checks CMD13 after it) fails. CMD13 is
//!   mandatory for every SD card in SPI mode, so a card that has finished
//!   initialisation never answers it with exactly `0x04`: that answer is
//!   read as R2 = `0x00 0x00`. The write itself was already accepted by its
//!   data response token. (QEMU's stderr shows "Unexpected response to cmd
//!   13".)
//!
//! The size of such cards needs one more workaround, see [`crate::card`].

use embedded_hal::delay::DelayNs;
use embedded_hal::spi::{self, ErrorKind, Operation, SpiDevice};

use crate::mmio::Reg;
use crate::sysctl::{self, Peripheral};
use crate::time::{self, Delay};
use embedded_sdmmc::SdCardError;
use embedded_sdmmc::embedded_sdmmc_types::sdcard::crc7;

const SSI0: usize = 0x4000_8000;
const GPIO_A: usize = 0x4000_4000;
const GPIO_D: usize = 0x4000_7000;
// SAFETY (all below): SSI0 and GPIO registers of the LM3S6965.
/// Control 0: clock rate (SCR), phase, polarity, frame format, data size.
const SSI_CR0: Reg = unsafe {
    Reg::at(SSI0) /* + 0x00 */
};
/// Control 1: enable, master/slave.
const SSI_CR1: Reg = unsafe { Reg::at(SSI0 + 0x04) };
/// Data: writes go to the transmit FIFO, reads come from the receive FIFO.
const SSI_DR: Reg = unsafe { Reg::at(SSI0 + 0x08) };
/// Status.
const SSI_SR: Reg = unsafe { Reg::at(SSI0 + 0x0C) };
/// Clock prescale divisor (even, 2–254).
const SSI_CPSR: Reg = unsafe { Reg::at(SSI0 + 0x10) };
const GPIO_A_AFSEL: Reg = unsafe { Reg::at(GPIO_A + 0x420) };
const GPIO_A_PUR: Reg = unsafe { Reg::at(GPIO_A + 0x510) };
const GPIO_A_DEN: Reg = unsafe { Reg::at(GPIO_A + 0x51C) };
const GPIO_D_DIR: Reg = unsafe { Reg::at(GPIO_D + 0x400) };
const GPIO_D_DEN: Reg = unsafe { Reg::at(GPIO_D + 0x51C) };
/// Port D data, masked to pin 0 (address bits 9:2 select the pins written).
const GPIO_D_PIN0: Reg = unsafe { Reg::at(GPIO_D + (1 << 2)) };

const SR_BSY: u32 = 1 << 4;
const CR1_SSE: u32 = 1 << 1;
/// Freescale SPI frames, mode 0 (SPO = SPH = 0), 8-bit data.
const CR0_SPI_MODE0_8BIT: u32 = 0x7;
/// SSI0Clk, SSI0Rx, SSI0Tx on port A.
const PINS_A: u32 = (1 << 2) | (1 << 4) | (1 << 5);
const PIN_RX: u32 = 1 << 4;

/// Depth of each SSI FIFO.
const FIFO_DEPTH: usize = 8;
/// Status polls without progress before a transfer is declared stuck
/// (a byte at 400 kHz takes 1,000 cycles at 50 MHz; a poll takes several).
const STALL_POLLS: u32 = 100_000;
/// Clock for card identification (at most 400 kHz).
pub const INIT_HZ: u32 = 400_000;
/// Clock after initialisation (the SSI master runs at most at half the
/// system clock; 12.5 MHz is within every SD card's 25 MHz).
pub const FAST_HZ: u32 = 12_500_000;

/// SD command indexes the quirk filter watches.
const CMD0_GO_IDLE: u8 = 0;
const CMD13_SEND_STATUS: u8 = 13;
const CMD55_APP: u8 = 55;
const CMD58_READ_OCR: u8 = 58;
const CMD32_ERASE_WR_BLK_START: u8 = 32;
const CMD33_ERASE_WR_BLK_END: u8 = 33;
const CMD38_ERASE: u8 = 38;
/// Bytes clocked while waiting for an R1 (the card answers within 8:
/// N_CR).
const R1_POLLS: usize = 16;
/// How long an erase may keep the card busy. The SD specification lets a
/// card take up to 250 ms per allocation unit, so large erases are slow.
const ERASE_BUSY_MICROS: u64 = 60_000_000;
const ACMD41_SEND_OP_COND: u8 = 41;

/// What can go wrong on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum SpiError {
    /// The SSI FIFOs stopped moving (controller not clocked or wedged).
    Stalled,
}

impl core::fmt::Display for SpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Stalled => f.write_str("SSI0 transfer stalled: its FIFOs stopped moving"),
        }
    }
}

impl spi::Error for SpiError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}

/// What the quirk filter knows about the conversation with the card.
#[derive(Clone, Copy, Debug, Default)]
struct Conversation {
    /// The command whose R1 has not been seen yet.
    awaiting_r1: Option<u8>,
    /// The previous command was CMD55 (the next is an application command).
    app_command: bool,
    /// ACMD41 answered "ready": the card is initialised.
    ready: bool,
    /// The card answered since the last byte sent that was not `0xFF`.
    answered: bool,
    /// The next byte is the second status byte of a CMD13 answer whose
    /// R1 was rewritten.
    status_byte_lost: bool,
    /// CMD58 answers rewritten (the first is logged).
    cmd58_fixes: u32,
    /// CMD13 answers rewritten (the first is logged).
    cmd13_fixes: u32,
}

/// SSI0 with the SD card's chip select: an [`SpiDevice`].
#[derive(Debug)]
pub struct SdSpi {
    core_hz: u32,
    delay: Delay,
    conversation: Conversation,
}

/// The bytes of one operation: what to send, where to put what comes back.
enum Bytes<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    Transfer(&'a mut [u8], &'a [u8]),
    InPlace(&'a mut [u8]),
}

impl Bytes<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Read(b) | Self::InPlace(b) => b.len(),
            Self::Write(b) => b.len(),
            Self::Transfer(r, w) => r.len().max(w.len()),
        }
    }

    /// Byte `i` to send (`0xFF` where there is nothing to send).
    fn out(&self, i: usize) -> u8 {
        match self {
            Self::Write(b) => b[i],
            Self::InPlace(b) => b[i],
            Self::Transfer(_, w) => w.get(i).copied().unwrap_or(0xFF),
            Self::Read(_) => 0xFF,
        }
    }

    /// Stores received byte `i`.
    fn put(&mut self, i: usize, byte: u8) {
        match self {
            Self::Read(b) | Self::InPlace(b) => b[i] = byte,
            Self::Transfer(r, _) => {
                if let Some(slot) = r.get_mut(i) {
                    *slot = byte;
                }
            }
            Self::Write(_) => {}
        }
    }

    /// The received bytes, if kept.
    fn received(&mut self) -> Option<&mut [u8]> {
        match self {
            Self::Read(b) | Self::InPlace(b) | Self::Transfer(b, _) => Some(b),
            Self::Write(_) => None,
        }
    }
}

impl SdSpi {
    /// Clocks SSI0 and GPIO ports A and D, routes PA2/PA4/PA5 to SSI0,
    /// drives the chip select (PD0) high, and sets SPI mode 0 at
    /// [`INIT_HZ`].
    pub fn new(core_hz: u32, delay: Delay) -> Self {
        sysctl::enable(Peripheral::Ssi0);
        sysctl::enable(Peripheral::GpioA);
        sysctl::enable(Peripheral::GpioD);
        GPIO_A_AFSEL.set_bits(PINS_A);
        // The card's DO is open drain until it talks: pull it up.
        GPIO_A_PUR.set_bits(PIN_RX);
        GPIO_A_DEN.set_bits(PINS_A);
        GPIO_D_PIN0.write(1);
        GPIO_D_DIR.set_bits(1);
        GPIO_D_DEN.set_bits(1);
        let mut spi = Self {
            core_hz,
            delay,
            conversation: Conversation::default(),
        };
        spi.set_frequency(INIT_HZ);
        spi
    }

    /// Sets the bus clock to at most `hz`: core / (CPSDVSR × (1 + SCR)).
    pub fn set_frequency(&mut self, hz: u32) {
        let divisor = self.core_hz.div_ceil(hz.max(1)).max(2);
        let mut prescale = 2;
        while prescale * 256 < divisor && prescale < 254 {
            prescale += 2;
        }
        let scr = (divisor.div_ceil(prescale) - 1).min(255);
        SSI_CR1.write(0); // disabled, master
        SSI_CPSR.write(prescale);
        SSI_CR0.write((scr << 8) | CR0_SPI_MODE0_8BIT);
        SSI_CR1.write(CR1_SSE);
    }

    /// The bus clock in Hz.
    pub fn frequency(&self) -> u32 {
        let prescale = SSI_CPSR.read() & 0xFF;
        let scr = (SSI_CR0.read() >> 8) & 0xFF;
        self.core_hz / (prescale.max(2) * (1 + scr))
    }

    /// Clocks 80 cycles with the card deselected, which a card needs after
    /// power-up before its first command (`SdCard` leaves this to us).
    pub fn wake_card(&mut self) -> Result<(), SpiError> {
        GPIO_D_PIN0.write(1);
        let mut ones = [0xFF; 10];
        self.exchange(&mut Bytes::InPlace(&mut ones))?;
        self.wait_idle()
    }

    fn select(&mut self) {
        GPIO_D_PIN0.write(0);
    }

    fn deselect(&mut self) {
        GPIO_D_PIN0.write(1);
    }

    /// Waits until the controller has shifted out everything.
    fn wait_idle(&mut self) -> Result<(), SpiError> {
        if (0..STALL_POLLS).any(|_| SSI_SR.read() & SR_BSY == 0) {
            Ok(())
        } else {
            Err(SpiError::Stalled)
        }
    }

    /// Clocks `bytes` through the FIFOs in batches of [`FIFO_DEPTH`]: a
    /// batch is written, the controller is awaited once (idle: every byte
    /// shifted out and its answer in the receive FIFO), and the answers
    /// are read without a status check each. With at most 8 in flight
    /// neither FIFO can overflow. One status poll per 8 bytes instead of
    /// one per byte: register accesses are what costs (in QEMU each is a
    /// trip out of the emulated CPU), and the bus pauses only for the 16
    /// FIFO accesses between batches.
    fn exchange(&mut self, bytes: &mut Bytes<'_>) -> Result<(), SpiError> {
        let len = bytes.len();
        let mut done = 0;
        while done < len {
            let batch = done..(done + FIFO_DEPTH).min(len);
            for i in batch.clone() {
                SSI_DR.write(u32::from(bytes.out(i)));
            }
            self.wait_idle()?;
            for i in batch.clone() {
                bytes.put(i, SSI_DR.read() as u8);
            }
            done = batch.end;
        }
        Ok(())
    }

    /// Erases the card from address `first` to `last`, both included (byte
    /// addresses on SDSC cards, block numbers on SDHC/SDXC):
    /// ERASE_WR_BLK_START (CMD32), ERASE_WR_BLK_END (CMD33), ERASE
    /// (CMD38), then waits while the card is busy.
    pub fn erase(&mut self, first: u32, last: u32) -> Result<(), SdCardError> {
        for (command, argument) in [
            (CMD32_ERASE_WR_BLK_START, first),
            (CMD33_ERASE_WR_BLK_END, last),
            (CMD38_ERASE, 0),
        ] {
            match self.command(command, argument)? {
                0x00 => {}
                r1 => {
                    defmt::warn!("SD erase: CMD{=u8} answered R1 {=u8:#04x}", command, r1);
                    return Err(SdCardError::WriteError);
                }
            }
        }
        self.wait_not_busy(ERASE_BUSY_MICROS)
    }

    /// Sends a command frame (with its CRC7: CRC checking is on) and
    /// returns the card's R1.
    fn command(&mut self, index: u8, argument: u32) -> Result<u8, SdCardError> {
        let [a3, a2, a1, a0] = argument.to_be_bytes();
        let mut frame = [0x40 | index, a3, a2, a1, a0, 0];
        frame[5] = (crc7(&frame[..5]) << 1) | 1;
        let bus = |_| SdCardError::Transport;
        self.transaction(&mut [Operation::Write(&frame)])
            .map_err(bus)?;
        for _ in 0..R1_POLLS {
            let mut byte = [0xFF];
            self.transaction(&mut [Operation::TransferInPlace(&mut byte)])
                .map_err(bus)?;
            if byte[0] & 0x80 == 0 {
                return Ok(byte[0]);
            }
        }
        defmt::warn!("SD command {=u8}: no R1", index);
        Err(SdCardError::WriteError)
    }

    /// Clocks bytes until the card releases its busy signal (answers
    /// `0xFF`), for at most `micros`.
    fn wait_not_busy(&mut self, micros: u64) -> Result<(), SdCardError> {
        let until = time::now_micros() + micros;
        loop {
            let mut byte = [0xFF];
            self.transaction(&mut [Operation::TransferInPlace(&mut byte)])
                .map_err(|_| SdCardError::Transport)?;
            if byte[0] == 0xFF {
                return Ok(());
            }
            if time::now_micros() > until {
                return Err(SdCardError::TimeoutWaitNotBusy);
            }
        }
    }

    /// One operation of a transaction, through the quirk filter.
    fn run(&mut self, mut bytes: Bytes<'_>) -> Result<(), SpiError> {
        let len = bytes.len();
        if len == 0 {
            return Ok(());
        }
        let talking = (0..len).any(|i| bytes.out(i) != 0xFF);
        if bytes.out(0) != 0xFF && self.conversation.answered {
            // N_WR / the model's extra byte after a response.
            let mut gap = [0xFF];
            self.exchange(&mut Bytes::InPlace(&mut gap))?;
        }
        if let Bytes::Write(frame) = &bytes {
            self.conversation.command(frame);
        }
        self.exchange(&mut bytes)?;
        if talking {
            self.conversation.answered = false;
        } else if let Some(received) = bytes.received() {
            self.conversation.answer(received);
        }
        Ok(())
    }
}

impl Conversation {
    /// Notes a command frame (6 bytes, start bits `01`) being sent.
    fn command(&mut self, frame: &[u8]) {
        let [first, ..] = frame else { return };
        if frame.len() != 6 || first & 0xC0 != 0x40 {
            return;
        }
        let index = first & 0x3F;
        if index == CMD0_GO_IDLE {
            self.ready = false;
        }
        // An application command is marked by CMD55 just before it.
        let app = core::mem::replace(&mut self.app_command, index == CMD55_APP);
        self.awaiting_r1 = Some(if app && index == ACMD41_SEND_OP_COND {
            // Tag ACMD41 apart from CMD41.
            0x80 | index
        } else {
            index
        });
    }

    /// Looks at bytes received while sending only `0xFF`: the first
    /// non-`0xFF` byte after a command is its R1.
    fn answer(&mut self, received: &mut [u8]) {
        for byte in received.iter_mut() {
            if core::mem::take(&mut self.status_byte_lost) {
                if *byte == 0xFF {
                    *byte = 0x00;
                }
                continue;
            }
            let Some(command) = self.awaiting_r1 else {
                continue;
            };
            if *byte == 0xFF {
                continue;
            }
            self.awaiting_r1 = None;
            defmt::trace!("SD command {=u8:#x}: R1 {=u8:#04x}", command, *byte);
            match (command, *byte) {
                (c, 0x00) if c == 0x80 | ACMD41_SEND_OP_COND => self.ready = true,
                (CMD58_READ_OCR, 0x01) if self.ready => {
                    *byte = 0x00;
                    if self.cmd58_fixes == 0 {
                        defmt::info!(
                            "emulator quirk: CMD58 answered R1 0x01 after initialisation, read as 0x00"
                        );
                    }
                    self.cmd58_fixes = self.cmd58_fixes.saturating_add(1);
                }
                (CMD13_SEND_STATUS, 0x04) if self.ready => {
                    *byte = 0x00;
                    self.status_byte_lost = true;
                    if self.cmd13_fixes == 0 {
                        defmt::info!(
                            "emulator quirk: CMD13 answered R1 0x04 and no status byte, read as status 0x0000"
                        );
                    }
                    self.cmd13_fixes = self.cmd13_fixes.saturating_add(1);
                }
                _ => {}
            }
        }
        if let Some(last) = received.last() {
            self.answered = *last != 0xFF;
        }
    }
}

impl spi::ErrorType for SdSpi {
    type Error = SpiError;
}

impl SpiDevice<u8> for SdSpi {
    fn transaction(&mut self, operations: &mut [Operation<'_, u8>]) -> Result<(), SpiError> {
        self.select();
        let mut result = Ok(());
        for operation in operations.iter_mut() {
            result = match operation {
                Operation::Read(buf) => self.run(Bytes::Read(buf)),
                Operation::Write(buf) => self.run(Bytes::Write(buf)),
                Operation::Transfer(read, write) => self.run(Bytes::Transfer(read, write)),
                Operation::TransferInPlace(buf) => self.run(Bytes::InPlace(buf)),
                Operation::DelayNs(ns) => {
                    self.delay.delay_ns(*ns);
                    Ok(())
                }
            };
            if result.is_err() {
                break;
            }
        }
        let idle = self.wait_idle();
        self.deselect();
        result.and(idle)
    }
}
