//! `nbd-std bridge` with real clients (nbdinfo, nbdcopy, qemu-io) and real
//! providers: each provider session is a connection to `nbd-std serve`
//! spliced into the bridge, over plain TCP (`--providers`), over WebSocket
//! (`--ws`), or over WebSocket through Debian's `websockify`. A *feeder*
//! plays the browser page: it keeps one idle session open and opens the
//! next as soon as a client's first bytes reach the current one.

mod common;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    COMMAND_TIMEOUT, STOP_TIMEOUT, Server, free_port, have_tools, read_log, read_until_closed, run,
    run_ok, runtime, server_binary, sha256, signal_child_and_wait, stop_child, tail, temp_dir,
    tool, wait_until, write_urandom_file,
};
use futures_util::{SinkExt, StreamExt};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Size of the exported disk.
const SIZE: u64 = 16 << 20;
/// Seconds a client waits for a provider in these tests.
const WAIT: &str = "1";

// ---------------------------------------------------------------------------
// The bridge process

/// A running `nbd-std bridge` on free ports, stopped and reaped on drop.
struct Bridge {
    child: Option<Child>,
    clients: u16,
    websocket: u16,
    providers: u16,
    logs: TempDir,
}

impl Bridge {
    /// Starts the bridge with `--wait 1`, debug logs, a WebSocket and a TCP
    /// provider port; retries when a chosen port was taken meanwhile.
    fn start() -> Bridge {
        for _ in 0..5 {
            let (clients, websocket, providers) = (free_port(), free_port(), free_port());
            if clients == websocket || websocket == providers || clients == providers {
                continue;
            }
            let logs = temp_dir();
            let stderr = File::create(logs.path().join("stderr")).expect("create the log");
            let args: Vec<OsString> = vec![
                "bridge".into(),
                "--port".into(),
                clients.to_string().into(),
                "--ws".into(),
                format!("127.0.0.1:{websocket}").into(),
                "--providers".into(),
                format!("127.0.0.1:{providers}").into(),
                "--wait".into(),
                WAIT.into(),
                "--log-level".into(),
                "debug".into(),
            ];
            let child = Command::new(server_binary())
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start nbd-std bridge");
            let mut bridge = Bridge {
                child: Some(child),
                clients,
                websocket,
                providers,
                logs,
            };
            // Ready once the WebSocket port accepts (a bare TCP connection
            // there is a failed handshake, not a provider).
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, websocket));
            let ready = wait_until(common::START_TIMEOUT, || {
                bridge.exited().is_some()
                    || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            match bridge.exited() {
                None if ready => return bridge,
                None => panic!("the bridge did not listen in time\n{}", bridge.log()),
                Some(_) if bridge.log().contains("in use") => continue,
                Some(status) => panic!("the bridge exited ({status})\n{}", bridge.log()),
            }
        }
        panic!("no free ports for the bridge after 5 attempts");
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().expect("poll the bridge"))
    }

    fn log(&self) -> String {
        read_log(&self.logs.path().join("stderr"))
    }

    fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.clients)
    }

    fn providers_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.providers))
    }

    fn websocket_url(&self) -> String {
        // Any path is accepted.
        format!("ws://127.0.0.1:{}/nbd/session", self.websocket)
    }

    /// Sends `signal` and waits for the exit status.
    fn signal_and_wait(&mut self, signal: &str) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("bridge child");
        signal_child_and_wait(child, signal, STOP_TIMEOUT)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, "TERM", STOP_TIMEOUT);
        }
        if thread::panicking() {
            eprintln!("--- bridge log ---\n{}", tail(&self.log()));
        }
    }
}

/// `websockify PORT 127.0.0.1:TARGET`, killed on drop.
struct Websockify {
    child: Child,
    port: u16,
}

