//! The Linux kernel client and virtual machines against `nbd-std serve`,
//! in a guest booted with `qemu-system-x86_64` (Debian's kernel and an
//! initramfs built at test time; see `common/guest.rs` and
//! `scripts/guest.sh`):
//!
//! - Debian's `nbd-client` in netlink and ioctl (`-L`) mode, with four
//!   connections (`-C 4`), over TLS (`--tls require`) and with `-b 4096`:
//!   mkfs.ext4, mount, files, unmount, read-only remount, checksums; the
//!   host then checks each image with `e2fsck -fn` and `debugfs`.
//! - A server restart (SIGTERM, start again on the same port and file)
//!   under a mounted filesystem with `nbd-client -L -persist`.
//! - A VM whose root filesystem is a virtio disk QEMU opens as
//!   `nbd://127.0.0.1:PORT/root`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::{Guest, GuestKit, build_root_image, guest_file, seconds, user_network};
use common::pki::Pki;
use common::{
    Server, create_sparse_file, have_tools, run, run_ok, sha256, temp_dir, tool, wait_until,
};

/// Longest a guest may run: boot (about 20 s under TCG) and its workflows,
/// on a loaded two-core machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
const TIMEOUT: Duration = Duration::from_secs(120);
const DISK_SIZE: u64 = 64 << 20;
/// The host as the guest's user-mode network sees it.
const HOST: &str = "10.0.2.2";

/// The `nbd-sum SESSION SHA256 PATH` lines a guest printed for `session`:
/// path to checksum.
fn guest_sums(console: &str, prefix: &str, session: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != prefix {
                return None;
            }
            if !session.is_empty() && words.next()? != session {
                return None;
            }
            let (first, second) = (words.next()?, words.next()?);
            // nbd-sum lines are "SHA PATH", nbd-synced lines "PATH SHA".
            let (sum, path) = if first.starts_with('/') {
                (second, first)
            } else {
                (first, second)
            };
            Some((path.to_owned(), sum.to_owned()))
        })
        .collect()
}

/// `e2fsck -fn` finds nothing to fix in `image`, and every file in `sums`
/// (`/dir/...` paths) dumped by `debugfs rdump` has the guest's checksum.
fn assert_image_holds(image: &Path, sums: &BTreeMap<String, String>, what: &str) {
    assert!(!sums.is_empty(), "{what}: the guest listed no files");
    let check = run(tool("e2fsck").arg("-fn").arg(image), TIMEOUT);
    assert!(check.success(), "{what}: e2fsck -fn\n{}", check.describe());
    let dump = temp_dir();
    let mut top_dirs: Vec<&str> = sums
        .keys()
        .filter_map(|path| path.split('/').nth(1))
        .collect();
    top_dirs.dedup();
    for top in top_dirs {
        run_ok(
            tool("debugfs")
                .arg("-R")
                .arg(format!("rdump /{top} {}", dump.path().display()))
                .arg(image),
            TIMEOUT,
        );
    }
    for (path, sum) in sums {
        let dumped = dump.path().join(path.trim_start_matches('/'));
        assert!(dumped.exists(), "{what}: {path} missing from the image");
        assert_eq!(
            &sha256(&dumped),
            sum,
            "{what}: {path} differs from the guest's"
        );
    }
}

/// Lines of `log` that contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|line| line.contains(needle)).count()
}

