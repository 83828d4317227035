//! The client library (`nbd_std::client`) against four servers: `nbd-std
//! serve`, `nbdkit memory`, `qemu-nbd` (raw file) and Debian's
//! `nbd-server`. The same conversation runs against each: list, info,
//! connect (several connections where multi-conn is offered), writes and
//! reads at unaligned offsets from many tasks at once (one larger than the
//! maximum block size), zeroing, trim, flush, block status; the export's
//! whole content must come out the same from every server.

mod common;
mod peers;

use std::sync::Arc;

use common::{Server, have_tools, random_bytes, runtime};
use nbd_core::wire::ErrorCode;
use nbd_std::client::{Client, Error, NbdUri, ZeroOptions, export_info, list_exports};
use peers::Peer;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A hash of the bytes, to compare exports without keeping them (std's
/// hasher: optimised code even in test builds).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// What a server is expected to offer.
struct Expect {
    export: &'static str,
    block_status: bool,
    /// `NBD_OPT_INFO` reports the real size (nbd-server reports 0).
    info_size: bool,
}

/// Reads the whole export in 1 MiB pieces from 16 tasks at once.
async fn read_all(client: &Client) -> Vec<u8> {
    let mut tasks = Vec::new();
    let pieces = SIZE / MIB;
    for task in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut piece = task;
            while piece < pieces {
                let buf = client
                    .read_owned(vec![0u8; MIB as usize], piece * MIB)
                    .await
                    .expect("read 1 MiB");
                out.push((piece, buf));
                piece += 16;
            }
            out
        }));
    }
    let mut whole = vec![0u8; SIZE as usize];
    for task in tasks {
        for (piece, buf) in task.await.expect("reader task") {
            let at = (piece * MIB) as usize;
            whole[at..at + MIB as usize].copy_from_slice(&buf);
        }
    }
    whole
}

