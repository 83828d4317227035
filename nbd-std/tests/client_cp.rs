//! `nbd-std cp`: a 256 MiB random file into an export and back with equal
//! checksums (also through standard input/output, and export to export
//! across servers); a sparse 1 GiB file copied without transferring its
//! holes; one-line errors.

mod common;
mod peers;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Output, Server, have_tools, run, server_binary, sha256_all, temp_dir};
use peers::Peer;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIMEOUT: Duration = Duration::from_secs(120);

fn nbd_std_cp(args: &[&str]) -> Output {
    run(Command::new(server_binary()).arg("cp").args(args), TIMEOUT)
}

/// Runs `nbd-std cp -v ARGS`, asserts success, and returns the bytes it
/// reports transferred and skipped.
fn cp_verbose(args: &[&str]) -> (u64, u64) {
    let mut full = vec!["-v"];
    full.extend_from_slice(args);
    let out = nbd_std_cp(&full).assert_success();
    let number_after = |prefix: &str| -> u64 {
        out.stderr
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", out.describe()))
    };
    (
        number_after("nbd-std cp: transferred "),
        number_after("nbd-std cp: skipped "),
    )
}

/// Runs `nbd-std cp` with a file as standard input or output.
fn cp_stdio(args: &[&str], stdin: Option<&Path>, stdout: Option<&Path>) {
    let mut command = Command::new(server_binary());
    command.arg("cp").args(args);
    command.stdin(match stdin {
        Some(path) => Stdio::from(std::fs::File::open(path).expect("open input")),
        None => Stdio::null(),
    });
    command.stdout(match stdout {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("create output")),
        None => Stdio::null(),
    });
    command.stderr(Stdio::piped());
    let child = command.spawn().expect("start nbd-std cp");
    let out = child.wait_with_output().expect("wait for nbd-std cp");
    assert!(
        out.status.success(),
        "nbd-std cp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn random_file_round_trip() {
    let dir = temp_dir();
    let source = dir.path().join("random.bin");
    common::write_urandom_file(&source, 256 * MIB);
    let server = Server::start(["--size", "256M"]);
    let uri = server.uri();
    let source_str = source.to_str().expect("UTF-8 path");

    let (transferred, _) = cp_verbose(&[source_str, &uri]);
    assert_eq!(transferred, 256 * MIB, "random data is all transferred");
    let back = dir.path().join("back.bin");
    cp_verbose(&[&uri, back.to_str().expect("UTF-8 path")]);
    let sums = sha256_all(&[&source, &back]);
    assert_eq!(sums[0], sums[1], "checksums differ after the round trip");

    // Through standard output and standard input (compared byte for byte,
    // which is quicker than hashing again).
    let piped = dir.path().join("piped.bin");
    cp_stdio(&[&uri, "-"], None, Some(&piped));
    common::assert_same_content(&source, &piped);
    let other = Server::start(["--size", "256M"]);
    cp_stdio(&["-", &other.uri()], Some(&piped), None);
    let again = dir.path().join("again.bin");
    cp_verbose(&[
        "--no-flush",
        &other.uri(),
        again.to_str().expect("UTF-8 path"),
    ]);
    common::assert_same_content(&source, &again);
}

#[test]
fn export_to_export_across_servers() {
    if !have_tools(&["nbdkit", "qemu-nbd"]) {
        return;
    }
    let dir = temp_dir();
    let source = dir.path().join("random.bin");
    common::write_urandom_file(&source, 64 * MIB);
    let source_str = source.to_str().expect("UTF-8 path");
    let server = Server::start(["--size", "64M"]);
    let nbdkit = Peer::nbdkit("64M", &[], &[]);
    let qemu = Peer::qemu_nbd(64 * MIB);
    cp_verbose(&[source_str, &server.uri()]);
    cp_verbose(&[&server.uri(), &nbdkit.uri()]);
    cp_verbose(&[&nbdkit.uri(), &qemu.uri()]);
    let back = dir.path().join("back.bin");
    cp_verbose(&[&qemu.uri(), back.to_str().expect("UTF-8 path")]);
    let sums = sha256_all(&[&source, &back]);
    assert_eq!(
        sums[0], sums[1],
        "nbd-std -> nbdkit -> qemu-nbd changed the data"
    );
}