impl Websockify {
    fn start(target: SocketAddr) -> Websockify {
        let port = free_port();
        let child = tool("websockify")
            .arg(port.to_string())
            .arg(target.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start websockify");
        let mut websockify = Websockify { child, port };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let ready = wait_until(common::START_TIMEOUT, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(
            ready && matches!(websockify.child.try_wait(), Ok(None)),
            "websockify did not listen on {port}"
        );
        websockify
    }
}

impl Drop for Websockify {
    fn drop(&mut self) {
        stop_child(&mut self.child, "TERM", STOP_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------
// Providers: `nbd-std serve` spliced into the bridge

/// How a provider session reaches the bridge.
#[derive(Clone, Debug)]
enum Route {
    /// Plain TCP to `--providers`.
    Tcp(SocketAddr),
    /// A WebSocket URL (the bridge's `--ws`, or websockify).
    WebSocket(String),
}

/// What a provider session has seen.
#[derive(Debug, Default)]
struct SessionState {
    /// A client's bytes arrived: the bridge paired this session.
    taken: AtomicBool,
    /// The session ended.
    ended: AtomicBool,
}

/// Opens one provider session: connects to the NBD server `server`, then to
/// the bridge by `route`, and splices the two until either closes.
async fn provider_session(route: Route, server: SocketAddr, state: Arc<SessionState>) {
    let spliced = async {
        let server = tokio::net::TcpStream::connect(server).await?;
        let (mut server_read, mut server_write) = server.into_split();
        match route {
            Route::Tcp(bridge) => {
                let bridge = tokio::net::TcpStream::connect(bridge).await?;
                let (mut bridge_read, mut bridge_write) = bridge.into_split();
                let down = tokio::io::copy(&mut server_read, &mut bridge_write);
                let up = async {
                    let mut buffer = vec![0u8; 256 * 1024];
                    loop {
                        let n = bridge_read.read(&mut buffer).await?;
                        if n == 0 {
                            return Ok::<(), std::io::Error>(());
                        }
                        state.taken.store(true, Ordering::SeqCst);
                        server_write.write_all(&buffer[..n]).await?;
                    }
                };
                tokio::select! {
                    _ = down => {}
                    _ = up => {}
                }
            }
            Route::WebSocket(url) => {
                let mut request = url.into_client_request().map_err(std::io::Error::other)?;
                request
                    .headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
                let (socket, _) = tokio_tungstenite::connect_async(request)
                    .await
                    .map_err(std::io::Error::other)?;
                let (mut sink, mut stream) = socket.split();
                let down = async {
                    loop {
                        let mut buffer = vec![0u8; 256 * 1024];
                        let n = server_read.read(&mut buffer).await?;
                        if n == 0 {
                            let _ = sink.close().await;
                            return Ok::<(), std::io::Error>(());
                        }
                        buffer.truncate(n);
                        sink.send(Message::Binary(Bytes::from(buffer)))
                            .await
                            .map_err(std::io::Error::other)?;
                    }
                };
                let up = async {
                    while let Some(message) = stream.next().await {
                        match message.map_err(std::io::Error::other)? {
                            Message::Binary(bytes) => {
                                state.taken.store(true, Ordering::SeqCst);
                                server_write.write_all(&bytes).await?;
                            }
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    Ok::<(), std::io::Error>(())
                };
                tokio::select! {
                    _ = down => {}
                    _ = up => {}
                }
            }
        }
        Ok::<(), std::io::Error>(())
    };
    if let Err(error) = spliced.await {
        eprintln!("provider session failed: {error}");
    }
    state.ended.store(true, Ordering::SeqCst);
}

/// The page: keeps one idle provider session open, and opens the next when
/// the current one is taken (or ends). Stops when dropped.
struct Feeder {
    /// Runs the sessions; dropped with the feeder, and their sockets close.
    _runtime: tokio::runtime::Runtime,
    stop: Option<oneshot::Sender<()>>,
    taken: Arc<AtomicUsize>,
}

impl Feeder {
    fn start(route: Route, server: SocketAddr) -> Feeder {
        let runtime = runtime();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&taken);
        runtime.spawn(async move {
            // Bounded: far more sessions than any test uses.
            for _ in 0..1000 {
                let state = Arc::new(SessionState::default());
                tokio::spawn(provider_session(route.clone(), server, Arc::clone(&state)));
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                    if state.taken.load(Ordering::SeqCst) {
                        counter.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    if state.ended.load(Ordering::SeqCst) {
                        // Not taken: the bridge refused or dropped it.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                }
            }
        });
        Feeder {
            _runtime: runtime,
            stop: Some(stop),
            taken,
        }
    }

    /// Sessions a client has taken so far.
    fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `nbd-std serve` with a file export holding random data; returns the
/// server, the directory and the data file.
fn serve_random_disk() -> (Server, TempDir, std::path::PathBuf) {
    let dir = temp_dir();
    let disk = dir.path().join("disk.img");
    write_urandom_file(&disk, SIZE);
    let server = Server::start([
        "--export".to_owned(),
        format!("disk=file:{}", disk.display()),
    ]);
    (server, dir, disk)
}

// ---------------------------------------------------------------------------
// Tests

/// nbdinfo, nbdcopy (equal checksum) and qemu-io (a write, read back by a
/// second connection) through the bridge, providers arriving by `route`.
fn exercise(bridge: &Bridge, route: Route) {
    let (mut server, dir, disk) = serve_random_disk();
    let feeder = Feeder::start(route, server.addr());

    let info = run_ok(
        tool("nbdinfo").arg("--json").arg(bridge.uri()),
        COMMAND_TIMEOUT,
    );
    let json: serde_json::Value = serde_json::from_str(&info.stdout).expect("nbdinfo JSON");
    assert_eq!(
        json["exports"][0]["export-size"].as_u64(),
        Some(SIZE),
        "{}",
        info.stdout
    );

    let copy = dir.path().join("copy.bin");
    let started = Instant::now();
    run_ok(
        tool("nbdcopy").arg(bridge.uri()).arg(&copy),
        COMMAND_TIMEOUT,
    );
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "nbdcopy read {SIZE} bytes through the bridge in {seconds:.2} s ({:.1} MiB/s)",
        SIZE as f64 / seconds / f64::from(1 << 20)
    );
    assert_eq!(sha256(&copy), sha256(&disk), "nbdcopy read other bytes");

    for commands in [
        &["write -P 0x5c 1M 64k", "read -P 0x5c 1M 64k"][..],
        &["read -P 0x5c 1M 64k"][..],
    ] {
        let mut command = tool("qemu-io");
        command.args(["-f", "raw"]);
        for c in commands {
            command.args(["-c", c]);
        }
        let out = run_ok(command.arg(bridge.uri()), COMMAND_TIMEOUT);
        let text = (out.stdout.clone() + &out.stderr).to_lowercase();
        assert!(
            !text.contains("fail") && !text.contains("error"),
            "{}",
            out.describe()
        );
    }
    // nbdinfo, qemu-io twice, nbdcopy at least once (more with multi-conn).
    assert!(feeder.taken() >= 4, "{} sessions taken", feeder.taken());
    drop(feeder);
    server.stop();
    let mut written = vec![0u8; 64 * 1024];
    let mut file = File::open(&disk).expect("open the disk");
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(1 << 20)).expect("seek");
    file.read_exact(&mut written).expect("read the disk");
    assert!(written.iter().all(|&b| b == 0x5c), "the write did not land");
    let log = bridge.log();
    assert!(log.contains("paired with provider"), "{log}");
    assert!(log.contains("bytes provider to client"), "{log}");
}

#[test]
fn tcp_providers_serve_real_clients() {
    if !have_tools(&["nbdinfo", "nbdcopy", "qemu-io", "sha256sum"]) {
        return;
    }
    let bridge = Bridge::start();
    exercise(&bridge, Route::Tcp(bridge.providers_addr()));
}

#[test]
fn websocket_providers_serve_real_clients() {
    if !have_tools(&["nbdinfo", "nbdcopy", "qemu-io", "sha256sum"]) {
        return;
    }
    let bridge = Bridge::start();
    exercise(&bridge, Route::WebSocket(bridge.websocket_url()));
    assert!(bridge.log().contains("(WebSocket 127.0.0.1:"));
}

#[test]
fn providers_through_websockify_serve_real_clients() {
    if !have_tools(&["websockify", "nbdinfo", "nbdcopy", "qemu-io", "sha256sum"]) {
        return;
    }
    let bridge = Bridge::start();
    let websockify = Websockify::start(bridge.providers_addr());
    exercise(
        &bridge,
        Route::WebSocket(format!("ws://127.0.0.1:{}/", websockify.port)),
    );
}

#[test]
fn a_client_without_provider_is_refused_within_the_wait() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let bridge = Bridge::start();
    let started = Instant::now();
    let out = run(tool("nbdinfo").arg(bridge.uri()), Duration::from_secs(10));
    let elapsed = started.elapsed();
    assert!(!out.success(), "nbdinfo succeeded\n{}", out.describe());
    // --wait 1, plus a second for process start and slack.
    assert!(
        elapsed < Duration::from_secs(2),
        "refused after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "refused after {elapsed:?}, before the wait"
    );
    assert!(
        wait_until(Duration::from_secs(5), || bridge
            .log()
            .contains("no browser session available")),
        "{}",
        bridge.log()
    );
}

#[test]
fn a_client_waits_for_a_provider_that_arrives_in_time() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let bridge = Bridge::start();
    let server = Server::start_default();
    let runtime = runtime();
    let route = Route::Tcp(bridge.providers_addr());
    let addr = server.addr();
    let state = Arc::new(SessionState::default());
    let late = Arc::clone(&state);
    runtime.spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        provider_session(route, addr, late).await;
    });
    run_ok(tool("nbdinfo").arg(bridge.uri()), COMMAND_TIMEOUT);
    assert!(state.taken.load(Ordering::SeqCst));
}

#[test]
fn each_client_takes_its_own_provider_oldest_first() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let bridge = Bridge::start();
    let server = Server::start_default();
    let runtime = runtime();
    let states: Vec<Arc<SessionState>> = (0..2)
        .map(|n| {
            let state = Arc::new(SessionState::default());
            let route = Route::Tcp(bridge.providers_addr());
            runtime.spawn(provider_session(route, server.addr(), Arc::clone(&state)));
            // Connected in order, so the pool's order is known.
            let pattern = format!("provider {} (TCP", n + 1);
            assert!(
                wait_until(Duration::from_secs(5), || bridge.log().contains(&pattern)),
                "{}",
                bridge.log()
            );
            state
        })
        .collect();

    run_ok(tool("nbdinfo").arg(bridge.uri()), COMMAND_TIMEOUT);
    assert!(
        states[0].taken.load(Ordering::SeqCst),
        "the oldest went first"
    );
    assert!(!states[1].taken.load(Ordering::SeqCst));
    run_ok(tool("nbdinfo").arg(bridge.uri()), COMMAND_TIMEOUT);
    assert!(states[1].taken.load(Ordering::SeqCst));
    // Both used: a third client is refused.
    let third = run(tool("nbdinfo").arg(bridge.uri()), COMMAND_TIMEOUT);
    assert!(!third.success(), "{}", third.describe());
    let log = bridge.log();
    assert!(log.contains("session 1 ended"), "{log}");
    assert!(log.contains("session 2 ended"), "{log}");
}

#[test]
fn a_provider_gone_while_idle_is_not_handed_out() {
    if !have_tools(&["nbdinfo"]) {
        return;
    }
    let bridge = Bridge::start();
    let server = Server::start_default();
    // Not a server: if the bridge handed this one out, nbdinfo would fail.
    let mut gone = TcpStream::connect(bridge.providers_addr()).expect("connect");
    gone.write_all(b"not an NBD greeting").expect("write");
    assert!(
        wait_until(Duration::from_secs(5), || bridge
            .log()
            .contains("provider 1 (TCP")),
        "{}",
        bridge.log()
    );
    drop(gone);
    assert!(
        wait_until(Duration::from_secs(5), || bridge
            .log()
            .contains("closed while idle; 0 idle")),
        "{}",
        bridge.log()
    );
    // One more, closed just before the client comes.
    let mut late = TcpStream::connect(bridge.providers_addr()).expect("connect");
    late.write_all(b"garbage").expect("write");
    assert!(
        wait_until(Duration::from_secs(5), || bridge
            .log()
            .contains("provider 2 (TCP")),
        "{}",
        bridge.log()
    );
    let runtime = runtime();
    let state = Arc::new(SessionState::default());
    runtime.spawn(provider_session(
        Route::Tcp(bridge.providers_addr()),
        server.addr(),
        Arc::clone(&state),
    ));
    assert!(
        wait_until(Duration::from_secs(5), || bridge.log().contains("; 2 idle")),
        "{}",
        bridge.log()
    );
    drop(late);
    thread::sleep(Duration::from_millis(50));
    run_ok(tool("nbdinfo").arg(bridge.uri()), COMMAND_TIMEOUT);
    assert!(state.taken.load(Ordering::SeqCst));
}

#[test]
fn a_provider_sending_too_much_while_idle_is_dropped() {
    let bridge = Bridge::start();
    let mut chatty = TcpStream::connect(bridge.providers_addr()).expect("connect");
    // Written from a thread: the bridge may close before taking it all.
    let mut writer = chatty.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&vec![0x55u8; 70 * 1024]);
    });
    let (_, closed) = read_until_closed(&mut chatty, Duration::from_secs(5));
    assert!(closed, "the bridge kept a provider that sent 70 KiB");
    sender.join().expect("writer thread");
    assert!(
        wait_until(Duration::from_secs(5), || bridge
            .log()
            .contains("sent more than 65536 bytes")),
        "{}",
        bridge.log()
    );
}