/// The conversation; returns the digest of the final content.
async fn exercise(name: &str, uri: &str, expect: &Expect) -> u64 {
    let parsed = NbdUri::parse(uri).expect("URI");

    let listed = list_exports(&parsed).await.expect("list exports");
    assert!(
        listed.iter().any(|e| e.name == expect.export),
        "{name}: {:?} not in {listed:?}",
        expect.export
    );
    let described = export_info(&parsed).await.expect("export info");
    if expect.info_size {
        assert_eq!(described.size(), SIZE, "{name}: size from NBD_OPT_INFO");
    }

    let client = Client::connect_many(uri, 4).await.expect("connect");
    let info = client.info();
    assert_eq!(client.size(), SIZE, "{name}: size");
    assert!(!info.export.is_read_only(), "{name}");
    let expected_connections = if info.export.can_multi_conn() { 4 } else { 1 };
    assert_eq!(client.connections(), expected_connections, "{name}");
    assert_eq!(client.can_block_status(), expect.block_status, "{name}");

    let mut model = vec![0u8; SIZE as usize];
    // Unaligned writes from many tasks at once; the last is larger than
    // the 32 MiB maximum block size and must be split.
    let writes: [(u64, usize); 6] = [
        (1, 100_003),
        (204_799, 2),
        (MIB + 17, 3 * 65536 + 5),
        (5 * MIB - 3, 7),
        (SIZE - 5, 5),
        (10 * MIB + 1, (40 * MIB + 11) as usize),
    ];
    let mut tasks = Vec::new();
    for (seed, &(offset, len)) in writes.iter().enumerate() {
        let data = random_bytes(seed as u64 + 1, len);
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        let client = client.clone();
        tasks.push(tokio::spawn(
            async move { client.write_at(&data, offset).await },
        ));
    }
    for task in tasks {
        task.await.expect("writer task").expect("write");
    }
    // Small unaligned reads across the edges of what was written.
    for &(offset, len) in &writes {
        let start = offset.saturating_sub(3);
        let end = (offset + len as u64 + 3).min(SIZE);
        let mut buf = vec![0xa5u8; (end - start) as usize];
        client.read_at(&mut buf, start).await.expect("read back");
        assert!(
            buf == model[start as usize..end as usize],
            "{name}: read at {start} differs"
        );
    }

    // Zeroing, unaligned, with and without NO_HOLE.
    client
        .zero(3 * MIB + 5, 1000, ZeroOptions::default())
        .await
        .expect("zero");
    model[(3 * MIB + 5) as usize..(3 * MIB + 1005) as usize].fill(0);
    let no_hole = ZeroOptions {
        no_hole: true,
        ..ZeroOptions::default()
    };
    client
        .zero(20 * MIB, 2 * MIB + 1, no_hole)
        .await
        .expect("zero, no hole");
    model[(20 * MIB) as usize..(22 * MIB + 1) as usize].fill(0);
    // Fast zeroing: done, or refused with NBD_ENOTSUP and then done slowly.
    let fast = ZeroOptions {
        fast: true,
        ..ZeroOptions::default()
    };
    match client.zero(30 * MIB, MIB, fast).await {
        Ok(()) => {}
        Err(Error::Unsupported(_)) => assert!(!info.export.can_fast_zero()),
        Err(error) => {
            assert_eq!(
                error.nbd_error(),
                Some(ErrorCode::NotSupported),
                "{name}: fast zero: {error}"
            );
        }
    }
    client
        .zero(30 * MIB, MIB, ZeroOptions::default())
        .await
        .expect("zero");
    model[(30 * MIB) as usize..(31 * MIB) as usize].fill(0);
    let mut buf = vec![0xffu8; 1010];
    client
        .read_at(&mut buf, 3 * MIB)
        .await
        .expect("read zeroes");
    assert_eq!(buf, model[(3 * MIB) as usize..(3 * MIB + 1010) as usize]);

    // Trim: content unspecified after, so the range is written again.
    if info.export.can_trim() {
        client.trim(60 * MIB, 2 * MIB).await.expect("trim");
    } else {
        assert!(matches!(
            client.trim(60 * MIB, 2 * MIB).await,
            Err(Error::Unsupported(_))
        ));
    }
    let data = random_bytes(99, (2 * MIB) as usize);
    client.write_at(&data, 60 * MIB).await.expect("rewrite");
    model[(60 * MIB) as usize..(62 * MIB) as usize].copy_from_slice(&data);
    if info.export.can_flush() {
        client.flush().await.expect("flush");
    }
    if info.export.can_cache() {
        client.cache(0, MIB).await.expect("cache");
    }

    if expect.block_status {
        let extents = client.block_status(0, SIZE).await.expect("block status");
        let mut at = 0;
        for extent in &extents {
            assert_eq!(extent.offset, at, "{name}: extents contiguous: {extents:?}");
            assert!(extent.length > 0);
            at = extent.end();
        }
        assert_eq!(at, SIZE, "{name}: extents cover the export");
        let at_offset = |offset: u64| {
            extents
                .iter()
                .find(|e| e.offset <= offset && offset < e.end())
                .copied()
                .expect("extent")
        };
        assert!(
            !at_offset(1).is_zero(),
            "{name}: written data reported as zero"
        );
        assert!(
            at_offset(56 * MIB).is_zero(),
            "{name}: untouched range not reported as zero: {extents:?}"
        );
        // A range in the middle: cut to the range.
        let part = client
            .block_status(MIB + 1, 4096)
            .await
            .expect("block status of a small range");
        assert_eq!(part.first().map(|e| e.offset), Some(MIB + 1));
        assert_eq!(part.last().map(|e| e.end()), Some(MIB + 1 + 4096));
    } else {
        assert!(matches!(
            client.block_status(0, SIZE).await,
            Err(Error::Unsupported(_))
        ));
    }

    // Requests the client refuses before sending.
    let mut buf = vec![0u8; 10];
    assert!(matches!(
        client.read_at(&mut buf, SIZE - 5).await,
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        client.write_at(&buf, SIZE).await,
        Err(Error::OutOfRange { .. })
    ));

    let whole = read_all(&client).await;
    if whole != model {
        let at = whole.iter().zip(&model).position(|(a, b)| a != b);
        panic!("{name}: export differs from the model at offset {at:?}");
    }
    client.disconnect().await.expect("disconnect");
    assert!(matches!(
        client.read_at(&mut buf, 0).await,
        Err(Error::Disconnected)
    ));
    digest(&whole)
}

