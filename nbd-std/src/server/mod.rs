//! The NBD server: accepts clients on TCP or a unix socket and drives one
//! protocol-core connection per client.
//!
//! Stopping: when the `shutdown` channel turns true the server stops
//! accepting, every connection refuses new requests (`NBD_ESHUTDOWN`) and
//! ends once its requests in flight are answered (those still open after
//! [`ServerLimits::drain_timeout`] are dropped), then every export is
//! flushed.
//!
//! Limits ([`ServerLimits`]): beyond `max_clients` a new connection is
//! accepted and closed at once; a client that has not selected an export
//! within `handshake_timeout` is dropped.

pub mod budget;
mod connection;
mod gathering;
mod io_threads;
pub mod limits;
mod poll_window;
mod read_ring;
mod socket;
mod storage;

pub use budget::ServerBudget;
pub use limits::{LoopbackCongestion, ServerLimits};

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_core::server::Config;
#[cfg(feature = "tls")]
use nbd_core::server::TlsPolicy;
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::export::ExportSet;
use crate::metrics::{HandshakeFailure, Limit, Metrics};
#[cfg(feature = "tls")]
use crate::tls::ServerTls;
pub use gathering::DEFAULT_GATHER_WAIT_MICROS;
use gathering::Gathering;
use io_threads::IoThreads;
pub use poll_window::DEFAULT_POLL_WINDOW_MICROS;
use poll_window::PollWindow;
use socket::PlainSocket;

/// Connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`). mio's default, 128, overflows when a few hundred
/// clients connect at once: the kernel drops the excess SYNs and those
/// clients wait a second for their retransmission.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A unix-domain socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener (the first address `address` resolves to that
    /// binds), with a listen backlog of [`LISTEN_BACKLOG`].
    pub async fn bind_tcp(address: &str, port: u16) -> io::Result<Self> {
        let mut last_error = None;
        for address in tokio::net::lookup_host((address, port)).await? {
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // As std and mio do: a restarted server binds even while its
            // old connections linger in TIME_WAIT.
            socket.set_reuseaddr(true)?;
            match socket
                .bind(address)
                .and_then(|()| socket.listen(LISTEN_BACKLOG))
            {
                Ok(listener) => return Ok(Self::Tcp(listener)),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the address resolves to nothing",
            )
        }))
    }

    /// Binds a unix-socket listener, replacing a stale socket file.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path)?;
        }
        UnixListener::bind(path).map(Self::Unix)
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Self::Unix(listener) => listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "unix socket".to_owned()),
        }
    }
}

/// A server over a set of exports.
#[derive(Debug, Clone)]
pub struct Server {
    exports: Arc<ExportSet>,
    config: Config,
    /// Credentials for `NBD_OPT_STARTTLS`; `None`: TLS disabled.
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
    limits: ServerLimits,
    budget: Arc<ServerBudget>,
    /// `--metrics`: counters of connections and requests.
    metrics: Option<Arc<Metrics>>,
    /// Threads running connections (see [`Server::with_io_threads`]).
    io_threads: usize,
    /// See [`Server::with_poll_window`].
    poll_window: Duration,
    /// See [`Server::with_gather_wait`].
    gather_wait: Duration,
}

/// I/O threads by default: one per CPU the process may run on.
fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

impl Server {
    /// A server of `exports` with protocol settings `config`.
    pub fn new(exports: ExportSet, config: Config) -> Self {
        Self {
            exports: Arc::new(exports),
            config,
            #[cfg(feature = "tls")]
            tls: None,
            limits: ServerLimits::default(),
            budget: Arc::new(ServerBudget::new(ServerLimits::default().server_memory)),
            metrics: None,
            io_threads: default_io_threads(),
            poll_window: Duration::from_micros(DEFAULT_POLL_WINDOW_MICROS),
            gather_wait: Duration::from_micros(DEFAULT_GATHER_WAIT_MICROS),
        }
    }

