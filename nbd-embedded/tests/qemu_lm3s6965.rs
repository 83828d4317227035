//! The LM3S6965 firmware (`examples/lm3s6965`) in `qemu-system-arm -M
//! lm3s6965evb`, serving a 4 MiB SD card image to real NBD clients through
//! QEMU's user networking:
//!
//! - `nbdinfo` sees the export and its size;
//! - `nbdcopy` reads the whole card, equal to the image;
//! - `qemu-io` writes at unaligned offsets, reads back with pattern checks,
//!   and flushes;
//! - after QEMU exits, the image on the host holds exactly those writes.
//!
//! A second test starts clients from the moment QEMU starts, as a host that
//! retries while the board powers up: bursts of connections that send
//! garbage and leave, `nbdinfo` every half second until it is served, then
//! clients back to back and two at once (no pause for the firmware to
//! listen again), a whole-card `nbdcopy` killed mid-read, and after all of
//! it a whole-card read equal to the image. The firmware once wedged for
//! good here: a connection that was established and closed by its client
//! between two polls stayed in CLOSE-WAIT, never served nor closed, and
//! the port refused every later client.
//!
//! The firmware is built here with a nested `cargo build --release` in its
//! own workspace and target directory. Skipped with a message when
//! `qemu-system-arm`, `defmt-print`, the `thumbv7m-none-eabi` target or an
//! NBD client is missing, unless `NBD_REQUIRE_TOOLS=1`. Every wait is
//! bounded; QEMU is stopped by PID (SIGTERM, then SIGKILL) also when the
//! test fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::Write;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::tools::{assert_same_bytes, available, installed, run_within, wait_or_kill};

/// Card size: a power of two (QEMU's SD model requires it), small because
/// SD over polled SSI is slow in emulation.
const CARD_SIZE: usize = 4 << 20;
const SECTOR: usize = 512;
/// First sector and length of the one partition in the card's MBR.
const PARTITION_START: u32 = 2048;
const PARTITION_SECTORS: u32 = (CARD_SIZE / SECTOR) as u32 - PARTITION_START;
/// The nested firmware build (a first build compiles smoltcp, defmt, …).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
/// From QEMU's start to the firmware listening (the card is probed first).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// One client command (a whole-card copy runs near 0.5 MiB/s).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at starting QEMU when the chosen port was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// One `nbdinfo` attempt while the board boots (through QEMU's user
/// networking, a connection to a board not yet listening hangs until the
/// board answers or refuses).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between `nbdinfo` attempts while the board boots.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Connections in each burst of garbage, and bursts after the board is up.
const BURST_CONNECTIONS: usize = 12;
const LATE_BURSTS: usize = 3;
/// Quiet after the late bursts before the clients that must be served:
/// longer than QEMU's pause between two offers of a refused connection.
const BURSTS_SETTLED: Duration = Duration::from_millis(2500);
/// `nbdinfo` runs back to back once the board serves.
const BACK_TO_BACK: usize = 8;
/// How long the whole-card `nbdcopy` runs before it is killed mid-read.
const COPY_BEFORE_KILL: Duration = Duration::from_millis(400);
/// The firmware's log line once its socket listens.
const READY: &str = "listening on port 10809";
/// Its line when both of its sockets (main and standby) listen.
const ALL_LISTENING: &str = "listening on port 10809 (2 of 2 sockets)";

/// Writes done through `qemu-io`: (offset, length, byte), none aligned to
/// the 512-byte blocks, the last ending at the end of the card.
const WRITES: [(usize, usize, u8); 3] = [
    (1000, 3000, 0xa5),
    (1_048_573, 70_001, 0x5a),
    (CARD_SIZE - 304, 304, 0x3c),
];

