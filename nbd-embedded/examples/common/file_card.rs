//! A file standing in for an SD card behind `embedded_sdmmc::BlockDevice`,
//! shared by the host examples (`tap_sim`, `embassy_tap`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx};

/// What the file-backed card reports through `BlockDevice`.
#[derive(Debug)]
pub enum CardError {
    /// Reading, writing or syncing the file failed.
    Io(std::io::Error),
    /// The file's size is not a whole number of 512-byte blocks.
    NotWholeBlocks(u64),
    /// The file has more blocks than a `u32` block index reaches.
    TooLarge(u64),
    /// A block index past the end of the card.
    OutOfRange(u32),
}

impl fmt::Display for CardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(error) => write!(f, "{error}"),
            Self::NotWholeBlocks(size) => {
                write!(f, "size {size} is not a multiple of {} bytes", Block::LEN)
            }
            Self::TooLarge(size) => write!(f, "size {size} is too large for 32-bit block indices"),
            Self::OutOfRange(block) => write!(f, "block {block} is past the end of the card"),
        }
    }
}

impl std::error::Error for CardError {}

/// A card made of a file: block `n` is bytes `512 n .. 512 (n + 1)`.
#[derive(Debug)]
pub struct FileCard {
    file: File,
    blocks: u32,
}

impl FileCard {
    pub fn open(path: &Path) -> Result<Self, CardError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(CardError::Io)?;
        let size = file.metadata().map_err(CardError::Io)?.len();
        if size % Block::LEN_U32 as u64 != 0 {
            return Err(CardError::NotWholeBlocks(size));
        }
        let blocks =
            u32::try_from(size / Block::LEN_U32 as u64).map_err(|_| CardError::TooLarge(size))?;
        Ok(Self { file, blocks })
    }

    /// The byte offset of block `start + i`, checked against the card's end.
    fn offset(&self, start: BlockIdx, i: usize) -> Result<u64, CardError> {
        let block = u32::try_from(i)
            .ok()
            .and_then(|i| start.0.checked_add(i))
            .filter(|&b| b < self.blocks)
            .ok_or(CardError::OutOfRange(start.0))?;
        Ok(u64::from(block) * Block::LEN_U32 as u64)
    }
}

impl BlockDevice for FileCard {
    type Error = CardError;

    fn read(&self, blocks: &mut [Block], start: BlockIdx) -> Result<(), CardError> {
        for (i, block) in blocks.iter_mut().enumerate() {
            let offset = self.offset(start, i)?;
            self.file
                .read_exact_at(&mut block.contents, offset)
                .map_err(CardError::Io)?;
        }
        Ok(())
    }

    /// Returns once the blocks are on disk: a card's write is complete when
    /// the card answers, and `BlockStorage` relies on that for FLUSH.
    fn write(&self, blocks: &[Block], start: BlockIdx) -> Result<(), CardError> {
        for (i, block) in blocks.iter().enumerate() {
            let offset = self.offset(start, i)?;
            self.file
                .write_all_at(&block.contents, offset)
                .map_err(CardError::Io)?;
        }
        self.file.sync_data().map_err(CardError::Io)
    }

    fn num_blocks(&self) -> Result<BlockCount, CardError> {
        Ok(BlockCount(self.blocks))
    }
}