    /// Runs connections on `count` threads of their own, each with a
    /// single-threaded event loop (a connection stays on one; default:
    /// one per CPU). `0` runs them as tasks of the runtime that runs the
    /// server instead.
    #[must_use]
    pub fn with_io_threads(mut self, count: usize) -> Self {
        self.io_threads = count;
        self
    }

    /// How long a connection alone on its I/O thread, with nothing in
    /// flight, polls its socket for the next request before the thread
    /// sleeps (default [`DEFAULT_POLL_WINDOW_MICROS`]; zero: never). A client
    /// sending one request at a time then finds the thread awake instead
    /// of waking it, which on an idle machine can cost more than serving
    /// the request; the window shrinks to nothing for a client that
    /// pauses. Only with I/O threads.
    #[must_use]
    pub fn with_poll_window(mut self, longest: Duration) -> Self {
        self.poll_window = longest;
        self
    }

    /// How long replies held for a client with several requests in
    /// flight may wait for its next ones, the socket holding none, so
    /// that more go out together (default [`DEFAULT_GATHER_WAIT_MICROS`];
    /// zero: never). Each connection alone on its I/O thread measures
    /// whether waiting serves its client quicker, now and then, and waits
    /// only if so. Only with I/O threads.
    #[must_use]
    pub fn with_gather_wait(mut self, longest: Duration) -> Self {
        self.gather_wait = longest;
        self
    }

