//! A non-blocking shell over a [smoltcp] TCP socket: one client at a time
//! on one listening socket, re-listening after each client, driven from the
//! application's poll loop. With a second socket
//! ([`TcpServer::with_standby`]) a client arriving while the first is busy
//! or closing is accepted and served next instead of refused.
//!
//! # Several clients
//!
//! smoltcp lets several sockets listen on one port, each taking one
//! connection. To serve `N` clients at once, make `N` servers, each with
//! its own socket, over one card shared by reference with
//! [`SharedCard`](crate::storage::SharedCard), and drive them all with
//! [`poll_all`]:
//!
//! ```ignore
//! let card = open_card();
//! let mut servers: [TcpServer<_, _>; 2] = core::array::from_fn(|i| {
//!     let storage = BlockStorage::new(SharedCard(&card)).unwrap();
//!     TcpServer::new(handles[i], DEFAULT_PORT, Config::default(), exports, storage)
//! });
//! loop {
//!     let delay = net::poll_all(&mut servers, now(), &mut iface, &mut device, &mut sockets);
//!     sleep(delay);
//! }
//! ```
//!
//! Each extra client costs one `TcpServer` (about 2.3 KB: its connection
//! state and its own scratch block, see the crate docs) plus its socket
//! buffers. The clients see one card, without `NBD_FLAG_CAN_MULTI_CONN`:
//! see [`SharedCard`](crate::storage::SharedCard) for what is consistent
//! across connections and what is not.
//!
//! Received bytes are handed to the core straight from the socket's
//! receive buffer (`recv` closure, no copy); write payloads go to the card
//! as they arrive. Replies are written with `send_slice` once the send
//! buffer has room for a whole message header; read data follows one block
//! at a time as the buffer drains, so a 32 MiB read needs no more RAM than
//! the scratch block.
//!
//! [smoltcp]: https://docs.rs/smoltcp

use embedded_sdmmc::BlockDevice;
use nbd_core::export::Catalog;
use nbd_core::server::{CloseReason, Config, Connection};
use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy;
use smoltcp::socket::tcp::{self, RecvError, SendError, State};
use smoltcp::time::{Duration, Instant};

use crate::driver::{Driver, Error};
use crate::storage::BlockStorage;

/// What went wrong on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SocketError {
    /// `send_slice` refused (the connection is going away).
    Send(SendError),
    /// `recv` refused.
    Recv(RecvError),
}

/// How the last client's session ended, for the application to log or
/// count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionEnd {
    /// The client said goodbye.
    Closed(CloseReason),
    /// The client closed or reset the connection without a goodbye.
    Dropped,
    /// The connection was aborted on an error.
    Failed(Error<SocketError>),
}

/// An NBD server on one smoltcp TCP socket, with the storage it serves.
///
/// `C` is the catalog (a cheap `Clone`, such as `&[Export]`); a new
/// connection state (`Connection<C, REQUESTS, BUFFER>`) is made for each
/// client in place. Memory is the struct itself, see the crate docs.
#[derive(Debug)]
pub struct TcpServer<C, D: BlockDevice, const REQUESTS: usize = 16, const BUFFER: usize = 320> {
    handle: SocketHandle,
    /// A second socket on the same port (see [`TcpServer::with_standby`]).
    standby: Option<SocketHandle>,
    /// The socket of the current session: `handle` or `standby`.
    serving: SocketHandle,
    port: u16,
    config: Config,
    catalog: C,
    storage: BlockStorage<D>,
    session: Option<Driver<C, D, REQUESTS, BUFFER>>,
    /// The client said goodbye: send what is left, then close.
    closing: Option<CloseReason>,
    /// Free send-buffer space wanted before the next message is taken.
    reserve: usize,
    last_end: Option<SessionEnd>,
}

