//! `nbd_embedded::net::TcpServer` on a smoltcp loopback interface, with a
//! client on a second socket of the same interface speaking hand-written
//! NBD bytes. Time is virtual (1 ms per poll).

#![allow(clippy::unwrap_used)]

mod common;

use common::{MemCard, pattern_byte};
use nbd_core::export::Export;
use nbd_core::server::{CloseReason, Config};
use nbd_embedded::BlockStorage;
use nbd_embedded::net::{SessionEnd, TcpServer};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::IpAddress;

type Server = TcpServer<&'static [Export<'static>], MemCard>;

struct Net {
    iface: Interface,
    device: Loopback,
    sockets: SocketSet<'static>,
    server: Server,
    client: SocketHandle,
    now: Instant,
    steps: u64,
}

impl Net {
    fn new(card: MemCard) -> Self {
        let mut device = Loopback::new(Medium::Ethernet);
        let iface = common::loopback_interface(&mut device);
        let now = Instant::from_millis(0);
        let mut sockets = SocketSet::new(Vec::new());
        // Small server buffers, as on a microcontroller.
        let server_socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1024]),
            tcp::SocketBuffer::new(vec![0; 2048]),
        );
        let client_socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        let server_handle = sockets.add(server_socket);
        let client = sockets.add(client_socket);
        let storage = BlockStorage::new(card).unwrap();
        let exports: &'static [Export<'static>] = Box::leak(Box::new([storage.export("card")]));
        let server = TcpServer::new(
            server_handle,
            nbd_embedded::DEFAULT_PORT,
            Config::default(),
            exports,
            storage,
        );
        let mut net = Self {
            iface,
            device,
            sockets,
            server,
            client,
            now,
            steps: 0,
        };
        net.step();
        net
    }

    fn step(&mut self) {
        self.server.poll(
            self.now,
            &mut self.iface,
            &mut self.device,
            &mut self.sockets,
        );
        self.now += smoltcp::time::Duration::from_millis(1);
        self.steps += 1;
        assert!(self.steps < 2_000_000, "no progress");
    }

    fn client(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.client)
    }

    fn connect(&mut self, local_port: u16) {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.client);
        socket
            .connect(
                self.iface.context(),
                (IpAddress::v4(127, 0, 0, 1), nbd_embedded::DEFAULT_PORT),
                local_port,
            )
            .unwrap();
        while !self.client().may_send() {
            self.step();
        }
        let greeting = self.recv(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        self.send(&3u32.to_be_bytes());
        let mut option = Vec::new();
        option.extend(0x4948_4156_454F_5054u64.to_be_bytes());
        option.extend(1u32.to_be_bytes());
        option.extend(4u32.to_be_bytes());
        option.extend(b"card");
        self.send(&option);
        let info = self.recv(10);
        assert_eq!(
            u64::from_be_bytes(info[..8].try_into().unwrap()),
            self.server.storage().size()
        );
    }

    fn send(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.client().send_slice(bytes).unwrap();
            bytes = &bytes[n..];
            self.step();
        }
    }

    fn recv(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        let mut got = 0;
        while got < len {
            got += self.client().recv_slice(&mut out[got..]).unwrap();
            if got < len {
                self.step();
            }
        }
        out
    }

    /// A request with simple replies; returns the error and read data.
    fn request(&mut self, command: u16, offset: u64, length: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut header = common::request_header(0, command, 7, offset, length);
        header.extend(data);
        self.send(&header);
        let reply = self.recv(16);
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let read = if command == 0 && error == 0 {
            self.recv(length as usize)
        } else {
            Vec::new()
        };
        (error, read)
    }
}

#[test]
fn serves_clients_one_after_another() {
    let card = MemCard::new(8192); // 4 MiB
    let mut net = Net::new(card.clone());
    for (round, port) in [49152u16, 49153].into_iter().enumerate() {
        net.connect(port);
        assert!(net.server.has_client());
        let (error, data) = net.request(0, 1000, 5000, &[]);
        assert_eq!(error, 0);
        let expected: Vec<u8> = (1000..6000).map(pattern_byte).collect();
        if round == 0 {
            assert_eq!(data, expected);
        }
        // A 1 MiB write at an odd offset, through 1 KiB of receive buffer.
        let bytes: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i * 13 + round as u32) as u8)
            .collect();
        assert_eq!(net.request(1, 777, bytes.len() as u32, &bytes).0, 0);
        assert_eq!(card.bytes(777, bytes.len()), bytes);
        // And read back through 2 KiB of send buffer.
        let (error, data) = net.request(0, 777, bytes.len() as u32, &[]);
        assert_eq!(error, 0);
        assert!(data == bytes, "read back differs");
        assert_eq!(net.request(3, 0, 0, &[]).0, 0, "flush");
        // Disconnect: the server closes its side.
        net.send(&common::request_header(0, 2, 0, 0, 0));
        while net.client().may_recv() {
            net.step();
        }
        net.client().close();
        for _ in 0..100 {
            net.step();
        }
        assert_eq!(
            net.server.take_session_end(),
            Some(SessionEnd::Closed(CloseReason::Disconnect))
        );
        assert!(!net.server.has_client());
        // Let both sockets reach Closed/TimeWait so the server re-listens.
        while net.client().is_open() || net.client().state() == tcp::State::TimeWait {
            net.client().abort();
            net.step();
        }
        for _ in 0..10 {
            net.step();
        }
    }
}