    /// The same server counting connections and requests in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The same server with other limits (maximum clients, handshake
    /// timeout).
    #[must_use]
    pub fn with_limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self.budget = Arc::new(ServerBudget::new(limits.server_memory));
        self
    }

    /// The request payload bytes held by all connections now.
    pub fn budget(&self) -> &Arc<ServerBudget> {
        &self.budget
    }

    /// The limits in force.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Offers TLS with `tls`'s credentials (`--tls on`), or insists on it
    /// (`required`, `--tls require`: options other than `NBD_OPT_STARTTLS`
    /// and `NBD_OPT_ABORT` get `NBD_REP_ERR_TLS_REQD`). Needs the `tls`
    /// feature; without it the server answers `NBD_OPT_STARTTLS` with
    /// `NBD_REP_ERR_POLICY`.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: ServerTls, required: bool) -> Self {
        self.config.tls = if required {
            TlsPolicy::Required
        } else {
            TlsPolicy::Optional
        };
        self.tls = Some(tls);
        self
    }

    /// The exports served.
    pub fn exports(&self) -> &ExportSet {
        &self.exports
    }

    /// Accepts clients until `shutdown` turns true, then lets connections
    /// finish and flushes every export.
    pub async fn run(
        &self,
        listener: Listener,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        info!("listening on {}", listener.describe());
        // Rings only where a read can wait for a file's disk.
        let reads_files = self
            .exports
            .exports()
            .iter()
            .any(|export| export.backend.page_cache_file().is_some());
        let io_threads = match self.io_threads {
            0 => None,
            count => Some(IoThreads::start(count, reads_files)?),
        };
        let mut connections = JoinSet::new();
        let mut next_id: u64 = 0;
        let mut watching = true;
        let mut refusals = Refusals::default();
        while !*shutdown.borrow() {
            tokio::select! {
                accepted = accept(&listener) => match accepted {
                    Ok(client) => {
                        // Count only live connections: reap those that ended.
                        while let Some(finished) = connections.try_join_next() {
                            report(finished);
                        }
                        if connections.len() >= self.limits.max_clients {
                            // Closing at once: the client sees the connection
                            // end instead of waiting in the listen backlog.
                            refusals.refused(&client.peer, self.limits.max_clients);
                            if let Some(metrics) = &self.metrics {
                                metrics.refused(Limit::MaxClients);
                            }
                            drop(client);
                            continue;
                        }
                        next_id += 1;
                        self.spawn(
                            &mut connections,
                            io_threads.as_ref(),
                            client,
                            next_id,
                            shutdown.clone(),
                        );
                    }
                    Err(error) => {
                        // Out of descriptors and the like: wait instead of spinning.
                        warn!("accept failed: {error}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                Some(finished) = connections.join_next(), if !connections.is_empty() => report(finished),
                changed = shutdown.changed(), if watching => {
                    // A dropped sender can never stop the server: serve on.
                    watching = changed.is_ok();
                }
            }
        }
        info!(
            "stopped accepting; {} connections finishing",
            connections.len()
        );
        let drain = async {
            while let Some(finished) = connections.join_next().await {
                report(finished);
            }
        };
        if tokio::time::timeout(self.limits.drain_timeout, drain)
            .await
            .is_err()
        {
            warn!(
                "{} connections still busy after {:?}: dropping them",
                connections.len(),
                self.limits.drain_timeout
            );
            connections.shutdown().await;
        }
        self.flush_all().await;
        if let Some(io_threads) = io_threads {
            io_threads.stop().await;
        }
        Ok(())
    }

    fn spawn(
        &self,
        connections: &mut JoinSet<()>,
        io_threads: Option<&IoThreads>,
        client: Client,
        id: u64,
        shutdown: watch::Receiver<bool>,
    ) {
        let span = info_span!("client", id, peer = %client.peer);
        let peer = client.peer;
        let (negotiated, selected) = oneshot::channel();
        let placement = io_threads.and_then(IoThreads::place);
        let thread_share = placement.as_ref().map(|(_, place)| place.share());
        let read_ring = placement.as_ref().and_then(|(_, place)| place.read_ring());
        let poll_window = thread_share
            .as_ref()
            .and_then(|_| PollWindow::new(self.poll_window));
        let gathering = thread_share
            .as_ref()
            .and_then(|_| Gathering::new(self.gather_wait));
        let parts = ClientParts {
            exports: Arc::clone(&self.exports),
            config: self.config,
            #[cfg(feature = "tls")]
            tls: self.tls.as_ref().map(ServerTls::acceptor),
            #[cfg(not(feature = "tls"))]
            tls: None,
            shutdown,
            negotiated,
            selected,
            timeout: self.limits.handshake_timeout,
            settings: connection::Settings {
                server_memory: Arc::clone(&self.budget),
                connection_memory: self.limits.connection_memory,
                idle_timeout: self.limits.idle_timeout,
                client: client.address,
                metrics: self.metrics.as_ref().map(Metrics::connection),
                poll_window,
                gathering,
                thread_share,
                read_ring,
            },
            server_metrics: self.metrics.clone(),
        };
        match client.stream {
            Stream::Tcp(stream) => {
                if let Err(error) = stream.set_nodelay(true) {
                    warn!("cannot set TCP_NODELAY for {peer}: {error}");
                }
                if let Some(idle) = self.limits.keepalive
                    && let Err(error) = set_keepalive(&stream, idle)
                {
                    warn!("cannot set TCP keepalive for {peer}: {error}");
                }
                if self.limits.loopback_congestion == LoopbackCongestion::Cubic {
                    match unpaced_on_loopback(&stream) {
                        Ok(Some(algorithm)) => {
                            debug!("{peer}: same host, {algorithm} in place of BBR")
                        }
                        Ok(None) => {}
                        Err(error) => debug!("{peer}: congestion control left as it was: {error}"),
                    }
                }
                spawn_client(
                    connections,
                    stream,
                    placement,
                    parts,
                    span,
                    &peer,
                    (
                        tokio::net::TcpStream::into_std,
                        tokio::net::TcpStream::from_std,
                    ),
                );
            }
            Stream::Unix(stream) => spawn_client(
                connections,
                stream,
                placement,
                parts,
                span,
                &peer,
                (
                    tokio::net::UnixStream::into_std,
                    tokio::net::UnixStream::from_std,
                ),
            ),
        }
    }

    /// Flushes every writable export so nothing acknowledged stays volatile.
    async fn flush_all(&self) {
        for served in self.exports.exports().iter().filter(|e| !e.read_only) {
            let backend = Arc::clone(&served.backend);
            let name = served.name.clone();
            match tokio::task::spawn_blocking(move || backend.flush()).await {
                Ok(Ok(())) => info!("export `{name}` flushed"),
                Ok(Err(error)) => error!("flushing export `{name}` failed: {error}"),
                Err(error) => error!("flushing export `{name}` panicked: {error}"),
            }
        }
    }
}

/// Turns TCP keepalive on: probes after `idle` of silence, so a peer
/// gone without a FIN (power cut, cable, NAT timeout) is found and its
/// connection reclaimed.
fn set_keepalive(stream: &tokio::net::TcpStream, idle: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, idle)?;
    sockopt::set_tcp_keepintvl(stream, limits::KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(stream, limits::KEEPALIVE_PROBES)?;
    Ok(())
}

/// Gives a TCP connection whose two ends are on this host cubic (or
/// reno) in place of BBR; see [`LoopbackCongestion::Cubic`]. 1 MiB reads
/// at QD1 from a memory export went from 3,511 MiB/s at 280 µs of server
/// CPU a MiB to 4,565 at 217, medians unpinned (docs/BENCHMARKS.md).
/// Returns the algorithm set, if any.
fn unpaced_on_loopback(stream: &tokio::net::TcpStream) -> io::Result<Option<&'static str>> {
    use rustix::net::sockopt;
    let peer = stream.peer_addr()?.ip().to_canonical();
    if !(peer.is_loopback() || peer == stream.local_addr()?.ip().to_canonical()) {
        return Ok(None);
    }
    if !sockopt::tcp_congestion(stream)?.starts_with("bbr") {
        return Ok(None);
    }
    match sockopt::set_tcp_congestion(stream, "cubic") {
        Ok(()) => Ok(Some("cubic")),
        Err(_) => {
            sockopt::set_tcp_congestion(stream, "reno")?;
            Ok(Some("reno"))
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

struct Client {
    stream: Stream,
    peer: String,
    /// The peer's IP address (`unix` for unix sockets): who the client is
    /// for `writers=exclusive`.
    address: String,
}

async fn accept(listener: &Listener) -> io::Result<Client> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            Ok(Client {
                stream: Stream::Tcp(stream),
                peer: peer.to_string(),
                address: peer.ip().to_canonical().to_string(),
            })
        }
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            Ok(Client {
                stream: Stream::Unix(stream),
                peer: "unix".to_owned(),
                address: "unix".to_owned(),
            })
        }
    }
}

