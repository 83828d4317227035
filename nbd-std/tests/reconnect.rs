//! Clients that survive a server restart: `nbd_std::client` reconnects
//! when its connection breaks and sends the requests not yet answered
//! again. The server is stopped with SIGTERM (it answers what is in flight
//! and closes) or SIGKILL, and started again on the same port and file.
//! Also: the wait is bounded (`reconnect-timeout`), `reconnect-timeout=0`
//! turns reconnecting off, and an export that changed across the restart
//! is an error, not silent corruption. The restart under `nbd-std mount`
//! with ext4 on it is in `client_mount.rs`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, assert_same_content, runtime, server_binary, temp_dir, write_random_file};
use nbd_std::client::{Client, Error};

const MIB: u64 = 1 << 20;
/// How long a copy may take, restarts included.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// `nbd-std serve` exporting `file` as `d`, on `port` when given.
fn serve_file(file: &Path, port: Option<u16>) -> Server {
    let export = format!("d=file:{}", file.display());
    match port {
        Some(port) => Server::start_at(port, ["--export", &export]),
        None => Server::start(["--export", &export]),
    }
}

/// Stops `server` with `signal` and starts it again on the same port and
/// file; panics if the old one does not exit.
fn restart(server: &mut Server, file: &Path, signal: &str) -> Server {
    let status = server.signal_and_wait(signal, Duration::from_secs(30));
    assert!(status.is_some(), "server still running after SIG{signal}");
    if signal == "TERM" {
        assert!(
            status.is_some_and(|status| status.success()),
            "server exited {status:?} after SIGTERM\n{}",
            server.describe()
        );
    }
    serve_file(file, Some(server.port()))
}

/// Blocks allocated to `path`, in bytes.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.blocks() * 512)
}

