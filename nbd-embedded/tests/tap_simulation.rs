//! The host simulation (`examples/tap_sim.rs`: `net::TcpServer` on a TAP
//! device, a file as the SD card), and the same checks against the Embassy
//! example (`examples/embassy_tap.rs`: `io_async::serve` on `embassy-net`
//! sockets over embassy-net's TAP driver, two server tasks), with real
//! clients: `nbdinfo`,
//! `nbdcopy` (whole-card read, compared with the file) and `qemu-io`
//! (aligned and unaligned writes read back with pattern checks, FLUSH).
//! After the program is killed, the card file must hold every write.
//! The simulation runs with `--clients 2`: a whole-card `nbdcopy` is served
//! while a `qemu-io` holds a second connection open (reading, sleeping,
//! reading again), both on port 10809.
//!
//! Everything runs in a network namespace the test creates (so the
//! addresses cannot clash with the host's): the TAP device lives there
//! with the host-side address 192.168.69.1/24, the simulation answers as
//! 192.168.69.2. Needs root, `/dev/net/tun`, `ip`, `nbdinfo`, `nbdcopy`
//! and `qemu-io`; without them the test is skipped with a message, unless
//! `NBD_REQUIRE_TOOLS=1`. Run with `--nocapture` to see the read
//! throughput through the TAP device.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::tools::{assert_same_bytes, available, checksum, run_ok, run_within, tool};

const HOST_ADDR: &str = "192.168.69.1/24";
const SIM_ADDR: &str = "192.168.69.2";
const PREFIX: &str = "/24";
const CARD_SIZE: usize = 16 << 20;
/// Whole-card reads, each on a new connection.
const READ_ROUNDS: usize = 3;
/// How long the program may take to build (a nested cargo may wait for
/// the shared target directory's lock).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the program may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for one client command (the whole-card read included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the `qemu-io` of the two-client phase holds its connection
/// while `nbdcopy` reads the card.
const HOLD_MS: u32 = 5000;

/// A program under test: an example of this crate, the cargo features it
/// needs, and its arguments besides the TAP device, address and card.
struct Program {
    example: &'static str,
    features: &'static str,
    args: &'static [&'static str],
    /// Short, for interface names (at most 15 bytes with the PID).
    tag: &'static str,
}

const TAP_SIM: Program = Program {
    example: "tap_sim",
    features: "",
    args: &["--port", "10809", "--clients", "2"],
    tag: "s",
};

