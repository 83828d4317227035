//! NBD server firmware for the Stellaris LM3S6965 evaluation board: the SD
//! card, exported over Ethernet with `nbd-embedded`.
//!
//! - Network: smoltcp on the on-chip MAC ([`ethernet`]), static address
//!   10.0.2.15/24 with gateway 10.0.2.2 (QEMU's user networking), NBD on
//!   TCP port 10809, one client at a time; a second socket (standby)
//!   accepts the next client meanwhile.
//! - Storage: `embedded-sdmmc`'s `SdCard` on SSI0 ([`sd_spi`]), served
//!   whole as export `sd` (also the default export) by
//!   `nbd_embedded::BlockStorage`.
//! - Time: SysTick at 1 ms on the 50 MHz PLL clock ([`time`], [`sysctl`]).
//! - Log: `defmt` over semihosting; decode with `defmt-print -e ELF`.
//!
//! The main loop polls the server, then sleeps in `WFI` until a frame
//! arrives, the next SysTick, or smoltcp's next deadline.
//!
//! Run it in QEMU with `run-qemu.sh CARD [PORT]` (see docs/EMBEDDED.md).
#![no_std]
#![no_main]

mod card;
mod ethernet;
mod mmio;
mod sd_spi;
mod sysctl;
mod time;

use core::mem::size_of;

use cortex_m::singleton;
use cortex_m_rt::{ExceptionFrame, entry, exception};
use defmt_semihosting as _;
use embedded_sdmmc::SdCard;
use lm3s6965::{Interrupt, interrupt};
use nbd_core::export::Export;
use nbd_core::server::Config;
use nbd_embedded::BlockStorage;
use nbd_embedded::net::TcpServer;
use nbd_embedded::storage::EraseBlocks;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet, SocketStorage};
use smoltcp::socket::tcp;
use smoltcp::time::Duration;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use card::Card;
use ethernet::Ethernet;
use sd_spi::SdSpi;
use time::Delay;

/// The board's address on QEMU's user network.
const ADDRESS: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const PREFIX_LEN: u8 = 24;
const GATEWAY: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
/// Address used if the user registers hold no MAC (locally administered).
const FALLBACK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x65, 0x69, 0x65];
/// The export's name (a client asking for the empty name gets it too).
const EXPORT_NAME: &str = "sd";
/// TCP receive buffer: the window offered to clients writing.
const TCP_RX_BYTES: usize = 4096;
/// TCP send buffer: holds replies and read data on their way out; must
/// hold the largest message header (a few hundred bytes).
const TCP_TX_BYTES: usize = 8192;
/// Buffers of the standby socket, which accepts a client arriving while
/// the main socket is busy or closing (see `TcpServer::with_standby`):
/// small, as it serves only those clients.
const STANDBY_RX_BYTES: usize = 1024;
const STANDBY_TX_BYTES: usize = 1024;
/// Pause between attempts at bringing up the card.
const CARD_RETRY_MICROS: u64 = 1_000_000;

