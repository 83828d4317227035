//! The NBD server: accepts clients on TCP or a unix socket and drives one
//! protocol-core connection per client.
//!
//! Stopping: when the `shutdown` channel turns true the server stops
//! accepting, every connection refuses new requests (`NBD_ESHUTDOWN`) and
//! ends once its requests in flight are answered, then every export is
//! flushed.

mod connection;
mod storage;

use std::io;
use std::path::Path;
use std::sync::Arc;

use nbd_core::server::Config;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use crate::export::ExportSet;

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A unix-domain socket.
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener.
    pub async fn bind_tcp(address: &str, port: u16) -> io::Result<Self> {
        TcpListener::bind((address, port)).await.map(Self::Tcp)
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
}

impl Server {
    /// A server of `exports` with protocol settings `config`.
    pub fn new(exports: ExportSet, config: Config) -> Self {
        Self {
            exports: Arc::new(exports),
            config,
        }
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
        let mut connections = JoinSet::new();
        let mut next_id: u64 = 0;
        let mut watching = true;
        while !*shutdown.borrow() {
            tokio::select! {
                accepted = accept(&listener) => match accepted {
                    Ok(client) => {
                        next_id += 1;
                        self.spawn(&mut connections, client, next_id, shutdown.clone());
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
        while let Some(finished) = connections.join_next().await {
            report(finished);
        }
        self.flush_all().await;
        Ok(())
    }

    fn spawn(
        &self,
        connections: &mut JoinSet<()>,
        client: Client,
        id: u64,
        shutdown: watch::Receiver<bool>,
    ) {
        let exports = Arc::clone(&self.exports);
        let config = self.config;
        let span = info_span!("client", id, peer = %client.peer);
        let peer = client.peer;
        match client.stream {
            Stream::Tcp(stream) => {
                if let Err(error) = stream.set_nodelay(true) {
                    warn!("cannot set TCP_NODELAY for {peer}: {error}");
                }
                connections
                    .spawn(connection::run(stream, exports, config, shutdown).instrument(span));
            }
            Stream::Unix(stream) => {
                connections
                    .spawn(connection::run(stream, exports, config, shutdown).instrument(span));
            }
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

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

struct Client {
    stream: Stream,
    peer: String,
}

async fn accept(listener: &Listener) -> io::Result<Client> {
    match listener {
        Listener::Tcp(listener) => {
            let (stream, peer) = listener.accept().await?;
            Ok(Client {
                stream: Stream::Tcp(stream),
                peer: peer.to_string(),
            })
        }
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            Ok(Client {
                stream: Stream::Unix(stream),
                peer: "unix".to_owned(),
            })
        }
    }
}

fn report(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        error!("connection task failed: {error}");
    }
}
