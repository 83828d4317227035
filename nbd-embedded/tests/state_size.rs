//! RAM the embedded server state takes, a number the project tracks (crate
//! docs "Memory", docs/EMBEDDED.md). Run with `--nocapture` to see it.
//! These are host (64-bit) sizes; thumb targets are a little smaller (the
//! crate docs list both).

use core::mem::size_of;

use embedded_sdmmc::{Block, BlockCount, BlockDevice, BlockIdx};
use nbd_core::export::Export;
use nbd_core::server::SmallConnection;
use nbd_embedded::BlockStorage;
use nbd_embedded::net::TcpServer;
use nbd_embedded::storage::SharedCard;

/// A device of no size, so the figures are the crate's own (a real SPI
/// card driver adds its bus handle and delay).
#[derive(Debug)]
struct NoCard;

impl BlockDevice for NoCard {
    // Any error type will do: nothing is ever read or written.
    type Error = core::fmt::Error;

    fn read(&self, _: &mut [Block], _: BlockIdx) -> Result<(), core::fmt::Error> {
        Err(core::fmt::Error)
    }

    fn write(&self, _: &[Block], _: BlockIdx) -> Result<(), core::fmt::Error> {
        Err(core::fmt::Error)
    }

    fn num_blocks(&self) -> Result<BlockCount, core::fmt::Error> {
        Ok(BlockCount(0))
    }
}

type Catalog = &'static [Export<'static>];

#[test]
fn embedded_server_state_sizes() {
    let storage = size_of::<BlockStorage<NoCard>>();
    let connection = size_of::<SmallConnection<Catalog>>();
    let server = size_of::<TcpServer<Catalog, NoCard>>();
    let tiny = size_of::<TcpServer<Catalog, NoCard, 4, 128>>();
    // What each client served at once costs (net::poll_all over servers
    // sharing the card), without its socket buffers.
    let shared = size_of::<TcpServer<Catalog, SharedCard<'static, NoCard>>>();
    let socket = size_of::<smoltcp::socket::tcp::Socket<'static>>();
    let iface = size_of::<smoltcp::iface::Interface>();
    println!("size_of BlockStorage<D> (scratch block + state, plus D): {storage} bytes");
    println!(
        "size_of SmallConnection<&[Export]> (core, 16 requests, 320-byte buffer): {connection} bytes"
    );
    println!("size_of net::TcpServer<&[Export], D> (storage + connection + shell): {server} bytes");
    println!("size_of net::TcpServer<&[Export], D, 4, 128>: {tiny} bytes");
    println!(
        "size_of net::TcpServer<&[Export], SharedCard<D>> (per concurrent client): {shared} bytes"
    );
    println!("size_of smoltcp tcp::Socket (without its buffers): {socket} bytes");
    println!("size_of smoltcp Interface: {iface} bytes");
    assert!(
        storage <= Block::LEN + 32,
        "BlockStorage grew to {storage} bytes: one block plus a few words is the design"
    );
    assert!(
        server < 2560,
        "TcpServer grew to {server} bytes; the budget is 2.5 KiB on a 64-bit host"
    );
    assert!(
        shared <= server + size_of::<usize>(),
        "sharing the card must cost at most the reference ({shared} vs {server} bytes)"
    );
    assert!(
        tiny < server,
        "fewer requests and a smaller buffer must save RAM"
    );
}
