//! `TcpServer::poll`'s delay is safe to sleep on: an application that
//! sleeps exactly as told (until the delay passes or a frame arrives, like
//! `examples/tap_sim.rs` in `select` or a firmware in `WFI`) never leaves a
//! client waiting. Frames travel through a queue the test can see, so
//! "a frame arrives" is exact; time is virtual.
//!
//! Regression: a handshake's last ACK taken in by `poll`'s second
//! interface poll used to leave the socket established with no session
//! and the application asleep, until some unrelated frame woke it.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;

use common::{MemCard, pattern_byte};
use nbd_core::export::Export;
use nbd_core::server::Config;
use nbd_embedded::BlockStorage;
use nbd_embedded::net::TcpServer;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpAddress;

/// A loopback whose queue the test can see.
#[derive(Debug, Default)]
struct Wire {
    queue: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);

struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.queue.pop_front()?;
        Some((Rx(frame), Tx(&mut self.queue)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.queue))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.max_transmission_unit = 1514;
        caps.medium = Medium::Ethernet;
        caps.checksum = ChecksumCapabilities::ignored();
        caps
    }
}

const PORT: u16 = nbd_embedded::DEFAULT_PORT;
/// More application wake-ups than a session of this size can need.
const WAKE_LIMIT: usize = 100_000;

struct App {
    iface: Interface,
    wire: Wire,
    sockets: SocketSet<'static>,
    server: TcpServer<&'static [Export<'static>], MemCard>,
    client: SocketHandle,
    now: Instant,
    wakes: usize,
}

impl App {
    fn new() -> Self {
        let mut wire = Wire::default();
        let iface = common::loopback_interface(&mut wire);
        let now = Instant::from_millis(0);
        let mut sockets = SocketSet::new(Vec::new());
        let server_socket = sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1024]),
            tcp::SocketBuffer::new(vec![0; 2048]),
        ));
        let client = sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 16384]),
            tcp::SocketBuffer::new(vec![0; 16384]),
        ));
        let storage = BlockStorage::new(MemCard::new(64)).unwrap();
        let exports: &'static [Export<'static>] = Box::leak(Box::new([storage.export("card")]));
        let server = TcpServer::new(server_socket, PORT, Config::default(), exports, storage);
        Self {
            iface,
            wire,
            sockets,
            server,
            client,
            now,
            wakes: 0,
        }
    }

    fn client(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.client)
    }

    /// One turn of an application that sleeps as `poll` says: returns
    /// false when it would sleep with nothing that could ever wake it.
    fn turn(&mut self) -> bool {
        self.wakes += 1;
        assert!(self.wakes < WAKE_LIMIT, "no progress");
        let delay = self
            .server
            .poll(self.now, &mut self.iface, &mut self.wire, &mut self.sockets);
        match delay {
            Some(Duration::ZERO) => true,
            // A frame on the wire wakes the application at once.
            _ if !self.wire.queue.is_empty() => true,
            Some(delay) => {
                self.now += delay;
                true
            }
            None => false,
        }
    }

    /// Runs turns until `done` holds; panics if the application would
    /// sleep forever first.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        while !done(self) {
            if !self.turn() && !done(self) {
                panic!(
                    "the server asked to sleep until a frame arrives, but none will come \
                     (waiting for {what}; server has a session: {}, client socket {})",
                    self.server.has_client(),
                    self.client().state()
                );
            }
        }
    }

    fn recv(&mut self, len: usize, what: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.until(what, |app| {
            if !app.client().can_recv() {
                return false;
            }
            let mut chunk = vec![0; len - out.len()];
            let n = app.client().recv_slice(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
            out.len() == len
        });
        out
    }

    fn send(&mut self, bytes: &[u8]) {
        let n = self.client().send_slice(bytes).unwrap();
        assert_eq!(n, bytes.len(), "client send buffer is large enough");
    }
}

#[test]
fn sleeping_as_told_never_stalls_a_client() {
    let mut app = App::new();
    app.turn();
    for (round, local_port) in [50000u16, 50001, 50002].into_iter().enumerate() {
        let context = app.iface.context();
        app.sockets
            .get_mut::<tcp::Socket>(app.client)
            .connect(context, (IpAddress::v4(127, 0, 0, 1), PORT), local_port)
            .unwrap();
        let greeting = app.recv(18, "the greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC", "round {round}");
        app.send(&3u32.to_be_bytes());
        let mut option = Vec::new();
        option.extend(0x4948_4156_454F_5054u64.to_be_bytes());
        option.extend(1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        option.extend(4u32.to_be_bytes());
        option.extend(b"card");
        app.send(&option);
        app.recv(10, "the export-name reply");
        app.send(&common::request_header(0, 0, 1, 100, 3000));
        let reply = app.recv(16 + 3000, "the read reply");
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        let expected: Vec<u8> = (100..3100).map(pattern_byte).collect();
        assert!(reply[16..] == expected[..], "round {round}: read data");
        app.send(&common::request_header(0, 2, 1, 0, 0)); // NBD_CMD_DISC
        app.until("the server's FIN", |app| !app.client().may_recv());
        app.client().close();
        app.until("the client socket to close", |app| {
            matches!(
                app.client().state(),
                tcp::State::Closed | tcp::State::TimeWait
            )
        });
        app.client().abort();
        app.until("the server to re-listen", |app| !app.server.has_client());
    }
}
