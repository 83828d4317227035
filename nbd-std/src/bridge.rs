//! The bridge between NBD clients and browser-hosted exports
//! (`nbd-std bridge`).
//!
//! A browser page that serves a disk is an NBD *server*, but a page cannot
//! listen on a TCP port. So the page connects out, to the bridge, and the
//! bridge listens for the real NBD clients (nbdinfo, qemu, nbd-client) and
//! pairs each with one waiting browser connection:
//!
//! ```text
//! NBD client ──TCP──▶ bridge (--port) ◀──WebSocket (--ws)───────────── page
//!                                      ◀──TCP (--providers)◀ websockify ◀ page
//! ```
//!
//! Each browser connection, a *provider session*, speaks NBD as the server
//! from its first byte: it sends the newstyle greeting at once, before any
//! client exists. The bridge keeps idle providers in a pool, oldest first,
//! buffering what they send (at most [`MAX_IDLE_BYTES`]) and dropping any
//! that close. A client takes the oldest idle provider: the bridge first
//! sends the client the provider's buffered bytes (the greeting), then
//! relays both ways until one side closes, then closes the other. The page
//! sees its session taken when the first client bytes arrive and opens a
//! new idle one. A client that finds no provider within the configured
//! wait is closed at once: a clean refusal, never a hang.
//!
//! The bridge never parses NBD: it moves bytes, one WebSocket message per
//! read of up to [`RELAY_CHUNK`] bytes.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tracing::{debug, info, warn};

/// Most bytes an idle provider may send before a client takes it. The
/// greeting is 18 bytes; a provider that sends more than this while nobody
/// listens is not speaking NBD, and is dropped.
pub const MAX_IDLE_BYTES: usize = 64 * 1024;

/// Most bytes read from one side in one go, and so the largest WebSocket
/// message the bridge sends. Large enough that a 32 MiB write costs 128
/// messages, small enough to keep per-session memory bounded.
pub const RELAY_CHUNK: usize = 256 * 1024;

/// Largest WebSocket message accepted from a browser. A browser may send a
/// whole NBD read reply (up to 32 MiB of data plus headers) as one message.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Most idle providers kept at once; more are closed on arrival, so a
/// runaway page cannot exhaust the bridge's file descriptors.
pub const MAX_IDLE_PROVIDERS: usize = 256;

/// How long a browser may take to finish the WebSocket handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing a session may take (a WebSocket close frame, a TCP
/// shutdown) before the connection is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long sessions get to close after a stop before their tasks are
/// dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Pause after a failed `accept` (out of file descriptors, say), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The WebSocket subprotocol websockify and jsnbd-style pages ask for.
const BINARY_SUBPROTOCOL: &str = "binary";

/// Where the bridge listens and how long a client waits for a provider.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// NBD clients: `HOST:PORT` or `[V6]:PORT`.
    pub clients: String,
    /// Browser providers over WebSocket: `HOST:PORT`.
    pub websocket: String,
    /// Browser providers over plain TCP (behind websockify), if wanted.
    pub providers: Option<String>,
    /// How long a client waits for an idle provider before it is closed.
    pub wait: Duration,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A listening socket could not be opened.
    #[error("cannot listen for {role} on {address}: {source}")]
    Listen {
        /// What the socket is for ("NBD clients", ...).
        role: &'static str,
        /// The address as given.
        address: String,
        /// The operating system's reason.
        source: io::Error,
    },
}

/// A bridge whose sockets are open; [`Bridge::run`] serves until stopped.
#[derive(Debug)]
pub struct Bridge {
    clients: TcpListener,
    websocket: TcpListener,
    providers: Option<TcpListener>,
    wait: Duration,
}

async fn listen(role: &'static str, address: &str) -> Result<TcpListener, BridgeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BridgeError::Listen {
            role,
            address: address.to_owned(),
            source,
        })
}

impl Bridge {
    /// Opens the listening sockets (nothing is accepted until
    /// [`run`](Bridge::run)).
    pub async fn bind(config: &BridgeConfig) -> Result<Bridge, BridgeError> {
        let clients = listen("NBD clients", &config.clients).await?;
        let websocket = listen("WebSocket providers", &config.websocket).await?;
        let providers = match &config.providers {
            Some(address) => Some(listen("TCP providers", address).await?),
            None => None,
        };
        Ok(Bridge {
            clients,
            websocket,
            providers,
            wait: config.wait,
        })
    }

    /// Where NBD clients connect.
    pub fn clients_addr(&self) -> io::Result<SocketAddr> {
        self.clients.local_addr()
    }