/// What a connection needs besides its socket.
struct ClientParts {
    exports: Arc<ExportSet>,
    config: Config,
    tls: Option<connection::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    negotiated: oneshot::Sender<()>,
    selected: oneshot::Receiver<()>,
    timeout: Option<Duration>,
    settings: connection::Settings,
    server_metrics: Option<Arc<Metrics>>,
}

/// Serves one client on `stream` under the handshake deadline.
/// How a socket leaves one runtime as a std socket and joins another.
type SocketMove<S, Std> = (fn(S) -> io::Result<Std>, fn(Std) -> io::Result<S>);

/// Serves a client on the accepting runtime or, placed on an I/O thread,
/// on that thread's own event loop: the socket leaves this runtime as a
/// std socket and joins the thread's there (`(into_std, from_std)`).
fn spawn_client<S, Std>(
    connections: &mut JoinSet<()>,
    stream: S,
    placement: Option<(&tokio::runtime::Handle, io_threads::Placement)>,
    parts: ClientParts,
    span: tracing::Span,
    peer: &str,
    (into_std, from_std): SocketMove<S, Std>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static + PlainSocket,
    Std: Send + 'static,
{
    let Some((runtime, place)) = placement else {
        connections.spawn(serve_client(stream, parts).instrument(span));
        return;
    };
    match into_std(stream) {
        Ok(stream) => {
            let moved = async move {
                let _place = place;
                match from_std(stream) {
                    Ok(stream) => serve_client(stream, parts).await,
                    Err(error) => warn!("cannot serve the connection: {error}"),
                }
            };
            connections.spawn_on(moved.instrument(span), runtime);
        }
        Err(error) => {
            warn!("cannot hand the connection from {peer} to an I/O thread: {error}")
        }
    }
}

async fn serve_client<S>(stream: S, parts: ClientParts)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + PlainSocket,
{
    let connection = Box::pin(connection::run(
        stream,
        parts.exports,
        parts.config,
        parts.tls,
        parts.shutdown,
        parts.negotiated,
        parts.settings,
    ));
    handshake_deadline(
        connection,
        parts.selected,
        parts.timeout,
        parts.server_metrics,
    )
    .await;
}

/// Runs `connection`, dropping it (which closes its socket, TLS session
/// included) when it has not selected an export within `timeout`.
/// `selected` fires when it does, or closes when the connection ends.
///
/// The connection comes boxed: held by value, this future would keep up
/// to three copies of it (argument, pinned local, awaited).
async fn handshake_deadline<F: Future<Output = ()>>(
    mut connection: Pin<Box<F>>,
    selected: oneshot::Receiver<()>,
    timeout: Option<Duration>,
    metrics: Option<Arc<Metrics>>,
) {
    let Some(timeout) = timeout else {
        return connection.await;
    };
    tokio::select! {
        biased;
        () = &mut connection => {}
        reached = tokio::time::timeout(timeout, selected) => match reached {
            Ok(_) => connection.await,
            Err(_) => {
                info!("no export selected within {timeout:?}: connection dropped");
                if let Some(metrics) = metrics {
                    metrics.refused(Limit::HandshakeTimeout);
                    metrics.handshake_failed(HandshakeFailure::Timeout);
                }
            }
        },
    }
}

/// Logs refused connections at most once a second, so a flood of them
/// cannot flood the log.
#[derive(Default)]
struct Refusals {
    logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, peer: &str, max_clients: usize) {
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        warn!(
            "{max_clients} clients connected (--max-clients): closed the connection from {peer}{}",
            match self.unlogged {
                0 => String::new(),
                n => format!(" and {n} more since the last message"),
            }
        );
        self.logged = Some(now);
        self.unlogged = 0;
    }
}