#[test]
fn firmware_serves_the_sd_card_in_qemu() {
    if !prerequisites() {
        return;
    }
    let work = WorkDir::new();
    let elf = build_firmware();
    let card = work.path.join("card.img");
    let original = card_image();
    std::fs::write(&card, &original).unwrap();

    let mut qemu = Qemu::start(&elf, &card, &work.path);
    let uri = format!("nbd://127.0.0.1:{}/", qemu.port);

    let info = run(Command::new("nbdinfo").arg(&uri), &qemu);
    assert!(
        info.contains(&format!("export-size: {CARD_SIZE}")),
        "nbdinfo does not show the card size:\n{info}"
    );
    assert!(info.contains("block_size_preferred: 512"), "{info}");
    // TRIM is offered exactly when the firmware found that the card erases
    // single blocks (QEMU 10.0's CSD does not read: not offered there).
    let trim_offered = !qemu.log().contains("TRIM not offered");
    assert!(
        info.contains(&format!("can_trim: {trim_offered}")),
        "{info}"
    );

    let copy = work.path.join("copy.img");
    let started = Instant::now();
    run(Command::new("nbdcopy").arg(&uri).arg(&copy), &qemu);
    let seconds = started.elapsed().as_secs_f64();
    let copied = std::fs::read(&copy).unwrap();
    assert_same_bytes(&copied, &original, "the card image read by nbdcopy");
    eprintln!(
        "nbdcopy read {} MiB through QEMU in {seconds:.2} s: {:.2} MiB/s",
        CARD_SIZE >> 20,
        CARD_SIZE as f64 / (1 << 20) as f64 / seconds
    );

    let mut qemu_io = Command::new("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for (offset, length, byte) in WRITES {
        qemu_io.args(["-c", &format!("write -P {byte:#x} {offset} {length}")]);
    }
    for (offset, length, byte) in WRITES {
        qemu_io.args(["-c", &format!("read -P {byte:#x} {offset} {length}")]);
    }
    // The bytes around the first write are the card's own.
    qemu_io.args(["-c", "read -v 996 8"]);
    qemu_io.args(["-c", "flush"]);
    qemu_io.arg(&uri);
    let out = run(&mut qemu_io, &qemu);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let neighbours = format!(
        "{:02x} {:02x} {:02x} {:02x} a5 a5 a5 a5",
        original[996], original[997], original[998], original[999]
    );
    assert!(
        out.contains(&neighbours),
        "expected {neighbours} in:\n{out}"
    );

    let log = qemu.stop();
    assert!(
        !log.contains(" ERROR ") && !log.contains("panic") && !log.contains("hard fault"),
        "the firmware logged an error:\n{log}"
    );
    for quirk in log.lines().filter(|l| l.contains("emulator quirk")) {
        eprintln!("firmware: {}", quirk.trim());
    }
    if let Some(ram) = log.lines().find(|l| l.contains("RAM: server")) {
        eprintln!("firmware: {}", ram.trim());
    }

    let mut expected = original;
    for (offset, length, byte) in WRITES {
        expected[offset..offset + length].fill(byte);
    }
    let after = std::fs::read(&card).unwrap();
    assert_eq!(after.len(), CARD_SIZE);
    assert_same_bytes(&after, &expected, "the card image after QEMU exited");
}