    /// Where browsers connect over WebSocket.
    pub fn websocket_addr(&self) -> io::Result<SocketAddr> {
        self.websocket.local_addr()
    }

    /// Where providers connect over plain TCP, if enabled.
    pub fn providers_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.providers.as_ref().map(TcpListener::local_addr)
    }

    /// Accepts clients and providers until `stop` turns true (or its sender
    /// is dropped), then closes every session and returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let pool = Arc::new(Pool::default());
        let mut tasks = JoinSet::new();
        // What each session watches, so it can close cleanly on a stop.
        let sessions = stop.clone();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                accepted = self.clients.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let pool = Arc::clone(&pool);
                        tasks.spawn(serve_client(stream, peer, pool, self.wait, sessions.clone()));
                    }
                    Err(error) => accept_failed("NBD client", &error).await,
                },
                accepted = self.websocket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let pool = Arc::clone(&pool);
                        tasks.spawn(websocket_provider(stream, peer, pool, sessions.clone()));
                    }
                    Err(error) => accept_failed("WebSocket provider", &error).await,
                },
                accepted = accept_optional(self.providers.as_ref()) => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let provider = Provider {
                            origin: Origin::Tcp(peer),
                            stream: ProviderStream::Tcp(stream),
                        };
                        let pool = Arc::clone(&pool);
                        tasks.spawn(provider_session(provider, pool, sessions.clone()));
                    }
                    Err(error) => accept_failed("TCP provider", &error).await,
                },
                // Reap finished sessions so the set does not grow.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let open = tasks.len();
        info!("stopping: closing {open} connection(s)");
        // Every task sees the stop and closes its sockets (pages get a
        // WebSocket close frame, "going away"); any still busy after the
        // timeout is dropped, which closes its sockets too.
        let finished = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(STOP_TIMEOUT, finished).await.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

async fn accept_optional(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Returns once the bridge is told to stop (or its controller is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn accept_failed(what: &str, error: &io::Error) {
    warn!("cannot accept a {what} connection: {error}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

// ---------------------------------------------------------------------------
// Providers

/// Where a provider session came from, for the logs.
#[derive(Clone, Debug)]
enum Origin {
    WebSocket { peer: SocketAddr, path: String },
    Tcp(SocketAddr),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::WebSocket { peer, path } => write!(f, "WebSocket {peer} {path}"),
            Origin::Tcp(peer) => write!(f, "TCP {peer}"),
        }
    }
}

/// A browser's connection, by either transport.
enum ProviderStream {
    WebSocket(Box<WebSocketStream<TcpStream>>),
    Tcp(TcpStream),
}

struct Provider {
    origin: Origin,
    stream: ProviderStream,
}

/// What one read gave.
enum Received {
    /// `n` bytes at the start of the caller's buffer (a TCP read).
    Read(usize),
    /// A WebSocket message's payload (no copy into the buffer).
    Message(Bytes),
    /// A WebSocket control message (ping, pong): nothing to relay.
    Nothing,
    Closed,
}

impl Received {
    /// The data received, if any.
    fn data<'a>(&'a self, buffer: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Received::Read(n) => Some(&buffer[..*n]),
            Received::Message(bytes) => Some(bytes),
            Received::Nothing | Received::Closed => None,
        }
    }
}

/// Why a relay or an idle provider ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("the browser sent a text message; NBD needs binary messages")]
    TextMessage,
}

impl ProviderStream {
    /// Reads what the provider sends next (cancel-safe: nothing is lost if
    /// the future is dropped before it completes).
    async fn receive(&mut self, buffer: &mut [u8]) -> Result<Received, SessionError> {
        match self {
            ProviderStream::Tcp(stream) => read_chunk(stream, buffer).await,
            ProviderStream::WebSocket(stream) => next_message(stream.as_mut()).await,
        }
    }
}

/// The next WebSocket message (cancel-safe), whole or split off its sink.
async fn next_message<S>(stream: &mut S) -> Result<Received, SessionError>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match stream.next().await {
        None => Ok(Received::Closed),
        Some(message) => match message? {
            Message::Binary(bytes) => Ok(Received::Message(bytes)),
            Message::Close(_) => Ok(Received::Closed),
            Message::Text(_) => Err(SessionError::TextMessage),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Received::Nothing),
        },
    }
}

