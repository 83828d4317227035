//! Request payload held in the server stays within `--server-memory`
//! while clients keep large writes in flight, quickly and slowly, to file
//! and memory exports, and clients that never read their large reads'
//! replies pile up read data; a well-behaved client is served throughout.
//! Also: requests over the advertised 32 MiB maximum from clients that did
//! not ask for block sizes (libnbd, ~48 MiB), and reads past a file that
//! shrank get an error, never zeroes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    CMD_READ, CMD_WRITE, DEBIAN_PYTHON, Server, have_python_libnbd, negotiate_export_name,
    proc_status_kib, random_bytes, read_simple_reply, request_bytes, run, runtime, temp_dir,
};

const MIB: u64 = 1 << 20;
/// The budgets the server runs with: small, so the load exceeds them many
/// times over.
const SERVER_MEMORY_MIB: u64 = 64;
const CONNECTION_MEMORY_MIB: u64 = 8;
const WRITE_LENGTH: u32 = 32 << 20;
/// Writes each fast client keeps in flight.
const DEPTH: usize = 8;
/// Clients of each kind.
const CLIENTS: usize = 4;
/// How long the load runs.
const LOAD_TIME: Duration = Duration::from_secs(6);
/// Allowance on top of the budget and the idle RSS: thread stacks of the
/// blocking pool, allocator slack, socket buffers are not in RSS.
const SLACK_MIB: u64 = 48;

fn budget_args(export: &str) -> Vec<String> {
    [
        "--export",
        export,
        "--server-memory",
        &format!("{SERVER_MEMORY_MIB}M"),
        "--connection-memory",
        &format!("{CONNECTION_MEMORY_MIB}M"),
        "--max-request",
        "32M",
        "--log-level",
        "warn",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

fn connect(server: &Server, name: &str) -> TcpStream {
    let mut stream = server.connect();
    // Back-pressure may hold a client for a while: bounded, not short.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    negotiate_export_name(&mut stream, name);
    stream
}

/// Keeps `DEPTH` 32 MiB writes in flight until `stop`, sending the
/// payload in `step`-byte pieces `pause` apart; returns the writes
/// answered (all must succeed).
fn writer(
    server: &Server,
    name: &str,
    base: u64,
    regions: u64,
    step: usize,
    pause: Duration,
    stop: &AtomicBool,
) -> u64 {
    let mut stream = connect(server, name);
    let payload = vec![0x5a; WRITE_LENGTH as usize];
    let mut reader = stream.try_clone().expect("clone");
    let answers = thread::spawn(move || {
        let mut answered = 0u64;
        while let Ok((error, cookie)) = read_simple_reply(&mut reader) {
            assert_eq!(error, 0, "write {cookie} failed");
            answered += 1;
        }
        answered
    });
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let offset = base + (sent % regions) * u64::from(WRITE_LENGTH);
        stream
            .write_all(&request_bytes(CMD_WRITE, sent, offset, WRITE_LENGTH))
            .expect("send a write");
        for piece in payload.chunks(step) {
            stream.write_all(piece).expect("send write payload");
            if !pause.is_zero() {
                thread::sleep(pause);
                if stop.load(Ordering::Relaxed) {
                    // Finish this write's payload quickly.
                    continue;
                }
            }
        }
        sent += 1;
    }
    stream
        .write_all(&request_bytes(2, 0, 0, 0))
        .expect("send NBD_CMD_DISC");
    let answered = answers.join().expect("reply reader");
    assert_eq!(answered, sent, "every write answered");
    answered
}

/// Reads each stalled client sends, and their length: more than its
/// per-connection budget and the socket buffers hold.
const STALLED_READS: u64 = 32;
const STALLED_READ_LENGTH: u32 = 1 << 20;

/// Sends reads and does not read the replies until `stop`: its read data
/// waits in the server, within its per-connection budget.
fn stalled_reader(server: &Server, name: &str, stop: &AtomicBool) {
    let mut stream = connect(server, name);
    for cookie in 0..STALLED_READS {
        stream
            .write_all(&request_bytes(CMD_READ, cookie, 0, STALLED_READ_LENGTH))
            .expect("send a read");
    }
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
    // Drain and leave; the replies must all be there.
    for _ in 0..STALLED_READS {
        let (error, _) = read_simple_reply(&mut stream).expect("read reply");
        assert_eq!(error, 0);
        let mut data = vec![0u8; STALLED_READ_LENGTH as usize];
        stream.read_exact(&mut data).expect("read data");
    }
}

/// Drives the load against export `name` and checks the server's peak
/// RSS against the budget while a well-behaved client writes and reads.
/// Each writer cycles over `DEPTH` 32 MiB regions of its own; with
/// `shared_region` they all write the first one (a RAM disk keeps what is
/// written: its data is not request payload).
fn load(server: &Server, name: &str, what: &str, shared_region: bool) {
    let regions = if shared_region { 1 } else { DEPTH as u64 };
    let region_of = |client: usize| {
        if shared_region {
            0
        } else {
            client as u64 * DEPTH as u64 * u64::from(WRITE_LENGTH)
        }
    };
    // What the export itself keeps in memory: the region written, and the
    // well-behaved client's block.
    let stored_mib = if shared_region { 33 } else { 0 };
    let idle_kib = proc_status_kib(server.pid(), "VmRSS");
    let stop = AtomicBool::new(false);
    let served =
        thread::scope(|scope| {
            let mut writes = Vec::new();
            for i in 0..CLIENTS {
                let base = region_of(i);
                let stop = &stop;
                writes.push(scope.spawn(move || {
                    writer(server, name, base, regions, 1 << 20, Duration::ZERO, stop)
                }));
            }
            for i in 0..CLIENTS {
                let base = region_of(CLIENTS + i);
                let stop = &stop;
                let pause = Duration::from_millis(5);
                writes.push(
                    scope.spawn(move || writer(server, name, base, regions, 64 << 10, pause, stop)),
                );
            }
            let stalled: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    let stop = &stop;
                    scope.spawn(move || stalled_reader(server, name, stop))
                })
                .collect();
            // The well-behaved client: small writes and reads, each answered
            // within a bound while the others push.
            let uri = server.uri_for(name);
            let rt = runtime();
            let started = Instant::now();
            let (served, slowest) = rt.block_on(async {
                let client = nbd_std::client::Client::connect(&uri)
                    .await
                    .expect("well-behaved client connects");
                let mut served = 0u64;
                let mut slowest = Duration::ZERO;
                let data = random_bytes(7, 64 << 10);
                let offset = 2 * CLIENTS as u64 * DEPTH as u64 * u64::from(WRITE_LENGTH);
                while started.elapsed() < LOAD_TIME {
                    let began = Instant::now();
                    client.write_at(&data, offset).await.expect("write");
                    let mut back = vec![0u8; data.len()];
                    client.read_at(&mut back, offset).await.expect("read");
                    assert_eq!(back, data);
                    slowest = slowest.max(began.elapsed());
                    served += 1;
                }
                client.disconnect().await.expect("disconnect");
                (served, slowest)
            });
            stop.store(true, Ordering::Relaxed);
            let written: u64 = writes.into_iter().map(|w| w.join().expect("writer")).sum();
            for s in stalled {
                s.join().expect("stalled reader");
            }
            (served, slowest, written)
        });
    let (served, slowest, written) = served;
    let peak_kib = proc_status_kib(server.pid(), "VmHWM");
    let bound_kib = idle_kib + (stored_mib + SERVER_MEMORY_MIB + SLACK_MIB) * 1024;
    eprintln!(
        "{what}: {written} writes of 32 MiB by {} clients ({CLIENTS} fast, {CLIENTS} slow), \
         {CLIENTS} clients holding {STALLED_READS} reads of 1 MiB unread; well-behaved client: {served} \
         write+read pairs, slowest {slowest:?}; server RSS idle {} MiB, peak {} MiB \
         (budget {SERVER_MEMORY_MIB} MiB, export data {stored_mib} MiB, bound {} MiB)",
        2 * CLIENTS,
        idle_kib / 1024,
        peak_kib / 1024,
        bound_kib / 1024
    );
    assert!(served > 10, "the well-behaved client was starved: {served}");
    // 25 to 130 ms on this project's machines, with the other tests
    // running; a bulk client holding the I/O thread for its whole
    // cooperative budget made it a second here and 5 s in CI.
    assert!(
        slowest < Duration::from_secs(2),
        "a request of the well-behaved client took {slowest:?}"
    );
    assert!(written > 0, "no large write went through");
    assert!(
        peak_kib <= bound_kib,
        "peak RSS {peak_kib} KiB over the bound {bound_kib} KiB"
    );
}

