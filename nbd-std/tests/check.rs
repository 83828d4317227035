//! `nbd-std check`, the conformance suite: `nbd-std serve` passes every
//! rule (TCP, unix socket, read-only export); a deliberately broken server
//! fails the rules it breaks (exit status 1); `nbdkit`, `qemu-nbd` and
//! `nbd-server` are checked to completion within a time bound and their
//! results printed (not asserted: they are other projects' servers).

mod common;
mod peers;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    CMD_DISC, CMD_READ, CMD_WRITE, OPT_EXPORT_NAME, OPTION_REPLY_MAGIC, Output, SIMPLE_REPLY_MAGIC,
    Server, have_tools, run, server_binary, temp_dir,
};
use peers::Peer;

/// A whole run, with every rule's 5-second budget, stays under this.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// Rules in the suite at least (the issue asks for 40).
const MIN_RULES: usize = 40;

fn check(uri: &str, extra: &[&str]) -> Output {
    let started = Instant::now();
    let output = run(
        std::process::Command::new(server_binary())
            .arg("check")
            .arg(uri)
            .args(extra),
        RUN_TIMEOUT,
    );
    eprintln!(
        "nbd-std check {uri} {extra:?}: {} in {:.1} s\n{}",
        output.status,
        started.elapsed().as_secs_f64(),
        output.stdout
    );
    output
}

/// (passed, failed, skipped) from the summary line, which must be last.
fn summary(output: &Output) -> (usize, usize, usize) {
    let last = output.stdout.lines().last().unwrap_or_default();
    let numbers: Vec<usize> = last
        .split(", ")
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        numbers.len() == 3 && last.ends_with("skipped"),
        "no summary line\n{}",
        output.describe()
    );
    let lines = output
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("SKIP"))
        .count();
    assert_eq!(
        lines,
        numbers.iter().sum::<usize>(),
        "one line per rule\n{}",
        output.describe()
    );
    (numbers[0], numbers[1], numbers[2])
}

fn assert_all_pass(output: &Output) {
    let (passed, failed, skipped) = summary(output);
    assert_eq!(failed, 0, "rules failed\n{}", output.describe());
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    assert!(
        passed + skipped >= MIN_RULES,
        "only {} rules",
        passed + skipped
    );
}

#[test]
fn nbd_std_serve_passes_every_rule() {
    // Over 4 GiB, so the 64-bit block status rule runs too.
    let server = Server::start(["--size", "8G"]);
    let output = check(&server.uri(), &[]);
    assert_all_pass(&output);
    let (passed, _, skipped) = summary(&output);
    // Only what nbd-std does not advertise may be skipped: a read-only
    // export, FAST_ZERO unadvertised, constraints it does not have, the
    // client flag it does offer.
    assert!(passed >= 75, "{passed} passed\n{}", output.describe());
    for line in output.stdout.lines().filter(|l| l.starts_with("SKIP")) {
        assert!(
            [
                "hs.unadvertised-no-zeroes",
                "tx.misaligned-einval",
                "tx.over-maximum-einval",
                "tx.read-only-refused",
                "tx.read-only-eperm",
                "tx.fast-zero-unadvertised",
            ]
            .iter()
            .any(|id| line.contains(id)),
            "unexpected skip: {line}"
        );
    }
    assert!(skipped <= 6);
}

#[test]
fn nbd_std_serve_read_only_and_unix_socket_pass() {
    let dir = temp_dir();
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(
        &socket,
        [
            "--export",
            "disk=memory:64M",
            "--export",
            "ro=memory:64M,ro",
        ],
    );
    let output = check(&server.uri_for("ro"), &[]);
    assert_all_pass(&output);
    assert!(
        output
            .stdout
            .lines()
            .any(|l| l.starts_with("PASS") && l.contains("tx.read-only-eperm")),
        "{}",
        output.describe()
    );
    let output = check(&server.uri_for("disk"), &["--no-write"]);
    assert_all_pass(&output);
    assert!(
        output
            .stdout
            .lines()
            .any(|l| l.starts_with("SKIP") && l.contains("tx.write-read-back")),
        "--no-write must skip the writing rules\n{}",
        output.describe()
    );
}

