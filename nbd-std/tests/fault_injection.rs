//! Fault injection (`--export NAME=memory:SIZE,fail=...`): the requests a
//! rule chooses get the rule's error on the wire (`NBD_EIO` = 5,
//! `NBD_ENOSPC` = 28, spec "Error values"), every other request on the
//! same connection succeeds, in simple and structured replies alike
//! (libnbd via python3-libnbd, qemu-io), and block status keeps working.

mod common;

use std::time::Duration;

use common::{DEBIAN_PYTHON, Server, have_python_libnbd, have_tools, run, runtime, tool};
use nbd_core::wire::ErrorCode;
use nbd_std::client::Client;

const MIB: u64 = 1 << 20;

/// The NBD error of a failed request, `None` for success; panics on
/// errors that are not the server's answer (the connection failed).
fn code<T>(result: nbd_std::client::Result<T>) -> Option<ErrorCode> {
    match result {
        Ok(_) => None,
        Err(error) => Some(
            error
                .nbd_error()
                .unwrap_or_else(|| panic!("not an NBD error reply: {error}")),
        ),
    }
}

#[test]
fn range_faults_fail_exactly_the_requests_touching_the_range() {
    let server = Server::start([
        "--export",
        "f=memory:16M,fail=eio@1M-2M,fail=enospc@8M-9M/write",
    ]);
    let uri = server.uri_for("f");
    runtime().block_on(async {
        let client = Client::connect(&uri).await.expect("connect");
        assert_eq!(client.connections(), 1, "one connection throughout");
        let mut buf = vec![0u8; 4096];
        let block = vec![0x5au8; 4096];
        // Reads: before, straddling the start, inside, straddling the end,
        // after.
        for (offset, expected) in [
            (0, None),
            (MIB - 4096, None),
            (MIB - 2048, Some(ErrorCode::Io)),
            (MIB, Some(ErrorCode::Io)),
            (MIB + 512 * 1024, Some(ErrorCode::Io)),
            (2 * MIB - 2048, Some(ErrorCode::Io)),
            (2 * MIB, None),
            (15 * MIB, None),
        ] {
            assert_eq!(
                code(client.read_at(&mut buf, offset).await),
                expected,
                "read at {offset}"
            );
            assert_eq!(
                code(client.write_at(&block, offset).await),
                expected,
                "write at {offset}"
            );
        }
        // The enospc rule: writes only.
        assert_eq!(
            code(client.write_at(&block, 8 * MIB).await),
            Some(ErrorCode::NoSpace)
        );
        assert_eq!(code(client.read_at(&mut buf, 8 * MIB).await), None);
        assert_eq!(buf, vec![0; 4096], "the failed write stored nothing");
        // Writes that succeeded stored their data.
        client.read_at(&mut buf, 2 * MIB).await.expect("read back");
        assert_eq!(buf, block);
        // Write-zeroes is a write; trim, flush and block status pass.
        assert_eq!(
            code(
                client
                    .zero(0, 4 * MIB, nbd_std::client::ZeroOptions::default())
                    .await
            ),
            Some(ErrorCode::Io)
        );
        client
            .zero(4 * MIB, MIB, Default::default())
            .await
            .expect("zero");
        client.trim(0, 4 * MIB).await.expect("trim over the range");
        client.flush().await.expect("flush");
        let extents = client
            .block_status(0, 16 * MIB)
            .await
            .expect("block status");
        assert!(!extents.is_empty(), "block status answered");
        client.disconnect().await.expect("clean disconnect");
    });
}

#[test]
fn rate_one_fails_every_request_and_rate_zero_none() {
    let server = Server::start([
        "--export",
        "always=memory:1M,fail=eio:1",
        "--export",
        "never=memory:1M,fail=eio:0",
        "--export",
        "reads=memory:1M,fail=eio:1/read",
    ]);
    runtime().block_on(async {
        let mut buf = vec![0u8; 512];
        let always = Client::connect(&server.uri_for("always"))
            .await
            .expect("connect");
        let never = Client::connect(&server.uri_for("never"))
            .await
            .expect("connect");
        let reads = Client::connect(&server.uri_for("reads"))
            .await
            .expect("connect");
        for i in 0..200u64 {
            let offset = i * 512;
            assert_eq!(
                code(always.read_at(&mut buf, offset).await),
                Some(ErrorCode::Io)
            );
            assert_eq!(
                code(always.write_at(&buf, offset).await),
                Some(ErrorCode::Io)
            );
            assert_eq!(code(never.read_at(&mut buf, offset).await), None);
            assert_eq!(code(never.write_at(&buf, offset).await), None);
            assert_eq!(code(reads.write_at(&buf, offset).await), None);
            assert_eq!(
                code(reads.read_at(&mut buf, offset).await),
                Some(ErrorCode::Io)
            );
        }
        always.flush().await.expect("flush still works");
    });
}

