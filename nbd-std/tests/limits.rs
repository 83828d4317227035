//! Limits under abuse (`--max-clients`, `--handshake-timeout`,
//! `--max-in-flight`, `--max-option-length`): 1,000 idle connections and
//! 1,000 that send garbage while a well-behaved client reads and writes;
//! the server's memory stays bounded, the client is served throughout, the
//! idle and stalled ones are dropped after the handshake timeout, and
//! clients beyond `--max-clients` are closed at once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, OPT_EXPORT_NAME, Random, Server, have_tools, option_bytes,
    proc_status_kib, read_greeting, read_until_closed, request_bytes, run, server_binary, tool,
};
use nbd_std::client::Client;

const IDLE: usize = 1000;
const GARBAGE: usize = 1000;
/// Short, so the test waits little; long enough that 2,000 connections
/// are all open before the first is dropped on a slow, shared machine.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the server's peak RSS with 2,000 connections (measured about
/// 30 MiB: see the figures the test prints).
const RSS_BOUND_KIB: u64 = 128 * 1024;

/// Raises this process's soft descriptor limit to `wanted` (children
/// inherit it); false when the hard limit does not allow it.
fn raise_descriptor_limit(wanted: u64) -> bool {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= wanted) {
        return true;
    }
    if limit.maximum.is_some_and(|hard| hard < wanted) {
        return false;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        },
    )
    .is_ok()
}

/// Sockets a process holds open.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list descriptors")
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

/// Client flags after the greeting (which is left unread: the server
/// sends it at once and does not wait for it to be read).
fn flags() -> [u8; 4] {
    (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
}

/// Sends garbage of kind `kind % 8`.
fn send_garbage(stream: &mut TcpStream, kind: usize, random: &mut Random) {
    let mut bytes = Vec::new();
    match kind % 8 {
        // Random bytes instead of client flags and options.
        0 => {
            let mut noise = vec![0u8; 64 + (random.next_u64() % 4000) as usize];
            random.fill(&mut noise);
            bytes = noise;
        }
        // An option header with a bad magic.
        1 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(b"IHAVEOPXzzzzzzzz");
        }
        // An option announcing 4 GiB - 1 bytes.
        2 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(&option_bytes(OPT_EXPORT_NAME + 100, u32::MAX, &[]));
        }
        // An option announcing 32 MiB (under --max-option-length) that
        // never arrive: the server waits, then the timeout drops it.
        3 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(&option_bytes(99, 32 << 20, &[1, 2, 3]));
        }
        // Half an option header, then nothing.
        4 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(&option_bytes(7, 10, &[])[..5]);
        }
        // Transmission reached, then a request with a bad magic.
        5 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(&option_bytes(OPT_EXPORT_NAME, 0, &[]));
            bytes.extend_from_slice(b"GARBAGE GARBAGE GARBAGE GARBAGE");
        }
        // Transmission reached, then a write announcing 4 GiB - 1 bytes.
        6 => {
            bytes.extend_from_slice(&flags());
            bytes.extend_from_slice(&option_bytes(OPT_EXPORT_NAME, 0, &[]));
            bytes.extend_from_slice(&request_bytes(1, 1, 0, u32::MAX));
            bytes.extend_from_slice(&[0xee; 1000]);
        }
        // Unknown options with random data, answered and refused, then
        // nothing.
        _ => {
            bytes.extend_from_slice(&flags());
            for _ in 0..20 {
                let mut data = vec![0u8; (random.next_u64() % 200) as usize];
                random.fill(&mut data);
                let length = u32::try_from(data.len()).expect("short");
                bytes.extend_from_slice(&option_bytes(0xdead, length, &data));
            }
        }
    }
    // The server may close first (that is the point): errors are fine.
    let _ = stream.write_all(&bytes);
}

/// What the well-behaved client did.
#[derive(Default)]
struct Served {
    rounds: AtomicU64,
    failures: AtomicU64,
    slowest_micros: AtomicU64,
}

