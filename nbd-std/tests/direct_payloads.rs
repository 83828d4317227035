//! Large write payloads go from the socket straight into storage (into a
//! file in memory's pages through a mapping, into a memory export's own
//! pages) or through the input buffer (a file on disk, a partial 4 KiB
//! block held until the rest of it comes). Payloads arriving in
//! uneven pieces, at unaligned offsets, one after the other and mixed
//! with reads, must land exactly where they belong.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::thread;
use std::time::Duration;

use common::{
    CMD_DISC, CMD_READ, CMD_WRITE, Server, create_sparse_file, negotiate_export_name, random_bytes,
    read_simple_reply, request_bytes, temp_dir, write_random_file,
};

const SIZE: u64 = 4 << 20;

/// Sends `payload` in pieces of the given sizes (cycled), pausing after
/// each so the server finds the socket holding only part of it.
fn send_unevenly(stream: &mut impl Write, payload: &[u8], pieces: &[usize]) {
    let mut sent = 0;
    for &piece in pieces.iter().cycle() {
        if sent == payload.len() {
            break;
        }
        let end = (sent + piece).min(payload.len());
        stream.write_all(&payload[sent..end]).expect("send a piece");
        stream.flush().expect("flush");
        thread::sleep(Duration::from_millis(2));
        sent = end;
    }
}

#[test]
fn uneven_unaligned_payloads_land_intact_in_a_file() {
    write_unevenly_into_a_file_in(temp_dir().path());
}

#[test]
fn uneven_unaligned_payloads_land_intact_in_a_file_in_memory() {
    // tmpfs, where it is mounted (it is on Debian and in CI): payloads are
    // received into the file's pages through a mapping.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    write_unevenly_into_a_file_in(dir.path());
}

/// Serves a file made in `dir`, writes to it unevenly, and checks what
/// the file then holds.
fn write_unevenly_into_a_file_in(dir: &std::path::Path) {
    let image = dir.join("disk.img");
    create_sparse_file(&image, SIZE);
    let mut server = Server::start(["--export", &format!("disk=file:{}", image.display())]);
    let expected = write_unevenly_and_read_back(&mut server);
    server.stop();
    let file = std::fs::File::open(&image).expect("open image");
    let mut written = vec![0u8; SIZE as usize];
    file.read_exact_at(&mut written, 0).expect("read image");
    assert_same(&written, &expected, "the file");
}

#[test]
fn uneven_unaligned_payloads_land_intact_in_memory() {
    let mut server = Server::start(["--export", &format!("disk=memory:{SIZE}")]);
    write_unevenly_and_read_back(&mut server);
    server.stop();
}

/// Bytes the server process has had read from storage devices so far
/// (`read_bytes` of `/proc/PID/io`), or `None` where the kernel does not say.
fn bytes_read_from_disk(server: &Server) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.pid())).ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("read_bytes: "))
        .and_then(|value| value.trim().parse().ok())
}