fn report(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        error!("connection task failed: {error}");
    }
}

#[cfg(test)]
mod tests {
    use nbd_core::wire::{
        ClientFlags, GREETING_LEN, Greeting, HandshakeFlags, OPTION_HEADER_LEN,
        OPTION_REPLY_HEADER_LEN, OptionCode, OptionHeader, OptionReplyHeader, OptionReplyType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;
    use crate::export::ExportSpec;

    /// Sends an option without data and reads the header of its reply
    /// (skipping the reply's message).
    async fn option(stream: &mut UnixStream, code: OptionCode) -> OptionReplyHeader {
        let mut request = [0; OPTION_HEADER_LEN];
        let header = OptionHeader { code, length: 0 };
        let written = header.encode(&mut request).expect("option header");
        stream.write_all(&request[..written]).await.expect("send");
        let mut reply = [0; OPTION_REPLY_HEADER_LEN];
        stream.read_exact(&mut reply).await.expect("reply");
        let (_, reply) = OptionReplyHeader::parse(&reply).expect("reply header");
        let mut message = vec![0; usize::try_from(reply.length).expect("length")];
        stream.read_exact(&mut message).await.expect("reply data");
        reply
    }

    /// A server without TLS credentials (so every server of a build
    /// without the `tls` feature) refuses `NBD_OPT_STARTTLS` with
    /// `NBD_REP_ERR_POLICY` and goes on negotiating in clear (spec: "TLS
    /// support", NOTLS mode).
    #[tokio::test]
    async fn starttls_without_tls_is_refused_and_negotiation_goes_on() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("nbd.sock");
        let export = ExportSpec::parse("disk=memory:1M")
            .expect("spec")
            .open()
            .expect("open");
        let server =
            Server::new(ExportSet::new(vec![export]), Config::default()).with_io_threads(0);
        let listener = Listener::bind_unix(&path).expect("bind");
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(async move { server.run(listener, shutdown).await });

        let mut stream = UnixStream::connect(&path).await.expect("connect");
        let mut greeting = [0; GREETING_LEN];
        stream.read_exact(&mut greeting).await.expect("greeting");
        let (_, greeting) = Greeting::parse(&greeting).expect("newstyle greeting");
        assert!(greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE));
        let mut flags = [0; ClientFlags::ENCODED_LEN];
        let written = ClientFlags::FIXED_NEWSTYLE
            .encode(&mut flags)
            .expect("client flags");
        stream.write_all(&flags[..written]).await.expect("send");

