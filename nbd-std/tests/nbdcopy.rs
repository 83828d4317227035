//! `nbdcopy` (libnbd) with its default settings (several connections,
//! many requests in flight) copies 256 MiB of random data in and out.

mod common;

use std::time::Duration;

use common::{Server, have_tools, run_ok, sha256_all, temp_dir, tool, write_urandom_file};

const SIZE: u64 = 256 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn random_data_through_a_memory_export() {
    if !have_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let dir = temp_dir();
    let source = dir.path().join("source.bin");
    let copy = dir.path().join("copy.bin");
    write_urandom_file(&source, SIZE);
    let server = Server::start(["--size", "256M"]);

    run_ok(tool("nbdcopy").arg(&source).arg(server.uri()), TIMEOUT);
    run_ok(tool("nbdcopy").arg(server.uri()).arg(&copy), TIMEOUT);

    assert_eq!(copy.metadata().expect("stat copy").len(), SIZE);
    let sums = sha256_all(&[&source, &copy]);
    assert_eq!(sums[0], sums[1], "copy differs from source");
}

#[test]
fn random_data_through_a_file_export() {
    if !have_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let dir = temp_dir();
    let source = dir.path().join("source.bin");
    let backing = dir.path().join("backing.img");
    let copy = dir.path().join("copy.bin");
    write_urandom_file(&source, SIZE);
    common::create_sparse_file(&backing, SIZE);
    let mut server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{}", backing.display()),
    ]);

    run_ok(
        tool("nbdcopy")
            .arg("--flush")
            .arg(&source)
            .arg(server.uri_for("disk")),
        TIMEOUT,
    );
    run_ok(
        tool("nbdcopy").arg(server.uri_for("disk")).arg(&copy),
        TIMEOUT,
    );
    // What reached the file is the data, once the server has stopped.
    server.stop();
    let sums = sha256_all(&[&source, &copy, &backing]);
    assert_eq!(sums[0], sums[1], "copy read back differs from source");
    assert_eq!(sums[0], sums[2], "backing file differs from source");
}