/// Writes, reads back and checks 64 KiB blocks until `stop`.
fn well_behaved(uri: String, stop: Arc<AtomicBool>, served: Arc<Served>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let client = match Client::connect(&uri).await {
            Ok(client) => client,
            Err(error) => {
                eprintln!("well-behaved client cannot connect: {error}");
                served.failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let mut random = Random::new(7);
        let mut data = vec![0u8; 64 << 10];
        let mut back = vec![0u8; 64 << 10];
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            random.fill(&mut data);
            let offset = (round % 64) * (64 << 10);
            let started = Instant::now();
            let ok = client.write_at(&data, offset).await.is_ok()
                && client.read_at(&mut back, offset).await.is_ok()
                && back == data;
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            served.slowest_micros.fetch_max(micros, Ordering::Relaxed);
            if ok {
                served.rounds.fetch_add(1, Ordering::Relaxed);
            } else {
                served.failures.fetch_add(1, Ordering::Relaxed);
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = client.disconnect().await;
    });
}

#[test]
fn thousands_of_idle_and_garbage_connections_stay_bounded() {
    let wanted = 2 * (IDLE + GARBAGE) as u64 + 1000;
    if !raise_descriptor_limit(wanted) {
        common::missing(&format!(
            "a hard descriptor limit of {wanted} (ulimit -Hn; raise it in /etc/security/limits.conf)"
        ));
        return;
    }
    let timeout = HANDSHAKE_TIMEOUT.as_secs().to_string();
    let mut server = Server::start([
        "--size",
        "64M",
        "--log-level",
        "warn",
        "--max-clients",
        "2100",
        "--handshake-timeout",
        &timeout,
    ]);
    let pid = server.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(Served::default());
    let client = {
        let (uri, stop, served) = (server.uri(), Arc::clone(&stop), Arc::clone(&served));
        thread::spawn(move || well_behaved(uri, stop, served))
    };
    assert!(
        common::wait_until(Duration::from_secs(10), || served
            .rounds
            .load(Ordering::Relaxed)
            > 10),
        "the well-behaved client made no progress"
    );
    // The listener, the runtime's own and the well-behaved client's.
    let base_sockets = sockets(pid);
    let baseline_rss = proc_status_kib(pid, "VmRSS");

    let opening = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(server.connect());
    }
    let mut random = Random::new(42);
    let mut garbage = Vec::with_capacity(GARBAGE);
    for kind in 0..GARBAGE {
        let mut stream = server.connect();
        send_garbage(&mut stream, kind, &mut random);
        garbage.push(stream);
    }
    let opened = opening.elapsed();
    let last_connect = Instant::now();
    // Give the server a moment to take every connection in and close
    // those whose garbage it can judge at once (kinds 0, 1, 2, 5 and 6):
    // the idle ones and the stalled kinds 3, 4 and 7 stay.
    let stalled = (0..GARBAGE)
        .filter(|kind| [3, 4, 7].contains(&(kind % 8)))
        .count();
    let expected = IDLE + stalled;
    let settled = common::wait_until(Duration::from_secs(5), || {
        sockets(pid) == base_sockets + expected
    });
    assert!(
        settled,
        "the server holds {} connections, {expected} expected (opening took {opened:?})",
        sockets(pid) - base_sockets
    );
    let held = sockets(pid) - base_sockets;
    let held_rss = proc_status_kib(pid, "VmRSS");
    let rounds_while_open = served.rounds.load(Ordering::Relaxed);
    assert!(
        opened < HANDSHAKE_TIMEOUT,
        "opening took {opened:?}, longer than the handshake timeout: the figures would mislead"
    );

    // Every idle and stalled connection must go once the timeout passes.
    let all_dropped = common::wait_until(HANDSHAKE_TIMEOUT + Duration::from_secs(15), || {
        sockets(pid) <= base_sockets
    });
    let dropped_after = opening.elapsed();
    let after_last = last_connect.elapsed();
    let left = sockets(pid).saturating_sub(base_sockets);
    let final_rss = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    // VmHWM is updated lazily: never below an RSS seen.
    let peak_rss = hwm.max(held_rss);
    stop.store(true, Ordering::Relaxed);
    client.join().expect("well-behaved client thread");
    let rounds = served.rounds.load(Ordering::Relaxed);
    let failures = served.failures.load(Ordering::Relaxed);
    let slowest = Duration::from_micros(served.slowest_micros.load(Ordering::Relaxed));

    println!("connections opened: {IDLE} idle + {GARBAGE} garbage in {opened:?}");
    println!("connections held by the server at once: {held} (+1 well-behaved client)");
    println!(
        "server RSS: {} KiB before, {} KiB holding them ({} bytes per connection), peak (VmHWM) {} KiB, {} KiB after",
        baseline_rss,
        held_rss,
        (held_rss.saturating_sub(baseline_rss) * 1024) / held.max(1) as u64,
        peak_rss,
        final_rss
    );
    println!(
        "all dropped {dropped_after:?} after the first connect, {after_last:?} after the last (handshake timeout {HANDSHAKE_TIMEOUT:?}); {left} left"
    );
    println!(
        "well-behaved client: {rounds} write+read+verify rounds ({rounds_while_open} before the flood was open), {failures} failures, slowest round {slowest:?}"
    );

    assert!(held >= IDLE, "only {held} connections held");
    assert!(
        all_dropped,
        "{left} connections outlived the handshake timeout"
    );
    assert!(
        dropped_after >= HANDSHAKE_TIMEOUT,
        "connections dropped before the timeout ({dropped_after:?})"
    );
    assert!(peak_rss < RSS_BOUND_KIB, "peak RSS {peak_rss} KiB");
    assert_eq!(failures, 0, "the well-behaved client saw failures");
    assert!(
        rounds > rounds_while_open,
        "the well-behaved client was not served after the flood"
    );
    assert!(slowest < Duration::from_secs(5), "a round took {slowest:?}");
    // An idle client saw the greeting, then the connection end.
    for stream in idle.iter_mut().take(50) {
        let (bytes, closed) = read_until_closed(stream, Duration::from_secs(5));
        assert!(closed, "an idle connection is still open");
        assert_eq!(bytes.len(), 18, "greeting, then nothing");
    }
    server.assert_running();
}

