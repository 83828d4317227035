//! Connections the server reclaims or restricts: TCP keepalive on by
//! default (`--keepalive`), `--idle-timeout` in transmission, and the
//! `writers=exclusive` export option seen by real clients.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    CMD_READ, Server, have_tools, nbdinfo_json, negotiate_export_name, read_simple_reply,
    read_until_closed, request_bytes, run, tool,
};

/// `NBD_FLAG_READ_ONLY` in the transmission flags.
const FLAG_READ_ONLY: u16 = 1 << 1;

/// The `ss` line of the server's side of the connection from `client`.
fn socket_line(server: &Server, client: SocketAddr) -> String {
    let output = run(
        Command::new("ss").args([
            "-tnoH",
            "state",
            "established",
            &format!(
                "( sport = :{} and dport = :{} )",
                server.port(),
                client.port()
            ),
        ]),
        Duration::from_secs(10),
    );
    output.stdout
}

#[test]
fn keepalive_is_on_by_default_and_can_be_turned_off() {
    if !have_tools(&["ss"]) {
        return;
    }
    let server = Server::start_default();
    let mut stream = server.connect();
    negotiate_export_name(&mut stream, "");
    let client = stream.local_addr().expect("address");
    // Until the last reply is acknowledged `ss` shows the retransmission
    // timer instead.
    let mut line = String::new();
    let shown = common::wait_until(Duration::from_secs(5), || {
        line = socket_line(&server, client);
        line.contains("timer:(keepalive")
    });
    assert!(shown, "no keepalive timer: {line}");
    let quiet = Server::start(["--keepalive", "0"]);
    let mut stream = quiet.connect();
    negotiate_export_name(&mut stream, "");
    let line = socket_line(&quiet, stream.local_addr().expect("address"));
    assert!(line.contains("127.0.0.1"), "connection not listed: {line}");
    assert!(
        !line.contains("keepalive"),
        "keepalive with --keepalive 0: {line}"
    );
}

#[test]
fn idle_clients_are_disconnected_and_busy_ones_are_not() {
    let server = Server::start(["--idle-timeout", "1"]);
    let mut idle = server.connect();
    negotiate_export_name(&mut idle, "");
    let mut busy = server.connect();
    negotiate_export_name(&mut busy, "");
    let started = Instant::now();
    // The busy client sends a read every 300 ms for 3 s.
    while started.elapsed() < Duration::from_secs(3) {
        busy.write_all(&request_bytes(CMD_READ, 1, 0, 512))
            .expect("busy client still connected");
        let (error, _) = read_simple_reply(&mut busy).expect("reply");
        assert_eq!(error, 0);
        let mut data = [0u8; 512];
        std::io::Read::read_exact(&mut busy, &mut data).expect("data");
        std::thread::sleep(Duration::from_millis(300));
    }
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5));
    assert!(closed, "the idle client was not disconnected");
    assert!(
        server.stderr().contains("--idle-timeout"),
        "no log line saying why: {}",
        server.stderr()
    );
}

/// A connection from `source` (a loopback address other than
/// 127.0.0.1 stands for another machine).
fn connect_from(server: &Server, source: &str) -> TcpStream {
    let rt = common::runtime();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("address"))
            .expect("bind the source address");
        socket.connect(server.addr()).await.expect("connect")
    });
    let stream = stream.into_std().expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

fn read_only_for_nbdinfo(server: &Server) -> bool {
    let info = nbdinfo_json(&[&server.uri_for("disk")], Duration::from_secs(30));
    info["exports"][0]["is_read_only"]
        .as_bool()
        .expect("is_read_only in nbdinfo --json")
}

#[test]
fn an_exclusive_export_is_read_only_to_other_clients_while_one_writes() {
    if !have_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let server = Server::start(["--export", "disk=memory:16M,writers=exclusive"]);
    assert!(
        !read_only_for_nbdinfo(&server),
        "writable while nobody writes"
    );
    // Another machine (127.0.0.2) opens it for writing, twice (multi-conn).
    let mut first = connect_from(&server, "127.0.0.2");
    let (_, flags) = negotiate_export_name(&mut first, "disk");
    assert_eq!(
        flags & FLAG_READ_ONLY,
        0,
        "the first writer got it read-only"
    );
    let mut second = connect_from(&server, "127.0.0.2");
    let (_, flags) = negotiate_export_name(&mut second, "disk");
    assert_eq!(
        flags & FLAG_READ_ONLY,
        0,
        "a second connection of the same client got it read-only"
    );
    // Clients from 127.0.0.1 now see it read-only, and cannot write.
    assert!(read_only_for_nbdinfo(&server), "nbdinfo saw it writable");
    let write = run(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 4096",
            &server.uri_for("disk"),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        !write.success()
            || write.stderr.contains("ermission")
            || write.stdout.contains("ermission"),
        "qemu-io wrote to an export another client holds: {}",
        write.describe()
    );
    let read = run(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read 0 4096",
            &server.uri_for("disk"),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        read.success(),
        "qemu-io could not read: {}",
        read.describe()
    );
    // Once the writer's connections close, anyone may write again.
    drop(first);
    assert!(
        read_only_for_nbdinfo(&server),
        "one writer connection still open"
    );
    drop(second);
    let free = common::wait_until(Duration::from_secs(5), || !read_only_for_nbdinfo(&server));
    assert!(free, "still read-only after the writer left");
    let write = run(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 4096",
            &server.uri_for("disk"),
        ]),
        Duration::from_secs(30),
    );
    assert!(
        write.success(),
        "qemu-io could not write: {}",
        write.describe()
    );
}