#[test]
fn kernel_client_workflows() {
    let Some(kit) = GuestKit::prepare() else {
        return;
    };
    if !have_tools(&["e2fsck", "debugfs", "nbdcopy"]) {
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let client_version = run_ok(tool("nbd-client").arg("--version"), TIMEOUT);
    println!(
        "guest client: {}",
        format!("{}{}", client_version.stdout, client_version.stderr).trim()
    );
    let dir = temp_dir();
    let images = ["disk", "multi", "bs4k", "tls"].map(|name| {
        let image = dir.path().join(format!("{name}.img"));
        create_sparse_file(&image, DISK_SIZE);
        (name, image)
    });
    let mut args = Vec::new();
    for (name, image) in &images[..3] {
        args.push("--export".to_owned());
        args.push(format!("{name}=file:{}", image.display()));
    }
    args.extend(["--export".to_owned(), "ram=memory:64M".to_owned()]);
    let mut server = Server::start(&args);
    let mut tls_args = pki.serve_args("require");
    tls_args.extend([
        "--export".to_owned(),
        format!("tls=file:{}", images[3].1.display()),
    ]);
    let mut tls_server = Server::start(&tls_args);

    let extra = dir.path().join("extra");
    let test = extra.join("test");
    fs::create_dir_all(&test).expect("create the guest's /test");
    fs::copy(guest_file("kernel-client.sh"), test.join("run.sh")).expect("copy the workflow");
    for pem in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        fs::copy(pki.path(pem), test.join(pem)).expect("copy a certificate");
    }
    let (port, tls_port) = (server.port(), tls_server.port());
    let sessions = format!(
        "file-netlink nbd0 {HOST} {port} -N disk\n\
         memory-ioctl nbd1 {HOST} {port} -N ram -L\n\
         file-multiconn nbd2 {HOST} {port} -N multi -C 4\n\
         file-tls nbd3 {HOST} {tls_port} -N tls -cacertfile /test/ca-cert.pem \
         -certfile /test/client-cert.pem -keyfile /test/client-key.pem -tlshostname localhost\n\
         file-blocksize-4096 nbd4 {HOST} {port} -N bs4k -b 4096\n"
    );
    fs::write(test.join("sessions"), &sessions).expect("write the sessions");
    let initramfs = kit.initramfs_with(&extra, &dir.path().join("initramfs"));

    let mut guest = Guest::boot(&kit, &initramfs, &user_network(), GUEST_TIMEOUT);
    guest.wait_for("nbd-guest: ready");
    let booted = guest.elapsed();
    let (_, console) = guest.wait_exit();
    let total = guest.elapsed();
    for line in console.lines().filter(|l| {
        l.starts_with("nbd-step") || l.starts_with("nbd-session") || l.starts_with("nbd-guest")
    }) {
        println!("{line}");
    }
    println!(
        "kernel {}: guest ready {} after QEMU started; five sessions and power-off done at {}",
        kit.version,
        seconds(booted),
        seconds(total)
    );
    for name in [
        "file-netlink",
        "memory-ioctl",
        "file-multiconn",
        "file-tls",
        "file-blocksize-4096",
    ] {
        assert!(
            console.contains(&format!("nbd-session {name} ok")),
            "session {name} failed in the guest\n{console}"
        );
    }
    assert!(
        console.contains("nbd-guest: result 0"),
        "guest result\n{console}"
    );
    assert!(
        console
            .contains("nbd-step file-blocksize-4096 connected: 131072 sectors, logical block 4096"),
        "-b 4096 gives a 4096-byte logical block\n{console}"
    );

    // The memory export is gone when the server stops: read it first.
    let ram_copy = dir.path().join("ram.img");
    run_ok(
        tool("nbdcopy").arg(server.uri_for("ram")).arg(&ram_copy),
        TIMEOUT,
    );
    server.stop();
    tls_server.stop();
    let log = server.stderr();
    let multi_connections = count_lines(&log, "export `multi` selected");
    println!("nbd-client -C 4: {multi_connections} connections selected export `multi`");
    assert_eq!(multi_connections, 4, "nbd-client -C 4\n{log}");
    assert!(
        count_lines(&tls_server.stderr(), "export `tls` selected") >= 1,
        "TLS session reached the export\n{}",
        tls_server.stderr()
    );

    for (session, image) in [
        ("file-netlink", &images[0].1),
        ("memory-ioctl", &ram_copy),
        ("file-multiconn", &images[1].1),
        ("file-blocksize-4096", &images[2].1),
        ("file-tls", &images[3].1),
    ] {
        let sums = guest_sums(&console, "nbd-sum", session);
        assert_eq!(sums.len(), 102, "{session}: files listed by the guest");
        assert_image_holds(image, &sums, session);
    }
}

