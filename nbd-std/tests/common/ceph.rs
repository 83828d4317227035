//! A real replicated object store for the object-storage tests: a Ceph
//! cluster on this machine (Debian's `ceph-mon`, `ceph-mgr`, `ceph-osd`,
//! `radosgw`; `.ci/run` installs them) in a temporary directory: one
//! monitor, one manager, three bluestore OSDs on 2 GiB files, pools of
//! size 3 and min_size 2, radosgw on a loopback port with one user and one
//! bucket. Every daemon runs in the foreground as a child of the test and
//! is killed by PID on drop.

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{STOP_TIMEOUT, find_tool, missing, read_log, run, stop_child, temp_dir};

/// The bucket every test disk lives in.
pub const BUCKET: &str = "disks";

const ACCESS_KEY: &str = "nbd-test";
const SECRET_KEY: &str = "nbd-test-secret";

/// Every Ceph tool the cluster needs (and `curl`, which creates the bucket
/// with its own SigV4 signing).
const TOOLS: [&str; 9] = [
    "ceph-mon",
    "ceph-mgr",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "monmaptool",
    "ceph-authtool",
    "ceph",
    "curl",
];

/// Bound on one `ceph`/`radosgw-admin` command (they wait for the monitor).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the cluster reaching `active+clean` and radosgw answering.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// SHA-256 of an empty body, which radosgw wants in `x-amz-content-sha256`.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A running Ceph cluster, every daemon killed and reaped on drop.
#[derive(Debug)]
pub struct Ceph {
    dir: tempfile::TempDir,
    rgw_port: u16,
    /// `(name, process)` of every daemon: `mon.a`, `mgr.x`, `osd.N`, `rgw`.
    daemons: Vec<(String, Child)>,
    /// Where each of [`TOOLS`] is (`find_tool` also looks outside `PATH`).
    tools: HashMap<&'static str, PathBuf>,
}

/// Where every Ceph tool is; `None` when one is missing, after printing
/// SKIPPED (or failing under `NBD_REQUIRE_TOOLS=1`, as in CI where they
/// are installed).
fn find_tools() -> Option<HashMap<&'static str, PathBuf>> {
    let found: HashMap<&'static str, PathBuf> = TOOLS
        .iter()
        .filter_map(|&tool| find_tool(tool).map(|path| (tool, path)))
        .collect();
    if found.len() == TOOLS.len() {
        return Some(found);
    }
    let absent: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| !found.contains_key(tool))
        .collect();
    missing(&format!(
        "Ceph ({}; apt-get install radosgw ceph-mon ceph-osd ceph-mgr curl)",
        absent.join(", ")
    ));
    None
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("pick a free port")
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("read a random UUID")
        .trim()
        .to_owned()
}

impl Ceph {
    /// Builds and starts the cluster and waits until radosgw serves the
    /// bucket [`BUCKET`]; `None` (after a visible SKIPPED) when Ceph is not
    /// installed.
    pub fn start() -> Option<Ceph> {
        let tools = find_tools()?;
        let mut ceph = Ceph {
            dir: temp_dir(),
            rgw_port: free_port(),
            daemons: Vec::new(),
            tools,
        };
        ceph.bootstrap();
        Some(ceph)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conf(&self) -> PathBuf {
        self.path("ceph.conf")
    }

    /// The S3 endpoint URL (radosgw).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.rgw_port)
    }

