//! The `nbd-std serve` command line: bad arguments are refused with one line
//! naming the argument and exit code 2 before anything listens; SIGTERM and
//! SIGINT stop the server cleanly (exit 0) even with clients connected.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{
    CMD_READ, CMD_WRITE, Output, STOP_TIMEOUT, Server, free_port, negotiate_export_name,
    read_simple_reply, read_until_closed, request_bytes, run, server_binary, temp_dir,
};

const ESHUTDOWN: u32 = 108;

fn serve(port: u16, args: &[&str]) -> Output {
    run(
        Command::new(server_binary())
            .arg("serve")
            .args(["--port", &port.to_string()])
            .args(args),
        Duration::from_secs(10),
    )
}

/// Exit code 2 without waiting for clients, one line on stderr naming
/// one of `names`.
fn assert_refused(args: &[&str], names: &[&str]) {
    let out = serve(free_port(), args);
    assert_eq!(out.code(), Some(2), "exit code\n{}", out.describe());
    let message = out.stderr.trim();
    assert!(!message.is_empty(), "no error message\n{}", out.describe());
    assert_eq!(
        message.lines().count(),
        1,
        "error is not one line\n{}",
        out.describe()
    );
    assert!(
        names.iter().any(|name| message.contains(name)),
        "error does not name any of {names:?}\n{}",
        out.describe()
    );
}

#[test]
fn unknown_export_spec() {
    assert_refused(&["--export", "a=bogus:1"], &["--export", "bogus"]);
}

#[test]
fn zero_size() {
    assert_refused(&["--size", "0"], &["--size"]);
    assert_refused(&["--export", "a=memory:0"], &["--export", "memory:0"]);
}

#[test]
fn unreadable_file() {
    let dir = temp_dir();
    let missing = dir.path().join("no/such/disk.img");
    let missing = missing.to_str().expect("UTF-8 path");
    assert_refused(
        &["--export", &format!("disk=file:{missing}")],
        &["--export", missing],
    );
    // A bad export after a good one still refuses the whole command line.
    assert_refused(
        &[
            "--export",
            "ok=memory:1M",
            "--export",
            &format!("disk=file:{missing}"),
        ],
        &["--export", missing],
    );
}

#[test]
fn port_in_use() {
    let occupant = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port");
    let port = occupant.local_addr().expect("local address").port();
    let out = serve(port, &["--size", "1M"]);
    assert_eq!(out.code(), Some(2), "exit code\n{}", out.describe());
    let message = out.stderr.trim();
    assert_eq!(
        message.lines().count(),
        1,
        "error is not one line\n{}",
        out.describe()
    );
    assert!(
        message.contains(&port.to_string()) || message.contains("--port"),
        "error does not name the port\n{}",
        out.describe()
    );
    drop(occupant);
}

#[test]
fn sigterm_with_an_idle_client_exits_0() {
    let mut server = Server::start(["--size", "1M"]);
    let mut client = server.connect();
    let (size, _) = negotiate_export_name(&mut client, "");
    assert_eq!(size, 1 << 20);
    match server.signal_and_wait("TERM", STOP_TIMEOUT) {
        Some(status) => assert!(status.success(), "exit status {status} after SIGTERM"),
        None => {
            panic!("server still running {STOP_TIMEOUT:?} after SIGTERM with a client connected")
        }
    }
    let (_, closed) = read_until_closed(&mut client, Duration::from_secs(5));
    assert!(
        closed,
        "client connection still open after the server exited"
    );
}

#[test]
fn sigint_with_a_client_mid_negotiation_exits_0() {
    let mut server = Server::start(["--size", "1M"]);
    let mut client = server.connect();
    common::read_greeting(&mut client);
    match server.signal_and_wait("INT", STOP_TIMEOUT) {
        Some(status) => assert!(status.success(), "exit status {status} after SIGINT"),
        None => panic!("server still running {STOP_TIMEOUT:?} after SIGINT"),
    }
}

