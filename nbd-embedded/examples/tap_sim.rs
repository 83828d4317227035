//! Host simulation of a microcontroller exporting its SD card: the same
//! `nbd_embedded::net::TcpServer` a firmware runs, on smoltcp's
//! `TunTapInterface` (a Linux TAP device) instead of an Ethernet MAC, with a
//! file standing in for the card behind `embedded_sdmmc::BlockDevice`.
//!
//! ```text
//! tap_sim --tap TAPNAME --ip 192.168.69.2/24 --file CARD.img [--port 10809]
//!         [--mac 02:00:00:00:00:02] [--rx-buffer BYTES] [--tx-buffer BYTES]
//!         [--clients N]
//! ```
//!
//! The TAP device must exist and be up (`ip tuntap add dev TAPNAME mode tap`,
//! `ip link set TAPNAME up`), with the host's address on it in the same
//! subnet; clients then connect to `nbd://192.168.69.2/`. The card file's
//! size must be a multiple of 512 bytes. Writes go to the file with
//! `pwrite` followed by `fdatasync`, so a block is on disk when the card
//! "takes" it, as `BlockDevice::write` promises (FLUSH is then answered
//! only after the file has the data).
//!
//! `--clients N` (default 1) serves up to N clients at once, as a board
//! would with RAM to spare: N `TcpServer`s, each with its own socket (and
//! socket buffers) listening on the port, over one card shared with
//! `storage::SharedCard`, driven by `net::poll_all`.
//!
//! The loop sleeps in `select(2)` on the TAP descriptor for as long as the
//! interface allows (`net::poll_all`'s delay): no busy spinning.

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use nbd_core::export::Export;
use nbd_core::server::Config;
use nbd_embedded::BlockStorage;
use nbd_embedded::net::{self, TcpServer};
use nbd_embedded::storage::SharedCard;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::phy::{self, Medium, TunTapInterface};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, IpCidr};

#[path = "common/file_card.rs"]
mod file_card;
use file_card::{CardError, FileCard};

const USAGE: &str = "usage: tap_sim --tap TAPNAME --ip ADDR/PREFIX --file CARD.img [--port PORT] \
                     [--mac XX:XX:XX:XX:XX:XX] [--rx-buffer BYTES] [--tx-buffer BYTES] \
                     [--clients N]";

/// Socket buffer sizes a microcontroller with 64 KiB of RAM can afford.
const DEFAULT_RX_BUFFER: usize = 4096;
const DEFAULT_TX_BUFFER: usize = 4096;
/// The send buffer must hold the largest message header (see
/// `TcpServer::new`): a few hundred bytes plus the export name.
const MIN_TX_BUFFER: usize = 1024;
const MIN_RX_BUFFER: usize = 64;
/// Concurrent clients at most (each costs a server and two socket buffers).
const MAX_CLIENTS: usize = 16;
/// A locally administered unicast address.
const DEFAULT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The name the card is exported under (also the default export).
const EXPORT_NAME: &str = "card";

/// What can stop the simulation.
#[derive(Debug)]
enum SimError {
    /// The command line is wrong.
    Usage(String),
    /// The card file cannot be used.
    Card(PathBuf, CardError),
    /// The TAP device cannot be opened.
    Tap(String, std::io::Error),
    /// Waiting on the TAP device failed.
    Wait(std::io::Error),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(message) => write!(f, "{message}\n{USAGE}"),
            Self::Card(path, error) => write!(f, "card file {}: {error}", path.display()),
            Self::Tap(name, error) => write!(f, "TAP device {name}: {error}"),
            Self::Wait(error) => write!(f, "waiting on the TAP device: {error}"),
        }
    }
}

impl std::error::Error for SimError {}