/// Waits until `progress()` reaches `at` bytes while `copy` runs; panics
/// if the copy ends first (the restart would test nothing).
fn wait_for_progress(copy: &mut Child, at: u64, progress: impl Fn() -> u64) {
    let deadline = Instant::now() + COPY_TIMEOUT;
    while progress() < at {
        if let Some(status) = copy.try_wait().expect("poll nbd-std cp") {
            panic!("nbd-std cp ended ({status}) before {at} bytes were copied");
        }
        assert!(Instant::now() < deadline, "nbd-std cp made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `copy` to exit and returns its status and standard error.
fn finish(mut copy: Child, log: &Path) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + COPY_TIMEOUT;
    loop {
        if let Some(status) = copy.try_wait().expect("poll nbd-std cp") {
            return (status, common::read_log(log));
        }
        if Instant::now() > deadline {
            let _ = copy.kill();
            let _ = copy.wait();
            panic!("nbd-std cp still running after {COPY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_copy(source: &str, destination: &str, log: &Path) -> Child {
    Command::new(server_binary())
        .args(["cp", source, destination])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("create cp log"))
        .spawn()
        .expect("start nbd-std cp")
}

/// `nbd-std cp` of a large image to an export and back, the server
/// stopped and started again twice during each copy (SIGTERM, then
/// SIGKILL during the download): both copies succeed and the bytes are
/// right.
#[test]
fn cp_survives_server_restarts() {
    let size = common::env_u64("NBD_RECONNECT_IMAGE_MIB", 384) * MIB;
    let dir = temp_dir();
    let image = dir.path().join("image");
    let disk = dir.path().join("disk");
    let back = dir.path().join("back");
    write_random_file(&image, size, 13);
    let file = std::fs::File::create(&disk).expect("create export file");
    file.set_len(size).expect("size export file");
    drop(file);

    let mut server = serve_file(&disk, None);
    let uri = server.uri_for("d");
    let log = dir.path().join("upload.log");
    let mut upload = start_copy(&image.display().to_string(), &uri, &log);
    wait_for_progress(&mut upload, size / 5, || allocated(&disk));
    let mut server2 = restart(&mut server, &disk, "TERM");
    wait_for_progress(&mut upload, size / 2, || allocated(&disk));
    let mut server = restart(&mut server2, &disk, "TERM");
    let (status, stderr) = finish(upload, &log);
    assert!(status.success(), "upload failed ({status}): {stderr}");
    assert!(
        stderr.contains("reconnecting"),
        "the upload did not see the restarts: {stderr}"
    );
    assert_same_content(&image, &disk);

    let log = dir.path().join("download.log");
    let mut download = start_copy(&uri, &back.display().to_string(), &log);
    wait_for_progress(&mut download, size / 5, || allocated(&back));
    let mut server2 = restart(&mut server, &disk, "KILL");
    wait_for_progress(&mut download, size / 2, || allocated(&back));
    let _server = restart(&mut server2, &disk, "TERM");
    let (status, stderr) = finish(download, &log);
    assert!(status.success(), "download failed ({status}): {stderr}");
    assert_same_content(&image, &back);
}

/// A request made while the server is down waits for it, and is answered
/// by the restarted server.
#[test]
fn requests_wait_for_the_restarted_server() {
    let dir = temp_dir();
    let disk = dir.path().join("disk");
    write_random_file(&disk, 16 * MIB, 7);
    let expected = std::fs::read(&disk).expect("read export file");
    let mut server = serve_file(&disk, None);
    let uri = format!("{}?reconnect-timeout=30", server.uri_for("d"));
    runtime().block_on(async {
        let client = Client::connect(&uri).await.expect("connect");
        let status = server.signal_and_wait("TERM", Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}");
        let reader = client.clone();
        let read = tokio::spawn(async move {
            let mut buf = vec![0u8; (4 * MIB) as usize];
            reader.read_at(&mut buf, 3 * MIB).await.map(|()| buf)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!read.is_finished(), "the read did not wait for the server");
        let _server = serve_file(&disk, Some(server.port()));
        let buf = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the read waits no longer than the restart")
            .expect("read task")
            .expect("read after the restart");
        assert!(buf[..] == expected[3 << 20..7 << 20], "read data differs");
        client.write_at(b"after", 0).await.expect("write");
        client.flush().await.expect("flush");
        client.disconnect().await.expect("disconnect");
    });
    assert_eq!(&std::fs::read(&disk).expect("read back")[..5], b"after");
}

/// A server that never comes back: the request fails with a clear error
/// once it has waited `reconnect-timeout`, not before and not much after;
/// with `reconnect-timeout=0` it fails at once.
#[test]
fn the_wait_is_bounded() {
    let dir = temp_dir();
    let disk = dir.path().join("disk");
    write_random_file(&disk, MIB, 3);
    let mut server = serve_file(&disk, None);
    let bounded = format!("{}?reconnect-timeout=2", server.uri_for("d"));
    let off = format!("{}?reconnect-timeout=0", server.uri_for("d"));
    runtime().block_on(async {
        let bounded = Client::connect(&bounded).await.expect("connect");
        let off = Client::connect(&off).await.expect("connect");
        server.stop();
        let mut buf = vec![0u8; 4096];

        let started = Instant::now();
        let error = off
            .read_at(&mut buf, 0)
            .await
            .expect_err("read without server");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "reconnect-timeout=0 waited {:?}",
            started.elapsed()
        );
        assert!(
            !matches!(error, Error::ReconnectFailed { .. }),
            "reconnect-timeout=0 tried to reconnect: {error}"
        );

        let started = Instant::now();
        let error = bounded
            .read_at(&mut buf, 0)
            .await
            .expect_err("read without server");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
            "waited {waited:?} with reconnect-timeout=2"
        );
        assert!(
            matches!(error, Error::ReconnectFailed { .. }),
            "not a reconnect error: {error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("reconnecting failed for 2 s")
                && message.contains("Connection refused"),
            "{message}"
        );
        // Later requests fail at once with the same error.
        let started = Instant::now();
        let again = bounded.read_at(&mut buf, 0).await.expect_err("read again");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(again.to_string(), message);
    });
}

/// The export came back smaller: the waiting request fails, naming the
/// change, instead of being sent to an export it no longer fits.
#[test]
fn a_changed_export_is_an_error() {
    let dir = temp_dir();
    let disk = dir.path().join("disk");
    write_random_file(&disk, 8 * MIB, 5);
    let mut server = serve_file(&disk, None);
    let uri = format!("{}?reconnect-timeout=20", server.uri_for("d"));
    runtime().block_on(async {
        let client = Client::connect(&uri).await.expect("connect");
        server.stop();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open export file");
        file.set_len(4 * MIB).expect("shrink export file");
        let _server = serve_file(&disk, Some(server.port()));
        let mut buf = vec![0u8; 4096];
        let error = tokio::time::timeout(Duration::from_secs(20), client.read_at(&mut buf, 0))
            .await
            .expect("the read ends")
            .expect_err("read from a changed export");
        let message = error.to_string();
        assert!(
            matches!(error, Error::ExportChanged { .. })
                && message.contains("size went from 8388608 to 4194304 bytes"),
            "{message}"
        );
    });
}

/// SIGTERM waits for requests in flight, but not forever: a client that
/// stops halfway through a write's payload is dropped after
/// `--drain-timeout`, and the server exits 0.
#[test]
fn the_drain_is_bounded() {
    use std::io::Write;

    let mut server = Server::start(["--size", "16M", "--drain-timeout", "1"]);
    let mut stalled = server.connect();
    common::negotiate_export_name(&mut stalled, "");
    let header = common::request_bytes(common::CMD_WRITE, 1, 0, 1 << 20);
    stalled.write_all(&header).expect("write header");
    stalled
        .write_all(&[7u8; 4096])
        .expect("part of the payload");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let status = server.signal_and_wait("TERM", Duration::from_secs(15));
    let waited = started.elapsed();
    assert!(
        status.is_some_and(|status| status.success()),
        "server after SIGTERM: {status:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(6),
        "SIGTERM took {waited:?} with --drain-timeout 1"
    );
    assert!(
        server.stderr().contains("still busy after"),
        "{}",
        server.stderr()
    );
}
