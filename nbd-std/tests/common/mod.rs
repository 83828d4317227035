//! Harness of the interoperability tests: starts the real `nbd-std serve`
//! binary on a free port, runs the Debian clients with timeouts, and skips
//! (or, with `NBD_REQUIRE_TOOLS=1`, fails) when a client is not installed.
//!
//! Every wait is bounded in count and in time; every child process is
//! killed and reaped, also when a test panics.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod ceph;
pub mod fuse;
pub mod guest;
pub mod pki;
pub mod seaweed;

/// How long a server may take to accept connections after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default limit for one client command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting a server when the chosen port was taken meanwhile.
const START_ATTEMPTS: usize = 5;
/// Most output shown per stream when a command fails.
const SHOWN_OUTPUT: usize = 16 * 1024;

/// The server binary under test.
pub fn server_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nbd-std"))
}

/// A fresh directory for one test's files, removed when dropped.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("nbd-std-test-")
        .tempdir()
        .expect("create a temporary directory")
}

/// A port that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Where a started server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running `nbd-std serve`, stopped (SIGTERM, then SIGKILL) and reaped on
/// drop. Its stdout and stderr go to files, printed when it is dropped
/// during a panic (so failure messages need not include them).
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    endpoint: Endpoint,
    command_line: String,
    logs: TempDir,
    status: Option<ExitStatus>,
}

/// How a start attempt ended.
enum Started {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

impl Server {
    /// Starts `nbd-std serve --port P ARGS...` on a free port of 127.0.0.1
    /// and waits until it accepts connections. Panics (with the server's
    /// output) if it does not come up.
    pub fn start<I, S>(args: I) -> Server
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Server::start_with_env(&[], args)
    }

    /// [`Server::start`] with extra environment variables (an object
    /// store's address and credentials).
    pub fn start_with_env<I, S>(env: &[(&str, &str)], args: I) -> Server
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let endpoint = Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            let mut full = vec![OsString::from("--port"), OsString::from(port.to_string())];
            full.extend(args.iter().cloned());
            let mut server = Server::spawn_with_env(&full, endpoint, env);
            match server.wait_ready() {
                Started::Ready => return server,
                Started::Exited(status) => {
                    let stderr = server.stderr();
                    if mentions_address_in_use(&stderr) {
                        last_error = format!("{status}: {stderr}");
                        continue;
                    }
                    panic!("server exited before accepting connections ({status})");
                }
                Started::TimedOut => {
                    panic!("server did not accept connections within {START_TIMEOUT:?}")
                }
            }
        }
        panic!("no free port after {START_ATTEMPTS} attempts; last failure: {last_error}");
    }

    /// Starts `nbd-std serve --port PORT ARGS...` on the given port (a
    /// restart where a stopped server listened) and waits until it accepts
    /// connections.
    pub fn start_at<I, S>(port: u16, args: I) -> Server
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let endpoint = Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let mut full = vec![OsString::from("--port"), OsString::from(port.to_string())];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        let mut server = Server::spawn(&full, endpoint);
        match server.wait_ready() {
            Started::Ready => server,
            Started::Exited(status) => {
                panic!("server exited before accepting connections on port {port} ({status})")
            }
            Started::TimedOut => {
                panic!("server did not accept connections within {START_TIMEOUT:?}")
            }
        }
    }

    /// Starts `nbd-std serve --port P` with default settings.
    pub fn start_default() -> Server {
        Server::start::<_, &str>([])
    }

    /// Starts `nbd-std serve --unix PATH ARGS...` and waits until the socket
    /// accepts connections.
    pub fn start_unix<I, S>(path: &Path, args: I) -> Server
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full = vec![OsString::from("--unix"), path.as_os_str().to_owned()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        let mut server = Server::spawn(&full, Endpoint::Unix(path.to_owned()));
        match server.wait_ready() {
            Started::Ready => server,
            Started::Exited(status) => {
                panic!("server exited before accepting connections ({status})")
            }
            Started::TimedOut => {
                panic!("server did not accept connections within {START_TIMEOUT:?}")
            }
        }
    }

    fn spawn(args: &[OsString], endpoint: Endpoint) -> Server {
        Server::spawn_with_env(args, endpoint, &[])
    }

    fn spawn_with_env(args: &[OsString], endpoint: Endpoint, env: &[(&str, &str)]) -> Server {
        let logs = temp_dir();
        let stdout = File::create(logs.path().join("stdout")).expect("create server stdout log");
        let stderr = File::create(logs.path().join("stderr")).expect("create server stderr log");
        let mut command = Command::new(server_binary());
        command.arg("serve").args(args);
        command.envs(env.iter().copied());
        command.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let command_line = format!("{command:?}");
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        Server {
            child: Some(child),
            endpoint,
            command_line,
            logs,
            status: None,
        }
    }

    /// Polls until the endpoint accepts a connection, the child exits, or
    /// `START_TIMEOUT` passes.
    fn wait_ready(&mut self) -> Started {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Started::Exited(status);
            }
            let connected = match &self.endpoint {
                Endpoint::Tcp(addr) => {
                    TcpStream::connect_timeout(addr, Duration::from_millis(500)).is_ok()
                }
                Endpoint::Unix(path) => UnixStream::connect(path).is_ok(),
            };
            // The port may have been taken by another process meanwhile:
            // only a live child counts as ready.
            if connected {
                thread::sleep(Duration::from_millis(20));
                return match self.try_wait() {
                    Some(status) => Started::Exited(status),
                    None => Started::Ready,
                };
            }
            thread::sleep(Duration::from_millis(20));
        }
        Started::TimedOut
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.status = child.try_wait().expect("poll the server process");
        }
        self.status
    }

    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The TCP address (panics for a unix-socket server).
    pub fn addr(&self) -> SocketAddr {
        match &self.endpoint {
            Endpoint::Tcp(addr) => *addr,
            Endpoint::Unix(path) => panic!("server listens on {}, not TCP", path.display()),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// NBD URI of the default export.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// NBD URI of the export `name` (a name without characters that need
    /// escaping).
    pub fn uri_for(&self, name: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{name}"),
            Endpoint::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
        }
    }

    /// A raw TCP connection to the server, with read and write timeouts.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(5))
            .expect("connect to the server");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("set write timeout");
        stream
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server child").id()
    }

    /// Whether the server process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_log(&self.logs.path().join("stderr"))
    }

    /// Everything the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_log(&self.logs.path().join("stdout"))
    }

    /// The command line and output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "server: {}\n--- server stdout ---\n{}\n--- server stderr ---\n{}",
            self.command_line,
            tail(&self.stdout()),
            tail(&self.stderr())
        )
    }

    /// Sends `signal` (a name such as `TERM` or `INT`) and waits up to
    /// `timeout` for the server to exit. Returns its status, or `None` if it
    /// was still running (it is left running; drop kills it).
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let child = self.child.as_mut().expect("server child");
            self.status = signal_child_and_wait(child, signal, timeout);
        }
        self.status
    }

    /// Stops the server with SIGTERM and asserts it exits 0 within
    /// `STOP_TIMEOUT`.
    pub fn stop(&mut self) {
        match self.signal_and_wait("TERM", STOP_TIMEOUT) {
            Some(status) if status.success() => {}
            Some(status) => panic!("server exited with {status} after SIGTERM"),
            None => panic!("server still running {STOP_TIMEOUT:?} after SIGTERM"),
        }
    }

    /// Panics unless the server is still running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("server exited unexpectedly ({status})");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.status.is_none() {
            stop_child(&mut child, "TERM", STOP_TIMEOUT);
        }
        if thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// Sends `signal` (a name such as `TERM`) to process `pid`, with the shell's