#[test]
fn server_restart_under_a_mounted_filesystem() {
    let Some(kit) = GuestKit::prepare() else {
        return;
    };
    if !have_tools(&["e2fsck", "debugfs"]) {
        return;
    }
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    create_sparse_file(&image, DISK_SIZE);
    let export = [
        "--export".to_owned(),
        format!("disk=file:{}", image.display()),
    ];
    let mut server = Server::start(&export);
    let port = server.port();

    let extra = dir.path().join("extra");
    let test = extra.join("test");
    fs::create_dir_all(&test).expect("create the guest's /test");
    fs::copy(guest_file("restart.sh"), test.join("run.sh")).expect("copy the workflow");
    fs::write(test.join("client"), format!("{HOST} {port} -N disk\n")).expect("write");
    let initramfs = kit.initramfs_with(&extra, &dir.path().join("initramfs"));

    let mut guest = Guest::boot(&kit, &initramfs, &user_network(), GUEST_TIMEOUT);
    guest.wait_for("nbd-writer running");
    let stopped = Instant::now();
    server.stop();
    let mut restarted = Server::start_at(port, &export);
    println!(
        "server stopped (SIGTERM) and restarted on port {port} in {}",
        seconds(stopped.elapsed())
    );
    let (_, console) = guest.wait_exit();
    for line in console.lines().filter(|l| {
        (l.starts_with("nbd-") && !l.starts_with("nbd-synced")) || l.contains("block nbd0")
    }) {
        println!("{line}");
    }
    assert!(
        console.contains("nbd-guest: result 0"),
        "guest result\n{console}"
    );

    // What Debian's nbd-client 3.24 and kernel 6.1 do: the kernel fails
    // the requests in flight when the server closes the socket, and
    // returns from NBD_DO_IT without an error, which nbd-client takes as
    // "quit" even with -persist. The mounted filesystem does not survive.
    assert!(
        console.contains("nbd-writer error"),
        "the writer saw no I/O error (has the kernel client learnt to survive a restart? \
         update this test and docs/SERVER.md)\n{console}"
    );
    assert!(
        console.contains("nbd-client: Kernel call returned."),
        "nbd-client's exit after the server closed\n{console}"
    );
    assert!(
        console.contains("nbd-device answers again: no"),
        "-persist reconnected\n{console}"
    );
    // What survives: every file whose sync returned before the stop, once
    // the device is connected again and mounted (the journal replays).
    assert!(
        console.contains("nbd-reconnected by hand"),
        "reconnect after the restart\n{console}"
    );
    let reread = console
        .lines()
        .find(|l| l.starts_with("nbd-reread"))
        .unwrap_or_default();
    assert!(reread.starts_with("nbd-reread ok"), "{reread}\n{console}");
    let synced = guest_sums(&console, "nbd-synced", "");
    assert!(
        synced.len() >= 4,
        "files synced before the stop: {synced:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || restarted
            .stderr()
            .contains("client connected")),
        "the hand reconnection reached the restarted server"
    );
    restarted.stop();
    assert_image_holds(&image, &synced, "after the restart");
}

#[test]
fn vm_boots_from_an_export() {
    let Some(kit) = GuestKit::prepare() else {
        return;
    };
    if !have_tools(&["e2fsck", "debugfs"]) {
        return;
    }
    let dir = temp_dir();
    let root = dir.path().join("root.img");
    build_root_image(&root, "64M");
    let mut server = Server::start([
        "--export".to_owned(),
        format!("root=file:{}", root.display()),
    ]);

    let extra = dir.path().join("extra");
    let test = extra.join("test");
    fs::create_dir_all(&test).expect("create the guest's /test");
    fs::copy(guest_file("boot-root.sh"), test.join("pid1.sh")).expect("copy the boot script");
    let initramfs = kit.initramfs_with(&extra, &dir.path().join("initramfs"));
    let drive = format!(
        "file=nbd://127.0.0.1:{}/root,format=raw,if=virtio,cache=none",
        server.port()
    );
    let mut guest = Guest::boot(
        &kit,
        &initramfs,
        &[
            "-nic".to_owned(),
            "none".to_owned(),
            "-drive".to_owned(),
            drive,
        ],
        GUEST_TIMEOUT,
    );
    let mounted = guest.wait_for("nbd-root: mounted");
    let (_, console) = guest.wait_exit();
    println!("{mounted}");
    println!(
        "VM booted from nbd:// and powered off in {}",
        seconds(guest.elapsed())
    );
    assert!(
        mounted.contains("/dev/vda ext4"),
        "root filesystem is the NBD-backed virtio disk: {mounted}\n{console}"
    );
    assert!(
        console.contains("nbd-root: wrote /var/log/booted-from-nbd"),
        "{console}"
    );
    server.stop();
    run_ok(tool("e2fsck").arg("-fn").arg(&root), TIMEOUT);
    let file = run_ok(
        tool("debugfs")
            .args(["-R", "cat /var/log/booted-from-nbd"])
            .arg(&root),
        TIMEOUT,
    );
    assert!(
        file.stdout
            .contains("written by the guest booted from an NBD export"),
        "the guest's file in the image\n{}",
        file.describe()
    );
}