/// The parsed command line.
#[derive(Debug)]
struct Args {
    tap: String,
    ip: IpCidr,
    file: PathBuf,
    port: u16,
    mac: EthernetAddress,
    rx_buffer: usize,
    tx_buffer: usize,
    clients: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, SimError> {
    let usage = |message: String| SimError::Usage(message);
    let (mut tap, mut ip, mut file) = (None, None, None);
    let mut port = nbd_embedded::DEFAULT_PORT;
    let mut mac = EthernetAddress(DEFAULT_MAC);
    let mut rx_buffer = DEFAULT_RX_BUFFER;
    let mut tx_buffer = DEFAULT_TX_BUFFER;
    let mut clients = 1;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| usage(format!("{flag} needs a value")))?;
        let bad = |what: &str| usage(format!("{flag} {value}: not {what}"));
        match flag.as_str() {
            "--tap" => tap = Some(value),
            "--ip" => ip = Some(value.parse().map_err(|_| bad("an address/prefix"))?),
            "--file" => file = Some(PathBuf::from(value)),
            "--port" => port = value.parse().map_err(|_| bad("a port number"))?,
            "--mac" => mac = value.parse().map_err(|_| bad("a MAC address"))?,
            "--rx-buffer" => rx_buffer = value.parse().map_err(|_| bad("a byte count"))?,
            "--tx-buffer" => tx_buffer = value.parse().map_err(|_| bad("a byte count"))?,
            "--clients" => {
                clients = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_CLIENTS).contains(n))
                    .ok_or_else(|| bad(&format!("a number from 1 to {MAX_CLIENTS}")))?;
            }
            _ => return Err(usage(format!("unknown argument {flag}"))),
        }
    }
    if rx_buffer < MIN_RX_BUFFER || tx_buffer < MIN_TX_BUFFER {
        return Err(usage(format!(
            "buffers too small: --rx-buffer needs at least {MIN_RX_BUFFER}, \
             --tx-buffer at least {MIN_TX_BUFFER}"
        )));
    }
    let missing = |flag: &str| usage(format!("{flag} is required"));
    Ok(Args {
        tap: tap.ok_or_else(|| missing("--tap"))?,
        ip: ip.ok_or_else(|| missing("--ip"))?,
        file: file.ok_or_else(|| missing("--file"))?,
        port,
        mac,
        rx_buffer,
        tx_buffer,
        clients,
    })
}

fn run(args: Args) -> Result<(), SimError> {
    let card = FileCard::open(&args.file).map_err(|e| SimError::Card(args.file.clone(), e))?;
    // One scratch block per server; all of them on the one card.
    let storages = (0..args.clients)
        .map(|_| BlockStorage::new(SharedCard(&card)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SimError::Card(args.file.clone(), e))?;
    let mut device = TunTapInterface::new(&args.tap, Medium::Ethernet)
        .map_err(|e| SimError::Tap(args.tap.clone(), e))?;
    let fd = device.as_raw_fd();

    let mut config = IfaceConfig::new(args.mac.into());
    // TCP initial sequence numbers come from this seed.
    config.random_seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut iface = Interface::new(config, &mut device, Instant::now());
    iface.update_ip_addrs(|addrs| {
        // A fresh interface has room for several addresses.
        let _ = addrs.push(args.ip);
    });

    let mut sockets = SocketSet::new(Vec::new());
    let size = storages[0].size();
    // The servers borrow their catalog for as long as they run: the whole
    // program.
    let exports: &'static [Export<'static>] =
        Box::leak(Box::new([storages[0].export(EXPORT_NAME)]));
    let mut servers: Vec<TcpServer<_, _>> = storages
        .into_iter()
        .map(|storage| {
            // Each server listens on the same port with a socket of its
            // own: smoltcp hands each new connection to one listener.
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; args.rx_buffer]),
                tcp::SocketBuffer::new(vec![0; args.tx_buffer]),
            );
            let handle = sockets.add(socket);
            TcpServer::new(handle, args.port, Config::default(), exports, storage)
        })
        .collect();

    println!(
        "tap_sim: serving {} ({size} bytes) as export \"{EXPORT_NAME}\" on {}:{} via {}",
        args.file.display(),
        args.ip.address(),
        args.port,
        args.tap
    );
    println!(
        "tap_sim: up to {} client(s) at once; per client: server state {} bytes \
         (TcpServer, card reference included), socket buffers {} + {} bytes",
        args.clients,
        core::mem::size_of_val(&servers[0]),
        args.rx_buffer,
        args.tx_buffer
    );
    let mut connected = vec![false; servers.len()];
    loop {
        let delay = net::poll_all(
            &mut servers,
            Instant::now(),
            &mut iface,
            &mut device,
            &mut sockets,
        );
        for (i, server) in servers.iter_mut().enumerate() {
            if server.has_client() != connected[i] {
                connected[i] = server.has_client();
                if connected[i] {
                    let now = connected.iter().filter(|&&c| c).count();
                    eprintln!("tap_sim: client connected on socket {i} ({now} connected)");
                }
            }
            if let Some(end) = server.take_session_end() {
                eprintln!("tap_sim: session on socket {i} ended: {end:?}");
            }
        }
        if delay == Some(Duration::ZERO) {
            continue;
        }
        phy::wait(fd, delay).map_err(SimError::Wait)?;
    }
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tap_sim: {error}");
            ExitCode::FAILURE
        }
    }
}