#[test]
fn sigterm_closes_sessions_and_exits_0() {
    let mut bridge = Bridge::start();
    let mut idle = TcpStream::connect(bridge.providers_addr()).expect("connect");
    // A page's idle WebSocket session gets a close frame, "going away".
    let runtime = runtime();
    let url = bridge.websocket_url();
    let close = runtime.spawn(async move {
        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket to the bridge");
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(error)) => panic!("no close frame: {error}"),
                None => panic!("closed without a close frame"),
            }
        }
    });
    assert!(
        wait_until(Duration::from_secs(5), || bridge.log().contains("2 idle")),
        "{}",
        bridge.log()
    );
    let started = Instant::now();
    let status = bridge.signal_and_wait("TERM").expect("exit after SIGTERM");
    assert!(status.success(), "{status}\n{}", bridge.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(5));
    assert!(closed, "the idle provider was left open");
    let code = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), close).await })
        .expect("close frame in time")
        .expect("WebSocket task");
    assert_eq!(code, Some(1001), "close code");
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["bridge", "--wait", "soon"][..],
        &["bridge", "--ws", "not-an-address", "--port", "0"][..],
    ] {
        let out = run(Command::new(server_binary()).args(args), COMMAND_TIMEOUT);
        assert_eq!(out.code(), Some(2), "{}", out.describe());
    }
}
