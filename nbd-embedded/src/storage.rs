//! The block storage adapter: an NBD export over an
//! [`embedded_sdmmc::BlockDevice`] (512-byte blocks) with byte granularity.
//!
//! All traffic goes through one scratch [`Block`]: reads fetch one block at
//! a time and hand out slices of it; writes collect bytes in it and write a
//! block as soon as it is whole. A write that starts or ends inside a block
//! reads that block first (read-modify-write), so clients may use any offset
//! and length (the export advertises a minimum block size of 1 and a
//! preferred size of 512). However long a request, the adapter never holds
//! more than this one block.
//!
//! Durability: `BlockDevice::write` returns once the card accepted the
//! data, and the adapter writes every block back before a write request is
//! answered. So a write is as durable as the card makes it when its reply
//! goes out; `NBD_CMD_FLUSH` and `NBD_CMD_FLAG_FUA` cost nothing more than
//! writing back a partial block (there never is one between requests).
//!
//! TRIM: a device that can erase single blocks ([`EraseBlocks`], an SD
//! card's CMD32/CMD33/CMD38) wrapped with [`BlockStorage::with_erase`] gets
//! `NBD_CMD_TRIM` advertised and mapped to erasing the whole blocks inside
//! the range (the partial blocks at its edges are left alone: TRIM is
//! advisory). Write-zeroes never uses erase: what erased blocks read as is
//! the card's choice, so zeroes are written.

use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx};
use nbd_core::export::{Capabilities, Export};
use nbd_core::wire::BlockSizeConstraints;

/// Bytes in a block of the device.
pub const BLOCK_SIZE: usize = Block::LEN;

/// Largest request the exports built by [`BlockStorage::export`] accept
/// (the spec's interoperable 32 MiB). Requests are streamed, so this costs
/// no memory.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// The block sizes an export over a [`BlockStorage`] advertises: any byte
/// offset and length (read-modify-write at the edges), 512 preferred.
pub const BLOCK_SIZES: BlockSizeConstraints = BlockSizeConstraints {
    minimum: 1,
    preferred: BLOCK_SIZE as u32,
    maximum: MAX_REQUEST,
};

/// What the adapter supports: flush and FUA (writes are synchronous),
/// write-zeroes (written as zero blocks; not fast). No multi-conn: each
/// `BlockStorage` has its own scratch block, so when several servers share
/// one card ([`SharedCard`]) a write still being streamed into one scratch
/// block may overwrite another connection's concurrent write to other
/// bytes of the same 512-byte block (see [`SharedCard`]).
pub const CAPABILITIES: Capabilities = Capabilities {
    flush: true,
    fua: true,
    write_zeroes: true,
    cache: true,
    ..Capabilities::NONE
};

const ZEROES: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// A block device that can erase blocks: on an SD card,
/// ERASE_WR_BLK_START (CMD32), ERASE_WR_BLK_END (CMD33) and ERASE (CMD38).
/// What erased blocks read as afterwards is the device's choice (an SD
/// card's CSD says zeroes or ones), which is all `NBD_CMD_TRIM` asks.
pub trait EraseBlocks: BlockDevice {
    /// Whether erasing works block by block on this device. An SD card
    /// whose CSD says `ERASE_BLK_EN = 0` erases whole sectors (many blocks)
    /// and must answer `false`, or a TRIM would erase data around it.
    fn can_erase_blocks(&self) -> bool;

    /// Erases the `count` blocks from `start`.
    fn erase_blocks(&self, start: BlockIdx, count: u32) -> Result<(), Self::Error>;
}

/// How [`BlockStorage`] erases, when its device can.
type EraseFn<D> = fn(&D, BlockIdx, u32) -> Result<(), <D as BlockDevice>::Error>;

/// An export over a block device, with one scratch block of RAM.
#[derive(Debug)]
pub struct BlockStorage<D: BlockDevice> {
    device: D,
    /// Set by [`BlockStorage::with_erase`] when the device can erase.
    erase: Option<EraseFn<D>>,
    blocks: u32,
    scratch: Block,
    /// Which block the scratch holds, if any.
    cached: Option<u32>,
    /// Whether the scratch holds bytes not yet written to the device.
    dirty: bool,
}

impl<D: BlockDevice> BlockStorage<D> {
    /// Wraps `device`, asking it for its size.
    pub fn new(device: D) -> Result<Self, D::Error> {
        let BlockCount(blocks) = device.num_blocks()?;
        Ok(Self {
            device,
            erase: None,
            blocks,
            scratch: Block::new(),
            cached: None,
            dirty: false,
        })
    }