        let reply = option(&mut stream, OptionCode::StartTls).await;
        assert_eq!(reply.option, OptionCode::StartTls);
        assert_eq!(reply.reply_type, OptionReplyType::ErrPolicy);
        let reply = option(&mut stream, OptionCode::Abort).await;
        assert_eq!(reply.option, OptionCode::Abort);
        assert_eq!(reply.reply_type, OptionReplyType::Ack);

        stop.send(true).expect("server running");
        serving.await.expect("server task").expect("server");
    }

    /// A client keeping several 1 MiB reads in flight gets the file's
    /// bytes, and once it is idle the read buffers its connection kept
    /// (held in the budget) are given back while it stays connected.
    #[cfg(feature = "client")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spare_read_buffers_go_back_to_the_budget_when_idle() {
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir().expect("temporary directory");
        let image = dir.path().join("disk.img");
        let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 253) as u8).collect();
        std::fs::write(&image, &data).expect("image");
        let export = ExportSpec::parse(&format!("disk=file:{}", image.display()))
            .expect("spec")
            .open()
            .expect("open");
        let path = dir.path().join("nbd.sock");
        let server = Server::new(ExportSet::new(vec![export]), Config::default());
        let budget = Arc::clone(server.budget());
        let listener = Listener::bind_unix(&path).expect("bind");
        let (stop, shutdown) = watch::channel(false);
        let serving = tokio::spawn(async move { server.run(listener, shutdown).await });

        let uri = format!("nbd+unix:///disk?socket={}", path.display());
        let client = crate::client::Client::connect(&uri).await.expect("connect");
        for round in 0..4 {
            let mut reads = JoinSet::new();
            for i in 0..8 {
                let client = client.clone();
                let offset = ((round * 8 + i) % 16) * MIB;
                reads.spawn(async move {
                    let got = client
                        .read_owned(vec![0; MIB], offset as u64)
                        .await
                        .expect("read");
                    (offset, got)
                });
            }
            while let Some(read) = reads.join_next().await {
                let (offset, got) = read.expect("read task");
                assert!(got == data[offset..offset + MIB], "read at {offset}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while budget.used() != 0 {
            assert!(
                Instant::now() < deadline,
                "{} bytes still held by an idle connection",
                budget.used()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client.disconnect().await.expect("disconnect");
        stop.send(true).expect("server running");
        serving.await.expect("server task").expect("server");
    }

    /// A connected pair over loopback: (server end, client end).
    async fn loopback_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (server, client)
    }

    #[tokio::test]
    async fn a_loopback_connection_under_bbr_gets_cubic_and_others_are_left() {
        use rustix::net::sockopt;
        let (server, _client) = loopback_pair().await;
        if let Err(error) = sockopt::set_tcp_congestion(&server, "bbr") {
            eprintln!("SKIPPED: this kernel does not let the test choose bbr: {error}");
            return;
        }
        let set = unpaced_on_loopback(&server).expect("congestion control");
        let now = sockopt::tcp_congestion(&server).expect("read back");
        assert!(matches!(set, Some("cubic" | "reno")), "{set:?}");
        assert_eq!(Some(now.as_str()), set);

        // Not BBR: left as it is.
        let (server, _client) = loopback_pair().await;
        sockopt::set_tcp_congestion(&server, "reno").expect("reno is always built in");
        assert_eq!(unpaced_on_loopback(&server).expect("checked"), None);
        assert_eq!(sockopt::tcp_congestion(&server).expect("read back"), "reno");
    }
}