fn nbd_std_expect() -> Expect {
    Expect {
        export: "memory",
        block_status: true,
        info_size: true,
    }
}

#[test]
fn same_results_from_every_server() {
    if !have_tools(&["nbdkit", "qemu-nbd", "nbd-server"]) {
        return;
    }
    let runtime = runtime();
    let mut digests = Vec::new();

    let server = Server::start(["--size", "64M"]);
    digests.push((
        "nbd-std",
        runtime.block_on(exercise("nbd-std", &server.uri(), &nbd_std_expect())),
    ));
    drop(server);

    let nbdkit = Peer::nbdkit("64M", &[], &[]);
    let expect = Expect {
        export: "",
        block_status: true,
        info_size: true,
    };
    digests.push((
        "nbdkit",
        runtime.block_on(exercise("nbdkit", &nbdkit.uri(), &expect)),
    ));
    drop(nbdkit);

    let qemu = Peer::qemu_nbd(SIZE);
    digests.push((
        "qemu-nbd",
        runtime.block_on(exercise("qemu-nbd", &qemu.uri(), &expect)),
    ));
    drop(qemu);

    let nbd_server = Peer::nbd_server(SIZE);
    let expect = Expect {
        export: "test",
        block_status: false,
        info_size: false,
    };
    digests.push((
        "nbd-server",
        runtime.block_on(exercise("nbd-server", &nbd_server.uri(), &expect)),
    ));
    drop(nbd_server);

    let first = digests[0].1;
    assert!(
        digests.iter().all(|(_, d)| *d == first),
        "servers disagree: {digests:?}"
    );
}

#[test]
fn unix_socket_and_named_exports() {
    let dir = common::temp_dir();
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(
        &socket,
        [
            "--export",
            "scratch=memory:64M,desc=scratch space",
            "--export",
            "hello world=memory:1M,ro",
        ],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let uri = format!("nbd+unix:///scratch?socket={}", socket.display());
        let parsed = NbdUri::parse(&uri).expect("URI");
        let mut listed = list_exports(&parsed).await.expect("list");
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["hello world", "scratch"]);
        let info = export_info(&parsed).await.expect("info");
        assert_eq!(info.description.as_deref(), Some("scratch space"));
        assert!(info.meta_contexts.iter().any(|c| c == "base:allocation"));

        let client = Client::connect(&uri).await.expect("connect");
        client
            .write_at(b"over a unix socket", 7)
            .await
            .expect("write");
        let mut buf = [0u8; 18];
        client.read_at(&mut buf, 7).await.expect("read");
        assert_eq!(&buf, b"over a unix socket");
        client.disconnect().await.expect("disconnect");

        // Percent-decoding of the export name; a read-only export.
        let ro = Client::connect(&format!(
            "nbd+unix:///hello%20world?socket={}",
            socket.display()
        ))
        .await
        .expect("connect to `hello world`");
        assert_eq!(ro.size(), MIB);
        assert!(matches!(
            ro.write_at(b"x", 0).await,
            Err(Error::ReadOnly(_))
        ));

        let missing = Client::connect(&format!("nbd+unix:///nope?socket={}", socket.display()))
            .await
            .expect_err("no such export");
        assert!(
            matches!(missing, Error::NoSuchExport { ref name, .. } if name == "nope"),
            "{missing}"
        );
    });
    drop(server);
}

#[test]
fn server_errors_carry_the_nbd_error_name() {
    if !have_tools(&["nbdkit"]) {
        return;
    }
    // Every read and write fails with EIO; zeroing with ENOSPC.
    let nbdkit = Peer::nbdkit(
        "1M",
        &["--filter=error"],
        &[
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
        ],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let client = Client::connect(&nbdkit.uri()).await.expect("connect");
        let mut buf = vec![0u8; 4096];
        let error = client.read_at(&mut buf, 512).await.expect_err("read fails");
        assert_eq!(error.nbd_error(), Some(ErrorCode::Io), "{error}");
        assert_eq!(
            error.to_string(),
            "read of 4096 bytes at offset 512 failed: the server replied NBD_EIO (input/output error)"
        );
        let error = client
            .zero(0, 4096, ZeroOptions::default())
            .await
            .expect_err("zero fails");
        assert_eq!(error.nbd_error(), Some(ErrorCode::NoSpace), "{error}");
        // The connection survives its requests' errors.
        client.write_at(b"still here", 0).await.expect("write");
        client.disconnect().await.expect("disconnect");
    });
}