#[test]
fn large_writes_to_a_file_export_stay_within_the_budget() {
    let dir = temp_dir();
    let path = dir.path().join("disk.img");
    // Room for every writer's region and the well-behaved client's.
    let size = (2 * CLIENTS as u64 * DEPTH as u64 + 1) * u64::from(WRITE_LENGTH);
    common::create_sparse_file(&path, size);
    let export = format!("disk=file:{}", path.display());
    let server = Server::start(budget_args(&export));
    load(&server, "disk", "file export", false);
}

#[test]
fn large_writes_to_a_memory_export_stay_within_the_budget() {
    let size = (2 * CLIENTS as u64 * DEPTH as u64 + 1) * u64::from(WRITE_LENGTH);
    let export = format!("ram=memory:{size}");
    let server = Server::start(budget_args(&export));
    load(&server, "ram", "memory export", true);
}

/// libnbd without NBD_INFO_BLOCK_SIZE: 48 MiB writes and reads, over
/// the advertised 32 MiB maximum and under --max-request (64 MiB).
const LIBNBD_LARGE: &str = r#"
import os, sys, nbd
h = nbd.NBD()
h.set_request_block_size(False)
h.connect_uri(sys.argv[1])
length = 48 * 1024 * 1024
data = os.urandom(length)
h.pwrite(data, 4096)
assert h.pread(length, 4096) == data, "48 MiB read differs"
try:
    h.pread(65 * 1024 * 1024, 0)
    raise SystemExit("65 MiB read accepted over --max-request")
