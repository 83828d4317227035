//! `s3://` exports against a real S3 server (SeaweedFS `weed mini`, started
//! by each test on loopback ports), with the real clients: nbdcopy and
//! nbdinfo (libnbd), qemu-io. Each test restarts the server before reading
//! back, so what it checks came from the store, not from the cache.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fuse::{can_use_fuse, mount_export};
use common::seaweed::{BUCKET, Seaweed};
use common::{
    Output, Server, have_tools, nbdinfo_json, run, run_ok, sha256, temp_dir, tool,
    write_urandom_file,
};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

/// `nbd-std serve --export NAME=s3://disks/PREFIX,OPTIONS` against `store`.
fn serve(store: &Seaweed, name: &str, prefix: &str, options: &str) -> Server {
    let spec = format!("{name}=s3://{BUCKET}/{prefix}{options}");
    let env = store.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with_env(&env, ["--export", spec.as_str()])
}

/// The same, expected to fail: its output.
fn serve_refused(store: &Seaweed, name: &str, prefix: &str, options: &str) -> Output {
    let spec = format!("{name}=s3://{BUCKET}/{prefix}{options}");
    let mut command = Command::new(common::server_binary());
    command
        .args(["serve", "--port", &common::free_port().to_string()])
        .args(["--export", &spec]);
    for (key, value) in store.env() {
        command.env(key, value);
    }
    run(&mut command, TIMEOUT)
}

fn qemu_io(uri: &str, commands: &[String]) -> Output {
    let mut command = tool("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command.arg(uri);
    let out = run_ok(&mut command, TIMEOUT);
    assert!(
        !out.stdout.contains("Pattern verification failed") && !out.stdout.contains("failed"),
        "qemu-io reported a failure\n{}",
        out.describe()
    );
    out
}

/// `(offset, length, type)` of `nbdinfo --map`, merged by type.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let json = nbdinfo_json(&["--map", uri], TIMEOUT);
    let mut extents: Vec<(u64, u64, u64)> = Vec::new();
    for extent in json.as_array().expect("nbdinfo --map --json: an array") {
        let offset = extent["offset"].as_u64().expect("offset");
        let length = extent["length"].as_u64().expect("length");
        let kind = extent["type"].as_u64().expect("type");
        match extents.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == offset => last.1 += length,
            _ => extents.push((offset, length, kind)),
        }
    }
    extents
}