#[test]
fn payload_split_inside_a_block_does_not_read_the_file_from_disk() {
    // Writing part of a file's block that is not in the page cache makes
    // the kernel read the block first. A payload arrives split wherever
    // the socket split it; stored in whole 512-byte sectors, a 256 KiB
    // request into a cold file cost a read from the disk at nearly every
    // split, and copying into such a file took twice nbdkit's time.
    let dir = temp_dir();
    let image = dir.path().join("disk.img");
    write_random_file(&image, SIZE, 11);
    let file = std::fs::File::open(&image).expect("open image");
    file.sync_all().expect("sync image");
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("evict image");
    let mut server = Server::start(["--export", &format!("disk=file:{}", image.display())]);
    let mut client = server.connect();
    negotiate_export_name(&mut client, "disk");

    // Whether reads from the disk show here at all (not on tmpfs, not
    // without the kernel's I/O accounting): a read of a cold range must.
    let Some(before_read) = bytes_read_from_disk(&server) else {
        eprintln!("skipped: /proc/PID/io has no read_bytes");
        return;
    };
    client
        .write_all(&request_bytes(CMD_READ, 1, 3 << 20, 65_536))
        .expect("send read");
    assert_eq!(read_simple_reply(&mut client).expect("reply"), (0, 1));
    let mut data = vec![0u8; 65_536];
    client.read_exact(&mut data).expect("read data");
    let Some(before_write) = bytes_read_from_disk(&server).filter(|&n| n > before_read) else {
        eprintln!("skipped: a read of an evicted range read nothing from a disk (tmpfs?)");
        return;
    };

    // Block-aligned writes whose payloads arrive in pieces that end
    // inside blocks (and inside sectors).
    let mut at = 0u64;
    for (cookie, pieces) in [
        &[300_000usize, 1, 77_777][..],
        &[4_095, 513, 200_000],
        &[65_000, 65_000, 65_000],
    ]
    .into_iter()
    .enumerate()
    {
        let length = 256 << 10;
        let payload = random_bytes(20 + cookie as u64, length);
        client
            .write_all(&request_bytes(
                CMD_WRITE,
                10 + cookie as u64,
                at,
                length as u32,
            ))
            .expect("send write header");
        send_unevenly(&mut client, &payload, pieces);
        assert_eq!(
            read_simple_reply(&mut client).expect("write reply"),
            (0, 10 + cookie as u64)
        );
        at += length as u64;
    }
    let after = bytes_read_from_disk(&server).expect("read_bytes");
    assert_eq!(
        after - before_write,
        0,
        "storing block-aligned writes read the file from the disk"
    );
    client
        .write_all(&request_bytes(CMD_DISC, 99, 0, 0))
        .expect("send disconnect");
    drop(client);
    server.stop();
}

fn assert_same(stored: &[u8], expected: &[u8], what: &str) {
    let first_difference = stored.iter().zip(expected).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "{what} differs from what was written"
    );
}