#[test]
fn json_output_matches_the_lines() {
    let server = Server::start(["--size", "64M"]);
    let output = check(
        &server.uri(),
        &["--json", "--only", "opt.", "--only", "tx.cookie"],
    );
    assert_eq!(output.code(), Some(0), "{}", output.describe());
    let json: serde_json::Value = serde_json::from_str(&output.stdout).expect("JSON");
    let rules = json["rules"].as_array().expect("rules");
    assert!(rules.len() >= 10);
    assert!(rules.iter().all(|r| {
        r["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("opt.") || id == "tx.cookie-echoed")
    }));
    assert_eq!(json["failed"], 0);
    assert_eq!(
        json["passed"].as_u64().expect("passed") + json["skipped"].as_u64().expect("skipped"),
        rules.len() as u64
    );
}

#[test]
fn usage_and_connection_errors_exit_2() {
    let output = check("http://example.com/", &[]);
    assert_eq!(output.code(), Some(2), "{}", output.describe());
    let output = check("nbds://127.0.0.1/", &[]);
    assert_eq!(output.code(), Some(2), "{}", output.describe());
    // Nothing listens on a port that was just free.
    let port = common::free_port();
    let output = check(&format!("nbd://127.0.0.1:{port}/"), &["--timeout", "2"]);
    assert_eq!(output.code(), Some(2), "{}", output.describe());
    assert!(
        output.stderr.contains("nbd-std: check:"),
        "{}",
        output.describe()
    );
}

/// A server that breaks rules on purpose: it offers NO_ZEROES but always
/// sends the 124 zero bytes, closes on ABORT without NBD_REP_ACK, and knows
/// only EXPORT_NAME (everything else gets NBD_REP_ERR_UNSUP). Transmission
/// answers reads with zeroes and everything else with success.
struct BrokenServer {
    port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl BrokenServer {
    fn start() -> BrokenServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let accept = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread::spawn(move || {
                            let _ = serve_broken(stream);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        BrokenServer {
            port,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for BrokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn serve_broken(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut greeting = Vec::new();
    greeting.extend_from_slice(b"NBDMAGICIHAVEOPT");
    greeting.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut header = [0u8; 16];
        s.read_exact(&mut header)?;
        let option = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let length = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
        let mut data = vec![0u8; length as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => break,
            // NBD_OPT_ABORT
            2 => return Ok(()),
            _ => {
                let mut reply = Vec::new();
                reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
                reply.extend_from_slice(&option.to_be_bytes());
                reply.extend_from_slice(&0x8000_0001u32.to_be_bytes());
                reply.extend_from_slice(&0u32.to_be_bytes());
                s.write_all(&reply)?;
            }
        }
    }
    let mut export = Vec::new();
    export.extend_from_slice(&(64u64 << 20).to_be_bytes());
    export.extend_from_slice(&1u16.to_be_bytes());
    export.extend_from_slice(&[0u8; 124]);
    s.write_all(&export)?;
    loop {
        let mut request = [0u8; 28];
        s.read_exact(&mut request)?;
        let command = u16::from_be_bytes([request[6], request[7]]);
        let length =
            u32::from_be_bytes([request[24], request[25], request[26], request[27]]) as usize;
        if command == CMD_DISC {
            return Ok(());
        }
        if command == CMD_WRITE {
            let mut payload = vec![0u8; length];
            s.read_exact(&mut payload)?;
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&request[8..16]);
        if command == CMD_READ {
            reply.resize(16 + length, 0);
        }
        s.write_all(&reply)?;
    }
}

#[test]
fn a_broken_server_fails_the_rules_it_breaks() {
    let server = BrokenServer::start();
    let output = check(
        &format!("nbd://127.0.0.1:{}/", server.port),
        &["--timeout", "2"],
    );
    let (_, failed, _) = summary(&output);
    assert!(failed >= 2, "{}", output.describe());
    assert_eq!(output.code(), Some(1), "{}", output.describe());
    for id in ["opt.abort ", "hs.export-name-no-zeroes"] {
        assert!(
            output
                .stdout
                .lines()
                .any(|l| l.starts_with("FAIL") && l.contains(id)),
            "{id} should fail\n{}",
            output.describe()
        );
    }
}

/// Runs the suite against a peer: it must finish in time and print its
/// summary; the numbers are printed for docs/CONFORMANCE.md.
fn check_peer(peer: &Peer) {
    let output = check(&peer.uri(), &[]);
    let (passed, failed, skipped) = summary(&output);
    assert!(
        matches!(output.code(), Some(0 | 1)),
        "{}",
        output.describe()
    );
    eprintln!(
        "{}: {passed} passed, {failed} failed, {skipped} skipped",
        peer.name
    );
}

#[test]
fn nbdkit_memory_is_checked() {
    if !have_tools(&["nbdkit"]) {
        return;
    }
    check_peer(&Peer::nbdkit("64M", &[], &[]));
}

#[test]
fn qemu_nbd_is_checked() {
    if !have_tools(&["qemu-nbd"]) {
        return;
    }
    check_peer(&Peer::qemu_nbd(64 << 20));
}

#[test]
fn nbd_server_is_checked() {
    if !have_tools(&["nbd-server"]) {
        return;
    }
    check_peer(&Peer::nbd_server(64 << 20));
}