#[test]
fn nbdcopy_256_mib_in_and_out_equal() {
    if !have_tools(&["nbdcopy", "nbdinfo", "sha256sum"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    let copy = dir.path().join("copy.img");
    let size = 256 * MIB;
    write_urandom_file(&source, size);
    let mut server = serve(&store, "vm1", "copy", ",size=256M");
    let uri = server.uri_for("vm1");
    let started = Instant::now();
    run_ok(
        tool("nbdcopy").args(["--flush", source.to_str().expect("path"), &uri]),
        TIMEOUT,
    );
    let copy_in = started.elapsed();
    // SIGKILL: only what FLUSH made durable may count.
    server.signal_and_wait("KILL", common::STOP_TIMEOUT);
    drop(server);
    // The killed server's lease is still live: read-only takes none.
    let server = serve(&store, "vm1", "copy", ",ro");
    let uri = server.uri_for("vm1");
    let started = Instant::now();
    run_ok(
        tool("nbdcopy").args([&uri, copy.to_str().expect("path")]),
        TIMEOUT,
    );
    let copy_out = started.elapsed();
    assert_eq!(sha256(&source), sha256(&copy), "data read back differs");
    let rate = |elapsed: Duration| size as f64 / MIB as f64 / elapsed.as_secs_f64();
    eprintln!(
        "S3 export on SeaweedFS: nbdcopy --flush in {:.0} MiB/s, out (cold cache) {:.0} MiB/s",
        rate(copy_in),
        rate(copy_out)
    );
}

#[test]
fn qemu_io_unaligned_writes_across_object_boundaries() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    // 64 KiB objects: the writes straddle boundaries at 64K and 128K.
    let options = ",size=1M,object-size=64K";
    let writes = [
        (65_000u64, 2_000u64, 0xa1u8),
        (131_000, 70_000, 0xb2),
        (1, 511, 0xc3),
        (1_048_000, 576, 0xd4),
    ];
    let server = serve(&store, "vm1", "unaligned", options);
    let uri = server.uri_for("vm1");
    let commands: Vec<String> = writes
        .iter()
        .map(|(offset, length, pattern)| format!("write -P {pattern} {offset} {length}"))
        .chain(["flush".to_owned()])
        .collect();
    qemu_io(&uri, &commands);
    drop(server);
    // Stopped cleanly (SIGTERM): the lease is released, a new server opens.
    let server = serve(&store, "vm1", "unaligned", options);
    let uri = server.uri_for("vm1");
    let mut checks: Vec<String> = writes
        .iter()
        .map(|(offset, length, pattern)| format!("read -P {pattern} {offset} {length}"))
        .collect();
    // The bytes between the writes are still zeroes.
    checks.push("read -P 0 0 1".to_owned());
    checks.push("read -P 0 512 64488".to_owned());
    checks.push("read -P 0 67000 64000".to_owned());
    checks.push("read -P 0 201000 846000".to_owned());
    let out = qemu_io(&uri, &checks);
    assert_eq!(
        out.stdout.matches("read ").count(),
        checks.len(),
        "every read ran\n{}",
        out.describe()
    );
}

#[test]
fn block_status_follows_writes_trims_and_zeroes() {
    if !have_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let options = ",size=1M,object-size=64K";
    let server = serve(&store, "vm1", "status", options);
    let uri = server.uri_for("vm1");
    const HOLE: u64 = 3;
    assert_eq!(map(&uri), vec![(0, MIB, HOLE)], "a new disk is one hole");
    let commands: Vec<String> = [
        "write -P 1 0 64k",
        "write -P 2 128k 64k",
        "write -P 3 256k 64k",
        "write -P 4 448k 10",
        "discard 128k 64k",
        "write -z 256k 64k",
        "write -z 0 4k",
        "flush",
    ]
    .iter()
    .map(|c| (*c).to_owned())
    .collect();
    qemu_io(&uri, &commands);
    let expected = vec![
        (0, 64 << 10, 0),
        (64 << 10, 384 << 10, HOLE),
        (448 << 10, 64 << 10, 0),
        (512 << 10, 512 << 10, HOLE),
    ];
    assert_eq!(map(&uri), expected, "after writes, trim and zeroes");
    drop(server);
    // After a restart the map comes from a LIST of the store.
    let server = serve(&store, "vm1", "status", options);
    let uri = server.uri_for("vm1");
    assert_eq!(map(&uri), expected, "after a restart");
    qemu_io(
        &uri,
        &[
            "read -P 0 0 4k".to_owned(),
            "read -P 1 4k 60k".to_owned(),
            "read -P 0 128k 192k".to_owned(),
        ],
    );
    // A whole-disk trim (what mkfs sends) leaves one hole, quickly.
    let started = Instant::now();
    qemu_io(&uri, &["discard 0 1M".to_owned(), "flush".to_owned()]);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(map(&uri), vec![(0, MIB, HOLE)], "after a whole-disk trim");
}

fn spawn_qemu_io(uri: &str, commands: &[String]) -> Child {
    let mut command = tool("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io")
}

#[test]
fn two_connections_writing_one_object_lose_nothing() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let options = ",size=1M,object-size=64K";
    let server = serve(&store, "vm1", "shared", options);
    let uri = server.uri_for("vm1");
    // Two clients at once, each writing every other 512-byte sector of
    // the same 64 KiB object: each write is a read-modify-write of it.
    let sectors = 128u64;
    let writer = |parity: u64| -> Vec<String> {
        (0..sectors)
            .filter(|s| s % 2 == parity)
            .map(|s| format!("write -P {} {} 512", 0x10 + parity, s * 512))
            .collect()
    };
    let first = spawn_qemu_io(&uri, &writer(0));
    let second = spawn_qemu_io(&uri, &writer(1));
    for child in [first, second] {
        let out = child.wait_with_output().expect("qemu-io");
        assert!(out.status.success(), "qemu-io failed: {out:?}");
    }
    qemu_io(&uri, &["flush".to_owned()]);
    drop(server);
    let server = serve(&store, "vm1", "shared", options);
    let uri = server.uri_for("vm1");
    let checks: Vec<String> = (0..sectors)
        .map(|s| format!("read -P {} {} 512", 0x10 + s % 2, s * 512))
        .collect();
    qemu_io(&uri, &checks);
}