/// built-in `kill` (no unsafe code, no procps needed).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("/bin/sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(error) = status {
        eprintln!("cannot run kill -s {signal} {pid}: {error}");
    }
}

/// Sends `signal` to `child` unless it has exited, and waits up to
/// `timeout` for it to exit. Returns its status, or `None` if it is still
/// running.
pub fn signal_child_and_wait(
    child: &mut Child,
    signal: &str,
    timeout: Duration,
) -> Option<ExitStatus> {
    let exited = |child: &mut Child| child.try_wait().ok().flatten();
    // A reaped child's PID may belong to another process by now.
    if let Some(status) = exited(child) {
        return Some(status);
    }
    send_signal(child.id(), signal);
    let mut status = None;
    wait_until(timeout, || {
        status = exited(child);
        status.is_some()
    });
    status
}

/// Stops `child` for good: `signal` (`TERM`, say) and up to `timeout` to
/// exit, then SIGKILL; reaps it either way.
pub fn stop_child(child: &mut Child, signal: &str, timeout: Duration) {
    if signal_child_and_wait(child, signal, timeout).is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// A log file's text so far (empty if it does not exist yet).
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn mentions_address_in_use(stderr: &str) -> bool {
    let lower = stderr.to_lowercase();
    lower.contains("address already in use")
        || lower.contains("addrinuse")
        || lower.contains("in use")
}

/// The last `SHOWN_OUTPUT` bytes of `text`.
pub fn tail(text: &str) -> &str {
    if text.len() <= SHOWN_OUTPUT {
        return text;
    }
    let mut start = text.len() - SHOWN_OUTPUT;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

// ---------------------------------------------------------------------------
// Running client commands

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The command line, status and output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command_line,
            self.status,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }

    /// Panics with the command's output unless it exited 0.
    pub fn assert_success(self) -> Output {
        assert!(self.success(), "command failed\n{}", self.describe());
        self
    }
}