except nbd.Error as e:
    print("65 MiB read refused:", e)
h.shutdown()
print("48 MiB write and read: ok")
"#;

#[test]
fn large_requests_from_libnbd_without_block_sizes() {
    if !have_python_libnbd() {
        return;
    }
    for kind in ["file", "memory"] {
        let dir = temp_dir();
        let path = dir.path().join("disk.img");
        common::create_sparse_file(&path, 128 * MIB);
        let export = match kind {
            "file" => format!("disk=file:{}", path.display()),
            _ => "disk=memory:128M".to_owned(),
        };
        let server = Server::start(["--export", export.as_str()]);
        let script = dir.path().join("large.py");
        std::fs::write(&script, LIBNBD_LARGE).expect("write script");
        let output = run(
            std::process::Command::new(DEBIAN_PYTHON)
                .arg(&script)
                .arg(server.uri_for("disk")),
            Duration::from_secs(120),
        );
        assert!(output.success(), "{kind}: {}", output.describe());
        assert!(
            output.stdout.contains("48 MiB write and read: ok"),
            "{kind}: {}",
            output.describe()
        );
        eprintln!("{kind} export: {}", output.stdout.trim());
    }
}

#[test]
fn reads_past_a_file_that_shrank_fail_instead_of_sending_zeroes() {
    let dir = temp_dir();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0xa5u8; (4 * MIB) as usize]).expect("write image");
    let export = format!("disk=file:{}", path.display());
    let server = Server::start(["--export", export.as_str()]);
    let mut stream = connect(&server, "disk");
    // Someone else shrinks the file under the server.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(MIB))
        .expect("shrink");
    stream
        .write_all(&request_bytes(CMD_READ, 1, 3 * MIB, 64 << 10))
        .expect("send read past the new end");
    let (error, cookie) = read_simple_reply(&mut stream).expect("reply");
    assert_eq!(cookie, 1);
    assert_ne!(error, 0, "a read past the end of the file succeeded");
    // A read straddling the new end: the part past it is missing too.
    stream
        .write_all(&request_bytes(CMD_READ, 2, MIB - 4096, 8192))
        .expect("send straddling read");
    let (error, _) = read_simple_reply(&mut stream).expect("reply");
    assert_ne!(error, 0, "a read straddling the end succeeded");
    // The data that is there still reads.
    stream
        .write_all(&request_bytes(CMD_READ, 3, 0, 4096))
        .expect("send read");
    let (error, _) = read_simple_reply(&mut stream).expect("reply");
    assert_eq!(error, 0);
    let mut data = vec![0u8; 4096];
    stream.read_exact(&mut data).expect("data");
    assert!(data.iter().all(|&b| b == 0xa5));
}

/// Read buffers the connection keeps for its next reads hold budget; when
/// eight of them hold all of `--connection-memory`, the next request must
/// still be read (it once waited for those spares forever). Reads copied
/// into buffers: the connection shares its I/O thread with another, so
/// no read is sent from the file's pages.
#[test]
fn kept_read_buffers_never_hold_back_the_next_request() {
    const READ: u32 = 256 << 10;
    const SPARES_FILLING_THE_BUDGET: u64 = 8;
    let dir = temp_dir();
    let path = dir.path().join("disk.img");
    let image = random_bytes(7, (4 * MIB) as usize);
    std::fs::write(&path, &image).expect("write image");
    let export = format!("disk=file:{}", path.display());
    let server = Server::start([
        "--export",
        export.as_str(),
        "--connection-memory",
        "2M",
        "--io-threads",
        "1",
        "--log-level",
        "warn",
    ]);
    let _sharing_the_thread = connect(&server, "disk");
    let mut stream = connect(&server, "disk");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut data = vec![0u8; READ as usize];
    for round in 0..4u64 {
        let mut burst = Vec::new();
        for i in 0..SPARES_FILLING_THE_BUDGET {
            burst.extend_from_slice(&request_bytes(CMD_READ, i, i * u64::from(READ), READ));
        }
        stream.write_all(&burst).expect("send reads");
        for _ in 0..SPARES_FILLING_THE_BUDGET {
            let (error, cookie) = read_simple_reply(&mut stream).expect("read reply");
            assert_eq!(error, 0);
            stream.read_exact(&mut data).expect("read data");
            let at = (cookie * u64::from(READ)) as usize;
            assert!(
                data == image[at..at + READ as usize],
                "read {cookie} returned other bytes"
            );
        }
        // At once: the connection is not idle long enough to drop its spares.
        let cookie = 100 + round;
        stream
            .write_all(&request_bytes(CMD_READ, cookie, 0, 4096))
            .expect("send the next read");
        let (error, answered) = read_simple_reply(&mut stream).unwrap_or_else(|e| {
            panic!("no reply to the read sent after the burst (round {round}): {e}")
        });
        assert_eq!((error, answered), (0, cookie));
        stream.read_exact(&mut data[..4096]).expect("read data");
        assert_eq!(data[..4096], image[..4096]);
    }
}