#[test]
fn second_server_refused_until_the_first_lease_expires() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let options = ",size=1M,object-size=64K,lease=3";
    let mut first = serve(&store, "vm1", "fenced", options);
    qemu_io(
        &first.uri_for("vm1"),
        &["write -P 7 0 4k".to_owned(), "flush".to_owned()],
    );
    let refused = serve_refused(&store, "vm1", "fenced", options);
    assert!(
        !refused.success(),
        "second server started\n{}",
        refused.describe()
    );
    assert!(
        refused.stderr.contains("is in use by") && refused.stderr.lines().count() == 1,
        "one line naming the holder\n{}",
        refused.describe()
    );
    // Past its first lease period the holder still writes: renewals work.
    std::thread::sleep(Duration::from_secs(4));
    qemu_io(
        &first.uri_for("vm1"),
        &["write -P 7 4k 4k".to_owned(), "flush".to_owned()],
    );
    assert!(
        !first.stderr().contains("renewal failed") && !first.stderr().contains("taken by another"),
        "{}",
        first.describe()
    );
    first.signal_and_wait("KILL", common::STOP_TIMEOUT);
    drop(first);
    // Refused at once (the lease is fresh), accepted once it expired.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    let second = loop {
        attempts += 1;
        let spec = format!("vm1=s3://{BUCKET}/fenced{options}");
        let port = common::free_port();
        let mut command = Command::new(common::server_binary());
        command.args(["serve", "--port", &port.to_string(), "--export", &spec]);
        for (key, value) in store.env() {
            command.env(key, value);
        }
        let out = run(command.arg("--run").arg("true"), TIMEOUT);
        if out.success() {
            break serve(&store, "vm1", "fenced", options);
        }
        assert!(
            out.stderr.contains("is in use by"),
            "refused for another reason\n{}",
            out.describe()
        );
        assert!(Instant::now() < deadline, "never took the lease over");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(attempts > 1, "the killed server's lease was not honoured");
    qemu_io(&second.uri_for("vm1"), &["read -P 7 0 8k".to_owned()]);
}

