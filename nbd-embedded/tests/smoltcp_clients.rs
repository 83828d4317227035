//! Several `nbd_embedded::net::TcpServer`s on one port of a smoltcp
//! loopback interface, sharing one card through `storage::SharedCard` and
//! driven by `net::poll_all`: two clients are served at the same time, and
//! what one writes is what the other reads. Clients are sockets of the same
//! interface speaking hand-written NBD bytes; time is virtual (1 ms per
//! poll).

#![allow(clippy::unwrap_used)]

mod common;

use common::{MemCard, pattern_byte};
use nbd_core::export::Export;
use nbd_core::server::{CloseReason, Config};
use nbd_embedded::BlockStorage;
use nbd_embedded::net::{self, SessionEnd, TcpServer};
use nbd_embedded::storage::SharedCard;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpAddress;

type Server = TcpServer<&'static [Export<'static>], SharedCard<'static, MemCard>>;

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISCONNECT: u16 = 2;
const FLUSH: u16 = 3;
/// `NBD_FLAG_CAN_MULTI_CONN` in the transmission flags.
const CAN_MULTI_CONN: u16 = 1 << 8;

struct Net {
    iface: Interface,
    device: Loopback,
    sockets: SocketSet<'static>,
    servers: Vec<Server>,
    clients: Vec<SocketHandle>,
    size: u64,
    now: Instant,
    steps: u64,
}

impl Net {
    /// `servers` servers on port 10809 over `card`, and `clients` client
    /// sockets.
    fn new(card: &'static MemCard, servers: usize, clients: usize) -> Self {
        let mut device = Loopback::new(Medium::Ethernet);
        let iface = common::loopback_interface(&mut device);
        let now = Instant::from_millis(0);
        let mut sockets = SocketSet::new(Vec::new());
        let size = BlockStorage::new(SharedCard(card)).unwrap().size();
        let exports: &'static [Export<'static>] =
            Box::leak(Box::new([BlockStorage::new(SharedCard(card))
                .unwrap()
                .export("card")]));
        let servers = (0..servers)
            .map(|_| {
                // Small server buffers, as on a microcontroller.
                let handle = sockets.add(tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 1024]),
                    tcp::SocketBuffer::new(vec![0; 2048]),
                ));
                let storage = BlockStorage::new(SharedCard(card)).unwrap();
                TcpServer::new(
                    handle,
                    nbd_embedded::DEFAULT_PORT,
                    Config::default(),
                    exports,
                    storage,
                )
            })
            .collect();
        let clients = (0..clients)
            .map(|_| {
                sockets.add(tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 65536]),
                    tcp::SocketBuffer::new(vec![0; 65536]),
                ))
            })
            .collect();
        let mut net = Self {
            iface,
            device,
            sockets,
            servers,
            clients,
            size,
            now,
            steps: 0,
        };
        net.step();
        net
    }

    fn step(&mut self) {
        net::poll_all(
            &mut self.servers,
            self.now,
            &mut self.iface,
            &mut self.device,
            &mut self.sockets,
        );
        self.now += Duration::from_millis(1);
        self.steps += 1;
        assert!(self.steps < 2_000_000, "no progress");
    }

    fn client(&mut self, c: usize) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.clients[c])
    }

    fn connected(&self) -> usize {
        self.servers.iter().filter(|s| s.has_client()).count()
    }

    /// Opens client `c`'s connection and waits until it is established.
    fn open(&mut self, c: usize, local_port: u16) {
        let handle = self.clients[c];
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(
                self.iface.context(),
                (IpAddress::v4(127, 0, 0, 1), nbd_embedded::DEFAULT_PORT),
                local_port,
            )
            .unwrap();
        while !self.client(c).may_send() {
            self.step();
        }
    }

    /// Negotiates export "card" on client `c` (greeting already read);
    /// returns the transmission flags.
    fn negotiate(&mut self, c: usize) -> u16 {
        self.send(c, &3u32.to_be_bytes());
        let mut option = Vec::new();
        option.extend(0x4948_4156_454F_5054u64.to_be_bytes());
        option.extend(1u32.to_be_bytes());
        option.extend(4u32.to_be_bytes());
        option.extend(b"card");
        self.send(c, &option);
        let info = self.recv(c, 10);
        assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), self.size);
        u16::from_be_bytes(info[8..].try_into().unwrap())
    }

    fn send(&mut self, c: usize, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.client(c).send_slice(bytes).unwrap();
            bytes = &bytes[n..];
            self.step();
        }
    }

    fn recv(&mut self, c: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        let mut got = 0;
        while got < len {
            got += self.client(c).recv_slice(&mut out[got..]).unwrap();
            if got < len {
                self.step();
            }
        }
        out
    }

    /// Sends a request header (and `data`) on client `c` without waiting.
    fn send_request(&mut self, c: usize, command: u16, offset: u64, length: u32, data: &[u8]) {
        self.send(c, &header(command, offset, length));
        self.send(c, data);
    }

    /// Reads a simple reply header on client `c`; returns the error.
    fn reply(&mut self, c: usize) -> u32 {
        let reply = self.recv(c, 16);
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }

    fn write(&mut self, c: usize, offset: u64, data: &[u8]) {
        self.send_request(c, WRITE, offset, data.len() as u32, data);
        assert_eq!(self.reply(c), 0, "write at {offset} on client {c}");
    }

    fn read(&mut self, c: usize, offset: u64, length: u32) -> Vec<u8> {
        self.send_request(c, READ, offset, length, &[]);
        assert_eq!(self.reply(c), 0, "read at {offset} on client {c}");
        self.recv(c, length as usize)
    }

    /// Says goodbye on client `c` and waits for the server's FIN.
    fn disconnect(&mut self, c: usize) {
        self.send(c, &header(DISCONNECT, 0, 0));
        while self.client(c).may_recv() {
            self.step();
        }
        self.client(c).close();
        while self.client(c).is_open() || self.client(c).state() == tcp::State::TimeWait {
            self.client(c).abort();
            self.step();
        }
        for _ in 0..10 {
            self.step();
        }
    }
}