#[test]
fn clients_beyond_max_clients_are_closed_at_once() {
    let server = Server::start(["--max-clients", "3"]);
    let mut kept: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = server.connect();
            read_greeting(&mut stream);
            stream
        })
        .collect();
    let started = Instant::now();
    let mut refused = server.connect();
    let (bytes, closed) = read_until_closed(&mut refused, Duration::from_secs(5));
    let took = started.elapsed();
    println!("the fourth client was closed after {took:?}");
    assert!(closed, "the fourth client hangs");
    assert!(
        bytes.is_empty(),
        "the fourth client got {} bytes",
        bytes.len()
    );
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");
    if have_tools(&["nbdinfo"]) {
        let started = Instant::now();
        let out = run(tool("nbdinfo").arg(server.uri()), Duration::from_secs(20));
        assert!(!out.success(), "nbdinfo succeeded beyond --max-clients");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nbdinfo waited {:?}",
            started.elapsed()
        );
    }
    // A slot freed is a slot taken.
    drop(kept.pop());
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let mut stream = server.connect();
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("read timeout");
            let mut greeting = [0u8; 18];
            stream.read_exact(&mut greeting).is_ok()
        }),
        "no slot after a client left"
    );
    assert!(
        server.stderr().contains("--max-clients"),
        "refusals are logged"
    );
}

/// Out-of-range limits are refused before anything listens, naming the
/// flag, with exit code 2.
#[test]
fn bad_limits_are_refused() {
    for (args, mention) in [
        (&["--max-clients", "0"][..], "--max-clients"),
        (&["--max-in-flight", "0"], "--max-in-flight"),
        (&["--max-in-flight", "129"], "1..=128"),
        (&["--poll-window", "10001"], "0..=10000"),
        (&["--gather-wait", "1001"], "0..=1000"),
        (&["--max-option-length", "100"], "1024 bytes"),
        (&["--max-option-length", "5G"], "--max-option-length"),
        (&["--handshake-timeout=-1"], "--handshake-timeout"),
        (&["--handshake-timeout", "soon"], "number of seconds"),
        (&["--export", "a=memory:1M,fail=eio:2"], "from 0 to 1"),
        (&["--export", "a=memory:1M,fail=eperm@0-1"], "eio or enospc"),
        (
            &["--export", "a=memory:1M,fail=eio@2M-1M"],
            "START below END",
        ),
    ] {
        let out = run(
            std::process::Command::new(server_binary())
                .arg("serve")
                .args(["--port", "1"])
                .args(args),
            Duration::from_secs(20),
        );
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.describe());
        assert!(out.stderr.contains(mention), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    }
}

