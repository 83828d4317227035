//! TLS (`NBD_OPT_STARTTLS`): `nbd-std serve --tls on|require` against
//! libnbd (`nbdinfo`, GnuTLS), qemu (`qemu-img`, `qemu-io`, GnuTLS) and
//! nbd-std's own client (`nbds://`), with certificates made by the
//! `openssl` command at test time: a CA, a server certificate for
//! `localhost` and 127.0.0.1, and a client certificate for mutual TLS.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pki::Pki;
use common::{Server, have_tools, nbdinfo_json, run, run_ok, server_binary, temp_dir, tool};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

fn nbds(server: &Server, certificates: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        server.port(),
        certificates.display()
    )
}

fn nbd_std(args: &[&str]) -> Command {
    let mut command = Command::new(server_binary());
    command.args(args);
    command
}

#[test]
fn nbdinfo_over_tls_and_refused_without() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(pki.serve_args("require"));
    let json = nbdinfo_json(&[&nbds(&server, &pki.trust())], TIMEOUT);
    assert_eq!(json["TLS"], true, "{json:#}");
    assert_eq!(json["exports"][0]["export-size"], 64 << 20, "{json:#}");

    // No TLS: the server answers NBD_REP_ERR_TLS_REQD, libnbd gives up.
    let plain = run(tool("nbdinfo").arg(server.uri()), TIMEOUT);
    assert!(
        !plain.success(),
        "plain nbdinfo succeeded\n{}",
        plain.describe()
    );
    assert!(plain.stderr.contains("nbdinfo:"), "{}", plain.describe());
    // TLS, but a server certificate the client cannot trust.
    let untrusted = run(
        tool("nbdinfo").arg(nbds(&server, &pki.path("mistrust"))),
        TIMEOUT,
    );
    assert!(!untrusted.success(), "{}", untrusted.describe());
    // The server survived every client, refused ones included.
    server.assert_running();
}

#[test]
fn qemu_over_tls_and_refused_without() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(pki.serve_args("require"));
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.trust().display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={}", server.port());
    let info = run_ok(
        tool("qemu-img").args([
            "info",
            "--object",
            &object,
            "--image-opts",
            &format!("{opts},tls-creds=tls0"),
        ]),
        TIMEOUT,
    );
    assert!(
        info.stdout.contains("64 MiB") || info.stdout.contains("67108864"),
        "{}",
        info.describe()
    );
    let plain = run(
        tool("qemu-img").args(["info", "--image-opts", &opts]),
        TIMEOUT,
    );
    assert!(!plain.success(), "{}", plain.describe());
    assert!(plain.stderr.contains("TLS"), "{}", plain.describe());

    // Data both ways over TLS: qemu-io checks the pattern it reads back.
    let io = run_ok(
        tool("qemu-io").args([
            "--object",
            &object,
            "--image-opts",
            &format!("{opts},tls-creds=tls0"),
            "-c",
            "write -P 0xa5 1M 3M",
            "-c",
            "read -P 0xa5 1M 3M",
            "-c",
            "read -P 0 0 1M",
        ]),
        TIMEOUT,
    );
    assert!(
        !io.stdout.contains("Pattern verification failed"),
        "{}",
        io.describe()
    );
    assert_eq!(
        io.stdout.matches("read 3145728/3145728 bytes").count(),
        1,
        "{}",
        io.describe()
    );
    server.assert_running();
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(pki.mutual_args());
    assert_eq!(
        nbdinfo_json(&[&nbds(&server, &pki.identity())], TIMEOUT)["TLS"],
        true
    );
    let anonymous = run(tool("nbdinfo").arg(nbds(&server, &pki.trust())), TIMEOUT);
    assert!(!anonymous.success(), "{}", anonymous.describe());

    let ours = run_ok(
        &mut nbd_std(&["info", &nbds(&server, &pki.identity())]),
        TIMEOUT,
    );
    assert!(ours.stdout.contains("with TLS"), "{}", ours.describe());
    let ours = run(
        &mut nbd_std(&["info", &nbds(&server, &pki.trust())]),
        TIMEOUT,
    );
    assert!(!ours.success(), "{}", ours.describe());
    assert!(ours.stderr.contains("TLS"), "{}", ours.describe());
    // The client reconnects after a broken session, but a refused
    // certificate is reported at once, not after the reconnect timeout.
    let started = std::time::Instant::now();
    let copy = run(
        &mut nbd_std(&["cp", &nbds(&server, &pki.trust()), "/dev/null"]),
        TIMEOUT,
    );
    assert!(!copy.success(), "{}", copy.describe());
    assert!(
        copy.stderr.contains("TLS") && started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}: {}",
        started.elapsed(),
        copy.describe()
    );
    if have_tools(&["qemu-img"]) {
        let info = |dir: &Path| {
            run(
                tool("qemu-img").args([
                    "info",
                    "--object",
                    &format!(
                        "tls-creds-x509,id=tls0,dir={},endpoint=client",
                        dir.display()
                    ),
                    "--image-opts",
                    &format!(
                        "driver=nbd,host=127.0.0.1,port={},tls-creds=tls0",
                        server.port()
                    ),
                ]),
                TIMEOUT,
            )
        };
        let with = info(&pki.identity());
        assert!(with.success(), "{}", with.describe());
        let without = info(&pki.trust());
        assert!(!without.success(), "{}", without.describe());
    }
    server.assert_running();
}

