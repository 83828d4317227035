//! fio's `nbd` engine (libnbd underneath, its own request pattern): writes
//! with up to 32 requests in flight, then reads everything back and
//! verifies.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Server, have_tools, run_ok, temp_dir, tool};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one verifying fio job in `dir` (fio leaves files in its working
/// directory) and checks its JSON report.
fn fio_verify(uri: &str, job: &[&str], dir: &Path, report_name: &str) {
    let report_path = dir.join(report_name);
    let out = run_ok(
        tool("fio")
            .current_dir(dir)
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={uri}"))
            .args(job)
            .arg("--output-format=json")
            .arg(format!("--output={}", report_path.display())),
        TIMEOUT,
    );
    let report = std::fs::read_to_string(&report_path).expect("read fio report");
    let json: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("fio report is not JSON ({e}): {report}\n{}", out.describe()));
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error\n{report}");
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0, "fio wrote nothing\n{report}");
    assert!(
        read >= written,
        "fio verified {read} of {written} bytes\n{report}"
    );
}

#[test]
fn random_writes_verified() {
    if !have_tools(&["fio"]) {
        return;
    }
    let dir = temp_dir();
    let server = Server::start(["--size", "64M"]);
    fio_verify(
        &server.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=32",
            "--verify=crc32c",
        ],
        dir.path(),
        "random.json",
    );
    fio_verify(
        &server.uri(),
        &[
            "--rw=write",
            "--bsrange=512-256k",
            "--offset=32m",
            "--size=16m",
            "--iodepth=8",
            "--verify=md5",
        ],
        dir.path(),
        "sequential.json",
    );
}

/// A file export with requests pipelined both ways: writes and reads
/// mixed at queue depth 32, then everything read back at that depth
/// (only reads: the replies to those are held while more requests come).
#[test]
fn file_export_pipelined_reads_and_writes_verified() {
    fio_verify_file_export(
        32 << 20,
        &[
            "--rw=randrw",
            "--bsrange=512-64k",
            "--size=16m",
            "--iodepth=32",
            "--verify=crc32c",
        ],
    );
}

/// Reads of 64 KiB and more at a queue depth above one are sent from a
/// mapping of the file (the page cache holds what fio just wrote): the
/// data read back must be what was written.
#[test]
fn file_export_large_reads_sent_from_the_mapping_verified() {
    fio_verify_file_export(
        64 << 20,
        &[
            "--rw=randrw",
            "--bsrange=64k-1m",
            "--size=48m",
            "--iodepth=8",
            "--verify=crc32c",
        ],
    );
}

/// Runs the fio `job` with verification against a file export over a
/// fresh sparse image of `image_bytes` (skipped without fio).
fn fio_verify_file_export(image_bytes: u64, job: &[&str]) {
    if !have_tools(&["fio"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, image_bytes);
    let server = Server::start(["--export", &format!("disk=file:{}", image.display())]);
    fio_verify(&server.uri_for("disk"), job, dir.path(), "file.json");
}
