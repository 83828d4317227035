//! System control: the PLL and system clock, peripheral clock gates, and
//! the MAC address programmed into the user registers.
//!
//! Register map: LM3S6965 data sheet, chapter 6 "System Control"
//! (base `0x400F_E000`).

use crate::mmio::Reg;

const BASE: usize = 0x400F_E000;
// SAFETY (all below): System Control registers of the LM3S6965.
/// Raw interrupt status (bit 6: PLL locked).
const RIS: Reg = unsafe { Reg::at(BASE + 0x050) };
/// Masked interrupt status and clear.
const MISC: Reg = unsafe { Reg::at(BASE + 0x058) };
/// Run-mode clock configuration.
const RCC: Reg = unsafe { Reg::at(BASE + 0x060) };
/// Run-mode clock gating 1 (SSI0, …).
const RCGC1: Reg = unsafe { Reg::at(BASE + 0x104) };
/// Run-mode clock gating 2 (GPIO ports, Ethernet MAC and PHY).
const RCGC2: Reg = unsafe { Reg::at(BASE + 0x108) };
/// User registers 0 and 1: the factory MAC address, 3 bytes each.
const USER0: Reg = unsafe { Reg::at(BASE + 0x1E0) };
const USER1: Reg = unsafe { Reg::at(BASE + 0x1E4) };

const RIS_PLL_LOCKED: u32 = 1 << 6;
const RCC_MOSCDIS: u32 = 1 << 0;
const RCC_OSCSRC_MASK: u32 = 0b11 << 4;
const RCC_XTAL_MASK: u32 = 0xF << 6;
/// XTAL field for the 8 MHz crystal of the evaluation board.
const RCC_XTAL_8MHZ: u32 = 0xE << 6;
const RCC_BYPASS: u32 = 1 << 11;
const RCC_PWRDN: u32 = 1 << 13;
const RCC_USESYSDIV: u32 = 1 << 22;
const RCC_SYSDIV_MASK: u32 = 0xF << 23;
/// SYSDIV 3: the 200 MHz PLL output divided by 4.
const RCC_SYSDIV_50MHZ: u32 = 3 << 23;

/// The system clock the PLL gives (200 MHz / 4).
pub const PLL_CLOCK_HZ: u32 = 50_000_000;
/// The clock without the PLL: the 8 MHz crystal divided by SYSDIV + 1.
const CRYSTAL_HZ: u32 = 8_000_000;
/// How often to look for the PLL lock before giving up (it takes under
/// 0.5 ms; each look is a few cycles at the crystal's 8 MHz at most).
const PLL_LOCK_POLLS: u32 = 100_000;

/// A peripheral whose clock is gated in RCGC1/RCGC2.
#[derive(Clone, Copy, Debug)]
pub enum Peripheral {
    /// Synchronous serial interface 0 (the SD card's SPI).
    Ssi0,
    /// GPIO port A (SSI0 clock, receive and transmit pins).
    GpioA,
    /// GPIO port D (the SD card's chip select, pin 0).
    GpioD,
    /// The Ethernet MAC and its PHY.
    Ethernet,
}

/// Runs the system clock from the PLL at 50 MHz, the nominal clock of the
/// LM3S6965 evaluation board, and returns the core clock in Hz.
///
/// The reset clock differs between the chip (the 12 MHz internal
/// oscillator) and QEMU (200 MHz divided by the reset SYSDIV of 16:
/// 12.5 MHz), so time must not be measured before this. QEMU derives the
/// clock from SYSDIV alone, the chip from BYPASS, USESYSDIV and SYSDIV:
/// this sequence (the data sheet's, section 6.3) gives 50 MHz on both.
/// If the PLL never locks, the clock stays on the crystal and the
/// returned frequency says so.
pub fn configure_clock() -> u32 {
    // Run from the raw oscillator while the PLL is reconfigured.
    let mut rcc = RCC.read();
    rcc |= RCC_BYPASS;
    rcc &= !RCC_USESYSDIV;
    RCC.write(rcc);

    // Main oscillator on with the board's crystal; PLL powered.
    rcc &= !(RCC_MOSCDIS | RCC_OSCSRC_MASK | RCC_XTAL_MASK | RCC_PWRDN);
    rcc |= RCC_XTAL_8MHZ;
    MISC.write(RIS_PLL_LOCKED);
    RCC.write(rcc);

    rcc = (rcc & !RCC_SYSDIV_MASK) | RCC_SYSDIV_50MHZ | RCC_USESYSDIV;
    RCC.write(rcc);

    let locked = (0..PLL_LOCK_POLLS).any(|_| RIS.read() & RIS_PLL_LOCKED != 0);
    if !locked {
        // Stay on the crystal, divided by SYSDIV + 1.
        return CRYSTAL_HZ / 4;
    }
    RCC.write(rcc & !RCC_BYPASS);
    PLL_CLOCK_HZ
}

/// Turns on the clock of `peripheral` and waits the few cycles the data
/// sheet asks for before its registers may be touched.
pub fn enable(peripheral: Peripheral) {
    match peripheral {
        Peripheral::Ssi0 => RCGC1.set_bits(1 << 4),
        Peripheral::GpioA => RCGC2.set_bits(1 << 0),
        Peripheral::GpioD => RCGC2.set_bits(1 << 3),
        Peripheral::Ethernet => RCGC2.set_bits((1 << 28) | (1 << 30)),
    }
    // "at least 3 system clocks" after enabling a peripheral's clock.
    cortex_m::asm::delay(3);
}

/// The MAC address from the user registers (programmed at the factory on
/// the evaluation board; QEMU fills them from `-nic …,mac=`), or `None`
/// if they are blank (all ones).
pub fn mac_address() -> Option<[u8; 6]> {
    let (low, high) = (USER0.read(), USER1.read());
    if low == u32::MAX || high == u32::MAX {
        return None;
    }
    let [a, b, c, _] = low.to_le_bytes();
    let [d, e, f, _] = high.to_le_bytes();
    Some([a, b, c, d, e, f])
}
