//! `nbd-std info` checked against `nbdinfo` on the same server: text,
//! `--json` and `--list`, on `nbd-std serve`, `nbdkit`, `qemu-nbd` and
//! `nbd-server`; and the one-line errors.
//!
//! libnbd 1.14 (Debian 12) negotiates structured replies where `nbd-std`
//! gets extended headers, and probes the content with `file(1)`: the
//! protocol's packet style and the `content` line are left out of the
//! comparison; everything else must match line for line.

mod common;
mod peers;

use std::time::Duration;

use common::{Server, have_tools, run, run_ok, server_binary, tool};
use peers::Peer;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn nbd_std_info(args: &[&str]) -> common::Output {
    run(
        std::process::Command::new(server_binary())
            .arg("info")
            .args(args),
        TIMEOUT,
    )
}

/// Text output without what only one side can know.
fn normalize_text(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("content:"))
        .map(|line| {
            if line.starts_with("protocol:") {
                line.replace("extended packets", "structured packets")
            } else {
                line.to_owned()
            }
        })
        .collect()
}

fn normalize_json(text: &str) -> Value {
    let mut value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"));
    let object = value.as_object_mut().expect("JSON object");
    object.remove("extended");
    if let Some(exports) = object.get_mut("exports").and_then(Value::as_array_mut) {
        for export in exports {
            if let Some(export) = export.as_object_mut() {
                export.remove("content");
            }
        }
    }
    value
}

/// `nbd-std info ARGS` prints what `nbdinfo ARGS` prints.
fn compare(what: &str, args: &[&str]) {
    let expected = run_ok(tool("nbdinfo").args(args), TIMEOUT);
    let ours = nbd_std_info(args).assert_success();
    if args.contains(&"--json") {
        assert_eq!(
            normalize_json(&ours.stdout),
            normalize_json(&expected.stdout),
            "{what}: nbd-std info {args:?} differs from nbdinfo\n--- nbd-std ---\n{}\n--- nbdinfo ---\n{}",
            ours.stdout,
            expected.stdout
        );
    } else {
        assert_eq!(
            normalize_text(&ours.stdout),
            normalize_text(&expected.stdout),
            "{what}: nbd-std info {args:?} differs from nbdinfo\n--- nbd-std ---\n{}\n--- nbdinfo ---\n{}",
            ours.stdout,
            expected.stdout
        );
    }
}

fn compare_all_forms(what: &str, uri: &str) {
    compare(what, &[uri]);
    compare(what, &["--json", uri]);
    compare(what, &["--list", uri]);
    compare(what, &["--list", "--json", uri]);
}

#[test]
fn matches_nbdinfo_on_nbd_std_serve() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = common::temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, 3 * MIB + 512);
    let image_spec = format!("disk=file:{},desc=a file, with commas", image.display());
    let server = Server::start([
        "--export",
        "scratch=memory:1G,desc=scratch space",
        "--export",
        &image_spec,
        "--export",
        "iso=memory:1000,ro",
    ]);
    compare_all_forms("nbd-std serve", &server.uri());
    compare("nbd-std serve", &[&server.uri_for("disk")]);
    compare("nbd-std serve", &["--json", &server.uri_for("iso")]);

    let socket = dir.path().join("nbd.sock");
    let unix = Server::start_unix(&socket, ["--size", "64M"]);
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    compare_all_forms("nbd-std serve on a unix socket", &uri);
    drop(unix);
}

#[test]
fn matches_nbdinfo_on_other_servers() {
    if !have_tools(&["nbdinfo", "nbdkit", "qemu-nbd", "nbd-server"]) {
        return;
    }
    let nbdkit = Peer::nbdkit("1G", &[], &[]);
    compare_all_forms("nbdkit", &nbdkit.uri());
    drop(nbdkit);
    let qemu = Peer::qemu_nbd(64 * MIB);
    compare_all_forms("qemu-nbd", &qemu.uri());
    drop(qemu);
    let nbd_server = Peer::nbd_server(64 * MIB);
    compare_all_forms("nbd-server", &nbd_server.uri());
}