    /// Wraps `device` as [`BlockStorage::new`] does, and serves TRIM by
    /// erasing if the device says it can ([`EraseBlocks::can_erase_blocks`],
    /// asked once, here).
    pub fn with_erase(device: D) -> Result<Self, D::Error>
    where
        D: EraseBlocks,
    {
        let can_erase = device.can_erase_blocks();
        let mut storage = Self::new(device)?;
        if can_erase {
            storage.erase = Some(<D as EraseBlocks>::erase_blocks);
        }
        Ok(storage)
    }

    /// Whether TRIM is served (by erasing blocks).
    pub fn can_trim(&self) -> bool {
        self.erase.is_some()
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        u64::from(self.blocks) * BLOCK_SIZE as u64
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Gives the device back (after writing back nothing: the scratch is
    /// clean between requests).
    pub fn into_inner(self) -> D {
        self.device
    }

    /// An export description of the whole device under `name`, with the
    /// adapter's block sizes and capabilities.
    pub fn export<'a>(&self, name: &'a str) -> Export<'a> {
        Export::new(name, self.size())
            .with_block_sizes(BLOCK_SIZES)
            .with_capabilities(Capabilities {
                trim: self.can_trim(),
                ..CAPABILITIES
            })
    }

    /// Forgets the scratch contents (after an error, the block's state on
    /// the card is unknown).
    pub fn invalidate(&mut self) {
        self.cached = None;
        self.dirty = false;
    }

    /// Drops the scratch block if it holds nothing unwritten, so that the
    /// next read comes from the card. Called when a read starts sending:
    /// another server sharing the card ([`SharedCard`]), or other code of
    /// the application, may have written that block since it was cached.
    pub(crate) fn forget_clean(&mut self) {
        if !self.dirty {
            self.cached = None;
        }
    }

    /// Makes the scratch hold `block`, reading it unless `overwrite` says
    /// every byte will be replaced. Unwritten bytes of another block are
    /// dropped: they can only be left over from a write that never got
    /// its whole payload (the client went away). A clean copy of `block`
    /// is reused only if `reuse_clean` (a read going on within a block);
    /// a write starting in a block reads it again, so that it merges with
    /// what is on the card now, not with what was there when it was cached.
    /// If the read fails, the scratch holds no block.
    fn load(&mut self, block: u32, overwrite: bool, reuse_clean: bool) -> Result<(), D::Error> {
        if self.cached == Some(block) && (self.dirty || reuse_clean) {
            return Ok(());
        }
        self.invalidate();
        if !overwrite {
            self.device
                .read(core::slice::from_mut(&mut self.scratch), BlockIdx(block))?;
        }
        self.cached = Some(block);
        Ok(())
    }