#[test]
fn store_down_during_a_copy_then_back() {
    if !have_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let Some(mut store) = Seaweed::start() else {
        return;
    };
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    let copy = dir.path().join("copy.img");
    write_urandom_file(&source, 64 * MIB);
    let server = serve(
        &store,
        "vm1",
        "outage",
        ",size=64M,object-size=256K,cache=32M",
    );
    let uri = server.uri_for("vm1");
    let source_path = source.to_str().expect("path");
    let mut copying = tool("nbdcopy")
        .args(["--flush", source_path, &uri])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbdcopy");
    std::thread::sleep(Duration::from_millis(300));
    store.kill();
    let down = Instant::now();
    // While the store is down the copy fails or waits, within the stated
    // bound (see docs/OBJECT-STORAGE.md), and the server stays up.
    let bound = Duration::from_secs(100);
    let status = loop {
        if let Some(status) = copying.try_wait().expect("poll nbdcopy") {
            break Some(status);
        }
        if down.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    store.restart();
    let status = match status {
        Some(status) => status,
        None => {
            let deadline = Instant::now() + bound;
            loop {
                if let Some(status) = copying.try_wait().expect("poll nbdcopy") {
                    break status;
                }
                assert!(Instant::now() < deadline, "nbdcopy hung past {bound:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    eprintln!(
        "copy during the outage: {status} after {:.1} s",
        down.elapsed().as_secs_f64()
    );
    // Serving goes on without a restart of nbd-std: copy again, then read
    // back from a fresh server (from the store).
    run_ok(
        tool("nbdcopy").args(["--flush", source_path, &uri]),
        TIMEOUT,
    );
    drop(server);
    let server = serve(&store, "vm1", "outage", "");
    run_ok(
        tool("nbdcopy").args([&server.uri_for("vm1"), copy.to_str().expect("path")]),
        TIMEOUT,
    );
    assert_eq!(sha256(&source), sha256(&copy), "data read back differs");
    drop(server);

    // The store down for good: what needs it fails with EIO, within the
    // bound, and the server stays up; back, it serves again.
    // A whole-object write needs no GET: it goes into the cache, and its
    // FLUSH fails; the data stays dirty and is stored once the store is
    // back.
    let server = serve(&store, "vm1", "outage", ",cache=4M");
    let uri = server.uri_for("vm1");
    store.kill();
    let started = Instant::now();
    let mut command = tool("qemu-io");
    command
        .args(["-f", "raw", "-c", "read 1M 256k", "-c", "write -P 5 0 256k"])
        .args(["-c", "flush"])
        .arg(&uri);
    let out = run(&mut command, TIMEOUT);
    let failed = started.elapsed();
    assert_eq!(
        out.stdout.matches("Input/output error").count()
            + out.stderr.matches("Input/output error").count(),
        2,
        "the read and the flush fail with EIO, the whole-object write (cached) succeeds\n{}",
        out.describe()
    );
    assert!(failed < bound, "EIO took {failed:?}");
    store.restart();
    let mut expected = std::fs::read(&source).expect("read source");
    expected[..256 << 10].fill(5);
    qemu_io(&uri, &["flush".to_owned()]);
    let copy = dir.path().join("copy2.img");
    run_ok(
        tool("nbdcopy").args([&uri, copy.to_str().expect("path")]),
        TIMEOUT,
    );
    let back = std::fs::read(&copy).expect("read copy");
    let wrong: Vec<usize> = (0..expected.len() / 4096)
        .filter(|&i| back[i * 4096..(i + 1) * 4096] != expected[i * 4096..(i + 1) * 4096])
        .collect();
    assert!(
        wrong.is_empty(),
        "after the store came back the export reads wrong: {} of {} 4 KiB blocks differ, first at {:?}",
        wrong.len(),
        expected.len() / 4096,
        wrong.iter().take(8).map(|i| i * 4096).collect::<Vec<_>>()
    );
    // Its errors were logged, and its secret never.
    assert!(
        server.stderr().contains("object store") && !server.stderr().contains("nbd-test-secret"),
        "{}",
        server.describe()
    );
    eprintln!(
        "store down: read and flush failed with EIO after {:.1} s",
        failed.as_secs_f64()
    );
}

#[test]
fn size_mismatch_and_missing_disk_are_one_line_errors() {
    let Some(store) = Seaweed::start() else {
        return;
    };
    let missing = serve_refused(&store, "vm1", "absent", "");
    assert!(
        missing.stderr.contains("add ,size=SIZE") && missing.stderr.lines().count() == 1,
        "{}",
        missing.describe()
    );
    drop(serve(&store, "vm1", "sized", ",size=2M"));
    let mismatch = serve_refused(&store, "vm1", "sized", ",size=4M");
    assert!(
        mismatch
            .stderr
            .contains("size=4194304 but the disk's manifest says 2097152")
            && mismatch.stderr.lines().count() == 1,
        "{}",
        mismatch.describe()
    );
    assert!(
        !mismatch.stderr.contains("nbd-test-secret"),
        "credentials in the output"
    );
    // The refused server gave its lease back: a corrected one opens now.
    drop(serve(&store, "vm1", "sized", ""));
}

#[test]
fn ext4_through_nbd_std_mount() {
    if !have_tools(&["fusermount3", "mkfs.ext4", "e2fsck", "debugfs", "nbdcopy"]) || !can_use_fuse()
    {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    let options = ",size=256M";
    let mut server = serve(&store, "vm1", "ext4", options);
    let uri = server.uri_for("vm1");
    let mount = mount_export(&uri, &image, dir.path().join("mount.log"));
    // mkfs.ext4 discards the whole device first (a whole-disk TRIM).
    let started = Instant::now();
    run_ok(tool("mkfs.ext4").args(["-F", "-q"]).arg(&image), TIMEOUT);
    let mkfs = started.elapsed();
    // Files, written into the filesystem on the mounted export.
    let files = [
        ("hello.txt", b"hello through S3\n".to_vec()),
        ("random.bin", common::random_bytes(11, (3 * MIB) as usize)),
    ];
    for (name, content) in &files {
        let source = dir.path().join(name);
        std::fs::write(&source, content).expect("write source file");
        let request = format!("write {} {name}", source.display());
        run_ok(
            tool("debugfs").args(["-w", "-R", &request]).arg(&image),
            TIMEOUT,
        );
    }
    let fsck = run(tool("e2fsck").arg("-fn").arg(&image), TIMEOUT);
    assert_eq!(fsck.code(), Some(0), "not clean\n{}", fsck.describe());
    // `fusermount3 -u` ends `nbd-std mount` with status 0.
    run_ok(tool("fusermount3").arg("-u").arg(&image), TIMEOUT);
    let status = mount.wait_exit();
    assert!(status.success(), "nbd-std mount exited {status}");
    server.stop();
    drop(server);
    // From the store, through a new server: a clean ext4 with the files.
    let server = serve(&store, "vm1", "ext4", options);
    let copy = dir.path().join("copy.img");
    run_ok(
        tool("nbdcopy").args([&server.uri_for("vm1"), copy.to_str().expect("path")]),
        TIMEOUT,
    );
    let fsck = run(tool("e2fsck").arg("-fn").arg(&copy), TIMEOUT);
    assert_eq!(fsck.code(), Some(0), "copy not clean\n{}", fsck.describe());
    for (name, content) in &files {
        let back = dir.path().join(format!("{name}.back"));
        let request = format!("dump {name} {}", back.display());
        run_ok(tool("debugfs").args(["-R", &request]).arg(&copy), TIMEOUT);
        assert!(
            std::fs::read(&back).expect("dumped file") == *content,
            "{name} differs"
        );
    }
    eprintln!(
        "mkfs.ext4 of a 256 MiB S3 export through nbd-std mount: {:.1} s",
        mkfs.as_secs_f64()
    );
}

#[test]
fn read_only_export_serves_reads_and_refuses_writes() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let Some(store) = Seaweed::start() else {
        return;
    };
    let options = ",size=1M,object-size=64K";
    let server = serve(&store, "vm1", "ro", options);
    qemu_io(
        &server.uri_for("vm1"),
        &["write -P 9 60k 8k".to_owned(), "flush".to_owned()],
    );
    drop(server);
    // A read-only server takes no lease: it may run beside a writer.
    let writer = serve(&store, "vm1", "ro", options);
    let reader = serve(&store, "vm1", "ro", ",ro");
    let uri = reader.uri_for("vm1");
    let read = |checks: &[&str]| {
        let mut command = tool("qemu-io");
        command.args(["-r", "-f", "raw"]);
        for check in checks {
            command.args(["-c", check]);
        }
        let out = run_ok(command.arg(&uri), TIMEOUT);
        assert!(!out.stdout.contains("failed"), "{}", out.describe());
    };
    read(&["read -P 9 60k 8k", "read -P 0 0 60k"]);
    // qemu-io opens read-write by default: the read-only export refuses.
    let mut command = tool("qemu-io");
    command
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(&uri);
    let refused = run(&mut command, TIMEOUT);
    assert!(
        !refused.success() && refused.stderr.contains("Permission denied"),
        "a write to a read-only export was accepted\n{}",
        refused.describe()
    );
    read(&["read -P 0 0 4k"]);
    drop(writer);
    // And a read-only export never creates a disk.
    let absent = serve_refused(&store, "vm1", "ro-absent", ",size=1M,ro");
    assert!(
        absent
            .stderr
            .contains("read-only export does not create one")
            && absent.stderr.lines().count() == 1,
        "{}",
        absent.describe()
    );
}