#[test]
fn block_size_limits_are_honoured() {
    if !have_tools(&["nbdkit"]) {
        return;
    }
    // Minimum 512, maximum 64 KiB, and the server fails anything else.
    let nbdkit = Peer::nbdkit(
        "8M",
        &["--filter=blocksize-policy"],
        &[
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let runtime = runtime();
    runtime.block_on(async {
        let client = Client::connect(&nbdkit.uri()).await.expect("connect");
        let sizes = client.info().export.block_sizes;
        assert_eq!((sizes.minimum, sizes.maximum), (512, 65536));
        // 1 MiB + 512 goes out as 17 requests of at most 64 KiB.
        let data = random_bytes(7, (MIB + 512) as usize);
        client.write_at(&data, 3 * 512).await.expect("big write");
        let back = client
            .read_owned(vec![0u8; data.len()], 3 * 512)
            .await
            .expect("big read");
        assert!(back == data, "big read differs");
        let mut buf = [0u8; 100];
        assert!(matches!(
            client.read_at(&mut buf, 512).await,
            Err(Error::Misaligned { minimum: 512, .. })
        ));
        client.disconnect().await.expect("disconnect");
    });
}

#[test]
fn many_tasks_share_one_connection() {
    let server = Server::start(["--size", "16M"]);
    let runtime = runtime();
    runtime.block_on(async {
        let client = Client::connect(&server.uri()).await.expect("connect");
        assert_eq!(client.connections(), 1);
        let client = Arc::new(client);
        // 400 tasks with 4 KiB-ish writes then reads, far more than the
        // 128 requests the core keeps in flight.
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let client = Arc::clone(&client);
            tasks.push(tokio::spawn(async move {
                let offset = i * 40_000 + i % 7;
                let data = random_bytes(i + 1000, 4096 + (i as usize % 13));
                client.write_at(&data, offset).await.expect("write");
                let mut back = vec![0u8; data.len()];
                client.read_at(&mut back, offset).await.expect("read");
                assert!(back == data, "task {i}: read differs");
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        client.disconnect().await.expect("disconnect");
    });
}

#[test]
fn connection_failures_are_reported() {
    let runtime = runtime();
    runtime.block_on(async {
        // Nobody listens on this port.
        let port = common::free_port();
        let error = Client::connect(&format!("nbd://127.0.0.1:{port}/"))
            .await
            .expect_err("refused");
        assert!(matches!(error, Error::Connect { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot connect to 127.0.0.1:{port}: "))
        );
        let error = Client::connect("nbd://127.0.0.1/?tls-verify-peer=false")
            .await
            .expect_err("TLS parameter on a plain URI");
        assert!(error.to_string().contains("TLS parameters need"), "{error}");
    });

    // Without reconnecting (the default is tested in reconnect.rs), a
    // server going away fails requests in flight and later ones.
    let mut server = Server::start(["--size", "1M"]);
    runtime.block_on(async {
        let uri = format!("{}?reconnect-timeout=0", server.uri());
        let client = Client::connect(&uri).await.expect("connect");
        client.write_at(b"x", 0).await.expect("write");
        common::send_signal(server.pid(), "KILL");
        let _ = server.signal_and_wait("KILL", common::STOP_TIMEOUT);
        let mut buf = [0u8; 1];
        let first = client.read_at(&mut buf, 0).await.expect_err("server gone");
        let second = client.read_at(&mut buf, 0).await.expect_err("still gone");
        assert!(
            matches!(first, Error::Closed { .. } | Error::Io(_)),
            "{first}"
        );
        assert_eq!(first.to_string(), second.to_string());
    });
}

/// A minimal server, as old ones are: fixed newstyle, every option but
/// `NBD_OPT_EXPORT_NAME` refused with `NBD_REP_ERR_UNSUP`, simple
/// replies, READ, WRITE and DISC only. Serves `connections` connections,
/// one after the other, then returns the disk.
fn minimal_server(size: usize, connections: usize) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let serve = move || {
        let mut disk = vec![0u8; size];
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().expect("accept");
            let read_exact = |stream: &mut std::net::TcpStream, n: usize| {
                let mut buf = vec![0u8; n];
                stream.read_exact(&mut buf).map(|()| buf)
            };
            let mut greeting = common::NBDMAGIC.to_be_bytes().to_vec();
            greeting.extend_from_slice(&common::IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(&3u16.to_be_bytes());
            stream.write_all(&greeting).expect("greeting");
            let Ok(_flags) = read_exact(&mut stream, 4) else {
                continue;
            };
            let mut selected = false;
            while let Ok(header) = read_exact(&mut stream, 16) {
                let option = u32::from_be_bytes(header[8..12].try_into().expect("4"));
                let length = u32::from_be_bytes(header[12..16].try_into().expect("4"));
                let _ = read_exact(&mut stream, length as usize);
                if option == common::OPT_EXPORT_NAME {
                    let mut reply = (size as u64).to_be_bytes().to_vec();
                    reply.extend_from_slice(&1u16.to_be_bytes());
                    stream.write_all(&reply).expect("export reply");
                    selected = true;
                    break;
                }
                let mut reply = common::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&option.to_be_bytes());
                let kind: u32 = if option == 2 { 1 } else { 0x8000_0001 };
                reply.extend_from_slice(&kind.to_be_bytes());
                reply.extend_from_slice(&0u32.to_be_bytes());
                stream.write_all(&reply).expect("option reply");
                if option == 2 {
                    break;
                }
            }
            if !selected {
                continue;
            }
            while let Ok(request) = read_exact(&mut stream, 28) {
                let command = u16::from_be_bytes([request[6], request[7]]);
                let offset = u64::from_be_bytes(request[16..24].try_into().expect("8")) as usize;
                let length = u32::from_be_bytes(request[24..28].try_into().expect("4")) as usize;
                let mut reply = common::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&0u32.to_be_bytes());
                reply.extend_from_slice(&request[8..16]);
                match command {
                    common::CMD_READ => reply.extend_from_slice(&disk[offset..offset + length]),
                    common::CMD_WRITE => {
                        let data = read_exact(&mut stream, length).expect("payload");
                        disk[offset..offset + length].copy_from_slice(&data);
                    }
                    _ => break,
                }
                stream.write_all(&reply).expect("reply");
            }
        }
        disk
    };
    (port, std::thread::spawn(serve))
}

#[test]
fn old_servers_without_go_or_info() {
    // Two connections for the description (INFO refused, then GO), two clients.
    let (port, server) = minimal_server(1 << 20, 4);
    let uri = format!("nbd://127.0.0.1:{port}/");
    let runtime = runtime();
    runtime.block_on(async {
        // NBD_OPT_INFO refused: described through NBD_OPT_EXPORT_NAME.
        let info = export_info(&NbdUri::parse(&uri).expect("URI"))
            .await
            .expect("info by the fallback");
        assert_eq!(info.size(), 1 << 20);
        assert!(!info.structured_replies());

        let client = Client::connect(&uri).await.expect("connect");
        assert!(!client.can_block_status());
        let data = random_bytes(3, 70_000);
        client.write_at(&data, 12_345).await.expect("write");
        let mut back = vec![0u8; data.len()];
        client.read_at(&mut back, 12_345).await.expect("read");
        assert!(back == data);
        assert!(matches!(client.flush().await, Err(Error::Unsupported(_))));
        client.disconnect().await.expect("disconnect");

        let third = Client::connect(&uri).await.expect("connect again");
        third.disconnect().await.expect("disconnect");
    });
    let disk = server.join().expect("server thread");
    assert!(disk[12_345..12_345 + 70_000] == random_bytes(3, 70_000)[..]);
}