impl<C, D, const REQUESTS: usize, const BUFFER: usize> TcpServer<C, D, REQUESTS, BUFFER>
where
    C: Catalog + Clone,
    D: BlockDevice,
{
    /// A server on the TCP socket `handle` (in the application's socket
    /// set, with buffers of its choosing: the send buffer must hold the
    /// largest message header, a few hundred bytes plus export names and
    /// descriptions), listening on `port` (usually [`crate::DEFAULT_PORT`]).
    pub fn new(
        handle: SocketHandle,
        port: u16,
        config: Config,
        catalog: C,
        storage: BlockStorage<D>,
    ) -> Self {
        let strings = (0..catalog.len())
            .filter_map(|i| catalog.get(i))
            .map(|e| e.name.len() + e.description.len())
            .max()
            .unwrap_or(0);
        Self {
            handle,
            standby: None,
            serving: handle,
            port,
            config,
            catalog,
            storage,
            session: None,
            closing: None,
            reserve: 64 + BUFFER + strings,
            last_end: None,
        }
    }

    /// Adds a second socket (`standby`, in the same socket set) that
    /// listens on the same port whenever it is free. Without it, a client
    /// arriving while the one socket is busy, or closing after a session
    /// (until the last FIN is acknowledged: a round trip or a few
    /// retransmissions), is refused with a reset. With it, that client is
    /// accepted, waits for its greeting until the current session ends,
    /// and is then served on the standby socket. The standby may have
    /// smaller buffers than the main socket (its send buffer too must hold
    /// the largest message header); sessions on it are then slower.
    pub fn with_standby(mut self, standby: SocketHandle) -> Self {
        self.standby = Some(standby);
        self
    }

    /// The storage.
    pub fn storage(&self) -> &BlockStorage<D> {
        &self.storage
    }

    /// Whether a client is connected.
    pub fn has_client(&self) -> bool {
        self.session.is_some()
    }

    /// How the last session ended, taken once.
    pub fn take_session_end(&mut self) -> Option<SessionEnd> {
        self.last_end.take()
    }

    /// Polls the interface, serves the client as far as possible without
    /// blocking, and polls again to send what was produced. Returns how
    /// long the application may sleep (or wait for an interrupt) before
    /// the next call: `Some(ZERO)` when work is left that can go on now or
    /// the last interface poll changed a socket, else the interface's own
    /// delay (`None`: until a frame arrives).
    pub fn poll<P: phy::Device + ?Sized>(
        &mut self,
        now: Instant,
        iface: &mut Interface,
        device: &mut P,
        sockets: &mut SocketSet<'_>,
    ) -> Option<Duration> {
        poll_all(core::slice::from_mut(self), now, iface, device, sockets)
    }

    /// The main socket this server serves (see also
    /// [`TcpServer::with_standby`]).
    pub fn handle(&self) -> SocketHandle {
        self.handle
    }

    /// Serves the sockets without touching the interface (for applications
    /// that poll the interface themselves). Returns whether work is left
    /// that could go on at once.
    ///
    /// Every socket not in a session listens again as soon as it is closed.
    /// A connection is served once established, also when the client
    /// already closed its side (it may have sent requests before its FIN,
    /// and the socket must be closed by us to listen again): a socket left
    /// in CLOSE-WAIT without a session would hold the port forever.
    pub fn service(&mut self, sockets: &mut SocketSet<'_>) -> bool {
        let serving = sockets.get_mut::<tcp::Socket>(self.serving);
        let dropped = self.session.is_some() && !serving.is_open();
        if dropped {
            self.session = None;
            self.closing = None;
            self.end(SessionEnd::Dropped);
        }
        let mut listened_again = false;
        for handle in self.sockets() {
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            listened_again |= !socket.is_open() && socket.listen(self.port).is_ok();
        }
        if listened_again {
            // How many listen tells whether a client arriving now is
            // accepted while another's socket is busy or still closing.
            let listening = self
                .sockets()
                .filter(|&h| sockets.get_mut::<tcp::Socket>(h).state() == State::Listen)
                .count();
            info!(
                "listening on port {} ({} of {} sockets)",
                self.port,
                listening,
                self.sockets().count()
            );
        }
        if self.session.is_none() {
            if dropped {
                // The next session starts at the next call, once the
                // application could take this one's end: a session
                // failing at once would overwrite it.
                return true;
            }
            let Some(handle) = self.sockets().find(|&handle| {
                matches!(
                    sockets.get_mut::<tcp::Socket>(handle).state(),
                    State::Established | State::CloseWait
                )
            }) else {
                return false;
            };
            info!("client connected");
            self.serving = handle;
            // Whatever a dropped client left in the scratch block is stale.
            self.storage.invalidate();
            self.session = Some(Driver::new(Connection::new(
                self.catalog.clone(),
                self.config,
            )));
        }
        let socket = sockets.get_mut::<tcp::Socket>(self.serving);
        match self.run(socket) {
            Ok(more) => more,
            Err(error) => {
                warn!("session failed: {:?}", error);
                socket.abort();
                self.session = None;
                self.closing = None;
                self.end(SessionEnd::Failed(error));
                false
            }
        }
    }

    /// The main socket, then the standby if there is one.
    fn sockets(&self) -> impl Iterator<Item = SocketHandle> {
        [Some(self.handle), self.standby].into_iter().flatten()
    }

    fn end(&mut self, end: SessionEnd) {
        self.last_end = Some(end);
    }

    fn run(&mut self, socket: &mut tcp::Socket<'_>) -> Result<bool, Error<SocketError>> {
        let Some(driver) = self.session.as_mut() else {
            return Ok(false);
        };
        loop {
            let sent = send(driver, &mut self.storage, socket, self.reserve)?;
            if let Some(reason) = self.closing {
                if driver.out.is_none() && !sent {
                    // Everything was handed to the socket: FIN after it.
                    socket.close();
                    self.session = None;
                    self.closing = None;
                    self.end(SessionEnd::Closed(reason));
                    return Ok(false);
                }
                if !sent {
                    return Ok(false);
                }
                continue;
            }
            let (used, close);
            if socket.can_recv() {
                let storage = &mut self.storage;
                let result = socket
                    .recv(|input| match driver.input(storage, input) {
                        Ok((n, reason)) => (n, Ok((n, reason))),
                        Err(error) => (0, Err(error)),
                    })
                    .map_err(|e| Error::Transport(SocketError::Recv(e)))?;
                (used, close) = result?;
            } else if !socket.may_recv() && driver.out.is_none() {
                // The client closed its side without a goodbye.
                driver.end_of_input();
                socket.close();
                self.session = None;
                self.end(SessionEnd::Dropped);
                return Ok(false);
            } else {
                // Events that need no input (a flush released by a write).
                (used, close) = driver.input(&mut self.storage, &[])?;
            }
            if close.is_some() {
                self.closing = close;
                continue;
            }
            if used == 0 && !sent {
                return Ok(false);
            }
        }
    }
}