    /// Writes the scratch block to the device if it holds unwritten bytes.
    pub fn write_back(&mut self) -> Result<(), D::Error> {
        if let (true, Some(block)) = (self.dirty, self.cached) {
            let result = self
                .device
                .write(core::slice::from_ref(&self.scratch), BlockIdx(block));
            if result.is_err() {
                self.invalidate();
            }
            result?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Reads from `offset` to the end of its block, at most `max` bytes;
    /// the slice borrows the scratch block. `offset` must be below
    /// [`size`](Self::size).
    pub fn read_piece(&mut self, offset: u64, max: usize) -> Result<&[u8], D::Error> {
        let block = (offset / BLOCK_SIZE as u64) as u32;
        let within = (offset % BLOCK_SIZE as u64) as usize;
        let n = max.min(BLOCK_SIZE - within);
        self.load(block, false, true)?;
        Ok(&self.scratch.contents[within..within + n])
    }

    /// Stores `data` at `offset`, with `remaining` more bytes of the same
    /// write to follow right after it: whole blocks are written through at
    /// once, a partial block waits in the scratch for the next piece or
    /// for [`write_back`](Self::write_back). Pieces of one write come in
    /// order, so a block split between pieces is written once, and read
    /// first only if the write does not cover all of it.
    pub fn write_piece(
        &mut self,
        mut offset: u64,
        mut data: &[u8],
        remaining: u64,
    ) -> Result<(), D::Error> {
        while !data.is_empty() {
            let block = (offset / BLOCK_SIZE as u64) as u32;
            let within = (offset % BLOCK_SIZE as u64) as usize;
            let n = data.len().min(BLOCK_SIZE - within);
            let covered = within == 0 && data.len() as u64 + remaining >= BLOCK_SIZE as u64;
            self.load(block, covered, false)?;
            self.scratch.contents[within..within + n].copy_from_slice(&data[..n]);
            self.dirty = true;
            if within + n == BLOCK_SIZE {
                self.write_back()?;
            }
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes `length` zero bytes from `offset` (read-modify-write at the
    /// edges), then writes back.
    pub fn write_zeroes(&mut self, mut offset: u64, mut length: u64) -> Result<(), D::Error> {
        while length > 0 {
            let within = (offset % BLOCK_SIZE as u64) as usize;
            let n = length.min((BLOCK_SIZE - within) as u64) as usize;
            self.write_piece(offset, &ZEROES[..n], 0)?;
            offset += n as u64;
            length -= n as u64;
        }
        self.write_back()
    }

    /// Erases the whole blocks inside `offset..offset + length` (the range
    /// must lie within the device); nothing when TRIM is not served or the
    /// range holds no whole block.
    pub fn trim(&mut self, offset: u64, length: u64) -> Result<(), D::Error> {
        let Some(erase) = self.erase else {
            return Ok(());
        };
        let block = BLOCK_SIZE as u64;
        let first = offset.div_ceil(block);
        let end = offset.saturating_add(length) / block;
        let (Ok(start), Ok(count)) = (
            u32::try_from(first),
            u32::try_from(end.saturating_sub(first)),
        ) else {
            return Ok(());
        };
        if count == 0 {
            return Ok(());
        }
        // Unwritten bytes are never left between requests, but a partial
        // block of this range may be; and the scratch must not keep a copy
        // of an erased block.
        self.write_back()?;
        if self
            .cached
            .is_some_and(|b| (start..start + count).contains(&b))
        {
            self.cached = None;
        }
        erase(&self.device, BlockIdx(start), count)
    }

    /// Makes every write so far durable: writes back a partial block, if
    /// any. `BlockDevice` writes are synchronous, so nothing else is
    /// pending.
    pub fn flush(&mut self) -> Result<(), D::Error> {
        self.write_back()
    }
}

/// `length` bytes of zeroes at most one block long, for padding.
pub(crate) fn zeroes(length: u64) -> &'static [u8] {
    &ZEROES[..length.min(BLOCK_SIZE as u64) as usize]
}

/// A [`BlockDevice`] borrowed: lets several [`BlockStorage`]s (one per
/// [`TcpServer`](crate::net::TcpServer), so one per concurrent client)
/// share one card in a single-threaded poll loop. `BlockDevice` methods
/// take `&self` and `embedded-sdmmc` implements the trait only for owned
/// devices, hence this adapter; every call is passed on unchanged.
///
/// ```
/// # use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx};
/// # #[derive(Debug)] struct Card;
/// # #[derive(Debug)] struct E;
/// # impl core::fmt::Display for E { fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result { f.write_str("e") } }
/// # impl core::error::Error for E {}
/// # impl BlockDevice for Card {
/// #     type Error = E;
/// #     fn read(&self, _: &mut [Block], _: BlockIdx) -> Result<(), E> { Ok(()) }
/// #     fn write(&self, _: &[Block], _: BlockIdx) -> Result<(), E> { Ok(()) }
/// #     fn num_blocks(&self) -> Result<BlockCount, E> { Ok(BlockCount(8)) }
/// # }
/// use nbd_embedded::BlockStorage;
/// use nbd_embedded::storage::SharedCard;
///
/// let card = Card;
/// let first = BlockStorage::new(SharedCard(&card))?;
/// let second = BlockStorage::new(SharedCard(&card))?;
/// assert_eq!(first.size(), second.size());
/// # Ok::<(), E>(())
/// ```
///
/// Consistency: each storage writes every block of a write to the card
/// before the write is answered, a read fetches its first block from the
/// card when its reply is queued, and a write that starts inside a block
/// reads that block again; so a write answered on one connection is seen
/// by reads and writes that start later on any other, and every answered
/// write is on the card when any connection's FLUSH is answered. What is
/// not shared is a write still in progress: streamed across several
/// polls, it keeps a partly filled block in its own scratch, and when
/// that block is written back it overwrites what another connection wrote
/// meanwhile to other bytes of the same 512-byte block. So the exports do
/// not advertise `NBD_FLAG_CAN_MULTI_CONN`, and clients writing through
/// several connections must not write the same block at the same time
/// (one writer and any number of readers are fine).
#[derive(Debug)]
pub struct SharedCard<'a, D>(pub &'a D);

// Not derived: a derive would require `D: Clone`, but a reference copies.
impl<D> Clone for SharedCard<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D> Copy for SharedCard<'_, D> {}

impl<D: BlockDevice> BlockDevice for SharedCard<'_, D> {
    type Error = D::Error;

    fn read(&self, blocks: &mut [Block], start: BlockIdx) -> Result<(), D::Error> {
        self.0.read(blocks, start)
    }

    fn write(&self, blocks: &[Block], start: BlockIdx) -> Result<(), D::Error> {
        self.0.write(blocks, start)
    }

    fn num_blocks(&self) -> Result<BlockCount, D::Error> {
        self.0.num_blocks()
    }
}

impl<D: EraseBlocks> EraseBlocks for SharedCard<'_, D> {
    fn can_erase_blocks(&self) -> bool {
        self.0.can_erase_blocks()
    }

    fn erase_blocks(&self, start: BlockIdx, count: u32) -> Result<(), D::Error> {
        self.0.erase_blocks(start, count)
    }
}