#[test]
fn firmware_serves_clients_that_poll_from_power_on() {
    if !prerequisites() {
        return;
    }
    let work = WorkDir::new();
    let elf = build_firmware();
    let card = work.path.join("card.img");
    let original = card_image();
    std::fs::write(&card, &original).unwrap();

    let port = free_port();
    let qemu = Qemu::spawn(&elf, &card, &work.path, port);
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let uri = format!("nbd://127.0.0.1:{port}/");
    let size = || {
        let mut nbdinfo = Command::new("nbdinfo");
        nbdinfo.arg("--size").arg(&uri);
        nbdinfo
    };

    // From power-on: garbage bursts and nbdinfo until it is served.
    let started = Instant::now();
    let mut attempts = 0;
    let mut early_attempts = 0;
    loop {
        let listening = qemu.log().contains(READY);
        garbage_burst(address);
        attempts += 1;
        if !listening {
            early_attempts += 1;
        }
        let output = run_within(&mut size(), ATTEMPT_TIMEOUT);
        if output.success() {
            assert_eq!(output.stdout.trim(), CARD_SIZE.to_string());
            break;
        }
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "no nbdinfo served within {BOOT_TIMEOUT:?} of power-on ({attempts} attempts); last:\n{}{}\n--- firmware log ---\n{}",
            output.stdout,
            output.stderr,
            qemu.log()
        );
        thread::sleep(RETRY_PAUSE);
    }
    eprintln!(
        "served {:.1} s after power-on, at attempt {attempts} ({early_attempts} before the firmware listened)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        early_attempts > 0,
        "every attempt came after the firmware listened: the test proved nothing"
    );

    // Bursts once the board is up, then clients without a pause for the
    // firmware to listen again, and two at once.
    for _ in 0..LATE_BURSTS {
        garbage_burst(address);
    }
    wait_for_bursts_served(&qemu);
    for _ in 0..BACK_TO_BACK {
        let out = run(&mut size(), &qemu);
        assert_eq!(out.trim(), CARD_SIZE.to_string());
    }
    // The last client's socket may still be closing (its FIN unacknowledged);
    // the pair needs both sockets listening, as it would on a quiet network.
    wait_for_all_sockets_listening(&qemu);
    let both: Vec<_> = (0..2)
        .map(|_| {
            size()
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in both {
        let status = wait_or_kill(&mut child, COMMAND_TIMEOUT);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert!(
            status.is_some_and(|s| s.success()) && out.trim() == CARD_SIZE.to_string(),
            "one of two nbdinfo at once failed ({status:?}): {out}\n--- firmware log ---\n{}",
            qemu.log()
        );
    }

    // A client leaving mid-request.
    let copy = work.path.join("copy.img");
    let mut nbdcopy = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(COPY_BEFORE_KILL);
    signal(nbdcopy.id(), "KILL");
    wait_or_kill(&mut nbdcopy, STOP_TIMEOUT);

    run(Command::new("nbdcopy").arg(&uri).arg(&copy), &qemu);
    let copied = std::fs::read(&copy).unwrap();
    assert_same_bytes(
        &copied,
        &original,
        "the card image read after the early clients",
    );
    let mut qemu = qemu;
    let log = qemu.stop();
    assert!(
        !log.contains("panic") && !log.contains("hard fault"),
        "the firmware failed:\n{log}"
    );
    let sessions = log.lines().filter(|l| l.contains("session ended")).count();
    eprintln!("firmware: {sessions} sessions ended");
}

/// Waits until no garbage connection has reached the firmware for
/// `BURSTS_SETTLED`. QEMU's user networking accepts every connection on
/// the host at once and keeps offering those the board refused (both of
/// its sockets busy) about once a second: such offers, arriving with a
/// client's, can take both sockets again and have the client refused
/// (seen once in 21 runs, `nbdinfo`: "server disconnected unexpectedly").
/// On a real network a refused connection ends at once.
fn wait_for_bursts_served(qemu: &Qemu) {
    let connected = || qemu.log().matches("client connected").count();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (mut seen, mut since) = (connected(), Instant::now());
    while since.elapsed() < BURSTS_SETTLED {
        assert!(
            Instant::now() < deadline,
            "garbage connections still reached the firmware {BOOT_TIMEOUT:?} after the bursts:\n{}",
            qemu.log()
        );
        thread::sleep(RETRY_PAUSE);
        let now = connected();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
}

/// Waits until the firmware's last "listening" line comes after its last
/// client and says every socket listens (a socket closing after a session
/// listens again once the client acknowledges its FIN, which through
/// QEMU's user networking on a loaded host took over 10 ms once).
fn wait_for_all_sockets_listening(qemu: &Qemu) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let log = qemu.log();
        let last_client = log.rfind("client connected").unwrap_or(0);
        let last_listening = log.rfind(READY).filter(|&at| at > last_client);
        if last_listening
            .is_some_and(|at| log[at..].lines().next().map(str::trim_end) == Some(ALL_LISTENING))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the firmware's sockets did not all listen again within {BOOT_TIMEOUT:?}:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `BURST_CONNECTIONS` connections at once, each sending bytes that
/// are no NBD option and leaving without waiting for an answer.
fn garbage_burst(address: SocketAddr) {
    let streams: Vec<TcpStream> = (0..BURST_CONNECTIONS)
        .filter_map(|_| TcpStream::connect_timeout(&address, STOP_TIMEOUT).ok())
        .collect();
    for mut stream in streams {
        let _ = stream.write_all(&[0x5a; 64]);
    }
}

/// Runs a client (right after the previous one: the firmware accepts the
/// next client while it closes the last); panics with its output and
/// the firmware's log unless it succeeds.
fn run(command: &mut Command, qemu: &Qemu) -> String {
    let line = format!("{command:?}");
    let output = run_within(command, COMMAND_TIMEOUT);
    assert!(
        output.success(),
        "{line} failed ({}):\n{}{}\n--- firmware log ---\n{}",
        output.status_text(),
        output.stdout,
        output.stderr,
        qemu.log()
    );
    output.stdout
}

// ---------------------------------------------------------------------------
// Prerequisites and the firmware

fn firmware_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lm3s6965")
}

/// Whether everything the test runs is installed; fails under
/// `NBD_REQUIRE_TOOLS=1` instead of skipping.
fn prerequisites() -> bool {
    let mut missing: Vec<String> = [
        "qemu-system-arm",
        "defmt-print",
        "nbdinfo",
        "nbdcopy",
        "qemu-io",
    ]
    .into_iter()
    .filter(|tool| !installed(tool))
    .map(String::from)
    .collect();
    if !thumbv7m_installed() {
        missing.push(
            "the thumbv7m-none-eabi Rust target (rustup target add thumbv7m-none-eabi)".into(),
        );
    }
    available(
        missing.is_empty(),
        &format!("{} missing (see .ci/run)", missing.join(", ")),
    )
}

fn thumbv7m_installed() -> bool {
    let Ok(out) = Command::new("rustc")
        .args(["--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&sysroot)
        .join("lib/rustlib/thumbv7m-none-eabi/lib")
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
}

/// Builds the firmware in its own workspace and target directory; returns
/// the ELF.
fn build_firmware() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lm3s6965-firmware");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--release", "--locked"])
        .current_dir(firmware_dir())
        .env("CARGO_TARGET_DIR", &target)
        // Flags meant for the host build must not reach the thumb build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    let started = Instant::now();
    let output = run_within(&mut build, BUILD_TIMEOUT);
    assert!(
        output.success(),
        "firmware build failed ({}):\n{}",
        output.status_text(),
        output.stderr
    );
    eprintln!("firmware built in {:.1} s", started.elapsed().as_secs_f64());
    target.join("thumbv7m-none-eabi/release/nbd-lm3s6965")
}