/// [`TcpServer::poll`] for several servers on one interface (one per
/// concurrent client, usually all listening on the same port): polls the
/// interface, serves every server's socket, and polls again. Returns how
/// long the application may sleep, as [`TcpServer::poll`] does.
pub fn poll_all<C, D, P, const REQUESTS: usize, const BUFFER: usize>(
    servers: &mut [TcpServer<C, D, REQUESTS, BUFFER>],
    now: Instant,
    iface: &mut Interface,
    device: &mut P,
    sockets: &mut SocketSet<'_>,
) -> Option<Duration>
where
    C: Catalog + Clone,
    D: BlockDevice,
    P: phy::Device + ?Sized,
{
    iface.poll(now, device, sockets);
    let mut more = false;
    for server in servers.iter_mut() {
        more |= server.service(sockets);
    }
    // This second poll also takes in frames that came meanwhile (the last
    // ACK of a handshake, a request) that `service` has not seen: sleeping
    // on them would stall a client until some unrelated frame arrives. So
    // after any socket change, ask to be called again.
    let changed = iface.poll(now, device, sockets) == PollResult::SocketStateChanged;
    if more || changed {
        Some(Duration::ZERO)
    } else {
        iface.poll_delay(now, sockets)
    }
}

/// Hands the socket every message that fits and as much payload as it
/// takes. Returns whether anything was sent.
fn send<C, D, const REQUESTS: usize, const BUFFER: usize>(
    driver: &mut Driver<C, D, REQUESTS, BUFFER>,
    storage: &mut BlockStorage<D>,
    socket: &mut tcp::Socket<'_>,
    reserve: usize,
) -> Result<bool, Error<SocketError>>
where
    C: Catalog,
    D: BlockDevice,
{
    let send_error = |e| Error::Transport(SocketError::Send(e));
    let mut sent = false;
    loop {
        if let Some(piece) = driver.payload(storage)? {
            let n = socket.send_slice(piece).map_err(send_error)?;
            let whole = n == piece.len();
            if n > 0 {
                sent = true;
                driver.advance(n)?;
            }
            if !whole {
                return Ok(sent);
            }
            continue;
        }
        let capacity = socket.send_capacity();
        let free = capacity - socket.send_queue();
        if free < reserve.min(capacity) {
            return Ok(sent);
        }
        let Some(parts) = driver.next_message(storage) else {
            return Ok(sent);
        };
        if parts.iter().map(|p| p.len()).sum::<usize>() > free {
            return Err(Error::SendBufferTooSmall);
        }
        for part in parts {
            socket.send_slice(part).map_err(send_error)?;
        }
        sent = true;
    }
}