fn header(command: u16, offset: u64, length: u32) -> Vec<u8> {
    common::request_header(0, command, 7, offset, length)
}

fn bytes(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
        .collect()
}

#[test]
fn two_servers_serve_two_clients_at_once() {
    let card: &'static MemCard = Box::leak(Box::new(MemCard::new(8192))); // 4 MiB
    let mut net = Net::new(card, 2, 2);

    // Both connect before either has read its greeting, and both get it.
    net.open(0, 49152);
    net.open(1, 49153);
    for c in 0..2 {
        let greeting = net.recv(c, 18);
        assert_eq!(&greeting[..8], b"NBDMAGIC", "client {c}");
    }
    assert_eq!(net.connected(), 2);
    for c in 0..2 {
        let flags = net.negotiate(c);
        assert_eq!(flags & CAN_MULTI_CONN, 0, "multi-conn advertised");
    }

    // A read after the other client's answered write sees it, even though
    // the reader's scratch block cached that block before the write.
    // (600..700 lies inside block 1.)
    let expected: Vec<u8> = (600..700).map(pattern_byte).collect();
    assert_eq!(net.read(0, 600, 100), expected);
    let written = bytes(10, 1);
    net.write(1, 610, &written);
    let mut expected = expected;
    expected[10..20].copy_from_slice(&written);
    assert_eq!(net.read(0, 600, 100), expected);

    // A partial-block write merges with the card as it is now: client 0
    // caches block 2 (1024..1536) by reading it, client 1 writes other bytes of it,
    // then client 0 writes part of it; both writes survive.
    net.read(0, 1100, 100);
    let theirs = bytes(10, 2);
    net.write(1, 1300, &theirs);
    let ours = bytes(10, 3);
    net.write(0, 1400, &ours);
    assert_eq!(card.bytes(1300, 10), theirs);
    assert_eq!(card.bytes(1400, 10), ours);

    // Interleaved: client 0's 64 KiB write arrives in two halves, and
    // client 1 is served a read of the first half (written through to the
    // card block by block, but for the last partial block, which waits in
    // client 0's scratch) and a write elsewhere in between.
    let big = bytes(65536, 4);
    net.send(0, &header(WRITE, 100_000, big.len() as u32));
    net.send(0, &big[..32768]);
    let through = 32768 - 512;
    for _ in 0..1000 {
        if card.bytes(100_000, through) == big[..through] {
            break;
        }
        net.step();
    }
    assert!(
        net.read(1, 100_000, through as u32) == big[..through],
        "first half"
    );
    let other = bytes(5000, 5);
    net.write(1, 2_000_001, &other);
    net.send(0, &big[32768..]);
    assert_eq!(net.reply(0), 0);
    assert!(card.bytes(100_000, big.len()) == big, "64 KiB write");
    assert!(
        card.bytes(2_000_001, other.len()) == other,
        "5000-byte write"
    );

    // Two 256 KiB reads streamed at the same time through 2 KiB send
    // buffers: each client gets its own data.
    net.send_request(0, READ, 100_000, 65536, &[]);
    net.send_request(1, READ, 2_000_001, 5000, &[]);
    net.send_request(0, READ, 3 << 20, 256 << 10, &[]);
    net.send_request(1, READ, 777, 256 << 10, &[]);
    let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let want = [16 + 65536 + 16 + (256 << 10), 16 + 5000 + 16 + (256 << 10)];
    let mut chunk = [0u8; 4096];
    while got[0].len() < want[0] || got[1].len() < want[1] {
        for c in 0..2 {
            let room = (want[c] - got[c].len()).min(chunk.len());
            let n = net.client(c).recv_slice(&mut chunk[..room]).unwrap();
            got[c].extend_from_slice(&chunk[..n]);
        }
        net.step();
    }
    assert!(got[0][16..16 + 65536] == big[..], "client 0's first read");
    let tail = &got[0][16 + 65536 + 16..];
    assert!(tail == card.bytes(3 << 20, 256 << 10), "client 0's read");
    assert!(got[1][16..16 + 5000] == other[..], "client 1's first read");
    let tail = &got[1][16 + 5000 + 16..];
    assert!(tail == card.bytes(777, 256 << 10), "client 1's read");
    for (c, got) in got.iter().enumerate() {
        for at in [0, 16 + if c == 0 { 65536 } else { 5000 }] {
            assert_eq!(&got[at..at + 8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
        }
    }

    // Flush on both, and both say goodbye.
    for c in 0..2 {
        net.send_request(c, FLUSH, 0, 0, &[]);
        assert_eq!(net.reply(c), 0, "flush on client {c}");
    }
    net.disconnect(0);
    assert_eq!(net.connected(), 1, "client 1 is still served");
    assert_eq!(net.read(1, 610, 10), written);
    net.disconnect(1);
    assert_eq!(net.connected(), 0);
    for server in &mut net.servers {
        assert_eq!(
            server.take_session_end(),
            Some(SessionEnd::Closed(CloseReason::Disconnect))
        );
    }

    // Both servers listen again: two new clients at once.
    net.open(0, 49154);
    net.open(1, 49155);
    for c in 0..2 {
        assert_eq!(&net.recv(c, 18)[..8], b"NBDMAGIC");
        net.negotiate(c);
    }
    assert_eq!(net.read(1, 1400, 10), ours);
    assert_eq!(net.read(0, 1300, 10), theirs);
}

#[test]
fn one_server_keeps_a_second_client_waiting() {
    let card: &'static MemCard = Box::leak(Box::new(MemCard::new(64)));
    let mut net = Net::new(card, 1, 2);
    net.open(0, 49152);
    assert_eq!(&net.recv(0, 18)[..8], b"NBDMAGIC");
    net.negotiate(0);
    // The second client's SYN finds no listening socket: it gets no
    // greeting while the first is served.
    let handle = net.clients[1];
    net.sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(
            net.iface.context(),
            (IpAddress::v4(127, 0, 0, 1), nbd_embedded::DEFAULT_PORT),
            49153,
        )
        .unwrap();
    for _ in 0..200 {
        net.step();
    }
    assert!(!net.client(1).can_recv(), "second client greeted");
    assert_eq!(net.connected(), 1);
    assert!(net.read(0, 0, 512) == card.bytes(0, 512));
}
