//! The SD card as served: `embedded-sdmmc`'s `SdCard` on [`SdSpi`], with
//! its size established once when it is opened, and erase (for TRIM)
//! where the CSD says the card erases single blocks.
//!
//! QEMU 10.0's model erases (CMD32/CMD33/CMD38 in SPI mode: the blocks
//! then read as `0xFF`) but its CSD does not read (below), so there TRIM
//! is not offered.
//!
//! # Emulator quirk: no CSD in SPI mode (QEMU 9.1 to 10.0)
//!
//! In these QEMU versions the SD model answers SEND_CSD (CMD9) in SPI mode
//! only in the "standby" state, which SPI mode never enters: CMD9 gets
//! R1 = `0x04` (illegal command) and `SdCard::num_bytes` fails with
//! `RegisterReadError` (fixed in QEMU 10.1; 7.2 works). The card itself
//! works, so when the CSD cannot be read the size is found by reading:
//! the last block that answers a single-block read, by doubling and then
//! bisecting. On a card whose CSD reads (every real card, QEMU 7.2 and
//! 10.1+) this never runs.

use embedded_sdmmc::embedded_sdmmc_types::sdcard::CardType;
use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx, SdCard, SdCardError as Error};
use nbd_embedded::storage::EraseBlocks;

use crate::sd_spi::SdSpi;
use crate::time::Delay;

/// The SD card with its size in blocks.
pub struct Card {
    sd: SdCard<SdSpi, Delay>,
    blocks: u32,
    probed: bool,
    /// The CSD says the card erases single blocks (`ERASE_BLK_EN`; always
    /// so on SDHC/SDXC). Unknown, so off, when the CSD does not read.
    erases_blocks: bool,
}

impl Card {
    /// Initialises the card (at the slow identification clock), switches
    /// the bus to `fast_hz`, and finds the card's size.
    pub fn open(sd: SdCard<SdSpi, Delay>, fast_hz: u32) -> Result<Self, Error> {
        let from_csd = match sd.num_bytes() {
            Ok(bytes) => Some(bytes / Block::LEN as u64),
            // The card initialised but its CSD did not read.
            Err(Error::RegisterReadError) => None,
            Err(error) => return Err(error),
        };
        let erases_blocks = from_csd.is_some() && sd.erase_single_block_enabled().unwrap_or(false);
        sd.spi(|spi| spi.set_frequency(fast_hz));
        let (blocks, probed) = match from_csd {
            Some(blocks) => (u32::try_from(blocks).unwrap_or(u32::MAX), false),
            None => (probe_blocks(&sd)?, true),
        };
        Ok(Self {
            sd,
            blocks,
            probed,
            erases_blocks,
        })
    }

    /// The driver, for its SPI bus and card type.
    pub fn sd(&self) -> &SdCard<SdSpi, Delay> {
        &self.sd
    }

    /// Whether the size came from probing reads instead of the CSD (the
    /// emulator quirk above).
    pub fn probed(&self) -> bool {
        self.probed
    }

    /// The card's type, as found at initialisation.
    pub fn card_type(&self) -> Option<CardType> {
        self.sd.get_card_type()
    }
}

/// The number of blocks that answer reads: doubling from block 0 until a
/// read fails, then bisecting. Each failed read costs the driver's read
/// timeout (about 100 ms), so this takes about a second.
fn probe_blocks(sd: &SdCard<SdSpi, Delay>) -> Result<u32, Error> {
    let mut scratch = [Block::new()];
    let mut readable = |block: u32| sd.read(&mut scratch, BlockIdx(block)).is_ok();
    // SDSC cards take byte addresses: 32 bits reach 2^23 blocks.
    let limit = match sd.get_card_type() {
        Some(CardType::SdhcSdxc) => u32::MAX,
        _ => 1 << 23,
    };
    if !readable(0) {
        return Err(Error::ReadError);
    }
    let (mut good, mut bad) = (0u32, limit);
    let mut step = 1u32;
    while good < limit - 1 {
        let probe = good.saturating_add(step).min(limit - 1);
        if readable(probe) {
            good = probe;
            step = step.saturating_mul(2);
        } else {
            bad = probe;
            break;
        }
    }
    while bad - good > 1 {
        let middle = good + (bad - good) / 2;
        if readable(middle) {
            good = middle;
        } else {
            bad = middle;
        }
    }
    Ok(good + 1)
}

impl core::fmt::Debug for Card {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Card")
            .field("blocks", &self.blocks)
            .field("probed", &self.probed)
            .field("erases_blocks", &self.erases_blocks)
            .finish_non_exhaustive()
    }
}

impl BlockDevice for Card {
    type Error = Error;

    fn read(&self, blocks: &mut [Block], start: BlockIdx) -> Result<(), Error> {
        self.sd.read(blocks, start)
    }

    fn write(&self, blocks: &[Block], start: BlockIdx) -> Result<(), Error> {
        self.sd.write(blocks, start)
    }

    fn num_blocks(&self) -> Result<BlockCount, Error> {
        Ok(BlockCount(self.blocks))
    }
}

impl EraseBlocks for Card {
    fn can_erase_blocks(&self) -> bool {
        self.erases_blocks
    }

    fn erase_blocks(&self, start: BlockIdx, count: u32) -> Result<(), Error> {
        let last = start
            .0
            .checked_add(count.saturating_sub(1))
            .ok_or(Error::BadState)?;
        // SDSC cards take byte addresses, SDHC/SDXC block numbers.
        let (first, last) = match self.sd.get_card_type() {
            Some(CardType::SdhcSdxc) => (start.0, last),
            Some(_) => (
                start.0.checked_mul(Block::LEN_U32).ok_or(Error::BadState)?,
                last.checked_mul(Block::LEN_U32).ok_or(Error::BadState)?,
            ),
            None => return Err(Error::CardNotFound),
        };
        self.sd.spi(|spi| spi.erase(first, last))
    }
}