const EMBASSY_TAP: Program = Program {
    example: "embassy_tap",
    features: "async",
    args: &["--port", "10809"],
    tag: "e",
};

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(program: &Program) -> Self {
        let path = std::env::temp_dir().join(format!(
            "nbd-tap-{}-{}",
            program.example,
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace holding the TAP device; deleting the namespace
/// deletes the device with it.
struct Netns {
    name: String,
    tap: String,
}

impl Netns {
    /// Creates the namespace, or returns why it could not (no privilege).
    fn create(program: &Program) -> Result<Self, String> {
        let pid = std::process::id();
        let name = format!("nbd-tap-{}-{pid}", program.example);
        let created = run_within(
            Command::new("ip").args(["netns", "add", &name]),
            COMMAND_TIMEOUT,
        );
        if !created.success() {
            return Err(format!("ip netns add failed: {}", created.stderr.trim()));
        }
        Ok(Self {
            name,
            // Interface names are at most 15 bytes.
            tap: format!("nbd{}{}", program.tag, pid % 1_000_000_000),
        })
    }

    fn ip(&self, args: &[&str]) {
        run_ok(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            COMMAND_TIMEOUT,
        );
    }

    /// A command that runs inside the namespace.
    fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for args in [
            vec!["-n", &self.name, "link", "del", &self.tap],
            vec!["netns", "del", &self.name],
        ] {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The running simulation, killed (by PID) and reaped on drop.
struct Sim {
    name: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Sim {
    fn logs(&self) -> String {
        format!(
            "{0} stdout:\n{1}\n{0} stderr:\n{2}",
            self.name,
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Kills the program the hard way (like pulling the power) and waits.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The example binary next to this test's executable
/// (`target/PROFILE/examples/NAME`), rebuilt by a nested cargo when
/// cargo runs the test (a bare `--test` selection does not build examples).
fn simulation_binary(program: &Program) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent()?.parent()?;
    let binary = profile_dir.join("examples").join(program.example);
    if let (Ok(cargo), Some(target_dir), Some(profile)) = (
        std::env::var("CARGO"),
        profile_dir.parent(),
        profile_dir.file_name().and_then(|n| n.to_str()),
    ) {
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "nbd-embedded", "--example"])
            .arg(program.example)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !program.features.is_empty() {
            build.args(["--features", program.features]);
        }
        match profile {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        run_ok(&mut build, BUILD_TIMEOUT);
    }
    binary.exists().then_some(binary)
}

/// Deterministic card contents that differ from block to block.
fn card_contents() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = Vec::with_capacity(CARD_SIZE);
    while bytes.len() < CARD_SIZE {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes
}

fn mib_per_second(elapsed: Duration) -> f64 {
    (CARD_SIZE as f64 / f64::from(1 << 20)) / elapsed.as_secs_f64()
}

#[test]
fn real_clients_through_a_tap_device() {
    check_program(&TAP_SIM);
}

#[test]
fn real_clients_through_a_tap_device_on_embassy() {
    check_program(&EMBASSY_TAP);
}

fn check_program(program: &Program) {
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !available(root, "not running as root")
        || !available(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing",
        )
        || !["ip", "nbdinfo", "nbdcopy", "qemu-io"]
            .into_iter()
            .all(tool)
    {
        return;
    }
    let dir = TempDir::new(program);
    let Some(binary) = simulation_binary(program) else {
        available(
            false,
            &format!(
                "examples/{0} was not built (cargo build -p nbd-embedded --example {0})",
                program.example
            ),
        );
        return;
    };
    let netns = match Netns::create(program) {
        Ok(netns) => netns,
        Err(why) => {
            available(false, &why);
            return;
        }
    };
    netns.ip(&["tuntap", "add", "dev", &netns.tap, "mode", "tap"]);
    netns.ip(&["link", "set", &netns.tap, "up"]);
    netns.ip(&["addr", "add", HOST_ADDR, "dev", &netns.tap]);

    let original = card_contents();
    let card = dir.0.join("card.img");
    fs::write(&card, &original).unwrap();

    let stdout = dir.0.join("sim.out");
    let stderr = dir.0.join("sim.err");
    let child = netns
        .exec(&binary)
        .args(["--tap", &netns.tap, "--ip", &format!("{SIM_ADDR}{PREFIX}")])
        .arg("--file")
        .arg(&card)
        .args(program.args)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut sim = Sim {
        name: program.example,
        child,
        stdout,
        stderr,
    };
    let start = Instant::now();
    loop {
        if let Some(status) = sim.child.try_wait().unwrap() {
            panic!(
                "{} exited early ({status})\n{}",
                program.example,
                sim.logs()
            );
        }
        let ready = format!("{}: serving", program.example);
        if fs::read_to_string(&sim.stdout).is_ok_and(|s| s.contains(&ready)) {
            break;
        }
        assert!(
            start.elapsed() < START_TIMEOUT,
            "{} did not start within {START_TIMEOUT:?}\n{}",
            program.example,
            sim.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd://{SIM_ADDR}/");

    // nbdinfo: size and the card's block sizes.
    let info = run_ok(netns.exec("nbdinfo").arg(&uri), COMMAND_TIMEOUT);
    for expected in [
        format!("export-size: {CARD_SIZE}"),
        String::from("block_size_minimum: 1"),
        String::from("block_size_preferred: 512"),
        String::from("can_flush: true"),
    ] {
        assert!(info.stdout.contains(&expected), "{}", info.stdout);
    }

    // nbdcopy: the whole card, compared with the file. Several times:
    // each is a new connection on the re-listened socket, and the best
    // time is the figure least disturbed by other load on the machine.
    let copy = dir.0.join("copy.img");
    let mut best = Duration::MAX;
    for round in 1..=READ_ROUNDS {
        let read = run_ok(netns.exec("nbdcopy").arg(&uri).arg(&copy), COMMAND_TIMEOUT);
        let copied = fs::read(&copy).unwrap();
        assert_same_bytes(&copied, &original, &format!("nbdcopy read {round}"));
        println!(
            "{}: nbdcopy read {round}: {} MiB through the TAP device in {:.3} s, {:.1} MiB/s \
             (checksum {:016x} equals the card file's)",
            program.example,
            CARD_SIZE >> 20,
            read.elapsed.as_secs_f64(),
            mib_per_second(read.elapsed),
            checksum(&copied)
        );
        best = best.min(read.elapsed);
    }
    println!(
        "{}: nbdcopy whole-card read through the TAP device: best {:.1} MiB/s \
         (nbdcopy's start-up included)",
        program.example,
        mib_per_second(best)
    );

    // qemu-io: writes at aligned and unaligned offsets, read back with
    // pattern checks, then FLUSH. The ranges do not overlap, so each read
    // must see its own pattern.
    let last = CARD_SIZE - 100;
    let writes: [(u8, usize, usize); 6] = [
        (0x11, 0, 4096),                // aligned, first blocks
        (0x22, 1 << 20, 65536),         // aligned, 128 blocks in one request
        (0x33, 5000, 3000),             // unaligned both ends, across blocks
        (0x44, 12_345_679, 777),        // unaligned, inside two blocks
        (0x55, 20 * 512 + 511, 2),      // one byte on each side of a boundary
        (0x66, last, CARD_SIZE - last), // the card's last bytes
    ];
    let mut qemu_io = netns.exec("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for (pattern, offset, length) in writes {
        qemu_io
            .arg("-c")
            .arg(format!("write -P {pattern:#x} {offset} {length}"));
    }
    for (pattern, offset, length) in writes {
        qemu_io
            .arg("-c")
            .arg(format!("read -P {pattern:#x} {offset} {length}"));
    }
    qemu_io.args(["-c", "flush"]).arg(&uri);
    let io = run_ok(&mut qemu_io, COMMAND_TIMEOUT);
    let output = format!("{}{}", io.stdout, io.stderr);
    assert!(
        !output.contains("Pattern verification failed") && !output.contains("failed:"),
        "{output}"
    );
    assert_eq!(
        output.matches("wrote ").count(),
        writes.len(),
        "every write reported: {output}"
    );
    assert_eq!(
        output.matches("read ").count(),
        writes.len(),
        "every read reported: {output}"
    );

    let mut expected = original;
    for (pattern, offset, length) in writes {
        expected[offset..offset + length].fill(pattern);
    }

    // Two clients at once: qemu-io connects, reads, sleeps holding its
    // connection, reads again; meanwhile nbdcopy reads the whole card on
    // the second socket.
    let connections = |sim: &Sim| {
        fs::read_to_string(&sim.stderr)
            .unwrap_or_default()
            .matches("client connected")
            .count()
    };
    let before = connections(&sim);
    let (first, second) = (writes[0], writes[1]);
    let mut holder = netns.exec("qemu-io");
    holder
        .args(["-f", "raw", "-c"])
        .arg(format!("read -P {:#x} {} {}", first.0, first.1, first.2))
        .arg("-c")
        .arg(format!("sleep {HOLD_MS}"))
        .arg("-c")
        .arg(format!("read -P {:#x} {} {}", second.0, second.1, second.2))
        .arg(&uri);
    let holder = thread::spawn(move || run_within(&mut holder, COMMAND_TIMEOUT));
    let start = Instant::now();
    while connections(&sim) == before {
        assert!(
            start.elapsed() < START_TIMEOUT,
            "qemu-io did not connect within {START_TIMEOUT:?}\n{}",
            sim.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let read = run_ok(netns.exec("nbdcopy").arg(&uri).arg(&copy), COMMAND_TIMEOUT);
    let copied = fs::read(&copy).unwrap();
    assert_same_bytes(&copied, &expected, "nbdcopy beside qemu-io");
    let held = holder.join().unwrap();
    let output = format!("{}{}", held.stdout, held.stderr);
    assert!(
        held.success() && output.matches("read ").count() == 2,
        "qemu-io holding a connection: {:?}\n{output}",
        held.status
    );
    let log = fs::read_to_string(&sim.stderr).unwrap_or_default();
    assert!(
        log.contains("(2 connected)"),
        "nbdcopy was not served while qemu-io was connected:\n{log}"
    );
    println!(
        "{}: two clients at once: nbdcopy read {} MiB in {:.3} s while qemu-io held a \
         connection for {HOLD_MS} ms",
        program.example,
        CARD_SIZE >> 20,
        read.elapsed.as_secs_f64()
    );

    // Stop the program without warning: what was flushed must be on disk.
    if let Some(status) = sim.child.try_wait().unwrap() {
        panic!(
            "{} exited during the test ({status})\n{}",
            program.example,
            sim.logs()
        );
    }
    sim.kill();
    let log = fs::read_to_string(&sim.stderr).unwrap_or_default();
    assert!(
        !log.contains("Failed"),
        "a session failed on the server side:\n{log}"
    );
    let after = fs::read(&card).unwrap();
    assert_same_bytes(&after, &expected, "the card file after the writes");
    drop(sim);
    drop(netns);
}
