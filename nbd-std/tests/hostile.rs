//! Hostile and broken clients: garbage, clients that stop mid-message, and
//! an option announcing 4 GiB of data. Each is answered per spec or
//! disconnected, and meanwhile `nbdinfo` on another connection still works
//! and the server stays up.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::{
    CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, IHAVEOPT, OPT_EXPORT_NAME, OPT_GO, OPT_LIST,
    OPTION_REPLY_MAGIC, Server, have_tools, negotiate_export_name, option_bytes, random_bytes,
    read_greeting, read_until_closed, request_bytes, run_ok, tool,
};

const SIZE: u64 = 4 << 20;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn start() -> Server {
    Server::start(["--size", "4M"])
}

/// `nbdinfo` on a new connection gets the right size; the server is up.
fn nbdinfo_works(server: &mut Server) {
    server.assert_running();
    let out = run_ok(
        tool("nbdinfo").args(["--size", &server.uri()]),
        Duration::from_secs(20),
    );
    assert_eq!(out.stdout.trim(), SIZE.to_string(), "{}", out.describe());
    server.assert_running();
}

/// The server closes the connection within `CLOSE_TIMEOUT`.
fn assert_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let (received, closed) = read_until_closed(stream, CLOSE_TIMEOUT);
    assert!(
        closed,
        "{what}: connection still open after {CLOSE_TIMEOUT:?} (received {} bytes)",
        received.len()
    );
    received
}

#[test]
fn garbage_instead_of_client_flags() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    read_greeting(&mut hostile);
    let mut bytes = vec![0xde, 0xad, 0xbe, 0xef];
    bytes.extend(random_bytes(1, 60));
    hostile.write_all(&bytes).expect("send garbage");
    nbdinfo_works(&mut server);
    let received = assert_closed(&mut hostile, "unknown client flags");
    assert!(
        received.is_empty(),
        "reply to unknown client flags: {received:02x?}"
    );
    nbdinfo_works(&mut server);
}

#[test]
fn garbage_before_the_greeting_is_read() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    for seed in 0..8 {
        let mut hostile = server.connect();
        // The server may close while we are still sending: ignore errors.
        let _ = hostile.write_all(&random_bytes(seed, 4096));
        nbdinfo_works(&mut server);
        assert_closed(&mut hostile, "garbage");
    }
    nbdinfo_works(&mut server);
}

#[test]
fn garbage_option_magic() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    read_greeting(&mut hostile);
    hostile
        .write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes())
        .expect("send client flags");
    hostile
        .write_all(&random_bytes(2, 64))
        .expect("send garbage");
    nbdinfo_works(&mut server);
    assert_closed(&mut hostile, "bad option magic");
    nbdinfo_works(&mut server);
}

#[test]
fn garbage_request_magic() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    negotiate_export_name(&mut hostile, "");
    hostile
        .write_all(&random_bytes(3, 64))
        .expect("send garbage");
    nbdinfo_works(&mut server);
    assert_closed(&mut hostile, "bad request magic");
    nbdinfo_works(&mut server);
}

#[test]
fn half_an_option_header_then_stall_and_close() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    read_greeting(&mut hostile);
    hostile
        .write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes())
        .expect("send client flags");
    let option = option_bytes(OPT_GO, 100, &[]);
    hostile
        .write_all(&option[..10])
        .expect("send half an option");
    nbdinfo_works(&mut server);
    thread::sleep(Duration::from_millis(300));
    nbdinfo_works(&mut server);
    drop(hostile);
    thread::sleep(Duration::from_millis(100));
    nbdinfo_works(&mut server);
}

#[test]
fn half_a_request_header_then_stall_and_close() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    negotiate_export_name(&mut hostile, "");
    let request = request_bytes(CMD_READ, 7, 0, 4096);
    hostile
        .write_all(&request[..14])
        .expect("send half a request");
    nbdinfo_works(&mut server);
    thread::sleep(Duration::from_millis(300));
    nbdinfo_works(&mut server);
    drop(hostile);
    thread::sleep(Duration::from_millis(100));
    nbdinfo_works(&mut server);
}

#[test]
fn half_a_write_payload_then_close() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let mut hostile = server.connect();
    negotiate_export_name(&mut hostile, "");
    hostile
        .write_all(&request_bytes(CMD_WRITE, 8, 0, 1 << 20))
        .expect("send write header");
    hostile
        .write_all(&random_bytes(4, 300 * 1024))
        .expect("send part of the payload");
    nbdinfo_works(&mut server);
    drop(hostile);
    thread::sleep(Duration::from_millis(100));
    nbdinfo_works(&mut server);
}

