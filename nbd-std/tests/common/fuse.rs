//! FUSE mounts in tests: `nbd-std mount` and `fuse2fs` processes that are
//! detached and killed if a test fails, so nothing stays mounted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{server_binary, wait_until};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether `path` is a mount point now (`/proc/mounts`).
pub fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(wanted.as_str()))
}

/// A FUSE process serving `path`; on drop (a failed test) the mount is
/// detached and the process killed, so nothing stays mounted.
pub struct Mounted {
    path: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    pub fn start(mut command: Command, path: &Path, log: PathBuf) -> Mounted {
        let out = File::create(&log).expect("create log");
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out);
        let child = command.spawn().expect("start FUSE process");
        let mut mounted = Mounted {
            path: path.to_owned(),
            child: Some(child),
            log,
        };
        let up = wait_until(MOUNT_TIMEOUT, || {
            is_mounted(path) || mounted.try_exit().is_some()
        });
        assert!(
            up && is_mounted(path),
            "{} not mounted: {}",
            path.display(),
            mounted.log()
        );
        mounted
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for the process to exit (after an unmount or a signal).
    pub fn wait_exit(mut self) -> ExitStatus {
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("FUSE process still running: {}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.path)
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.path.display(), self.log());
        }
    }
}

pub fn mount_export(uri: &str, file: &Path, log: PathBuf) -> Mounted {
    let mut command = Command::new(server_binary());
    command.arg("mount").arg(uri).arg(file);
    Mounted::start(command, file, log)
}

pub fn can_use_fuse() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok();
    usable || super::missing("/dev/fuse (readable and writable by this user, e.g. root)")
}
