//! Running `nbd-std serve` the way nbdkit is run: `--run` scripts against
//! it (nbdcopy, nbdinfo), `--pidfile`, and systemd socket activation with
//! `systemd-socket-activate` on TCP and on a unix socket.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    assert_same_content, free_port, have_tools, run, run_ok, server_binary, stop_child, temp_dir,
    tool, wait_until, write_random_file,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn serve(args: &[&str]) -> common::Output {
    run(
        Command::new(server_binary())
            .args(["serve", "--log-level", "warn"])
            .args(args),
        TIMEOUT,
    )
}

#[test]
fn run_copies_with_nbdcopy_over_a_private_socket_and_exits_with_its_status() {
    if !have_tools(&["nbdcopy"]) {
        return;
    }
    let dir = temp_dir();
    let disk = dir.path().join("disk.img");
    let copy = dir.path().join("copy.img");
    write_random_file(&disk, 3 << 20, 17);
    let export = format!("d=file:{}", disk.display());
    let script = format!(
        "nbdcopy \"$uri\" '{}' && echo \"uri=$uri port=$port unixsocket=$unixsocket tls=$tls\"",
        copy.display()
    );
    let out = serve(&["--export", &export, "--run", &script]).assert_success();
    assert_same_content(&disk, &copy);
    let line = out.stdout.trim();
    assert!(
        line.starts_with("uri=nbd+unix:///?socket=/") && line.contains(" port= unixsocket=/"),
        "{}",
        out.describe()
    );
    assert!(line.ends_with("tls=0"), "{}", out.describe());
    // The private socket and its directory are gone.
    let socket = line
        .split(" unixsocket=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("unixsocket in the output");
    assert!(!Path::new(socket).exists(), "{socket} left behind");

    // The command's status becomes the server's.
    let out = serve(&["--size", "1M", "--run", "exit 7"]);
    assert_eq!(out.code(), Some(7), "{}", out.describe());
    let out = serve(&["--size", "1M", "--run", "kill -TERM $$"]);
    assert_eq!(out.code(), Some(128 + 15), "{}", out.describe());
}

#[test]
fn run_on_tcp_sets_port_and_writes_the_pidfile() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let pidfile = dir.path().join("serve.pid");
    let port = free_port();
    let script = format!(
        "echo \"pid=$(cat '{}') port=$port uri=$uri\"; nbdinfo --size \"$uri\"",
        pidfile.display()
    );
    let out = serve(&[
        "--size",
        "5M",
        "--port",
        &port.to_string(),
        "--pidfile",
        &pidfile.display().to_string(),
        "--run",
        &script,
    ])
    .assert_success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.describe());
    let pid: u32 = lines[0]
        .strip_prefix("pid=")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid\n{}", out.describe()));
    assert!(pid > 1, "{}", out.describe());
    assert!(
        lines[0].ends_with(&format!("port={port} uri=nbd://127.0.0.1:{port}/")),
        "{}",
        out.describe()
    );
    assert_eq!(lines[1], (5u64 << 20).to_string(), "{}", out.describe());
    assert!(!pidfile.exists(), "pidfile left behind after exit");
}

/// `systemd-socket-activate -l ADDRESS nbd-std serve ...`: systemd's own
/// tool listens, then execs the server with the socket as descriptor 3.
fn socket_activated(listen: &str, size: &str) -> Child {
    Command::new(tool_path("systemd-socket-activate"))
        .args(["-l", listen])
        .arg(server_binary())
        .args(["serve", "--log-level", "warn", "--size", size])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start systemd-socket-activate")
}

fn tool_path(name: &str) -> std::path::PathBuf {
    common::find_tool(name).unwrap_or_else(|| panic!("{name} is not installed"))
}

#[test]
fn socket_activation_on_tcp_and_unix_sockets() {
    if !have_tools(&["systemd-socket-activate", "nbdinfo"]) {
        return;
    }
    let port = free_port();
    let mut tcp = socket_activated(&format!("127.0.0.1:{port}"), "7M");
    let uri = format!("nbd://127.0.0.1:{port}/");
    // The listener exists before the server runs; nbdinfo's connection
    // starts it.
    let mut size = String::new();
    wait_until(Duration::from_secs(10), || {
        let out = run(tool("nbdinfo").args(["--size", &uri]), TIMEOUT);
        size = out.stdout.trim().to_owned();
        out.success()
    });
    assert_eq!(size, (7u64 << 20).to_string());
    // Served twice from the same socket: it stays the server's.
    let again = run_ok(tool("nbdinfo").args(["--size", &uri]), TIMEOUT);
    assert_eq!(again.stdout.trim(), size);
    stop_child(&mut tcp, "TERM", Duration::from_secs(10));

    let dir = temp_dir();
    let socket = dir.path().join("nbd.sock");
    let mut unix = socket_activated(&socket.display().to_string(), "9M");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    wait_until(Duration::from_secs(10), || {
        let out = run(tool("nbdinfo").args(["--size", &uri]), TIMEOUT);
        size = out.stdout.trim().to_owned();
        out.success()
    });
    assert_eq!(size, (9u64 << 20).to_string());
    let status = common::signal_child_and_wait(&mut unix, "TERM", Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "socket-activated server did not exit 0 on SIGTERM: {status:?}"
    );
    stop_child(&mut unix, "KILL", Duration::from_secs(1));
}

/// More than one socket, or a count that is not one, stops the server
/// with a line saying why, before it serves anything.
#[test]
fn socket_activation_with_a_bad_count_is_refused() {
    for (count, expected) in [
        ("2", "systemd passed 2 sockets"),
        ("x", "LISTEN_FDS=`x` is not a number"),
    ] {
        // LISTEN_PID must name the server: the shell execs it.
        let out = run(
            Command::new("/bin/sh")
                .args([
                    "-c",
                    "LISTEN_PID=$$ LISTEN_FDS=\"$1\" exec \"$2\" serve --size 1M",
                    "sh",
                    count,
                ])
                .arg(server_binary()),
            TIMEOUT,
        );
        assert_eq!(out.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.trim().starts_with("nbd-std: ") && out.stderr.contains(expected),
            "{}",
            out.describe()
        );
    }
}
