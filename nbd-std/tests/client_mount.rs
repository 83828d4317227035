//! `nbd-std mount`: the filesystem workflow on an export mounted as a file
//! through FUSE. mkfs.ext4 on the mounted file; `fuse2fs -o fakeroot`
//! mounts the ext4 inside (no kernel ext4 needed); files are written;
//! everything is unmounted (`fusermount3 -u`); `e2fsck -fn` finds the
//! filesystem clean; the export is mounted again (and stopped with
//! SIGTERM this time) and the files read back; a copy of the export taken
//! afterwards is clean too, so the data lives on the server.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fuse::{Mounted, can_use_fuse, is_mounted, mount_export};
use common::{Server, have_tools, run, run_ok, server_binary, temp_dir, tool, wait_until};

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

fn unmount(path: &Path) {
    run_ok(tool("fusermount3").arg("-u").arg(path), TIMEOUT);
}

fn fuse2fs(image: &Path, dir: &Path, options: &str, log: PathBuf) -> Mounted {
    let mut command = tool("fuse2fs");
    command.arg("-f").arg("-o").arg(options).arg(image).arg(dir);
    Mounted::start(command, dir, log)
}

fn files() -> Vec<(&'static str, Vec<u8>)> {
    let mut random = vec![0u8; (8 * MIB) as usize];
    common::Random::new(5).fill(&mut random);
    vec![
        ("hello.txt", b"hello through NBD and FUSE\n".to_vec()),
        ("data/random.bin", random),
        ("data/empty", Vec::new()),
    ]
}

#[test]
fn ext4_on_a_mounted_export() {
    if !have_tools(&["fusermount3", "fuse2fs", "mkfs.ext4", "e2fsck"]) || !can_use_fuse() {
        return;
    }
    let server = Server::start(["--size", "256M"]);
    let uri = server.uri();
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fs_dir).expect("create fs dir");
    let log = |name: &str| dir.path().join(name);

    // Mount (the mount point file is created), make a filesystem on it.
    let nbd_mount = mount_export(&uri, &image, log("mount1.log"));
    assert_eq!(
        std::fs::metadata(&image).expect("stat").len(),
        256 * MIB,
        "the mounted file has the export's size"
    );
    run_ok(tool("mkfs.ext4").args(["-F", "-q"]).arg(&image), TIMEOUT);

    // Files inside, through fuse2fs.
    let ext4 = fuse2fs(&image, &fs_dir, "fakeroot", log("fuse2fs1.log"));
    assert!(is_mounted(&fs_dir));
    std::fs::create_dir(fs_dir.join("data")).expect("mkdir");
    for (name, content) in files() {
        let mut file = File::create(fs_dir.join(name)).expect("create file");
        file.write_all(&content).expect("write file");
        file.sync_all().expect("fsync file");
    }
    unmount(&fs_dir);
    assert!(ext4.wait_exit().success(), "fuse2fs failed");

    let fsck = run(tool("e2fsck").arg("-fn").arg(&image), TIMEOUT);
    assert_eq!(
        fsck.code(),
        Some(0),
        "filesystem not clean\n{}",
        fsck.describe()
    );

    // fusermount3 -u ends the mount command, which exits 0.
    unmount(&image);
    let status = nbd_mount.wait_exit();
    assert!(status.success(), "nbd-std mount exited {status}");
    assert!(!is_mounted(&image));

    // Mount again, read the files back, stop with SIGTERM.
    let nbd_mount = mount_export(&uri, &image, log("mount2.log"));
    let ext4 = fuse2fs(&image, &fs_dir, "ro,fakeroot", log("fuse2fs2.log"));
    for (name, content) in files() {
        let back = std::fs::read(fs_dir.join(name)).expect("read file back");
        assert!(back == content, "{name} differs after remounting");
    }
    unmount(&fs_dir);
    assert!(ext4.wait_exit().success(), "fuse2fs failed");
    common::send_signal(nbd_mount.pid(), "TERM");
    let status = nbd_mount.wait_exit();
    assert!(
        status.success(),
        "nbd-std mount exited {status} after SIGTERM"
    );
    assert!(!is_mounted(&image), "still mounted after SIGTERM");

    // The data is on the server: a copy of the export is a clean ext4.
    let copy = dir.path().join("copy.img");
    run_ok(
        Command::new(server_binary()).arg("cp").arg(&uri).arg(&copy),
        TIMEOUT,
    );
    let fsck = run(tool("e2fsck").arg("-fn").arg(&copy), TIMEOUT);
    assert_eq!(fsck.code(), Some(0), "copy not clean\n{}", fsck.describe());
}

