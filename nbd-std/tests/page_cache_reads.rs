//! Reads of a file export that the server sends straight from the page
//! cache (`sendfile`, for a read the client waits for alone, over a plain
//! socket): the bytes must be the file's, at any offset and length around
//! the size where the server starts doing so, after writes through the
//! server, after writes to the file behind its back and after the file
//! left the page cache; over TCP and over a unix socket, on a disk file
//! and on a file in memory.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{Server, random_bytes, runtime, temp_dir, write_random_file};
use nbd_std::client::Client;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// (offset, length) pairs read one at a time: around 64 KiB (the
/// smallest read sent from the page cache), unaligned, whole MiBs, up to
/// the export's end, and larger than the socket's buffer.
const READS: &[(u64, u64)] = &[
    (0, MIB),
    (12_345, 65_536),
    (65_536, 65_535),
    (3 * MIB + 1, 65_537),
    (5 * MIB - 7, MIB + 4_099),
    (SIZE - 3 * MIB - 512, 3 * MIB + 512),
    (7 * MIB, 8 * MIB),
];

fn expected(path: &Path, offset: u64, length: u64) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("open the image");
    let mut bytes = vec![0u8; length as usize];
    file.read_exact_at(&mut bytes, offset)
        .expect("read the image");
    bytes
}

/// Reads `READS` one at a time and compares each with the file.
async fn check_reads(client: &Client, image: &Path, round: &str) {
    for &(offset, length) in READS {
        let got = client
            .read_owned(vec![0u8; length as usize], offset)
            .await
            .unwrap_or_else(|e| panic!("{round}: read {length} at {offset}: {e}"));
        assert!(
            got == expected(image, offset, length),
            "{round}: read of {length} bytes at {offset} differs from the file"
        );
    }
}

/// The whole conversation against one server.
fn conversation(uri: &str, image: &Path) {
    runtime().block_on(async {
        let client = Client::connect(uri).await.expect("connect");
        check_reads(&client, image, "fresh file").await;

        // Written through the server: a read right after sees it.
        let written = random_bytes(7, 2 * MIB as usize + 100);
        client
            .write_at(&written, 2 * MIB - 50)
            .await
            .expect("write");
        let got = client
            .read_owned(vec![0u8; written.len()], 2 * MIB - 50)
            .await
            .expect("read back");
        assert!(got == written, "a write is not read back");
        check_reads(&client, image, "after a write through the server").await;

        // Written to the file behind the server's back (another program
        // sharing the image): the page cache is the file, reads see it.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .expect("open the image for writing");
        file.write_all_at(&random_bytes(8, MIB as usize), 5 * MIB)
            .expect("write the image");
        check_reads(&client, image, "after a write to the file").await;

        // Evicted from the page cache: read from the disk again.
        file.sync_all().expect("sync the image");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        check_reads(&client, image, "after eviction").await;
        client.disconnect().await.expect("disconnect");
    });
}

fn image_in(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("disk.img");
    write_random_file(&image, SIZE, 3);
    image
}

#[test]
fn reads_over_tcp_are_the_files_bytes() {
    let dir = temp_dir();
    let image = image_in(dir.path());
    let server = Server::start(["--export".to_owned(), format!("d=file:{}", image.display())]);
    conversation(&server.uri_for("d"), &image);
}

#[test]
fn reads_over_a_unix_socket_are_the_files_bytes() {
    let dir = temp_dir();
    let image = image_in(dir.path());
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(
        &socket,
        ["--export".to_owned(), format!("d=file:{}", image.display())],
    );
    conversation(&server.uri_for("d"), &image);
}

#[test]
fn reads_of_a_file_in_memory_are_the_files_bytes() {
    // tmpfs, where it is mounted (Debian and CI): no cache check there.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let image = image_in(dir.path());
    let server = Server::start(["--export".to_owned(), format!("d=file:{}", image.display())]);
    conversation(&server.uri_for("d"), &image);
}