/// Limits within range are taken, and a handshake timeout of 0 means none.
#[test]
fn limits_in_range_are_served() {
    let server = Server::start([
        "--max-in-flight",
        "1",
        "--max-option-length",
        "4K",
        "--handshake-timeout",
        "0",
    ]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = Client::connect(&server.uri()).await.expect("connect");
        // Many requests at once: the server takes them one at a time.
        let writes: Vec<_> = (0..32u8)
            .map(|i| {
                let client = client.clone();
                tokio::spawn(async move { client.write_at(&[i; 4096], u64::from(i) * 4096).await })
            })
            .collect();
        for write in writes {
            write.await.expect("task").expect("write");
        }
        let mut buf = vec![0u8; 4096];
        client.read_at(&mut buf, 31 * 4096).await.expect("read");
        assert_eq!(buf, vec![31u8; 4096]);
    });
    // An option longer than 4 KiB now closes the connection.
    let mut stream = server.connect();
    read_greeting(&mut stream);
    stream.write_all(&flags()).expect("flags");
    stream
        .write_all(&option_bytes(99, 8192, &[]))
        .expect("option");
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5));
    assert!(closed, "an 8 KiB option did not close the connection");
}

/// The handshake timeout covers TLS: a client that asks for STARTTLS and
/// then stalls in the TLS handshake is dropped too. A client that reached
/// transmission is never timed out, however long it stays idle.
#[test]
fn handshake_timeout_covers_tls_and_spares_negotiated_clients() {
    const OPT_STARTTLS: u32 = 5;
    const TIMEOUT: Duration = Duration::from_secs(1);
    if !have_tools(&["openssl"]) {
        return;
    }
    let dir = common::temp_dir();
    common::run_ok(
        tool("openssl").current_dir(dir.path()).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ]),
        Duration::from_secs(30),
    );
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let server = Server::start([
        "--handshake-timeout".as_ref(),
        "1".as_ref(),
        "--tls".as_ref(),
        "on".as_ref(),
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
    ]);

    // Negotiated (plain), then idle for twice the timeout: still served.
    let mut negotiated = server.connect();
    common::negotiate_export_name(&mut negotiated, "");
    // STARTTLS acknowledged, then a third of a TLS record and nothing.
    let mut stalled = server.connect();
    read_greeting(&mut stalled);
    stalled.write_all(&flags()).expect("flags");
    stalled
        .write_all(&option_bytes(OPT_STARTTLS, 0, &[]))
        .expect("STARTTLS");
    let mut reply = [0u8; 20];
    stalled.read_exact(&mut reply).expect("STARTTLS reply");
    assert_eq!(
        u32::from_be_bytes(reply[12..16].try_into().expect("4 bytes")),
        1,
        "NBD_REP_ACK to STARTTLS"
    );
    let started = Instant::now();
    stalled
        .write_all(&[0x16, 0x03, 0x01])
        .expect("partial record");
    let (_, closed) = read_until_closed(&mut stalled, TIMEOUT * 5);
    let took = started.elapsed();
    println!("a client stalled in the TLS handshake was dropped after {took:?}");
    assert!(
        closed,
        "a client stalled in the TLS handshake is still connected"
    );
    assert!(took >= TIMEOUT / 2, "dropped too early ({took:?})");

    thread::sleep(TIMEOUT);
    negotiated
        .write_all(&request_bytes(common::CMD_READ, 7, 0, 512))
        .expect("read request");
    negotiated
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let (error, cookie) = common::read_simple_reply(&mut negotiated).expect("reply");
    assert_eq!(
        (error, cookie),
        (0, 7),
        "the idle negotiated client is served"
    );
}