/// Requests sent before SIGTERM are answered whole (done, or refused with
/// ESHUTDOWN if not started), the connection ends on a reply boundary, and
/// the server exits 0.
#[test]
fn sigterm_lets_requests_in_flight_finish() {
    const MIB: u32 = 1 << 20;
    const REQUESTS: u64 = 48;
    let mut server = Server::start(["--size", "64M"]);
    let mut client = server.connect();
    negotiate_export_name(&mut client, "");

    // Known data first: 1 MiB of byte i at MiB i.
    for i in 0..REQUESTS {
        client
            .write_all(&request_bytes(CMD_WRITE, 1000 + i, i * u64::from(MIB), MIB))
            .expect("send write");
        client
            .write_all(&vec![i as u8; MIB as usize])
            .expect("send payload");
        let (error, cookie) = read_simple_reply(&mut client).expect("reply to a write");
        assert_eq!((error, cookie), (0, 1000 + i), "write reply");
    }

    // Pipeline the reads, wait for the first reply to start, then SIGTERM.
    let mut pipelined = Vec::new();
    for i in 0..REQUESTS {
        pipelined.extend_from_slice(&request_bytes(CMD_READ, i, i * u64::from(MIB), MIB));
    }
    client.write_all(&pipelined).expect("send reads");
    let mut header = [0u8; 16];
    client.read_exact(&mut header).expect("first reply header");
    common::send_signal(server.pid(), "TERM");

    let mut answered = 0;
    let mut next_header = Some(header);
    let mut data = vec![0u8; MIB as usize];
    loop {
        let header = match next_header.take() {
            Some(h) => h,
            None => {
                let mut h = [0u8; 16];
                match read_exact_or_eof(&mut client, &mut h) {
                    ReadEnd::Complete => h,
                    ReadEnd::EofAtStart => break,
                    ReadEnd::Truncated(n) => {
                        panic!("connection ended inside a reply header ({n} of 16 bytes)")
                    }
                }
            }
        };
        assert_eq!(
            u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")),
            common::SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        assert!(cookie < REQUESTS, "unexpected cookie {cookie}");
        match error {
            0 => {
                match read_exact_or_eof(&mut client, &mut data) {
                    ReadEnd::Complete => {}
                    end => panic!("read reply {cookie} truncated: {end:?}"),
                }
                assert!(
                    data.iter().all(|&b| b == cookie as u8),
                    "read {cookie} returned the wrong data"
                );
            }
            ESHUTDOWN => {}
            other => panic!("read {cookie} failed with error {other}"),
        }
        answered += 1;
        assert!(answered <= REQUESTS, "more replies than requests");
    }
    assert!(answered >= 1);
    match server.signal_and_wait("TERM", STOP_TIMEOUT) {
        Some(status) => assert!(status.success(), "exit status {status} after SIGTERM"),
        None => panic!("server still running {STOP_TIMEOUT:?} after SIGTERM"),
    }
}

#[derive(Debug)]
enum ReadEnd {
    Complete,
    EofAtStart,
    Truncated(usize),
}

fn read_exact_or_eof(stream: &mut TcpStream, buf: &mut [u8]) -> ReadEnd {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed after {filled} bytes: {e}"),
        }
    }
    match filled {
        n if n == buf.len() => ReadEnd::Complete,
        0 => ReadEnd::EofAtStart,
        n => ReadEnd::Truncated(n),
    }
}

/// `nbd-std completions SHELL` and `nbd-std man [COMMAND]` come from the
/// same clap definitions as --help: a new flag shows up in both.
#[test]
fn completions_and_man_pages_from_the_clap_definitions() {
    let generate = |args: &[&str]| {
        run(
            Command::new(server_binary()).args(args),
            Duration::from_secs(10),
        )
        .assert_success()
    };
    let bash = generate(&["completions", "bash"]);
    assert!(bash.stdout.contains("--pidfile"), "{}", bash.describe());
    // The script is valid bash.
    let dir = temp_dir();
    let script = dir.path().join("nbd-std.bash");
    std::fs::write(&script, &bash.stdout).expect("write completion script");
    let checked = run(
        Command::new("bash").arg("-n").arg(&script),
        Duration::from_secs(10),
    );
    assert!(checked.success(), "{}", checked.describe());
    for shell in ["zsh", "fish"] {
        let out = generate(&["completions", shell]);
        assert!(out.stdout.contains("serve"), "{}", out.describe());
    }

    let page = generate(&["man"]);
    assert!(page.stdout.starts_with(".ie"), "{}", page.describe());
    assert!(page.stdout.contains(".TH nbd-std 1"), "{}", page.describe());
    let serve_page = generate(&["man", "serve"]);
    assert!(
        serve_page.stdout.contains(".TH nbd-std-serve 1")
            && serve_page.stdout.contains("\\-\\-pidfile"),
        "{}",
        serve_page.describe()
    );
    let unknown = run(
        Command::new(server_binary()).args(["man", "nope"]),
        Duration::from_secs(10),
    );
    assert_eq!(unknown.code(), Some(2), "{}", unknown.describe());
}

/// Output into a pipe nobody reads (`nbd-std serve --help | head -1`
/// after `head` left) is an error, never a panic.
#[test]
fn output_into_a_closed_pipe_does_not_panic() {
    for args in [
        &["serve", "--help"][..],
        &["--version"],
        &["completions", "bash"],
        &["man"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut child = Command::new(server_binary())
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start nbd-std");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbd-std {args:?} did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            pipe.read_to_string(&mut stderr).expect("read stderr");
        }
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("nbd-std: "), "{args:?}: {stderr}");
    }
}