#[test]
fn a_connection_closed_before_the_server_looked_is_closed_and_the_next_client_served() {
    let mut net = Net::new(MemCard::new(64));
    // Connect and leave with only the interface polled: the server's socket
    // goes from LISTEN to CLOSE-WAIT between two of the server's polls, as
    // when a client gives up while a board is busy.
    let endpoint = (IpAddress::v4(127, 0, 0, 1), nbd_embedded::DEFAULT_PORT);
    let socket = net.sockets.get_mut::<tcp::Socket>(net.client);
    socket
        .connect(net.iface.context(), endpoint, 49160)
        .unwrap();
    let poll_interface = |net: &mut Net| {
        net.iface.poll(net.now, &mut net.device, &mut net.sockets);
        net.now += smoltcp::time::Duration::from_millis(1);
    };
    for _ in 0..100 {
        poll_interface(&mut net);
    }
    assert!(net.client().may_send(), "the handshake completed");
    net.client().close();
    for _ in 0..100 {
        poll_interface(&mut net);
    }
    let server_socket = net.server.handle();
    assert_eq!(
        net.sockets.get::<tcp::Socket>(server_socket).state(),
        tcp::State::CloseWait
    );
    // The server serves that connection (a greeting nobody reads) and
    // closes it, then listens again: the next client is served.
    for _ in 0..100 {
        net.step();
    }
    assert_eq!(net.server.take_session_end(), Some(SessionEnd::Dropped));
    while net.client().is_open() || net.client().state() == tcp::State::TimeWait {
        net.client().abort();
        net.step();
    }
    net.connect(49161);
    assert!(net.server.has_client());
    let (error, data) = net.request(0, 0, 512, &[]);
    assert_eq!(error, 0);
    assert_eq!(data, (0..512).map(pattern_byte).collect::<Vec<u8>>());
}

#[test]
fn a_dropped_session_is_reported_before_the_standby_client_is_served() {
    let mut device = Loopback::new(Medium::Ethernet);
    let mut iface = common::loopback_interface(&mut device);
    let mut sockets = SocketSet::new(Vec::new());
    let socket = || {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 2048]),
            tcp::SocketBuffer::new(vec![0; 2048]),
        )
    };
    let main = sockets.add(socket());
    let standby = sockets.add(socket());
    let clients = [sockets.add(socket()), sockets.add(socket())];
    let storage = BlockStorage::new(MemCard::new(64)).unwrap();
    let exports: &'static [Export<'static>] = Box::leak(Box::new([storage.export("card")]));
    let mut server = TcpServer::new(
        main,
        nbd_embedded::DEFAULT_PORT,
        Config::default(),
        exports,
        storage,
    )
    .with_standby(standby);
    let mut now = Instant::from_millis(0);
    let mut ends = Vec::new();
    let mut step =
        |server: &mut Server, sockets: &mut SocketSet<'static>, iface: &mut Interface| {
            server.poll(now, iface, &mut device, sockets);
            now += smoltcp::time::Duration::from_millis(1);
            ends.extend(server.take_session_end());
        };
    step(&mut server, &mut sockets, &mut iface);
    // Both clients connect: the first is served on the main socket, the
    // second waits on the standby with bytes that are no client flags.
    for (client, port) in clients.into_iter().zip([49170, 49171]) {
        sockets
            .get_mut::<tcp::Socket>(client)
            .connect(
                iface.context(),
                (IpAddress::v4(127, 0, 0, 1), nbd_embedded::DEFAULT_PORT),
                port,
            )
            .unwrap();
        for _ in 0..100 {
            step(&mut server, &mut sockets, &mut iface);
        }
        assert!(sockets.get::<tcp::Socket>(client).may_send());
    }
    assert!(server.has_client());
    sockets
        .get_mut::<tcp::Socket>(clients[1])
        .send_slice(&[0x5a; 64])
        .unwrap();
    for _ in 0..100 {
        step(&mut server, &mut sockets, &mut iface);
    }
    // The first client resets its connection: its session ends, and the
    // second's fails at once on its flags. Both ends are reported.
    sockets.get_mut::<tcp::Socket>(clients[0]).abort();
    for _ in 0..100 {
        step(&mut server, &mut sockets, &mut iface);
    }
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert_eq!(ends[0], SessionEnd::Dropped);
    assert!(matches!(ends[1], SessionEnd::Failed(_)), "{ends:?}");
}