#[test]
fn sparse_file_holes_are_not_transferred() {
    let dir = temp_dir();
    let source = dir.path().join("sparse.img");
    common::create_sparse_file(&source, GIB);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .expect("open sparse file");
    let mut random = common::Random::new(42);
    let mut data = vec![0u8; (2 * MIB) as usize];
    random.fill(&mut data);
    file.write_all_at(&data, 100 * MIB).expect("write data");
    file.write_all_at(&data[..4096], 700 * MIB + 12288)
        .expect("write data");
    file.write_all_at(b"the end", GIB - 7).expect("write data");
    file.sync_all().expect("sync");
    drop(file);
    let source_str = source.to_str().expect("UTF-8 path");

    // The export starts out dirty: holes must really be zeroed.
    let server = Server::start(["--size", "1G"]);
    let uri = server.uri();
    let dirty = dir.path().join("dirty.bin");
    common::write_urandom_file(&dirty, 8 * MIB);
    cp_verbose(&[dirty.to_str().expect("UTF-8 path"), &uri]);

    let (transferred, skipped) = cp_verbose(&[source_str, &uri]);
    assert!(
        transferred <= 4 * MIB,
        "{transferred} bytes transferred for ~2 MiB of data"
    );
    assert_eq!(transferred + skipped, GIB);

    let back = dir.path().join("back.img");
    let back_str = back.to_str().expect("UTF-8 path");
    let (transferred, skipped) = cp_verbose(&[&uri, back_str]);
    assert!(
        transferred <= 4 * MIB,
        "{transferred} bytes transferred back for ~2 MiB of data"
    );
    assert_eq!(transferred + skipped, GIB);
    common::assert_same_content(&source, &back);
    let allocated = std::fs::metadata(&back).expect("stat").blocks() * 512;
    assert!(
        allocated <= 8 * MIB,
        "the copy is not sparse: {allocated} bytes allocated"
    );
}

#[test]
fn pipes_and_character_devices_by_path() {
    let dir = temp_dir();
    let source = dir.path().join("random.bin");
    common::write_urandom_file(&source, 3 * MIB + 123);
    let server = Server::start(["--size", "8M"]);
    let uri = server.uri();
    // A FIFO as the source, read in order.
    let fifo = dir.path().join("fifo");
    common::run_ok(Command::new("mkfifo").arg(&fifo), TIMEOUT);
    let feeder = {
        let (source, fifo) = (source.clone(), fifo.clone());
        std::thread::spawn(move || {
            let data = std::fs::read(&source).expect("read source");
            std::fs::write(&fifo, data).expect("write into the FIFO");
        })
    };
    let (transferred, _) = cp_verbose(&[fifo.to_str().expect("path"), &uri]);
    feeder.join().expect("feeder thread");
    assert_eq!(transferred, 3 * MIB + 123);
    // A character device as the destination (nothing truncated or mapped).
    let (transferred, skipped) = cp_verbose(&[&uri, "/dev/null"]);
    assert_eq!(transferred + skipped, 8 * MIB);
    // What went in through the FIFO comes back out.
    let back = dir.path().join("back.bin");
    cp_verbose(&[&uri, back.to_str().expect("path")]);
    let data = std::fs::read(&back).expect("read back");
    let expected = std::fs::read(&source).expect("read source");
    assert!(data[..expected.len()] == expected[..], "FIFO copy differs");
    // An endless source does not fit.
    let out = nbd_std_cp(&["/dev/zero", &uri]);
    assert!(
        !out.success() && out.stderr.contains("is larger than the destination export"),
        "{}",
        out.describe()
    );
}

#[test]
fn errors_are_one_line() {
    let dir = temp_dir();
    let big = dir.path().join("big.bin");
    common::create_sparse_file(&big, 2 * MIB);
    let server = Server::start(["--export", "ro=memory:4M,ro"]);
    let missing = dir.path().join("missing.bin");
    let cases = [
        (
            vec![big.to_str().expect("path").to_owned(), server.uri_for("ro")],
            "the export is read-only".to_owned(),
        ),
        (
            vec![
                big.to_str().expect("path").to_owned(),
                server.uri_for("nope"),
            ],
            "no export named \"nope\"".to_owned(),
        ),
        (
            vec![
                missing.to_str().expect("path").to_owned(),
                dir.path().join("x").display().to_string(),
            ],
            format!("{}: No such file or directory", missing.display()),
        ),
        (
            vec![
                "nbds://127.0.0.1/?tls-psk-file=k".to_owned(),
                "-".to_owned(),
            ],
            "TLS-PSK is not supported".to_owned(),
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = nbd_std_cp(&args);
        assert!(!out.success(), "{}", out.describe());
        let line = out.stderr.trim_end();
        assert!(
            !line.contains('\n') && line.starts_with("nbd-std: ") && line.contains(&expected),
            "expected one line with {expected:?}\n{}",
            out.describe()
        );
    }
    // A source larger than the destination export.
    let small = Server::start(["--size", "1M"]);
    let out = nbd_std_cp(&[big.to_str().expect("path"), &small.uri()]);
    assert!(!out.success());
    assert!(
        out.stderr.contains(&format!(
            "the source ({} bytes) is larger than the destination export ({} bytes)",
            2 * MIB,
            MIB
        )),
        "{}",
        out.describe()
    );
}