/// Which of `count` sequential reads fail on a fresh server.
fn failures(spec: &str, count: u64) -> Vec<bool> {
    let server = Server::start(["--export", spec]);
    runtime().block_on(async {
        let client = Client::connect(&server.uri_for("r"))
            .await
            .expect("connect");
        let mut buf = vec![0u8; 512];
        let mut failed = Vec::new();
        for i in 0..count {
            failed.push(code(client.read_at(&mut buf, i * 512).await).is_some());
        }
        failed
    })
}

#[test]
fn random_faults_follow_the_rate_and_the_seed() {
    let first = failures("r=memory:1M,fail=eio:0.3,fail-seed=11", 1000);
    let again = failures("r=memory:1M,fail=eio:0.3,fail-seed=11", 1000);
    let other = failures("r=memory:1M,fail=eio:0.3,fail-seed=12", 1000);
    let failed = first.iter().filter(|&&f| f).count();
    println!("rate 0.3: {failed} of 1000 reads failed");
    assert!((220..380).contains(&failed), "{failed} of 1000 at rate 0.3");
    assert_eq!(first, again, "the same seed gives the same faults");
    assert_ne!(first, other, "another seed gives other faults");
}

/// libnbd reports the wire code as the errno of the failed call; with
/// simple replies and with structured ones the same requests fail.
#[test]
fn libnbd_sees_eio_in_simple_and_structured_replies() {
    if !have_python_libnbd() {
        return;
    }
    let server = Server::start(["--export", "f=memory:4M,fail=eio@1M-2M"]);
    let script = r#"
import errno, sys, nbd
uri = sys.argv[1]
for structured in (False, True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    results = []
    for offset in (0, 1 << 20, (1 << 20) + 4096, 2 << 20, 3 << 20):
        for op in ("read", "write"):
            try:
                if op == "read":
                    h.pread(4096, offset)
                else:
                    h.pwrite(b"x" * 4096, offset)
                results.append("ok")
            except nbd.Error as e:
                results.append(errno.errorcode.get(e.errnum, str(e.errnum)))
    if structured:
        # Block status (structured replies only) still answers.
        seen = []
        h.block_status(4 << 20, 0, lambda meta, off, entries, err: seen.append(len(entries)) or 0)
        assert seen and seen[0] > 0, seen
    h.flush()
    h.shutdown()
    print("structured" if structured else "simple", " ".join(results))
"#;
    let out = run(
        std::process::Command::new(DEBIAN_PYTHON).args(["-c", script, &server.uri_for("f")]),
        Duration::from_secs(60),
    )
    .assert_success();
    let expected = "ok ok EIO EIO EIO EIO ok ok ok ok";
    assert_eq!(
        out.stdout.trim(),
        format!("simple {expected}\nstructured {expected}"),
        "{}",
        out.describe()
    );
}

/// qemu-io (structured replies, extended headers when offered) prints the
/// error and goes on with the next command on the same connection.
#[test]
fn qemu_io_prints_input_output_error_and_keeps_going() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let server = Server::start(["--export", "f=memory:4M,fail=eio@1M-2M"]);
    let out = run(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read 1M 64k",
            "-c",
            "write 1536k 4k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "map",
            &server.uri_for("f"),
        ]),
        Duration::from_secs(60),
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(
        text.matches("Input/output error").count(),
        2,
        "{}",
        out.describe()
    );
    assert!(text.contains("read failed: Input/output error"), "{text}");
    assert!(text.contains("write failed: Input/output error"), "{text}");
    // The reads before and after the failures verified their pattern.
    assert_eq!(text.matches("read 65536/65536 bytes").count(), 2, "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // `map` (block status) answered for the whole export.
    assert!(text.contains("(0x400000) bytes"), "{text}");
}