/// Runs `command` with stdin closed, capturing stdout and stderr; kills it
/// and panics if it runs longer than `timeout`.
pub fn run(command: &mut Command, timeout: Duration) -> Output {
    let command_line = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
    let stdout = collect(child.stdout.take().expect("piped stdout"));
    let stderr = collect(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot wait for {command_line}: {e}"),
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = finish(stdout, Duration::from_secs(2));
        let stderr = finish(stderr, Duration::from_secs(2));
        panic!(
            "command timed out after {timeout:?}: {command_line}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            tail(&stdout),
            tail(&stderr)
        );
    };
    // Pipes close when the command exits, unless it left a child holding
    // them: bound the wait either way.
    Output {
        command_line,
        status,
        stdout: finish(stdout, Duration::from_secs(10)),
        stderr: finish(stderr, Duration::from_secs(10)),
    }
}

/// Runs `command` (see [`run`]) and panics with its output unless it
/// exits 0.
pub fn run_ok(command: &mut Command, timeout: Duration) -> Output {
    run(command, timeout).assert_success()
}

fn collect(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = sender.send(bytes);
    });
    receiver
}

fn finish(receiver: mpsc::Receiver<Vec<u8>>, timeout: Duration) -> String {
    match receiver.recv_timeout(timeout) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::from("<output not closed: a child process still holds the pipe>"),
    }
}

// ---------------------------------------------------------------------------
// Tools

/// Directories searched for tools besides `PATH` (mkfs and e2fsck live in
/// sbin, which a non-root `PATH` may lack). nbd-std's build script looks in
/// the same places to warn about missing tools: keep the two in step.
const EXTRA_TOOL_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The interpreter python3-libnbd is installed for (not a pyenv one on `PATH`).
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Full path of `name`, if installed.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command running the installed tool `name` (panics if missing: check
/// with [`have_tools`] first).
pub fn tool(name: &str) -> Command {
    let path = find_tool(name).unwrap_or_else(|| panic!("{name} is not installed"));
    Command::new(path)
}

/// Whether tools must all be present (`NBD_REQUIRE_TOOLS=1`, set by CI).
pub fn tools_required() -> bool {
    std::env::var("NBD_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Reports a missing prerequisite: fails under `NBD_REQUIRE_TOOLS=1`,
/// otherwise prints why the test is skipped. Returns `false`.
pub fn missing(what: &str) -> bool {
    if tools_required() {
        panic!("{what} is missing and NBD_REQUIRE_TOOLS=1");
    }
    eprintln!("SKIPPED: {what} is missing (install it, see .ci/run)");
    false
}

/// Whether every tool is installed; see [`missing`] for what happens if not.
/// Use as `if !have_tools(&["nbdinfo"]) { return; }`.
pub fn have_tools(names: &[&str]) -> bool {
    let absent: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| find_tool(n).is_none())
        .collect();
    if absent.is_empty() {
        true
    } else {
        missing(&format!("tool {}", absent.join(", ")))
    }
}

/// `nbdinfo --json ARGS`, parsed; panics with the output unless it exits
/// 0 within `timeout` and prints JSON.
pub fn nbdinfo_json(args: &[&str], timeout: Duration) -> serde_json::Value {
    let out = run_ok(tool("nbdinfo").arg("--json").args(args), timeout);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e})\n{}", out.describe()))
}

/// Whether `/usr/bin/python3` can import libnbd's bindings (python3-libnbd).
pub fn have_python_libnbd() -> bool {
    if !Path::new(DEBIAN_PYTHON).exists() {
        return missing(DEBIAN_PYTHON);
    }
    let out = run(
        Command::new(DEBIAN_PYTHON).args(["-c", "import nbd"]),
        Duration::from_secs(30),
    );
    out.success()
        || missing(&format!(
            "python3-libnbd for {DEBIAN_PYTHON} ({})",
            out.stderr.trim()
        ))
}

/// A tokio runtime for tests that drive `nbd_std::client` (two workers:
/// the machines running CI have two cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start a tokio runtime")
}

/// The number in environment variable `name`, or `default` when unset;
/// panics on a value that is not a number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?}: expected a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------
// Data

/// Fast deterministic pseudo-random bytes (xorshift64*), distinct per seed.
#[derive(Debug)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` pseudo-random bytes (deterministic per seed).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    Random::new(seed).fill(&mut bytes);
    bytes
}

/// Writes `size` pseudo-random bytes to `path` (deterministic per seed).
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut random = Random::new(seed);
    let mut file = io::BufWriter::new(File::create(path).expect("create data file"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        random.fill(&mut buf[..n]);
        file.write_all(&buf[..n]).expect("write data file");
        left -= n as u64;
    }
    file.flush().expect("write data file");
}

