//! Linux guests for the kernel-client and VM-boot tests: Debian's kernel
//! and an initramfs built at test time by `tests/scripts/guest.sh` (cached
//! under `target/kernel-guest/`), booted in `qemu-system-x86_64` with TCG
//! (the host's `/dev/kvm` cannot run a stock kernel). The guest's serial
//! console is read line by line, so a test can act when the guest reaches a
//! step; every boot has a time limit and QEMU is killed by PID on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::{have_tools, run_ok, stop_child, tail};

/// Host tools the guest is built from, and the emulator.
pub const GUEST_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "busybox",
    "nbd-client",
    "mkfs.ext4",
    "dpkg-deb",
    "apt-get",
    "gzip",
];

/// Building the kernel and initramfs: the first run downloads the kernel
/// package (70 MB) and unpacks it.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// Kernel and initramfs, built once per test process.
static PREPARED: Mutex<Option<GuestKit>> = Mutex::new(None);

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("nbd-std sits in the repository")
        .to_owned()
}

fn guest_script() -> PathBuf {
    repository_root().join("nbd-std/tests/scripts/guest.sh")
}

/// The guest workflow scripts (`tests/scripts/guest/NAME`).
pub fn guest_file(name: &str) -> PathBuf {
    repository_root()
        .join("nbd-std/tests/scripts/guest")
        .join(name)
}

/// Debian's kernel and the test initramfs.
#[derive(Clone, Debug)]
pub struct GuestKit {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel release, such as `6.1.0-57-amd64`.
    pub version: String,
}

impl GuestKit {
    /// Builds (or reuses) the kernel and initramfs; `None` (test skipped,
    /// or failed under `NBD_REQUIRE_TOOLS=1`) when a tool is missing.
    pub fn prepare() -> Option<GuestKit> {
        if !have_tools(GUEST_TOOLS) {
            return None;
        }
        let mut prepared = PREPARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(kit) = prepared.as_ref() {
            return Some(kit.clone());
        }
        let dir = repository_root().join("target/kernel-guest");
        run_ok(
            Command::new("bash")
                .arg(guest_script())
                .arg("prepare")
                .arg(&dir),
            PREPARE_TIMEOUT,
        );
        let version = std::fs::read_to_string(dir.join("version"))
            .expect("guest.sh wrote the kernel version")
            .trim()
            .to_owned();
        let kit = GuestKit {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            version,
        };
        *prepared = Some(kit.clone());
        Some(kit)
    }

    /// The initramfs with `extra` (a directory whose `test/` holds what the
    /// guest's `/init` runs) appended, written to `out`.
    pub fn initramfs_with(&self, extra: &Path, out: &Path) -> PathBuf {
        let packed = out.with_extension("extra.cpio.gz");
        run_ok(
            Command::new("bash")
                .arg(guest_script())
                .arg("pack")
                .arg(extra)
                .arg(&packed),
            Duration::from_secs(60),
        );
        let mut combined = std::fs::read(&self.initramfs).expect("read the initramfs");
        combined.extend(std::fs::read(&packed).expect("read the appended archive"));
        std::fs::write(out, combined).expect("write the guest's initramfs");
        out.to_owned()
    }
}

/// An ext4 root filesystem image of `size` (`64M`) with busybox and the
/// VM-boot `/sbin/init` (`guest.sh rootfs`).
pub fn build_root_image(image: &Path, size: &str) {
    run_ok(
        Command::new("bash")
            .arg(guest_script())
            .arg("rootfs")
            .arg(image)
            .arg(size),
        Duration::from_secs(120),
    );
}

/// A running guest: QEMU with the serial console on its stdout.
pub struct Guest {
    child: Option<Child>,
    lines: Receiver<String>,
    console: Vec<String>,
    started: Instant,
    deadline: Instant,
}

impl Guest {
    /// Boots `kernel` with `initramfs` and QEMU arguments `devices` (a
    /// network card, drives); the guest must power off within `timeout`.
    pub fn boot(kit: &GuestKit, initramfs: &Path, devices: &[String], timeout: Duration) -> Guest {
        let mut command = Command::new(super::find_tool("qemu-system-x86_64").expect("qemu"));
        command
            .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(initramfs)
            .args(["-append", "console=ttyS0 loglevel=2 panic=-1"])
            .args(devices)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command_line = format!("{command:?}");
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        let (sender, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped stderr")),
        ] {
            let sender = sender.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    if sender.send(text).is_err() {
                        break;
                    }
                }
            });
        }
        eprintln!("booting: {command_line}");
        let started = Instant::now();
        Guest {
            child: Some(child),
            lines,
            console: Vec::new(),
            started,
            deadline: started + timeout,
        }
    }

    /// Seconds since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> String {
        self.console.join("\n")
    }

    /// Waits for a console line containing `needle` and returns it; panics
    /// (with the console) if QEMU exits or the boot's time runs out first.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.console.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "guest printed no {needle:?} within its time limit\n--- console ---\n{}",
                        tail(&self.console())
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "QEMU exited before the guest printed {needle:?}\n--- console ---\n{}",
                    tail(&self.console())
                ),
            }
        }
    }

    /// Waits for QEMU to exit (the guest powers off) and returns its status
    /// and the whole console; panics when the time limit passes.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let child = self.child.as_mut().expect("QEMU child");
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll QEMU") {
                break status;
            }
            if Instant::now() >= self.deadline {
                stop_child(child, "KILL", Duration::from_secs(5));
                self.child = None;
                self.drain(Duration::from_secs(2));
                panic!(
                    "guest still running at its time limit, killed\n--- console ---\n{}",
                    tail(&self.console())
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.child = None;
        self.drain(Duration::from_secs(5));
        (status, self.console())
    }

    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.console.push(line);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "KILL", Duration::from_secs(5));
            if thread::panicking() {
                self.drain(Duration::from_secs(1));
                eprintln!("--- guest console ---\n{}", tail(&self.console()));
            }
        }
    }
}

/// The QEMU arguments of the user-mode network the guest's `/init` sets up
/// (the host is 10.0.2.2; slirp connects to host servers from 127.0.0.1).
pub fn user_network() -> Vec<String> {
    [
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0,romfile=",
    ]
    .map(String::from)
    .to_vec()
}

/// Seconds with one decimal, for the figures the tests print.
pub fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}