/// Sends writes in every shape the direct paths must handle, checks what
/// the export then reads back, and returns what it holds.
fn write_unevenly_and_read_back(server: &mut Server) -> Vec<u8> {
    let mut client = server.connect();
    negotiate_export_name(&mut client, "disk");

    let mut expected = vec![0u8; SIZE as usize];
    // (offset, length, piece sizes): unaligned starts and ends, pieces
    // that split sectors anywhere, one piece smaller than a sector.
    let writes: [(u64, u32, &[usize]); 4] = [
        (4097, 300_001, &[777, 5000, 12_345, 100, 65_536, 511]),
        (1 << 20, 1 << 20, &[200_000, 1, 300_000]),
        (3_000_003, 70_000, &[70_000]),
        (2_500_000, 131_072, &[513, 4096, 100_000]),
    ];
    for (cookie, (offset, length, pieces)) in writes.into_iter().enumerate() {
        let payload = random_bytes(cookie as u64 + 7, length as usize);
        client
            .write_all(&request_bytes(CMD_WRITE, cookie as u64, offset, length))
            .expect("send write header");
        send_unevenly(&mut client, &payload, pieces);
        let reply = read_simple_reply(&mut client).expect("write reply");
        assert_eq!(reply, (0, cookie as u64), "write {cookie}");
        expected[offset as usize..offset as usize + payload.len()].copy_from_slice(&payload);
    }

    // The header and the payload's first bytes arrive together, ending
    // inside a sector: the rest of that sector is read on its own, then
    // the direct path takes over (in a file; in memory, it takes over at
    // once). (A read first: after a payload taken directly the server reads
    // one header alone, and this header must come with the bytes.)
    client
        .write_all(&request_bytes(CMD_READ, 49, 0, 512))
        .expect("send read");
    assert_eq!(read_simple_reply(&mut client).expect("reply"), (0, 49));
    let mut data = [0u8; 512];
    client.read_exact(&mut data).expect("read data");
    let payload = random_bytes(50, 150_000);
    let mut start = request_bytes(CMD_WRITE, 50, 600_003, 150_000).to_vec();
    start.extend_from_slice(&payload[..1_000]);
    client
        .write_all(&start)
        .expect("send header and first bytes");
    thread::sleep(Duration::from_millis(20));
    send_unevenly(&mut client, &payload[1_000..], &[300, 40_000, 7]);
    assert_eq!(read_simple_reply(&mut client).expect("reply"), (0, 50));
    expected[600_003..750_003].copy_from_slice(&payload);

    // Two large writes and a read sent at once: the second write's header
    // is read alone after the first payload, its payload left for the direct path.
    let first = random_bytes(100, 200_000);
    let second = random_bytes(101, 100_000);
    let mut burst = request_bytes(CMD_WRITE, 10, 5, 200_000).to_vec();
    burst.extend_from_slice(&first);
    burst.extend_from_slice(&request_bytes(CMD_WRITE, 11, 200_005, 100_000));
    burst.extend_from_slice(&second);
    burst.extend_from_slice(&request_bytes(CMD_READ, 12, 0, 512));
    client.write_all(&burst).expect("send burst");
    expected[5..200_005].copy_from_slice(&first);
    expected[200_005..300_005].copy_from_slice(&second);
    for cookie in [10, 11] {
        assert_eq!(read_simple_reply(&mut client).expect("reply"), (0, cookie));
    }
    assert_eq!(read_simple_reply(&mut client).expect("reply"), (0, 12));
    let mut data = [0u8; 512];
    client.read_exact(&mut data).expect("read data");
    assert_eq!(&data[..], &expected[..512]);

    // A client keeping large writes in flight (each write's next request
    // already sent when its payload ends), then one waiting for each
    // reply, and back: the server reads batches of requests, then one
    // header at a time. Unaligned, so sectors are shared between
    // neighbours in both ways and across the change.
    let mut cookie = 200;
    let mut at = 1_234_567u64;
    for (round, in_flight) in [4usize, 4, 4, 1, 1, 1, 4, 1].into_iter().enumerate() {
        let mut burst = Vec::new();
        let mut cookies = Vec::new();
        for _ in 0..in_flight {
            let length = 70_001 + 4_099 * (cookie % 7) as u32;
            let payload = random_bytes(cookie, length as usize);
            burst.extend_from_slice(&request_bytes(CMD_WRITE, cookie, at, length));
            burst.extend_from_slice(&payload);
            expected[at as usize..at as usize + payload.len()].copy_from_slice(&payload);
            cookies.push(cookie);
            cookie += 1;
            at = (at + u64::from(length) - 333) % (SIZE - 200_000);
        }
        if round % 2 == 0 {
            client.write_all(&burst).expect("send writes");
        } else {
            send_unevenly(&mut client, &burst, &[40_000, 511, 123_457]);
        }
        for cookie in cookies {
            assert_eq!(
                read_simple_reply(&mut client).expect("reply"),
                (0, cookie),
                "write {cookie} of round {round}"
            );
        }
    }

    const READ_BACK: u32 = 256 << 10;
    let mut read_back = vec![0u8; SIZE as usize];
    for (cookie, chunk) in read_back.chunks_mut(READ_BACK as usize).enumerate() {
        let offset = cookie as u64 * u64::from(READ_BACK);
        client
            .write_all(&request_bytes(
                CMD_READ,
                1000 + cookie as u64,
                offset,
                READ_BACK,
            ))
            .expect("send read back");
        assert_eq!(
            read_simple_reply(&mut client).expect("reply"),
            (0, 1000 + cookie as u64)
        );
        client.read_exact(chunk).expect("read back data");
    }
    assert_same(&read_back, &expected, "the export");

    client
        .write_all(&request_bytes(CMD_DISC, 99, 0, 0))
        .expect("send disconnect");
    drop(client);
    expected
}