    /// Environment for an `nbd-std serve` using this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
    }

    fn write_conf(&self, mon_port: u16, fsid: &str) {
        let dir = self.dir.path().display();
        // `auth none` keeps the cluster free of keyrings; radosgw then
        // needs crc mode towards the monitor. chooseleaf type 0 spreads
        // the three replicas over OSDs rather than hosts (there is one
        // host). Short heartbeat grace: a killed OSD is marked down in
        // seconds, as a lost node would be on a real cluster's settings.
        let conf = format!(
            "[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
run dir = {dir}/run
admin socket = {dir}/run/$name.asok
log file = {dir}/log/$name.log
pid file = {dir}/run/$name.pid
mon data = {dir}/$name
mgr data = {dir}/$name
osd data = {dir}/$name
keyring = {dir}/keyring
osd pool default size = 3
osd pool default min size = 2
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 2147483648
osd memory target = 536870912
bluestore cache autotune = false
bluestore cache size = 67108864
osd heartbeat interval = 1
osd heartbeat grace = 5
mon osd min down reporters = 1
mon warn on pool no redundancy = false
mgr initial modules =
rgw frontends = beast endpoint=127.0.0.1:{rgw}
",
            rgw = self.rgw_port
        );
        std::fs::write(self.conf(), conf).expect("write ceph.conf");
    }

    fn command(&self, tool: &str) -> Command {
        Command::new(
            self.tools
                .get(tool)
                .map_or(Path::new(tool), PathBuf::as_path),
        )
    }

    /// Runs a Ceph tool with this cluster's configuration; panics with its
    /// output if it fails.
    fn tool(&self, name: &str, args: &[&str]) -> String {
        let mut command = self.command(name);
        command.arg("-c").arg(self.conf()).args(args);
        let out = run(&mut command, COMMAND_TIMEOUT);
        assert!(
            out.success(),
            "{name} {args:?} failed\n{}\n{}",
            out.describe(),
            self.logs()
        );
        out.stdout
    }

    /// Starts a daemon in the foreground (`-f`), its output in `log/`.
    fn spawn(&mut self, name: &str, program: &str, args: &[&str]) {
        let log = std::fs::File::create(self.path("log").join(format!("{name}.out")))
            .expect("create a daemon log");
        let child = self
            .command(program)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.daemons.push((name.to_owned(), child));
    }

    fn bootstrap(&mut self) {
        for sub in ["run", "log"] {
            std::fs::create_dir_all(self.path(sub)).expect("create a Ceph directory");
        }
        let fsid = uuid();
        let mon_port = free_port();
        self.write_conf(mon_port, &fsid);
        let keyring = self.path("keyring");
        let monmap = self.path("monmap");
        let (keyring, monmap) = (path_str(&keyring), path_str(&monmap));
        // The monitor's store wants a keyring even with auth none.
        self.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &keyring,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        let mon_addr = format!("[v2:127.0.0.1:{mon_port}]");
        self.tool(
            "monmaptool",
            &[
                "--create", "--addv", "a", &mon_addr, "--fsid", &fsid, &monmap,
            ],
        );
        self.tool("ceph-mon", &["--mkfs", "-i", "a", "--monmap", &monmap]);
        self.spawn("mon.a", "ceph-mon", &["-i", "a"]);
        self.spawn("mgr.x", "ceph-mgr", &["-i", "x"]);
        for _ in 0..3 {
            let osd_uuid = uuid();
            let id = self.tool("ceph", &["osd", "new", &osd_uuid]);
            let id = id.trim().to_owned();
            std::fs::create_dir_all(self.path(&format!("osd.{id}"))).expect("create an OSD dir");
            self.tool("ceph-osd", &["-i", &id, "--mkfs", "--osd-uuid", &osd_uuid]);
            self.spawn(&format!("osd.{id}"), "ceph-osd", &["-i", &id]);
        }
        self.spawn("rgw", "radosgw", &["-n", "client.rgw"]);
        self.wait_ready();
    }

    fn create_user(&self) {
        self.tool(
            "radosgw-admin",
            &[
                "user",
                "create",
                "--uid=nbd",
                "--display-name=nbd",
                &format!("--access-key={ACCESS_KEY}"),
                &format!("--secret={SECRET_KEY}"),
            ],
        );
    }

    /// Polls until every PG is `active+clean` and the bucket is created.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut clean = false;
        let mut user = false;
        while Instant::now() < deadline {
            self.assert_daemons_running();
            if !clean {
                let mut command = self.command("ceph");
                command.arg("-c").arg(self.conf()).args(["pg", "stat"]);
                let out = run(&mut command, COMMAND_TIMEOUT);
                // "33 pgs: 33 active+clean; ..." once every PG is clean.
                clean = out.success()
                    && out
                        .stdout
                        .split_once(" pgs: ")
                        .is_some_and(|(total, rest)| {
                            rest.starts_with(&format!("{} active+clean;", total.trim()))
                        });
            }
            if clean && !user {
                self.create_user();
                user = true;
            }
            if clean && self.s3_request("PUT", &format!("/{BUCKET}")) {
                return;
            }
            thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "the Ceph cluster was not ready within {READY_TIMEOUT:?}\n{}",
            self.logs()
        );
    }

    /// One signed S3 request with an empty body; whether it got a 2xx.
    fn s3_request(&self, method: &str, path: &str) -> bool {
        let mut command = self.command("curl");
        command
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["--max-time", "10", "--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            .args(["-H", &format!("x-amz-content-sha256: {EMPTY_SHA256}")])
            .arg(format!("{}{path}", self.endpoint()));
        let out = run(&mut command, COMMAND_TIMEOUT);
        out.success() && out.stdout.starts_with('2')
    }

    fn assert_daemons_running(&mut self) {
        for (name, child) in &mut self.daemons {
            if let Ok(Some(status)) = child.try_wait() {
                let name = name.clone();
                panic!("Ceph daemon {name} exited ({status})\n{}", self.logs());
            }
        }
    }

    /// PID of the daemon `name` (`osd.1`, ...).
    pub fn pid(&self, name: &str) -> u32 {
        self.daemons
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, child)| child.id())
            .unwrap_or_else(|| panic!("no Ceph daemon {name}"))
    }

    /// SIGKILLs the daemon `name` (a node lost without warning) and reaps it.
    pub fn kill(&mut self, name: &str) {
        let index = self
            .daemons
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no Ceph daemon {name}"));
        let (_, mut child) = self.daemons.remove(index);
        stop_child(&mut child, "KILL", STOP_TIMEOUT);
    }

    /// `ceph` CLI output (`osd tree`, `-s`, ...).
    pub fn ceph(&self, args: &[&str]) -> String {
        self.tool("ceph", args)
    }

    /// The tail of every daemon's output and the radosgw log.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.path("log")) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                let log = read_log(&path);
                let tail: String = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                text.push_str(&format!("--- {}\n{tail}\n", path.display()));
            }
        }
        text
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temporary path").to_owned()
}

impl Drop for Ceph {
    fn drop(&mut self) {
        // radosgw first, the monitor last: nothing waits on a missing peer.
        while let Some((_, mut child)) = self.daemons.pop() {
            stop_child(&mut child, "KILL", STOP_TIMEOUT);
        }
    }
}
