//! Real NBD clients (libnbd's `nbdinfo` and `nbdcopy`, `qemu-io`) against
//! `nbd_embedded::io::serve` on loopback. A missing tool skips its part,
//! unless `NBD_REQUIRE_TOOLS=1`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::tools::{run_ok, tool};
use common::{MemCard, pattern_byte};

/// Limit for one client command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a client; panics with its output unless it succeeds in time.
fn run(command: &mut Command) -> String {
    run_ok(command, COMMAND_TIMEOUT).stdout
}

#[test]
fn nbdinfo_sees_size_and_block_sizes() {
    if !tool("nbdinfo") {
        return;
    }
    let (port, server) = common::spawn_server(MemCard::new(2048), 512, 1);
    let out = run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/card")));
    assert!(out.contains("1048576"), "{out}");
    assert!(out.contains("block_size_minimum: 1"), "{out}");
    assert!(out.contains("block_size_preferred: 512"), "{out}");
    server.join().unwrap();
}

#[test]
fn nbdcopy_round_trip() {
    if !tool("nbdcopy") {
        return;
    }
    let card = MemCard::new(8192); // 4 MiB
    let (port, server) = common::spawn_server(card.clone(), 1024, 2);
    let dir = std::env::temp_dir().join(format!("nbd-embedded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("in.img");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    std::fs::write(&image, &bytes).unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/card");
    run(Command::new("nbdcopy").arg(&image).arg(&uri));
    assert!(
        card.bytes(0, bytes.len()) == bytes,
        "card differs after nbdcopy"
    );
    let back = dir.join("out.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(std::fs::read(&back).unwrap() == bytes, "copy back differs");
    std::fs::remove_dir_all(&dir).unwrap();
    server.join().unwrap();
}

#[test]
fn qemu_io_unaligned_write_read_flush() {
    if !tool("qemu-io") {
        return;
    }
    let card = MemCard::new(2048);
    let (port, server) = common::spawn_server(card.clone(), 512, 1);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1000 3000",
        "-c",
        "read -P 0xab 1000 3000",
        "-c",
        "read -v 998 4",
        "-c",
        "flush",
        &format!("nbd://127.0.0.1:{port}/card"),
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(card.bytes(1000, 3000), vec![0xab; 3000]);
    assert_eq!(card.bytes(998, 2), [pattern_byte(998), pattern_byte(999)]);
    assert_eq!(card.bytes(4000, 1), [pattern_byte(4000)]);
    server.join().unwrap();
}