/// Option replies in `bytes`: (option, reply type) pairs; panics on a
/// malformed or truncated reply.
fn option_replies(bytes: &[u8]) -> Vec<(u32, u32)> {
    let mut replies = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 20, "truncated option reply: {rest:02x?}");
        let magic = u64::from_be_bytes(rest[0..8].try_into().expect("8 bytes"));
        assert_eq!(
            magic, OPTION_REPLY_MAGIC,
            "option reply magic in {bytes:02x?}"
        );
        let option = u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes"));
        let kind = u32::from_be_bytes(rest[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(rest[16..20].try_into().expect("4 bytes")) as usize;
        assert!(rest.len() >= 20 + len, "truncated option reply data");
        replies.push((option, kind));
        rest = &rest[20 + len..];
    }
    replies
}

#[test]
fn option_announcing_4_gib() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    for option in [OPT_GO, OPT_LIST, OPT_EXPORT_NAME, 0xDEAD] {
        let mut hostile = server.connect();
        read_greeting(&mut hostile);
        hostile
            .write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes())
            .expect("send client flags");
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        hostile.write_all(&header).expect("send option header");
        // Some data, as a client streaming it would send.
        let _ = hostile.write_all(&random_bytes(5, 64 * 1024));
        nbdinfo_works(&mut server);

        // Either an error reply for this option, or a disconnection.
        let (received, closed) = read_until_closed(&mut hostile, CLOSE_TIMEOUT);
        let replies = option_replies(&received);
        for &(opt, kind) in &replies {
            assert_eq!(opt, option, "reply names another option");
            assert_ne!(
                kind & 0x8000_0000,
                0,
                "option {option:#x} of 4 GiB accepted"
            );
        }
        assert!(
            closed || !replies.is_empty(),
            "option {option:#x} announcing 4 GiB: neither refused nor disconnected \
             within {CLOSE_TIMEOUT:?}"
        );
        drop(hostile);
        nbdinfo_works(&mut server);
    }
}

#[test]
fn many_idle_connections() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let mut server = start();
    let idle: Vec<TcpStream> = (0..64).map(|_| server.connect()).collect();
    nbdinfo_works(&mut server);
    drop(idle);
    nbdinfo_works(&mut server);
}

/// Writes refused for their range: the payload is still consumed, the
/// reply is ENOSPC, and the connection stays in sync.
#[test]
fn out_of_range_writes_keep_the_stream_in_sync() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    const ENOSPC: u32 = 28;
    let mut server = start();
    let mut client = server.connect();
    negotiate_export_name(&mut client, "");
    let cases: [(u64, u32); 4] = [
        (SIZE - 512, 4096),
        (SIZE, 1),
        (u64::MAX - 8191, 4096),
        // offset + length is exactly 2^64.
        (u64::MAX - 4095, 4096),
    ];
    for (cookie, (offset, length)) in cases.into_iter().enumerate() {
        let cookie = cookie as u64 + 100;
        client
            .write_all(&request_bytes(CMD_WRITE, cookie, offset, length))
            .expect("send write header");
        client
            .write_all(&vec![0x77; length as usize])
            .expect("send write payload");
        let what = format!("write of {length} bytes at {offset:#x}");
        let (error, got) = common::read_simple_reply(&mut client)
            .unwrap_or_else(|e| panic!("{what}: no reply ({e}); see the server log"));
        assert_eq!((error, got), (ENOSPC, cookie), "{what}");
        // The next request is parsed from the right place.
        client
            .write_all(&request_bytes(CMD_READ, cookie + 1000, 0, 512))
            .expect("send read");
        let (error, got) = common::read_simple_reply(&mut client)
            .unwrap_or_else(|e| panic!("read after the refused {what}: no reply ({e})"));
        assert_eq!(
            (error, got),
            (0, cookie + 1000),
            "read after the refused {what}"
        );
        let mut data = [0u8; 512];
        std::io::Read::read_exact(&mut client, &mut data).expect("read data");
        assert_eq!(data, [0u8; 512]);
    }
    client
        .write_all(&request_bytes(common::CMD_DISC, 1, 0, 0))
        .expect("send disconnect");
    assert_closed(&mut client, "NBD_CMD_DISC");
    nbdinfo_works(&mut server);
}