#[test]
fn nbd_std_client_over_tls() {
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(pki.serve_args("require"));
    let uri = nbds(&server, &pki.trust());

    let info = run_ok(&mut nbd_std(&["info", "--json", &uri]), TIMEOUT);
    let json: Value = serde_json::from_str(&info.stdout).expect("JSON");
    assert_eq!(json["TLS"], true, "{json:#}");

    // A copy in and out through TLS, compared byte for byte.
    let dir = temp_dir();
    let source = dir.path().join("source.img");
    common::write_random_file(&source, 16 << 20, 7);
    let back = dir.path().join("back.img");
    let (source_text, back_text) = (source.display().to_string(), back.display().to_string());
    run_ok(&mut nbd_std(&["cp", &source_text, &uri]), TIMEOUT);
    run_ok(&mut nbd_std(&["cp", &uri, &back_text]), TIMEOUT);
    let original = std::fs::read(&source).expect("read source");
    let copied = std::fs::read(&back).expect("read copy");
    assert_eq!(copied.len(), 64 << 20);
    assert!(
        copied[..original.len()] == original[..],
        "data changed through TLS"
    );
    assert!(copied[original.len()..].iter().all(|&b| b == 0));

    // Plain URI: the server's refusal, in words.
    let plain = run(&mut nbd_std(&["info", &server.uri()]), TIMEOUT);
    assert!(!plain.success());
    assert!(
        plain
            .stderr
            .contains("requires TLS: connect with an nbds://"),
        "{}",
        plain.describe()
    );
    // The certificate names localhost and 127.0.0.1, not 127.0.0.2.
    let wrong_name = format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}&tls-hostname=elsewhere.example",
        server.port(),
        pki.trust().display()
    );
    let refused = run(&mut nbd_std(&["info", &wrong_name]), TIMEOUT);
    assert!(!refused.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("certificate"),
        "{}",
        refused.describe()
    );
    // Nor does the system's trust store know the test CA.
    let system = format!("nbds://localhost:{}/", server.port());
    let refused = run(&mut nbd_std(&["info", &system]), TIMEOUT);
    assert!(!refused.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("UnknownIssuer"),
        "{}",
        refused.describe()
    );
    // ... unless the client is told not to verify.
    let unverified = format!("{wrong_name}&tls-verify-peer=false");
    run_ok(&mut nbd_std(&["info", &unverified]), TIMEOUT);
    server.assert_running();
}

#[test]
fn tls_over_a_unix_socket() {
    let Some(pki) = Pki::new() else { return };
    let dir = temp_dir();
    let socket = dir.path().join("nbd.sock");
    let server = Server::start_unix(&socket, pki.serve_args("require"));
    // nbds+unix verifies the certificate against "localhost".
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        socket.display(),
        pki.trust().display()
    );
    let ours = run_ok(&mut nbd_std(&["info", &uri]), TIMEOUT);
    assert!(ours.stdout.contains("with TLS"), "{}", ours.describe());
    if have_tools(&["nbdinfo"]) {
        assert_eq!(nbdinfo_json(&[&uri], TIMEOUT)["TLS"], true);
    }
    drop(server);
}

#[test]
fn optional_tls_serves_both() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(pki.serve_args("on"));
    assert_eq!(nbdinfo_json(&[&server.uri()], TIMEOUT)["TLS"], false);
    assert_eq!(
        nbdinfo_json(&[&nbds(&server, &pki.trust())], TIMEOUT)["TLS"],
        true
    );
    let ours = run_ok(&mut nbd_std(&["info", &server.uri()]), TIMEOUT);
    assert!(ours.stdout.contains("without TLS"), "{}", ours.describe());
    server.assert_running();
}

#[test]
fn nbds_to_a_server_without_tls_fails_cleanly() {
    let Some(pki) = Pki::new() else { return };
    let mut server = Server::start(["--size", "16M"]);
    let uri = nbds(&server, &pki.trust());
    let ours = run(&mut nbd_std(&["info", &uri]), TIMEOUT);
    assert!(!ours.success(), "{}", ours.describe());
    assert!(
        ours.stderr.contains("refused NBD_OPT_STARTTLS"),
        "{}",
        ours.describe()
    );
    if have_tools(&["nbdinfo"]) {
        let theirs = run(tool("nbdinfo").arg(&uri), TIMEOUT);
        assert!(!theirs.success(), "{}", theirs.describe());
    }
    server.assert_running();
}

