//! QEMU's NBD client (`qemu-img`, `qemu-io`) against `nbd-std serve`, on a
//! file export and a memory export.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{
    Output, Random, Server, assert_same_content, create_sparse_file, have_tools, run, run_ok,
    temp_dir, tool,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const TIMEOUT: Duration = Duration::from_secs(60);

/// A raw image with random data in every other MiB and holes between, so
/// that `qemu-img convert` sends both writes and zero requests.
fn make_source(path: &Path, seed: u64) {
    create_sparse_file(path, SIZE);
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open source image");
    let mut random = Random::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    for mib in (0..SIZE / MIB).step_by(2) {
        random.fill(&mut buf);
        file.write_all_at(&buf, mib * MIB)
            .expect("write source image");
    }
    // A small unaligned island inside a hole.
    file.write_all_at(b"island", 5 * MIB + 12345)
        .expect("write source image");
    file.sync_all().expect("sync source image");
}

fn qemu_img_compare(a: &str, b: &str) -> Output {
    run(
        tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]),
        TIMEOUT,
    )
}

/// Converts `source` into the export at `uri`, compares, converts it back
/// out and compares the files.
fn convert_in_and_out(uri: &str, source: &Path, out_path: &Path) {
    let source_str = source.to_str().expect("UTF-8 path");
    let info = run_ok(
        tool("qemu-img").args(["info", "--output=json", "-f", "raw", uri]),
        TIMEOUT,
    );
    assert!(
        info.stdout.contains(&format!("\"virtual-size\": {SIZE}")),
        "qemu-img info: virtual size\n{}",
        info.describe()
    );
    run_ok(
        tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", source_str, uri]),
        TIMEOUT,
    );
    let same = qemu_img_compare(source_str, uri);
    assert_eq!(same.code(), Some(0), "images differ\n{}", same.describe());

    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(out_path),
        TIMEOUT,
    );
    assert_same_content(source, out_path);

    // A change through NBD is seen by compare: reads are real.
    run_ok(
        tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 1M 4k", uri]),
        TIMEOUT,
    );
    let differ = qemu_img_compare(source_str, uri);
    assert_eq!(
        differ.code(),
        Some(1),
        "compare after a change\n{}",
        differ.describe()
    );
    // Put it back.
    run_ok(
        tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", source_str, uri]),
        TIMEOUT,
    );
    let same = qemu_img_compare(source_str, uri);
    assert_eq!(same.code(), Some(0), "images differ\n{}", same.describe());
}

#[test]
fn convert_and_compare_file_export() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    let backing = dir.path().join("backing.img");
    make_source(&source, 11);
    create_sparse_file(&backing, SIZE);
    let mut server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{},desc=qemu test", backing.display()),
    ]);
    convert_in_and_out(
        &server.uri_for("disk"),
        &source,
        &dir.path().join("out.img"),
    );
    server.stop();
    assert_same_content(&source, &backing);
}

#[test]
fn convert_and_compare_memory_export() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    make_source(&source, 12);
    let server = Server::start(["--size", "32M"]);
    convert_in_and_out(&server.uri(), &source, &dir.path().join("out.img"));
    // The named export is the same storage as the default one.
    let same = qemu_img_compare(source.to_str().expect("UTF-8"), &server.uri_for("memory"));
    assert_eq!(same.code(), Some(0), "{}", same.describe());
}

/// qemu-io commands, each checked; `-d unmap` lets discards through.
fn qemu_io(uri: &str, commands: &[&str]) {
    let mut command = tool("qemu-io");
    command.args(["-f", "raw", "-d", "unmap"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    let out = run_ok(&mut command, TIMEOUT);
    let lower = out.stdout.to_lowercase() + &out.stderr.to_lowercase();
    assert!(
        !lower.contains("failed") && !lower.contains("error"),
        "qemu-io reported a failure\n{}",
        out.describe()
    );
}

fn qemu_io_exercise(uri: &str) {
    qemu_io(
        uri,
        &[
            // Plain, FUA and asynchronous writes, each read back.
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0x11 1M 64k",
            "read -P 0x11 1M 64k",
            "aio_write -P 0x22 2M 256k",
            "aio_write -P 0x33 3M 256k",
            "aio_flush",
            "read -P 0x22 2M 256k",
            "read -P 0x33 3M 256k",
            "flush",
            // Unaligned and small.
            "write -P 0x44 4194305 1000",
            "read -P 0x44 4194305 1000",
            "read -P 0 4194304 1",
            "read -P 0 4195305 3095",
            // Write zeroes, with and without unmap, inside written data.
            "write -P 0x55 5M 1M",
            "write -z 5M 64k",
            "read -P 0 5M 64k",
            "read -P 0x55 5308416 983040",
            "write -z -u 6M 512k",
            "read -P 0 6M 512k",
            // Discard the middle of a written range: neighbours intact.
            "write -P 0x66 8M 2M",
            "discard 8704k 1M",
            "read -P 0x66 8M 512k",
            "read -P 0x66 9728k 512k",
            // Large and unaligned (a file export stores these payloads
            // as they come, a partial sector held until the rest comes).
            "write -P 0x77 10485861 200000",
            "read -P 0 10485760 101",
            "read -P 0x77 10485861 200000",
            "read -P 0 10685861 1000",
            "write -f -P 0x78 12582913 300000",
            "read -P 0x78 12582913 300000",
            "read -P 0 12582912 1",
            // Earlier data untouched.
            "read -P 0xab 0 1M",
            "read -P 0x11 1M 64k",
        ],
    );
    // A second connection sees the same data after the first closed.
    qemu_io(
        uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0x44 4194305 1000",
            "read -P 0 5M 64k",
        ],
    );
}

#[test]
fn qemu_io_memory_export() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let server = Server::start(["--size", "16M"]);
    qemu_io_exercise(&server.uri());
}

#[test]
fn qemu_io_file_export() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let backing = dir.path().join("backing.img");
    create_sparse_file(&backing, 16 * MIB);
    let mut server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{}", backing.display()),
    ]);
    qemu_io_exercise(&server.uri_for("disk"));
    server.stop();
    // The data reached the file.
    let file = std::fs::File::open(&backing).expect("open backing file");
    let mut buf = vec![0u8; 64 * 1024];
    file.read_exact_at(&mut buf, MIB)
        .expect("read backing file");
    assert!(buf.iter().all(|&b| b == 0x11), "FUA write in the file");
    let mut buf = vec![0u8; 1000];
    file.read_exact_at(&mut buf, 4 * MIB + 1)
        .expect("read backing file");
    assert!(
        buf.iter().all(|&b| b == 0x44),
        "unaligned write in the file"
    );
}