/// The card: a pattern that differs in every block, with an MBR holding
/// one Linux partition in sector 0.
fn card_image() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut image: Vec<u8> = (0..CARD_SIZE)
        .map(|_| {
            // xorshift64*: a cheap stream no block repeats.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect();
    let mbr = &mut image[..SECTOR];
    mbr[..446].fill(0);
    mbr[440..444].copy_from_slice(&0x6965_6965u32.to_le_bytes()); // disk signature
    let entry = &mut mbr[446..462];
    entry.fill(0);
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&PARTITION_START.to_le_bytes());
    entry[12..16].copy_from_slice(&PARTITION_SECTORS.to_le_bytes());
    mbr[462..510].fill(0);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    image
}

// ---------------------------------------------------------------------------
// QEMU

/// QEMU running the firmware, its semihosting output decoded by
/// `defmt-print` into `log`. Stopped by PID on drop.
struct Qemu {
    qemu: Child,
    decoder: Child,
    reader: Option<JoinHandle<()>>,
    log: Arc<Mutex<String>>,
    stderr: PathBuf,
    port: u16,
}

impl Qemu {
    /// Starts QEMU on a free port and waits for the firmware to listen.
    fn start(elf: &Path, card: &Path, dir: &Path) -> Self {
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let mut qemu = Self::spawn(elf, card, dir, port);
            match qemu.wait_ready() {
                Ok(()) => return qemu,
                Err(status) => {
                    let stderr = std::fs::read_to_string(&qemu.stderr).unwrap_or_default();
                    if attempt < START_ATTEMPTS && stderr.contains("host forwarding") {
                        eprintln!("port {port} taken meanwhile, trying another");
                        continue;
                    }
                    panic!(
                        "QEMU exited before the firmware listened ({status}):\n{stderr}\n--- firmware log ---\n{}",
                        qemu.log()
                    );
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(elf: &Path, card: &Path, dir: &Path, port: u16) -> Self {
        let stderr = dir.join(format!("qemu-{port}.stderr"));
        let mut qemu = Command::new("qemu-system-arm")
            .args(["-M", "lm3s6965evb", "-nographic"])
            .args(["-semihosting-config", "enable=on,target=native"])
            .arg("-drive")
            .arg(format!("if=sd,format=raw,file={}", card.display()))
            .arg("-nic")
            .arg(format!("user,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:10809"))
            .arg("-kernel")
            .arg(elf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start qemu-system-arm");
        let frames = qemu.stdout.take().expect("piped stdout");
        let mut decoder = Command::new("defmt-print")
            .arg("-e")
            .arg(elf)
            .stdin(Stdio::from(frames))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start defmt-print");
        let lines = decoder.stdout.take().expect("piped stdout");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let reader = thread::spawn(move || {
            for line in BufReader::new(lines).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            qemu,
            decoder,
            reader: Some(reader),
            log,
            stderr,
            port,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the firmware's "listening" line; `Err` if QEMU exits.
    fn wait_ready(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if self.log().contains(READY) {
                return Ok(());
            }
            if let Some(status) = self.qemu.try_wait().unwrap() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "the firmware did not listen within {BOOT_TIMEOUT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops QEMU (SIGTERM, then SIGKILL) and the decoder; returns the log.
    fn stop(&mut self) -> String {
        if self.qemu.try_wait().unwrap().is_none() {
            signal(self.qemu.id(), "TERM");
        }
        wait_or_kill(&mut self.qemu, STOP_TIMEOUT);
        // The decoder sees end of input once QEMU is gone.
        wait_or_kill(&mut self.decoder, STOP_TIMEOUT);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let log = self.stop();
        if thread::panicking() {
            eprintln!("--- firmware log ---\n{log}");
        }
    }
}

/// Sends `signal` (a name such as `TERM`) to process `pid` with the shell's
/// `kill` (no unsafe code).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("/bin/sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// Commands

// ---------------------------------------------------------------------------

/// A temporary directory removed on drop (kept when the test fails, for
/// the card image and QEMU's stderr).
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("qemu-lm3s6965-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
