//! `serve --metrics`: a load of known requests from libnbd (Python), a
//! scrape while its connection is open and one after, and every counter
//! checked against the requests made: per export and command, bytes,
//! NBD errors from a fault-injecting export, latency histogram counts,
//! a protocol failure during the handshake and a handshake timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{DEBIAN_PYTHON, Server, free_port, have_python_libnbd, run, wait_until};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to --metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in\n{response}"));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.to_owned()
}

/// The value of the sample `name{labels}` (exactly as written), or 0 when
/// it is absent.
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

fn assert_value(text: &str, sample: &str, expected: f64) {
    assert_eq!(value(text, sample), expected, "{sample} in\n{text}");
}

/// The load: exact request counts, then a scrape (printed) while the
/// connection is still open, then the same on the failing export.
const LOAD: &str = r#"
import sys, urllib.request, nbd
uri, bad_uri, metrics = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
for i in range(200):
    h.pwrite(b"\x5a" * 4096, i * 4096)
for i in range(50):
    h.pread(8192, i * 8192)
for i in range(7):
    h.flush()
for i in range(5):
    h.zero(65536, 1 << 20)
for i in range(3):
    h.trim(4096, 2 << 20)
h.block_status(1 << 20, 0, lambda *args: 0)
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(direct.open(metrics, timeout=10).read().decode(), end="")
h.shutdown()
bad = nbd.NBD()
bad.connect_uri(bad_uri)
failed = 0
for i in range(4):
    try:
        bad.pread(4096, 0)
    except nbd.Error:
        failed += 1
bad.pread(4096, 8192)
bad.shutdown()
assert failed == 4, failed
"#;

#[test]
fn counters_match_the_requests_made() {
    if !have_python_libnbd() {
        return;
    }
    let metrics_port = free_port();
    let server = Server::start([
        "--export",
        "disk=memory:16M",
        "--export",
        "bad=memory:1M,fail=eio@0-4095",
        "--handshake-timeout",
        "1",
        "--metrics",
        &format!("127.0.0.1:{metrics_port}"),
    ]);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let load = run(
        Command::new(DEBIAN_PYTHON).args([
            "-c",
            LOAD,
            &server.uri_for("disk"),
            &server.uri_for("bad"),
            &metrics_url,
        ]),
        TIMEOUT,
    )
    .assert_success();

    // Scraped during the load: one connection open on `disk`.
    let during = &load.stdout;
    let disk = |command: &str| format!("{{export=\"disk\",command=\"{command}\"}}");
    assert_value(during, "nbd_connections_active{export=\"disk\"}", 1.0);
    assert_value(during, "nbd_connections_total{export=\"disk\"}", 1.0);
    for (command, requests, bytes) in [
        ("write", 200.0, 200.0 * 4096.0),
        ("read", 50.0, 50.0 * 8192.0),
        ("flush", 7.0, 0.0),
        ("write_zeroes", 5.0, 5.0 * 65536.0),
        ("trim", 3.0, 3.0 * 4096.0),
        ("block_status", 1.0, 1048576.0),
        ("cache", 0.0, 0.0),
    ] {
        let labels = disk(command);
        assert_value(during, &format!("nbd_requests_total{labels}"), requests);
        assert_value(during, &format!("nbd_request_bytes_total{labels}"), bytes);
        assert_value(
            during,
            &format!("nbd_request_duration_seconds_count{labels}"),
            requests,
        );
    }
    // Every write took less than the top bucket.
    assert_value(
        during,
        "nbd_request_duration_seconds_bucket{le=\"+Inf\",export=\"disk\",command=\"write\"}",
        200.0,
    );

    // A client that breaks the protocol during the handshake, and one
    // that never selects an export (dropped after --handshake-timeout 1).
    let mut garbage = TcpStream::connect(server.addr()).expect("connect");
    let mut greeting = [0u8; 18];
    garbage.read_exact(&mut greeting).expect("greeting");
    garbage
        .write_all(&[0xff; 64])
        .expect("send a broken option header");
    let idle = TcpStream::connect(server.addr()).expect("connect");

    let mut after = String::new();
    let settled = wait_until(Duration::from_secs(10), || {
        after = scrape(metrics_port);
        value(
            &after,
            "nbd_limit_refusals_total{limit=\"handshake_timeout\"}",
        ) >= 1.0
            && value(&after, "nbd_handshake_failures_total{reason=\"protocol\"}") >= 1.0
    });
    assert!(settled, "handshake failures not counted\n{after}");
    drop((garbage, idle));
    assert_value(&after, "nbd_connections_active{export=\"disk\"}", 0.0);
    assert_value(
        &after,
        "nbd_handshake_failures_total{reason=\"timeout\"}",
        1.0,
    );
    assert_value(
        &after,
        "nbd_limit_refusals_total{limit=\"handshake_timeout\"}",
        1.0,
    );
    assert_value(
        &after,
        "nbd_handshake_failures_total{reason=\"protocol\"}",
        1.0,
    );
    // Since the first scrape: the libnbd connection to `bad`, the broken
    // one and the idle one (the harness's readiness probe came before).
    assert_eq!(
        value(&after, "nbd_connections_accepted_total")
            - value(during, "nbd_connections_accepted_total"),
        3.0,
        "{during}\n{after}"
    );
    let bad = "{export=\"bad\",command=\"read\"}";
    assert_value(&after, &format!("nbd_requests_total{bad}"), 5.0);
    assert_value(
        &after,
        "nbd_request_errors_total{export=\"bad\",command=\"read\",error=\"EIO\"}",
        4.0,
    );
    assert_value(
        &after,
        &format!(
            "nbd_request_errors_total{}",
            disk("write").replace('}', ",error=\"EIO\"}")
        ),
        0.0,
    );
    assert_value(
        &after,
        &format!("nbd_requests_total{}", disk("write")),
        200.0,
    );
}
