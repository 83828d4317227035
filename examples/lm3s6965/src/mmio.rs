//! A 32-bit memory-mapped register at a fixed address.
//!
//! The drivers touch a handful of registers of the LM3S6965 (system
//! control, GPIO, SSI, Ethernet MAC), so a register is a plain address with
//! volatile reads and writes rather than a generated register-block crate.

/// A 32-bit peripheral register.
#[derive(Clone, Copy, Debug)]
pub struct Reg(usize);

impl Reg {
    /// The register at `address`.
    ///
    /// # Safety
    ///
    /// `address` must be a 32-bit register of the LM3S6965's peripheral
    /// space (not RAM or flash the program uses), so that volatile reads
    /// and writes of it cannot alias Rust data.
    pub const unsafe fn at(address: usize) -> Self {
        Self(address)
    }

    /// Reads the register.
    #[inline(always)]
    pub fn read(self) -> u32 {
        // SAFETY: the constructor's contract: a peripheral register, aligned,
        // never Rust memory.
        unsafe { core::ptr::read_volatile(self.0 as *const u32) }
    }

    /// Writes the register.
    #[inline(always)]
    pub fn write(self, value: u32) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile(self.0 as *mut u32, value) }
    }

    /// Read-modify-write (not atomic: callers own their registers).
    #[inline(always)]
    pub fn modify(self, f: impl FnOnce(u32) -> u32) {
        self.write(f(self.read()));
    }

    /// Sets the bits of `mask`.
    #[inline(always)]
    pub fn set_bits(self, mask: u32) {
        self.modify(|v| v | mask);
    }
}
