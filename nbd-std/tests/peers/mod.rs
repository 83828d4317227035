//! Other NBD servers for the client tests: `nbdkit`, `qemu-nbd` and
//! Debian's `nbd-server`, each on a free port of 127.0.0.1, stopped and
//! reaped on drop. Use after `common::have_tools`.

// Each test file uses a different part.
#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{self, STOP_TIMEOUT, free_port, send_signal, stop_child, temp_dir, tool};

const START_TIMEOUT: Duration = Duration::from_secs(15);
const START_ATTEMPTS: usize = 5;

/// How the process is stopped.
#[derive(Debug)]
enum Process {
    /// A child in the foreground.
    Child(Child),
    /// A daemon known by PID (nbd-server forks away).
    Daemon(u32),
}

/// A running server; killed on drop.
#[derive(Debug)]
pub struct Peer {
    pub name: &'static str,
    pub port: u16,
    /// The export the tests use.
    pub export: String,
    process: Option<Process>,
    /// Images and logs.
    pub dir: TempDir,
}

impl Peer {
    /// NBD URI of the test export.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.export)
    }

    /// NBD URI of another export name.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// `nbdkit memory SIZE` with extra arguments before the plugin (filters).
    pub fn nbdkit(size: &str, filters: &[&str], params: &[&str]) -> Peer {
        Self::start_foreground("nbdkit", String::new(), |port, _| {
            let mut command = tool("nbdkit");
            command
                .args(["-f", "-i", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(filters)
                .args(["memory", size])
                .args(params);
            command
        })
    }

    /// `qemu-nbd` serving a sparse raw file of `size` bytes, shared by up to
    /// 8 clients (so it advertises multi-conn), default export name "".
    pub fn qemu_nbd(size: u64) -> Peer {
        Self::start_foreground("qemu-nbd", String::new(), |port, dir| {
            let image = dir.join("disk.img");
            common::create_sparse_file(&image, size);
            let mut command = tool("qemu-nbd");
            command
                .args(["-f", "raw", "-b", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-t", "-e", "8", "-x", ""])
                .arg(image);
            command
        })
    }

    /// Debian's `nbd-server` serving a sparse file of `size` bytes as
    /// export `test` (listing allowed). It daemonizes: the PID comes from
    /// its PID file.
    pub fn nbd_server(size: u64) -> Peer {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = temp_dir();
            let port = free_port();
            let image = dir.path().join("disk.img");
            common::create_sparse_file(&image, size);
            let conf = dir.path().join("nbd-server.conf");
            let pidfile = dir.path().join("nbd-server.pid");
            std::fs::write(
                &conf,
                format!(
                    "[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nallowlist = true\n\
                     [test]\nexportname = {}\n",
                    image.display()
                ),
            )
            .expect("write nbd-server config");
            let log = File::create(dir.path().join("log")).expect("create log");
            let status = tool("nbd-server")
                .arg("-C")
                .arg(&conf)
                .arg("-p")
                .arg(&pidfile)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log)
                .status()
                .expect("run nbd-server");
            let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            if !status.success() {
                last = format!("nbd-server exited {status}: {}", log());
                continue;
            }
            let pid = wait_for_pid(&pidfile, &conf);
            let Some(pid) = pid else {
                panic!("nbd-server wrote no PID file: {}", log());
            };
            let peer = Peer {
                name: "nbd-server",
                port,
                export: "test".to_owned(),
                process: Some(Process::Daemon(pid)),
                dir,
            };
            if wait_listening(port, || process_alive(pid)) {
                return peer;
            }
            last = format!("nbd-server not listening: {}", peer.log());
        }
        panic!("nbd-server did not start: {last}");
    }

    fn start_foreground(
        name: &'static str,
        export: String,
        command: impl Fn(u16, &Path) -> Command,
    ) -> Peer {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = temp_dir();
            let port = free_port();
            let log = File::create(dir.path().join("log")).expect("create log");
            let mut command = command(port, dir.path());
            command
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log);
            let child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            let mut peer = Peer {
                name,
                port,
                export: export.clone(),
                process: Some(Process::Child(child)),
                dir,
            };
            let started = {
                let alive = || match peer.process.as_mut() {
                    Some(Process::Child(child)) => matches!(child.try_wait(), Ok(None)),
                    _ => false,
                };
                let mut alive = alive;
                wait_listening(port, &mut alive)
            };
            if started {
                return peer;
            }
            last = peer.log();
            drop(peer);
        }
        panic!("{name} did not start: {last}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        match self.process.take() {
            Some(Process::Child(mut child)) => stop_child(&mut child, "TERM", STOP_TIMEOUT),
            Some(Process::Daemon(pid)) => {
                // nbd-server forks one child per connection: those end
                // when their clients leave; the parent is ours to stop.
                send_signal(pid, "TERM");
                let deadline = Instant::now() + STOP_TIMEOUT;
                while process_alive(pid) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
                if process_alive(pid) {
                    send_signal(pid, "KILL");
                }
            }
            None => {}
        }
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}

/// Polls until 127.0.0.1:`port` accepts connections while `alive` holds.
fn wait_listening(port: u16, mut alive: impl FnMut() -> bool) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if !alive() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return alive();
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The PID `nbd-server` wrote, once the file exists and the process's
/// command line names our config (so a stale PID is never signalled).
fn wait_for_pid(pidfile: &Path, conf: &Path) -> Option<u32> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let conf = conf.as_os_str().as_encoded_bytes();
            if cmdline.windows(conf.len()).any(|w| w == conf) {
                return Some(pid);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn process_alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Arguments as `OsString`s.
pub fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Path of a file in a peer's directory.
pub fn in_dir(peer: &Peer, name: &str) -> PathBuf {
    peer.dir.path().join(name)
}