/// One read into `buffer` (cancel-safe).
async fn read_chunk(
    stream: &mut (impl AsyncReadExt + Unpin),
    buffer: &mut [u8],
) -> Result<Received, SessionError> {
    match stream.read(buffer).await? {
        0 => Ok(Received::Closed),
        n => Ok(Received::Read(n)),
    }
}

/// A claim on an idle provider: the provider's task answers on the sender
/// with the provider and what it sent while idle.
type Claim = oneshot::Sender<Handover>;

/// An idle provider handed to a client.
struct Handover {
    id: u64,
    provider: Provider,
    /// What the provider sent while idle (its greeting).
    buffered: Vec<u8>,
}

/// The idle providers, oldest first, and a counter that moves whenever one
/// arrives (so waiting clients wake up).
struct Pool {
    idle: Mutex<VecDeque<(u64, oneshot::Sender<Claim>)>>,
    arrivals: watch::Sender<u64>,
    /// Numbers providers (and the sessions they serve) for the logs, from 1
    /// in order of arrival in the pool.
    next_id: AtomicU64,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            arrivals: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        }
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, oneshot::Sender<Claim>)>> {
        // The lock is never held across a panic-prone call; recover anyway.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a provider at the back and numbers it; `None` when the pool is
    /// full.
    fn push(&self) -> Option<(u64, oneshot::Receiver<Claim>, usize)> {
        let (sender, receiver) = oneshot::channel();
        let (id, waiting) = {
            let mut idle = self.lock();
            if idle.len() >= MAX_IDLE_PROVIDERS {
                return None;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            idle.push_back((id, sender));
            (id, idle.len())
        };
        self.arrivals
            .send_modify(|count| *count = count.wrapping_add(1));
        Some((id, receiver, waiting))
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|(entry, _)| *entry != id);
    }

    fn pop(&self) -> Option<oneshot::Sender<Claim>> {
        self.lock().pop_front().map(|(_, claim)| claim)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

async fn websocket_provider(
    stream: TcpStream,
    peer: SocketAddr,
    pool: Arc<Pool>,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut path = String::new();
    // The error type is tungstenite's, fixed by its `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| {
        path = request.uri().path().to_owned();
        // Pages built for websockify ask for `binary`; say yes so the
        // browser accepts the connection. Without a subprotocol, none.
        let offered = request
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|protocol| protocol.trim() == BINARY_SUBPROTOCOL);
        if offered {
            response.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(BINARY_SUBPROTOCOL),
            );
        }
        Ok::<Response, ErrorResponse>(response)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            debug!("WebSocket handshake with {peer} failed: {error}");
            return;
        }
        Err(_) => {
            debug!("WebSocket handshake with {peer} timed out");
            return;
        }
    };
    let provider = Provider {
        origin: Origin::WebSocket { peer, path },
        stream: ProviderStream::WebSocket(Box::new(stream)),
    };
    provider_session(provider, pool, stop).await;
}

/// Keeps a provider idle in the pool until a client claims it, it closes,
/// or it sends too much.
async fn provider_session(
    mut provider: Provider,
    pool: Arc<Pool>,
    mut stop: watch::Receiver<bool>,
) {
    let Some((id, mut claims, waiting)) = pool.push() else {
        warn!(
            "provider ({}) refused: already {MAX_IDLE_PROVIDERS} idle providers",
            provider.origin
        );
        close_provider(provider.stream, CloseCode::Again, "too many idle sessions").await;
        return;
    };
    info!(
        "provider {id} ({}) connected; {waiting} idle",
        provider.origin
    );
    let mut buffered = Vec::new();
    // Idle providers send a greeting and little else: a small buffer.
    let mut scratch = vec![0; 4096];
    let outcome = loop {
        tokio::select! {
            // A provider that closed is noticed before a claim is granted,
            // so a dead provider is not handed to a client.
            biased;
            received = provider.stream.receive(&mut scratch) => match received {
                Ok(Received::Closed) => break (Dropped::Closed, CloseCode::Normal),
                Ok(received) => {
                    let data = received.data(&scratch).unwrap_or_default();
                    if buffered.len() + data.len() > MAX_IDLE_BYTES {
                        break (Dropped::TooMuch, CloseCode::Policy);
                    }
                    buffered.extend_from_slice(data);
                }
                Err(error) => break (Dropped::Failed(error), CloseCode::Protocol),
            },
            () = stopped(&mut stop) => break (Dropped::Stopping, CloseCode::Away),
            claim = &mut claims => {
                let Ok(claim) = claim else {
                    // The bridge is stopping.
                    return;
                };
                if claim.send(Handover { id, provider, buffered }).is_err() {
                    debug!("provider {id}: the client gave up before the handover");
                }
                return;
            }
        }
    };
    pool.remove(id);
    // A claim may have been granted meanwhile: dropping `claims` refuses it,
    // and the client tries the next provider.
    drop(claims);
    let (outcome, code) = outcome;
    info!(
        "provider {id} ({}) dropped: {outcome}; {} idle",
        provider.origin,
        pool.len()
    );
    let reason = match outcome {
        Dropped::Closed | Dropped::Failed(_) => "",
        Dropped::TooMuch => "too much data before a client came",
        Dropped::Stopping => "bridge stopping",
    };
    close_provider(provider.stream, code, reason).await;
}