/// Writes `size` bytes from `/dev/urandom` to `path` (faster than
/// [`write_random_file`] in unoptimised test builds).
pub fn write_urandom_file(path: &Path, size: u64) {
    let source = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut file = File::create(path).expect("create data file");
    let copied = io::copy(&mut source.take(size), &mut file).expect("copy from /dev/urandom");
    assert_eq!(copied, size, "short copy from /dev/urandom");
}

/// Creates a sparse file of `size` bytes.
pub fn create_sparse_file(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create sparse file");
}

/// SHA-256 of a file, by `sha256sum` (coreutils).
pub fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path), COMMAND_TIMEOUT);
    out.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

/// SHA-256 of several files at once (one `sha256sum` each, in parallel).
pub fn sha256_all(paths: &[&Path]) -> Vec<String> {
    thread::scope(|scope| {
        let workers: Vec<_> = paths
            .iter()
            .map(|path| scope.spawn(move || sha256(path)))
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("sha256 thread"))
            .collect()
    })
}

/// Asserts two files hold the same bytes (compared in 1 MiB pieces; names
/// the first differing offset).
pub fn assert_same_content(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (
        io::BufReader::new(File::open(a).expect("open first file")),
        io::BufReader::new(File::open(b).expect("open second file")),
    );
    let (la, lb) = (
        a.metadata().expect("stat").len(),
        b.metadata().expect("stat").len(),
    );
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    while offset < la {
        let n = (la - offset).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read first file");
        fb.read_exact(&mut bb[..n]).expect("read second file");
        if ba[..n] != bb[..n] {
            let at = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            panic!(
                "{} and {} differ at offset {}",
                a.display(),
                b.display(),
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

/// A field of `/proc/PID/status` in KiB (`VmHWM`, `VmRSS`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Raw protocol, for clients no tool plays

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_NO_ZEROES: u32 = 2;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;

/// Reads the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn read_greeting(stream: &mut impl Read) -> u16 {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("read the greeting");
    assert_eq!(
        u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes")),
        NBDMAGIC,
        "greeting magic"
    );
    assert_eq!(
        u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes")),
        IHAVEOPT,
        "newstyle magic"
    );
    u16::from_be_bytes([greeting[16], greeting[17]])
}

/// An option header followed by `data`.
pub fn option_bytes(code: u32, length: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + data.len());
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A 28-byte request header.
pub fn request_bytes(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut bytes = [0u8; 28];
    bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes[6..8].copy_from_slice(&command.to_be_bytes());
    bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
    bytes[16..24].copy_from_slice(&offset.to_be_bytes());
    bytes[24..28].copy_from_slice(&length.to_be_bytes());
    bytes
}

/// Negotiates with `NBD_OPT_EXPORT_NAME` (fixed newstyle, no zeroes, simple
/// replies) and returns the export size and transmission flags.
pub fn negotiate_export_name(stream: &mut (impl Read + Write), name: &str) -> (u64, u16) {
    let flags = read_greeting(stream);
    assert_ne!(flags & 1, 0, "server without FIXED_NEWSTYLE");
    let no_zeroes = flags & 2 != 0;
    let client_flags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
    stream
        .write_all(&client_flags.to_be_bytes())
        .expect("send client flags");
    let name_len = u32::try_from(name.len()).expect("short name");
    stream
        .write_all(&option_bytes(OPT_EXPORT_NAME, name_len, name.as_bytes()))
        .expect("send NBD_OPT_EXPORT_NAME");
    let mut reply = [0u8; 10];
    stream
        .read_exact(&mut reply)
        .expect("read export size and flags");
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        stream.read_exact(&mut zeroes).expect("read 124 zero bytes");
    }
    (
        u64::from_be_bytes(reply[0..8].try_into().expect("8 bytes")),
        u16::from_be_bytes([reply[8], reply[9]]),
    )
}

/// Reads a simple reply header; returns (error, cookie), or the I/O error
/// (the server closed the connection, say). Panics on a bad magic.
pub fn read_simple_reply(stream: &mut impl Read) -> io::Result<(u32, u64)> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header)?;
    assert_eq!(
        u32::from_be_bytes(header[0..4].try_into().expect("4 bytes")),
        SIMPLE_REPLY_MAGIC,
        "simple reply magic"
    );
    Ok((
        u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")),
        u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")),
    ))
}

/// Reads until the peer closes, for at most `timeout`. Returns the bytes
/// read and whether the connection ended (EOF or reset) in time.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, false);
        }
        stream
            .set_read_timeout(Some(left))
            .expect("set read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return (received, true),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (received, false);
            }
            // Reset or aborted: the server dropped the connection.
            Err(_) => return (received, true),
        }
    }
}
