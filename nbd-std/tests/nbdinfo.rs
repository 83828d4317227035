//! `nbdinfo` (libnbd) against `nbd-std serve`: export list, sizes,
//! descriptions, block sizes and the flags `--can` / `--is` test.

mod common;

use std::time::Duration;

use common::{Server, have_tools, nbdinfo_json, run, run_ok, temp_dir, tool};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn exports(json: &Value) -> &Vec<Value> {
    json["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array in {json:#}"))
}

fn export<'a>(json: &'a Value, name: &str) -> &'a Value {
    exports(json)
        .iter()
        .find(|e| e["export-name"] == name)
        .unwrap_or_else(|| panic!("export {name:?} not listed in {json:#}"))
}

fn size_of(export: &Value) -> u64 {
    export["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size in {export:#}"))
}

/// Block sizes are present and satisfy the spec's constraints.
fn check_block_sizes(export: &Value) {
    let get = |key: &str| {
        export[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {export:#}"))
    };
    let (minimum, preferred, maximum) = (
        get("block_size_minimum"),
        get("block_size_preferred"),
        get("block_size_maximum"),
    );
    assert!(
        minimum.is_power_of_two() && minimum <= 64 * 1024,
        "minimum block size {minimum}"
    );
    assert!(
        preferred.is_power_of_two() && preferred >= minimum.max(512),
        "preferred block size {preferred} (minimum {minimum})"
    );
    assert!(
        maximum >= preferred,
        "maximum block size {maximum} < preferred {preferred}"
    );
}

/// `nbdinfo --can FLAG` / `--is FLAG`: exit 0 when true, 2 when false.
fn flag(kind: &str, name: &str, uri: &str) -> bool {
    let out = run(tool("nbdinfo").args([kind, name, uri]), TIMEOUT);
    match out.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {kind} {name} failed\n{}", out.describe()),
    }
}

#[test]
fn default_export_is_a_1g_memory_export() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let server = Server::start_default();
    let list = nbdinfo_json(&["--list", &server.uri()], TIMEOUT);
    assert_eq!(list["protocol"], "newstyle-fixed", "{list:#}");
    assert_eq!(list["structured"], true, "structured replies: {list:#}");
    let memory = export(&list, "memory");
    assert_eq!(size_of(memory), GIB, "default --size is 1G: {memory:#}");
    check_block_sizes(memory);
    assert_eq!(memory["is_read_only"], false);
    assert!(
        memory["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "base:allocation offered: {memory:#}"
    );

    // The empty name reaches the same export.
    let default = nbdinfo_json(&[&server.uri()], TIMEOUT);
    let exports = exports(&default);
    assert_eq!(exports.len(), 1, "{default:#}");
    assert_eq!(size_of(&exports[0]), GIB, "{default:#}");

    // And its name does too.
    let named = nbdinfo_json(&[&server.uri_for("memory")], TIMEOUT);
    assert_eq!(size_of(&exports_first(&named)), GIB, "{named:#}");

    // Plain-text listing names it as well.
    let text = run_ok(tool("nbdinfo").args(["--list", &server.uri()]), TIMEOUT);
    assert!(
        text.stdout.contains("export=\"memory\""),
        "{}",
        text.describe()
    );
}

fn exports_first(json: &Value) -> Value {
    exports(json)
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no export in {json:#}"))
}

#[test]
fn size_units() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let cases = [
        ("512K", 512 * 1024),
        ("64M", 64 * MIB),
        ("64MiB", 64 * MIB),
        ("64MB", 64 * MIB),
        ("3G", 3 * GIB),
        ("2GiB", 2 * GIB),
        ("1T", 1 << 40),
        ("1048576", MIB),
    ];
    for (size, bytes) in cases {
        let server = Server::start(["--size", size]);
        let out = run_ok(tool("nbdinfo").args(["--size", &server.uri()]), TIMEOUT);
        assert_eq!(
            out.stdout.trim(),
            bytes.to_string(),
            "--size {size}\n{}",
            out.describe()
        );
    }
}

#[test]
fn several_exports_with_descriptions() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, 8 * MIB);
    let server = Server::start([
        "--export".to_owned(),
        "scratch=memory:16M,desc=Scratch space".to_owned(),
        "--export".to_owned(),
        format!("disk=file:{},ro,desc=Backing file", image.display()),
        "--export".to_owned(),
        "tiny=memory:1M".to_owned(),
    ]);
    let list = nbdinfo_json(&["--list", &server.uri()], TIMEOUT);

    let scratch = export(&list, "scratch");
    assert_eq!(size_of(scratch), 16 * MIB, "{scratch:#}");
    assert_eq!(scratch["description"], "Scratch space", "{scratch:#}");
    assert_eq!(scratch["is_read_only"], false, "{scratch:#}");
    check_block_sizes(scratch);

    let disk = export(&list, "disk");
    assert_eq!(size_of(disk), 8 * MIB, "{disk:#}");
    assert_eq!(disk["description"], "Backing file", "{disk:#}");
    assert_eq!(disk["is_read_only"], true, "{disk:#}");
    check_block_sizes(disk);

    let tiny = export(&list, "tiny");
    assert_eq!(size_of(tiny), MIB, "{tiny:#}");
    assert_eq!(tiny["is_read_only"], false, "{tiny:#}");
    check_block_sizes(tiny);

    // The first export is the default one.
    let default = exports_first(&nbdinfo_json(&[&server.uri()], TIMEOUT));
    assert_eq!(size_of(&default), 16 * MIB, "{default:#}");
    assert_eq!(default["description"], "Scratch space", "{default:#}");

    // An unknown name is refused without harming the server.
    let out = run(tool("nbdinfo").arg(server.uri_for("nonexistent")), TIMEOUT);
    assert!(
        !out.success(),
        "nbdinfo on an unknown export succeeded\n{}",
        out.describe()
    );
    run_ok(tool("nbdinfo").arg(server.uri_for("tiny")), TIMEOUT);
}