/// Why an idle provider left the pool without a client.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("closed while idle")]
    Closed,
    #[error("sent more than {MAX_IDLE_BYTES} bytes before a client came")]
    TooMuch,
    #[error("failed while idle: {0}")]
    Failed(SessionError),
    #[error("the bridge is stopping")]
    Stopping,
}

/// A WebSocket close frame telling the page why.
fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

async fn close_provider(stream: ProviderStream, code: CloseCode, reason: &'static str) {
    let closing = async {
        match stream {
            ProviderStream::Tcp(mut stream) => {
                let _ = stream.shutdown().await;
            }
            ProviderStream::WebSocket(mut stream) => {
                // Deref first: with futures' `alloc` (object_store turns it
                // on) the Box is itself a Sink whose `close` takes no frame.
                let _ = (*stream).close(Some(close_frame(code, reason))).await;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
}

// ---------------------------------------------------------------------------
// Clients

/// Takes the oldest idle provider that still answers, waiting up to `wait`
/// for one to arrive.
async fn take_provider(pool: &Pool, wait: Duration) -> Option<Handover> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut arrivals = pool.arrivals.subscribe();
    loop {
        // Mark the current count seen before looking, so an arrival after
        // the look wakes us.
        arrivals.borrow_and_update();
        while let Some(entry) = pool.pop() {
            let (answer, answered) = oneshot::channel();
            if entry.send(answer).is_err() {
                continue; // That provider's task has ended.
            }
            if let Ok(taken) = answered.await {
                return Some(taken);
            }
        }
        match tokio::time::timeout_at(deadline, arrivals.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

async fn serve_client(
    mut client: TcpStream,
    peer: SocketAddr,
    pool: Arc<Pool>,
    wait: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let _ = client.set_nodelay(true);
    let taken = tokio::select! {
        taken = take_provider(&pool, wait) => taken,
        () = stopped(&mut stop) => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
            return;
        }
    };
    let Some(Handover {
        id,
        provider,
        buffered,
    }) = taken
    else {
        info!(
            "client {peer}: no browser session available within {:.1} s; closing",
            wait.as_secs_f64()
        );
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
        return;
    };
    let Provider { origin, stream } = provider;
    info!(
        "session {id}: client {peer} paired with provider {id} ({origin}); {} idle",
        pool.len()
    );
    let started = Instant::now();
    let (client_read, client_write) = client.into_split();
    let mut counts = Counts::default();
    let end = relay(
        client_read,
        client_write,
        stream,
        buffered,
        &mut counts,
        stop,
    )
    .await;
    info!(
        "session {id} ended ({end}): {} bytes client to provider, {} bytes provider to client, {:.2} s",
        counts.to_provider,
        counts.to_client,
        started.elapsed().as_secs_f64()
    );
}

/// Bytes moved each way in one session.
#[derive(Debug, Default)]
struct Counts {
    to_provider: u64,
    to_client: u64,
}

/// How a session ended, for the log.
enum End {
    ClientClosed,
    ProviderClosed,
    ClientFailed(SessionError),
    ProviderFailed(SessionError),
    Stopped,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::ProviderClosed => f.write_str("provider closed"),
            End::ClientFailed(error) => write!(f, "client connection failed: {error}"),
            End::ProviderFailed(error) => write!(f, "provider connection failed: {error}"),
            End::Stopped => f.write_str("the bridge is stopping"),
        }
    }
}

/// The provider's two directions, split so both run at once.
enum ProviderReader {
    WebSocket(SplitStream<WebSocketStream<TcpStream>>),
    Tcp(OwnedReadHalf),
}

enum ProviderWriter {
    WebSocket(SplitSink<WebSocketStream<TcpStream>, Message>),
    Tcp(OwnedWriteHalf),
}

fn split_provider(stream: ProviderStream) -> (ProviderReader, ProviderWriter) {
    match stream {
        ProviderStream::WebSocket(stream) => {
            let (sink, stream) = (*stream).split();
            (
                ProviderReader::WebSocket(stream),
                ProviderWriter::WebSocket(sink),
            )
        }
        ProviderStream::Tcp(stream) => {
            let (read, write) = stream.into_split();
            (ProviderReader::Tcp(read), ProviderWriter::Tcp(write))
        }
    }
}

impl ProviderReader {
    async fn receive(&mut self, buffer: &mut [u8]) -> Result<Received, SessionError> {
        match self {
            ProviderReader::Tcp(stream) => read_chunk(stream, buffer).await,
            ProviderReader::WebSocket(stream) => next_message(stream).await,
        }
    }
}

impl ProviderWriter {
    /// Sends `data`: as is over TCP, as one binary message over WebSocket.
    async fn send(&mut self, data: &[u8]) -> Result<(), SessionError> {
        match self {
            ProviderWriter::Tcp(stream) => Ok(stream.write_all(data).await?),
            ProviderWriter::WebSocket(sink) => {
                // tungstenite copies the payload into its frame buffer
                // anyway; this copy lets the read buffer be reused.
                let message = Message::Binary(Bytes::copy_from_slice(data));
                Ok(sink.send(message).await?)
            }
        }
    }

    /// Ends the session: FIN over TCP, a close frame over WebSocket.
    async fn close(&mut self, code: CloseCode, reason: &'static str) {
        let _ = match self {
            ProviderWriter::Tcp(stream) => stream.shutdown().await.map_err(SessionError::from),
            ProviderWriter::WebSocket(sink) => {
                let frame = Message::Close(Some(close_frame(code, reason)));
                sink.send(frame).await.map_err(SessionError::from)
            }
        };
    }
}

/// Sends the provider's buffered bytes to the client, then relays both
/// ways until one side closes or fails, then closes the other.
async fn relay(
    mut client_read: OwnedReadHalf,
    mut client_write: OwnedWriteHalf,
    provider: ProviderStream,
    buffered: Vec<u8>,
    counts: &mut Counts,
    mut stop: watch::Receiver<bool>,
) -> End {
    let (mut provider_read, mut provider_write) = split_provider(provider);
    if !buffered.is_empty() {
        if let Err(error) = client_write.write_all(&buffered).await {
            provider_write.close(CloseCode::Normal, "client gone").await;
            return End::ClientFailed(error.into());
        }
        counts.to_client += buffered.len() as u64;
    }
    let Counts {
        to_provider,
        to_client,
    } = counts;
    // Each direction finishes writing what it read before it looks for
    // the end, so nothing read from a side that closed is lost.
    let upstream = async {
        let mut buffer = vec![0; RELAY_CHUNK];
        loop {
            match read_chunk(&mut client_read, &mut buffer).await {
                Ok(Received::Closed) => return End::ClientClosed,
                Ok(received) => {
                    let data = received.data(&buffer).unwrap_or_default();
                    if data.is_empty() {
                        continue;
                    }
                    if let Err(error) = provider_write.send(data).await {
                        return End::ProviderFailed(error);
                    }
                    *to_provider += data.len() as u64;
                }
                Err(error) => return End::ClientFailed(error),
            }
        }
    };
    let downstream = async {
        // WebSocket messages arrive in their own buffers; only TCP reads
        // need this one.
        let mut buffer = match provider_read {
            ProviderReader::Tcp(_) => vec![0; RELAY_CHUNK],
            ProviderReader::WebSocket(_) => Vec::new(),
        };
        loop {
            match provider_read.receive(&mut buffer).await {
                Ok(Received::Closed) => return End::ProviderClosed,
                Ok(received) => {
                    let data = received.data(&buffer).unwrap_or_default();
                    if let Err(error) = client_write.write_all(data).await {
                        return End::ClientFailed(error.into());
                    }
                    *to_client += data.len() as u64;
                }
                Err(error) => return End::ProviderFailed(error),
            }
        }
    };
    let end = tokio::select! {
        end = upstream => end,
        end = downstream => end,
        () = stopped(&mut stop) => End::Stopped,
    };
    let (code, reason) = match end {
        End::Stopped => (CloseCode::Away, "bridge stopping"),
        _ => (CloseCode::Normal, "client closed"),
    };
    let closing = async {
        let _ = client_write.shutdown().await;
        provider_write.close(code, reason).await;
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    end
}
