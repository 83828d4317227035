//! The NBD server on Embassy, run on the host: `nbd_embedded::io_async::serve`
//! over `embassy-net` TCP sockets, with embassy-net's TUN/TAP driver in
//! place of an Ethernet MAC, the std thread executor and time driver, and
//! a file standing in for the SD card. On a board, only the driver (the
//! chip's `embassy-net` Ethernet driver), the executor (`platform-cortex-m`)
//! and the card change; the tasks below stay as they are.
//!
//! ```text
//! embassy_tap --tap TAPNAME --ip 192.168.69.2/24 --file CARD.img [--port 10809]
//! ```
//!
//! The TAP device must exist and be up, with the host's address on it in
//! the same subnet (as for `tap_sim`). `SERVER_TASKS` tasks each accept
//! on the port with a socket of their own, so that many clients are served
//! at once and a client arriving while one task closes its last connection
//! is taken by another.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Ipv4Cidr, Runner, Stack, StackResources, StaticConfigV4};
use embassy_net_tuntap::TunTapDevice;
use nbd_core::export::Export;
use nbd_core::server::Config;
use nbd_embedded::BlockStorage;
use nbd_embedded::storage::SharedCard;

#[path = "common/file_card.rs"]
mod file_card;
use file_card::FileCard;

const USAGE: &str =
    "usage: embassy_tap --tap TAPNAME --ip ADDR/PREFIX --file CARD.img [--port PORT]";
/// Tasks accepting clients, each with its own socket and buffers.
const SERVER_TASKS: usize = 2;
/// Socket buffers, as a microcontroller can afford them.
const RX_BUFFER: usize = 4096;
const TX_BUFFER: usize = 4096;
/// Input buffer of `io_async::serve` (a whole block, so that aligned
/// writes reach the card without read-modify-write).
const INPUT_BUFFER: usize = 1024;
/// Sockets in the stack: the server tasks' (no DHCP, no DNS).
const SOCKETS: usize = SERVER_TASKS;
/// The name the card is exported under (also the default export).
const EXPORT_NAME: &str = "card";

/// Clients being served right now, for the log.
static CONNECTED: AtomicUsize = AtomicUsize::new(0);

struct Args {
    tap: String,
    ip: Ipv4Cidr,
    file: PathBuf,
    port: u16,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut tap, mut ip, mut file) = (None, None, None);
    let mut port = nbd_embedded::DEFAULT_PORT;
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value}: not {what}");
        match flag.as_str() {
            "--tap" => tap = Some(value),
            "--ip" => ip = Some(value.parse().map_err(|_| bad("an IPv4 address/prefix"))?),
            "--file" => file = Some(PathBuf::from(value)),
            "--port" => port = value.parse().map_err(|_| bad("a port number"))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    let missing = |flag: &str| format!("{flag} is required");
    Ok(Args {
        tap: tap.ok_or_else(|| missing("--tap"))?,
        ip: ip.ok_or_else(|| missing("--ip"))?,
        file: file.ok_or_else(|| missing("--file"))?,
        port,
    })
}

#[embassy_executor::task]
async fn network(mut runner: Runner<'static, TunTapDevice>) -> ! {
    runner.run().await
}

/// Accepts one client at a time on `port` and serves it to the end.
#[embassy_executor::task(pool_size = SERVER_TASKS)]
async fn serve_clients(
    stack: Stack<'static>,
    port: u16,
    exports: &'static [Export<'static>],
    mut storage: BlockStorage<SharedCard<'static, FileCard>>,
    task: usize,
) -> ! {
    let mut rx = [0; RX_BUFFER];
    let mut tx = [0; TX_BUFFER];
    let mut input = [0; INPUT_BUFFER];
    loop {
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        if let Err(error) = socket.accept(port).await {
            eprintln!("embassy_tap: task {task}: accept failed: {error:?}");
            continue;
        }
        let now = CONNECTED.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("embassy_tap: client connected on task {task} ({now} connected)");
        let result = nbd_embedded::io_async::serve(
            Config::default(),
            exports,
            &mut storage,
            &mut socket,
            &mut input,
        )
        .await;
        match result {
            Ok(end) => eprintln!("embassy_tap: session on task {task} ended: {end:?}"),
            Err(error) => eprintln!("embassy_tap: session on task {task} Failed: {error}"),
        }
        CONNECTED.fetch_sub(1, Ordering::Relaxed);
        // FIN after everything sent; the socket is dropped (and a new one
        // accepts) once the client has it.
        socket.close();
        if socket.flush().await.is_err() {
            socket.abort();
        }
    }
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    if let Err(message) = start(spawner, std::env::args().skip(1)) {
        eprintln!("embassy_tap: {message}\n{USAGE}");
        // The executor never returns: leave with the failure status here.
        std::process::exit(1);
    }
}

fn start(spawner: Spawner, args: impl Iterator<Item = String>) -> Result<(), String> {
    let args = parse_args(args)?;
    let card: &'static FileCard = Box::leak(Box::new(
        FileCard::open(&args.file)
            .map_err(|e| format!("card file {}: {e}", args.file.display()))?,
    ));
    let storages = (0..SERVER_TASKS)
        .map(|_| BlockStorage::new(SharedCard(card)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("card file {}: {e}", args.file.display()))?;
    let size = storages[0].size();
    let exports: &'static [Export<'static>] =
        Box::leak(Box::new([storages[0].export(EXPORT_NAME)]));

    let device =
        TunTapDevice::new(&args.tap).map_err(|e| format!("TAP device {}: {e}", args.tap))?;
    let config = embassy_net::Config::ipv4_static(StaticConfigV4 {
        address: args.ip,
        gateway: None,
        dns_servers: Default::default(),
    });
    // TCP initial sequence numbers come from this seed.
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let resources = Box::leak(Box::new(StackResources::<SOCKETS>::new()));
    let (stack, runner) = embassy_net::new(device, config, resources, seed);
    spawner.spawn(network(runner).map_err(|e| format!("network task: {e:?}"))?);
    for (task, storage) in storages.into_iter().enumerate() {
        spawner.spawn(
            serve_clients(stack, args.port, exports, storage, task)
                .map_err(|e| format!("server task {task}: {e:?}"))?,
        );
    }
    println!(
        "embassy_tap: serving {} ({size} bytes) as export \"{EXPORT_NAME}\" on {}:{} via {}",
        args.file.display(),
        args.ip.address(),
        args.port,
        args.tap
    );
    println!(
        "embassy_tap: {SERVER_TASKS} server tasks; per task: socket buffers \
         {RX_BUFFER} + {TX_BUFFER} bytes, input buffer {INPUT_BUFFER} bytes"
    );
    Ok(())
}
