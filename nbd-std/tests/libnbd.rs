//! libnbd's Python bindings (`python3-libnbd`, Debian's `/usr/bin/python3`)
//! drive `scripts/libnbd_checks.py` against `nbd-std serve`: structured
//! replies, `base:allocation`, unaligned and out-of-range requests, 64
//! requests in flight.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{DEBIAN_PYTHON, Server, create_sparse_file, have_python_libnbd, run, temp_dir};

const TIMEOUT: Duration = Duration::from_secs(120);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/libnbd_checks.py")
}

fn run_checks(uri: &str, extra: &[&str]) {
    let out = run(
        Command::new(DEBIAN_PYTHON)
            .arg(script())
            .arg(uri)
            .args(extra),
        TIMEOUT,
    );
    assert!(out.success(), "libnbd checks failed\n{}", out.describe());
    print!("{}", out.stdout);
}

#[test]
fn memory_export() {
    if !have_python_libnbd() {
        return;
    }
    let server = Server::start(["--size", "64M"]);
    run_checks(&server.uri(), &["--sparse"]);
}

#[test]
fn file_export() {
    if !have_python_libnbd() {
        return;
    }
    let dir = temp_dir();
    let backing = dir.path().join("backing.img");
    create_sparse_file(&backing, 64 << 20);
    let server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{}", backing.display()),
    ]);
    run_checks(&server.uri_for("disk"), &[]);
}

#[test]
fn read_only_exports() {
    if !have_python_libnbd() {
        return;
    }
    let dir = temp_dir();
    let backing = dir.path().join("backing.img");
    create_sparse_file(&backing, 4 << 20);
    let server = Server::start([
        "--export".to_owned(),
        "mem=memory:4M,ro".to_owned(),
        "--export".to_owned(),
        format!("disk=file:{},ro", backing.display()),
    ]);
    run_checks(&server.uri_for("mem"), &["--read-only"]);
    run_checks(&server.uri_for("disk"), &["--read-only"]);
    drop(server);

    let server = Server::start(["--read-only", "--size", "4M"]);
    run_checks(&server.uri(), &["--read-only"]);
}