#[test]
fn bad_tls_settings_stop_the_server_at_startup() {
    let Some(pki) = Pki::new() else { return };
    let cert = pki.path("server-cert.pem").display().to_string();
    let key = pki.path("server-key.pem").display().to_string();
    let wrong_key = pki.path("client-key.pem").display().to_string();
    let missing = pki.path("nothing.pem").display().to_string();
    let cases: [(&[&str], &str); 6] = [
        (&["--tls", "require"], "needs --tls-cert"),
        (&["--tls", "on", "--tls-cert", &cert], "needs --tls-key"),
        (&["--tls-cert", &cert, "--tls-key", &key], "need --tls on"),
        (
            &["--tls", "on", "--tls-cert", &missing, "--tls-key", &key],
            "nothing.pem",
        ),
        (
            &["--tls", "on", "--tls-cert", &key, "--tls-key", &key],
            "no PEM certificate",
        ),
        (
            &["--tls", "on", "--tls-cert", &cert, "--tls-key", &wrong_key],
            "server certificate and key",
        ),
    ];
    for (args, expected) in cases {
        let mut command = nbd_std(&["serve", "--port", "0"]);
        command.args(args);
        let out = run(&mut command, TIMEOUT);
        assert_eq!(out.code(), Some(2), "{}", out.describe());
        assert!(out.stderr.contains(expected), "{}", out.describe());
        assert_eq!(
            out.stderr.trim_end().lines().count(),
            1,
            "{}",
            out.describe()
        );
    }
}

/// The client reconnects over TLS: the server restarted (SIGTERM, same
/// port, same file, same certificate) under a connected client, a read
/// made meanwhile comes back right through a new TLS session.
#[test]
fn nbd_std_client_reconnects_over_tls() {
    let Some(pki) = Pki::new() else { return };
    let dir = temp_dir();
    let disk = dir.path().join("disk.img");
    common::write_random_file(&disk, 8 << 20, 11);
    let expected = std::fs::read(&disk).expect("read export file");
    let mut args = pki.serve_args("require");
    args.extend(["--export".into(), format!("d=file:{}", disk.display())]);
    let mut server = Server::start(&args);
    let uri = nbds(&server, &pki.trust());
    common::runtime().block_on(async {
        let client = nbd_std::client::Client::connect(&uri)
            .await
            .expect("connect over TLS");
        let mut buf = vec![0u8; 1 << 20];
        client.read_at(&mut buf, 0).await.expect("read");
        server.stop();
        let _server = Server::start_at(server.port(), &args);
        let mut buf = vec![0u8; 4 << 20];
        tokio::time::timeout(TIMEOUT, client.read_at(&mut buf, 2 << 20))
            .await
            .expect("the read ends")
            .expect("read after the restart");
        assert!(buf[..] == expected[2 << 20..6 << 20], "read data differs");
        client.disconnect().await.expect("disconnect");
    });
}

/// A 2432-bit RSA key, the size of the reference NBD test suite's
/// (`tests/run/certs/server-key.pem` in NetworkBlockDevice/nbd): sizes
/// that are not a multiple of 512 bits are refused by ring and must work
/// here, as they do in nbdkit (GnuTLS) and nbd-server.
#[test]
fn rsa_key_of_2432_bits_serves_nbdinfo() {
    if !have_tools(&["nbdinfo", "openssl"]) {
        return;
    }
    let dir = temp_dir();
    let root = dir.path();
    run_ok(
        tool("openssl")
            .current_dir(root)
            .args(["genrsa", "-out", "server-key.pem", "2432"]),
        TIMEOUT,
    );
    run_ok(
        tool("openssl").current_dir(root).args([
            "req",
            "-new",
            "-x509",
            "-key",
            "server-key.pem",
            "-out",
            "server-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ]),
        TIMEOUT,
    );
    // Self-signed: libnbd trusts it as the CA of its directory.
    std::fs::copy(root.join("server-cert.pem"), root.join("ca-cert.pem")).expect("copy");
    let key_size = run_ok(
        tool("openssl")
            .current_dir(root)
            .args(["rsa", "-in", "server-key.pem", "-noout", "-text"]),
        TIMEOUT,
    );
    assert!(
        key_size.stdout.contains("2432 bit"),
        "{}",
        key_size.describe()
    );
    let mut server = Server::start([
        "--size",
        "8M",
        "--tls",
        "require",
        "--tls-cert",
        &root.join("server-cert.pem").display().to_string(),
        "--tls-key",
        &root.join("server-key.pem").display().to_string(),
    ]);
    let json = nbdinfo_json(&[&nbds(&server, root)], TIMEOUT);
    assert_eq!(json["TLS"], true, "{json:#}");
    assert_eq!(json["exports"][0]["export-size"], 8 << 20, "{json:#}");
    server.stop();
}