type Server = TcpServer<[Export<'static>; 1], Card>;

#[entry]
fn main() -> ! {
    let Some(core) = cortex_m::Peripherals::take() else {
        fatal("core peripherals taken twice")
    };
    let core_hz = sysctl::configure_clock();
    let clock = time::start(core.SYST, core_hz);
    defmt::info!("nbd-lm3s6965: core clock {=u32} Hz", core_hz);

    let storage = open_card(clock, core_hz);
    let size = storage.size();
    let exports = [storage.export(EXPORT_NAME)];

    let mac = sysctl::mac_address().unwrap_or(FALLBACK_MAC);
    let Some(eth) = singleton!(: Ethernet = Ethernet::new(mac, core_hz)) else {
        fatal("Ethernet set up twice")
    };
    let mut config = IfaceConfig::new(EthernetAddress(mac).into());
    // Seeds TCP initial sequence numbers and ephemeral ports. Weak (the
    // MAC and the boot time); a product would mix in ADC noise.
    config.random_seed = u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
        ^ time::now_micros().rotate_left(17);
    let Some(iface) = singleton!(: Interface = Interface::new(config, eth, time::now())) else {
        fatal("interface set up twice")
    };
    iface.update_ip_addrs(|addresses| {
        if addresses
            .push(IpCidr::new(IpAddress::Ipv4(ADDRESS), PREFIX_LEN))
            .is_err()
        {
            defmt::error!("no room for the IP address");
        }
    });
    if iface.routes_mut().add_default_ipv4_route(GATEWAY).is_err() {
        defmt::error!("no room for the default route");
    }

    let (Some(rx), Some(tx), Some(standby_rx), Some(standby_tx), Some(slots)) = (
        singleton!(: [u8; TCP_RX_BYTES] = [0; TCP_RX_BYTES]),
        singleton!(: [u8; TCP_TX_BYTES] = [0; TCP_TX_BYTES]),
        singleton!(: [u8; STANDBY_RX_BYTES] = [0; STANDBY_RX_BYTES]),
        singleton!(: [u8; STANDBY_TX_BYTES] = [0; STANDBY_TX_BYTES]),
        singleton!(: [SocketStorage<'static>; 2] = [SocketStorage::EMPTY; 2]),
    ) else {
        fatal("socket buffers set up twice")
    };
    let mut sockets = SocketSet::new(&mut slots[..]);
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(&mut rx[..]),
        tcp::SocketBuffer::new(&mut tx[..]),
    );
    let mut standby = tcp::Socket::new(
        tcp::SocketBuffer::new(&mut standby_rx[..]),
        tcp::SocketBuffer::new(&mut standby_tx[..]),
    );
    // Acknowledge at once: with a 4 KiB window, a delayed ACK stalls a
    // writing client for the whole delay.
    socket.set_ack_delay(None);
    standby.set_ack_delay(None);
    // The main socket comes first in the set, so a new client lands on it
    // whenever it listens.
    let handle = sockets.add(socket);
    let standby = sockets.add(standby);
    let Some(server) = singleton!(: Server = TcpServer::new(
        handle,
        nbd_embedded::DEFAULT_PORT,
        Config::default(),
        exports,
        storage,
    )
    .with_standby(standby)) else {
        fatal("server set up twice")
    };
    defmt::info!(
        "export {=str}: {=u64} bytes; {=[u8]}/{=u8} port {=u16}, MAC {=[u8]:02x}",
        EXPORT_NAME,
        size,
        ADDRESS.octets()[..],
        PREFIX_LEN,
        nbd_embedded::DEFAULT_PORT,
        mac[..]
    );
    defmt::info!(
        "RAM: server {=usize} B, interface {=usize} B, Ethernet {=usize} B, TCP buffers {=usize} B",
        size_of::<Server>(),
        size_of::<Interface>(),
        size_of::<Ethernet>(),
        TCP_RX_BYTES + TCP_TX_BYTES + STANDBY_RX_BYTES + STANDBY_TX_BYTES
    );

    // The receive interrupt only wakes the core; its handler masks it.
    // SAFETY: the handler (below) touches only the MAC's mask register,
    // which the main loop writes with interrupts off.
    unsafe { cortex_m::peripheral::NVIC::unmask(Interrupt::ETHERNET) };

    loop {
        let delay = server.poll(time::now(), iface, eth, &mut sockets);
        if let Some(end) = server.take_session_end() {
            defmt::info!("session ended: {}; ethernet {}", end, eth.stats());
        }
        if delay == Some(Duration::ZERO) || ethernet::frame_waiting() {
            continue;
        }
        // Sleep until a frame, the next millisecond tick, or the
        // interface's deadline, whichever comes first.
        let deadline = delay.map(|d| time::now_micros() + d.total_micros());
        while !ethernet::frame_waiting() && deadline.is_none_or(|d| time::now_micros() < d) {
            ethernet::sleep_until_frame();
        }
    }
}

/// Brings up the SD card (retrying each second until one answers), sets
/// the fast clock, and wraps it for serving.
fn open_card(clock: time::Clock, core_hz: u32) -> BlockStorage<Card> {
    loop {
        let delay = Delay::new(clock);
        let mut spi = SdSpi::new(core_hz, delay);
        let opened = match spi.wake_card() {
            Ok(()) => Card::open(SdCard::new(spi, delay), sd_spi::FAST_HZ).map_err(Some),
            Err(error) => {
                defmt::error!("SD card bus: {}", error);
                Err(None)
            }
        };
        match opened {
            Ok(card) => {
                let hz = card.sd().spi(|spi| spi.frequency());
                if card.probed() {
                    defmt::info!("emulator quirk: CSD unreadable (CMD9), size found by reading");
                }
                defmt::info!("SD card: {}, SPI at {=u32} Hz", card.card_type(), hz);
                if !card.can_erase_blocks() {
                    defmt::info!(
                        "TRIM not offered: the CSD does not say the card erases single blocks"
                    );
                }
                match BlockStorage::with_erase(card) {
                    Ok(storage) => return storage,
                    Err(error) => defmt::error!("SD card size: {}", error),
                }
            }
            Err(Some(error)) => defmt::error!("SD card: {}", error),
            Err(None) => {}
        }
        let until = time::now_micros() + CARD_RETRY_MICROS;
        while time::now_micros() < until {
            cortex_m::asm::wfi();
        }
    }
}

#[interrupt]
fn ETHERNET() {
    ethernet::on_interrupt();
}

/// Logs `what` and ends the program: through semihosting when a host
/// listens (QEMU exits with status 1), else by waiting for a reset.
fn fatal(what: &str) -> ! {
    defmt::error!("fatal: {=str}", what);
    semihosting::process::exit(1)
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    defmt::error!("hard fault at pc {=u32:#010x}", frame.pc());
    semihosting::process::exit(1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(at) => defmt::error!("panic at {=str}:{=u32}", at.file(), at.line()),
        None => defmt::error!("panic"),
    }
    semihosting::process::exit(1)
}