#[test]
fn mount_errors_are_one_line() {
    let dir = temp_dir();
    let port = common::free_port();
    let out = run(
        Command::new(server_binary())
            .arg("mount")
            .arg(format!("nbd://127.0.0.1:{port}/"))
            .arg(dir.path().join("x")),
        TIMEOUT,
    );
    assert!(!out.success());
    let line = out.stderr.trim_end();
    assert!(
        !line.contains('\n')
            && line.starts_with("nbd-std: mount: ")
            && line.contains("cannot connect"),
        "{}",
        out.describe()
    );
    // A directory is not a file to mount on.
    let server = Server::start(["--size", "1M"]);
    let out = run(
        Command::new(server_binary())
            .arg("mount")
            .arg(server.uri())
            .arg(dir.path()),
        TIMEOUT,
    );
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.trim_end().lines().count() == 1 && out.stderr.starts_with("nbd-std: mount: "),
        "{}",
        out.describe()
    );
}

/// File `index` of the restart test's writer.
fn writer_file(index: u64) -> (String, Vec<u8>) {
    let mut content = vec![0u8; (2 * MIB) as usize];
    common::Random::new(100 + index).fill(&mut content);
    (format!("w/file-{index}"), content)
}

/// The server restarted (SIGTERM, then started again on the same port and
/// file) twice under a running `nbd-std mount` with ext4 on it while a
/// writer writes and fsyncs files through fuse2fs: no write fails, the
/// mount lives on, `e2fsck -fn` finds the filesystem clean through the
/// mount and on the server's file, and every file reads back right from
/// the server's file.
#[test]
fn ext4_survives_server_restarts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    if !have_tools(&["fusermount3", "fuse2fs", "mkfs.ext4", "e2fsck"]) || !can_use_fuse() {
        return;
    }
    let dir = temp_dir();
    let disk = dir.path().join("disk");
    File::create(&disk)
        .and_then(|file| file.set_len(128 * MIB))
        .expect("create export file");
    let export = format!("d=file:{}", disk.display());
    let mut server = Server::start(["--export", &export]);
    let port = server.port();
    let uri = server.uri_for("d");
    let image = dir.path().join("image");
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fs_dir).expect("create fs dir");
    let log = |name: &str| dir.path().join(name);

    let mut command = Command::new(server_binary());
    command.arg("mount").arg(&uri).arg(&image);
    command.env("RUST_LOG", "warn,nbd_std::client=info");
    let mut nbd_mount = Mounted::start(command, &image, log("mount.log"));
    run_ok(tool("mkfs.ext4").args(["-F", "-q"]).arg(&image), TIMEOUT);
    let ext4 = fuse2fs(&image, &fs_dir, "fakeroot", log("fuse2fs.log"));
    std::fs::create_dir(fs_dir.join("w")).expect("mkdir");

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, fs_dir) = (Arc::clone(&stop), Arc::clone(&written), fs_dir.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut index = 0;
            while !stop.load(Ordering::Relaxed) && index < 40 {
                let (name, content) = writer_file(index);
                let mut file = File::create(fs_dir.join(name))?;
                file.write_all(&content)?;
                file.sync_all()?;
                index += 1;
                written.store(index, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let wait_for_files = |count: u64| {
        let done = wait_until(TIMEOUT, || {
            written.load(Ordering::Relaxed) >= count || writer.is_finished()
        });
        assert!(
            done && !writer.is_finished(),
            "the writer stopped at {} files",
            written.load(Ordering::Relaxed)
        );
    };
    for files in [3, 6] {
        wait_for_files(files);
        server.stop();
        server = Server::start_at(port, ["--export", &export]);
        assert!(nbd_mount.try_exit().is_none(), "nbd-std mount ended");
    }
    wait_for_files(9);
    stop.store(true, Ordering::Relaxed);
    writer
        .join()
        .expect("writer thread")
        .expect("a write through the mount failed");
    let files = written.load(Ordering::Relaxed);
    unmount(&fs_dir);
    assert!(ext4.wait_exit().success(), "fuse2fs failed");

    let fsck = run(tool("e2fsck").arg("-fn").arg(&image), TIMEOUT);
    assert_eq!(fsck.code(), Some(0), "not clean\n{}", fsck.describe());
    unmount(&image);
    let status = nbd_mount.wait_exit();
    assert!(status.success(), "nbd-std mount exited {status}");
    let log = std::fs::read_to_string(log("mount.log")).unwrap_or_default();
    assert!(log.contains("reconnected"), "no reconnection logged: {log}");
    server.stop();

    // What the server stored: clean, every file right.
    let fsck = run(tool("e2fsck").arg("-fn").arg(&disk), TIMEOUT);
    assert_eq!(fsck.code(), Some(0), "not clean\n{}", fsck.describe());
    let ext4 = fuse2fs(
        &disk,
        &fs_dir,
        "ro,fakeroot",
        dir.path().join("fuse2fs2.log"),
    );
    for index in 0..files {
        let (name, content) = writer_file(index);
        let back = std::fs::read(fs_dir.join(&name)).expect("read file back");
        assert!(back == content, "{name} differs on the server");
    }
    unmount(&fs_dir);
    assert!(ext4.wait_exit().success(), "fuse2fs failed");
}