/// Every optional command is offered by writable memory and file exports.
#[test]
fn can_flags_of_writable_exports() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, 4 * MIB);
    let server = Server::start([
        "--export".to_owned(),
        "mem=memory:4M".to_owned(),
        "--export".to_owned(),
        format!("disk=file:{}", image.display()),
    ]);
    for name in ["mem", "disk"] {
        let uri = server.uri_for(name);
        for can in [
            "connect",
            "read",
            "write",
            "flush",
            "trim",
            "zero",
            "fua",
            "multi-conn",
            "df",
            "cache",
            "structured-reply",
        ] {
            assert!(
                flag("--can", can, &uri),
                "export {name}: --can {can} is false"
            );
        }
        assert!(
            !flag("--is", "read-only", &uri),
            "export {name}: --is read-only is true"
        );
    }
}

#[test]
fn read_only_exports() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    common::create_sparse_file(&image, 4 * MIB);
    let server = Server::start([
        "--export".to_owned(),
        "rw=memory:4M".to_owned(),
        "--export".to_owned(),
        "ro=memory:4M,ro".to_owned(),
        "--export".to_owned(),
        format!("disk=file:{},ro", image.display()),
    ]);
    assert!(!flag("--is", "read-only", &server.uri_for("rw")));
    assert!(flag("--can", "write", &server.uri_for("rw")));
    for name in ["ro", "disk"] {
        let uri = server.uri_for(name);
        assert!(flag("--is", "read-only", &uri), "{name}: --is read-only");
        assert!(!flag("--can", "write", &uri), "{name}: --can write");
        assert!(flag("--can", "read", &uri), "{name}: --can read");
    }
    drop(server);

    // --read-only makes every export read-only.
    let server = Server::start([
        "--read-only".to_owned(),
        "--export".to_owned(),
        "a=memory:4M".to_owned(),
        "--export".to_owned(),
        format!("b=file:{}", image.display()),
    ]);
    for name in ["a", "b", ""] {
        let uri = server.uri_for(name);
        assert!(flag("--is", "read-only", &uri), "{name:?}: --is read-only");
    }
    drop(server);

    // Without exports, --read-only applies to the memory export.
    let server = Server::start(["--read-only", "--size", "1M"]);
    assert!(flag("--is", "read-only", &server.uri()));
}

#[test]
fn list_over_unix_socket() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(&socket, ["--size", "2M"]);
    let list = nbdinfo_json(&["--list", &server.uri()], TIMEOUT);
    assert_eq!(size_of(export(&list, "memory")), 2 * MIB, "{list:#}");
    let out = run_ok(tool("nbdinfo").args(["--size", &server.uri()]), TIMEOUT);
    assert_eq!(
        out.stdout.trim(),
        (2 * MIB).to_string(),
        "{}",
        out.describe()
    );
}
