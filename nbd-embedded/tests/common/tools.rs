//! External programs in tests: whether they are installed (skip, or fail
//! under `NBD_REQUIRE_TOOLS=1`), and running them with a time limit.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Whether `NBD_REQUIRE_TOOLS=1`: a missing tool fails the test instead of
/// skipping it.
pub fn required() -> bool {
    std::env::var("NBD_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// Returns `ok`; when it is false, says why the test is skipped, or fails
/// under `NBD_REQUIRE_TOOLS=1`.
pub fn available(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(!required(), "{what} (required: NBD_REQUIRE_TOOLS=1)");
        let test = thread::current().name().unwrap_or("test").to_owned();
        eprintln!("skipping {test}: {what}");
    }
    ok
}

/// Whether `program` starts (`--version`, `-V` for `ip`).
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg(if program == "ip" { "-V" } else { "--version" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// [`installed`], through [`available`].
pub fn tool(program: &str) -> bool {
    available(installed(program), &format!("{program} is not installed"))
}

/// FNV-1a, 64 bits: enough to tell two images apart in a message.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Panics unless `actual == expected`, saying that `what` differs, with
/// both checksums and lengths and the first differing byte.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(x, y)| x != y)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what} differs: checksum {:016x} ({} bytes), expected {:016x} ({} bytes); \
         first difference at byte {at}: {:02x?}, expected {:02x?}",
        checksum(actual),
        actual.len(),
        checksum(expected),
        expected.len(),
        actual.get(at),
        expected.get(at)
    );
}

/// A child's exit, or that it was killed at its time limit.
#[derive(Debug)]
pub struct Finished {
    /// `None`: killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit status, or "timed out".
    pub fn status_text(&self) -> String {
        self.status
            .map_or_else(|| String::from("timed out"), |s| s.to_string())
    }
}

/// Runs `command` with stdin closed, killing it (by its PID, through
/// `Child::kill`) after `timeout`. Output goes to files, not pipes, so that
/// a grandchild still holding them cannot block the collection after a
/// kill.
pub fn run_within(command: &mut Command, timeout: Duration) -> Finished {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let run = RUNS.fetch_add(1, Ordering::SeqCst);
    let base = format!("nbd-embedded-run-{}-{run}", std::process::id());
    let out_path = std::env::temp_dir().join(format!("{base}.out"));
    let err_path = std::env::temp_dir().join(format!("{base}.err"));
    let _files = RemoveOnDrop([out_path.clone(), err_path.clone()]);
    command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let status = wait_or_kill(&mut child, timeout);
    let elapsed = start.elapsed();
    Finished {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed,
    }
}

/// Waits up to `timeout` for `child` to exit, else kills it (by its PID,
/// through `Child::kill`); reaps it either way. `None`: it was killed.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// [`run_within`], panicking with the output unless the command succeeds.
pub fn run_ok(command: &mut Command, timeout: Duration) -> Finished {
    let shown = format!("{command:?}");
    let finished = run_within(command, timeout);
    assert!(
        finished.success(),
        "{shown}: {} after {:?}\nstdout:\n{}\nstderr:\n{}",
        finished.status_text(),
        finished.elapsed,
        finished.stdout,
        finished.stderr
    );
    finished
}

struct RemoveOnDrop([PathBuf; 2]);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}
