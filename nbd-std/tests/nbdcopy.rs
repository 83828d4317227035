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

/// A source with a hole larger than the maximum block size (32 MiB):
/// nbdcopy zeroes the hole with one `NBD_CMD_WRITE_ZEROES` of 62 MiB,
/// which the server must accept (spec: a command without payload may
/// exceed the maximum).
#[test]
fn a_hole_larger_than_the_maximum_request_is_zeroed_in_one_request() {
    if !have_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    const HOLED: u64 = 64 << 20;
    let dir = temp_dir();
    let source = dir.path().join("holed.bin");
    let data = dir.path().join("data.bin");
    let fill = dir.path().join("fill.bin");
    let copy = dir.path().join("copy.bin");
    write_urandom_file(&data, 1 << 20);
    let block = std::fs::read(&data).expect("read data");
    {
        use std::os::unix::fs::FileExt as _;
        let file = std::fs::File::create(&source).expect("create source");
        file.set_len(HOLED).expect("size source");
        file.write_all_at(&block, 0).expect("write head");
        file.write_all_at(&block, HOLED - (1 << 20))
            .expect("write tail");
    }
    // Filled first, so the hole must really be zeroed on the export.
    write_urandom_file(&fill, HOLED);
    let server = Server::start(["--size", "64M"]);
    run_ok(tool("nbdcopy").arg(&fill).arg(server.uri()), TIMEOUT);
    run_ok(tool("nbdcopy").arg(&source).arg(server.uri()), TIMEOUT);
    run_ok(tool("nbdcopy").arg(server.uri()).arg(&copy), TIMEOUT);
    let sums = sha256_all(&[&source, &copy]);
    assert_eq!(sums[0], sums[1], "copy differs from the holed source");
}
