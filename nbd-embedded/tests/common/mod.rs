//! Test support: an in-memory block device, an `embedded-io` wrapper over
//! `TcpStream`, a server on loopback running `nbd_embedded::io::serve`, and
//! for the smoltcp tests an interface at 127.0.0.1 and request headers;
//! [`tools`] for the tests that run external programs.
#![allow(dead_code)]

pub mod tools;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx};
use nbd_core::server::Config;
use nbd_embedded::BlockStorage;
use nbd_embedded::storage::EraseBlocks;
use smoltcp::iface::{Config as IfaceConfig, Interface};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

/// A card: a vector of blocks shared with the test, and a block whose reads
/// or writes fail (`u32::MAX`: none). It erases blocks (to `0xFF`, as a
/// card whose CSD says erased data reads as ones) only when `erasable`.
#[derive(Clone, Debug, Default)]
pub struct MemCard {
    pub blocks: Arc<Mutex<Vec<[u8; 512]>>>,
    pub fail_read: Arc<AtomicU32>,
    pub fail_write: Arc<AtomicU32>,
    pub reads: Arc<AtomicU32>,
    pub writes: Arc<AtomicU32>,
    pub erasable: Arc<AtomicBool>,
    /// Every erase: (first block, count).
    pub erases: Arc<Mutex<Vec<(u32, u32)>>>,
}

#[derive(Debug)]
pub struct CardError;

impl std::fmt::Display for CardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("card error")
    }
}

impl std::error::Error for CardError {}

impl MemCard {
    pub fn new(blocks: usize) -> Self {
        let card = Self::default();
        *card.blocks.lock().unwrap() = (0..blocks)
            .map(|b| {
                let mut block = [0u8; 512];
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = pattern_byte((b * 512 + i) as u64);
                }
                block
            })
            .collect();
        card.fail_read.store(u32::MAX, Ordering::SeqCst);
        card.fail_write.store(u32::MAX, Ordering::SeqCst);
        card
    }

    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let blocks = self.blocks.lock().unwrap();
        (offset..offset + len as u64)
            .map(|o| blocks[(o / 512) as usize][(o % 512) as usize])
            .collect()
    }
}

/// The initial contents of byte `offset` of a card.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset * 7 % 251) as u8 + 1
}

impl BlockDevice for MemCard {
    type Error = CardError;

    fn read(&self, blocks: &mut [Block], start: BlockIdx) -> Result<(), CardError> {
        let store = self.blocks.lock().unwrap();
        for (i, block) in blocks.iter_mut().enumerate() {
            let idx = start.0 + i as u32;
            if idx == self.fail_read.load(Ordering::SeqCst) {
                return Err(CardError);
            }
            self.reads.fetch_add(1, Ordering::SeqCst);
            block.contents = *store.get(idx as usize).ok_or(CardError)?;
        }
        Ok(())
    }

    fn write(&self, blocks: &[Block], start: BlockIdx) -> Result<(), CardError> {
        let mut store = self.blocks.lock().unwrap();
        for (i, block) in blocks.iter().enumerate() {
            let idx = start.0 + i as u32;
            if idx == self.fail_write.load(Ordering::SeqCst) {
                return Err(CardError);
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            *store.get_mut(idx as usize).ok_or(CardError)? = block.contents;
        }
        Ok(())
    }

    fn num_blocks(&self) -> Result<BlockCount, CardError> {
        Ok(BlockCount(self.blocks.lock().unwrap().len() as u32))
    }
}

impl EraseBlocks for MemCard {
    fn can_erase_blocks(&self) -> bool {
        self.erasable.load(Ordering::SeqCst)
    }

    fn erase_blocks(&self, start: BlockIdx, count: u32) -> Result<(), CardError> {
        assert!(self.can_erase_blocks(), "erase on a card that cannot");
        self.erases.lock().unwrap().push((start.0, count));
        let mut store = self.blocks.lock().unwrap();
        for idx in start.0..start.0 + count {
            store.get_mut(idx as usize).ok_or(CardError)?.fill(0xFF);
        }
        Ok(())
    }
}

/// `embedded-io` over a std stream.
pub struct Stream(pub TcpStream);

#[derive(Debug)]
pub struct StreamError(pub std::io::Error);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StreamError {}

impl embedded_io::Error for StreamError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

impl embedded_io::ErrorType for Stream {
    type Error = StreamError;
}

impl embedded_io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        let r = std::io::Read::read(&mut self.0, buf).map_err(StreamError);
        if std::env::var("TRACE").is_ok() {
            eprintln!("server read {:?}", r.as_ref().ok());
        }
        r
    }
}

impl embedded_io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        let r = std::io::Write::write(&mut self.0, buf).map_err(StreamError);
        if std::env::var("TRACE").is_ok() {
            eprintln!("server wrote {:?} of {}", r.as_ref().ok(), buf.len());
        }
        r
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        std::io::Write::flush(&mut self.0).map_err(StreamError)
    }
}

pub type Outcome = Result<Option<nbd_core::server::CloseReason>, String>;

/// Serves `card` to `clients` clients one after another on a loopback
/// port, with an input buffer of `buffer` bytes. Returns the port and the
/// thread, which yields each client's outcome.
pub fn spawn_server(
    card: MemCard,
    buffer: usize,
    clients: usize,
) -> (u16, JoinHandle<Vec<Outcome>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let mut storage = BlockStorage::with_erase(card).unwrap();
        let mut input = vec![0u8; buffer];
        let mut outcomes = Vec::new();
        for _ in 0..clients {
            let (stream, _) = listener.accept().unwrap();
            let exports = [storage.export("card")];
            let result = nbd_embedded::io::serve(
                Config::default(),
                exports,
                &mut storage,
                Stream(stream),
                &mut input,
            );
            outcomes.push(result.map_err(|e| e.to_string()));
        }
        outcomes
    });
    (port, thread)
}

/// A smoltcp interface on `device` at 127.0.0.1/8, at time zero: the
/// network of the smoltcp tests (server and client sockets side by side).
pub fn loopback_interface<D: smoltcp::phy::Device + ?Sized>(device: &mut D) -> Interface {
    let config = IfaceConfig::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
    let mut iface = Interface::new(config, device, Instant::from_millis(0));
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8))
            .unwrap();
    });
    iface
}

/// A request header (`NBD_REQUEST_MAGIC`, 28 bytes).
pub fn request_header(flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(28);
    header.extend(0x2560_9513u32.to_be_bytes());
    header.extend(flags.to_be_bytes());
    header.extend(command.to_be_bytes());
    header.extend(handle.to_be_bytes());
    header.extend(offset.to_be_bytes());
    header.extend(length.to_be_bytes());
    header
}
