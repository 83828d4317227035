//! An `s3://` export on a real distributed store that loses a node: a
//! one-machine Ceph cluster (three OSDs, pools of size 3 and min_size 2,
//! radosgw in front) built by the test. One OSD is SIGKILLed during an
//! `nbdcopy`; the copy must finish and read back equal after a restart of
//! the server (so what is read came from the store, not the cache).
//!
//! Skipped, with a SKIPPED line, when Ceph's Debian packages are missing
//! (`.ci/run` installs them and sets `NBD_REQUIRE_TOOLS=1`, so there it
//! runs or fails).

mod common;

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::ceph::{BUCKET, Ceph};
use common::{Server, have_tools, run_ok, sha256, temp_dir, tool, wait_until};

const MIB: u64 = 1 << 20;
/// Bound on each copy; Ceph on a loaded 2-core machine copies at tens of
/// MiB/s, and writes pause while the lost OSD is being marked down.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

fn serve(store: &Ceph, options: &str) -> Server {
    let spec = format!("vm1=s3://{BUCKET}/vm1{options}");
    let env = store.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with_env(&env, ["--export", spec.as_str()])
}

#[test]
fn osd_killed_during_nbdcopy_copy_finishes_and_reads_back_equal() {
    if !have_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let started = Instant::now();
    let Some(mut ceph) = Ceph::start() else {
        return;
    };
    let bootstrap = started.elapsed();
    let size = common::env_u64("NBD_CEPH_COPY_MIB", 256) * MIB;
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    let copy = dir.path().join("copy.img");
    common::write_urandom_file(&source, size);

    // A 15 s lease is renewed every 5 s: the copy renews it with radosgw's
    // If-Match, also while the OSD is lost. A renewal refused (412) would
    // stop the export's writes and fail the copy. (6 s was too short: a
    // renewal queued behind 32 uploads on the busy store took over 2 s,
    // and the lease ran out.)
    let server_started = Instant::now();
    let mut server = serve(&ceph, &format!(",size={size},lease=15"));
    let uri = server.uri_for("vm1");
    let copy_started = Instant::now();
    let mut nbdcopy = tool("nbdcopy")
        .args(["--flush", source.to_str().expect("path"), &uri])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbdcopy");
    // Let the copy get going: data in the cache and uploads in flight.
    thread::sleep(Duration::from_secs(1));
    assert!(
        nbdcopy.try_wait().expect("poll nbdcopy").is_none(),
        "nbdcopy finished before the OSD was killed: nothing was tested \
         (raise NBD_CEPH_COPY_MIB)"
    );
    let osd_pid = ceph.pid("osd.1");
    ceph.kill("osd.1");
    let killed_at = copy_started.elapsed();
    let mut status = None;
    wait_until(COPY_TIMEOUT, || {
        status = nbdcopy.try_wait().expect("poll nbdcopy");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = nbdcopy.kill();
        let _ = nbdcopy.wait();
        panic!(
            "nbdcopy did not finish within {COPY_TIMEOUT:?} after the OSD loss\n{}",
            ceph.logs()
        )
    };
    let copy_in = copy_started.elapsed();
    let mut stderr = String::new();
    if let Some(mut pipe) = nbdcopy.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "nbdcopy failed ({status}): {stderr}");
    let tree = ceph.ceph(&["osd", "tree"]);
    assert!(
        tree.lines()
            .any(|line| line.contains("osd.1") && line.contains("down")),
        "osd.1 is not down after SIGKILL:\n{tree}"
    );

    // Still one OSD short, past two lease renewals (5 s apart): the export
    // still takes writes; the same data again, so the check below holds.
    let since_start = server_started.elapsed();
    thread::sleep(Duration::from_secs(11).saturating_sub(since_start));
    run_ok(
        tool("nbdcopy").args(["--flush", source.to_str().expect("path"), &uri]),
        COPY_TIMEOUT,
    );

    // SIGKILL: only what FLUSH made durable may count. Read-only takes no
    // lease, so the dead server's unexpired one does not block the reopen.
    server.signal_and_wait("KILL", common::STOP_TIMEOUT);
    drop(server);
    let server = serve(&ceph, ",ro");
    let uri = server.uri_for("vm1");
    let read_started = Instant::now();
    run_ok(
        tool("nbdcopy").args([&uri, copy.to_str().expect("path")]),
        COPY_TIMEOUT,
    );
    let copy_out = read_started.elapsed();
    assert_eq!(
        sha256(&source),
        sha256(&copy),
        "data read back from Ceph differs"
    );
    let rate = |elapsed: Duration| size as f64 / MIB as f64 / elapsed.as_secs_f64();
    eprintln!(
        "Ceph (3 OSDs, size 3/min_size 2, osd.1 pid {osd_pid} SIGKILLed at {:.1} s): \
         bootstrap {:.1} s; nbdcopy --flush of {} MiB in {:.1} s ({:.1} MiB/s); \
         read back {:.1} MiB/s, SHA-256 equal",
        killed_at.as_secs_f64(),
        bootstrap.as_secs_f64(),
        size / MIB,
        copy_in.as_secs_f64(),
        rate(copy_in),
        rate(copy_out)
    );
}