#[test]
fn errors_are_one_line() {
    let server = Server::start(["--size", "1M"]);
    let cases = [
        (
            server.uri_for("nope"),
            "the server has no export named \"nope\"",
        ),
        (
            "nbd://127.0.0.1/?tls-certificates=/etc/pki".to_owned(),
            "TLS parameters need the nbds",
        ),
        ("disk.img".to_owned(), "is not an NBD URI"),
        (
            format!("nbd://127.0.0.1:{}/", common::free_port()),
            "cannot connect to 127.0.0.1:",
        ),
    ];
    for (uri, expected) in cases {
        let out = nbd_std_info(&[&uri]);
        assert!(!out.success(), "{}", out.describe());
        assert!(out.stdout.is_empty(), "{}", out.describe());
        let line = out.stderr.trim_end();
        assert!(
            !line.contains('\n') && line.starts_with("nbd-std: ") && line.contains(expected),
            "expected one line with {expected:?}\n{}",
            out.describe()
        );
    }
}

/// `--map` (text, JSON, `--totals`), `--size`, and the exit statuses of
/// `--can`/`--is` (0 yes, 2 no, 1 unknown flag), each against nbdinfo on
/// the same export.
fn compare_scripting_forms(what: &str, uri: &str) {
    for args in [
        &["--map"][..],
        &["--map", "--json"],
        &["--map=base:allocation", "--totals"],
        &["--map", "--totals", "--json"],
        &["--size"],
        &["--size", "--json"],
    ] {
        let mut args = args.to_vec();
        args.push(uri);
        let expected = run_ok(tool("nbdinfo").args(&args), TIMEOUT);
        let ours = nbd_std_info(&args).assert_success();
        assert_eq!(
            ours.stdout, expected.stdout,
            "{what}: nbd-std info {args:?} differs from nbdinfo"
        );
    }
    for (option, flags) in [
        (
            "--can",
            &[
                "connect",
                "read",
                "write",
                "cache",
                "df",
                "fast-zero",
                "flush",
                "fua",
                "multi-conn",
                "trim",
                "zero",
                "structured-reply",
                "bogus",
            ][..],
        ),
        ("--is", &["read-only", "rotational", "tls", "Fast_Zero"]),
    ] {
        for flag in flags {
            let expected = run(tool("nbdinfo").args([option, flag, uri]), TIMEOUT);
            let ours = nbd_std_info(&[option, flag, uri]);
            assert_eq!(
                ours.code(),
                expected.code(),
                "{what}: {option} {flag}\n--- nbd-std ---\n{}\n--- nbdinfo ---\n{}",
                ours.describe(),
                expected.describe()
            );
        }
    }
}

#[test]
fn map_size_can_and_is_match_nbdinfo() {
    if !have_tools(&["nbdinfo", "nbdkit"]) {
        return;
    }
    let dir = common::temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, 4 * MIB);
    // Data at 192 KiB and 640 KiB, holes around them.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .expect("open image");
        for (offset, length) in [(192 << 10, 128 << 10), (640 << 10, 64 << 10)] {
            file.seek(SeekFrom::Start(offset)).expect("seek");
            file.write_all(&common::random_bytes(offset, length))
                .expect("write");
        }
    }
    let image_spec = format!("disk=file:{}", image.display());
    let server = Server::start(["--export", &image_spec, "--export", "ro=memory:1M,ro"]);
    compare_scripting_forms("nbd-std serve, sparse file", &server.uri_for("disk"));
    compare_scripting_forms("nbd-std serve, read-only memory", &server.uri_for("ro"));
    let map = nbd_std_info(&["--map", &server.uri_for("disk")]).assert_success();
    assert_eq!(map.stdout.lines().count(), 5, "{}", map.describe());

    let nbdkit = Peer::nbdkit("64M", &[], &[]);
    compare_scripting_forms("nbdkit memory", &nbdkit.uri());
}
